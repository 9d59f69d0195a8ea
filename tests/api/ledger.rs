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
        .post(format!("{}/admin/jobs/search", app.address))
        .bearer_auth(ADMIN)
        .json(&json!({ "email": email, "history": true }))
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
    // Arrange: a removal and feedback.
    let app = spawn().await;
    app.post_outbound("gdpr", fixture(GDPR_REMOVAL)).await;
    app.post_outbound("feedback", fixture(FEEDBACK)).await;
    // Act
    let delivered = app.deliver_until_settled().await;
    assert_eq!(delivered.len(), 2, "{delivered:?}");

    // Assert: the erasure is answered from the e-mail (any case), with Centercode's status.
    let entries = by_subject(&app, " Marta.Kowalska@EXAMPLE.org").await;
    let entries = entries["jobs"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let erasure = &entries[0];
    assert_eq!(erasure["route"], "gdpr");
    assert_eq!(erasure["record_id"], "0038d0000000041AAA");
    assert_eq!(erasure["notification_id"], "04l8d0000100001AAA");
    assert_eq!(erasure["attempts"][0]["status"], 200);
    assert_eq!(outcomes(erasure), vec!["delivered"]);
    assert_eq!(erasure["outcome"], "delivered");
    assert_eq!(erasure["state"], "done");
    assert_eq!(erasure["centercode_status"], 200);
    // RFC 3339 in UTC with a fixed width: text order is time order.
    let (received, stored) = (
        erasure["received_at"].as_str().unwrap(),
        erasure["stored_at"].as_str().unwrap(),
    );
    assert!(
        received.starts_with("20") && received <= stored,
        "received {received}, stored {stored}"
    );
    assert!(erasure["subject_key"].as_str().unwrap().len() == 64);
    assert_eq!(
        by_subject(&app, "nobody@example.org").await["jobs"],
        json!([])
    );
    // By record id, the feedback's fate.
    let fb = get(
        &app,
        "/admin/jobs?record_id=a0B8d00000AbCdEEAV&history=true",
    )
    .await;
    assert_eq!(outcomes(&fb["jobs"][0]), vec!["delivered"]);

    // Act: the WAL is folded back into the file and truncated (the relay does it every minute).
    app.queue.compact().await.unwrap();

    // Assert: no e-mail and no Salesforce field value of either message is left in the store
    // (the queue file, its WAL and its shared-memory file), though the ids the ledger keeps are.
    let needles = not_said_by_centercode(
        personal_data(&[GDPR_REMOVAL, FEEDBACK]),
        &centercode_answers(&app).await,
    );
    let db = app.settings.queue.path.clone();
    let (names, store) = queue_files(&db);
    assert!(
        names.contains(&format!(
            "{}-wal",
            db.file_name().unwrap().to_string_lossy()
        )),
        "the WAL is searched too: {names:?}"
    );
    assert!(
        contains(&store, "0038d0000000041AAA"),
        "the ledger is in {names:?}"
    );
    let found = found_in(&store, &needles);
    assert!(
        found.is_empty(),
        "personal data is still in {names:?}: {found:?}"
    );
    // ...and the ledger still answers by subject key.
    let entries = by_subject(&app, "marta.kowalska@example.org").await;
    assert_eq!(entries["jobs"][0]["record_id"], "0038d0000000041AAA");
    assert_eq!(outcomes(&entries["jobs"][0]), vec!["delivered"]);
}

const GDPR_REMOVAL: &str = "om_contact_gdpr_removal_single.xml";
const FEEDBACK: &str = "om_feedback_custom_object.xml";

