//! The queue contract, written once as functions of a `Queue` and run against both backends:
//! SQLite (a file in a temp dir) and RabbitMQ (a per-test queue prefix, deleted afterwards).

use crate::helpers::RabbitEnv;
use sf_centercode_relay::queue::{
    now_ms, EnqueueOutcome, Job, Leased, NewJob, ParkedFilter, Queue, QueueStats, SqliteQueue,
};
use sf_centercode_relay::settings::{Action, RabbitQueueType};
use std::time::{Duration, Instant};

/// Retry tiers of the RabbitMQ queues in these tests.
const TIERS: &[f64] = &[0.2, 0.2];

fn job(n: u32, key: Option<&str>, body_hash: Option<&str>) -> NewJob {
    NewJob {
        received_at_ms: 0,
        id: uuid::Uuid::new_v4().to_string(),
        route: "gdpr".into(),
        action: Action::RemoveUser,
        dedupe_key: key.map(str::to_owned),
        body_hash: body_hash.map(str::to_owned),
        org_id: Some("00D8d000001AbCdEAK".into()),
        notification_id: Some(format!("04l8d000010000{n:04}")),
        record_id: Some(format!("0038d00000Rec{n:04}")),
        job: Job::CalloutV1 {
            idempotency_key: key.map(str::to_owned),
            body: serde_json::json!({ "n": n }),
        },
    }
}

/// Lease until `n` jobs came back or 10 s passed.
async fn lease_n(q: &Queue, n: usize) -> Vec<Leased> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(q.lease(n - got.len(), Vec::new()).await.unwrap());
        assert!(
            Instant::now() < deadline,
            "only {} of {n} jobs leased",
            got.len()
        );
        if got.len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await; // poll with deadline
        }
    }
    got
}

fn depths(s: &QueueStats) -> (u64, u64, u64, u64) {
    (s.ready, s.in_flight, s.retrying, s.parked)
}

// ---- The contract -----------------------------------------------------------------------

async fn enqueued_jobs_are_leased_once_and_gone_after_ack(q: Queue) {
    // Arrange
    let (a, b) = (job(1, Some("k-a"), None), job(2, None, None));
    // Act
    let out = q.enqueue(vec![a.clone(), b.clone()]).await.unwrap();
    // Assert
    assert_eq!(out, vec![EnqueueOutcome::Stored, EnqueueOutcome::Stored]);
    assert_eq!(depths(&q.stats().await.unwrap()), (2, 0, 0, 0));
    let mut leased = lease_n(&q, 2).await;
    leased.sort_by_key(|l| l.notification_id.clone());
    assert_eq!(leased[0].id, a.id);
    assert_eq!(leased[0].job, a.job);
    assert_eq!(leased[0].route, "gdpr");
    assert_eq!(leased[0].action, "remove_user");
    assert_eq!(leased[0].notification_id, a.notification_id);
    assert_eq!(leased[0].record_id, a.record_id);
    assert_eq!(leased[0].org_id, a.org_id);
    assert_eq!(leased[1].id, b.id);
    assert!(leased.iter().all(|l| l.attempts == 1));
    assert!(
        q.lease(10, Vec::new()).await.unwrap().is_empty(),
        "a leased job is not handed out twice"
    );
    for l in &leased {
        q.ack(l).await.unwrap();
    }
    assert_eq!(depths(&q.stats().await.unwrap()), (0, 0, 0, 0));
    assert!(q.lease(10, Vec::new()).await.unwrap().is_empty());
}

