//! In-process fake Salesforce for the Centercode → Salesforce direction: the OAuth token
//! endpoint, sObject upserts and Collections, the daily API limit, scripted faults, and a
//! `/__fake` control plane. Serves tests, the demo and the benchmark; never a real org.
//!
//! # Layout
//! - [`configuration`]: [`FakeSalesforceConfig`], the trusted app, user and limits.
//! - `oauth`: `POST /services/oauth2/token` (JWT bearer with RS256, client credentials).
//! - `data`: `/services/data/vNN.N/…`, the bearer check, usage and the records.
//! - [`faults`]: [`Fault`] and [`RecordRule`], the scripted failures.
//! - `state`: the org's memory behind one mutex.
//! - `control`: `/__fake/…`, the same operations as [`FakeSalesforce`]'s methods.
//! - [`test_keys`]: the checked-in key pair the default config trusts.

pub mod configuration;
mod control;
mod data;
pub mod faults;
mod oauth;
mod state;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};
use serde_json::{Map, Value};

pub use configuration::{
    ClientCredentialsConfig, FakeSalesforceConfig, JwtBearerConfig, STANDARD_AUDIENCES,
};
pub use data::MAX_COLLECTION_RECORDS;
pub use faults::{Fault, FaultKind, RecordRule};
pub use oauth::JWT_BEARER_GRANT;
#[doc(hidden)]
pub use oauth::{sign_test_assertion, test_claims};
pub use state::{ApiUsage, Counters, RecordedWrite, SObjectRecord};

use state::{Shared, State};

/// Key material for tests and the demo only. These keys are public (they are in the
/// repository): never upload this certificate to a real org or use these keys for one.
pub mod test_keys {
    /// RSA-2048 private key (PKCS#8 PEM) whose certificate the default config trusts.
    pub const PRIVATE_KEY_PEM: &str = include_str!("../testdata/private_key.pem");
    /// Self-signed X.509 certificate (`CN=relay-test`) of [`PRIVATE_KEY_PEM`].
    pub const CERT_PEM: &str = include_str!("../testdata/cert.pem");
    /// A second RSA-2048 key (PKCS#8 PEM) that the default config does not trust.
    pub const OTHER_PRIVATE_KEY_PEM: &str = include_str!("../testdata/other_private_key.pem");
    /// The certificate of [`OTHER_PRIVATE_KEY_PEM`].
    pub const OTHER_CERT_PEM: &str = include_str!("../testdata/other_cert.pem");
    /// Consumer key of the test app (JWT `iss`, client-credentials `client_id`).
    pub const CLIENT_ID: &str = "3MVG9-relay-test";
    /// The integration user (JWT `sub`).
    pub const USERNAME: &str = "integration@relay.test";
    /// Consumer secret of the test app for the client-credentials flow.
    pub const CLIENT_SECRET: &str = "relay-test-secret-not-for-production";
}

