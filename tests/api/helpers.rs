//! `spawn_app()` and friends: one relay and one fake Centercode per test.

use base64::Engine;
use fake_centercode::{FakeCentercode, FakeConfig};
use hmac::{Hmac, Mac};
use sf_centercode_relay::queue::rabbitmq::{QueueNames, RabbitConfig};
use sf_centercode_relay::queue::{Queue, QueueStats, RabbitQueue};
use sf_centercode_relay::settings::RabbitQueueType;
use sf_centercode_relay::settings::Settings;
use sf_centercode_relay::startup::Application;
use sf_centercode_relay::worker::{Outcome, Worker};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

pub const ORG: &str = "00D8d000001AbCdEAK";
pub const API_KEY: &str = "test-key";
pub const BEARER: &str = "bearer-token-for-tests-0123456789";
pub const HMAC_SECRET: &str = "fixture-only-shared-secret-not-for-production";

/// A Salesforce sample (`examples/salesforce/`, what admins and the demo use) or a hostile
/// input (`tests/fixtures/salesforce/`, with the manifest of expected answers).
pub fn fixture_path(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let sample = root.join("examples/salesforce").join(name);
    if sample.exists() {
        sample
    } else {
        root.join("tests/fixtures/salesforce").join(name)
    }
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Routes used by most tests, pointing at the fake at `base`.
pub fn routes_toml(base: &str) -> String {
    format!(
        r#"
[[routes]]
name = "gdpr"
kind = "outbound_message"
org_ids = ["00D8d000001AbCd"]
sobject = "Contact"
action = "remove_user"
url = "{base}/api/v1/userMacroListeners/gdpr"
email_field = "Email"

[[routes]]
name = "feedback"
kind = "outbound_message"
org_ids = ["{ORG}"]
sobject = "Feedback__c"
action = "create_feedback"
url = "{base}/api/v1/projects/beta1/externalSources/sf-issues"
[routes.fields]
summary = {{ from = "Subject__c", required = true, max_len = 255 }}
description = "Description__c"
severity = {{ from = "Priority__c", map = {{ High = "Major", Medium = "Minor", Low = "Cosmetic" }}, default = "Minor" }}
status = {{ value = "New" }}
salesforce_id = "Id"
component = "Component__c"

[[routes]]
name = "case-feedback"
kind = "outbound_message"
org_ids = ["{ORG}"]
sobject = "Case"
action = "create_feedback"
url = "{base}/api/v1/projects/beta1/externalSources/sf-issues"
[routes.fields]
summary = {{ from = "Subject", required = true, max_len = 255 }}
description = "Description"
severity = {{ from = "Priority", map = {{ High = "Major", Medium = "Minor", Low = "Cosmetic" }}, default = "Minor" }}
salesforce_id = "Id"
platform = "Platform__c"

[[routes]]
name = "apex-removal"
kind = "callout"
action = "remove_user"
url = "{base}/api/v1/userMacroListeners/gdpr"
email_field = "/subject/email"
auth = {{ bearer = "{BEARER}" }}

[[routes]]
name = "apex-feedback"
kind = "callout"
action = "create_feedback"
url = "{base}/api/v1/projects/beta1/externalSources/sf-issues"
auth = {{ hmac_secret = "{HMAC_SECRET}" }}
[routes.fields]
summary = {{ from = "/feedback/title", required = true, max_len = 255 }}
description = "/feedback/description"
severity = {{ from = "/feedback/priority", map = {{ High = "Major", Medium = "Minor", Low = "Cosmetic" }}, default = "Minor" }}
salesforce_id = "/record/recordId"

[[routes]]
name = "flow-feedback"
kind = "callout"
action = "create_feedback"
url = "{base}/api/v1/projects/beta1/externalSources/sf-ideas"
auth = {{ bearer = "{BEARER}" }}
idempotency_key_field = "/recordId"
[routes.fields]
summary = {{ from = "/title", required = true }}
description = "/description"
salesforce_id = "/recordId"
"#
    )
}

/// A running relay (gateway only; tests drive the worker) plus its fake Centercode.
pub struct TestApp {
    pub address: String,
    pub centercode: FakeCentercode,
    pub queue: Queue,
    pub worker: Worker,
    pub settings: std::sync::Arc<Settings>,
    pub control: std::sync::Arc<sf_centercode_relay::control::RouteControl>,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
    /// The broker prefix of a RabbitMQ-backed app (dropped last: deletes its queues).
    pub rabbit: Option<RabbitEnv>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
        if self.rabbit.is_some() {
            // No reconnection while the test's queues are deleted.
            self.queue.close();
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// The settings every test starts from, with routes pointing at the fake at `base`.
pub fn test_settings(db: &std::path::Path, base: &str) -> Settings {
    let toml = format!(
        r#"
[server]
bind = "127.0.0.1:0"
max_body_bytes = 1048576
workers = 1
# Tests read /metrics right after each step; the cache is tested on its own (inbound.rs).
probe_cache_ms = 0
[queue]
backend = "embedded"
path = "{db}"
lease_secs = 30
[worker]
concurrency = 8
retry_schedule_secs = [0.05, 0.05, 0.05]
max_age_secs = 3600
[centercode]
api_key = "{API_KEY}"
timeout_ms = 2000
{routes}"#,
        db = db.display(),
        routes = routes_toml(base),
    );
    Settings::from_toml(&toml).expect("test settings")
}

/// Spawn with the test settings changed by `adjust`.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on(Backend::Embedded, adjust).await
}

/// Spawn on the given queue backend with the test settings changed by `adjust`.
pub async fn spawn_app_on(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let rabbit = match backend {
        Backend::Embedded => None,
        Backend::Rabbitmq => Some(RabbitEnv::new().await),
    };
    spawn_app_in(rabbit, adjust).await
}

/// Spawn on RabbitMQ under `rabbit`'s prefix (or on the embedded queue for `None`).
pub async fn spawn_app_in(
    rabbit: Option<RabbitEnv>,
    adjust: impl FnOnce(&mut Settings),
) -> TestApp {
    let centercode = FakeCentercode::start(FakeConfig::demo())
        .await
        .expect("fake centercode");
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir.path().join("relay.db"), &centercode.base_url());
    if let Some(env) = &rabbit {
        env.apply(&mut settings);
    }
    adjust(&mut settings);
    settings.validate().expect("adjusted settings are valid");
    let app = Application::build(settings).await.expect("build app");
    let address = format!("http://127.0.0.1:{}", app.port());
    let queue = app.queue().clone();
    let worker = app.worker();
    let settings = app.settings();
    let control = app.control();
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone(), false));
    TestApp {
        address,
        centercode,
        queue,
        worker,
        settings,
        control,
        client: reqwest::Client::new(),
        _dir: dir,
        stop,
        rabbit,
    }
}