async fn a_repeated_key_is_stored_once(q: Queue) {
    // Arrange
    let first = job(1, Some("k"), Some("hash-1"));
    // Act
    let out = q
        .enqueue(vec![first.clone(), job(2, Some("k"), Some("hash-1"))])
        .await
        .unwrap();
    let again = q
        .enqueue(vec![job(3, Some("k"), Some("hash-1"))])
        .await
        .unwrap();
    let other_body = q
        .enqueue(vec![job(4, Some("k"), Some("hash-2"))])
        .await
        .unwrap();
    // Assert
    let dup = EnqueueOutcome::Duplicate {
        job_id: first.id.clone(),
    };
    assert_eq!(out, vec![EnqueueOutcome::Stored, dup.clone()]);
    assert_eq!(again, vec![dup]);
    assert_eq!(
        other_body,
        vec![EnqueueOutcome::Conflict {
            job_id: first.id.clone()
        }]
    );
    assert_eq!(q.stats().await.unwrap().ready, 1);
    let leased = lease_n(&q, 1).await;
    assert_eq!(leased[0].id, first.id);
    q.ack(&leased[0]).await.unwrap();
}

async fn a_retried_job_comes_back_after_its_delay(q: Queue) {
    // Arrange
    let j = job(1, None, None);
    q.enqueue(vec![j.clone()]).await.unwrap();
    let leased = lease_n(&q, 1).await;
    // Act
    let asked = Instant::now();
    q.retry(
        &leased[0],
        now_ms() + 200,
        "Centercode answered 503",
        Some(503),
    )
    .await
    .unwrap();
    // Assert: waiting, not ready; then back with the attempt counted.
    let s = q.stats().await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.retrying), (0, 0, 1), "{s:?}");
    let back = lease_n(&q, 1).await;
    assert!(
        asked.elapsed() >= Duration::from_millis(150),
        "came back after {:?}",
        asked.elapsed()
    );
    assert_eq!(back[0].id, j.id);
    assert_eq!(back[0].attempts, 2);
    assert_eq!(back[0].job, j.job);
    q.ack(&back[0]).await.unwrap();
    assert_eq!(depths(&q.stats().await.unwrap()), (0, 0, 0, 0));
}

/// A `Retry-After` longer than every retry tier (0.2 s here) is waited out in full, going
/// round the tiers without spending attempts; never cut to the longest tier.
async fn a_retry_after_longer_than_every_tier_is_waited_out(q: Queue) {
    q.enqueue(vec![job(1, None, None)]).await.unwrap();
    let first = lease_n(&q, 1).await.remove(0);
    assert_eq!(first.attempts, 1);
    let asked = Duration::from_millis(900);
    let started = Instant::now();
    let not_before = now_ms() + asked.as_millis() as i64;
    q.retry_not_before(
        &first,
        not_before,
        Some(not_before),
        "Centercode answered 429",
        Some(429),
    )
    .await
    .unwrap();
    let again = lease_n(&q, 1).await.remove(0);
    let waited = started.elapsed();
    assert!(
        waited + Duration::from_millis(50) >= asked,
        "delivered after {waited:?}, before the {asked:?} asked for"
    );
    assert_eq!(again.attempts, 2, "going round the tiers spends no attempt");
    q.ack(&again).await.unwrap();
}

async fn a_job_larger_than_a_frame_comes_back_whole(q: Queue) {
    // 300 KB: Salesforce long text holds 131,072 characters, up to 4 bytes each in UTF-8;
    // on RabbitMQ it spans many 16 KiB frames.
    let mut j = job(1, None, None);
    let long = "Długi opis zgłoszenia 🚀 ".repeat(10_000);
    j.job = Job::CalloutV1 {
        idempotency_key: None,
        body: serde_json::json!({ "description": long }),
    };
    q.enqueue(vec![j.clone()]).await.unwrap();
    let back = lease_n(&q, 1).await;
    assert_eq!(back[0].job, j.job);
    q.ack(&back[0]).await.unwrap();
}

/// `lo <= t <= hi`, with a message naming the state.
fn within(state: &str, t: Option<i64>, lo: i64, hi: i64) {
    let t = t.unwrap_or_else(|| panic!("no oldest {state} time"));
    assert!(
        (lo..=hi).contains(&t),
        "oldest {state} at {t}, expected {lo}..={hi}"
    );
}

