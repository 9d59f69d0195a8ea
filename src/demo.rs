//! `relay demo`: the whole relay on a fresh machine, both directions. Starts a fake Centercode
//! and a fake Salesforce in-process and the relay on a temporary embedded queue; sends sample
//! Salesforce messages and a Centercode webhook over HTTP; prints what Centercode received,
//! what was written into Salesforce, and the status written back on the Contact.

use crate::settings::Settings;
use crate::startup::Application;
use fake_centercode::{FakeCentercode, FakeConfig, Fault, FaultRoute};
use fake_salesforce::{test_keys, FakeSalesforce, FakeSalesforceConfig};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const REMOVAL: &str = include_str!("../examples/salesforce/om_contact_gdpr_removal_single.xml");
const BATCH: &str = include_str!("../examples/salesforce/om_contact_batch_4.xml");
const FEEDBACK: &str = include_str!("../examples/salesforce/om_feedback_custom_object.xml");
const FEEDBACK_NIL: &str = include_str!("../examples/salesforce/om_feedback_nil_fields.xml");
/// The demo's webhook token (a real one comes from `RELAY_ROUTE__CC_FEEDBACK__TOKEN`).
const WEBHOOK_TOKEN: &str = "demo-webhook-token-0123456789";
/// A feedback update as a Centercode macro's Trigger Webhook would send it.
const CC_FEEDBACK: &str = r#"{"feedback": {"id": "FB-1042", "title": "App crashes when uploading a photo", "status": "In Progress", "modified": "2026-12-07T09:30:00Z"}}"#;

/// The Salesforce record ids (`<sf:Id>`) an Outbound Message names.
fn record_ids(message: &str) -> Vec<&str> {
    message
        .split("<sf:Id>")
        .skip(1)
        .filter_map(|rest| rest.split('<').next())
        .collect()
}

fn demo_settings(
    dir: &std::path::Path,
    centercode: &str,
    salesforce: &str,
    bind: &str,
) -> Settings {
    let toml = format!(
        r#"
[server]
bind = "{bind}"
[queue]
path = "{db}"
[worker]
concurrency = 4
retry_schedule_secs = [1, 2, 5]
poll_interval_ms = 100
[centercode]
api_key = "test-key"
timeout_ms = 5000
[telemetry]
level = "warn"
# The fake Salesforce trusts the checked-in test key: never use it for a real org.
[salesforce]
login_url = "{salesforce}"
client_id = "{client_id}"
username = "{username}"
private_key = '''{private_key}'''

[[routes]]
name = "gdpr-removal"
kind = "outbound_message"
org_ids = ["00D8d000001AbCdEAK"]
sobject = "Contact"
action = "remove_user"
url = "{centercode}/api/v1/userMacroListeners/gdpr"
email_field = "Email"
[routes.status_writeback]
status_field = "Centercode_Status__c"
detail_field = "Centercode_Detail__c"
time_field = "Centercode_Synced_At__c"

[[routes]]
name = "cc-feedback"
kind = "centercode_webhook"
action = "salesforce_upsert"
sobject = "Centercode_Feedback__c"
external_id_field = "Centercode_Id__c"
external_id = "/feedback/id"
dedupe = ["/feedback/id", "/feedback/modified"]
auth = {{ header = "X-Relay-Token", token = "{WEBHOOK_TOKEN}" }}
[routes.fields]
Title__c = {{ from = "/feedback/title", required = true, max_len = 255 }}
Status__c = {{ from = "/feedback/status", map = {{ "In Progress" = "Working" }}, default = "New" }}

[[routes]]
name = "beta-feedback"
kind = "outbound_message"
org_ids = ["00D8d000001AbCdEAK"]
sobject = "Feedback__c"
action = "create_feedback"
url = "{centercode}/api/v1/projects/beta1/externalSources/sf-issues"
[routes.fields]
summary = {{ from = "Subject__c", required = true, max_len = 255 }}
description = "Description__c"
severity = {{ from = "Priority__c", map = {{ High = "Major", Medium = "Minor", Low = "Cosmetic" }}, default = "Minor" }}
status = {{ value = "New" }}
salesforce_id = "Id"
"#,
        db = dir.join("relay.db").display(),
        client_id = test_keys::CLIENT_ID,
        username = test_keys::USERNAME,
        private_key = test_keys::PRIVATE_KEY_PEM,
    );
    Settings::from_toml(&toml).expect("demo settings are valid")
}

