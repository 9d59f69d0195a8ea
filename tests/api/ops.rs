//! The ops listener (`server.ops_bind`): /metrics and /admin/* only there, health on both;
//! and probes that stay cheap however often they are called.

use crate::admin::series;
use crate::helpers::{fixture, test_settings};
use fake_centercode::{FakeCentercode, FakeConfig};
use sf_centercode_relay::startup::Application;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "ops-admin-token-0123456789abcdef0123";

/// A relay with an ops listener; returns (main URL, ops URL, its stop token).
async fn spawn_with_ops(
    dir: &std::path::Path,
    centercode: &FakeCentercode,
) -> (String, String, CancellationToken) {
    let mut settings = test_settings(&dir.join("relay.db"), &centercode.base_url());
    settings.server.ops_bind = Some("127.0.0.1:0".into());
    settings.admin.token = Some(TOKEN.to_owned().into());
    settings.validate().unwrap();
    let app = Application::build(settings).await.unwrap();
    let main = format!("http://127.0.0.1:{}", app.port());
    let ops = format!("http://127.0.0.1:{}", app.ops_port().expect("an ops port"));
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone(), true));
    (main, ops, stop)
}

#[tokio::test]
async fn metrics_and_admin_are_served_only_on_the_ops_listener() {
    let centercode = FakeCentercode::start(FakeConfig::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (main, ops, stop) = spawn_with_ops(dir.path(), &centercode).await;
    let client = reqwest::Client::new();
    let get = |url: String| {
        let client = client.clone();
        async move {
            client
                .get(url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // The listener Salesforce calls: inbound routes and health, no metrics or admin.
    for path in ["/metrics", "/admin/routes", "/admin/parked"] {
        assert_eq!(
            get(format!("{main}{path}")).await,
            404,
            "{path} on the main listener"
        );
    }
    for path in ["/health/live", "/health/ready"] {
        assert_eq!(
            get(format!("{main}{path}")).await,
            200,
            "{path} on the main listener"
        );
        assert_eq!(
            get(format!("{ops}{path}")).await,
            200,
            "{path} on the ops listener"
        );
    }
    let acked = client
        .post(format!("{main}/salesforce/outbound/gdpr"))
        .header("Content-Type", "text/xml")
        .body(fixture("om_contact_gdpr_removal_single.xml"))
        .send()
        .await
        .unwrap();
    assert_eq!(acked.status(), 200);
    // The ops listener: metrics and admin, no Salesforce routes.
    assert_eq!(get(format!("{ops}/metrics")).await, 200);
    assert_eq!(get(format!("{ops}/admin/routes")).await, 200);
    let inbound = client
        .post(format!("{ops}/salesforce/outbound/gdpr"))
        .header("Content-Type", "text/xml")
        .body(fixture("om_contact_gdpr_removal_single.xml"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        inbound.status(),
        404,
        "Salesforce routes are not on the ops listener"
    );
    stop.cancel();
}

#[tokio::test]
async fn scrapes_and_probes_cost_one_queue_reading_per_cache_period() {
    let centercode = FakeCentercode::start(FakeConfig::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir.path().join("relay.db"), &centercode.base_url());
    settings.server.probe_cache_ms = 1000;
    let app = Application::build(settings).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone(), false));
    let client = reqwest::Client::new();
    let started = Instant::now();
    for _ in 0..40 {
        let m = client.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(m.status(), 200);
        let r = client
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let elapsed = started.elapsed();
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // One reading per started second at most (plus the one in progress at the end).
    let bound = elapsed.as_secs_f64().ceil() + 1.0;
    for probe in ["stats", "readiness"] {
        let reads = series(
            &text,
            &format!(r#"relay_probe_queue_reads_total{{probe="{probe}"}}"#),
        );
        assert!(
            (1.0..=bound).contains(&reads),
            "{reads} {probe} readings for 81 calls in {elapsed:?}"
        );
    }
    assert_eq!(series(&text, "relay_ready"), 1.0);
    stop.cancel();
}

#[tokio::test]
async fn production_without_an_ops_listener_warns_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
bind = "127.0.0.1:0"
[queue]
path = "{db}"
[centercode]
api_key = "community-key"
[[routes]]
name = "gdpr"
kind = "outbound_message"
org_ids = ["00D8d000001AbCdEAK"]
sobject = "Contact"
action = "remove_user"
url = "https://acme.centercode.com/api/v1/userMacroListeners/gdpr"
email_field = "Email"
path_token = "0123456789abcdef-token"
"#,
            db = dir.path().join("relay.db").display()
        ),
    )
    .unwrap();
    let start = |ops: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_relay"));
        cmd.arg("--config")
            .arg(&config)
            .arg("serve")
            .env("RELAY_CONFIG_DIR", dir.path())
            .env("RELAY_ENV", "production")
            .env(
                "RELAY__LEDGER__SUBJECT_KEY",
                "ops-test-subject-key-0123456789abcdef",
            )
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(ops) = ops {
            cmd.env("RELAY__SERVER__OPS_BIND", ops);
        }
        let mut child = cmd.spawn().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
        assert!(first.starts_with("relay listening on "), "{first}");
        let mut second = String::new();
        if ops.is_some() {
            std::io::BufRead::read_line(&mut stdout, &mut second).unwrap();
        }
        // SIGTERM: a clean stop writes out every log line (they are written in batches).
        std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(child.wait().unwrap().success());
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        (second, stderr)
    };
    let (_, stderr) = start(None);
    assert!(stderr.contains("server.ops_bind is unset"), "{stderr}");
    let (second, stderr) = start(Some("127.0.0.1:0"));
    assert!(second.starts_with("relay ops listening on "), "{second}");
    assert!(!stderr.contains("server.ops_bind is unset"), "{stderr}");
}
