//! `spawn_app()` and friends: one relay and one fake Centercode per test.

use base64::Engine;
use hmac::{Hmac, Mac};
use sf_centercode_relay::fake_centercode::{FakeCentercode, FakeConfig};
use sf_centercode_relay::queue::{Queue, QueueStats};
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

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/salesforce")
        .join(name)
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
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
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
    let centercode = FakeCentercode::start(FakeConfig::demo())
        .await
        .expect("fake centercode");
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir.path().join("relay.db"), &centercode.base_url());
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

    pub async fn stats(&self) -> QueueStats {
        self.queue.stats().await.unwrap()
    }

    /// Deliver until nothing is ready or waiting for a retry, polling with a deadline.
    pub async fn deliver_until_settled(&self) -> Vec<Outcome> {
        let deadline = Instant::now() + Duration::from_secs(20);
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
        ("X-Relay-Signature", sign(HMAC_SECRET, &ts, body)),
        ("Idempotency-Key", key.to_owned()),
    ]
}

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

pub fn bearer(key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Authorization", format!("Bearer {BEARER}")),
        ("Idempotency-Key", key.to_owned()),
    ]
}
