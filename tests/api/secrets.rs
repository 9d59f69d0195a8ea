//! Every flow run against a real `relay serve` with TRACE logging: no secret, session id or
//! e-mail address may appear anywhere in what it printed.

use crate::helpers::{fixture, sign_v2, spawn_relay, write_relay_config, RabbitEnv};
use fake_centercode::{ApiKeyConfig, FakeCentercode, FakeConfig, Fault};
use fake_salesforce::{test_keys, FakeSalesforce, FakeSalesforceConfig};
use serde_json::json;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const API_KEY: &str = "cc-api-key-Zq81ThisMustNeverBeLogged";
const ADMIN: &str = "admin-token-Zq82ThisMustNeverBeLogged-000";
const BEARER: &str = "bearer-Zq83ThisMustNeverBeLogged";
const HMAC: &str = "hmac-secret-Zq84ThisMustNeverBeLogged";
const SESSION: &str = "AQ8AQFakeSessionTokenForFixturesOnly";
const PATH_TOKEN: &str = "path-token-Zq85ThisMustNeverBeLogged";
const AMQP_PASSWORD: &str = "amqp-pass-Zq86ThisMustNeverBeLogged";
const REDIS_PASSWORD: &str = "redis-pass-Zq87ThisMustNeverBeLogged";
const WEBHOOK_TOKEN: &str = "webhook-token-Zq88ThisMustNeverBeLogged";
const TESTER_EMAIL: &str = "webhook.tester@example.com";

#[tokio::test]
async fn no_secret_or_email_reaches_the_logs_even_at_trace_level() {
    secrets_stay_out_of_the_logs(None).await;
}

#[tokio::test]
async fn no_secret_or_email_reaches_the_logs_on_rabbitmq_even_at_trace_level() {
    let env = RabbitEnv::new().await;
    // A broker user and a Redis user with passwords, so the URLs carry secrets to leak.
    for args in [
        vec!["add_user", "relay-secrets", AMQP_PASSWORD],
        vec!["change_password", "relay-secrets", AMQP_PASSWORD],
        vec![
            "set_permissions",
            "-p",
            "/",
            "relay-secrets",
            ".*",
            ".*",
            ".*",
        ],
    ] {
        let _ = tokio::process::Command::from(crate::services::rabbitmqctl())
            .args(&args)
            .output()
            .await
            .expect("rabbitmqctl (Debian package rabbitmq-server) must be installed");
    }
    let redis = redis::Client::open(env.redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "relay-secrets", "reset", "on"][..])
        .arg(format!(">{REDIS_PASSWORD}"))
        .arg(&["~*", "+@all"][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let host = |url: &str| url.rsplit_once('@').map_or(url, |(_, h)| h).to_owned();
    let amqp = format!("amqp://relay-secrets:{AMQP_PASSWORD}@{}", host(&env.url));
    let redis_url = format!(
        "redis://relay-secrets:{REDIS_PASSWORD}@{}",
        host(env.redis_url.trim_start_matches("redis://"))
    );
    let queue = format!(
        "backend = \"rabbitmq\"\nurl = \"{amqp}\"\nprefix = \"{}\"\nredis_url = \"{redis_url}\"\n",
        env.prefix
    );
    secrets_stay_out_of_the_logs(Some(&queue)).await;
}

/// Every way a secret could be printed: as text, in hex, and as a Rust byte array (what a
/// `{:?}` of a `&[u8]` or `Vec<u8>` gives).
fn encodings(secret: &str) -> Vec<String> {
    let bytes = secret.as_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        secret.to_owned(),
        hex.clone(),
        hex.to_uppercase(),
        format!("{bytes:?}"),
        bytes
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(","),
    ]
}