impl TestApp {
    pub async fn post_outbound(&self, route: &str, body: Vec<u8>) -> reqwest::Response {
        self.post_outbound_as(route, body, "text/xml; charset=utf-8")
            .await
    }

    pub async fn post_outbound_as(
        &self,
        route: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> reqwest::Response {
        self.client
            .post(format!("{}/salesforce/outbound/{route}", self.address))
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_callout(
        &self,
        route: &str,
        body: &[u8],
        headers: &[(&str, String)],
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}/salesforce/callout/{route}", self.address))
            .header("Content-Type", "application/json")
            .body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req.send().await.expect("request sent")
    }

    /// The gateway's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.address))
            .send()
            .await
            .expect("metrics answered")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn stats(&self) -> QueueStats {
        self.queue.stats().await.unwrap()
    }

    /// Deliver until nothing is ready or waiting for a retry, polling with a deadline.
    pub async fn deliver_until_settled(&self) -> Vec<Outcome> {
        self.deliver_until_settled_within(Duration::from_secs(20))
            .await
    }

    /// [`Self::deliver_until_settled`] with another deadline.
    pub async fn deliver_until_settled_within(&self, limit: Duration) -> Vec<Outcome> {
        let deadline = Instant::now() + limit;
        let mut outcomes = Vec::new();
        loop {
            outcomes.extend(self.worker.deliver_all().await.unwrap());
            let s = self.stats().await;
            if s.ready == 0 && s.retrying == 0 && s.in_flight == 0 {
                return outcomes;
            }
            assert!(
                Instant::now() < deadline,
                "queue did not settle: {s:?} after {outcomes:?}"
            );
            // Poll interval while retries come due (the schedule is 50 ms in tests).
            tokio::time::sleep(Duration::from_millis(20)).await; // poll with deadline
        }
    }
}

/// Headers of an HMAC-signed callout, timestamped now.
pub fn hmac_headers(body: &[u8], key: &str) -> Vec<(&'static str, String)> {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    vec![
        ("X-Relay-Timestamp", ts.clone()),
        ("X-Relay-Signature", sign_v2(HMAC_SECRET, &ts, key, body)),
        ("Idempotency-Key", key.to_owned()),
    ]
}

