//! The ledger in PostgreSQL (`ledger.url`), for the RabbitMQ backend: every relay process
//! writes to it and any process answers queries. Writes from all of a process's workers go
//! through one writer task that commits them in batches (one transaction for whatever is
//! waiting), so a worker waits for a group commit, never for a round trip of its own per
//! attempt; it still waits, because an outcome must be in the ledger before the job is acked.
//! The schema is created (and migrated) at start.

use super::{Attempt, Entry, FinalOutcome, JobFacts, LedgerQuery, SqlArg};
use crate::queue::QueueError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, NoTls};

/// Connections for queries (the writer has its own).
const READERS: usize = 2;
/// Most writes in one transaction.
const MAX_BATCH: usize = 256;

/// The current schema version; each step below brings an older one forward.
const MIGRATIONS: [&str; 2] = [
    "
CREATE TABLE IF NOT EXISTS ledger_jobs (
    job_id          TEXT PRIMARY KEY,
    route           TEXT NOT NULL,
    action          TEXT NOT NULL,
    org_id          TEXT,
    notification_id TEXT,
    record_id       TEXT,
    subject_key     TEXT,
    received_at     BIGINT NOT NULL,
    stored_at       BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_record ON ledger_jobs (record_id);
CREATE INDEX IF NOT EXISTS ledger_by_notification ON ledger_jobs (notification_id);
CREATE INDEX IF NOT EXISTS ledger_by_subject ON ledger_jobs (subject_key);
CREATE INDEX IF NOT EXISTS ledger_by_stored ON ledger_jobs (stored_at);
CREATE TABLE IF NOT EXISTS ledger_attempts (
    job_id      TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    started_at  BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    status      INTEGER,
    error_class TEXT,
    outcome     TEXT NOT NULL,
    response    TEXT,
    PRIMARY KEY (job_id, started_at, attempt)
);
CREATE TABLE IF NOT EXISTS ledger_outcomes (
    seq     BIGSERIAL PRIMARY KEY,
    job_id  TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason  TEXT,
    at      BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_outcomes_by_job ON ledger_outcomes (job_id, at);
CREATE TABLE IF NOT EXISTS ledger_payloads (
    job_id     TEXT PRIMARY KEY,
    payload    TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
",
    "
ALTER TABLE ledger_jobs ADD COLUMN IF NOT EXISTS last_outcome TEXT;
ALTER TABLE ledger_jobs ADD COLUMN IF NOT EXISTS last_outcome_at BIGINT;
ALTER TABLE ledger_jobs ADD COLUMN IF NOT EXISTS last_status INTEGER;
CREATE INDEX IF NOT EXISTS ledger_payloads_expiry ON ledger_payloads (expires_at);
",
];

enum Op {
    Record(Box<(JobFacts, Option<Attempt>, Option<FinalOutcome>)>),
    Note(String, String, i64),
}

struct Write {
    op: Op,
    done: oneshot::Sender<Result<(), String>>,
}

/// A handle to the PostgreSQL ledger; cheap to clone.
#[derive(Clone)]
pub struct PgLedger {
    writes: mpsc::Sender<Write>,
    /// Query connections, each replaced by a new one when it closed (the database restarted).
    readers: Arc<Vec<tokio::sync::RwLock<Client>>>,
    target: Arc<Target>,
    next: Arc<AtomicUsize>,
    /// Record each job when it is stored (`ledger.record_on_store`), not only when a worker
    /// first takes it.
    store_notes: bool,
}

fn db(e: tokio_postgres::Error) -> QueueError {
    // The error text names the statement problem, never connection secrets.
    QueueError::NotReady(format!("ledger database: {e}"))
}

/// Where the ledger lives: the database and the schema inside it.
struct Target {
    url: String,
    schema: String,
}

/// How long a connection attempt may take before the write or query that needed it fails.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn connect(target: &Target) -> Result<Client, QueueError> {
    let mut config: tokio_postgres::Config = target.url.parse().map_err(db)?;
    // Named in pg_stat_activity, so a DBA sees whose connections these are.
    if config.get_application_name().is_none() {
        config.application_name("centercode-relay");
    }
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls))
        .await
        .map_err(|_| QueueError::NotReady("ledger database: connection timed out".into()))?
        .map_err(db)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "ledger database connection ended");
        }
    });
    let schema = &target.schema;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; SET search_path TO \"{schema}\""
        ))
        .await
        .map_err(db)?;
    Ok(client)
}

