//! Centercode macro webhooks (`POST /centercode/webhook/{route}`): token, content type, limits,
//! dedupe, IP allowlist, the stored job, `relay preview`, and the settings refusals.

use crate::helpers::{spawn_app_on, Backend, TestApp};
use serde_json::{json, Value};
use sf_centercode_relay::queue::{Job, Leased};
use sf_centercode_relay::settings::Settings;
use std::time::{Duration, Instant};

pub const TOKEN: &str = "webhook-token-for-tests-0123456789";
const ADMIN: &str = "admin-token-for-webhook-tests-0123456789";
const JSON: &str = "application/json";

/// `[salesforce]` (nothing is reached: ingest only) and two webhook routes: `cc-feedback`
/// keyed on the feedback id and modified time, `cc-body` keyed on the whole body.
pub fn webhook_toml() -> String {
    format!(
        r#"
[salesforce]
login_url = "http://127.0.0.1:9"
client_id = "3MVG9-relay-test"
client_secret = "test-secret-0123456789"
timeout_ms = 2000

[[routes]]
name = "cc-feedback"
kind = "centercode_webhook"
action = "salesforce_upsert"
sobject = "Centercode_Feedback__c"
external_id_field = "Centercode_Id__c"
external_id = "/feedback/id"
dedupe = ["/feedback/id", "/feedback/modified"]
version_field = "/feedback/modified"
auth = {{ header = "X-Relay-Token", token = "{TOKEN}" }}
[routes.fields]
Title__c = {{ from = "/feedback/title", required = true, max_len = 80 }}
Status__c = {{ from = "/feedback/status", map = {{ New = "Open", Fixed = "Closed" }}, default = "Open" }}
Tester_Email__c = "/tester/email"
Source__c = {{ value = "Centercode" }}

[[routes]]
name = "cc-body"
kind = "centercode_webhook"
action = "salesforce_upsert"
sobject = "Centercode_Feedback__c"
external_id_field = "Centercode_Id__c"
external_id = "/feedback/id"
auth = {{ token = "{TOKEN}" }}
[routes.fields]
Title__c = "/feedback/title"
"#
    )
}

/// Add [`webhook_toml`]'s `[salesforce]` and routes to the test settings.
pub fn add_webhook_routes(settings: &mut Settings) {
    let extra = Settings::from_toml(&webhook_toml()).expect("webhook settings");
    settings.salesforce = extra.salesforce;
    settings.routes.extend(extra.routes);
}

/// A gateway (no workers) with the webhook routes and an admin token, changed by `adjust`.
pub async fn spawn_webhook_app(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on(backend, |s| {
        add_webhook_routes(s);
        s.admin.token = Some(ADMIN.to_owned().into());
        adjust(s);
    })
    .await
}

/// A feedback body as a macro composes it from variable tags.
pub fn feedback(id: &str, modified: &str, title: &str) -> Vec<u8> {
    json!({
        "feedback": {"id": id, "modified": modified, "title": title, "status": "New"},
        "tester": {"email": "marta.kowalska@example.org"}
    })
    .to_string()
    .into_bytes()
}

/// POST `body` to the route's webhook path; `content_type` "" sends no Content-Type.
async fn post(
    app: &TestApp,
    route: &str,
    content_type: &str,
    body: Vec<u8>,
    token: Option<&str>,
) -> reqwest::Response {
    let mut req = app
        .client
        .post(format!("{}/centercode/webhook/{route}", app.address))
        .body(body);
    if !content_type.is_empty() {
        req = req.header("Content-Type", content_type);
    }
    if let Some(t) = token {
        req = req.header("X-Relay-Token", t);
    }
    req.send().await.expect("request sent")
}

async fn send(app: &TestApp, body: Vec<u8>) -> reqwest::Response {
    post(app, "cc-feedback", JSON, body, Some(TOKEN)).await
}