/// `v1=`: timestamp and body (accepted only where a route sets `hmac_accept_v1`).
pub fn sign(secret: &str, ts: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1={}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// `v2=`: timestamp, Idempotency-Key (empty when none is sent) and body.
pub fn sign_v2(secret: &str, ts: &str, key: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    for part in [ts.as_bytes(), b".", key.as_bytes(), b".", body] {
        mac.update(part);
    }
    format!(
        "v2={}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

pub fn bearer(key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Authorization", format!("Bearer {BEARER}")),
        ("Idempotency-Key", key.to_owned()),
    ]
}

// ---------------------------------------------------------------------------------------
// RabbitMQ (and Redis) for the tests that use the broker.

/// Which queue backend a spawned relay uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Rabbitmq,
}

/// Held shared by every RabbitMQ test and exclusively by the broker-restart test, across all
/// test processes on this machine, so stopping the broker never breaks another test. It is a
/// SQLite file lock (rollback journal): a read transaction holds SHARED, `BEGIN EXCLUSIVE`
/// waits for every reader, and a waiting writer keeps new readers out. Released on drop.
pub struct BrokerLock(#[allow(dead_code)] rusqlite::Connection);

impl BrokerLock {
    pub async fn shared() -> Self {
        Self::take(false).await
    }

    pub async fn exclusive() -> Self {
        Self::take(true).await
    }

    async fn take(exclusive: bool) -> Self {
        tokio::task::spawn_blocking(move || {
            let path = std::env::temp_dir().join("sf-centercode-relay-rabbitmq-tests.lock");
            let conn = rusqlite::Connection::open(path).expect("open the broker lock file");
            conn.busy_timeout(Duration::from_secs(600)).unwrap();
            conn.execute_batch(
                "PRAGMA journal_mode = DELETE; CREATE TABLE IF NOT EXISTS held (x INTEGER);",
            )
            .expect("prepare the broker lock file");
            if exclusive {
                conn.execute_batch("BEGIN EXCLUSIVE")
                    .expect("take the broker lock");
            } else {
                conn.execute_batch("BEGIN").unwrap();
                conn.query_row("SELECT count(*) FROM held", [], |r| r.get::<_, i64>(0))
                    .expect("share the broker lock");
            }
            BrokerLock(conn)
        })
        .await
        .unwrap()
    }
}

/// The broker the tests use: `RELAY_TEST_AMQP_URL` or the local one, else one the harness
/// starts (see `services`).
pub fn amqp_url() -> String {
    crate::services::rabbitmq().url.clone()
}

/// `host:port` of an AMQP URL (`amqp://user:pass@host:port/vhost`), for proxies in front of it.
pub fn broker_address(url: &str) -> String {
    url.split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5672")
        .to_owned()
}

/// The Redis the tests use: `RELAY_TEST_REDIS_URL` or the local one, else one the harness
/// starts (see `services`).
pub fn redis_url() -> String {
    crate::services::redis().url.clone()
}

/// Panic (never skip) when no broker answers at `url`.
pub async fn require_rabbitmq(url: &str) {
    let connect = lapin::Connection::connect(url, lapin::ConnectionProperties::default());
    let err = match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "probe").await;
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 3 s".to_owned(),
    };
    panic!(
        "RabbitMQ is not reachable at {url}: {err}. Set RELAY_TEST_AMQP_URL to a running broker, \
         or leave it unset and let the tests start their own (apt-get install rabbitmq-server)."
    );
}