impl PgLedger {
    /// Connect, apply the migrations the database lacks, start the writer.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, QueueError> {
        if !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(QueueError::NotReady(
                "ledger.schema: letters, digits, '_' or '-'".into(),
            ));
        }
        let target = Arc::new(Target {
            url: url.to_owned(),
            schema: schema.to_owned(),
        });
        let writer = connect(&target).await?;
        migrate(&writer).await?;
        let mut readers = Vec::new();
        for _ in 0..READERS {
            readers.push(tokio::sync::RwLock::new(connect(&target).await?));
        }
        let (writes, rx) = mpsc::channel(4096);
        tokio::spawn(write_batches(target.clone(), writer, rx));
        Ok(Self {
            writes,
            readers: Arc::new(readers),
            target,
            next: Arc::default(),
            store_notes: true,
        })
    }

    /// Whether a job is recorded when it is stored (else when a worker first takes it).
    pub fn with_store_notes(mut self, on: bool) -> Self {
        self.store_notes = on;
        self
    }

    pub fn notes_stored_jobs(&self) -> bool {
        self.store_notes
    }

    async fn submit(&self, op: Op) -> Result<(), QueueError> {
        let (done, rx) = oneshot::channel();
        self.writes
            .send(Write { op, done })
            .await
            .map_err(|_| QueueError::Closed)?;
        rx.await
            .map_err(|_| QueueError::Closed)?
            .map_err(|e| QueueError::NotReady(format!("ledger write: {e}")))
    }

    /// Note a job just stored, without waiting (the ack must not wait on the ledger): if the
    /// writer is backed up or the write fails, the worker records the same facts later.
    pub fn stored(&self, facts: JobFacts) {
        if self.store_notes {
            self.taken(facts);
        }
    }

    /// Note a job a worker took but set aside (a paused route's), without waiting: where
    /// jobs enter the ledger when first taken, this is when.
    pub fn taken(&self, facts: JobFacts) {
        let (done, _) = oneshot::channel();
        let _ = self.writes.try_send(Write {
            op: Op::Record(Box::new((facts, None, None))),
            done,
        });
    }

    pub async fn record(
        &self,
        facts: JobFacts,
        attempt: Option<Attempt>,
        outcome: Option<FinalOutcome>,
    ) -> Result<(), QueueError> {
        self.submit(Op::Record(Box::new((facts, attempt, outcome))))
            .await
    }

    /// An outcome of a job already in the ledger (replayed, purged).
    pub async fn note(&self, job_id: &str, outcome: &str) -> Result<(), QueueError> {
        self.submit(Op::Note(
            job_id.to_owned(),
            outcome.to_owned(),
            crate::queue::now_ms(),
        ))
        .await
    }

    /// A query connection, connected again first if the last one closed.
    async fn reader(&self) -> Result<tokio::sync::RwLockReadGuard<'_, Client>, QueueError> {
        let slot = &self.readers[self.next.fetch_add(1, Ordering::Relaxed) % self.readers.len()];
        {
            let client = slot.read().await;
            if !client.is_closed() {
                return Ok(client);
            }
        }
        let mut client = slot.write().await;
        if client.is_closed() {
            *client = connect(&self.target).await?;
            tracing::info!("ledger database connection for queries made again");
        }
        Ok(tokio::sync::RwLockWriteGuard::downgrade(client))
    }

    pub async fn query(&self, q: LedgerQuery) -> Result<Vec<Entry>, QueueError> {
        let client = self.reader().await?;
        let (sql, args) = super::select_sql(&q, |n| format!("${n}"));
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
            .iter()
            .map(|a| -> &(dyn tokio_postgres::types::ToSql + Sync) {
                match a {
                    SqlArg::Text(t) => t,
                    SqlArg::Int(i) => i,
                }
            })
            .collect();
        let mut entries: Vec<Entry> = client
            .query(&sql, &params)
            .await
            .map_err(db)?
            .iter()
            .map(|r| Entry {
                facts: JobFacts {
                    job_id: r.get(0),
                    route: r.get(1),
                    action: r.get(2),
                    org_id: r.get(3),
                    notification_id: r.get(4),
                    record_id: r.get(5),
                    subject_key: r.get(6),
                    stored_at_ms: r.get(7),
                    received_at_ms: r.get(8),
                },
                last_outcome: r.get(9),
                last_outcome_at_ms: r.get(10),
                last_status: r.get::<_, Option<i32>>(11).map(|s| s as u16),
                attempts: Vec::new(),
                outcomes: Vec::new(),
                payload: None,
            })
            .collect();
        if !q.history {
            return Ok(entries);
        }
        for e in &mut entries {
            let id = &e.facts.job_id;
            e.attempts = client
                .query(
                    "SELECT attempt, started_at, duration_ms, status, error_class, outcome, response
                     FROM ledger_attempts WHERE job_id = $1 ORDER BY started_at, attempt",
                    &[id],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|a| Attempt {
                    attempt: a.get::<_, i64>(0) as u32,
                    started_at_ms: a.get(1),
                    duration_ms: a.get(2),
                    status: a.get::<_, Option<i32>>(3).map(|s| s as u16),
                    error_class: a.get(4),
                    outcome: a.get(5),
                    response: a.get(6),
                })
                .collect();
            e.outcomes = super::dedup_outcomes(
                client
                    .query(
                        "SELECT outcome, reason, at FROM ledger_outcomes WHERE job_id = $1 ORDER BY at, seq",
                        &[id],
                    )
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|o| FinalOutcome {
                        outcome: o.get(0),
                        reason: o.get(1),
                        at_ms: o.get(2),
                        kept_payload: None,
                    })
                    .collect(),
            );
            let payload: Option<String> = client
                .query_opt(
                    "SELECT payload FROM ledger_payloads WHERE job_id = $1 AND expires_at > $2",
                    &[id, &crate::queue::now_ms()],
                )
                .await
                .map_err(db)?
                .map(|r| r.get(0));
            e.payload = payload.and_then(|p| serde_json::from_str(&p).ok());
        }
        Ok(entries)
    }

    /// Retention: forget entries stored before `before_ms`, a bounded batch per transaction;
    /// also drops expired kept payloads.
    pub async fn purge_before(&self, before_ms: i64) -> Result<u64, QueueError> {
        let client = self.reader().await?;
        let mut total = 0;
        loop {
            let n = client
                .execute(
                    "WITH gone AS (
                         DELETE FROM ledger_jobs WHERE job_id IN (
                             SELECT job_id FROM ledger_jobs WHERE stored_at < $1 ORDER BY stored_at LIMIT $2)
                         RETURNING job_id),
                     a AS (DELETE FROM ledger_attempts WHERE job_id IN (SELECT job_id FROM gone)),
                     o AS (DELETE FROM ledger_outcomes WHERE job_id IN (SELECT job_id FROM gone)),
                     p AS (DELETE FROM ledger_payloads WHERE job_id IN (SELECT job_id FROM gone))
                     SELECT 1 FROM gone",
                    &[&before_ms, &(super::PURGE_BATCH as i64)],
                )
                .await
                .map_err(db)?;
            total += n;
            if n < super::PURGE_BATCH as u64 {
                break;
            }
        }
        client
            .execute(
                "DELETE FROM ledger_payloads WHERE expires_at <= $1",
                &[&crate::queue::now_ms()],
            )
            .await
            .map_err(db)?;
        Ok(total)
    }

    /// Per route, the jobs not completed by state as the ledger knows them: `ready` (never
    /// attempted), `retrying` (attempted, not ended), `parked`; a job being delivered counts
    /// in the state it had before (the ledger does not see leases).
    pub async fn route_stats(
        &self,
    ) -> Result<std::collections::BTreeMap<String, crate::queue::QueueStats>, QueueError> {
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT route,
                        CASE WHEN last_outcome = 'parked' THEN 'parked'
                             WHEN EXISTS (SELECT 1 FROM ledger_attempts a WHERE a.job_id = j.job_id) THEN 'retrying'
                             ELSE 'ready' END AS class,
                        count(*), min(stored_at)
                 FROM ledger_jobs j
                 WHERE last_outcome IS NULL OR last_outcome IN ('parked', 'replayed')
                 GROUP BY 1, 2",
                &[],
            )
            .await
            .map_err(db)?;
        let mut out: std::collections::BTreeMap<String, crate::queue::QueueStats> =
            std::collections::BTreeMap::new();
        for r in rows {
            let s = out.entry(r.get(0)).or_default();
            let (n, oldest): (i64, Option<i64>) = (r.get(2), r.get(3));
            match r.get::<_, &str>(1) {
                "parked" => (s.parked, s.oldest_parked_ms) = (n as u64, oldest),
                "retrying" => (s.retrying, s.oldest_retrying_ms) = (n as u64, oldest),
                _ => (s.ready, s.oldest_ready_ms) = (n as u64, oldest),
            }
        }
        Ok(out)
    }

    /// When the oldest entry was stored (ms since the epoch), if there is one.
    pub async fn oldest_ms(&self) -> Result<Option<i64>, QueueError> {
        let row = self
            .reader()
            .await?
            .query_one("SELECT min(stored_at) FROM ledger_jobs", &[])
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }
}

