//! `relay demo`: the whole relay on a fresh machine. Starts a fake Centercode in-process and
//! the relay on a temporary embedded queue, sends sample Salesforce messages over HTTP, and
//! prints what Centercode received and what was retried.

use crate::settings::Settings;
use crate::startup::Application;
use fake_centercode::{FakeCentercode, FakeConfig, Fault, FaultRoute};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const REMOVAL: &str = include_str!("../examples/salesforce/om_contact_gdpr_removal_single.xml");
const BATCH: &str = include_str!("../examples/salesforce/om_contact_batch_4.xml");
const FEEDBACK: &str = include_str!("../examples/salesforce/om_feedback_custom_object.xml");
const FEEDBACK_NIL: &str = include_str!("../examples/salesforce/om_feedback_nil_fields.xml");

fn demo_settings(dir: &std::path::Path, centercode: &str, bind: &str) -> Settings {
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

[[routes]]
name = "gdpr-removal"
kind = "outbound_message"
org_ids = ["00D8d000001AbCdEAK"]
sobject = "Contact"
action = "remove_user"
url = "{centercode}/api/v1/userMacroListeners/gdpr"
email_field = "Email"

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
    );
    Settings::from_toml(&toml).expect("demo settings are valid")
}

/// Run the demo; with `serve`, keep the relay running until Ctrl-C.
pub async fn run(serve: bool) -> anyhow::Result<i32> {
    let dir = tempfile::tempdir()?;
    let centercode = FakeCentercode::start(FakeConfig::demo()).await?;
    let mut settings = demo_settings(dir.path(), &centercode.base_url(), "127.0.0.1:8080");
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
    println!(
        "  fake Centercode:               {}\n",
        centercode.base_url()
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
    Ok(0)
}