/// Panic (never skip) when no Redis answers at `url`.
pub async fn require_redis(url: &str) {
    let ping = async {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    let err = match tokio::time::timeout(Duration::from_secs(3), ping).await {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 3 s".to_owned(),
    };
    panic!(
        "Redis is not reachable at {url}: {err}. Set RELAY_TEST_REDIS_URL to a running Redis, \
         or leave it unset and let the tests start their own (apt-get install redis-server)."
    );
}

/// One test's share of the broker: a UUID queue prefix, the queues opened under it, and
/// cleanup on drop (queues deleted, Redis keys removed), even when the test panics.
pub struct RabbitEnv {
    pub url: String,
    pub redis_url: String,
    pub prefix: String,
    opened: std::sync::Mutex<Vec<Queue>>,
    _lock: Option<BrokerLock>,
}

impl RabbitEnv {
    /// A fresh prefix on the shared broker (waits while the broker-restart test runs).
    pub async fn new() -> Self {
        let lock = BrokerLock::shared().await;
        Self::with_lock(Some(lock)).await
    }

    /// For the test that owns the broker exclusively (holds [`BrokerOwner`]).
    pub async fn unlocked() -> Self {
        Self::with_lock(None).await
    }

    async fn with_lock(mut lock: Option<BrokerLock>) -> Self {
        let (url, redis_url) = (amqp_url(), redis_url());
        require_rabbitmq(&url).await;
        require_redis(&redis_url).await;
        if lock.is_some() && !dead_lettering_works(&url).await {
            // RabbitMQ bug (rabbitmq-server#16652): a burst of deletions of at-least-once
            // dead-lettering quorum queues, as test cleanups produce, can trip the broker's
            // DLX supervisor, after which no such queue can be declared until the app
            // restarts. Restart it while no other test uses the broker.
            drop(lock.take());
            let owner = BrokerLock::exclusive().await;
            if !dead_lettering_works(&url).await {
                eprintln!("RabbitMQ's dead-lettering supervisor is down (rabbitmq-server#16652); restarting the app");
                for step in ["stop_app", "start_app"] {
                    let ok = crate::services::rabbitmqctl()
                        .arg(step)
                        .status()
                        .is_ok_and(|s| s.success());
                    assert!(
                        ok,
                        "rabbitmqctl {step} failed while repairing the test broker"
                    );
                }
                require_rabbitmq(&url).await;
            }
            drop(owner);
            lock = Some(BrokerLock::shared().await);
        }
        Self {
            url,
            redis_url,
            prefix: format!("test-{}", uuid::Uuid::new_v4().simple()),
            opened: Default::default(),
            _lock: lock,
        }
    }

    /// Point `settings` at this prefix, with Redis dedupe and sub-second retry tiers.
    pub fn apply(&self, settings: &mut Settings) {
        use sf_centercode_relay::settings::QueueBackend;
        settings.queue.backend = QueueBackend::Rabbitmq;
        settings.queue.url = self.url.clone().into();
        settings.queue.prefix = self.prefix.clone();
        settings.queue.redis_url = Some(self.redis_url.clone().into());
        settings.queue.dedupe_ttl_secs = 600;
        settings.worker.retry_schedule_secs = vec![0.2, 0.2];
    }

    /// Backend settings for a queue opened directly (conformance tests).
    pub fn config(&self, retry_secs: &[f64], with_redis: bool) -> RabbitConfig {
        RabbitConfig {
            url: self.url.clone().into(),
            prefix: self.prefix.clone(),
            queue_type: RabbitQueueType::Quorum,
            retry_tiers: retry_secs
                .iter()
                .map(|s| Duration::from_secs_f64(*s))
                .collect(),
            prefetch: 64,
            confirm_timeout: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            dedupe_ttl: Duration::from_secs(600),
            redis_url: with_redis.then(|| self.redis_url.clone().into()),
        }
    }

    /// Open a queue under this prefix; it is closed before the queues are deleted.
    pub async fn open(&self, config: RabbitConfig) -> Queue {
        let q = Queue::Rabbit(
            RabbitQueue::connect(config)
                .await
                .expect("connect to RabbitMQ"),
        );
        self.track(q.clone());
        q
    }

    /// Close `queue` when this environment is cleaned up.
    pub fn track(&self, queue: Queue) {
        self.opened.lock().unwrap().push(queue);
    }
}

impl Drop for RabbitEnv {
    fn drop(&mut self) {
        for q in self.opened.lock().unwrap().drain(..) {
            q.close();
        }
        let (url, redis_url, prefix) = (
            self.url.clone(),
            self.redis_url.clone(),
            self.prefix.clone(),
        );
        // Drop may run inside a runtime: clean up from a thread with its own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(delete_prefix(&url, &redis_url, &prefix));
        });
        let _ = cleanup.join();
    }
}

