//! Rate limits per destination on both backends: two worker loops under one `[[limits]]`
//! stay within the rate (as the fake Centercode measures it) and never meet its own, tighter
//! WAF; waiting spends no attempt; a `Retry-After` stops every worker; the state outlives a
//! restart on both backends (Redis; the embedded queue's file).

use crate::helpers::{bearer, fixture, spawn_app_on, Backend, TestApp};
use sf_centercode_relay::queue::Queue;
use sf_centercode_relay::ratelimit::{authority, LimitSettings, RateLimiter};
use sf_centercode_relay::settings::Settings;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A callout removal of its own record and e-mail (unknown to the fake: 404, counted done).
fn removal(i: u32) -> Vec<u8> {
    let mut body: serde_json::Value =
        serde_json::from_slice(&fixture("apex_removal_request.json")).unwrap();
    body["recordId"] = format!("003{i:015}").into();
    body["subject"]["email"] = format!("user{i}@example.org").into();
    serde_json::to_vec(&body).unwrap()
}

async fn post_removals(app: &TestApp, n: u32) {
    for i in 0..n {
        let r = app
            .post_callout("apex-removal", &removal(i), &bearer(&format!("rl-{i}")))
            .await;
        assert_eq!(r.status(), 202);
    }
}

/// The fake's own per-second limit (a WAF in front of Centercode).
async fn limit_the_fake(app: &TestApp, per_second: f64, burst: u32) {
    let url = format!("{}/__fake/config", app.centercode.base_url());
    let mut config: serde_json::Value = app
        .client
        .get(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    config["rateLimit"] = serde_json::json!({
        "enabled": true, "requestsPerSecond": per_second, "burst": burst,
        "statusOnThrottle": 429, "retryAfterStyle": "seconds"
    });
    let r = app.client.put(&url).json(&config).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

fn limit(app_base: &str, rate: f64, burst: u32) -> LimitSettings {
    LimitSettings {
        host: Some(authority(app_base).unwrap()),
        routes: None,
        rate,
        burst,
    }
}

/// Arrival times (ms since the epoch) of the fake's requests, sorted.
fn arrivals(app: &TestApp) -> Vec<i64> {
    let mut at: Vec<i64> = app
        .centercode
        .requests()
        .iter()
        .map(|r| sf_centercode_relay::admin_cli::parse_rfc3339_ms(&r.at).unwrap())
        .collect();
    at.sort_unstable();
    at
}

/// Poll (with a deadline) until nothing waits in the queue.
async fn wait_until_drained(app: &TestApp, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = app.stats().await;
        if s.ready == 0 && s.retrying == 0 && s.in_flight == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "queue did not drain: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
}

async fn two_workers_share_one_limit_and_spend_no_attempts(backend: Backend) {
    // Arrange: 20/s with a burst of 2 for the fake's host; the fake itself lets 24/s
    // through (burst 4) and answers 429 beyond. One retry only: a job that spent an
    // attempt per wait would park.
    const JOBS: u32 = 80;
    const RATE: f64 = 20.0;
    let app = spawn_app_on(backend, |s| {
        let base = s.routes[0].url.clone();
        s.limits = vec![limit(&base, RATE, 2)];
        let tier = s.worker.retry_schedule_secs[0];
        s.worker.retry_schedule_secs = vec![tier];
    })
    .await;
    limit_the_fake(&app, RATE * 1.2, 4).await;
    post_removals(&app, JOBS).await;

    // Act: two worker loops drain the backlog.
    let stop = CancellationToken::new();
    let workers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(app.worker.clone().run_until_stopped(stop.clone())))
        .collect();
    app.centercode
        .wait_for_requests(JOBS as usize, Duration::from_secs(30))
        .await;
    wait_until_drained(&app, Duration::from_secs(10)).await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }

    // Assert: the rate over the run (the burst aside) is the limit's, within 10 %.
    let at = arrivals(&app);
    assert_eq!(at.len(), JOBS as usize, "one call per job");
    let span_s = (at[at.len() - 1] - at[1]) as f64 / 1000.0;
    let rate = (at.len() - 2) as f64 / span_s;
    assert!(
        (RATE * 0.9..=RATE * 1.1).contains(&rate),
        "achieved {rate:.1}/s against a limit of {RATE}/s"
    );
    // In no second more than the rate plus the burst.
    for (i, t) in at.iter().enumerate() {
        let in_second = at[i..].iter().take_while(|u| **u < t + 1000).count();
        assert!(
            in_second <= RATE as usize + 2,
            "{in_second} calls in the second from {t}"
        );
    }
    assert_eq!(
        app.centercode.throttled(),
        0,
        "the fake's WAF never refused a call"
    );
    let stats = app.stats().await;
    assert_eq!(stats.parked, 0, "waiting spent no attempt: {stats:?}");
    let text = app.metrics().await;
    let host = authority(&app.centercode.base_url()).unwrap();
    let limited = text
        .lines()
        .find(|l| l.starts_with(&format!("relay_rate_limited_total{{host=\"{host}\"}}")))
        .unwrap_or_else(|| panic!("no relay_rate_limited_total for {host}:\n{text}"));
    assert!(!limited.ends_with(" 0"), "{limited}");
    assert!(text.contains("outcome=\"rate_limited\""), "{text}");
    assert!(
        text.contains(&format!("relay_rate_limit_allowance{{host=\"{host}\"}}")),
        "{text}"
    );
    if backend == Backend::Embedded {
        // The embedded ledger shows every job delivered on its first attempt.
        use sf_centercode_relay::ledger::LedgerQuery;
        let entries = app
            .queue
            .ledger_query(LedgerQuery {
                history: true,
                limit: 1000,
                ..LedgerQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(entries.len(), JOBS as usize);
        for e in &entries {
            assert_eq!(e.last_outcome.as_deref(), Some("user_not_found"));
            assert_eq!(e.attempts.len(), 1, "one attempt per job: {:?}", e.attempts);
            assert_eq!(e.attempts[0].attempt, 1);
        }
    }
}

#[tokio::test]
async fn embedded_two_workers_share_one_limit_and_spend_no_attempts() {
    two_workers_share_one_limit_and_spend_no_attempts(Backend::Embedded).await;
}

#[tokio::test]
async fn rabbitmq_two_workers_share_one_limit_and_spend_no_attempts() {
    two_workers_share_one_limit_and_spend_no_attempts(Backend::Rabbitmq).await;
}

async fn a_retry_after_from_the_destination_stops_every_worker(backend: Backend) {
    // Arrange: a generous limit (50/s, burst 1) and the fake answering the first call 429
    // with `Retry-After: 1`.
    const JOBS: u32 = 20;
    let app = spawn_app_on(backend, |s| {
        let base = s.routes[0].url.clone();
        s.limits = vec![limit(&base, 50.0, 1)];
        s.worker.retry_schedule_secs = vec![0.05; 4];
    })
    .await;
    app.centercode.push_fault(fake_centercode::Fault {
        status: 429,
        retry_after: Some("1".into()),
        ..fake_centercode::Fault::default()
    });
    post_removals(&app, JOBS).await;

    // Act
    let stop = CancellationToken::new();
    let workers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(app.worker.clone().run_until_stopped(stop.clone())))
        .collect();
    app.centercode
        .wait_for_requests(JOBS as usize + 1, Duration::from_secs(30))
        .await;
    wait_until_drained(&app, Duration::from_secs(10)).await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }

    // Assert: after the 429, no worker called for the second it asked (a call admitted
    // before the answer came back may still arrive: 50/s admits one each 20 ms).
    let requests = app.centercode.requests();
    let refused = requests.iter().find(|r| r.status == 429).expect("the 429");
    let t429 = sf_centercode_relay::admin_cli::parse_rfc3339_ms(&refused.at).unwrap();
    let at = arrivals(&app);
    let during: Vec<i64> = at
        .iter()
        .map(|t| t - t429)
        .filter(|d| (100..950).contains(d))
        .collect();
    assert!(
        during.is_empty(),
        "calls during the Retry-After (ms after the 429): {during:?}"
    );
    assert!(
        at.iter().any(|t| t - t429 >= 950),
        "calls resumed afterwards"
    );
    assert_eq!(
        at.len(),
        JOBS as usize + 1,
        "every job delivered, the refused one twice"
    );
    assert_eq!(app.stats().await.parked, 0);
}