/// The `error.code` of a refusal.
async fn refusal(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let err: Value = r.json().await.unwrap();
    let code = err["error"]["code"].as_str().unwrap_or_default().to_owned();
    let message = err["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code, message)
}

/// Lease exactly `n` stored jobs (RabbitMQ hands them over asynchronously).
async fn take(app: &TestApp, n: usize) -> Vec<Leased> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(app.queue.lease(n - got.len(), Vec::new()).await.unwrap());
        assert!(Instant::now() < deadline, "only {} of {n} jobs", got.len());
        tokio::time::sleep(Duration::from_millis(20)).await; // poll with deadline
    }
    assert!(app.queue.lease(8, Vec::new()).await.unwrap().is_empty());
    got
}

async fn a_webhook_is_stored_with_its_record_id(backend: Backend) {
    // Arrange
    let app = spawn_webhook_app(backend, |_| {}).await;
    let body = feedback("4711", "2026-03-01T10:00:00Z", "Crash on login");
    // Act
    let r = send(&app, body.clone()).await;
    // Assert
    assert_eq!(r.status(), 202);
    let reply: Value = r.json().await.unwrap();
    assert_eq!(reply["status"], "queued");
    let job_id = reply["job_id"].as_str().unwrap().to_owned();
    let jobs = take(&app, 1).await;
    let job = &jobs[0];
    assert_eq!(
        (job.id.as_str(), job.route.as_str(), job.action.as_str()),
        (job_id.as_str(), "cc-feedback", "salesforce_upsert")
    );
    assert_eq!(job.record_id.as_deref(), Some("4711"));
    assert_eq!((&job.org_id, &job.notification_id), (&None, &None));
    let sent: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(job.job, Job::CentercodeWebhookV1 { body: sent });
    if app.queue.ledger_sees_stored_jobs() {
        // What `relay trace --record-id 4711` asks.
        let found: Value = app
            .client
            .get(format!("{}/admin/jobs?record_id=4711", app.address))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(found["jobs"][0]["id"], job_id.as_str(), "{found}");
    }
}

async fn redelivery_is_a_duplicate_and_a_new_modified_time_a_new_job(backend: Backend) {
    // Arrange
    let app = spawn_webhook_app(backend, |_| {}).await;
    let first = feedback("4711", "2026-03-01T10:00:00Z", "Crash on login");
    let first: Value = send(&app, first.clone()).await.json().await.unwrap();
    // Act: the same body, the same id and time with other fields, then a newer version.
    let again = send(
        &app,
        feedback("4711", "2026-03-01T10:00:00Z", "Crash on login"),
    )
    .await;
    let edited = send(
        &app,
        feedback("4711", "2026-03-01T10:00:00Z", "Other title"),
    )
    .await;
    let newer = send(
        &app,
        feedback("4711", "2026-03-01T11:30:00Z", "Crash on login"),
    )
    .await;
    // Assert
    for r in [again, edited] {
        assert_eq!(r.status(), 202);
        let reply: Value = r.json().await.unwrap();
        assert_eq!(
            (&reply["status"], &reply["job_id"]),
            (&json!("duplicate"), &first["job_id"])
        );
    }
    assert_eq!(newer.status(), 202);
    let newer: Value = newer.json().await.unwrap();
    assert_eq!(newer["status"], "queued");
    assert_ne!(newer["job_id"], first["job_id"]);
    let jobs = take(&app, 2).await;
    assert!(jobs.iter().all(|j| j.record_id.as_deref() == Some("4711")));
}

crate::both_backends::on_both_backends!(
    a_webhook_is_stored_with_its_record_id,
    redelivery_is_a_duplicate_and_a_new_modified_time_a_new_job
);