async fn oldest_times_follow_the_job_through_each_state(q: Queue) {
    // Arrange: the queue seen empty, then one job stored.
    let before = now_ms();
    let empty = q.stats().await.unwrap();
    assert_eq!(empty.oldest_ready_ms, None);
    q.enqueue(vec![job(1, None, None)]).await.unwrap();
    let stored = now_ms();
    // Act + Assert: ready since it was stored.
    let s = q.stats().await.unwrap();
    assert_eq!(s.ready, 1, "{s:?}");
    within("ready", s.oldest_ready_ms, before, stored);
    // In flight: the job's first-seen time; nothing ready any more.
    let leased = lease_n(&q, 1).await;
    let s = q.stats().await.unwrap();
    assert_eq!((s.ready, s.in_flight), (0, 1), "{s:?}");
    assert_eq!(s.oldest_ready_ms, None);
    within("in_flight", s.oldest_in_flight_ms, before, stored);
    // Retrying: still the first-seen time; the stats reads cost the job no attempt.
    q.retry(
        &leased[0],
        now_ms() + 200,
        "Centercode answered 503",
        Some(503),
    )
    .await
    .unwrap();
    let s = q.stats().await.unwrap();
    assert_eq!((s.in_flight, s.retrying), (0, 1), "{s:?}");
    within("retrying", s.oldest_retrying_ms, before, stored);
    assert_eq!(s.oldest_in_flight_ms, None);
    let back = lease_n(&q, 1).await;
    assert_eq!(back[0].attempts, 2, "the stats reads cost no attempt");
    // Parked: since it was parked; reading stats leaves it listed and counted.
    let parking = now_ms();
    q.park(&back[0], "Centercode rejected the request (400)", Some(400))
        .await
        .unwrap();
    let parked_by = now_ms();
    for _ in 0..3 {
        let s = q.stats().await.unwrap();
        assert_eq!(depths(&s), (0, 0, 0, 1));
        within("parked", s.oldest_parked_ms, parking, parked_by);
    }
    assert_eq!(q.parked(10).await.unwrap().len(), 1);
}

async fn a_parked_job_is_listed_with_its_reason(q: Queue) {
    // Arrange
    let j = job(1, None, None);
    q.enqueue(vec![j.clone()]).await.unwrap();
    let leased = lease_n(&q, 1).await;
    // Act
    q.park(
        &leased[0],
        "Centercode rejected the request (400)",
        Some(400),
    )
    .await
    .unwrap();
    // Assert
    let parked = q.parked(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].id, j.id);
    assert_eq!(parked[0].route, "gdpr");
    assert_eq!(parked[0].reason, "Centercode rejected the request (400)");
    assert_eq!(parked[0].last_status, Some(400));
    assert_eq!(parked[0].attempts, 1);
    assert_eq!(parked[0].notification_id, j.notification_id);
    assert!(parked[0].parked_at_ms > 0);
    assert_eq!(depths(&q.stats().await.unwrap()), (0, 0, 0, 1));
    assert!(
        q.lease(10, Vec::new()).await.unwrap().is_empty(),
        "a parked job is not delivered"
    );
    let filtered = q
        .parked_page(
            ParkedFilter {
                reason: Some("(400)".into()),
                ..ParkedFilter::default()
            },
            10,
            None,
        )
        .await
        .unwrap();
    assert_eq!(filtered.len(), 1);
    assert_eq!(
        q.count_parked(ParkedFilter {
            route: Some("other".into()),
            ..ParkedFilter::default()
        })
        .await
        .unwrap(),
        0
    );
    assert_eq!(
        q.parked(10).await.unwrap().len(),
        1,
        "listing removes nothing"
    );
    let preview = q
        .load(&j.id)
        .await
        .unwrap()
        .expect("a parked job can be previewed");
    assert_eq!(preview.job, j.job);
    // Purging deletes it for good.
    let only_j = ParkedFilter {
        ids: Some(vec![j.id.clone()]),
        ..ParkedFilter::default()
    };
    assert_eq!(q.purge_parked(only_j).await.unwrap(), 1);
    assert!(q.parked(10).await.unwrap().is_empty());
    assert_eq!(depths(&q.stats().await.unwrap()), (0, 0, 0, 0));
}

