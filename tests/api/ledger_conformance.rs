//! The delivery ledger's contract, written once as functions of a [`Store`] and run, through
//! `Queue`, against both ledgers: the embedded queue's (tables in its SQLite file, in a temp
//! dir) and the RabbitMQ queue's (PostgreSQL: a schema per test, dropped afterwards).

use crate::helpers::RabbitEnv;
use serde_json::json;
use sf_centercode_relay::ledger::postgres::PgLedger;
use sf_centercode_relay::ledger::{
    Attempt, Entry, FinalOutcome, JobFacts, KeptPayload, LedgerCursor, LedgerQuery, PURGE_BATCH,
};
use sf_centercode_relay::queue::{now_ms, Job, Leased, NewJob, ParkedFilter, Queue, SqliteQueue};
use sf_centercode_relay::settings::Action;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

const ORG: &str = "00D8d000001AbCdEAK";
const REJECTED: &str = "Centercode rejected the request (400)";
/// The embedded queue's lease: how long a job of a dead process waits before it comes back.
const LEASE: Duration = Duration::from_secs(2);
/// Retry tiers of the RabbitMQ queues in these tests.
const TIERS: &[f64] = &[0.2];
const DAY_MS: i64 = 86_400_000;

// ---- PostgreSQL ---------------------------------------------------------------------------

/// One test's PostgreSQL schema on the tests' server (`services::postgres`), dropped with
/// everything in it when this is dropped, even when the test panics.
pub struct PgSchema {
    pub url: String,
    pub name: String,
}

impl PgSchema {
    /// The schema `name` (created by the first ledger that connects to it).
    pub async fn new(name: &str) -> Self {
        let url = tokio::task::spawn_blocking(|| crate::services::postgres().url.clone())
            .await
            .unwrap();
        Self {
            url,
            name: name.to_owned(),
        }
    }