#[tokio::test]
async fn embedded_a_retry_after_from_the_destination_stops_every_worker() {
    a_retry_after_from_the_destination_stops_every_worker(Backend::Embedded).await;
}

#[tokio::test]
async fn rabbitmq_a_retry_after_from_the_destination_stops_every_worker() {
    a_retry_after_from_the_destination_stops_every_worker(Backend::Rabbitmq).await;
}

/// Settings with one limit of 10/s, burst 2, on the test routes' host.
fn limited_settings() -> Settings {
    let dir = tempfile::tempdir().unwrap();
    let mut s = crate::helpers::test_settings(&dir.path().join("unused.db"), "http://127.0.0.1:9");
    s.limits = vec![limit("http://127.0.0.1:9", 10.0, 2)];
    s.validate().unwrap();
    s
}

/// A burst used up and a `Retry-After` of 5 s, then a restart (a new queue connection and
/// a new limiter, as a new process would have): does the state outlive it?
async fn the_rate_state_across_a_restart(
    open: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Queue>>>,
) -> i64 {
    let settings = limited_settings();
    let q = open().await;
    let limiter = RateLimiter::new(&settings);
    let l = limiter.limit_for("gdpr").expect("gdpr is limited");
    assert_eq!(
        limiter.limit_for("feedback"),
        Some(l.clone()),
        "one limit per host"
    );
    assert_eq!(limiter.acquire(&q, &l).await.unwrap().wait_us, 0);
    assert_eq!(limiter.acquire(&q, &l).await.unwrap().wait_us, 0);
    assert!(
        limiter.acquire(&q, &l).await.unwrap().wait_us > 0,
        "burst used up"
    );
    limiter.slow(&q, &l, Duration::from_secs(5)).await.unwrap();
    q.close();
    drop((q, limiter));
    let q = open().await;
    let limiter = RateLimiter::new(&settings);
    let wait = limiter.acquire(&q, &l).await.unwrap().wait_us;
    q.close();
    wait
}