async fn a_paused_route_is_not_leased_and_a_release_spends_no_attempt(q: Queue) {
    // Arrange
    let j = job(1, None, None);
    q.enqueue(vec![j.clone()]).await.unwrap();
    // Act: the route is paused.
    let while_paused = q.lease(10, vec!["gdpr".into()]).await.unwrap();
    // Assert: not handed out; once resumed, it comes with its attempts untouched.
    assert!(while_paused.is_empty());
    let leased = lease_n(&q, 1).await;
    assert_eq!(
        (leased[0].id.as_str(), leased[0].attempts),
        (j.id.as_str(), 1)
    );
    // Act: the worker gives it back (circuit open).
    q.release(&leased[0]).await.unwrap();
    // Assert
    let back = lease_n(&q, 1).await;
    assert_eq!((back[0].id.as_str(), back[0].attempts), (j.id.as_str(), 1));
    q.ack(&back[0]).await.unwrap();
    assert_eq!(depths(&q.stats().await.unwrap()), (0, 0, 0, 0));
}

async fn replay_moves_parked_jobs_back_with_attempts_reset(q: Queue) {
    // Arrange: two parked jobs, the second after a retry (2 attempts).
    let (a, b) = (job(1, None, None), job(2, None, None));
    q.enqueue(vec![a.clone(), b.clone()]).await.unwrap();
    for l in lease_n(&q, 2).await {
        if l.id == b.id {
            q.retry(&l, now_ms(), "timeout", None).await.unwrap();
        } else {
            q.park(&l, "first reason", Some(422)).await.unwrap();
        }
    }
    let l = lease_n(&q, 1).await;
    assert_eq!((l[0].id.as_str(), l[0].attempts), (b.id.as_str(), 2));
    q.park(&l[0], "second reason", Some(422)).await.unwrap();
    assert_eq!(q.stats().await.unwrap().parked, 2);
    // Act: replay only b.
    let n = q.replay(Some(vec![b.id.clone()])).await.unwrap();
    // Assert: b is back with attempts reset, a is still parked.
    assert_eq!(n, 1);
    let parked = q.parked(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].id, a.id);
    let back = lease_n(&q, 1).await;
    assert_eq!(back[0].id, b.id);
    assert_eq!(back[0].attempts, 1, "attempts reset on replay");
    assert_eq!(back[0].job, b.job);
    q.park(&back[0], "third reason", None).await.unwrap();
    let again = q
        .parked_page(
            ParkedFilter {
                ids: Some(vec![b.id.clone()]),
                ..ParkedFilter::default()
            },
            10,
            None,
        )
        .await
        .unwrap();
    assert_eq!(again[0].replays, 1);
    assert_eq!(again[0].history, vec!["second reason".to_owned()]);
    // Act: replay everything.
    assert_eq!(q.replay(None).await.unwrap(), 2);
    // Assert
    let all = lease_n(&q, 2).await;
    assert!(all.iter().all(|l| l.attempts == 1));
    for l in &all {
        q.ack(l).await.unwrap();
    }
    assert!(q.parked(10).await.unwrap().is_empty());
    assert_eq!(depths(&q.stats().await.unwrap()), (0, 0, 0, 0));
}

/// `first` and `second` are two handles (two processes) on the same storage.
async fn a_job_whose_consumer_dies_is_delivered_again(first: Queue, second: Queue) {
    // Arrange
    let j = job(1, None, None);
    first.enqueue(vec![j.clone()]).await.unwrap();
    let leased = lease_n(&first, 1).await;
    assert_eq!(leased[0].attempts, 1);
    // Act: the first worker process dies without settling the job.
    first.close();
    drop(first);
    // Assert
    let again = lease_n(&second, 1).await;
    assert_eq!(again[0].id, j.id);
    assert_eq!(again[0].attempts, 2, "the lost attempt is counted");
    second.ack(&again[0]).await.unwrap();
    assert_eq!(depths(&second.stats().await.unwrap()), (0, 0, 0, 0));
}