/// Every e-mail address and every Salesforce field value of the Outbound Message fixtures
/// `names`, read from the fixtures themselves; less the ids the ledger keeps on purpose
/// (record, org and notification ids) and values too plain to tell anyone anything (`true`,
/// `2.0`, fewer than 4 characters).
fn personal_data(names: &[&str]) -> Vec<String> {
    use quick_xml::events::Event;
    let mut kept_ids = std::collections::HashSet::new();
    let mut values = Vec::new();
    for name in names {
        let xml = fixture(name);
        let mut reader = quick_xml::Reader::from_reader(xml.as_slice());
        let mut path: Vec<String> = Vec::new();
        loop {
            match reader.read_event().unwrap() {
                Event::Start(e) => {
                    path.push(String::from_utf8_lossy(e.name().as_ref()).into_owned());
                }
                Event::End(_) => {
                    path.pop();
                }
                Event::Text(t) => {
                    let text = t.unescape().unwrap().trim().to_owned();
                    let element = path.last().map_or("", String::as_str);
                    let parent = path.iter().rev().nth(1).map_or("", String::as_str);
                    match (parent, element) {
                        (_, "OrganizationId" | "sf:Id") | ("Notification", "Id") => {
                            kept_ids.insert(text.clone());
                        }
                        _ => {}
                    }
                    values.extend(
                        text.split(|c: char| c.is_whitespace() || "<>,;\"()".contains(c))
                            .filter(|w| w.contains('@'))
                            .map(str::to_owned),
                    );
                    if element.starts_with("sf:") {
                        values.push(text);
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
    }
    let plain = |v: &str| {
        v.chars().count() < 4
            || v.parse::<f64>().is_ok()
            || ["true", "false"].contains(&v.to_ascii_lowercase().as_str())
    };
    values.retain(|v| !kept_ids.contains(v) && !plain(v));
    values.sort();
    values.dedup();
    // The fixtures are what the tests think they are: both people, the ticket's text.
    for expected in [
        "marta.kowalska@example.org",
        "Kowalska",
        "aisha.okafor@example.net",
        "Folder rename reverted after sync",
    ] {
        assert!(
            values.iter().any(|v| v == expected),
            "{expected} in {values:?}"
        );
    }
    assert!(!values.iter().any(|v| v == "0038d0000000041AAA"));
    values
}

/// Centercode's answers to every attempt, as the ledger keeps them (at most 1 KiB, redacted).
async fn centercode_answers(app: &TestApp) -> Vec<String> {
    get(app, "/admin/jobs?history=true").await["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|job| job["attempts"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["response"].as_str().map(str::to_owned))
        .collect()
}

/// `needles` less Centercode's own words, which the ledger keeps in its answers on purpose:
/// a single word (no space, digit or `@`) that an answer gives as a whole JSON string, such
/// as the feedback type (`"feedbackType":"Issue"`, also the record's `Feedback_Type__c`).
/// Sentences, names and e-mails Centercode echoed would stay needles.
fn not_said_by_centercode(needles: Vec<String>, answers: &[String]) -> Vec<String> {
    let said = |v: &str| {
        !v.contains(|c: char| c.is_whitespace() || c.is_ascii_digit() || c == '@')
            && answers.iter().any(|a| a.contains(&format!("\"{v}\"")))
    };
    needles.into_iter().filter(|v| !said(v)).collect()
}

/// The queue file `db` and the files SQLite keeps beside it (`-wal`, `-shm`): their names
/// and their bytes, one after the other.
fn queue_files(db: &std::path::Path) -> (Vec<String>, Vec<u8>) {
    let prefix = db.file_name().unwrap().to_string_lossy().into_owned();
    let mut names = Vec::new();
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(db.parent().unwrap()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) {
            bytes.extend(std::fs::read(entry.path()).unwrap());
            names.push(name);
        }
    }
    names.sort();
    (names, bytes)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    !found_in(haystack, &[needle.to_owned()]).is_empty()
}

/// The needles found in `haystack`, ignoring ASCII case.
fn found_in<'a>(haystack: &[u8], needles: &'a [String]) -> Vec<&'a str> {
    let haystack = haystack.to_ascii_lowercase();
    needles
        .iter()
        .filter(|n| {
            let n = n.to_ascii_lowercase();
            haystack.windows(n.len()).any(|w| w == n.as_bytes())
        })
        .map(String::as_str)
        .collect()
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
    let open = get(&app, "/admin/jobs?undelivered=true&history=true").await;
    let entry = &open["jobs"][0];
    assert_eq!(entry["state"], "parked");
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
    let done = get(&app, "/admin/jobs?route=gdpr&history=true").await;
    let entry = &done["jobs"][0];
    assert_eq!(outcomes(entry), vec!["parked", "replayed", "delivered"]);
    assert_eq!(entry["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(
        get(&app, "/admin/jobs?undelivered=true").await["jobs"],
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
    // Dropped (with the schema) at the end, even when the test fails.
    let schema = crate::ledger_conformance::PgSchema::new(&app.settings.ledger.schema).await;
    app.post_outbound("gdpr", fixture(GDPR_REMOVAL)).await;
    app.post_outbound("feedback", fixture(FEEDBACK)).await;

    // Act
    assert_eq!(app.deliver_until_settled().await.len(), 2);

    // Assert: the erasure answered from PostgreSQL by subject key.
    let entries = by_subject(&app, "marta.kowalska@example.org").await;
    let erasure = &entries["jobs"][0];
    assert_eq!(erasure["record_id"], "0038d0000000041AAA");
    assert_eq!(outcomes(erasure), vec!["delivered"]);
    assert_eq!(erasure["attempts"][0]["status"], 200);
    // No e-mail and no Salesforce field value of either message is in the ledger's dump
    // (which does hold the ids it keeps), nor in any of the broker's queues of this relay.
    let needles = not_said_by_centercode(
        personal_data(&[GDPR_REMOVAL, FEEDBACK]),
        &centercode_answers(&app).await,
    );
    let dump = schema.dump().await;
    assert!(
        dump.contains("0038d0000000041AAA") && dump.contains("a0B8d00000AbCdEEAV"),
        "the dump holds the ledger"
    );
    let found = found_in(dump.as_bytes(), &needles);
    assert!(found.is_empty(), "in the ledger database: {found:?}");
    // Every queue of this relay's prefix, as the broker lists them, read message by message
    // (the listing's counts are statistics that may lag; reading them is not).
    let prefix = app.settings.queue.prefix.clone();
    let queues = broker_queues(&prefix).await;
    assert!(
        queues.len() >= 4 && queues.contains(&format!("{prefix}.work")),
        "the relay's queues: {queues:?}"
    );
    let (left, contents) = queue_contents(&app.settings.queue.url, &queues).await;
    let found = found_in(&contents, &needles);
    assert!(found.is_empty(), "in the broker's queues: {found:?}");
    assert_eq!(left, 0, "messages left in {queues:?}");
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
    // ...and the ledger still answers by subject key.
    let entries = by_subject(&app, "Marta.Kowalska@example.org").await;
    assert_eq!(entries["jobs"][0]["record_id"], "0038d0000000041AAA");
}

/// Every queue of the broker whose name starts with `prefix` (`rabbitmqctl list_queues`).
async fn broker_queues(prefix: &str) -> Vec<String> {
    let out = tokio::process::Command::from(crate::services::rabbitmqctl())
        .args(["list_queues", "-q", "name"])
        .output()
        .await
        .expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl list_queues: {out:?}");
    let mut queues: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| name.starts_with(&format!("{prefix}.")))
        .map(str::to_owned)
        .collect();
    queues.sort();
    queues
}

/// How many messages `queues` hold, and their bodies and headers, read with `basic.get` and
/// never acknowledged (they go back when the channel closes).
async fn queue_contents(url: &secrecy::SecretString, queues: &[String]) -> (usize, Vec<u8>) {
    use secrecy::ExposeSecret;
    let conn =
        lapin::Connection::connect(url.expose_secret(), lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
    let (mut messages, mut contents) = (0, Vec::new());
    for queue in queues {
        let channel = conn.create_channel().await.unwrap();
        while let Some(message) = channel
            .basic_get(queue, lapin::options::BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        {
            messages += 1;
            contents.extend(&message.delivery.data);
            contents.extend(format!("{:?}", message.delivery.properties).into_bytes());
        }
        let _ = channel.close(200, "read").await;
    }
    let _ = conn.close(200, "read").await;
    (messages, contents)
}

/// `relay {args}` against the app, with `input` on standard input and the test's subject
/// key in the environment (as an operator's shell on the relay's host has it);
/// (exit code, stdout, stderr).
async fn relay(app: &TestApp, args: &[&str], input: &str) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(args)
        .args(["--url", &app.address, "--token", ADMIN])
        .env("RELAY__LEDGER__SUBJECT_KEY", SUBJECT_KEY)
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
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn relay_trace_follows_a_record_a_notification_a_job_and_an_email_hashed_locally() {
    let app = spawn().await;
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.deliver_until_settled().await;
    let dir = tempfile::tempdir().unwrap();
    let (current, other) = (dir.path().join("current.key"), dir.path().join("other.key"));
    std::fs::write(&current, format!("{SUBJECT_KEY}\n")).unwrap();
    std::fs::write(&other, "a-key-that-recorded-nothing").unwrap();

    // By record id: the whole timeline, in order.
    let (code, out, err) = relay(&app, &["trace", "--record-id", "0038d0000000041AAA"], "").await;
    assert_eq!(code, 0, "{out}{err}");
    let order: Vec<usize> = [
        "received",
        "stored",
        "attempt 1: Centercode 200 -> done",
        "delivered",
    ]
    .iter()
    .map(|step| {
        out.find(step)
            .unwrap_or_else(|| panic!("no `{step}` in {out}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    // By notification id, and by job id (as JSON for scripts).
    let (code, out, _) = relay(
        &app,
        &["trace", "--notification-id", "04l8d0000100001AAA", "--json"],
        "",
    )
    .await;
    assert_eq!(code, 0);
    let jobs: Value = serde_json::from_str(&out).unwrap();
    let job_id = jobs[0]["id"].as_str().unwrap().to_owned();
    let (code, out, _) = relay(&app, &["trace", "--job", &job_id, "--json"], "").await;
    assert_eq!(code, 0);
    let one: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(one[0]["record_id"], "0038d0000000041AAA");

    // By e-mail: hashed in the CLI with the configured key, with a key file, from stdin.
    let (code, out, _) = relay(
        &app,
        &["trace", "--email", "Marta.Kowalska@example.org"],
        "",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0038d0000000041AAA"), "{out}");
    let key = current.to_str().unwrap();
    let (code, out, _) = relay(
        &app,
        &["trace", "--email", "-", "--key-file", key],
        "marta.kowalska@example.org\n",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0038d0000000041AAA"), "{out}");
    let key = other.to_str().unwrap();
    let (code, _, err) = relay(
        &app,
        &[
            "trace",
            "--email",
            "marta.kowalska@example.org",
            "--key-file",
            key,
        ],
        "",
    )
    .await;
    assert_eq!(code, 3, "another key finds nothing");
    assert!(err.contains("nothing recorded for"), "{err}");
    assert!(!err.contains("marta"), "the e-mail is not echoed: {err}");

    // Unknown ids: said plainly, exit code 3.
    let (code, _, err) = relay(&app, &["trace", "--record-id", "003000000000000AAA"], "").await;
    assert_eq!(code, 3);
    assert!(
        err.contains("nothing recorded for record 003000000000000AAA"),
        "{err}"
    );
    let (code, _, err) = relay(&app, &["trace", "--job", "no-such-job"], "").await;
    assert_eq!(code, 3);
    assert!(
        err.contains("nothing recorded for job no-such-job"),
        "{err}"
    );
    let (code, _, _) = relay(&app, &["trace", "--email", "not-an-address"], "").await;
    assert_eq!(code, 2);
}

#[tokio::test]
async fn the_undelivered_list_names_parked_and_held_jobs_and_not_the_delivered_ones() {
    let app = spawn().await;
    // One delivered, one parked (400), one held behind a paused route.
    app.post_outbound("feedback", fixture("om_feedback_custom_object.xml"))
        .await;
    app.deliver_until_settled().await;
    app.centercode.push_fault(Fault {
        status: 400,
        ..Fault::default()
    });
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.deliver_until_settled().await;
    let pause = app
        .client
        .post(format!("{}/admin/routes/feedback/pause", app.address))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(pause.status(), 200);
    let held = fixture("om_feedback_custom_object.xml");
    let held = String::from_utf8(held)
        .unwrap()
        .replace("04l8d0000100030AAA", "04l8d0000100039AAA");
    assert_eq!(
        app.post_outbound("feedback", held.into_bytes())
            .await
            .status(),
        200
    );

    let (code, out, err) = relay(&app, &["ledger", "undelivered", "--json"], "").await;
    assert_eq!(code, 0, "{err}");
    let jobs: Value = serde_json::from_str(&out).unwrap();
    let mut states: Vec<(String, String)> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["route"].as_str().unwrap().into(),
                j["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    states.sort();
    assert_eq!(
        states,
        vec![
            ("feedback".into(), "held".into()),
            ("gdpr".into(), "parked".into())
        ],
        "{out}"
    );
    let (code, out, _) = relay(&app, &["ledger", "undelivered"], "").await;
    assert_eq!(code, 0);
    assert!(out.contains("parked") && out.contains("held"), "{out}");
    // Only what was stored since: nothing in the last second of a minute from now.
    let future = (std::time::SystemTime::now() + std::time::Duration::from_secs(60))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let (_, out, _) = relay(
        &app,
        &["ledger", "undelivered", "--since", &future, "--json"],
        "",
    )
    .await;
    assert_eq!(out.trim(), "[]");
}

#[tokio::test]
async fn the_erasure_export_streams_one_row_per_request_as_csv_or_json_across_pages() {
    use sf_centercode_relay::admin::rfc3339;
    use sf_centercode_relay::ledger::{Attempt, FinalOutcome, JobFacts};
    let app = spawn().await;
    // More rows than one page of the export (1,000), written straight to the ledger, an hour
    // ago (within retention: the relay's housekeeping would forget older ones).
    let rows = 1_205;
    let base = (sf_centercode_relay::queue::now_ms() / 1000 - 3600) * 1000;
    let writes = (0..rows).map(|n| {
        let queue = app.queue.clone();
        async move {
            let facts = JobFacts {
                job_id: format!("job-{n:05}"),
                route: "gdpr".into(),
                action: if n % 5 == 0 {
                    "create_feedback"
                } else {
                    "remove_user"
                }
                .into(),
                org_id: Some("00D000000000001AAA".into()),
                notification_id: Some(format!("04l{n:015}")),
                record_id: Some(format!("003{n:015}")),
                subject_key: Some(format!("{n:064x}")),
                received_at_ms: base + n,
                stored_at_ms: base + n,
            };
            let attempt = Attempt {
                attempt: 1,
                started_at_ms: facts.stored_at_ms + 5,
                duration_ms: 3,
                status: Some(if n % 2 == 0 { 200 } else { 404 }),
                error_class: None,
                outcome: if n % 2 == 0 { "done" } else { "user_not_found" }.into(),
                response: None,
            };
            let outcome = FinalOutcome {
                outcome: if n % 2 == 0 {
                    "delivered"
                } else {
                    "user_not_found"
                }
                .into(),
                reason: None,
                at_ms: facts.stored_at_ms + 10,
                kept_payload: None,
            };
            queue
                .ledger_record(facts, Some(attempt), Some(outcome))
                .await
                .unwrap();
        }
    });
    futures_util::future::join_all(writes).await;
    let erasures = (0..rows).filter(|n| n % 5 != 0).count();

    let since = (base / 1000 - 1).to_string();
    let (code, csv, err) = relay(
        &app,
        &[
            "ledger",
            "export",
            "--action",
            "remove_user",
            "--since",
            &since,
            "--format",
            "csv",
        ],
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "job_id,route,action,notification_id,record_id,subject_key,received_at,stored_at,completed_at,outcome,centercode_status");
    assert_eq!(lines.len(), erasures + 1, "one row per erasure request");
    let ids: std::collections::HashSet<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(ids.len(), erasures, "no row twice across pages");
    let row = lines.iter().find(|l| l.starts_with("job-00001,")).unwrap();
    assert_eq!(
        *row,
        format!(
            "job-00001,gdpr,remove_user,04l000000000000001,003000000000000001,{:064x},{at},{at},{done},user_not_found,404",
            1,
            at = rfc3339(base + 1),
            done = rfc3339(base + 11)
        )
    );

    let (code, json, _) = relay(
        &app,
        &[
            "ledger",
            "export",
            "--action",
            "remove_user",
            "--until",
            &(base / 1000).to_string(),
            "--format",
            "json",
        ],
        "",
    )
    .await;
    assert_eq!(code, 0);
    let all: Value = serde_json::from_str(&json).expect("one JSON array");
    assert_eq!(
        all.as_array().unwrap().len(),
        0,
        "nothing stored before --until"
    );
    let (_, json, _) = relay(
        &app,
        &[
            "ledger",
            "export",
            "--action",
            "remove_user",
            "--format",
            "json",
        ],
        "",
    )
    .await;
    let all: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("{e}: {}", &json[..json.len().min(3000)]));
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), erasures, "{}", &json[..json.len().min(3000)]);
    assert!(all
        .iter()
        .all(|r| r["action"] == "remove_user" && r["completed_at"].is_string()));
}

#[tokio::test]
async fn a_kept_payload_can_be_resent_once_and_anything_else_is_refused_with_the_reason() {
    let app = spawn_app_with(|s| {
        s.admin.token = Some(ADMIN.to_owned().into());
        let feedback = s.routes.iter_mut().find(|r| r.name == "feedback").unwrap();
        feedback.keep_payload_days = 2;
    })
    .await;
    app.post_outbound("feedback", fixture("om_feedback_custom_object.xml"))
        .await;
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.deliver_until_settled().await;
    let id_of = |v: &Value| v["jobs"][0]["id"].as_str().unwrap().to_owned();
    let feedback = id_of(&get(&app, "/admin/jobs?route=feedback").await);
    let removal = id_of(&get(&app, "/admin/jobs?route=gdpr").await);
    assert_eq!(app.centercode.feedback().len(), 1);

    let (code, out, err) = relay(&app, &["jobs", "resend", &feedback], "").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("resent as job"), "{out}");
    app.deliver_until_settled().await;
    assert_eq!(
        app.centercode.feedback().len(),
        2,
        "the ticket reached Centercode again"
    );
    let old = get(&app, &format!("/admin/jobs/{feedback}")).await;
    assert_eq!(old["outcome"], "resent");
    let reason = old["outcomes"][1]["reason"].as_str().unwrap().to_owned();
    let new_id = reason.strip_prefix("as job ").unwrap();
    let new = get(&app, &format!("/admin/jobs/{new_id}")).await;
    assert_eq!(
        (new["outcome"].as_str(), new["record_id"].as_str()),
        (Some("delivered"), Some("a0B8d00000AbCdEEAV"))
    );

    // A removal keeps no payload: refused, saying why.
    let (code, _, err) = relay(&app, &["jobs", "resend", &removal], "").await;
    assert_eq!(code, 2);
    assert!(
        err.contains("payload is not kept") && err.contains("keep_payload_days"),
        "{err}"
    );
    // A parked job is replayed, not resent.
    app.centercode.push_fault(Fault {
        status: 400,
        ..Fault::default()
    });
    let again = String::from_utf8(fixture("om_contact_gdpr_removal_single.xml"))
        .unwrap()
        .replace("04l8d0000100001AAA", "04l8d0000100007AAA");
    app.post_outbound("gdpr", again.into_bytes()).await;
    app.deliver_until_settled().await;
    let parked = id_of(&get(&app, "/admin/jobs?outcome=parked").await);
    let (code, _, err) = relay(&app, &["jobs", "resend", &parked], "").await;
    assert_eq!(code, 2);
    assert!(err.contains("parked") && err.contains("replay"), "{err}");
    let (code, _, _) = relay(&app, &["jobs", "resend", "no-such-job"], "").await;
    assert_eq!(code, 3);
}

#[tokio::test]
async fn with_the_ledger_off_nothing_is_recorded_and_trace_says_so() {
    let app = spawn_app_with(|s| {
        s.admin.token = Some(ADMIN.to_owned().into());
        s.ledger.enabled = false;
    })
    .await;
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    assert_eq!(app.deliver_until_settled().await.len(), 1);
    let (code, _, err) = relay(&app, &["trace", "--record-id", "0038d0000000041AAA"], "").await;
    assert_eq!(code, 1);
    assert!(err.contains("ledger.enabled = false"), "{err}");
    let rows: i64 = rusqlite::Connection::open(&app.settings.queue.path)
        .unwrap()
        .query_row("SELECT count(*) FROM ledger_jobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
    assert!(
        !sf_centercode_relay::ledger::generated_key_file(&app.settings).exists(),
        "no key generated for a ledger that is off"
    );
}

#[tokio::test]
async fn a_development_relay_generates_its_subject_key_once_beside_the_queue_file_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let app = spawn_app_with(|s| s.admin.token = Some(ADMIN.to_owned().into())).await;
    let file = sf_centercode_relay::ledger::generated_key_file(&app.settings);
    let key = std::fs::read_to_string(&file).unwrap();
    assert!(key.trim().len() >= 32, "{key}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.deliver_until_settled().await;
    let res = app
        .client
        .post(format!("{}/admin/jobs/search", app.address))
        .bearer_auth(ADMIN)
        .json(&json!({ "email": "marta.kowalska@example.org" }))
        .send()
        .await
        .unwrap();
    let found: Value = res.json().await.unwrap();
    assert_eq!(found["jobs"][0]["record_id"], "0038d0000000041AAA");
    // The same key on the next start (entries stay findable), and the CLI finds it too.
    use secrecy::ExposeSecret;
    let mut settings = (*app.settings).clone();
    settings.ledger.subject_key = String::new().into();
    sf_centercode_relay::ledger::ensure_subject_key(&mut settings).unwrap();
    assert_eq!(settings.ledger.subject_key.expose_secret(), key.trim());
    // Both ledger metrics are exported.
    let metrics = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("relay_ledger_write_seconds_count"),
        "{metrics}"
    );
    // Housekeeping reports the oldest entry's age at start and every minute after.
    let age = metrics
        .lines()
        .find_map(|l| l.strip_prefix("relay_ledger_oldest_entry_age_seconds "))
        .unwrap_or_else(|| panic!("no oldest-entry age in {metrics}"));
    let age: f64 = age.trim().parse().unwrap();
    assert!((0.0..3600.0).contains(&age), "{age}");
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
    let id_of = |v: &Value| v["jobs"][0]["id"].as_str().unwrap().to_owned();
    let fb = id_of(&get(&app, "/admin/jobs?route=feedback").await);
    assert_eq!(
        get(&app, &format!("/admin/jobs/{fb}")).await["payload_kept"],
        true
    );
    let kept: String = rusqlite::Connection::open(&app.settings.queue.path)
        .unwrap()
        .query_row("SELECT payload FROM ledger_payloads", [], |r| r.get(0))
        .unwrap();
    assert!(kept.contains("Folder rename reverted after sync"), "{kept}");
    let removal = id_of(&get(&app, "/admin/jobs?route=gdpr").await);
    assert_eq!(
        get(&app, &format!("/admin/jobs/{removal}")).await["payload_kept"],
        false,
        "removals keep nothing"
    );

    // Once expired, retention removes it from the ledger and the file.
    let db = app.settings.queue.path.clone();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("UPDATE ledger_payloads SET expires_at = 1", [])
        .unwrap();
    app.queue.ledger_purge_before(0).await.unwrap();
    assert_eq!(
        get(&app, &format!("/admin/jobs/{fb}")).await["payload_kept"],
        false
    );
    let mut bytes = std::fs::read(&db).unwrap();
    bytes.extend(std::fs::read(db.with_extension("db-wal")).unwrap_or_default());
    let needle = b"Folder rename reverted after sync";
    assert!(!bytes.windows(needle.len()).any(|w| w == needle));
}

/// A RabbitMQ relay records a job in PostgreSQL when a worker first takes it, unless
/// `ledger.record_on_store` is on; until then an empty answer says how many jobs wait.
async fn rabbitmq_relay_with_ledger(record_on_store: bool) -> (TestApp, String) {
    let pg = tokio::task::spawn_blocking(|| crate::services::postgres().url.clone())
        .await
        .unwrap();
    let url = pg.clone();
    let app = crate::helpers::spawn_app_on(crate::helpers::Backend::Rabbitmq, move |s| {
        s.admin.token = Some(ADMIN.to_owned().into());
        s.ledger.subject_key = SUBJECT_KEY.to_owned().into();
        s.ledger.url = Some(url.into());
        s.ledger.schema = format!("{}_store", s.queue.prefix);
        s.ledger.record_on_store = record_on_store;
    })
    .await;
    (app, pg)
}

async fn drop_schema(pg: &str, schema: &str) {
    let _ = tokio::process::Command::new(
        crate::services::find_program("psql", "postgresql-client").unwrap(),
    )
    .arg(pg)
    .args(["-c", &format!("DROP SCHEMA \"{schema}\" CASCADE")])
    .output()
    .await;
}

#[tokio::test]
async fn on_rabbitmq_a_job_waiting_in_the_broker_is_counted_and_with_record_on_store_traced() {
    // Default: not in the ledger before a worker takes it, and the answer says one waits.
    let (app, pg) = rabbitmq_relay_with_ledger(false).await;
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    let page = get(&app, "/admin/jobs?record_id=0038d0000000041AAA").await;
    assert_eq!(page["jobs"], json!([]));
    assert_eq!(page["not_yet_recorded"], 1, "{page}");
    let (code, _, err) = relay(&app, &["trace", "--record-id", "0038d0000000041AAA"], "").await;
    assert_eq!(code, 3);
    assert!(err.contains("1 job(s) wait in the queue"), "{err}");
    app.deliver_until_settled().await;
    let page = get(&app, "/admin/jobs?record_id=0038d0000000041AAA").await;
    assert_eq!(page["jobs"][0]["outcome"], "delivered", "{page}");
    drop_schema(&pg, &app.settings.ledger.schema).await;
    // One RabbitMQ environment at a time per test: the next one waits for this one's lock.
    drop(app);

    // record_on_store: pending from the moment it is stored (the note is not awaited by the
    // ack, so poll for it with a deadline).
    let (app, pg) = rabbitmq_relay_with_ledger(true).await;
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let page = get(&app, "/admin/jobs?record_id=0038d0000000041AAA").await;
        if page["jobs"][0]["outcome"] == "pending" {
            assert!(page.get("not_yet_recorded").is_none(), "{page}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never recorded: {page}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await; // poll with deadline
    }
    drop_schema(&pg, &app.settings.ledger.schema).await;
}

#[tokio::test]
async fn on_rabbitmq_the_ledger_connects_again_after_postgresql_drops_its_connections() {
    // Arrange: a RabbitMQ relay whose ledger connections carry a name of this test, and one
    // removal delivered and recorded.
    let name = format!("relay-test-{}", uuid::Uuid::new_v4().simple());
    // Dropped (with the schema) at the end, even when the test fails.
    let schema = crate::ledger_conformance::PgSchema::new(&format!("{name}_ledger")).await;
    let (url, schema_name) = (
        format!("{}?application_name={name}", schema.url),
        schema.name.clone(),
    );
    let app = crate::helpers::spawn_app_on(crate::helpers::Backend::Rabbitmq, move |s| {
        s.admin.token = Some(ADMIN.to_owned().into());
        s.ledger.subject_key = SUBJECT_KEY.to_owned().into();
        s.ledger.url = Some(url.into());
        s.ledger.schema = schema_name;
    })
    .await;
    app.post_outbound("gdpr", fixture(GDPR_REMOVAL)).await;
    app.deliver_until_settled().await;
    let page = get(&app, "/admin/jobs?record_id=0038d0000000041AAA").await;
    assert_eq!(page["jobs"][0]["outcome"], "delivered", "{page}");

    // Act: the database ends every connection of the relay (a restart or a failover does the
    // same), then more removals come.
    let ended = schema
        .count(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{name}'"
        ))
        .await;
    assert!(ended >= 3, "writer and readers: {ended}");
    app.post_outbound("gdpr", fixture("om_contact_batch_4.xml"))
        .await;

    // Assert: they are delivered, leave the queue (their outcomes written through a new
    // connection), and queries answer again.
    let outcomes = app.deliver_until_settled().await;
    assert!(
        outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Delivered { .. } | Outcome::UserNotFound))
            .count()
            >= 4,
        "{outcomes:?}"
    );
    let jobs = get(&app, "/admin/jobs?route=gdpr").await;
    let delivered = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["outcome"] == "delivered" || j["outcome"] == "user_not_found")
        .count();
    assert_eq!(delivered, 5, "{jobs}");
}