#[tokio::test]
async fn rabbitmq_the_rate_state_survives_a_restart_in_redis() {
    // Arrange
    let env = crate::helpers::RabbitEnv::new().await;
    let config = env.config(&[0.2], true);
    // Act
    let wait = the_rate_state_across_a_restart(|| {
        let config = config.clone();
        Box::pin(async move {
            Queue::Rabbit(
                sf_centercode_relay::queue::RabbitQueue::connect(config)
                    .await
                    .unwrap(),
            )
        })
    })
    .await;
    // Assert: the Retry-After still holds after the restart.
    assert!(
        (4_000_000..=5_000_000).contains(&wait),
        "waits {wait} µs after the restart"
    );
}

#[tokio::test]
async fn embedded_the_rate_state_survives_a_restart_in_the_queue_file() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    // Act
    let wait = the_rate_state_across_a_restart(|| {
        let path = path.clone();
        Box::pin(async move {
            Queue::Embedded(
                sf_centercode_relay::queue::SqliteQueue::open(
                    &path,
                    Duration::from_secs(30),
                    Duration::from_secs(600),
                    Duration::ZERO,
                )
                .unwrap(),
            )
        })
    })
    .await;
    // Assert: the Retry-After still holds after the restart (the state is in the file).
    assert!(
        (4_000_000..=5_000_000).contains(&wait),
        "waits {wait} µs after the restart"
    );
}

#[test]
fn limits_are_validated_naming_the_key() {
    let check = |toml: &str| {
        let dir = tempfile::tempdir().unwrap();
        let mut s = crate::helpers::test_settings(&dir.path().join("x.db"), "http://127.0.0.1:9");
        let extra: toml_limits::Limits = toml::from_str(toml).unwrap();
        s.limits = extra.limits;
        s.validate().map(|_| ()).map_err(|e| e.key)
    };
    // (the [[limits]] TOML, the key named or None when valid, why)
    let cases = [
        (
            "host = \"127.0.0.1:9\"\nrate = 5\nburst = 2",
            None,
            "a host limit",
        ),
        ("routes = [\"gdpr\"]\nrate = 0.5", None, "a routes limit"),
        (
            "host = \"127.0.0.1:9\"\nrate = 0",
            Some("limits[0].rate"),
            "rate > 0",
        ),
        (
            "host = \"127.0.0.1:9\"\nrate = 1\nburst = 0",
            Some("limits[0].burst"),
            "burst ≥ 1",
        ),
        (
            "host = \"127.0.0.1\"\nrate = 1",
            Some("limits[0].host"),
            "the port is part of it",
        ),
        (
            "rate = 1",
            Some("limits[0].host"),
            "neither host nor routes",
        ),
        (
            "host = \"127.0.0.1:9\"\nroutes = [\"gdpr\"]\nrate = 1",
            Some("limits[0].host"),
            "both",
        ),
        (
            "routes = [\"nope\"]\nrate = 1",
            Some("limits[0].routes"),
            "an unknown route",
        ),
        (
            "host = \"127.0.0.1:9\"\nrate = 1\n[[limits]]\nroutes = [\"gdpr\"]\nrate = 1",
            Some("limits[1].routes"),
            "a route under two limits",
        ),
    ];
    for (toml, key, why) in cases {
        assert_eq!(
            check(&format!("[[limits]]\n{toml}")),
            key.map_or(Ok(()), |k| Err(k.to_owned())),
            "{why}"
        );
    }
}

mod toml_limits {
    #[derive(serde::Deserialize)]
    pub struct Limits {
        pub limits: Vec<sf_centercode_relay::ratelimit::LimitSettings>,
    }
}
