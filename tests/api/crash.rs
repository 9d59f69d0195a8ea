//! A real `relay serve` process killed with SIGKILL mid-load loses nothing it acknowledged,
//! and its ledger shows each acknowledged notification's ending exactly once.

use crate::helpers::{finds, fixture, missing_finds, spawn_relay, write_relay_config, RabbitEnv};
use crate::ledger_conformance::PgSchema;
use fake_centercode::{FakeCentercode, FakeConfig};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn start_relay(config: &std::path::Path) -> (Child, String) {
    start_relay_as(config, "all")
}

fn start_relay_as(config: &std::path::Path, role: &str) -> (Child, String) {
    spawn_relay(config, &["serve", "--role", role], &[], Stdio::null())
}

fn message(template: &str, n: u32) -> String {
    template
        .replace("04l8d0000100001AAA", &format!("04l{n:015}"))
        .replace(
            "marta.kowalska@example.org",
            &format!("user{n}@example.com"),
        )
}

/// The admin token of the child relays, to read their ledger as an operator does.
const ADMIN: &str = "crash-admin-token-0123456789abcdef0123";

#[tokio::test]
async fn a_sigkilled_relay_loses_nothing_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = LedgerStore::QueueFile(dir.path().join("relay.db"));
    sigkill_ten_times(dir, "embedded", "", ledger, None).await;
}

#[tokio::test]
async fn a_sigkilled_relay_on_rabbitmq_loses_nothing_it_acknowledged() {
    let env = RabbitEnv::new().await;
    let queue = format!(
        "backend = \"rabbitmq\"\nurl = \"{}\"\nprefix = \"{}\"\nredis_url = \"{}\"\n",
        env.url, env.prefix, env.redis_url
    );
    // The ledger in PostgreSQL, in a schema of this test (dropped afterwards).
    let ledger = LedgerStore::Postgres(PgSchema::new(&env.prefix).await);
    let dir = tempfile::tempdir().unwrap();
    sigkill_ten_times(dir, "rabbitmq", &queue, ledger, Some(env)).await;
}

/// Where a child relay keeps its ledger, read beneath the relay for what is stored (a
/// reader shows each outcome once; a crash may have written it twice).
enum LedgerStore {
    /// The embedded queue's file.
    QueueFile(PathBuf),
    /// PostgreSQL (RabbitMQ backend).
    Postgres(PgSchema),
}

impl LedgerStore {
    /// `[ledger]` TOML for the child relay.
    fn toml(&self) -> String {
        match self {
            LedgerStore::QueueFile(_) => String::new(),
            LedgerStore::Postgres(schema) => format!(
                "[ledger]\nurl = \"{}\"\nschema = \"{}\"\n",
                schema.url, schema.name
            ),
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        match self {
            LedgerStore::QueueFile(db) => rusqlite::Connection::open(db)
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            LedgerStore::Postgres(schema) => schema.count(sql).await,
        }
    }

    /// Ending outcomes stored more than once for a job (rows beyond the first), and the
    /// jobs that have them: what crashes between the ledger write and the ack wrote.
    async fn duplicate_endings(&self) -> (i64, i64) {
        let ending = format!(
            "outcome IN ({})",
            sf_centercode_relay::ledger::ENDING_OUTCOMES
                .map(|o| format!("'{o}'"))
                .join(", ")
        );
        let rows = self
            .count(&format!(
                "SELECT count(*) - count(DISTINCT job_id) FROM ledger_outcomes WHERE {ending}"
            ))
            .await;
        let jobs = self
            .count(&format!(
                "SELECT count(*) FROM (SELECT job_id FROM ledger_outcomes WHERE {ending}
                 GROUP BY job_id HAVING count(*) > 1) AS twice"
            ))
            .await;
        (rows, jobs)
    }
}