// ---- SQLite ------------------------------------------------------------------------------

fn sqlite(dir: &tempfile::TempDir, lease: Duration) -> Queue {
    Queue::Embedded(
        SqliteQueue::open(
            &dir.path().join("q.db"),
            lease,
            Duration::from_secs(600),
            Duration::ZERO,
        )
        .unwrap(),
    )
}

#[tokio::test]
async fn sqlite_an_undecodable_row_is_parked_with_its_reason_and_the_rest_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let q = sqlite(&dir, Duration::from_secs(30));
    let jobs: Vec<NewJob> = (1..=3).map(|n| job(n, None, None)).collect();
    q.enqueue(jobs.clone()).await.unwrap();
    // A row written by a future version (or damaged): valid JSON, but no job this relay knows.
    let conn = rusqlite::Connection::open(dir.path().join("q.db")).unwrap();
    conn.execute(
        "UPDATE jobs SET payload = ?1 WHERE id = ?2",
        [
            r#"{"kind":"from_the_future","email":"jane.doe@example.org"}"#,
            jobs[1].id.as_str(),
        ],
    )
    .unwrap();
    drop(conn);
    // The other two are leased; the bad one is parked, not in the way of every later lease.
    let mut leased: Vec<String> = lease_n(&q, 2).await.into_iter().map(|l| l.id).collect();
    leased.sort();
    let mut expected = vec![jobs[0].id.clone(), jobs[2].id.clone()];
    expected.sort();
    assert_eq!(leased, expected);
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.ready, stats.parked), (0, 1));
    let parked = q.parked(10).await.unwrap();
    assert_eq!(parked[0].id, jobs[1].id);
    assert!(
        parked[0].reason.contains("cannot be delivered"),
        "{}",
        parked[0].reason
    );
    assert!(!parked[0].reason.contains("jane"), "{}", parked[0].reason);
    q.enqueue(vec![job(4, None, None)]).await.unwrap();
    assert_eq!(lease_n(&q, 1).await.len(), 1, "later leases go on");
}