    /// A connection whose search path is this schema.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the tests' PostgreSQL");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
            .batch_execute(&format!("SET search_path TO \"{}\"", self.name))
            .await
            .unwrap();
        client
    }

    /// The single number `sql` (a `count(*)`) answers.
    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// `pg_dump` of the schema (definitions and data), as text.
    pub async fn dump(&self) -> String {
        let pg_dump = crate::services::find_program("pg_dump", "postgresql-client").unwrap();
        let out = tokio::process::Command::new(pg_dump)
            .arg(&self.url)
            .arg(format!("--schema={}", self.name))
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Drop may run inside a runtime: clean up from a thread with its own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok((client, connection)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                // A ledger writer of the (now blocked) test runtime could hold a lock: give
                // up after a while rather than hang; the schema's name is unique anyway.
                let _ = client
                    .batch_execute(&format!(
                        "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
                    ))
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}

// ---- The two ledgers ---------------------------------------------------------------------

/// A queue keeping a ledger, and what the test needs to look beneath it.
pub struct Store {
    pub queue: Queue,
    backend: Backend,
}

enum Backend {
    Embedded(tempfile::TempDir),
    Rabbit(Box<Rabbit>),
}

/// Dropped in this order: the queues are closed and deleted, then the schema dropped.
struct Rabbit {
    ledger: PgLedger,
    env: RabbitEnv,
    schema: PgSchema,
}

fn open_sqlite(dir: &std::path::Path) -> SqliteQueue {
    SqliteQueue::open(
        &dir.join("q.db"),
        LEASE,
        Duration::from_secs(600),
        Duration::ZERO,
    )
    .unwrap()
}

fn attach(queue: &Queue, ledger: &PgLedger) {
    match queue {
        Queue::Rabbit(q) => q.attach_ledger(ledger.clone()),
        Queue::Embedded(_) => unreachable!("the embedded queue keeps its ledger in its file"),
    }
}

/// The embedded queue, its ledger in its SQLite file.
async fn embedded() -> Store {
    let dir = tempfile::tempdir().unwrap();
    Store {
        queue: Queue::Embedded(open_sqlite(dir.path())),
        backend: Backend::Embedded(dir),
    }
}

/// The RabbitMQ queue (a per-test prefix) with its ledger in PostgreSQL (a per-test schema).
async fn rabbit() -> Store {
    let env = RabbitEnv::new().await;
    let schema = PgSchema::new(&env.prefix).await;
    let ledger = PgLedger::connect(&schema.url, &schema.name)
        .await
        .expect("open the PostgreSQL ledger");
    let queue = env.open(env.config(TIERS, true)).await;
    attach(&queue, &ledger);
    Store {
        queue,
        backend: Backend::Rabbit(Box::new(Rabbit {
            ledger,
            env,
            schema,
        })),
    }
}

impl Store {
    /// A second handle on the same queue and ledger: another process.
    async fn reopen(&self) -> Queue {
        match &self.backend {
            Backend::Embedded(dir) => Queue::Embedded(open_sqlite(dir.path())),
            Backend::Rabbit(r) => {
                let q = r.env.open(r.env.config(TIERS, true)).await;
                attach(&q, &r.ledger);
                q
            }
        }
    }

    /// The number `sql` (a `count(*)` over the ledger's tables) answers, read beneath the
    /// queue: what is stored, not what readers are shown.
    async fn count(&self, sql: &str) -> i64 {
        match &self.backend {
            Backend::Embedded(dir) => rusqlite::Connection::open(dir.path().join("q.db"))
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            Backend::Rabbit(r) => r.schema.count(sql).await,
        }
    }

    /// Wait for writes still on their way (RabbitMQ's store-time notes are not awaited by
    /// the enqueue), so none holds a lock when the schema is dropped.
    async fn done(self) {
        if let Backend::Rabbit(r) = &self.backend {
            // The writer commits in order: once this is in, everything sent before is too.
            r.ledger.note("test-end-barrier", "replayed").await.unwrap();
        }
    }
}

// ---- Helpers ------------------------------------------------------------------------------

fn new_job(n: u32) -> NewJob {
    NewJob {
        received_at_ms: now_ms() - 40,
        id: uuid::Uuid::new_v4().to_string(),
        route: "gdpr".into(),
        action: Action::RemoveUser,
        dedupe_key: None,
        body_hash: None,
        org_id: Some(ORG.into()),
        notification_id: Some(format!("04l{n:015}")),
        record_id: Some(format!("003{n:015}")),
        job: Job::CalloutV1 {
            idempotency_key: None,
            body: json!({ "n": n }),
        },
    }
}

/// Facts of a job written straight to the ledger (no queue), stored at `stored_at_ms`.
fn facts(n: u32, stored_at_ms: i64) -> JobFacts {
    JobFacts {
        job_id: uuid::Uuid::new_v4().to_string(),
        route: "gdpr".into(),
        action: "remove_user".into(),
        org_id: Some(ORG.into()),
        notification_id: Some(format!("04l{n:015}")),
        record_id: Some(format!("003{n:015}")),
        subject_key: None,
        received_at_ms: stored_at_ms - 5,
        stored_at_ms,
    }
}

/// The facts a worker records about a leased job.
fn facts_of(l: &Leased, subject_key: Option<&str>) -> JobFacts {
    JobFacts {
        job_id: l.id.clone(),
        route: l.route.clone(),
        action: l.action.clone(),
        org_id: l.org_id.clone(),
        notification_id: l.notification_id.clone(),
        record_id: l.record_id.clone(),
        subject_key: subject_key.map(str::to_owned),
        received_at_ms: l.received_at_ms,
        stored_at_ms: l.first_seen_ms,
    }
}

/// A strictly increasing clock for attempt start times: two attempts of one job (numbered 1
/// again after a replay) never share `(started_at, attempt)`, the key the ledgers dedupe on.
fn tick() -> i64 {
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = now_ms();
    let prev = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
            Some(l.max(now - 1) + 1)
        })
        .unwrap();
    prev.max(now - 1) + 1
}