/// `queue`: extra `[queue]` TOML (RabbitMQ), or the embedded queue.
async fn secrets_stay_out_of_the_logs(queue: Option<&str>) {
    // Arrange: a fake Centercode that knows our key, and a relay child logging everything.
    let centercode = FakeCentercode::start(FakeConfig {
        api_keys: vec![ApiKeyConfig {
            key: API_KEY.into(),
            ..ApiKeyConfig::default()
        }],
        ..FakeConfig::demo()
    })
    .await
    .unwrap();
    // And a fake Salesforce the relay signs in to with a key it gets from the environment.
    let salesforce = FakeSalesforce::start(FakeSalesforceConfig::demo())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_relay_config(
        dir.path(),
        &format!(
            "[server]\nbind = \"127.0.0.1:0\"\nworkers = 1\n[queue]\n{}[worker]\nretry_schedule_secs = [0.05]\npoll_interval_ms = 50\n[telemetry]\nformat = \"json\"\n[salesforce]\nlogin_url = \"{}\"\nclient_id = \"{}\"\nusername = \"{}\"\n",
            queue.unwrap_or_default(),
            salesforce.base_url(),
            test_keys::CLIENT_ID,
            test_keys::USERNAME,
        ),
        &centercode.base_url(),
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        r#"
[[routes]]
name = "cc-feedback"
kind = "centercode_webhook"
action = "salesforce_upsert"
sobject = "Centercode_Feedback__c"
external_id_field = "Centercode_Id__c"
external_id = "/feedback/id"
auth = { header = "X-Relay-Token" }
[routes.fields]
Title__c = "/feedback/title"
Tester_Email__c = "/tester/email"
"#,
    );
    std::fs::write(&config, text).unwrap();
    let (mut child, base) = spawn_relay(
        &config,
        &["serve"],
        &[
            ("RUST_LOG", "trace"),
            ("RELAY__CENTERCODE__API_KEY", API_KEY),
            ("RELAY__ADMIN__TOKEN", ADMIN),
            ("RELAY_ROUTE__APEX_REMOVAL__BEARER", BEARER),
            ("RELAY_ROUTE__FLOW_FEEDBACK__BEARER", BEARER),
            ("RELAY_ROUTE__APEX_FEEDBACK__HMAC_SECRET", HMAC),
            ("RELAY_ROUTE__CASE_FEEDBACK__PATH_TOKEN", PATH_TOKEN),
            ("RELAY_ROUTE__CC_FEEDBACK__TOKEN", WEBHOOK_TOKEN),
            ("RELAY__SALESFORCE__PRIVATE_KEY", test_keys::PRIVATE_KEY_PEM),
        ],
        Stdio::piped(),
    );
    let mut stderr = child.stderr.take().unwrap();
    let log_reader = std::thread::spawn(move || {
        let mut logs = String::new();
        stderr.read_to_string(&mut logs).unwrap();
        logs
    });
    let client = reqwest::Client::new();

    // Act: every kind of flow, good and bad.
    let om = |route: &'static str, file: &'static str| {
        client
            .post(format!("{base}/salesforce/outbound/{route}"))
            .header("Content-Type", "text/xml; charset=utf-8")
            .body(fixture(file))
            .send()
    };
    for (route, file) in [
        ("gdpr", "om_contact_gdpr_removal_single.xml"),
        ("gdpr", "om_contact_batch_4.xml"),
        // PATH_TOKEN, spelled out because the closure takes static paths.
        (
            "case-feedback/path-token-Zq85ThisMustNeverBeLogged",
            "om_case_feedback.xml",
        ),
        (
            "case-feedback/wrong-token-0123456789abcdef",
            "om_case_feedback.xml",
        ),
        ("feedback", "om_feedback_custom_object.xml"),
        ("feedback", "om_feedback_nil_fields.xml"),
        ("gdpr", "hostile_xxe_external_entity.xml"),
        ("gdpr", "hostile_wrong_org_id.xml"),
    ] {
        om(route, file).await.unwrap();
    }
    let removal = fixture("apex_removal_request.json");
    let callout = |route: &str, body: Vec<u8>, headers: Vec<(&'static str, String)>| {
        let mut req = client
            .post(format!("{base}/salesforce/callout/{route}"))
            .header("Content-Type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send()
    };
    callout(
        "apex-removal",
        removal.clone(),
        vec![
            ("Authorization", format!("Bearer {BEARER}")),
            ("Idempotency-Key", "k1".into()),
        ],
    )
    .await
    .unwrap();
    callout(
        "apex-removal",
        removal,
        vec![("Authorization", "Bearer wrong-but-long-token".into())],
    )
    .await
    .unwrap();
    let feedback = fixture("apex_feedback_submission.json");
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    callout(
        "apex-feedback",
        feedback.clone(),
        vec![
            ("X-Relay-Timestamp", ts.clone()),
            ("X-Relay-Signature", sign_v2(HMAC, &ts, "k2", &feedback)),
            ("Idempotency-Key", "k2".into()),
        ],
    )
    .await
    .unwrap();
    callout(
        "flow-feedback",
        fixture("flow_http_callout_feedback.json"),
        vec![("Authorization", format!("Bearer {BEARER}"))],
    )
    .await
    .unwrap();
    // Centercode → Salesforce: a webhook (and one with a wrong token), written with a token
    // minted from the key.
    for token in [WEBHOOK_TOKEN, "wrong-webhook-token-0123456789"] {
        client
            .post(format!("{base}/centercode/webhook/cc-feedback"))
            .header("Content-Type", "application/json")
            .header("X-Relay-Token", token)
            .body(json!({"feedback": {"id": "FB-1", "title": "t"}, "tester": {"email": TESTER_EMAIL}}).to_string())
            .send()
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while salesforce.records("Centercode_Feedback__c").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the webhook was not written into Salesforce"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
    let sf_tokens = salesforce.live_tokens();
    assert!(!sf_tokens.is_empty());
    // A parked job (Centercode 400) and the admin API around it.
    centercode.push_fault(Fault {
        status: 400,
        ..Fault::default()
    });
    om("gdpr", "om_contact_gdpr_removal_redelivery.xml")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while centercode.requests().len() < 10 {
        assert!(
            Instant::now() < deadline,
            "only {} deliveries",
            centercode.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
    let admin = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .send()
    };
    let parked: serde_json::Value = admin(reqwest::Method::GET, "/admin/parked")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for job in parked["jobs"].as_array().unwrap() {
        admin(
            reqwest::Method::GET,
            &format!("/admin/parked/{}", job["id"].as_str().unwrap()),
        )
        .await
        .unwrap();
    }
    client
        .post(format!("{base}/admin/parked/replay"))
        .bearer_auth(ADMIN)
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    client
        .get(format!("{base}/admin/parked"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // Stop the relay and collect everything it logged.
    unsafe_sigterm(child.id());
    let status = child.wait().unwrap();
    let logs = log_reader.join().unwrap();

    // Assert
    assert!(status.success(), "SIGTERM ends the relay cleanly");
    assert!(
        logs.lines().count() > 100,
        "TRACE logging was on: {} lines",
        logs.lines().count()
    );
    let emails = [
        TESTER_EMAIL,
        "marta.kowalska@example.org",
        "aisha.okafor@example.net",
        "jonas.berg@example.com",
        "li.wei@example.cn",
        "sofia.hernandez@example.es",
    ];
    let secrets = [
        API_KEY,
        ADMIN,
        BEARER,
        HMAC,
        SESSION,
        PATH_TOKEN,
        AMQP_PASSWORD,
        REDIS_PASSWORD,
    ];
    // The private key's lines, and every access token the fake minted.
    let key_lines = test_keys::PRIVATE_KEY_PEM
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16);
    for needle in secrets
        .iter()
        .copied()
        .chain([WEBHOOK_TOKEN])
        .chain(emails.iter().copied())
        .chain(key_lines)
        .chain(sf_tokens.iter().map(String::as_str))
        .flat_map(encodings)
    {
        let hit = logs.lines().find(|l| l.contains(&needle));
        assert!(
            hit.is_none(),
            "`{needle}` appears in the logs: {}",
            hit.unwrap()
        );
    }
    assert!(!logs.contains("apiKey="), "a URL with apiKey was logged");
    // One JSON object per line, and a notification id follows the message to Centercode.
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        lines.len() * 10 >= logs.lines().count() * 9,
        "log lines are JSON"
    );
    let mentions: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.to_string().contains("04l8d0000100001AAA"))
        .collect();
    let stored = mentions
        .iter()
        .find(|l| l["message"] == "notification stored")
        .expect("ingest log line");
    assert!(
        stored["job_id"].is_string() && stored["span"]["request_id"].is_string(),
        "{stored}"
    );
    let delivered = mentions
        .iter()
        .find(|l| l["message"] == "delivery finished")
        .expect("delivery log line");
    for field in [
        "job_id",
        "route",
        "notification_id",
        "record_id",
        "attempt",
        "centercode.status",
    ] {
        assert!(
            !delivered["span"][field].is_null(),
            "`{field}` missing from {delivered}"
        );
    }
    assert!(delivered["timestamp"].is_string() && delivered["level"].is_string());
    // The token route: its access line names the pattern, and its lines keep their fields.
    let token_access = lines
        .iter()
        .find(|l| {
            l["message"] == "request handled"
                && l["path"] == "/salesforce/outbound/case-feedback/{token}"
        })
        .expect("an access line for the token route, with the token replaced");
    assert!(token_access["request_id"].is_string(), "{token_access}");
    let stored_via_token = lines
        .iter()
        .find(|l| l["message"] == "notification stored" && l["span"]["route"] == "case-feedback")
        .expect("a stored line from the token route");
    for field in ["request_id", "sf_org_id", "notifications"] {
        assert!(
            !stored_via_token["span"][field].is_null(),
            "`{field}` missing from {stored_via_token}"
        );
    }
}

fn unsafe_sigterm(pid: u32) {
    // `kill -TERM`: std has no portable signal API and the crate avoids a libc dependency.
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}