#[tokio::test]
async fn sqlite_expired_dedupe_keys_are_purged_in_full_by_a_gateway_process() {
    // Arrange: 25,000 keys that have expired, more than two purge batches, in the file a
    // gateway-only relay will open.
    let dir = tempfile::tempdir().unwrap();
    let config = crate::helpers::write_relay_config(
        dir.path(),
        "[server]\nbind = \"127.0.0.1:0\"\nworkers = 1\n",
        "http://127.0.0.1:9",
    );
    let db = dir.path().join("relay.db");
    {
        let q = SqliteQueue::open(
            &db,
            Duration::from_secs(30),
            Duration::from_millis(1),
            Duration::ZERO,
        )
        .unwrap();
        let keys: Vec<String> = (0..25_000)
            .map(|n| format!("om:00D8d000001AbCd:{n:018}"))
            .collect();
        let jobs: Vec<NewJob> = keys
            .iter()
            .enumerate()
            .map(|(n, k)| job(n as u32, Some(k), None))
            .collect();
        for chunk in jobs.chunks(5_000) {
            q.enqueue(chunk.to_vec()).await.unwrap();
        }
        q.close();
    }
    let count = || {
        rusqlite::Connection::open(&db)
            .unwrap()
            .query_row("SELECT count(*) FROM dedupe", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    assert_eq!(count(), 25_000);

    // Act: a gateway (no worker) starts on it.
    let (mut child, _) = crate::helpers::spawn_relay(
        &config,
        &["serve", "--role", "gateway"],
        &[],
        std::process::Stdio::null(),
    );

    // Assert: every expired key is gone soon after start, not 10,000 per ten minutes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while count() > 0 {
        assert!(Instant::now() < deadline, "{} expired keys left", count());
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn sqlite_a_paused_routes_backlog_does_not_slow_leasing_the_other_routes() {
    // Arrange: 200,000 due jobs of the paused route `gdpr`, then one feedback job behind them
    // in due order.
    let dir = tempfile::tempdir().unwrap();
    let q = sqlite(&dir, Duration::from_secs(30));
    let paused = || vec!["gdpr".to_owned()];
    let median_lease = |q: Queue| async move {
        let mut times = Vec::new();
        for _ in 0..15 {
            let started = Instant::now();
            let leased = q.lease(1, paused()).await.unwrap();
            times.push(started.elapsed());
            assert_eq!(leased.len(), 1);
            assert_eq!(leased[0].route, "feedback");
            q.release(&leased[0]).await.unwrap();
        }
        times.sort();
        times[times.len() / 2]
    };
    let backlog: Vec<NewJob> = (0..200_000).map(|n| job(n, None, None)).collect();
    for chunk in backlog.chunks(20_000) {
        q.enqueue(chunk.to_vec()).await.unwrap();
    }
    let mut feedback = job(1, None, None);
    feedback.route = "feedback".into();
    // The baseline, measured in the same run: a queue holding only the feedback job.
    let lone_dir = tempfile::tempdir().unwrap();
    let lone = sqlite(&lone_dir, Duration::from_secs(30));
    lone.enqueue(vec![feedback.clone()]).await.unwrap();
    q.enqueue(vec![feedback]).await.unwrap();

    // Act
    let baseline = median_lease(lone).await;
    let with_backlog = median_lease(q).await;

    // Assert: leasing by index, the backlog adds no scan of its 200,000 rows.
    assert!(
        with_backlog < baseline * 5 + Duration::from_millis(3),
        "lease took {with_backlog:?} behind a paused backlog, {baseline:?} without"
    );
}

#[tokio::test]
async fn sqlite_enqueued_jobs_are_leased_once_and_gone_after_ack() {
    let dir = tempfile::tempdir().unwrap();
    enqueued_jobs_are_leased_once_and_gone_after_ack(sqlite(&dir, Duration::from_secs(30))).await;
}

#[tokio::test]
async fn sqlite_a_repeated_key_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    a_repeated_key_is_stored_once(sqlite(&dir, Duration::from_secs(30))).await;
}

#[tokio::test]
async fn sqlite_a_retried_job_comes_back_after_its_delay() {
    let dir = tempfile::tempdir().unwrap();
    a_retried_job_comes_back_after_its_delay(sqlite(&dir, Duration::from_secs(30))).await;
}

#[tokio::test]
async fn sqlite_a_retry_after_longer_than_every_tier_is_waited_out() {
    let dir = tempfile::tempdir().unwrap();
    a_retry_after_longer_than_every_tier_is_waited_out(sqlite(&dir, Duration::from_secs(30))).await;
}

#[tokio::test]
async fn sqlite_a_job_larger_than_a_frame_comes_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    a_job_larger_than_a_frame_comes_back_whole(sqlite(&dir, Duration::from_secs(30))).await;
}

#[tokio::test]
async fn sqlite_oldest_times_follow_the_job_through_each_state() {
    let dir = tempfile::tempdir().unwrap();
    oldest_times_follow_the_job_through_each_state(sqlite(&dir, Duration::from_secs(30))).await;
}

#[tokio::test]
async fn sqlite_a_parked_job_is_listed_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    a_parked_job_is_listed_with_its_reason(sqlite(&dir, Duration::from_secs(30))).await;
}

#[tokio::test]
async fn sqlite_replay_moves_parked_jobs_back_with_attempts_reset() {
    let dir = tempfile::tempdir().unwrap();
    replay_moves_parked_jobs_back_with_attempts_reset(sqlite(&dir, Duration::from_secs(30))).await;
}

#[tokio::test]
async fn sqlite_a_paused_route_is_not_leased_and_a_release_spends_no_attempt() {
    let dir = tempfile::tempdir().unwrap();
    a_paused_route_is_not_leased_and_a_release_spends_no_attempt(sqlite(
        &dir,
        Duration::from_secs(30),
    ))
    .await;
}

