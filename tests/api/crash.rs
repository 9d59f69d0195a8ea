//! A real `relay serve` process killed with SIGKILL mid-load loses nothing it acknowledged.

use crate::helpers::{finds, fixture, missing_finds, spawn_relay, write_relay_config, RabbitEnv};
use fake_centercode::{FakeCentercode, FakeConfig};
use std::collections::HashSet;
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

#[tokio::test]
async fn a_sigkilled_relay_loses_nothing_it_acknowledged() {
    sigkill_ten_times("embedded", "", None).await;
}

#[tokio::test]
async fn a_sigkilled_relay_on_rabbitmq_loses_nothing_it_acknowledged() {
    let env = RabbitEnv::new().await;
    let queue = format!(
        "backend = \"rabbitmq\"\nurl = \"{}\"\nprefix = \"{}\"\nredis_url = \"{}\"\n",
        env.url, env.prefix, env.redis_url
    );
    sigkill_ten_times("rabbitmq", &queue, Some(env)).await;
}

/// Ten rounds of load on a child relay, each ended by SIGKILL at a different moment; then a
/// restart must deliver every acknowledged notification. `queue` is extra `[queue]` TOML.
async fn sigkill_ten_times(backend: &str, queue: &str, _env: Option<RabbitEnv>) {
    // Arrange: a fake Centercode and a config file for a child relay process.
    let centercode = FakeCentercode::start(FakeConfig::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_relay_config(
        dir.path(),
        &format!("[server]\nbind = \"127.0.0.1:0\"\nworkers = 2\n[queue]\nlease_secs = 3\n{queue}[worker]\nconcurrency = 4\nretry_schedule_secs = [0.05]\npoll_interval_ms = 50\n[centercode]\napi_key = \"test-key\"\ntimeout_ms = 2000\n"),
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
    let (expected, missing) =
        restart_and_count_missing(&config, &centercode, &acked, &scenario, 30).await;
    assert_eq!(
        missing, 0,
        "{missing} of {expected} acknowledged notifications never reached Centercode"
    );
    assert!(expected >= 100, "only {expected} acknowledged");
    if backend == "embedded" {
        every_job_that_left_the_queue_is_in_the_ledger(&dir.path().join("relay.db"), &acked);
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
    let (expected, missing) =
        restart_and_count_missing(&config, &centercode, &acked, "SIGTERM under load", 60).await;
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
/// notification to reach Centercode; prints the scenario's figures. Returns (acknowledged, lost).
async fn restart_and_count_missing(
    config: &std::path::Path,
    centercode: &FakeCentercode,
    acked: &Mutex<HashSet<u32>>,
    scenario: &str,
    secs: u64,
) -> (usize, usize) {
    let (mut child, address) = start_relay(config);
    let expected: HashSet<String> = acked
        .lock()
        .unwrap()
        .iter()
        .map(|n| format!("user{n}@example.com"))
        .collect();
    let missing = missing_finds(centercode, &expected, Duration::from_secs(secs)).await;
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
    (expected.len(), missing)
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