/// One call to Centercode by the leased job: answered with `status`, or timed out (`None`).
fn attempt(l: &Leased, status: Option<u16>, outcome: &str) -> Attempt {
    Attempt {
        attempt: l.attempts,
        started_at_ms: tick(),
        duration_ms: 3,
        status,
        error_class: status.is_none().then(|| "timeout".into()),
        outcome: outcome.into(),
        response: status.map(|s| format!(r#"{{"status":{s}}}"#)),
    }
}

fn outcome(name: &str, reason: Option<&str>) -> FinalOutcome {
    FinalOutcome {
        outcome: name.into(),
        reason: reason.map(str::to_owned),
        at_ms: now_ms(),
        kept_payload: None,
    }
}

fn query() -> LedgerQuery {
    LedgerQuery {
        limit: 100,
        ..LedgerQuery::default()
    }
}

fn ids(entries: &[Entry]) -> Vec<String> {
    entries.iter().map(|e| e.facts.job_id.clone()).collect()
}

fn outcomes(e: &Entry) -> Vec<&str> {
    e.outcomes.iter().map(|o| o.outcome.as_str()).collect()
}

/// The one entry of `job_id`, with its history.
async fn one(q: &Queue, job_id: &str) -> Entry {
    let mut found = q
        .ledger_query(LedgerQuery {
            job_id: Some(job_id.to_owned()),
            history: true,
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "entries of job {job_id}: {found:?}");
    found.remove(0)
}

/// Ask `query` until `done` holds for the answer, or panic after 10 s.
async fn poll(q: &Queue, query: LedgerQuery, done: impl Fn(&[Entry]) -> bool) -> Vec<Entry> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = q.ledger_query(query.clone()).await.unwrap();
        if done(&found) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "the ledger never answered {query:?} as expected; last answer {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll with deadline
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

/// What a worker does when Centercode refuses the job: attempt and outcome in the ledger
/// first, then the job parked.
async fn park_as_a_worker_does(q: &Queue, l: &Leased) {
    q.ledger_record(
        facts_of(l, None),
        Some(attempt(l, Some(400), "parked")),
        Some(outcome("parked", Some(REJECTED))),
    )
    .await
    .unwrap();
    q.park(l, REJECTED, Some(400)).await.unwrap();
}

/// What a worker does when Centercode takes the job: the ledger first, then the ack.
async fn deliver_as_a_worker_does(q: &Queue, l: &Leased, subject_key: Option<&str>) {
    q.ledger_record(
        facts_of(l, subject_key),
        Some(attempt(l, Some(200), "done")),
        Some(outcome("delivered", None)),
    )
    .await
    .unwrap();
    q.ack(l).await.unwrap();
}

// ---- The contract -------------------------------------------------------------------------

async fn a_stored_job_is_listed_as_pending_before_any_attempt(s: &Store) {
    // Arrange
    let q = &s.queue;
    assert!(q.keeps_ledger());
    let j = new_job(1);
    let before = now_ms();
    // Act
    q.enqueue(vec![j.clone()]).await.unwrap();
    let after = now_ms();
    // Assert: listed as pending (RabbitMQ notes a stored job without the enqueue waiting).
    let pending = LedgerQuery {
        outcome: Some("pending".into()),
        history: true,
        ..query()
    };
    let listed = poll(q, pending.clone(), |found| !found.is_empty()).await;
    assert_eq!(ids(&listed), [j.id.as_str()]);
    let e = &listed[0];
    assert_eq!(
        e.facts,
        JobFacts {
            job_id: j.id.clone(),
            route: "gdpr".into(),
            action: "remove_user".into(),
            org_id: j.org_id.clone(),
            notification_id: j.notification_id.clone(),
            record_id: j.record_id.clone(),
            subject_key: None,
            received_at_ms: j.received_at_ms,
            stored_at_ms: e.facts.stored_at_ms,
        }
    );
    assert!(
        (before..=after).contains(&e.facts.stored_at_ms),
        "stored at {}, enqueued within {before}..={after}",
        e.facts.stored_at_ms
    );
    assert_eq!(
        (
            e.last_outcome.as_deref(),
            e.last_outcome_at_ms,
            e.last_status
        ),
        (None, None, None)
    );
    assert!(e.attempts.is_empty() && e.outcomes.is_empty() && e.payload.is_none());
    let incomplete = LedgerQuery {
        incomplete: true,
        ..query()
    };
    assert_eq!(
        ids(&q.ledger_query(incomplete.clone()).await.unwrap()),
        [j.id.as_str()]
    );
    let delivered = LedgerQuery {
        outcome: Some("delivered".into()),
        ..query()
    };
    assert!(q.ledger_query(delivered.clone()).await.unwrap().is_empty());

    // Act: a worker delivers it, recording the subject key it computed.
    let l = lease_n(q, 1).await.remove(0);
    deliver_as_a_worker_does(q, &l, Some("subject-1")).await;

    // Assert: still one entry (the stored one), now complete, with the subject key.
    let e = one(q, &j.id).await;
    assert_eq!(e.facts.stored_at_ms, listed[0].facts.stored_at_ms);
    assert_eq!(e.facts.subject_key.as_deref(), Some("subject-1"));
    assert_eq!(e.last_outcome.as_deref(), Some("delivered"));
    assert!(q.ledger_query(pending).await.unwrap().is_empty());
    assert!(q.ledger_query(incomplete).await.unwrap().is_empty());
    assert_eq!(
        ids(&q.ledger_query(delivered).await.unwrap()),
        [j.id.as_str()]
    );
}

async fn attempts_and_outcomes_are_kept_in_order_and_summarised(s: &Store) {
    // Arrange
    let q = &s.queue;
    let j = new_job(2);
    q.enqueue(vec![j.clone()]).await.unwrap();

    // Act + Assert: attempt 1, Centercode answers 503; retried.
    let l = lease_n(q, 1).await.remove(0);
    let a1 = attempt(&l, Some(503), "retry");
    q.ledger_record(facts_of(&l, None), Some(a1.clone()), None)
        .await
        .unwrap();
    q.retry(&l, now_ms(), "Centercode answered 503", Some(503))
        .await
        .unwrap();
    let e = one(q, &j.id).await;
    assert_eq!(
        (e.last_outcome.as_deref(), e.last_status),
        (None, Some(503))
    );
    assert_eq!(e.attempts, std::slice::from_ref(&a1));
    assert!(e.outcomes.is_empty());

    // Attempt 2: no answer (timeout); the summary keeps the last status Centercode gave.
    let l = lease_n(q, 1).await.remove(0);
    assert_eq!(l.attempts, 2);
    let a2 = attempt(&l, None, "retry");
    q.ledger_record(facts_of(&l, None), Some(a2.clone()), None)
        .await
        .unwrap();
    q.retry(&l, now_ms(), "timeout", None).await.unwrap();
    let e = one(q, &j.id).await;
    assert_eq!(
        (e.last_outcome.as_deref(), e.last_status),
        (None, Some(503))
    );

    // Attempt 3: 404, Centercode does not know the user: the job ends.
    let l = lease_n(q, 1).await.remove(0);
    assert_eq!(l.attempts, 3);
    let a3 = attempt(&l, Some(404), "user_not_found");
    let end = outcome("user_not_found", None);
    q.ledger_record(facts_of(&l, None), Some(a3.clone()), Some(end.clone()))
        .await
        .unwrap();
    q.ack(&l).await.unwrap();
    let e = one(q, &j.id).await;
    assert_eq!(e.attempts, [a1, a2, a3]);
    assert_eq!(e.outcomes, std::slice::from_ref(&end));
    assert_eq!(
        (
            e.last_outcome.as_deref(),
            e.last_outcome_at_ms,
            e.last_status
        ),
        (Some("user_not_found"), Some(end.at_ms), Some(404))
    );

    // An older outcome arriving late (a slower process) is listed in its place in time,
    // and the latest stays the latest.
    let stale = FinalOutcome {
        at_ms: end.at_ms - 1,
        ..outcome("parked", Some("a slow process"))
    };
    q.ledger_record(facts_of(&l, None), None, Some(stale))
        .await
        .unwrap();
    let e = one(q, &j.id).await;
    assert_eq!(outcomes(&e), ["parked", "user_not_found"]);
    assert_eq!(
        (e.last_outcome.as_deref(), e.last_outcome_at_ms),
        (Some("user_not_found"), Some(end.at_ms))
    );
    // Without history: the summary alone.
    let summary = q
        .ledger_query(LedgerQuery {
            job_id: Some(j.id.clone()),
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(summary.len(), 1);
    assert_eq!(
        (summary[0].last_outcome.as_deref(), summary[0].last_status),
        (Some("user_not_found"), Some(404))
    );
    assert!(summary[0].attempts.is_empty() && summary[0].outcomes.is_empty());
}

async fn an_outcome_written_twice_by_a_crash_before_the_ack_is_shown_once(s: &Store) {
    // Arrange: a worker records the delivery, then its process dies before the ack.
    let first = s.queue.clone();
    let j = new_job(3);
    first.enqueue(vec![j.clone()]).await.unwrap();
    let l = lease_n(&first, 1).await.remove(0);
    first
        .ledger_record(
            facts_of(&l, Some("subject-3")),
            Some(attempt(&l, Some(200), "done")),
            Some(outcome("delivered", None)),
        )
        .await
        .unwrap();
    first.close();
    drop(first);

    // Act: another process gets the job again and delivers it again.
    let second = s.reopen().await;
    let again = lease_n(&second, 1).await.remove(0);
    assert_eq!((again.id.as_str(), again.attempts), (j.id.as_str(), 2));
    deliver_as_a_worker_does(&second, &again, Some("subject-3")).await;

    // Assert: written twice, shown once; both attempts kept.
    let stored = s
        .count(&format!(
            "SELECT count(*) FROM ledger_outcomes WHERE job_id = '{}' AND outcome = 'delivered'",
            j.id
        ))
        .await;
    assert_eq!(stored, 2, "the crash wrote the outcome twice");
    let e = one(&second, &j.id).await;
    assert_eq!(outcomes(&e), ["delivered"]);
    assert_eq!(
        e.attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(e.last_outcome.as_deref(), Some("delivered"));
    let by_subject = second
        .ledger_query(LedgerQuery {
            subject_key: Some("subject-3".into()),
            history: true,
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(ids(&by_subject), [j.id.as_str()]);
    assert_eq!(outcomes(&by_subject[0]), ["delivered"]);
}

async fn replays_and_purges_of_parked_jobs_are_noted(s: &Store) {
    // Arrange: two jobs parked by a worker.
    let q = &s.queue;
    let (a, b) = (new_job(4), new_job(5));
    q.enqueue(vec![a.clone(), b.clone()]).await.unwrap();
    for l in lease_n(q, 2).await {
        park_as_a_worker_does(q, &l).await;
    }
    let stored_at = one(q, &a.id).await.facts.stored_at_ms;
    assert_eq!(outcomes(&one(q, &b.id).await), ["parked"]);

    // Act: replay one, purge the other.
    assert_eq!(q.replay(Some(vec![a.id.clone()])).await.unwrap(), 1);
    let only_b = ParkedFilter {
        ids: Some(vec![b.id.clone()]),
        ..ParkedFilter::default()
    };
    assert_eq!(q.purge_parked(only_b).await.unwrap(), 1);

    // Assert
    let ea = one(q, &a.id).await;
    assert_eq!(outcomes(&ea), ["parked", "replayed"]);
    assert_eq!(ea.outcomes[0].reason.as_deref(), Some(REJECTED));
    assert_eq!(ea.last_outcome.as_deref(), Some("replayed"));
    let eb = one(q, &b.id).await;
    assert_eq!(outcomes(&eb), ["parked", "purged"]);
    assert_eq!(eb.last_outcome.as_deref(), Some("purged"));
    let incomplete = LedgerQuery {
        incomplete: true,
        ..query()
    };
    assert_eq!(
        ids(&q.ledger_query(incomplete.clone()).await.unwrap()),
        [a.id.as_str()],
        "a replayed job is not complete; a purged one is"
    );

    // Act: parked again for the same reason, replayed again (by filter), then delivered.
    let l = lease_n(q, 1).await.remove(0);
    assert_eq!((l.id.as_str(), l.attempts), (a.id.as_str(), 1));
    park_as_a_worker_does(q, &l).await;
    let only_a = ParkedFilter {
        route: Some("gdpr".into()),
        ids: Some(vec![a.id.clone()]),
        ..ParkedFilter::default()
    };
    assert_eq!(q.replay_matching(only_a, None).await.unwrap(), 1);
    let l = lease_n(q, 1).await.remove(0);
    deliver_as_a_worker_does(q, &l, None).await;

    // Assert: every step shown (only copies of one outcome next to each other are one).
    let ea = one(q, &a.id).await;
    assert_eq!(
        outcomes(&ea),
        ["parked", "replayed", "parked", "replayed", "delivered"]
    );
    assert_eq!(ea.attempts.len(), 3);
    assert_eq!(
        ea.facts.stored_at_ms, stored_at,
        "a replay is not a new entry"
    );
    assert_eq!(ea.last_outcome.as_deref(), Some("delivered"));
    assert!(q.ledger_query(incomplete).await.unwrap().is_empty());
}

async fn each_filter_selects_its_entries(s: &Store) {
    // Arrange: six jobs an hour ago, one a millisecond apart.
    let q = &s.queue;
    let base = now_ms() - 3_600_000;
    let specs: [(&str, &str, Option<&str>, Option<&str>); 6] = [
        ("gdpr", "remove_user", Some("k1"), Some("delivered")),
        ("gdpr", "remove_user", Some("k2"), Some("user_not_found")),
        ("feedback", "create_feedback", None, Some("parked")),
        ("feedback", "create_feedback", None, None),
        ("gdpr", "store_user_data", Some("k1"), Some("replayed")),
        ("gdpr", "remove_user", Some("k3"), Some("purged")),
    ];
    let mut written = Vec::new();
    for (n, (route, action, key, ended)) in specs.into_iter().enumerate() {
        let f = JobFacts {
            route: route.into(),
            action: action.into(),
            subject_key: key.map(str::to_owned),
            ..facts(n as u32, base + n as i64)
        };
        let ended = ended.map(|o| FinalOutcome {
            at_ms: f.stored_at_ms + 10,
            ..outcome(o, None)
        });
        q.ledger_record(f.clone(), None, ended).await.unwrap();
        written.push(f);
    }
    let w = |i: usize| &written[i];
    let cases: Vec<(&str, LedgerQuery, Vec<usize>)> = vec![
        ("everything, newest first", query(), vec![5, 4, 3, 2, 1, 0]),
        (
            "job_id",
            LedgerQuery {
                job_id: Some(w(2).job_id.clone()),
                ..query()
            },
            vec![2],
        ),
        (
            "record_id",
            LedgerQuery {
                record_id: w(1).record_id.clone(),
                ..query()
            },
            vec![1],
        ),
        (
            "notification_id",
            LedgerQuery {
                notification_id: w(3).notification_id.clone(),
                ..query()
            },
            vec![3],
        ),
        (
            "subject_key",
            LedgerQuery {
                subject_key: Some("k1".into()),
                ..query()
            },
            vec![4, 0],
        ),
        (
            "route",
            LedgerQuery {
                route: Some("feedback".into()),
                ..query()
            },
            vec![3, 2],
        ),
        (
            "action",
            LedgerQuery {
                action: Some("remove_user".into()),
                ..query()
            },
            vec![5, 1, 0],
        ),
        (
            "outcome",
            LedgerQuery {
                outcome: Some("delivered".into()),
                ..query()
            },
            vec![0],
        ),
        (
            "outcome replayed",
            LedgerQuery {
                outcome: Some("replayed".into()),
                ..query()
            },
            vec![4],
        ),
        (
            "outcome pending",
            LedgerQuery {
                outcome: Some("pending".into()),
                ..query()
            },
            vec![3],
        ),
        (
            "since (inclusive)",
            LedgerQuery {
                since_ms: Some(base + 3),
                ..query()
            },
            vec![5, 4, 3],
        ),
        (
            "until (exclusive)",
            LedgerQuery {
                until_ms: Some(base + 3),
                ..query()
            },
            vec![2, 1, 0],
        ),
        (
            "since and until",
            LedgerQuery {
                since_ms: Some(base + 1),
                until_ms: Some(base + 4),
                ..query()
            },
            vec![3, 2, 1],
        ),
        (
            "incomplete: pending, parked, replayed",
            LedgerQuery {
                incomplete: true,
                ..query()
            },
            vec![4, 3, 2],
        ),
        (
            "route and incomplete",
            LedgerQuery {
                route: Some("gdpr".into()),
                incomplete: true,
                ..query()
            },
            vec![4],
        ),
        (
            "subject_key and action",
            LedgerQuery {
                subject_key: Some("k1".into()),
                action: Some("remove_user".into()),
                ..query()
            },
            vec![0],
        ),
        (
            "no match",
            LedgerQuery {
                record_id: Some("003000000000000999".into()),
                ..query()
            },
            vec![],
        ),
        (
            "limit",
            LedgerQuery {
                limit: 2,
                ..query()
            },
            vec![5, 4],
        ),
    ];
    // Act + Assert
    for (what, filter, expected) in cases {
        let got = ids(&q.ledger_query(filter).await.unwrap());
        let expected: Vec<String> = expected.iter().map(|&i| w(i).job_id.clone()).collect();
        assert_eq!(got, expected, "{what}");
    }
}

/// Every page of `filter` from the start, following each page's cursor as the admin API
/// hands it out (`LedgerCursor::after`, parsed back).
async fn page_through(q: &Queue, filter: LedgerQuery) -> Vec<String> {
    let mut seen = Vec::new();
    let mut after = None;
    for _ in 0..1_000 {
        let page = q
            .ledger_query(LedgerQuery {
                after: after.clone(),
                ..filter.clone()
            })
            .await
            .unwrap();
        assert!(
            page.len() <= filter.limit,
            "{} > {}",
            page.len(),
            filter.limit
        );
        seen.extend(ids(&page));
        let Some(last) = page.last().filter(|_| page.len() == filter.limit) else {
            return seen;
        };
        after = Some(LedgerCursor::parse(&LedgerCursor::after(last)).unwrap());
    }
    panic!("paging never ended");
}

async fn pages_follow_newest_first_without_duplicates_or_gaps(s: &Store) {
    // Arrange: 30 jobs stored four to a millisecond, so pages end inside groups of equal
    // stored_at; every third one is feedback.
    let q = &s.queue;
    let base = now_ms() - 7_200_000;
    let mut written: Vec<JobFacts> = (0..30u32)
        .map(|n| {
            let mut f = facts(n, base + i64::from(n / 4));
            if n % 3 == 0 {
                f.route = "feedback".into();
            }
            f
        })
        .collect();
    for r in futures_util::future::join_all(
        written
            .iter()
            .map(|f| q.ledger_record(f.clone(), None, None)),
    )
    .await
    {
        r.unwrap();
    }
    // Newest stored first; equal times by job id, descending.
    written.sort_by(|a, b| (b.stored_at_ms, &b.job_id).cmp(&(a.stored_at_ms, &a.job_id)));
    let order: Vec<String> = written.iter().map(|f| f.job_id.clone()).collect();

    // Act + Assert: the same order whatever the page size.
    for limit in [1, 3, 4, 7, 30, 100] {
        let all = page_through(q, LedgerQuery { limit, ..query() }).await;
        assert_eq!(all, order, "pages of {limit}");
    }
    let feedback: Vec<String> = written
        .iter()
        .filter(|f| f.route == "feedback")
        .map(|f| f.job_id.clone())
        .collect();
    let paged = page_through(
        q,
        LedgerQuery {
            route: Some("feedback".into()),
            limit: 2,
            ..query()
        },
    )
    .await;
    assert_eq!(paged, feedback, "pages of a filter");
    // Past the oldest entry: nothing.
    let after_last = LedgerQuery {
        after: Some(LedgerCursor::parse(&LedgerCursor::after(&one(q, &order[29]).await)).unwrap()),
        ..query()
    };
    assert!(q.ledger_query(after_last).await.unwrap().is_empty());
}

async fn a_kept_payload_is_shown_until_it_expires_then_retention_drops_it(s: &Store) {
    // Arrange: two delivered jobs whose route keeps payloads: one for an hour, one for 2 s.
    let q = &s.queue;
    let base = now_ms() - 60_000;
    let payload = json!({
        "type": "CalloutV1",
        "idempotency_key": null,
        "body": { "title": "Folder rename reverted after sync" }
    });
    let (kept, expiring) = (facts(1, base), facts(2, base + 1));
    for (f, keep_ms) in [(&kept, 3_600_000), (&expiring, 2_000)] {
        let ended = FinalOutcome {
            kept_payload: Some(KeptPayload {
                json: payload.to_string(),
                expires_at_ms: now_ms() + keep_ms,
            }),
            ..outcome("delivered", None)
        };
        q.ledger_record(f.clone(), None, Some(ended)).await.unwrap();
    }
    let not_kept = facts(3, base + 2);
    q.ledger_record(not_kept.clone(), None, Some(outcome("delivered", None)))
        .await
        .unwrap();

    // Assert: shown with the history (never in a summary) until it expires.
    assert_eq!(one(q, &kept.job_id).await.payload, Some(payload.clone()));
    assert_eq!(
        one(q, &expiring.job_id).await.payload,
        Some(payload.clone())
    );
    assert_eq!(one(q, &not_kept.job_id).await.payload, None);
    let summaries = q.ledger_query(query()).await.unwrap();
    assert!(summaries.iter().all(|e| e.payload.is_none()));
    let expiring_only = LedgerQuery {
        job_id: Some(expiring.job_id.clone()),
        history: true,
        ..query()
    };
    poll(q, expiring_only, |found| found[0].payload.is_none()).await;
    assert_eq!(
        s.count("SELECT count(*) FROM ledger_payloads").await,
        2,
        "expired, not shown, still stored until retention runs"
    );

    // Act: a retention pass with nothing old enough to forget.
    assert_eq!(q.ledger_purge_before(base - DAY_MS).await.unwrap(), 0);

    // Assert: the expired payload is gone from the store, the other one kept; the entries stay.
    let left = s
        .count(&format!(
            "SELECT count(*) FROM ledger_payloads WHERE job_id = '{}'",
            kept.job_id
        ))
        .await;
    assert_eq!(
        (s.count("SELECT count(*) FROM ledger_payloads").await, left),
        (1, 1)
    );
    assert_eq!(one(q, &kept.job_id).await.payload, Some(payload));
    let e = one(q, &expiring.job_id).await;
    assert_eq!(
        (e.payload, e.last_outcome.as_deref()),
        (None, Some("delivered"))
    );
}

async fn an_expired_payload_is_dropped_by_a_retention_pass_that_also_forgets_entries(s: &Store) {
    // Arrange: an entry past retention, and a recent one whose kept payload has expired.
    let q = &s.queue;
    let now = now_ms();
    let old = facts(1, now - 40 * DAY_MS);
    q.ledger_record(old, None, Some(outcome("delivered", None)))
        .await
        .unwrap();
    let recent = facts(2, now - 60_000);
    let ended = FinalOutcome {
        kept_payload: Some(KeptPayload {
            json: json!({"body": {"title": "Folder rename reverted after sync"}}).to_string(),
            expires_at_ms: now - 1,
        }),
        ..outcome("delivered", None)
    };
    q.ledger_record(recent.clone(), None, Some(ended))
        .await
        .unwrap();

    // Act: the minute's retention pass (30 days), which forgets the old entry.
    assert_eq!(q.ledger_purge_before(now - 30 * DAY_MS).await.unwrap(), 1);

    // Assert: the expired payload (personal data) left the store in the same pass, as it
    // does when nothing is forgotten; a busy relay forgets some entry every minute.
    assert_eq!(
        s.count("SELECT count(*) FROM ledger_payloads").await,
        0,
        "an expired kept payload is still stored after a retention pass that forgot an entry"
    );
    assert_eq!(one(q, &recent.job_id).await.payload, None);
}

async fn retention_forgets_entries_older_than_the_cutoff_in_batches(s: &Store) {
    // Arrange: more old entries than one retention batch, each with an attempt and an
    // outcome; three newer ones, the oldest of them stored exactly at the cutoff.
    let q = &s.queue;
    assert_eq!(q.ledger_oldest_ms().await.unwrap(), None, "an empty ledger");
    let now = now_ms();
    let cutoff = now - 30 * DAY_MS;
    let old = PURGE_BATCH + 150;
    let olds = (0..old).map(|n| facts(n as u32, cutoff - 1 - n as i64));
    let news: Vec<JobFacts> = [cutoff, cutoff + 1, now - 1_000]
        .into_iter()
        .enumerate()
        .map(|(n, at)| facts(900_000 + n as u32, at))
        .collect();
    let writes = olds.chain(news.iter().cloned()).map(|f| {
        let a = Attempt {
            attempt: 1,
            started_at_ms: f.stored_at_ms + 5,
            duration_ms: 3,
            status: Some(404),
            error_class: None,
            outcome: "user_not_found".into(),
            response: None,
        };
        let o = FinalOutcome {
            at_ms: f.stored_at_ms + 10,
            ..outcome("user_not_found", None)
        };
        q.ledger_record(f, Some(a), Some(o))
    });
    for r in futures_util::future::join_all(writes).await {
        r.unwrap();
    }
    assert_eq!(
        q.ledger_oldest_ms().await.unwrap(),
        Some(cutoff - old as i64)
    );

    // Act
    let forgotten = q.ledger_purge_before(cutoff).await.unwrap();

    // Assert: every older entry forgotten (over several batches), the newer ones kept whole.
    assert_eq!(forgotten, old as u64);
    assert!(forgotten > PURGE_BATCH as u64);
    assert_eq!(q.ledger_oldest_ms().await.unwrap(), Some(cutoff));
    let left = q
        .ledger_query(LedgerQuery {
            history: true,
            limit: 1_000,
            ..query()
        })
        .await
        .unwrap();
    let newest_first: Vec<String> = news.iter().rev().map(|f| f.job_id.clone()).collect();
    assert_eq!(ids(&left), newest_first);
    assert!(left
        .iter()
        .all(|e| e.attempts.len() == 1 && outcomes(e) == ["user_not_found"]));
    for table in ["ledger_jobs", "ledger_attempts", "ledger_outcomes"] {
        assert_eq!(
            s.count(&format!("SELECT count(*) FROM {table}")).await,
            3,
            "{table} keeps only the newer entries' rows"
        );
    }
    assert_eq!(q.ledger_purge_before(cutoff).await.unwrap(), 0);
    assert_eq!(q.ledger_purge_before(now + 1).await.unwrap(), 3);
    assert_eq!(q.ledger_oldest_ms().await.unwrap(), None);
}

// ---- Both ledgers -------------------------------------------------------------------------

/// One test per behaviour and ledger: `embedded::…` and `rabbitmq_postgresql::…`.
macro_rules! on_both_ledgers {
    ($($behaviour:ident),+ $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let store = super::embedded().await;
                    super::$behaviour(&store).await;
                    store.done().await;
                }
            )+
        }
        mod rabbitmq_postgresql {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let store = super::rabbit().await;
                    super::$behaviour(&store).await;
                    store.done().await;
                }
            )+
        }
    };
}

on_both_ledgers!(
    a_stored_job_is_listed_as_pending_before_any_attempt,
    attempts_and_outcomes_are_kept_in_order_and_summarised,
    an_outcome_written_twice_by_a_crash_before_the_ack_is_shown_once,
    replays_and_purges_of_parked_jobs_are_noted,
    each_filter_selects_its_entries,
    pages_follow_newest_first_without_duplicates_or_gaps,
    a_kept_payload_is_shown_until_it_expires_then_retention_drops_it,
    an_expired_payload_is_dropped_by_a_retention_pass_that_also_forgets_entries,
    retention_forgets_entries_older_than_the_cutoff_in_batches,
);