/// Run the demo; with `serve`, keep the relay running until Ctrl-C.
pub async fn run(serve: bool) -> anyhow::Result<i32> {
    let dir = tempfile::tempdir()?;
    let centercode = FakeCentercode::start(FakeConfig::demo()).await?;
    let salesforce = FakeSalesforce::start(FakeSalesforceConfig::demo()).await?;
    // The Contacts the sample removals name exist in the fake org, so their status can be
    // written back onto them.
    for id in record_ids(REMOVAL).into_iter().chain(record_ids(BATCH)) {
        salesforce.insert_record("Contact", serde_json::json!({"Id": id, "LastName": "Demo"}));
    }
    let mut settings = demo_settings(
        dir.path(),
        &centercode.base_url(),
        &salesforce.base_url(),
        "127.0.0.1:8080",
    );
    crate::telemetry::init(&settings.telemetry);
    if std::net::TcpListener::bind(&settings.server.bind).is_err() {
        settings.server.bind = "127.0.0.1:0".into(); // 8080 is taken: any free port
    }
    let app = Application::build(settings).await?;
    let relay = format!("http://127.0.0.1:{}", app.port());
    let queue = app.queue().clone();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone(), true));

    println!("Relay demo");
    println!(
        "  relay (embedded queue in {}): {relay}",
        dir.path().display()
    );
    println!("  fake Centercode:               {}", centercode.base_url());
    println!(
        "  fake Salesforce:               {}\n",
        salesforce.base_url()
    );

    // One transient failure, so the account shows a retry.
    centercode.push_fault(Fault {
        route: FaultRoute::ExternalSource,
        status: 503,
        retry_after: Some("1".into()),
        ..Fault::default()
    });
    let client = reqwest::Client::new();
    let sends = [
        (
            "gdpr-removal",
            REMOVAL,
            "a GDPR removal (Contact, 1 notification)",
        ),
        (
            "gdpr-removal",
            BATCH,
            "a batch of 4 removals (3 unknown to Centercode)",
        ),
        ("beta-feedback", FEEDBACK, "a feedback record (Feedback__c)"),
        (
            "beta-feedback",
            FEEDBACK_NIL,
            "a feedback record with null fields",
        ),
        (
            "gdpr-removal",
            REMOVAL,
            "the first removal again (a Salesforce redelivery)",
        ),
    ];
    println!("Salesforce sends:");
    for (route, body, what) in sends {
        let response = client
            .post(format!("{relay}/salesforce/outbound/{route}"))
            .header("Content-Type", "text/xml; charset=utf-8")
            .body(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let acked = response.text().await?.contains("<Ack>true</Ack>");
        println!(
            "  {what:<52} -> HTTP {status}{}",
            if acked { ", <Ack>true</Ack>" } else { "" }
        );
    }

    println!("\nCentercode sends (a macro's Trigger Webhook):");
    for what in [
        "a feedback update (FB-1042, In Progress)",
        "the same webhook again (a redelivery)",
    ] {
        let response = client
            .post(format!("{relay}/centercode/webhook/cc-feedback"))
            .header("Content-Type", "application/json")
            .header("X-Relay-Token", WEBHOOK_TOKEN)
            .body(CC_FEEDBACK)
            .send()
            .await?;
        println!("  {what:<52} -> HTTP {}", response.status().as_u16());
    }

    // Wait (with a deadline) until every job is delivered, parked or abandoned.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = queue.stats().await?;
        if s.ready + s.in_flight + s.retrying == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!("\nCentercode received:");
    for r in centercode.requests() {
        let what = match r.query.get("find").and_then(|v| v.as_str()) {
            Some(email) => format!("remove user {email}"),
            None => "create feedback".to_owned(),
        };
        let meaning = match (r.status, r.route.as_str()) {
            (200, "userMacroListener") => "removed",
            (404, "userMacroListener") => "no such user: counted as done",
            (200..=299, _) => "created",
            (503, _) => "unavailable: will retry",
            _ => "",
        };
        println!("  {:<6} {:<40} {} {meaning}", r.method, what, r.status);
    }
    for f in centercode.feedback() {
        println!(
            "  feedback {} created: {}",
            f["id"].as_str().unwrap_or("?"),
            f["fields"]
        );
    }
    println!("\nSalesforce received (Sforce-Call-Options: client=centercode-relay):");
    for w in salesforce.writes() {
        let what = if w.path.contains("/Centercode_Feedback__c/") {
            "upsert feedback by Centercode id"
        } else {
            "status written back on the Contact"
        };
        println!("  {:<6} {:<70} {} {what}", w.method, w.path, w.status);
    }
    for (id, record) in record_ids(REMOVAL).iter().take(1).filter_map(|id| {
        Some((
            *id,
            salesforce
                .records("Contact")
                .into_iter()
                .find(|r| r.id == *id)?,
        ))
    }) {
        let status = record.get("Centercode_Status__c").and_then(|v| v.as_str());
        println!(
            "  Contact {id}: Centercode_Status__c = {}",
            status.unwrap_or("(not written)")
        );
    }
    for record in salesforce.records("Centercode_Feedback__c") {
        println!(
            "  Centercode_Feedback__c {}: Title__c = {}, Status__c = {}",
            record
                .get("Centercode_Id__c")
                .and_then(|v| v.as_str())
                .unwrap_or("?"),
            record.get("Title__c").unwrap_or(&serde_json::Value::Null),
            record.get("Status__c").unwrap_or(&serde_json::Value::Null),
        );
    }
    let stats = queue.stats().await?;
    println!(
        "\nQueue now: {} ready, {} retrying, {} parked (the redelivery was acknowledged but not sent twice).",
        stats.ready, stats.retrying, stats.parked
    );

    if serve {
        println!("\nThe relay keeps running. Send more, then Ctrl-C to stop:");
        println!(
            "  curl -i -H 'Content-Type: text/xml; charset=utf-8' --data-binary @examples/salesforce/om_contact_batch_100.xml {relay}/salesforce/outbound/gdpr-removal"
        );
        println!("  curl {}/__fake/requests", centercode.base_url());
        tokio::signal::ctrl_c().await?;
    }
    stop.cancel();
    let _ = running.await;
    centercode.stop().await;
    salesforce.stop().await;
    Ok(0)
}