#[tokio::test]
async fn a_wrong_or_missing_token_is_401_with_one_answer_and_stores_nothing() {
    // Arrange
    let app = spawn_webhook_app(Backend::Embedded, |_| {}).await;
    let body = || feedback("4711", "2026-03-01T10:00:00Z", "Crash on login");
    // Act
    let wrong = post(&app, "cc-feedback", JSON, body(), Some("not-the-token")).await;
    let missing = post(&app, "cc-feedback", JSON, body(), None).await;
    let prefix = &TOKEN[..TOKEN.len() - 1];
    let truncated = post(&app, "cc-feedback", JSON, body(), Some(prefix)).await;
    let as_bearer = app
        .client
        .post(format!("{}/centercode/webhook/cc-feedback", app.address))
        .header("Content-Type", JSON)
        .bearer_auth(TOKEN)
        .body(body())
        .send()
        .await
        .unwrap();
    // Assert
    let wrong = refusal(wrong).await;
    assert_eq!((wrong.0, wrong.1.as_str()), (401, "unauthorized"));
    assert!(!wrong.2.contains(TOKEN));
    for other in [missing, truncated, as_bearer] {
        assert_eq!(
            refusal(other).await,
            wrong,
            "the same answer for every refusal"
        );
    }
    assert_eq!(app.stats().await.ready, 0);
}

#[tokio::test]
async fn a_form_encoded_body_is_415_saying_json_is_expected() {
    let app = spawn_webhook_app(Backend::Embedded, |_| {}).await;
    let form = b"feedback_id=4711&title=Crash".to_vec();
    let r = post(
        &app,
        "cc-feedback",
        "application/x-www-form-urlencoded",
        form,
        Some(TOKEN),
    )
    .await;
    let (status, code, message) = refusal(r).await;
    assert_eq!((status, code.as_str()), (415, "unsupported_media_type"));
    assert!(
        message.contains("application/json") && message.contains("form-encoded"),
        "{message}"
    );
    let body = feedback("4711", "2026-03-01T10:00:00Z", "Crash on login");
    let r = post(&app, "cc-feedback", "text/plain", body, Some(TOKEN)).await;
    assert_eq!(r.status(), 415);
    assert_eq!(app.stats().await.ready, 0);
}

/// A macro whose headers forgot Content-Type, or name a JSON subtype, still sends JSON: the
/// body decides (and must still be a JSON object).
#[tokio::test]
async fn a_json_body_without_content_type_or_with_a_json_suffix_is_stored() {
    let app = spawn_webhook_app(Backend::Embedded, |_| {}).await;
    for (i, content_type) in [
        "",
        "application/vnd.centercode+json",
        "Application/JSON; charset=utf-8",
    ]
    .iter()
    .enumerate()
    {
        let body = feedback(&format!("48{i}"), "2026-03-01T10:00:00Z", "Crash on login");
        let r = post(&app, "cc-feedback", content_type, body, Some(TOKEN)).await;
        assert_eq!(r.status(), 202, "Content-Type {content_type:?}");
    }
    assert_eq!(app.stats().await.ready, 3);
    let r = post(
        &app,
        "cc-feedback",
        "",
        b"title=Crash".to_vec(),
        Some(TOKEN),
    )
    .await;
    assert_eq!(r.status(), 400, "no Content-Type, and not JSON");
    assert_eq!(app.stats().await.ready, 3);
}

