//! Scale-out: replaying one route of a large parked queue leaves every other parked job in
//! place (on both backends), and two gateway plus two worker processes on one RabbitMQ broker
//! deliver every notification exactly once and share the work.

use crate::admin::series;
use crate::helpers::{finds, fixture, routes_toml, spawn_app_on, Backend, RabbitEnv, TestApp};
use fake_centercode::{FakeCentercode, FakeConfig, Fault};
use serde_json::{json, Value};
use sf_centercode_relay::worker::Outcome;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "scale-out-admin-token-0123456789abcdef";

/// `04l` + 15 digits: a valid, unique Salesforce notification id for `n`.
fn notification_id(n: u32) -> String {
    format!("04l{n:015}")
}

fn email(n: u32) -> String {
    format!("user{n}@example.com")
}

/// One Outbound Message with a notification per `n`, each made from the single notification
/// of the fixture by `edit`.
fn outbound_message(fixture_name: &str, ns: &[u32], edit: impl Fn(&str, u32) -> String) -> String {
    let template = String::from_utf8(fixture(fixture_name)).unwrap();
    let start = template.find("<Notification>").expect("a notification");
    let end = template.find("</Notification>").expect("its end") + "</Notification>".len();
    let notifications: Vec<String> = ns.iter().map(|&n| edit(&template[start..end], n)).collect();
    format!(
        "{}{}{}",
        &template[..start],
        notifications.join("\n   "),
        &template[end..]
    )
}

/// Removal requests for `user{n}@example.com`, notification id `04l{n}`.
fn removals(ns: &[u32]) -> String {
    outbound_message("om_contact_gdpr_removal_single.xml", ns, |block, n| {
        block
            .replace("04l8d0000100001AAA", &notification_id(n))
            .replace("marta.kowalska@example.org", &email(n))
    })
}

/// Feedback records `a0B{n}`, notification id `04l{n}`.
fn feedback(ns: &[u32]) -> String {
    outbound_message("om_feedback_custom_object.xml", ns, |block, n| {
        block
            .replace("04l8d0000100030AAA", &notification_id(n))
            .replace("a0B8d00000AbCdEEAV", &format!("a0B{n:015}"))
    })
}

// ---- Replaying one route of 1,000 parked jobs ---------------------------------------------

async fn admin(app: &TestApp, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut req = app
        .client
        .request(method, format!("{}{path}", app.address))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// Every parked job of `route` (all pages): job id → notification id. Panics on a job listed
/// twice or listed under another route.
async fn parked_of(app: &TestApp, route: &str) -> BTreeMap<String, String> {
    let mut jobs = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/admin/parked?route={route}&limit=1000");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = admin(app, reqwest::Method::GET, &path, None).await;
        for job in page["jobs"].as_array().unwrap() {
            assert_eq!(job["route"], route, "{job}");
            let id = job["id"].as_str().unwrap().to_owned();
            let nid = job["notification_id"].as_str().unwrap().to_owned();
            assert!(jobs.insert(id, nid).is_none(), "{job} listed twice");
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return jobs,
        }
    }
}

fn notification_ids(ns: &[u32]) -> BTreeSet<String> {
    ns.iter().map(|&n| notification_id(n)).collect()
}