/// Whether the broker can still declare an at-least-once dead-lettering quorum queue.
async fn dead_lettering_works(url: &str) -> bool {
    use lapin::types::{AMQPValue, FieldTable};
    let Ok(Ok(conn)) = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await
    else {
        return true; // unreachable brokers are reported by require_rabbitmq
    };
    let name = format!("test-probe-{}", uuid::Uuid::new_v4().simple());
    let mut args = FieldTable::default();
    for (k, v) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
        ("x-dead-letter-exchange", ""),
    ] {
        args.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    let ok = match conn.create_channel().await {
        Ok(ch) => {
            let declared = ch
                .queue_declare(
                    &name,
                    // Quorum queues are durable only: a non-durable declaration is refused
                    // on a healthy broker too, and would read as the bug.
                    lapin::options::QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args,
                )
                .await
                .is_ok();
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(&name, lapin::options::QueueDeleteOptions::default())
                    .await;
            }
            declared
        }
        Err(_) => false,
    };
    let _ = conn.close(200, "probe").await;
    ok
}

/// Test cleanups run one at a time and pace their deletions, to stay far below the burst of
/// dead-lettering worker exits that trips RabbitMQ's supervisor (rabbitmq-server#16652).
static CLEANUP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Delete the queues (up to 8 retry tiers) and Redis keys of `prefix`.
pub async fn delete_prefix(url: &str, redis_url: &str, prefix: &str) {
    let _one_at_a_time = CLEANUP.lock().await;
    let names = QueueNames::new(prefix, 8);
    let connect = lapin::Connection::connect(url, lapin::ConnectionProperties::default());
    if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(5), connect).await {
        // Pacing, not waiting for work: at most 50 deletions a second (see CLEANUP).
        let mut pace = tokio::time::interval(Duration::from_millis(20));
        for name in names.all() {
            pace.tick().await;
            // One channel per delete: an error closes the channel it happened on.
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(name, lapin::options::QueueDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "test cleanup").await;
    }
    if let Ok(client) = redis::Client::open(redis_url) {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}:*"))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _ = redis::cmd("DEL")
                    .arg(keys)
                    .query_async::<()>(&mut conn)
                    .await;
            }
        }
    }
}

/// Exclusive use of the broker (to stop and start it); `rabbitmqctl start_app` runs on drop,
/// so the broker is back even when the test fails.
pub struct BrokerOwner {
    _lock: BrokerLock,
}

