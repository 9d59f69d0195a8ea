//! The `relay` binary's commands (check-config, preview) and how it logs.

use crate::helpers::{fixture_path, routes_toml};
use std::process::Command;

fn relay(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(args)
        // An empty config dir, so the repository's config/local.toml does not interfere.
        .env("RELAY_CONFIG_DIR", dir)
        .env_remove("RELAY_ENV")
        .output()
        .expect("run relay")
}

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn check_config_prints_the_routes_it_understood() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &routes_toml("https://acme.centercode.com"));
    let out = relay(dir.path(), &["--config", &cfg, "check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("6 route(s)"), "{stdout}");
    assert!(
        stdout.contains("gdpr: POST /salesforce/outbound/gdpr (sObject Contact) -> remove_user"),
        "{stdout}"
    );
    assert!(
        stdout.contains("summary <- Subject__c (required, max_len 255)"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("bearer-token-for-tests"),
        "secrets never printed"
    );
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = routes_toml("https://acme.centercode.com").replacen(
        "sobject = \"Case\"",
        "sobject = \"\"",
        1,
    );
    let cfg = write_config(dir.path(), &bad);
    let out = relay(dir.path(), &["--config", &cfg, "check-config"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("routes[2].sobject"), "{stderr}");

    let cfg = write_config(dir.path(), "[worker]\nconcurrency = 0\n");
    let out = relay(dir.path(), &["--config", &cfg, "check-config"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("worker.concurrency"));
}

#[test]
fn preview_prints_the_exact_request_with_the_key_masked() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &routes_toml("https://acme.centercode.com"));
    let file = fixture_path("om_contact_gdpr_removal_single.xml");
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args([
            "--config",
            &cfg,
            "preview",
            "--route",
            "gdpr",
            file.to_str().unwrap(),
        ])
        .env("RELAY_CONFIG_DIR", dir.path())
        .env("RELAY__CENTERCODE__API_KEY", "real-secret-key")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("POST https://acme.centercode.com/api/v1/userMacroListeners/gdpr?find=marta.kowalska%40example.org&apiKey=***"),
        "{stdout}"
    );
    assert!(!stdout.contains("real-secret-key"));

    let file = fixture_path("om_feedback_custom_object.xml");
    let out = relay(
        dir.path(),
        &[
            "--config",
            &cfg,
            "preview",
            "--route",
            "feedback",
            file.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("POST https://acme.centercode.com/api/v1/projects/beta1/externalSources/sf-issues?apiKey=***"), "{stdout}");
    assert!(stdout.contains("Content-Type: application/json"));
    assert!(stdout.contains("\"status\": \"New\""), "{stdout}");

    let out = relay(
        dir.path(),
        &[
            "--config",
            &cfg,
            "preview",
            "--route",
            "gdpr",
            fixture_path("hostile_wrong_org_id.xml").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("OrganizationId is not allowed"));
}

#[test]
fn the_demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = relay(dir.path(), &["demo", "--no-serve"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("<Ack>true</Ack>").count(), 5, "{stdout}");
    assert!(
        stdout.contains("remove user marta.kowalska@example.org   200 removed"),
        "{stdout}"
    );
    assert!(stdout.contains("no such user: counted as done"));
    assert!(stdout.contains("503 unavailable: will retry"));
    assert_eq!(stdout.matches(" created: ").count(), 2, "{stdout}");
    assert!(stdout.contains("0 ready, 0 retrying, 0 parked"));
    // The other direction, and the status written back on the Contact.
    assert_eq!(stdout.matches("-> HTTP 202").count(), 2, "{stdout}");
    assert_eq!(
        stdout.matches("upsert feedback by Centercode id").count(),
        1,
        "the redelivered webhook is written once: {stdout}"
    );
    assert!(
        stdout.contains("Centercode_Feedback__c FB-1042: Title__c = \"App crashes when uploading a photo\", Status__c = \"Working\""),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("status written back on the Contact").count(),
        5,
        "one per removal: {stdout}"
    );
    assert!(
        stdout.contains(
            "Contact 0038d0000000041AAA: Centercode_Status__c = Sent to Centercode (200)"
        ),
        "{stdout}"
    );
}

#[test]
fn a_short_admin_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[admin]\ntoken = \"too-short\"\n");
    let out = relay(dir.path(), &["--config", &cfg, "check-config"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin.token") && stderr.contains("32"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("too-short"),
        "the token itself is not echoed"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["serve"])
        .env("RELAY_CONFIG_DIR", dir.path())
        .env("RELAY__ADMIN__TOKEN", "short")
        .env("RELAY__SERVER__BIND", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve refused to start");
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin.token"));
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let config = crate::helpers::write_relay_config(
        dir.path(),
        "[server]\nbind = \"127.0.0.1:0\"\n",
        "http://127.0.0.1:9",
    );
    let (mut child, _) = crate::helpers::spawn_relay(
        &config,
        &["serve"],
        &[("RUST_LOG", "info")],
        std::process::Stdio::piped(),
    );
    // SIGTERM: the relay stops cleanly and its log thread writes out every line.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(logs.contains("INFO"), "the relay logged: {logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "no terminal colour codes in a pipe (they would litter files and journald): {logs:?}"
    );
}