async fn replaying_one_route_leaves_the_other_routes_jobs_parked(backend: Backend) {
    // Arrange: Centercode refuses (400) 1,000 deliveries: 500 removals, 500 feedback, all parked.
    let app = spawn_app_on(backend, |s| {
        s.admin.token = Some(ADMIN_TOKEN.to_owned().into());
        s.worker.concurrency = 64;
    })
    .await;
    let (removal_ns, feedback_ns): (Vec<u32>, Vec<u32>) =
        ((0..500).collect(), (500..1000).collect());
    app.centercode.push_fault(Fault {
        status: 400,
        times: 1000,
        ..Fault::default()
    });
    for (route, chunk) in removal_ns
        .chunks(100)
        .map(|c| ("gdpr", removals(c)))
        .chain(feedback_ns.chunks(100).map(|c| ("feedback", feedback(c))))
    {
        let r = app.post_outbound(route, chunk.into_bytes()).await;
        assert_eq!(r.status(), 200, "{route}: {}", r.text().await.unwrap());
    }
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes.len(), 1000);
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            Outcome::Parked {
                status: Some(400),
                ..
            }
        )),
        "every delivery was refused and parked"
    );
    assert_eq!(app.stats().await.parked, 1000);
    let gdpr_parked = parked_of(&app, "gdpr").await;
    let feedback_parked = parked_of(&app, "feedback").await;
    assert_eq!(
        gdpr_parked.values().cloned().collect::<BTreeSet<_>>(),
        notification_ids(&removal_ns)
    );
    assert_eq!(
        feedback_parked.values().cloned().collect::<BTreeSet<_>>(),
        notification_ids(&feedback_ns)
    );

    // Act: replay only the removals.
    let replay = admin(
        &app,
        reqwest::Method::POST,
        "/admin/parked/replay",
        Some(json!({"route": "gdpr"})),
    )
    .await;

    // Assert: 500 moved; the feedback jobs are all still parked, the same job ids.
    assert_eq!(replay["matched"], 500, "{replay}");
    assert_eq!(replay["moved"], 500, "{replay}");
    assert_eq!(
        parked_of(&app, "feedback").await,
        feedback_parked,
        "the other route's parked jobs are exactly those parked before"
    );
    assert!(
        parked_of(&app, "gdpr").await.is_empty(),
        "no removal is left parked"
    );
    let dry = admin(
        &app,
        reqwest::Method::POST,
        "/admin/parked/replay",
        Some(json!({"route": "gdpr", "dry_run": true})),
    )
    .await;
    assert_eq!(dry["matched"], 0, "{dry}");
    // The replayed jobs are back in the work queue (RabbitMQ may already have pushed some to
    // this process's consumer: in flight, not yet leased).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = app.stats().await;
        if s.parked == 500 && s.retrying == 0 && s.ready + s.in_flight == 500 {
            break;
        }
        assert!(Instant::now() < deadline, "after the replay: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll with deadline
    }
    // The fault is used up: each replayed removal reaches Centercode once (unknown user: 404,
    // done), and no feedback is sent.
    assert_eq!(app.centercode.requests().len(), 1000);
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes.len(), 500);
    assert!(
        outcomes.iter().all(|o| *o == Outcome::UserNotFound),
        "{outcomes:?}"
    );
    let requests = app.centercode.requests();
    assert_eq!(requests.len(), 1500, "only the replayed removals were sent");
    let sent: Vec<String> = requests[1000..]
        .iter()
        .filter_map(|r| r.query.get("find").and_then(|v| v.as_str()))
        .map(str::to_owned)
        .collect();
    let expected: BTreeSet<String> = removal_ns.iter().map(|&n| email(n)).collect();
    assert!(
        sent.len() == expected.len() && sent.iter().cloned().collect::<BTreeSet<_>>() == expected,
        "every replayed removal delivered exactly once: {} requests for {} of {} e-mails",
        sent.len(),
        sent.iter().filter(|e| expected.contains(*e)).count(),
        expected.len()
    );
    assert_eq!(app.stats().await.parked, 500);
    assert_eq!(parked_of(&app, "feedback").await, feedback_parked);
}

#[tokio::test]
async fn rabbitmq_replaying_one_route_of_1000_parked_jobs_leaves_the_other_routes_jobs_parked() {
    replaying_one_route_leaves_the_other_routes_jobs_parked(Backend::Rabbitmq).await;
}

#[tokio::test]
async fn embedded_replaying_one_route_of_1000_parked_jobs_leaves_the_other_routes_jobs_parked() {
    replaying_one_route_leaves_the_other_routes_jobs_parked(Backend::Embedded).await;
}

// ---- Two gateways and two workers on one broker -------------------------------------------

/// The child `relay serve` processes of a test: killed when dropped (also when the test
/// fails, then their logs are printed).
#[derive(Default)]
struct Processes {
    children: Vec<(String, Child, PathBuf)>,
}