/// Bring the schema to the current version, one step at a time, under an advisory lock so
/// processes starting together do not race.
async fn migrate(client: &Client) -> Result<(), QueueError> {
    client
        .batch_execute(
            "SELECT pg_advisory_lock(727274); CREATE TABLE IF NOT EXISTS ledger_schema (version INTEGER NOT NULL)",
        )
        .await
        .map_err(db)?;
    let result = async {
        let version: i32 = client
            .query_opt("SELECT version FROM ledger_schema", &[])
            .await?
            .map(|r| r.get(0))
            .unwrap_or(0);
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            client.batch_execute(step).await?;
            client.execute("DELETE FROM ledger_schema", &[]).await?;
            client
                .execute(
                    "INSERT INTO ledger_schema (version) VALUES ($1)",
                    &[&(i as i32 + 1)],
                )
                .await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    }
    .await;
    let _ = client
        .batch_execute("SELECT pg_advisory_unlock(727274)")
        .await;
    result.map_err(db)
}

/// The writer's statements, prepared once: executing one is then a single message, and the
/// statements of a batch are pipelined (sent together, answered in order), so a batch costs a
/// few round trips whatever its size.
struct Statements {
    jobs: tokio_postgres::Statement,
    attempt: tokio_postgres::Statement,
    status: tokio_postgres::Statement,
    outcome: tokio_postgres::Statement,
    last_outcome: tokio_postgres::Statement,
    payload: tokio_postgres::Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            // Every job of a batch in one statement (arrays, one row each): at ingest the
            // store notes of many requests cost PostgreSQL one insert, not one each.
            jobs: client
                .prepare(
                    "INSERT INTO ledger_jobs (job_id, route, action, org_id, notification_id, record_id, subject_key, stored_at, received_at)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[], $9::bigint[])
                     ON CONFLICT (job_id) DO UPDATE SET subject_key = coalesce(ledger_jobs.subject_key, excluded.subject_key)",
                )
                .await?,
            attempt: client
                .prepare(
                    "INSERT INTO ledger_attempts (job_id, attempt, started_at, duration_ms, status, error_class, outcome, response)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (job_id, started_at, attempt) DO NOTHING",
                )
                .await?,
            status: client
                .prepare("UPDATE ledger_jobs SET last_status = $2 WHERE job_id = $1")
                .await?,
            outcome: client
                .prepare("INSERT INTO ledger_outcomes (job_id, outcome, reason, at) VALUES ($1, $2, $3, $4)")
                .await?,
            // The summary keeps the latest outcome (an older one arriving late changes nothing).
            last_outcome: client
                .prepare(
                    "UPDATE ledger_jobs SET last_outcome = $2, last_outcome_at = $3
                     WHERE job_id = $1 AND coalesce(last_outcome_at, 0) <= $3",
                )
                .await?,
            payload: client
                .prepare(
                    "INSERT INTO ledger_payloads (job_id, payload, expires_at) VALUES ($1, $2, $3)
                     ON CONFLICT (job_id) DO UPDATE SET payload = excluded.payload, expires_at = excluded.expires_at",
                )
                .await?,
        })
    }
}

