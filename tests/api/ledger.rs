//! The delivery ledger on the embedded queue: every outcome recorded with its attempts,
//! erasure answered by subject key, and no personal data left in the queue file once jobs
//! complete.

use crate::helpers::{fixture, spawn_app_with, TestApp};
use fake_centercode::Fault;
use serde_json::{json, Value};
use sf_centercode_relay::worker::Outcome;

const ADMIN: &str = "ledger-admin-token-0123456789abcdef0123";
const SUBJECT_KEY: &str = "ledger-subject-key-for-tests";

async fn spawn() -> TestApp {
    spawn_app_with(|s| {
        s.admin.token = Some(ADMIN.to_owned().into());
        s.ledger.subject_key = SUBJECT_KEY.to_owned().into();
    })
    .await
}

async fn get(app: &TestApp, path: &str) -> Value {
    let res = app
        .client
        .get(format!("{}{path}", app.address))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{path}");
    res.json().await.unwrap()
}

async fn by_subject(app: &TestApp, email: &str) -> Value {
    let res = app
        .client
        .post(format!("{}/admin/ledger/subject", app.address))
        .bearer_auth(ADMIN)
        .json(&json!({ "email": email }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

fn outcomes(entry: &Value) -> Vec<&str> {
    entry["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["outcome"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn an_erasure_is_proven_by_subject_key_and_no_personal_data_stays_in_the_queue_file() {
    // Arrange: a removal, a removal of someone Centercode does not know, and feedback.
    let app = spawn().await;
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.post_outbound("feedback", fixture("om_feedback_custom_object.xml"))
        .await;
    // Act
    let delivered = app.deliver_until_settled().await;
    assert_eq!(delivered.len(), 2, "{delivered:?}");

    // Assert: the erasure is answered from the e-mail (any case), with Centercode's status.
    let entries = by_subject(&app, " Marta.Kowalska@EXAMPLE.org").await;
    let entries = entries["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let erasure = &entries[0];
    assert_eq!(erasure["route"], "gdpr");
    assert_eq!(erasure["record_id"], "0038d0000000041AAA");
    assert_eq!(erasure["notification_id"], "04l8d0000100001AAA");
    assert_eq!(erasure["attempts"][0]["status"], 200);
    assert_eq!(outcomes(erasure), vec!["delivered"]);
    assert!(erasure["stored_at"].is_string() && erasure["received_at"].is_string());
    let (received, stored) = (
        erasure["received_at_ms"].as_i64().unwrap(),
        erasure["stored_at_ms"].as_i64().unwrap(),
    );
    assert!(
        received > 0 && received <= stored && stored - received < 10_000,
        "received {received}, stored {stored}"
    );
    assert!(erasure["subject_key"].as_str().unwrap().len() == 64);
    assert_eq!(
        by_subject(&app, "nobody@example.org").await["entries"],
        json!([])
    );
    // By record id, the feedback's fate.
    let fb = get(&app, "/admin/ledger?record_id=a0B8d00000AbCdEEAV").await;
    assert_eq!(outcomes(&fb["entries"][0]), vec!["delivered"]);

    // No e-mail and no field value left anywhere in the file or its WAL once compacted.
    app.queue.compact().await.unwrap();
    let db = app.settings.queue.path.clone();
    let mut bytes = std::fs::read(&db).unwrap();
    if let Ok(wal) = std::fs::read(db.with_extension("db-wal")) {
        bytes.extend(wal);
    }
    for needle in [
        "marta.kowalska@example.org",
        "Kowalska",
        "aisha.okafor@example.net",
        "Folder rename reverted after sync",
        "When I rename a folder",
        "CC-778812",
    ] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "`{needle}` is still in the queue file"
        );
    }
}

#[tokio::test]
async fn a_parked_then_replayed_job_shows_each_step_and_incomplete_jobs_are_listed() {
    let app = spawn().await;
    app.centercode.push_fault(Fault {
        status: 400,
        body: Some(
            r#"{"error":"bad request for marta.kowalska@example.org","apiKey":"k-123456"}"#.into(),
        ),
        ..Fault::default()
    });
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    let parked = app.deliver_until_settled().await;
    assert!(
        matches!(&parked[..], [Outcome::Parked { .. }]),
        "{parked:?}"
    );
    let open = get(&app, "/admin/ledger?incomplete=true").await;
    let entry = &open["entries"][0];
    assert_eq!(outcomes(entry), vec!["parked"]);
    let response = entry["attempts"][0]["response"].as_str().unwrap();
    assert!(response.contains("bad request"), "{response}");
    assert!(
        !response.contains("marta") && !response.contains("k-123456"),
        "{response}"
    );

    let replay = app
        .client
        .post(format!("{}/admin/parked/replay", app.address))
        .bearer_auth(ADMIN)
        .json(&json!({"route": "gdpr"}))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 200);
    app.deliver_until_settled().await;
    let done = get(&app, "/admin/ledger?route=gdpr").await;
    let entry = &done["entries"][0];
    assert_eq!(outcomes(entry), vec!["parked", "replayed", "delivered"]);
    assert_eq!(entry["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(
        get(&app, "/admin/ledger?incomplete=true").await["entries"],
        json!([])
    );
}

#[tokio::test]
async fn on_rabbitmq_the_ledger_lives_in_postgresql_and_holds_no_personal_data() {
    // Arrange: the RabbitMQ backend with its ledger in a PostgreSQL schema of this test.
    let pg = tokio::task::spawn_blocking(|| crate::services::postgres().url.clone())
        .await
        .unwrap();
    let url = pg.clone();
    let app = crate::helpers::spawn_app_on(crate::helpers::Backend::Rabbitmq, move |s| {
        s.admin.token = Some(ADMIN.to_owned().into());
        s.ledger.subject_key = SUBJECT_KEY.to_owned().into();
        s.ledger.url = Some(url.into());
        s.ledger.schema = s.queue.prefix.clone();
    })
    .await;
    let schema = app.settings.ledger.schema.clone();
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.post_outbound("feedback", fixture("om_feedback_custom_object.xml"))
        .await;

    // Act
    assert_eq!(app.deliver_until_settled().await.len(), 2);

    // Assert: the erasure answered from PostgreSQL by subject key.
    let entries = by_subject(&app, "marta.kowalska@example.org").await;
    let erasure = &entries["entries"][0];
    assert_eq!(erasure["record_id"], "0038d0000000041AAA");
    assert_eq!(outcomes(erasure), vec!["delivered"]);
    assert_eq!(erasure["attempts"][0]["status"], 200);
    // Nothing is left in the broker's queues, and the ledger's dump holds no personal data.
    let stats = app.stats().await;
    assert_eq!(
        (
            stats.ready,
            stats.in_flight,
            stats.retrying,
            stats.parked,
            stats.held
        ),
        (0, 0, 0, 0, 0)
    );
    let dump = tokio::process::Command::new(
        crate::services::find_program("pg_dump", "postgresql-client").unwrap(),
    )
    .arg(&pg)
    .arg(format!("--schema={schema}"))
    .output()
    .await
    .unwrap();
    assert!(dump.status.success(), "{dump:?}");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("0038d0000000041AAA"),
        "the dump holds the ledger"
    );
    for needle in [
        "marta.kowalska@example.org",
        "Kowalska",
        "aisha.okafor@example.net",
        "Folder rename reverted after sync",
    ] {
        assert!(
            !dump.contains(needle),
            "`{needle}` is in the ledger database"
        );
    }
    let _ = tokio::process::Command::new(
        crate::services::find_program("psql", "postgresql-client").unwrap(),
    )
    .arg(&pg)
    .args(["-c", &format!("DROP SCHEMA \"{schema}\" CASCADE")])
    .output()
    .await;
}

/// `relay ledger …` with `input` on standard input; (exit code, stdout).
async fn relay_ledger(app: &TestApp, args: &[&str], input: &str) -> (i32, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("ledger")
        .args(args)
        .args(["--url", &app.address, "--token", ADMIN])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn the_ledger_command_traces_and_proves_an_erasure_also_with_a_key_from_before_a_rotation() {
    let app = spawn().await;
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.deliver_until_settled().await;
    let dir = tempfile::tempdir().unwrap();
    let (current, other) = (dir.path().join("current.key"), dir.path().join("other.key"));
    std::fs::write(&current, format!("{SUBJECT_KEY}\n")).unwrap();
    std::fs::write(&other, "a-key-that-recorded-nothing").unwrap();

    // The e-mail comes on standard input, hashed by the relay with its current key.
    let (code, out) = relay_ledger(&app, &["erasure"], "marta.kowalska@example.org\n").await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("0038d0000000041AAA") && out.contains("-> delivered"),
        "{out}"
    );
    // Hashed here with the key of the file (the key in force when the entry was recorded).
    let key = current.to_str().unwrap();
    let (code, out) = relay_ledger(
        &app,
        &["erasure", "--key-file", key],
        "marta.kowalska@example.org",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0038d0000000041AAA"), "{out}");
    let key = other.to_str().unwrap();
    let (code, _) = relay_ledger(
        &app,
        &["erasure", "--key-file", key],
        "marta.kowalska@example.org",
    )
    .await;
    assert_eq!(code, 3, "another key finds nothing");
    let (code, _) = relay_ledger(&app, &["erasure"], "").await;
    assert_eq!(code, 2, "no e-mail on standard input");

    let (code, out) = relay_ledger(&app, &["trace", "--record-id", "0038d0000000041AAA"], "").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("attempt 1  done  status 200"), "{out}");
    let (code, _) = relay_ledger(&app, &["trace", "--record-id", "003000000000000AAA"], "").await;
    assert_eq!(code, 3);
}

#[tokio::test]
async fn a_route_that_keeps_payloads_keeps_them_only_until_they_expire() {
    let app = spawn_app_with(|s| {
        s.admin.token = Some(ADMIN.to_owned().into());
        let feedback = s.routes.iter_mut().find(|r| r.name == "feedback").unwrap();
        feedback.keep_payload_days = 2;
    })
    .await;
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.post_outbound("feedback", fixture("om_feedback_custom_object.xml"))
        .await;
    app.deliver_until_settled().await;
    let fb = get(&app, "/admin/ledger?route=feedback").await;
    let payload = fb["entries"][0]["payload"].to_string();
    assert!(
        payload.contains("Folder rename reverted after sync"),
        "{payload}"
    );
    let removal = get(&app, "/admin/ledger?route=gdpr").await;
    assert_eq!(
        removal["entries"][0]["payload"],
        Value::Null,
        "removals keep nothing"
    );

    // Once expired, retention removes it from the ledger and the file.
    let db = app.settings.queue.path.clone();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("UPDATE ledger_payloads SET expires_at = 1", [])
        .unwrap();
    app.queue.ledger_purge_before(0).await.unwrap();
    let fb = get(&app, "/admin/ledger?route=feedback").await;
    assert_eq!(fb["entries"][0]["payload"], Value::Null);
    let mut bytes = std::fs::read(&db).unwrap();
    bytes.extend(std::fs::read(db.with_extension("db-wal")).unwrap_or_default());
    let needle = b"Folder rename reverted after sync";
    assert!(!bytes.windows(needle.len()).any(|w| w == needle));
}