impl BrokerOwner {
    pub async fn acquire() -> Self {
        Self {
            _lock: BrokerLock::exclusive().await,
        }
    }

    /// `rabbitmqctl stop_app`: every connection is closed and new ones are refused.
    pub async fn stop_app(&self) {
        rabbitmqctl("stop_app").await;
    }

    /// `rabbitmqctl start_app`, then wait until AMQP connections are accepted again.
    pub async fn start_app(&self) {
        rabbitmqctl("start_app").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = amqp_url();
        loop {
            let connect = lapin::Connection::connect(&url, lapin::ConnectionProperties::default());
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
                let _ = conn.close(200, "probe").await;
                return;
            }
            assert!(Instant::now() < deadline, "RabbitMQ did not come back");
            tokio::time::sleep(Duration::from_millis(100)).await; // poll with deadline
        }
    }
}

impl Drop for BrokerOwner {
    fn drop(&mut self) {
        // Idempotent: a running app stays running.
        let _ = crate::services::rabbitmqctl()
            .arg("start_app")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

async fn rabbitmqctl(command: &str) {
    let out = tokio::process::Command::from(crate::services::rabbitmqctl())
        .arg(command)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running `rabbitmqctl {command}`: {e}"));
    assert!(
        out.status.success(),
        "`rabbitmqctl {command}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Write a config file for a child `relay` process into `dir` (its queue file lives there
/// too): `settings` TOML first, then the test routes pointing at the fake at `centercode`.
pub fn write_relay_config(dir: &std::path::Path, settings: &str, centercode: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    let queue = format!("[queue]\npath = \"{}\"\n", dir.join("relay.db").display());
    // A `[queue]` table in `settings` takes the path line instead of a second table.
    let settings = if settings.contains("[queue]\n") {
        settings.replacen("[queue]\n", &queue, 1)
    } else {
        format!("{settings}\n{queue}")
    };
    std::fs::write(&path, format!("{settings}\n{}", routes_toml(centercode))).unwrap();
    path
}

/// Start `relay --config CONFIG <args>` with `env`, and wait for its first stdout line
/// (`relay listening on URL`). The config's directory doubles as `RELAY_CONFIG_DIR`, so the
/// repository's `config/local.toml` does not interfere.
pub fn spawn_relay(
    config: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    stderr: std::process::Stdio,
) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RELAY_CONFIG_DIR", config.parent().unwrap())
        .env_remove("RELAY_ENV")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start relay");
    let address = listening_address(&mut child)
        .unwrap_or_else(|line| panic!("unexpected first line from relay: {line}"));
    (child, address)
}

/// The base URL from a started relay's first stdout line (`relay listening on URL`), or the
/// line it printed instead.
pub fn listening_address(child: &mut std::process::Child) -> Result<String, String> {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    line.trim()
        .strip_prefix("relay listening on ")
        .map(str::to_owned)
        .ok_or(line)
}

/// Every `find=` e-mail the fake Centercode received, in arrival order.
pub fn finds(centercode: &FakeCentercode) -> Vec<String> {
    centercode
        .requests()
        .iter()
        .filter_map(|r| {
            r.query
                .get("find")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect()
}

/// Poll (with a deadline) until the fake has received every e-mail in `expected`; returns
/// how many never arrived.
pub async fn missing_finds(
    centercode: &FakeCentercode,
    expected: &std::collections::HashSet<String>,
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let seen: std::collections::HashSet<String> = finds(centercode).into_iter().collect();
        let missing = expected.difference(&seen).count();
        if missing == 0 || Instant::now() > deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate, all from that CA.
pub fn make_certificates(dir: &std::path::Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=relay-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    );
    for (name, usage, san) in [
        (
            "server",
            "serverAuth",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        ),
        ("client", "clientAuth", ""),
    ] {
        openssl(
            dir,
            &[
                &["req"],
                &ec[..],
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ]
            .concat(),
        );
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("{san}basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

/// The reasons of the parked outcomes among `outcomes`, in order.
pub fn parked_reasons(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Parked { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}