impl Processes {
    /// Start `relay serve --role ROLE` and return its base URL.
    fn start(&mut self, config: &Path, dir: &Path, role: &str) -> String {
        let name = format!("{role}-{}", self.children.len());
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args([
                "--config",
                config.to_str().unwrap(),
                "serve",
                "--role",
                role,
            ])
            .env("RELAY_CONFIG_DIR", dir.join("no-config"))
            .env_remove("RELAY_ENV")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start relay");
        let stdout = child.stdout.take().unwrap();
        self.children.push((name, child, log));
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line.trim()
            .strip_prefix("relay listening on ")
            .unwrap_or_else(|| panic!("{role}: unexpected first line {line:?}"))
            .to_owned()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (name, child, log) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                eprintln!("--- {name} (last lines of its log) ---");
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Post until acknowledged, as Salesforce does (a 503 is retried); returns the refusals.
async fn send_until_acked(client: &reqwest::Client, url: &str, body: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    loop {
        let r = client
            .post(url)
            .header("Content-Type", "text/xml; charset=utf-8")
            .body(body.to_owned())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        if status == 200 {
            assert!(text.contains("<Ack>true</Ack>"), "{url}: {text}");
            return refused;
        }
        assert_eq!(status, 503, "{url}: {text}");
        refused += 1;
        assert!(Instant::now() < deadline, "{url} kept answering 503");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
}

/// The `/metrics` text of the relay at `base` (a child process, not a [`crate::helpers::TestApp`]).
pub(crate) async fn metrics_of(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Removals a worker finished (Centercode answered: done, or 404 user not found).
fn finished(metrics: &str) -> f64 {
    ["done", "user_not_found"]
        .iter()
        .map(|o| {
            series(
                metrics,
                &format!(
                    r#"relay_deliveries_total{{route="gdpr",action="remove_user",outcome="{o}"}}"#
                ),
            )
        })
        .sum()
}

/// Wait until `n` consumers are on the work queue of `env`'s prefix (a passive declare
/// reports them), so the broker shares the work from the first message on.
async fn wait_for_consumers(env: &RabbitEnv, n: u32) {
    let conn = lapin::Connection::connect(&env.url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = conn.create_channel().await.unwrap();
    let work = format!("{}.work", env.prefix);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let q = channel
            .queue_declare(
                &work,
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("the workers declared the work queue");
        if q.consumer_count() >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} workers consume {work}",
            q.consumer_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll with deadline
    }
    let _ = conn.close(200, "consumers counted").await;
}

/// One config file for every `relay serve` process of a test on `env`'s broker prefix;
/// `extra` is appended (more sections).
fn rabbit_config(env: &RabbitEnv, centercode: &FakeCentercode, dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
bind = "127.0.0.1:0"
workers = 1
[queue]
backend = "rabbitmq"
url = "{url}"
prefix = "{prefix}"
redis_url = "{redis}"
dedupe_ttl_secs = 600
lease_secs = 30
[worker]
concurrency = 16
retry_schedule_secs = [0.2, 0.2]
poll_interval_ms = 50
[centercode]
api_key = "test-key"
timeout_ms = 5000
{extra}
{routes}"#,
            url = env.url,
            prefix = env.prefix,
            redis = env.redis_url,
            routes = routes_toml(&centercode.base_url()),
        ),
    )
    .unwrap();
    config
}

const MESSAGES: u32 = 300;
const PER_MESSAGE: u32 = 10;
const SENDERS: usize = 8;

#[tokio::test]
async fn two_gateways_and_two_workers_deliver_every_notification_once_and_share_the_work() {
    // Arrange: a broker prefix of this test (queues and Redis keys deleted at the end, after
    // the processes are killed: `procs` is dropped first), the fake Centercode, and one
    // config file for four `relay serve` processes.
    let env = RabbitEnv::new().await;
    let centercode = FakeCentercode::start(FakeConfig::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("no-config")).unwrap();
    let config = rabbit_config(&env, &centercode, dir.path(), "");
    let mut procs = Processes::default();
    let workers = [
        procs.start(&config, dir.path(), "worker"),
        procs.start(&config, dir.path(), "worker"),
    ];
    let gateways = [
        procs.start(&config, dir.path(), "gateway"),
        procs.start(&config, dir.path(), "gateway"),
    ];
    wait_for_consumers(&env, 2).await;
    let client = reqwest::Client::new();

    // Act: 300 messages of 10 notifications, alternating between the gateways, 8 at a time;
    // every fifth message is then sent again to the other gateway (a redelivery).
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicU32::new(0));
    let redelivered = Arc::new(AtomicU32::new(0));
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (client, gateways, next, refused, redelivered) = (
            client.clone(),
            gateways.clone(),
            next.clone(),
            refused.clone(),
            redelivered.clone(),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let m = next.fetch_add(1, Ordering::Relaxed) as u32;
                if m >= MESSAGES {
                    return;
                }
                let ns: Vec<u32> = (m * PER_MESSAGE..(m + 1) * PER_MESSAGE).collect();
                let body = removals(&ns);
                let url = |g: u32| format!("{}/salesforce/outbound/gdpr", gateways[g as usize]);
                let first = send_until_acked(&client, &url(m % 2), &body).await;
                refused.fetch_add(first, Ordering::Relaxed);
                if m % 5 == 3 {
                    // Stored and acknowledged by one gateway; the other must see the key.
                    let again = send_until_acked(&client, &url((m + 1) % 2), &body).await;
                    refused.fetch_add(again, Ordering::Relaxed);
                    redelivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let sent_in = started.elapsed();
    let expected: BTreeSet<String> = (0..MESSAGES * PER_MESSAGE).map(email).collect();
    // poll with deadline: until Centercode has seen every e-mail and both workers have
    // recorded every delivery (the counters move after the ack).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let seen: BTreeSet<String> = finds(&centercode).into_iter().collect();
        let mut recorded = 0.0;
        for w in &workers {
            recorded += finished(&metrics_of(&client, w).await);
        }
        if seen.is_superset(&expected) && recorded >= expected.len() as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 40 s: {} of {} e-mails reached Centercode, {recorded} deliveries recorded",
            seen.intersection(&expected).count(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // poll with deadline
    }
    let delivered_in = started.elapsed();

    // Assert: each e-mail requested exactly once, nothing else requested.
    let mut per_email: HashMap<String, u32> = HashMap::new();
    for e in finds(&centercode) {
        *per_email.entry(e).or_default() += 1;
    }
    let twice: Vec<(&String, &u32)> = per_email.iter().filter(|(_, &c)| c > 1).collect();
    assert!(
        twice.is_empty(),
        "{} e-mails requested more than once, e.g. {:?}",
        twice.len(),
        twice.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(
        per_email.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "exactly the e-mails sent"
    );
    assert_eq!(centercode.requests().len(), expected.len());
    // Both gateways stored half; the redeliveries were acknowledged as duplicates.
    assert_eq!(redelivered.load(Ordering::Relaxed), MESSAGES / 5);
    for g in &gateways {
        let m = metrics_of(&client, g).await;
        assert_eq!(
            series(&m, r#"relay_ingest_notifications_total{route="gdpr"}"#),
            f64::from(MESSAGES * PER_MESSAGE / 2),
            "{g} stored its half"
        );
        assert!(
            series(
                &m,
                r#"relay_ingest_requests_total{route="gdpr",outcome="duplicate"}"#
            ) >= f64::from(MESSAGES / 10),
            "{g} acknowledged the other gateway's messages as duplicates"
        );
        for state in ["ready", "retrying", "parked"] {
            let depth = series(&m, &format!(r#"relay_queue_depth{{state="{state}"}}"#));
            assert_eq!(depth, 0.0, "{state} jobs left");
        }
    }
    // Both workers took a share, and together delivered each notification once.
    let mut shares = Vec::new();
    for w in &workers {
        let m = metrics_of(&client, w).await;
        for outcome in ["retried", "parked", "held"] {
            let n = series(
                &m,
                &format!(
                    r#"relay_deliveries_total{{route="gdpr",action="remove_user",outcome="{outcome}"}}"#
                ),
            );
            assert_eq!(n, 0.0, "{w}: {outcome} deliveries in a fault-free run");
        }
        shares.push(finished(&m));
    }
    let total = f64::from(MESSAGES * PER_MESSAGE);
    eprintln!(
        "scale-out: {} notifications sent in {sent_in:?} ({} refusals retried), delivered by \
         {delivered_in:?}; worker shares {shares:?}",
        expected.len(),
        refused.load(Ordering::Relaxed)
    );
    assert_eq!(shares.iter().sum::<f64>(), total);
    for (w, share) in workers.iter().zip(&shares) {
        assert!(
            *share >= total / 10.0,
            "{w} delivered only {share} of {total}"
        );
    }
    drop(procs);
    drop(env);
}

// ---- Pause and resume shared by every process ----------------------------------------------

async fn admin_call(
    client: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
) -> Value {
    let res = client
        .request(method, format!("{base}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "{base}{path}: {body}");
    body
}

/// Wait until `/admin/routes` on `base` shows `route` with the shared state `paused` and
/// `processes` live processes that all believe it; returns that route's entry.
async fn until_every_process_believes(
    client: &reqwest::Client,
    base: &str,
    route: &str,
    paused: bool,
    processes: usize,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let routes = admin_call(client, base, reqwest::Method::GET, "/admin/routes").await;
        let entry = routes["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == route)
            .unwrap()
            .clone();
        let believers = entry["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["paused"] == paused)
            .count();
        if entry["paused"] == paused && believers == processes {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "not every process believes paused={paused}: {entry}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
}

/// Wait until the fake Centercode has received feedback `a0B{n}` (the canary: another route
/// keeps flowing, so the workers are running while the paused route stays untouched).
async fn until_feedback_arrives(centercode: &FakeCentercode, n: u32) {
    let id = format!("a0B{n:015}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !centercode
        .requests()
        .iter()
        .any(|r| r.body_text.contains(&id))
    {
        assert!(
            Instant::now() < deadline,
            "feedback {id} never reached Centercode"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
}

/// Wait until every e-mail of `ns` reached Centercode with a 2xx/404 answer.
async fn until_removed(centercode: &FakeCentercode, ns: std::ops::Range<u32>) {
    let expected: BTreeSet<String> = ns.map(email).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done: BTreeSet<String> = centercode
            .requests()
            .iter()
            .filter(|r| r.status != 401)
            .filter_map(|r| {
                r.query
                    .get("find")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .collect();
        if done.is_superset(&expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} removals delivered",
            expected.intersection(&done).count(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
}

fn removals_sent(centercode: &FakeCentercode, ns: std::ops::Range<u32>) -> usize {
    let wanted: BTreeSet<String> = ns.map(email).collect();
    finds(centercode)
        .iter()
        .filter(|e| wanted.contains(*e))
        .count()
}

#[tokio::test]
async fn a_pause_through_one_gateway_holds_the_route_in_every_worker_and_resume_restarts_both() {
    // Arrange: two gateways and two workers on one broker prefix and one Redis.
    let env = RabbitEnv::new().await;
    let centercode = FakeCentercode::start(FakeConfig::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("no-config")).unwrap();
    let config = rabbit_config(
        &env,
        &centercode,
        dir.path(),
        &format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n[control]\nrefresh_ms = 200\n"),
    );
    let mut procs = Processes::default();
    for _ in 0..2 {
        procs.start(&config, dir.path(), "worker");
    }
    let gateways = [
        procs.start(&config, dir.path(), "gateway"),
        procs.start(&config, dir.path(), "gateway"),
    ];
    wait_for_consumers(&env, 2).await;
    let client = reqwest::Client::new();
    let post = |g: usize, route: &str, body: String| {
        let url = format!("{}/salesforce/outbound/{route}", gateways[g]);
        let client = client.clone();
        async move { send_until_acked(&client, &url, &body).await }
    };

    // Act 1: pause through gateway 0; every process, workers included, follows.
    admin_call(
        &client,
        &gateways[0],
        reqwest::Method::POST,
        "/admin/routes/gdpr/pause",
    )
    .await;
    let entry = until_every_process_believes(&client, &gateways[1], "gdpr", true, 4).await;
    assert_eq!(entry["changed_by"], "admin");
    let roles: BTreeSet<String> = entry["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["role"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        roles,
        BTreeSet::from(["gateway".to_owned(), "worker".to_owned()])
    );
    post(1, "gdpr", removals(&(0..20).collect::<Vec<_>>())).await;
    post(1, "feedback", feedback(&[100])).await;
    until_feedback_arrives(&centercode, 100).await;
    // Assert 1: the other route flowed through the workers; the paused one did not.
    assert_eq!(
        removals_sent(&centercode, 0..20),
        0,
        "a paused route was delivered"
    );

    // Act 2: resume through gateway 1; both workers deliver what waited.
    admin_call(
        &client,
        &gateways[1],
        reqwest::Method::POST,
        "/admin/routes/gdpr/resume",
    )
    .await;
    until_removed(&centercode, 0..20).await;
    until_every_process_believes(&client, &gateways[0], "gdpr", false, 4).await;

    // Act 3: Centercode refuses the key once: the worker that met it pauses the route for all.
    centercode.push_fault(Fault {
        status: 401,
        times: 1,
        ..Fault::default()
    });
    post(0, "gdpr", removals(&[20])).await;
    let entry = until_every_process_believes(&client, &gateways[0], "gdpr", true, 4).await;
    assert!(
        entry["changed_by"]
            .as_str()
            .unwrap()
            .starts_with("auto: Centercode answered 401"),
        "{entry}"
    );
    post(0, "gdpr", removals(&(21..41).collect::<Vec<_>>())).await;
    post(0, "feedback", feedback(&[101])).await;
    until_feedback_arrives(&centercode, 101).await;
    // Assert 3: the other worker held the route too: only the refused request went out.
    assert_eq!(
        removals_sent(&centercode, 20..41),
        1,
        "only the 401 request"
    );

    // Act 4: resume through gateway 0: both workers start again and deliver everything.
    admin_call(
        &client,
        &gateways[0],
        reqwest::Method::POST,
        "/admin/routes/gdpr/resume",
    )
    .await;
    until_removed(&centercode, 20..41).await;
    until_every_process_believes(&client, &gateways[1], "gdpr", false, 4).await;
    drop(procs);
    drop(env);
}