/// The writer: one transaction per batch of waiting writes, then every waiter is answered.
async fn write_batches(target: Arc<Target>, client: Client, mut rx: mpsc::Receiver<Write>) {
    // The connection and its prepared statements; None after the connection closed (the
    // database restarted or went away): the next batch connects again, and until that works
    // each batch fails (its workers try again shortly, then leave the job to its lease).
    let mut conn = match Statements::prepare(&client).await {
        Ok(statements) => Some((client, statements)),
        Err(e) => {
            tracing::error!(error = %e, "could not prepare the ledger's statements; connecting again for the next write");
            None
        }
    };
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        if !matches!(&conn, Some((client, _)) if !client.is_closed()) {
            conn = match reconnect(&target).await {
                Ok(c) => {
                    tracing::info!("ledger database connection for writes made again");
                    Some(c)
                }
                Err(e) => {
                    tracing::warn!(error = %e, writes = batch.len(), "ledger database unreachable; batch failed");
                    for w in batch {
                        let _ = w.done.send(Err(e.clone()));
                    }
                    continue;
                }
            };
        }
        let (client, statements) = conn.as_mut().expect("connected above");
        let result = write_one_batch(client, statements, &batch)
            .await
            .map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::warn!(error = %e, writes = batch.len(), "ledger batch failed");
        }
        for w in batch {
            let _ = w.done.send(result.clone());
        }
    }
}