#[tokio::test]
async fn sqlite_a_job_whose_consumer_dies_is_delivered_again() {
    // The lease expiring stands for the dead process.
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_millis(200);
    a_job_whose_consumer_dies_is_delivered_again(sqlite(&dir, lease), sqlite(&dir, lease)).await;
}

// ---- RabbitMQ ----------------------------------------------------------------------------

async fn rabbit(env: &RabbitEnv) -> Queue {
    env.open(env.config(TIERS, true)).await
}

#[tokio::test]
async fn rabbitmq_enqueued_jobs_are_leased_once_and_gone_after_ack() {
    let env = RabbitEnv::new().await;
    enqueued_jobs_are_leased_once_and_gone_after_ack(rabbit(&env).await).await;
}

#[tokio::test]
async fn rabbitmq_a_repeated_key_is_stored_once() {
    let env = RabbitEnv::new().await;
    a_repeated_key_is_stored_once(rabbit(&env).await).await;
}

#[tokio::test]
async fn rabbitmq_a_repeated_key_is_stored_once_without_redis() {
    // The in-process dedupe (one gateway only) keeps the same contract.
    let env = RabbitEnv::new().await;
    a_repeated_key_is_stored_once(env.open(env.config(TIERS, false)).await).await;
}

#[tokio::test]
async fn rabbitmq_a_retried_job_comes_back_after_its_delay() {
    // Proves the quorum retry tier's TTL dead-letters into the work queue on this broker.
    let env = RabbitEnv::new().await;
    a_retried_job_comes_back_after_its_delay(rabbit(&env).await).await;
}

#[tokio::test]
async fn rabbitmq_a_retry_after_longer_than_every_tier_is_waited_out() {
    let env = RabbitEnv::new().await;
    a_retry_after_longer_than_every_tier_is_waited_out(rabbit(&env).await).await;
}

#[tokio::test]
async fn rabbitmq_a_job_larger_than_a_frame_comes_back_whole() {
    let env = RabbitEnv::new().await;
    a_job_larger_than_a_frame_comes_back_whole(rabbit(&env).await).await;
}

#[tokio::test]
async fn rabbitmq_oldest_times_follow_the_job_through_each_state() {
    // Quorum queues cannot report their head's age: the relay bounds it (ready) and counts
    // from what it held, retried and parked itself.
    let env = RabbitEnv::new().await;
    oldest_times_follow_the_job_through_each_state(rabbit(&env).await).await;
}

#[tokio::test]
async fn rabbitmq_a_parked_job_is_listed_with_its_reason() {
    let env = RabbitEnv::new().await;
    a_parked_job_is_listed_with_its_reason(rabbit(&env).await).await;
}

#[tokio::test]
async fn rabbitmq_replay_moves_parked_jobs_back_with_attempts_reset() {
    let env = RabbitEnv::new().await;
    replay_moves_parked_jobs_back_with_attempts_reset(rabbit(&env).await).await;
}

#[tokio::test]
async fn rabbitmq_a_paused_route_is_not_leased_and_a_release_spends_no_attempt() {
    // Set aside in a retry tier (0.2 s here), never requeued in a loop.
    let env = RabbitEnv::new().await;
    a_paused_route_is_not_leased_and_a_release_spends_no_attempt(rabbit(&env).await).await;
}

#[tokio::test]
async fn rabbitmq_a_job_whose_consumer_dies_is_delivered_again() {
    // Closing the first connection stands for the dead process: the broker requeues.
    let env = RabbitEnv::new().await;
    let (first, second) = (rabbit(&env).await, rabbit(&env).await);
    a_job_whose_consumer_dies_is_delivered_again(first, second).await;
}

#[tokio::test]
async fn rabbitmq_classic_queues_keep_the_contract() {
    let env = RabbitEnv::new().await;
    let mut config = env.config(TIERS, true);
    config.queue_type = RabbitQueueType::Classic;
    let q = env.open(config).await;
    enqueued_jobs_are_leased_once_and_gone_after_ack(q.clone()).await;
    a_retried_job_comes_back_after_its_delay(q.clone()).await;
    replay_moves_parked_jobs_back_with_attempts_reset(q).await;
}