/// A running fake Salesforce server.
pub struct FakeSalesforce {
    shared: Arc<Shared>,
    addr: SocketAddr,
    handle: ServerHandle,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl FakeSalesforce {
    /// Starts on `127.0.0.1` with an ephemeral port.
    pub async fn start(config: FakeSalesforceConfig) -> std::io::Result<Self> {
        Self::start_on(config, "127.0.0.1:0").await
    }

    /// Starts on `bind` (e.g. `127.0.0.1:9191`). Must be called inside a tokio runtime.
    /// An invalid config (a certificate that does not parse) is `InvalidInput`.
    pub async fn start_on(config: FakeSalesforceConfig, bind: &str) -> std::io::Result<Self> {
        config
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config, base_url(addr)));
        let data = web::Data::from(shared.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                // Control-plane bodies are JSON whatever the Content-Type (handy with curl).
                .app_data(
                    web::JsonConfig::default()
                        .content_type_required(false)
                        .limit(16 << 20),
                )
                // A full Collections request is 200 records.
                .app_data(web::PayloadConfig::new(16 << 20))
                .app_data(web::FormConfig::default().error_handler(oauth::form_error))
                .configure(control::routes)
                .route("/services/oauth2/token", web::post().to(oauth::token))
                .route("/services/data/{tail:.*}", web::to(data::data_api))
        })
        // Runs inside the relay's tests and process: one worker, and no signal handlers of its own.
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
        let handle = server.handle();
        let task = tokio::spawn(server);
        tracing::debug!(%addr, "fake Salesforce started");
        Ok(Self {
            shared,
            addr,
            handle,
            task: Some(task),
        })
    }

    /// `http://IP:PORT` (an unspecified bind address is reported as 127.0.0.1): the
    /// `instance_url` and a My Domain login URL at once.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `{base_url}/services/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!("{}/services/oauth2/token", self.base_url())
    }

    /// Back to the startup config with no records, tokens, writes, faults or rules.
    pub fn reset(&self) {
        *self.shared.lock() = State::new(self.shared.startup.clone());
    }

    /// The configuration in force.
    pub fn config(&self) -> FakeSalesforceConfig {
        self.shared.lock().config.clone()
    }

    /// Replaces the configuration; API usage restarts from its `api_used`/`api_allocation`,
    /// everything else is kept. Refused (and nothing changed) when it does not validate.
    pub fn set_config(&self, config: FakeSalesforceConfig) -> Result<(), String> {
        control::apply_config(&mut self.shared.lock(), config)
    }

    /// The records of `sobject`, in creation order.
    pub fn records(&self, sobject: &str) -> Vec<SObjectRecord> {
        self.shared.lock().records(sobject).to_vec()
    }

    /// Creates a record directly (e.g. a second one with the same external id, for a 300)
    /// and returns its id. `Id` and `attributes` in `fields` are ignored.
    pub fn insert_record(&self, sobject: &str, fields: Value) -> String {
        let fields = match fields {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        self.shared.lock().insert(sobject, fields)
    }

    /// Recorded write requests (every method but GET) in arrival order.
    pub fn writes(&self) -> Vec<RecordedWrite> {
        self.shared.lock().writes()
    }

    /// Access tokens minted so far.
    pub fn tokens_minted(&self) -> u64 {
        self.shared.lock().tokens_minted
    }

    /// The access tokens that are live now (for tests that check no token is ever logged).
    pub fn live_tokens(&self) -> Vec<String> {
        self.shared.lock().live_tokens()
    }

    /// Requests that reached the data API so far, whatever their answer.
    pub fn data_calls(&self) -> u64 {
        self.shared.lock().data_calls
    }

    /// Tokens minted, data calls and API usage at once.
    pub fn counters(&self) -> Counters {
        self.shared.lock().counters()
    }

    /// The org's API usage now.
    pub fn api_usage(&self) -> ApiUsage {
        self.shared.lock().usage
    }

    /// Sets the API usage (e.g. `used == allocation` for `REQUEST_LIMIT_EXCEEDED`).
    pub fn set_api_usage(&self, used: u64, allocation: u64) {
        self.shared.lock().usage = ApiUsage { used, allocation };
    }

    /// Every token minted so far answers 401 `INVALID_SESSION_ID` from now on; new ones work.
    pub fn revoke_tokens(&self) {
        self.shared.lock().revoke_tokens();
    }

    /// Appends a fault to the FIFO queue.
    pub fn push_fault(&self, fault: Fault) {
        self.shared.lock().faults.push_back(fault);
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Adds a per-record failure rule (the first matching rule fires).
    pub fn add_record_rule(&self, rule: RecordRule) {
        self.shared.lock().rules.push(rule);
    }

    /// Drops every record rule.
    pub fn clear_record_rules(&self) {
        self.shared.lock().rules.clear();
    }

    /// Waits until at least `n` writes are recorded and returns them.
    /// Panics with the number that arrived if `timeout` passes first.
    pub async fn wait_for_writes(&self, n: usize, timeout: Duration) -> Vec<RecordedWrite> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            // Register before checking so a write recorded in between is not missed.
            notified.as_mut().enable();
            let writes = self.writes();
            if writes.len() >= n {
                return writes;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let got = self.writes().len();
                panic!("fake Salesforce: waited {timeout:?} for {n} write(s), only {got} arrived");
            }
        }
    }

    /// Stops the server (in-flight requests are aborted).
    pub async fn stop(mut self) {
        self.handle.stop(false).await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FakeSalesforce {
    fn drop(&mut self) {
        // Forgetting `stop()` must not leave worker threads serving; the command is sent eagerly.
        if self.task.is_some() {
            drop(self.handle.stop(false));
        }
    }
}

fn base_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}