/// A new write connection with its statements prepared.
async fn reconnect(target: &Target) -> Result<(Client, Statements), String> {
    let client = connect(target).await.map_err(|e| e.to_string())?;
    let statements = Statements::prepare(&client)
        .await
        .map_err(|e| format!("ledger statements: {e}"))?;
    Ok((client, statements))
}

async fn write_one_batch(
    client: &mut Client,
    st: &Statements,
    batch: &[Write],
) -> Result<(), tokio_postgres::Error> {
    use tokio_postgres::types::ToSql;
    type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;
    let tx = client.transaction().await?;
    // Owned values the parameters borrow, made first so the statements can be queued at once.
    let values: Vec<(Option<i64>, Option<i32>, Option<i32>)> = batch
        .iter()
        .map(|w| match &w.op {
            Op::Record(r) => match &r.1 {
                Some(a) => (
                    Some(i64::from(a.attempt)),
                    a.status.map(i32::from),
                    a.status.map(i32::from),
                ),
                None => (None, None, None),
            },
            Op::Note(..) => (None, None, None),
        })
        .collect();
    let no_reason: Option<String> = None;
    // The batch's jobs, once each (a store note and a worker's record of one job may share a
    // batch; one INSERT may not touch a row twice), keeping a subject key either one has.
    let mut facts: Vec<&JobFacts> = Vec::new();
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for w in batch {
        if let Op::Record(record) = &w.op {
            let f = &record.0;
            match seen.get(f.job_id.as_str()) {
                Some(&i) if facts[i].subject_key.is_none() => facts[i] = f,
                Some(_) => {}
                None => {
                    seen.insert(&f.job_id, facts.len());
                    facts.push(f);
                }
            }
        }
    }
    let column =
        |get: fn(&JobFacts) -> Option<String>| facts.iter().map(|f| get(f)).collect::<Vec<_>>();
    let ids: Vec<&str> = facts.iter().map(|f| f.job_id.as_str()).collect();
    let routes: Vec<&str> = facts.iter().map(|f| f.route.as_str()).collect();
    let actions: Vec<&str> = facts.iter().map(|f| f.action.as_str()).collect();
    let (orgs, notifications, records, subjects) = (
        column(|f| f.org_id.clone()),
        column(|f| f.notification_id.clone()),
        column(|f| f.record_id.clone()),
        column(|f| f.subject_key.clone()),
    );
    let stored: Vec<i64> = facts.iter().map(|f| f.stored_at_ms).collect();
    let received: Vec<i64> = facts.iter().map(|f| f.received_at_ms).collect();
    let mut calls: Vec<(&tokio_postgres::Statement, Params<'_>)> = Vec::new();
    if !facts.is_empty() {
        calls.push((
            &st.jobs,
            vec![
                &ids,
                &routes,
                &actions,
                &orgs,
                &notifications,
                &records,
                &subjects,
                &stored,
                &received,
            ],
        ));
    }
    for (w, (attempt_no, status, last_status)) in batch.iter().zip(&values) {
        match &w.op {
            Op::Record(record) => {
                let (f, attempt, outcome) = &**record;
                if let (Some(a), Some(n)) = (attempt, attempt_no) {
                    calls.push((
                        &st.attempt,
                        vec![
                            &f.job_id,
                            n,
                            &a.started_at_ms,
                            &a.duration_ms,
                            status,
                            &a.error_class,
                            &a.outcome,
                            &a.response,
                        ],
                    ));
                    if last_status.is_some() {
                        calls.push((&st.status, vec![&f.job_id, last_status]));
                    }
                }
                if let Some(o) = outcome {
                    calls.push((
                        &st.outcome,
                        vec![&f.job_id, &o.outcome, &o.reason, &o.at_ms],
                    ));
                    calls.push((&st.last_outcome, vec![&f.job_id, &o.outcome, &o.at_ms]));
                    if let Some(kept) = &o.kept_payload {
                        calls.push((
                            &st.payload,
                            vec![&f.job_id, &kept.json, &kept.expires_at_ms],
                        ));
                    }
                }
            }
            Op::Note(job_id, outcome, at) => {
                calls.push((&st.outcome, vec![job_id, outcome, &no_reason, at]));
                calls.push((&st.last_outcome, vec![job_id, outcome, at]));
            }
        }
    }
    // Polled together, the executions are written to the connection in this order and the
    // server runs them in that order: each row exists before the update that follows it.
    futures_util::future::try_join_all(
        calls.iter().map(|(stmt, params)| tx.execute(*stmt, params)),
    )
    .await?;
    tx.commit().await
}