/// Ten rounds of load on a child relay, each ended by SIGKILL at a different moment; then a
/// restart must deliver every acknowledged notification, and its ledger must show each one's
/// ending exactly once. `queue` is extra `[queue]` TOML; the queue file lives in `dir`.
async fn sigkill_ten_times(
    dir: tempfile::TempDir,
    backend: &str,
    queue: &str,
    ledger: LedgerStore,
    _env: Option<RabbitEnv>,
) {
    // Arrange: a fake Centercode and a config file for a child relay process.
    let centercode = FakeCentercode::start(FakeConfig::demo()).await.unwrap();
    let config = write_relay_config(
        dir.path(),
        &format!("[server]\nbind = \"127.0.0.1:0\"\nworkers = 2\n[queue]\nlease_secs = 3\n{queue}[worker]\nconcurrency = 4\nretry_schedule_secs = [0.05]\npoll_interval_ms = 50\n[centercode]\napi_key = \"test-key\"\ntimeout_ms = 2000\n[admin]\ntoken = \"{ADMIN}\"\n{}", ledger.toml()),
        &centercode.base_url(),
    );
    let template = String::from_utf8(fixture("om_contact_gdpr_removal_single.xml")).unwrap();
    let acked: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let client = reqwest::Client::new();
    let mut next = 0u32;

    // Act: ten rounds of load, each ended by SIGKILL once some messages were acknowledged.
    for round in 0..10u32 {
        let (mut child, address) = start_relay(&config);
        // A different moment each round: after 5 to 60 more acknowledgements.
        let stop_after = acked.lock().unwrap().len() + 5 + (round as usize * 37) % 56;
        let mut senders = Vec::new();
        for s in 0..4u32 {
            let (client, address, template, acked) = (
                client.clone(),
                address.clone(),
                template.clone(),
                acked.clone(),
            );
            let first = next + s * 10_000;
            senders.push(tokio::spawn(async move {
                for n in first.. {
                    let r = client
                        .post(format!("{address}/salesforce/outbound/gdpr"))
                        .header("Content-Type", "text/xml; charset=utf-8")
                        .body(message(&template, n))
                        .send()
                        .await;
                    let ok = match r {
                        Ok(r) if r.status() == 200 => {
                            r.text().await.is_ok_and(|t| t.contains("<Ack>true</Ack>"))
                        }
                        _ => false,
                    };
                    if !ok {
                        break; // the process is gone
                    }
                    acked.lock().unwrap().insert(n);
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.lock().unwrap().len() < stop_after {
            assert!(Instant::now() < deadline, "load did not progress");
            tokio::time::sleep(Duration::from_millis(5)).await; // poll with deadline
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        for s in senders {
            s.await.unwrap();
        }
        next += 40_000;
    }

    // Assert: after a restart every acknowledged notification reaches Centercode.
    let scenario = format!("SIGKILL x10 under load ({backend})");
    let (expected, missing, endings) =
        restart_and_count_missing(&config, &centercode, &acked, &scenario, 30, Some(&ledger)).await;
    assert_eq!(
        missing, 0,
        "{missing} of {expected} acknowledged notifications never reached Centercode"
    );
    assert!(expected >= 100, "only {expected} acknowledged");
    if let LedgerStore::QueueFile(db) = &ledger {
        every_job_that_left_the_queue_is_in_the_ledger(db, &acked);
    }
    // ...and the ledger, as a reader sees it, shows exactly one ending for each: a crash
    // between the ledger write and the ack may write it twice, never zero times.
    let endings = endings.expect("the ledger was read");
    assert_eq!(endings.len(), expected);
    let mut not_one: Vec<(&String, &usize)> = endings.iter().filter(|(_, n)| **n != 1).collect();
    not_one.sort();
    assert!(
        not_one.is_empty(),
        "{} of {expected} acknowledged notifications do not show exactly one ending outcome (notification, endings shown): {:?}",
        not_one.len(),
        not_one.iter().take(5).collect::<Vec<_>>()
    );
}

/// The ending outcomes (`ENDING_OUTCOMES`) the ledger shows for each acknowledged
/// notification, read from a running relay as an operator does (`GET /admin/jobs?
/// notification_id=…&history=true`, summed over its jobs); asked again, until `limit`, for
/// those that show none yet (their last outcome may still be on its way to the ledger).
async fn ending_outcomes_shown(
    address: &str,
    acked: &Mutex<HashSet<u32>>,
    limit: Duration,
) -> HashMap<String, usize> {
    use sf_centercode_relay::ledger::ENDING_OUTCOMES;
    let client = reqwest::Client::new();
    let endings_of = |id: String| {
        let client = client.clone();
        async move {
            let res = client
                .get(format!(
                    "{address}/admin/jobs?notification_id={id}&history=true"
                ))
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "the ledger of notification {id}");
            let page: serde_json::Value = res.json().await.unwrap();
            let n = page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|job| job["outcomes"].as_array().cloned().unwrap_or_default())
                .filter(|o| ENDING_OUTCOMES.contains(&o["outcome"].as_str().unwrap_or("")))
                .count();
            (id, n)
        }
    };
    let mut waiting: Vec<String> = acked
        .lock()
        .unwrap()
        .iter()
        .map(|n| format!("04l{n:015}"))
        .collect();
    let mut shown = HashMap::new();
    let deadline = Instant::now() + limit;
    loop {
        let mut none_yet = Vec::new();
        for chunk in waiting.chunks(32) {
            let answers =
                futures_util::future::join_all(chunk.iter().cloned().map(endings_of)).await;
            for (id, n) in answers {
                if n == 0 {
                    none_yet.push(id);
                } else {
                    shown.insert(id, n);
                }
            }
        }
        if none_yet.is_empty() || Instant::now() > deadline {
            shown.extend(none_yet.into_iter().map(|id| (id, 0)));
            return shown;
        }
        waiting = none_yet;
        tokio::time::sleep(Duration::from_millis(100)).await; // poll with deadline
    }
}

/// After SIGKILLs at every moment: each acknowledged notification is either still queued or
/// has a final outcome in the ledger (written before its job left the queue), never neither.
fn every_job_that_left_the_queue_is_in_the_ledger(
    db: &std::path::Path,
    acked: &Mutex<HashSet<u32>>,
) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let ids = |sql: &str| -> HashSet<String> {
        let mut stmt = conn.prepare(sql).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    let queued = ids("SELECT notification_id FROM jobs");
    let finished = ids(
        "SELECT j.notification_id FROM ledger_jobs j JOIN ledger_outcomes o ON o.job_id = j.job_id
         WHERE o.outcome IN ('delivered', 'user_not_found')",
    );
    let acked = acked.lock().unwrap();
    let unaccounted: Vec<String> = acked
        .iter()
        .map(|n| format!("04l{n:015}"))
        .filter(|id| !queued.contains(id) && !finished.contains(id))
        .collect();
    assert!(
        unaccounted.is_empty(),
        "{} of {} acknowledged notifications left the queue without a ledger outcome, e.g. {:?}",
        unaccounted.len(),
        acked.len(),
        unaccounted.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        finished.len() >= 100,
        "only {} outcomes in the ledger",
        finished.len()
    );
}

#[tokio::test]
async fn sigterm_under_load_drains_and_loses_nothing() {
    // Arrange: a slow Centercode (100 ms a call) so deliveries are in flight at SIGTERM, and
    // at most 400 messages so the drain after restart stays short.
    let mut fake = FakeConfig::demo();
    fake.latency.base_ms = 100;
    let centercode = FakeCentercode::start(fake).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_relay_config(
        dir.path(),
        "[server]\nbind = \"127.0.0.1:0\"\nworkers = 2\nshutdown_grace_secs = 5\n[queue]\nlease_secs = 3\n[worker]\nconcurrency = 8\npoll_interval_ms = 50\n[centercode]\napi_key = \"test-key\"\ntimeout_ms = 2000\n",
        &centercode.base_url(),
    );
    let template = String::from_utf8(fixture("om_contact_gdpr_removal_single.xml")).unwrap();
    let (mut child, address) = start_relay(&config);
    let client = reqwest::Client::new();
    let acked: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let mut senders = Vec::new();
    for s in 0..4u32 {
        let (client, address, template, acked) = (
            client.clone(),
            address.clone(),
            template.clone(),
            acked.clone(),
        );
        senders.push(tokio::spawn(async move {
            for n in (s * 100_000)..(s * 100_000 + 100) {
                let r = client
                    .post(format!("{address}/salesforce/outbound/gdpr"))
                    .header("Content-Type", "text/xml; charset=utf-8")
                    .body(message(&template, n))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        acked.lock().unwrap().insert(n);
                    }
                    _ => break, // refused: the relay is stopping
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 50 || centercode.requests().is_empty() {
        assert!(Instant::now() < deadline, "load did not progress");
        tokio::time::sleep(Duration::from_millis(5)).await; // poll with deadline
    }

    // Act: SIGTERM with requests and deliveries in flight.
    let stopping = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let took = stopping.elapsed();
    for s in senders {
        s.await.unwrap();
    }

    // Assert: a clean exit within the grace period, and after a restart everything acknowledged
    // reaches Centercode (what was in flight at exit is leased again).
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_secs(7),
        "took {took:?} to stop with a 5 s grace period"
    );
    let (expected, missing, _) =
        restart_and_count_missing(&config, &centercode, &acked, "SIGTERM under load", 60, None)
            .await;
    assert_eq!(
        missing, 0,
        "{missing} of {expected} acknowledged notifications lost"
    );
}

#[tokio::test]
async fn a_gateway_process_stores_and_a_worker_process_delivers() {
    // Arrange: one gateway-only and one worker-only process on the same queue.
    let centercode = FakeCentercode::start(FakeConfig::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_relay_config(
        dir.path(),
        "[server]\nbind = \"127.0.0.1:0\"\nworkers = 1\n[queue]\n[worker]\npoll_interval_ms = 50\n[centercode]\napi_key = \"test-key\"\n",
        &centercode.base_url(),
    );
    let (mut gateway, gateway_url) = start_relay_as(&config, "gateway");
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{gateway_url}/salesforce/outbound/gdpr"))
        .header("Content-Type", "text/xml")
        .body(fixture("om_contact_batch_4.xml"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let metrics = client
        .get(format!("{gateway_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("relay_queue_depth{state=\"ready\"} 4"),
        "the gateway delivers nothing"
    );
    assert!(centercode.requests().is_empty());

    // Act: a worker-only process picks the jobs up.
    let (mut worker, worker_url) = start_relay_as(&config, "worker");
    let delivered = centercode
        .wait_for_requests(4, Duration::from_secs(20))
        .await;

    // Assert
    assert_eq!(delivered.len(), 4);
    let inbound = client
        .post(format!("{worker_url}/salesforce/outbound/gdpr"))
        .header("Content-Type", "text/xml")
        .body(fixture("om_contact_batch_4.xml"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        inbound.status(),
        404,
        "a worker process takes no Salesforce traffic"
    );
    let ready = client
        .get(format!("{worker_url}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    for child in [&mut gateway, &mut worker] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Restart the relay on the same store and wait (up to `secs`) for every acknowledged
/// notification to reach Centercode; with `ledger`, also read (up to `secs` more) the ending
/// outcomes its ledger shows for each; prints the scenario's figures. Returns (acknowledged,
/// lost, endings shown per acknowledged notification).
async fn restart_and_count_missing(
    config: &std::path::Path,
    centercode: &FakeCentercode,
    acked: &Mutex<HashSet<u32>>,
    scenario: &str,
    secs: u64,
    ledger: Option<&LedgerStore>,
) -> (usize, usize, Option<HashMap<String, usize>>) {
    let (mut child, address) = start_relay(config);
    let expected: HashSet<String> = acked
        .lock()
        .unwrap()
        .iter()
        .map(|n| format!("user{n}@example.com"))
        .collect();
    let missing = missing_finds(centercode, &expected, Duration::from_secs(secs)).await;
    let endings = match ledger {
        Some(_) => Some(ending_outcomes_shown(&address, acked, Duration::from_secs(secs)).await),
        None => None,
    };
    // Parked jobs as the restarted relay itself reports them, not assumed.
    let metrics = reqwest::get(format!("{address}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let parked = crate::admin::series(&metrics, r#"relay_queue_depth{state="parked"}"#) as u64;
    child.kill().unwrap();
    child.wait().unwrap();
    report(scenario, expected.len(), centercode, parked, missing);
    if let (Some(ledger), Some(endings)) = (ledger, &endings) {
        let (rows, jobs) = ledger.duplicate_endings().await;
        let exactly_one = endings.values().filter(|n| **n == 1).count();
        eprintln!(
            "fault scenario `{scenario}`: ledger shows exactly one ending for {exactly_one} of {} acknowledged notifications; {rows} duplicate ending-outcome rows stored for {jobs} jobs (written twice by a crash between the ledger write and the ack, shown once)",
            endings.len()
        );
    }
    (expected.len(), missing, endings)
}

/// One line of figures per fault scenario (shown with `--nocapture`; quoted in release notes).
fn report(
    scenario: &str,
    acknowledged: usize,
    centercode: &FakeCentercode,
    parked: u64,
    lost: usize,
) {
    let finds = finds(centercode);
    let unique: HashSet<&String> = finds.iter().collect();
    eprintln!(
        "fault scenario `{scenario}`: {acknowledged} acknowledged, {} delivered, {parked} parked, {lost} lost, {} duplicate deliveries",
        unique.len(),
        finds.len() - unique.len()
    );
}