#[tokio::test]
async fn a_body_that_is_not_a_json_object_or_too_deep_is_400() {
    let app = spawn_webhook_app(Backend::Embedded, |_| {}).await;
    let deep = format!(r#"{{"feedback": {}1{}}}"#, "[".repeat(200), "]".repeat(200));
    for body in [
        "[1, 2]".to_owned(),
        "\"text\"".to_owned(),
        "{\"feedback\": ".to_owned(),
        deep,
    ] {
        let r = send(&app, body.into_bytes()).await;
        let (status, code, _) = refusal(r).await;
        assert_eq!((status, code.as_str()), (400, "invalid_json"));
    }
    assert_eq!(app.stats().await.ready, 0);
}

#[tokio::test]
async fn an_oversize_body_is_413() {
    let app = spawn_webhook_app(Backend::Embedded, |s| s.server.max_body_bytes = 1024).await;
    let body = feedback("4711", "2026-03-01T10:00:00Z", &"x".repeat(2048));
    let (status, code, _) = refusal(send(&app, body).await).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
    assert_eq!(app.stats().await.ready, 0);
}

#[tokio::test]
async fn a_missing_dedupe_value_is_400_naming_the_pointer() {
    let app = spawn_webhook_app(Backend::Embedded, |_| {}).await;
    let body = json!({"feedback": {"id": "4711", "title": "Crash on login"}});
    let (status, code, message) = refusal(send(&app, body.to_string().into_bytes()).await).await;
    assert_eq!((status, code.as_str()), (400, "dedupe_value_missing"));
    assert!(message.contains("/feedback/modified"), "{message}");
    assert_eq!(app.stats().await.ready, 0);
}

#[tokio::test]
async fn without_dedupe_pointers_the_whole_body_is_the_key() {
    let app = spawn_webhook_app(Backend::Embedded, |_| {}).await;
    let post_body = |body: &str| post(&app, "cc-body", JSON, body.as_bytes().to_vec(), Some(TOKEN));
    let first: Value = post_body(r#"{"feedback": {"id": "9", "title": "A"}}"#)
        .await
        .json()
        .await
        .unwrap();
    // The same JSON with other spacing and key order is the same body.
    let again: Value = post_body(r#"{"feedback":{"title":"A","id":"9"}}"#)
        .await
        .json()
        .await
        .unwrap();
    let other: Value = post_body(r#"{"feedback": {"id": "9", "title": "B"}}"#)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&first["status"], &again["status"], &other["status"]),
        (&json!("queued"), &json!("duplicate"), &json!("queued"))
    );
    assert_eq!(again["job_id"], first["job_id"]);
    assert_eq!(take(&app, 2).await.len(), 2);
}

#[tokio::test]
async fn an_address_outside_allowed_ips_is_403() {
    let app = spawn_webhook_app(Backend::Embedded, |s| {
        let route = s.routes.iter_mut().find(|r| r.name == "cc-feedback");
        route.unwrap().allowed_ips = vec!["10.20.0.0/16".into()];
    })
    .await;
    let body = feedback("4711", "2026-03-01T10:00:00Z", "Crash on login");
    let (status, code, _) = refusal(send(&app, body.clone()).await).await;
    assert_eq!((status, code.as_str()), (403, "ip_not_allowed"));
    // The other route has no allowlist.
    let r = post(&app, "cc-body", JSON, body, Some(TOKEN)).await;
    assert_eq!(r.status(), 202);
    assert_eq!(app.stats().await.ready, 1);
}

#[tokio::test]
async fn only_webhook_routes_answer_on_the_webhook_path() {
    let app = spawn_webhook_app(Backend::Embedded, |_| {}).await;
    let body = || feedback("4711", "2026-03-01T10:00:00Z", "Crash on login");
    for route in ["no-such-route", "apex-removal", "gdpr"] {
        let (status, code, _) = refusal(post(&app, route, JSON, body(), Some(TOKEN)).await).await;
        assert_eq!((status, code.as_str()), (404, "unknown_route"), "{route}");
    }
    // A webhook route is no callout route.
    let r = app
        .post_callout("cc-feedback", &body(), &[("X-Relay-Token", TOKEN.into())])
        .await;
    assert_eq!(r.status(), 404);
    // Other methods: answered as on the callout path.
    for path in [
        "/centercode/webhook/cc-feedback",
        "/salesforce/callout/apex-removal",
    ] {
        let r = app
            .client
            .get(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{path}");
        assert_eq!(r.headers()["allow"], "POST");
    }
    assert_eq!(app.stats().await.ready, 0);
}

// ---------------------------------------------------------------------------------------
// relay preview, and the settings refusals.

#[test]
fn relay_preview_prints_the_salesforce_upsert_of_a_webhook_body() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, webhook_toml()).unwrap();
    let preview = |body: Vec<u8>| {
        let file = dir.path().join("body.json");
        std::fs::write(&file, body).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(["--config", config.to_str().unwrap(), "preview", "--route"])
            .args(["cc-feedback", file.to_str().unwrap()])
            // An empty config dir, so the repository's config/local.toml does not interfere.
            .env("RELAY_CONFIG_DIR", dir.path())
            .env_remove("RELAY_ENV")
            .output()
            .expect("run relay");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };

    let (ok, stdout, stderr) = preview(feedback("FB 4711", "2026-03-01T10:00:00Z", "Crash"));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(
            "PATCH /services/data/v61.0/sobjects/Centercode_Feedback__c/Centercode_Id__c/FB%204711"
        ),
        "{stdout}"
    );
    let json_start = stdout.find("\n{").expect("a JSON body") + 1;
    let json_end = stdout.rfind('}').unwrap() + 1;
    let fields: Value = serde_json::from_str(&stdout[json_start..json_end]).unwrap();
    assert_eq!(
        fields,
        json!({"Title__c": "Crash", "Status__c": "Open", "Source__c": "Centercode",
               "Tester_Email__c": "marta.kowalska@example.org"})
    );

    let untitled = json!({"feedback": {"id": "4711", "modified": "2026-03-01T10:00:00Z"}});
    let (ok, stdout, _) = preview(untitled.to_string().into_bytes());
    assert!(ok);
    assert!(stdout.contains("would be parked:"), "{stdout}");

    let unkeyed = json!({"feedback": {"id": "4711", "title": "Crash"}});
    let (ok, _, stderr) = preview(unkeyed.to_string().into_bytes());
    assert!(!ok);
    assert!(
        stderr.contains("would answer 400") && stderr.contains("/feedback/modified"),
        "{stderr}"
    );
}

/// The key a refused configuration names.
fn refused_key(toml: &str) -> String {
    match Settings::from_toml(toml) {
        Ok(_) => panic!("accepted:\n{toml}"),
        Err(e) => e.key,
    }
}

#[test]
fn settings_refusals_name_the_key() {
    let good = webhook_toml();
    assert!(Settings::from_toml(&good).is_ok());
    let token_line = format!("auth = {{ header = \"X-Relay-Token\", token = \"{TOKEN}\" }}\n");
    assert!(good.contains(&token_line));

    let no_token = good.replacen(&token_line, "", 1);
    assert_eq!(refused_key(&no_token), "routes[0].auth");
    let short = good.replacen(TOKEN, "short-token", 1);
    assert_eq!(refused_key(&short), "routes[0].auth.token");
    let bad_header = good.replacen("header = \"X-Relay-Token\"", "header = \"X Relay\"", 1);
    assert_eq!(refused_key(&bad_header), "routes[0].auth.header");
    let no_salesforce = good
        .split("[[routes]]")
        .skip(1)
        .map(|r| format!("[[routes]]{r}"))
        .collect::<String>();
    assert_eq!(refused_key(&no_salesforce), "salesforce");
    let not_a_pointer = good.replacen(
        "external_id = \"/feedback/id\"",
        "external_id = \"feedback.id\"",
        1,
    );
    assert_eq!(refused_key(&not_a_pointer), "routes[0].external_id");
    let bad_dedupe = good.replacen("\"/feedback/modified\"]", "\"modified\"]", 1);
    assert_eq!(refused_key(&bad_dedupe), "routes[0].dedupe[1]");
    let upsert_on_callout = format!(
        "{good}\n[[routes]]\nname = \"apex-upsert\"\nkind = \"callout\"\naction = \"salesforce_upsert\"\n\
         sobject = \"Contact\"\nexternal_id_field = \"Ext__c\"\nexternal_id = \"/id\"\n\
         auth = {{ bearer = \"{TOKEN}\" }}\n[routes.fields]\nName__c = \"/name\"\n"
    );
    assert_eq!(refused_key(&upsert_on_callout), "routes[2].action");
    let dedupe_on_callout = format!(
        "{good}\n[[routes]]\nname = \"apex\"\nkind = \"callout\"\naction = \"remove_user\"\n\
         url = \"https://acme.centercode.com/api/v1/userMacroListeners/gdpr\"\nemail_field = \"/email\"\n\
         dedupe = [\"/id\"]\nauth = {{ bearer = \"{TOKEN}\" }}\n"
    );
    assert_eq!(
        refused_key(&dedupe_on_callout),
        "routes[2].external_id_field"
    );
}
