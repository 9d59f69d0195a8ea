//! The embedded durable queue: one SQLite file (WAL, `synchronous=FULL`) written by one
//! thread that commits whatever requests are waiting in one transaction (group commit), so
//! concurrent requests share an fsync instead of queueing for one each.

use super::{
    now_ms, EnqueueOutcome, Job, Leased, NewJob, ParkedFilter, ParkedJob, QueueError, QueueStats,
};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

type Finish = Box<dyn FnOnce(Result<(), String>) + Send>;
/// One request's part of a write transaction: what to tell the caller once the COMMIT is
/// known, and whether the work met a full disk.
type Work = Box<dyn FnOnce(&Connection) -> (Finish, bool) + Send>;

/// Most requests folded into one transaction.
const MAX_BATCH: usize = 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY,
    route           TEXT NOT NULL,
    action          TEXT NOT NULL,
    org_id          TEXT,
    notification_id TEXT,
    record_id       TEXT,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('queued', 'parked')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    first_seen      INTEGER NOT NULL,
    age_from        INTEGER NOT NULL,
    available_at    INTEGER NOT NULL,
    lease_until     INTEGER NOT NULL DEFAULT 0,
    lease_token     TEXT,
    last_error      TEXT,
    last_status     INTEGER,
    parked_at       INTEGER,
    park_reason     TEXT,
    replays         INTEGER NOT NULL DEFAULT 0,
    history         TEXT,
    received_at     INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, available_at);
-- Leasing while routes are paused: each other route's due jobs by index, never walking past
-- a paused route's backlog.
CREATE INDEX IF NOT EXISTS jobs_route_due ON jobs (state, route, available_at);
CREATE TABLE IF NOT EXISTS dedupe (
    key        TEXT PRIMARY KEY,
    job_id     TEXT NOT NULL,
    body_hash  TEXT,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dedupe_expiry ON dedupe (expires_at);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
-- The delivery ledger (src/ledger.rs): no payloads, no e-mails.
CREATE TABLE IF NOT EXISTS ledger_jobs (
    job_id          TEXT PRIMARY KEY,
    route           TEXT NOT NULL,
    action          TEXT NOT NULL,
    org_id          TEXT,
    notification_id TEXT,
    record_id       TEXT,
    subject_key     TEXT,
    received_at     INTEGER NOT NULL,
    stored_at       INTEGER NOT NULL,
    last_outcome    TEXT,
    last_outcome_at INTEGER,
    last_status     INTEGER
);
CREATE INDEX IF NOT EXISTS ledger_by_record ON ledger_jobs (record_id);
CREATE INDEX IF NOT EXISTS ledger_by_notification ON ledger_jobs (notification_id);
CREATE INDEX IF NOT EXISTS ledger_by_subject ON ledger_jobs (subject_key);
CREATE INDEX IF NOT EXISTS ledger_by_stored ON ledger_jobs (stored_at);
CREATE TABLE IF NOT EXISTS ledger_attempts (
    job_id      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    status      INTEGER,
    error_class TEXT,
    outcome     TEXT NOT NULL,
    response    TEXT,
    -- attempts restart at 1 after a replay; a crash may record the same attempt twice
    PRIMARY KEY (job_id, started_at, attempt)
);
CREATE TABLE IF NOT EXISTS ledger_outcomes (
    job_id  TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason  TEXT,
    at      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_outcomes_by_job ON ledger_outcomes (job_id, at);
-- Payloads kept on purpose (a route's keep_payload_days), until they expire.
CREATE TABLE IF NOT EXISTS ledger_payloads (
    job_id     TEXT PRIMARY KEY,
    payload    TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_payloads_expiry ON ledger_payloads (expires_at);
-- Per-record order (src/ordering.rs): newest version seen and delivered, who delivers now.
CREATE TABLE IF NOT EXISTS record_versions (
    key        TEXT PRIMARY KEY,
    seen       INTEGER,
    delivered  INTEGER,
    held       INTEGER,
    holders    INTEGER NOT NULL DEFAULT 0,
    held_until INTEGER NOT NULL DEFAULT 0,
    touched    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS record_versions_touched ON record_versions (touched);
-- Rate limits (src/ratelimit.rs): each limit's GCRA state, shared by every process on the file.
CREATE TABLE IF NOT EXISTS rate_limits (
    name            TEXT PRIMARY KEY,
    tat_us          INTEGER NOT NULL,
    slowed_until_us INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (k, v) VALUES ('schema_version', '1');
";

/// Handle to the embedded queue; cheap to clone.
#[derive(Clone)]
pub struct SqliteQueue {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Option<mpsc::Sender<Work>>>,
    reader: Mutex<Connection>,
    notify: Notify,
    /// Transactions committed so far: with group commit, far fewer than requests.
    commits: Arc<std::sync::atomic::AtomicU64>,
    lease_ms: i64,
    dedupe_ttl_ms: i64,
    path: PathBuf,
    /// When an enqueue last failed (disk full, I/O error); cleared by the next success.
    last_enqueue_failure: Mutex<Option<std::time::Instant>>,
    /// Whether the delivery ledger is kept (`ledger.enabled`).
    ledger: std::sync::atomic::AtomicBool,
}

/// How long a failed enqueue keeps readiness down unless an enqueue succeeds first.
const FAILURE_MEMORY: Duration = Duration::from_secs(30);

fn open_connection(path: &Path) -> Result<Connection, QueueError> {
    let conn = Connection::open(path)?;
    // WAL lets readers run beside the writer; synchronous=FULL fsyncs the WAL on every commit,
    // which is what makes an acknowledged message survive power loss, not just a crash.
    conn.execute_batch(
        // secure_delete: a delivered job's payload (e-mails, field values) is overwritten when
        // its row is deleted, not left in free pages of the file.
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA secure_delete = ON;",
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

impl SqliteQueue {
    /// Open (or create) the queue file and start its writer thread.
    pub fn open(
        path: &Path,
        lease: Duration,
        dedupe_ttl: Duration,
        commit_delay: Duration,
    ) -> Result<Self, QueueError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let writer_conn = open_connection(path)?;
        writer_conn.execute_batch(SCHEMA)?;
        // Files from before `received_at`: add the column (older rows read it as stored time).
        let has_received: i64 = writer_conn.query_row(
            "SELECT count(*) FROM pragma_table_info('jobs') WHERE name = 'received_at'",
            [],
            |r| r.get(0),
        )?;
        if has_received == 0 {
            writer_conn.execute_batch("ALTER TABLE jobs ADD COLUMN received_at INTEGER")?;
        }
        // Ledgers from before the summary columns: add them (older entries read as pending).
        for (col, ty) in [
            ("last_outcome", "TEXT"),
            ("last_outcome_at", "INTEGER"),
            ("last_status", "INTEGER"),
        ] {
            let has: i64 = writer_conn.query_row(
                "SELECT count(*) FROM pragma_table_info('ledger_jobs') WHERE name = ?1",
                [col],
                |r| r.get(0),
            )?;
            if has == 0 {
                writer_conn
                    .execute_batch(&format!("ALTER TABLE ledger_jobs ADD COLUMN {col} {ty}"))?;
            }
        }
        let reader = open_connection(path)?;
        let (tx, rx) = mpsc::channel::<Work>();
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = commits.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(writer_conn, rx, commit_delay, &counter))?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(Some(tx)),
                reader: Mutex::new(reader),
                notify: Notify::new(),
                commits,
                lease_ms: lease.as_millis() as i64,
                dedupe_ttl_ms: dedupe_ttl.as_millis() as i64,
                path: path.to_owned(),
                last_enqueue_failure: Mutex::new(None),
                ledger: std::sync::atomic::AtomicBool::new(true),
            }),
        })
    }

    /// Keep the delivery ledger or not (`ledger.enabled`; on by default).
    pub fn set_ledger_enabled(&self, on: bool) {
        self.inner
            .ledger
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn keeps_ledger(&self) -> bool {
        self.inner.ledger.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Transactions committed since the queue was opened.
    pub fn commits(&self) -> u64 {
        self.inner
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Stop the writer after the work already sent; later calls fail with `Closed`.
    pub fn close(&self) {
        self.inner.writer.lock().expect("writer lock").take();
    }

    /// Run `f` inside the writer's next transaction; resolves only after COMMIT returned.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (tx, rx) = oneshot::channel();
        let work: Work = Box::new(move |conn: &Connection| {
            // A savepoint per request: one request's failure leaves the others of the batch intact.
            let result = conn
                .execute_batch("SAVEPOINT req")
                .map_err(QueueError::from)
                .and_then(|_| f(conn));
            let undo = if result.is_ok() {
                conn.execute_batch("RELEASE req")
            } else {
                conn.execute_batch("ROLLBACK TO req; RELEASE req")
            };
            let result = match (result, undo) {
                (Ok(_), Err(e)) => Err(QueueError::from(e)),
                (r, _) => r,
            };
            let disk_full = matches!(&result, Err(QueueError::Storage(e)) if is_disk_full(e));
            let finish: Finish = Box::new(move |commit: Result<(), String>| {
                let out = match (result, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => Err(QueueError::Commit(e)),
                };
                let _ = tx.send(out);
            });
            (finish, disk_full)
        });
        let sender = self.inner.writer.lock().expect("writer lock").clone();
        sender
            .ok_or(QueueError::Closed)?
            .send(work)
            .map_err(|_| QueueError::Closed)?;
        match rx.await {
            Ok(result) => result,
            // The writer dropped the work unrun (its transaction could not begin, or was rolled
            // back before it ran): nothing of it was stored. Closed only when shutting down.
            Err(_) if self.inner.writer.lock().expect("writer lock").is_some() => Err(
                QueueError::Commit("the write did not run: its transaction failed".into()),
            ),
            Err(_) => Err(QueueError::Closed),
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.reader.lock().expect("reader lock");
            f(&conn)
        })
        .await
        .map_err(|_| QueueError::Closed)?
    }

    /// Store all jobs of one request in one transaction, deduplicating on their keys.
    pub async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>, QueueError> {
        let result = self.enqueue_inner(jobs).await;
        // A tiny readiness probe can succeed on a disk too full for real messages, so
        // readiness also remembers recent enqueue failures.
        *self
            .inner
            .last_enqueue_failure
            .lock()
            .expect("failure lock") = match &result {
            Ok(_) => None,
            Err(_) => Some(std::time::Instant::now()),
        };
        result
    }

    async fn enqueue_inner(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>, QueueError> {
        let ttl = self.inner.dedupe_ttl_ms;
        let outcomes = self
            .write(move |conn| {
                let now = now_ms();
                let mut outcomes = Vec::with_capacity(jobs.len());
                for job in jobs {
                    if let Some(key) = &job.dedupe_key {
                        let seen: Option<(String, Option<String>)> = conn
                            .prepare_cached("SELECT job_id, body_hash FROM dedupe WHERE key = ?1 AND expires_at > ?2")?
                            .query_row(params![key, now], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()?;
                        if let Some((job_id, hash)) = seen {
                            outcomes.push(match (&hash, &job.body_hash) {
                                (Some(a), Some(b)) if a != b => EnqueueOutcome::Conflict { job_id },
                                _ => EnqueueOutcome::Duplicate { job_id },
                            });
                            continue;
                        }
                        conn.prepare_cached(
                            "INSERT OR REPLACE INTO dedupe (key, job_id, body_hash, expires_at) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![key, job.id, job.body_hash, now + ttl])?;
                    }
                    let payload = serde_json::to_string(&job.job).map_err(|e| QueueError::Corrupt(e.to_string()))?;
                    conn.prepare_cached(
                        "INSERT INTO jobs (id, route, action, org_id, notification_id, record_id, payload, state,
                                           first_seen, age_from, available_at, received_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?8, ?8, ?9)",
                    )?
                    .execute(params![
                        job.id,
                        job.route,
                        job.action.as_str(),
                        job.org_id,
                        job.notification_id,
                        job.record_id,
                        payload,
                        now,
                        if job.received_at_ms > 0 { job.received_at_ms } else { now }
                    ])?;
                    outcomes.push(EnqueueOutcome::Stored);
                }
                Ok(outcomes)
            })
            .await?;
        if outcomes.contains(&EnqueueOutcome::Stored) {
            self.inner.notify.notify_one();
        }
        Ok(outcomes)
    }

    /// Lease up to `max` due jobs, skipping `paused` routes. Attempts count at lease time, so a
    /// job that crashes the process every time still runs out of attempts.
    pub async fn lease(&self, max: usize, paused: Vec<String>) -> Result<Vec<Leased>, QueueError> {
        let lease_ms = self.inner.lease_ms;
        self.write(move |conn| {
            let now = now_ms();
            let token = uuid::Uuid::new_v4().to_string();
            let paused = serde_json::to_string(&paused).unwrap_or_else(|_| "[]".into());
            // With paused routes, pick the due jobs route by route (an index range each) and
            // pass their ids; without, the plain query in due order.
            let (query, selector) = if paused == "[]" {
                (
                    "UPDATE jobs SET lease_until = ?1, lease_token = ?2, attempts = attempts + 1
                     WHERE id IN (SELECT id FROM jobs
                                  WHERE state = 'queued' AND available_at <= ?3 AND lease_until <= ?3
                                    AND route NOT IN (SELECT value FROM json_each(?4))
                                  ORDER BY available_at LIMIT ?5)
                     RETURNING id, route, action, payload, attempts, first_seen, org_id, notification_id, record_id, age_from, received_at",
                    paused.clone(),
                )
            } else {
                let ids = due_ids_skipping(conn, now, &paused, max)?;
                (
                    "UPDATE jobs SET lease_until = ?1, lease_token = ?2, attempts = attempts + 1
                     WHERE id IN (SELECT value FROM json_each(?4))
                       -- unary +: look the rows up by id, not through an index on state
                       AND +state = 'queued' AND +lease_until <= ?3
                       AND (SELECT count(*) FROM json_each(?4)) <= ?5
                     RETURNING id, route, action, payload, attempts, first_seen, org_id, notification_id, record_id, age_from, received_at",
                    serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into()),
                )
            };
            let mut stmt = conn.prepare_cached(query)?;
            // Each column is read on its own, so one undecodable row is parked below instead
            // of failing the whole lease (and every later one) forever.
            let rows: Vec<(String, rusqlite::Result<RawLeased>)> = stmt
                .query_map(params![now + lease_ms, token, now, selector, max as i64], |r| {
                    let id = r.get::<_, String>(0)?;
                    let raw = (|| {
                        Ok(RawLeased {
                            route: r.get(1)?,
                            action: r.get(2)?,
                            payload: r.get(3)?,
                            attempts: r.get(4)?,
                            age_from: r.get(9)?,
                            received_at: r.get(10)?,
                            org_id: r.get(6)?,
                            notification_id: r.get(7)?,
                            record_id: r.get(8)?,
                        })
                    })();
                    Ok((id, raw))
                })?
                .collect::<rusqlite::Result<_>>()?;
            drop(stmt);
            let mut leased = Vec::new();
            for (id, raw) in rows {
                let decoded = raw
                    .map_err(|e| format!("job {id}: a stored column could not be read ({})", column_error_kind(&e)))
                    .and_then(|raw| {
                        serde_json::from_str::<Job>(&raw.payload)
                            .map_err(|e| super::decode_error(&id, &e))
                            .map(|job| (raw, job))
                    });
                let (raw, job) = match decoded {
                    Ok(ok) => ok,
                    Err(reason) => {
                        tracing::error!(job_id = %id, reason = %reason, "undecodable job parked");
                        conn.prepare_cached(
                            "UPDATE jobs SET state = 'parked', parked_at = ?1, park_reason = ?2, last_error = ?2,
                                             lease_until = 0, lease_token = NULL
                             WHERE id = ?3",
                        )?
                        .execute(params![now, reason, id])?;
                        continue;
                    }
                };
                leased.push(Leased {
                    received_at_ms: raw.received_at.unwrap_or(raw.age_from),
                    id,
                    route: raw.route,
                    action: raw.action,
                    job,
                    attempts: raw.attempts,
                    first_seen_ms: raw.age_from,
                    lease_token: token.clone(),
                    org_id: raw.org_id,
                    notification_id: raw.notification_id,
                    record_id: raw.record_id,
                });
            }
            Ok(leased)
        })
        .await
    }

    /// Restart the lease clock (a job leased ahead, about to be delivered); `false` when
    /// its lease already ran out and the row was leased again.
    pub async fn extend_lease(&self, job: &Leased) -> Result<bool, QueueError> {
        let (id, token, lease_ms) = (job.id.clone(), job.lease_token.clone(), self.inner.lease_ms);
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND lease_token = ?3 AND lease_until > ?4",
                )?
                .execute(params![now_ms() + lease_ms, id, token, now_ms()])?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn ack(&self, job: &Leased) -> Result<(), QueueError> {
        self.settle_recorded(job, None, None).await
    }

    pub async fn retry(
        &self,
        job: &Leased,
        at_ms: i64,
        error: &str,
        status: Option<u16>,
    ) -> Result<(), QueueError> {
        let (id, token, error) = (job.id.clone(), job.lease_token.clone(), error.to_owned());
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE jobs SET available_at = ?1, lease_until = 0, lease_token = NULL, last_error = ?2, last_status = ?3
                 WHERE id = ?4 AND lease_token = ?5",
            )?
            .execute(params![at_ms, error, status, id, token])?;
            Ok(())
        })
        .await
    }

    pub async fn release(&self, job: &Leased) -> Result<(), QueueError> {
        let result = self.defer(job, Duration::ZERO).await;
        self.inner.notify.notify_one();
        result
    }

    /// Give the job back for `delay` without spending its attempt.
    pub async fn defer(&self, job: &Leased, delay: Duration) -> Result<(), QueueError> {
        let (id, token) = (job.id.clone(), job.lease_token.clone());
        let at = now_ms() + delay.as_millis() as i64;
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE jobs SET lease_until = 0, lease_token = NULL, attempts = max(attempts - 1, 0), available_at = ?3
                 WHERE id = ?1 AND lease_token = ?2",
            )?
            .execute(params![id, token, at])?;
            Ok(())
        })
        .await
    }

    pub async fn park(
        &self,
        job: &Leased,
        reason: &str,
        status: Option<u16>,
    ) -> Result<(), QueueError> {
        self.settle_recorded(job, Some((reason.to_owned(), status)), None)
            .await
    }

    /// [`SqliteQueue::stats`] for each route that has jobs.
    pub async fn route_stats(
        &self,
    ) -> Result<std::collections::BTreeMap<String, QueueStats>, QueueError> {
        self.read(|conn| {
            let now = now_ms();
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT route, {STATS_COLUMNS} FROM jobs GROUP BY route"
            ))?;
            let rows = stmt.query_map(params![now], |r| {
                Ok((r.get::<_, String>(0)?, stats_row(r, 1)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        self.read(|conn| {
            // Ready: since it became due (stored, or its retry came due), its wait for a worker.
            Ok(conn.query_row(
                &format!("SELECT {STATS_COLUMNS} FROM jobs"),
                params![now_ms()],
                |r| stats_row(r, 0),
            )?)
        })
        .await
    }

    pub async fn parked(&self, limit: usize) -> Result<Vec<ParkedJob>, QueueError> {
        self.parked_page(ParkedFilter::default(), limit, None).await
    }

    pub async fn replay(&self, ids: Option<Vec<String>>) -> Result<u64, QueueError> {
        self.replay_matching(
            ParkedFilter {
                ids,
                ..ParkedFilter::default()
            },
            None,
        )
        .await
    }

    pub async fn parked_page(
        &self,
        filter: ParkedFilter,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<Vec<ParkedJob>, QueueError> {
        self.read(move |conn| {
            let (clause, mut args) = filter_sql(&filter);
            // A position cursor stays valid when its job is gone; a bare id (an older cursor)
            // is looked up.
            let position = cursor.as_deref().and_then(super::ParkedCursor::parse);
            let (ms, id) = match (&position, &cursor) {
                (Some(p), _) => (SqlValue::Integer(p.parked_at_ms), SqlValue::Text(p.id.clone())),
                (None, Some(id)) => {
                    let found: Option<(Option<i64>, String)> = conn
                        .query_row("SELECT parked_at, id FROM jobs WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?;
                    match found {
                        Some((at, id)) => (SqlValue::Integer(at.unwrap_or(0)), SqlValue::Text(id)),
                        None => return Ok(Vec::new()),
                    }
                }
                (None, None) => (SqlValue::Null, SqlValue::Null),
            };
            args.push(ms);
            args.push(id);
            args.push(SqlValue::Integer(limit as i64));
            let n = args.len();
            let sql = format!(
                "SELECT id, route, action, org_id, notification_id, record_id, attempts, first_seen, parked_at,
                        park_reason, last_status, replays, history
                 FROM jobs WHERE {clause}
                   AND (?{m} IS NULL OR (parked_at, id) > (?{m}, ?{i}))
                 ORDER BY parked_at, id LIMIT ?{n}",
                m = n - 2,
                i = n - 1
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| {
                let history: Option<String> = r.get(12)?;
                Ok(ParkedJob {
                    id: r.get(0)?,
                    route: r.get(1)?,
                    action: r.get(2)?,
                    org_id: r.get(3)?,
                    notification_id: r.get(4)?,
                    record_id: r.get(5)?,
                    attempts: r.get(6)?,
                    first_seen_ms: r.get(7)?,
                    parked_at_ms: r.get::<_, Option<i64>>(8)?.unwrap_or(0),
                    reason: r.get::<_, Option<String>>(9)?.unwrap_or_default(),
                    last_status: r.get(10)?,
                    replays: r.get(11)?,
                    history: history.and_then(|h| serde_json::from_str(&h).ok()).unwrap_or_default(),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn count_parked(&self, filter: ParkedFilter) -> Result<u64, QueueError> {
        self.read(move |conn| {
            let (clause, args) = filter_sql(&filter);
            let n: i64 = conn.query_row(
                &format!("SELECT count(*) FROM jobs WHERE {clause}"),
                rusqlite::params_from_iter(args),
                |r| r.get(0),
            )?;
            Ok(n as u64)
        })
        .await
    }

    pub async fn replay_matching(
        &self,
        filter: ParkedFilter,
        limit: Option<usize>,
    ) -> Result<u64, QueueError> {
        let ledger = self.keeps_ledger();
        let n = self
            .write(move |conn| {
                let (clause, mut args) = filter_sql(&filter);
                let now_arg = args.len() + 1;
                args.push(SqlValue::Integer(now_ms()));
                args.push(SqlValue::Integer(limit.map(|l| l as i64).unwrap_or(-1)));
                // Attempts and the age clock restart; the previous reason is kept in `history`.
                // The ledger notes each replay, in the same transaction.
                if ledger {
                    note_outcome(
                        conn,
                        "replayed",
                        &format!(
                            "SELECT id FROM jobs WHERE {clause} ORDER BY parked_at, id LIMIT ?{}",
                            now_arg + 1
                        ),
                        now_arg,
                        args.clone(),
                    )?;
                }
                let sql = format!(
                    "UPDATE jobs SET state = 'queued', attempts = 0, available_at = ?{now_arg}, age_from = ?{now_arg},
                                     lease_until = 0, replays = replays + 1,
                                     history = json_insert(coalesce(history, '[]'), '$[#]', park_reason),
                                     park_reason = NULL, parked_at = NULL
                     WHERE id IN (SELECT id FROM jobs WHERE {clause} ORDER BY parked_at, id LIMIT ?{})",
                    now_arg + 1
                );
                Ok(conn.execute(&sql, rusqlite::params_from_iter(args))? as u64)
            })
            .await?;
        if n > 0 {
            self.inner.notify.notify_one();
        }
        Ok(n)
    }

    pub async fn purge_parked(&self, filter: ParkedFilter) -> Result<u64, QueueError> {
        let ledger = self.keeps_ledger();
        self.write(move |conn| {
            let (clause, args) = filter_sql(&filter);
            // The ledger notes each purge, in the same transaction.
            if ledger {
                let at = args.len() + 1;
                let mut noted = args.clone();
                noted.push(SqlValue::Integer(now_ms()));
                note_outcome(
                    conn,
                    "purged",
                    &format!("SELECT id FROM jobs WHERE {clause}"),
                    at,
                    noted,
                )?;
            }
            Ok(conn.execute(
                &format!("DELETE FROM jobs WHERE {clause}"),
                rusqlite::params_from_iter(args),
            )? as u64)
        })
        .await
    }

    /// Write what became of a job (its facts, an attempt, a final outcome) in one
    /// transaction, before the caller lets the job leave the queue.
    pub async fn ledger_record(
        &self,
        facts: crate::ledger::JobFacts,
        attempt: Option<crate::ledger::Attempt>,
        outcome: Option<crate::ledger::FinalOutcome>,
    ) -> Result<(), QueueError> {
        self.write(move |conn| ledger_write(conn, facts, attempt, outcome))
            .await
    }

    /// Settle a delivered (or superseded) job, or park it (`park`: reason and status), with
    /// its ledger record written in the same transaction: the outcome is in the ledger exactly
    /// when the job leaves the queue, for one commit instead of two.
    pub async fn settle_recorded(
        &self,
        job: &Leased,
        park: Option<(String, Option<u16>)>,
        record: Option<crate::ledger::Record>,
    ) -> Result<(), QueueError> {
        let (id, token) = (job.id.clone(), job.lease_token.clone());
        let ledger = self.keeps_ledger();
        self.write(move |conn| {
            if let (true, Some((facts, attempt, outcome))) = (ledger, record) {
                ledger_write(conn, facts, attempt, outcome)?;
            }
            match park {
                Some((reason, status)) => {
                    conn.prepare_cached(
                        "UPDATE jobs SET state = 'parked', parked_at = ?1, park_reason = ?2, last_error = ?2, last_status = ?3,
                                         lease_until = 0, lease_token = NULL
                         WHERE id = ?4 AND lease_token = ?5",
                    )?
                    .execute(params![now_ms(), reason, status, id, token])?;
                }
                None => {
                    let n = conn
                        .prepare_cached("DELETE FROM jobs WHERE id = ?1 AND lease_token = ?2")?
                        .execute(params![id, token])?;
                    if n == 0 {
                        tracing::warn!(job_id = %id, "ack of a job whose lease had expired; it may be delivered twice");
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// Ledger entries matching `q`, newest stored first.
    pub async fn ledger_query(
        &self,
        q: crate::ledger::LedgerQuery,
    ) -> Result<Vec<crate::ledger::Entry>, QueueError> {
        use crate::ledger::{Attempt, FinalOutcome, SqlArg};
        self.read(move |conn| {
            let run = |source: &str| -> Result<Vec<crate::ledger::Entry>, QueueError> {
                let (sql, args) = crate::ledger::select_sql_from(&q, source, |n| format!("?{n}"));
                let args = args.into_iter().map(|a| match a {
                    SqlArg::Text(t) => SqlValue::Text(t),
                    SqlArg::Int(i) => SqlValue::Integer(i),
                });
                Ok(conn
                    .prepare_cached(&sql)?
                    .query_map(rusqlite::params_from_iter(args), ledger_entry)?
                    .collect::<rusqlite::Result<_>>()?)
            };
            let mut entries = run("ledger_jobs")?;
            // A job is in the ledger from the moment it is stored: until a worker first
            // records it, its row in the queue stands in (so the ack path writes nothing more).
            if crate::ledger::may_match_unrecorded(&q) {
                entries.extend(run(UNRECORDED_JOBS)?);
                entries.sort_by(|a, b| {
                    (b.facts.stored_at_ms, &b.facts.job_id).cmp(&(a.facts.stored_at_ms, &a.facts.job_id))
                });
                entries.truncate(q.limit.clamp(1, crate::ledger::MAX_PAGE));
            }
            if !q.history {
                return Ok(entries);
            }
            let mut attempts_stmt = conn.prepare_cached(
                "SELECT attempt, started_at, duration_ms, status, error_class, outcome, response
                 FROM ledger_attempts WHERE job_id = ?1 ORDER BY started_at, attempt",
            )?;
            let mut outcomes_stmt = conn.prepare_cached(
                "SELECT outcome, reason, at FROM ledger_outcomes WHERE job_id = ?1 ORDER BY at, rowid",
            )?;
            for e in &mut entries {
                let id = &e.facts.job_id;
                e.attempts = attempts_stmt
                    .query_map([id], |r| {
                        Ok(Attempt {
                            attempt: r.get(0)?,
                            started_at_ms: r.get(1)?,
                            duration_ms: r.get(2)?,
                            status: r.get(3)?,
                            error_class: r.get(4)?,
                            outcome: r.get(5)?,
                            response: r.get(6)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                e.outcomes = crate::ledger::dedup_outcomes(
                    outcomes_stmt
                        .query_map([id], |r| {
                            Ok(FinalOutcome {
                                outcome: r.get(0)?,
                                reason: r.get(1)?,
                                at_ms: r.get(2)?,
                                kept_payload: None,
                            })
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                );
                let payload: Option<String> = conn
                    .prepare_cached("SELECT payload FROM ledger_payloads WHERE job_id = ?1 AND expires_at > ?2")?
                    .query_row(params![id, now_ms()], |r| r.get(0))
                    .optional()?;
                e.payload = payload.and_then(|p| serde_json::from_str(&p).ok());
            }
            Ok(entries)
        })
        .await
    }

    /// Retention: forget ledger entries stored before `before_ms`, a bounded batch per write
    /// transaction so enqueues are never held up for long; also drops expired kept payloads.
    pub async fn ledger_purge_before(&self, before_ms: i64) -> Result<u64, QueueError> {
        let mut total = 0;
        loop {
            let n = self
                .write(move |conn| {
                    let batch = crate::ledger::PURGE_BATCH as i64;
                    conn.execute(
                        "CREATE TEMP TABLE IF NOT EXISTS ledger_gone (job_id TEXT PRIMARY KEY)",
                        [],
                    )?;
                    conn.execute("DELETE FROM temp.ledger_gone", [])?;
                    let n = conn.execute(
                        "INSERT INTO temp.ledger_gone SELECT job_id FROM ledger_jobs WHERE stored_at < ?1 ORDER BY stored_at LIMIT ?2",
                        params![before_ms, batch],
                    )?;
                    for table in ["ledger_attempts", "ledger_outcomes", "ledger_payloads", "ledger_jobs"] {
                        conn.execute(
                            &format!("DELETE FROM {table} WHERE job_id IN (SELECT job_id FROM temp.ledger_gone)"),
                            [],
                        )?;
                    }
                    // Expired kept payloads go in every pass (by index), not only in one that
                    // forgot nothing: on a busy relay every pass forgets something.
                    conn.execute(
                        "DELETE FROM ledger_payloads WHERE expires_at <= ?1",
                        params![now_ms()],
                    )?;
                    Ok(n as u64)
                })
                .await?;
            total += n;
            if n < crate::ledger::PURGE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Per-record order: note versions of records just stored (the newest is kept).
    pub async fn order_seen(&self, versions: Vec<(String, i64)>) -> Result<(), QueueError> {
        self.write(move |conn| {
            let now = now_ms();
            for (key, version) in versions {
                conn.prepare_cached(
                    "INSERT INTO record_versions (key, seen, touched) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key) DO UPDATE SET seen = max(coalesce(seen, excluded.seen), excluded.seen), touched = excluded.touched",
                )?
                .execute(params![key, version, now])?;
            }
            Ok(())
        })
        .await
    }

    /// Per-record order: may `version` of the record `key` be delivered now (see
    /// [`crate::ordering`])? One write transaction, so every process sharing the file agrees.
    pub async fn order_begin(
        &self,
        key: String,
        version: i64,
        hold_ms: i64,
    ) -> Result<crate::ordering::Decision, QueueError> {
        self.order_update(key, move |r, now| r.begin(version, now, hold_ms))
            .await
    }

    /// Per-record order: a job of `version` is done with `key` (`delivered` if it was).
    pub async fn order_finish(
        &self,
        key: String,
        version: i64,
        delivered: bool,
    ) -> Result<(), QueueError> {
        self.order_update(key, move |r, _| r.finish(version, delivered))
            .await
    }

    /// Read a record's order state, change it with `f`, write it back: one transaction.
    async fn order_update<T: Send + 'static>(
        &self,
        key: String,
        f: impl FnOnce(&mut crate::ordering::RecordState, i64) -> T + Send + 'static,
    ) -> Result<T, QueueError> {
        self.write(move |conn| {
            let now = now_ms();
            let mut r = conn
                .prepare_cached("SELECT seen, delivered, held, holders, held_until FROM record_versions WHERE key = ?1")?
                .query_row([&key], |r| {
                    Ok(crate::ordering::RecordState {
                        seen: r.get(0)?,
                        delivered: r.get(1)?,
                        held_version: r.get(2)?,
                        holders: r.get(3)?,
                        until: r.get(4)?,
                    })
                })
                .optional()?
                .unwrap_or_default();
            let answer = f(&mut r, now);
            conn.prepare_cached(
                "INSERT INTO record_versions (key, seen, delivered, held, holders, held_until, touched)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (key) DO UPDATE SET seen = excluded.seen, delivered = excluded.delivered,
                     held = excluded.held, holders = excluded.holders, held_until = excluded.held_until,
                     touched = excluded.touched",
            )?
            .execute(params![key, r.seen, r.delivered, r.held_version, r.holders, r.until, now])?;
            Ok(answer)
        })
        .await
    }

    /// Read a rate limit's GCRA state, change it with `f`, write it back: one write
    /// transaction, so every process sharing the file draws from one allowance, and the state
    /// (a `Retry-After` stop included) outlives a restart.
    pub async fn rate_update<T: Send + 'static>(
        &self,
        name: String,
        f: impl FnOnce(&mut crate::ratelimit::Gcra) -> T + Send + 'static,
    ) -> Result<T, QueueError> {
        self.write(move |conn| {
            let mut g = conn
                .prepare_cached("SELECT tat_us, slowed_until_us FROM rate_limits WHERE name = ?1")?
                .query_row([&name], |r| {
                    Ok(crate::ratelimit::Gcra {
                        tat_us: r.get(0)?,
                        slowed_until_us: r.get(1)?,
                    })
                })
                .optional()?
                .unwrap_or_default();
            let answer = f(&mut g);
            conn.prepare_cached(
                "INSERT INTO rate_limits (name, tat_us, slowed_until_us) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET tat_us = excluded.tat_us, slowed_until_us = excluded.slowed_until_us",
            )?
            .execute(params![name, g.tat_us, g.slowed_until_us])?;
            Ok(answer)
        })
        .await
    }

    /// A rate limit's GCRA state, if it has one.
    pub async fn rate_state(
        &self,
        name: String,
    ) -> Result<Option<crate::ratelimit::Gcra>, QueueError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT tat_us, slowed_until_us FROM rate_limits WHERE name = ?1")?
                .query_row([&name], |r| {
                    Ok(crate::ratelimit::Gcra {
                        tat_us: r.get(0)?,
                        slowed_until_us: r.get(1)?,
                    })
                })
                .optional()?)
        })
        .await
    }

    /// Forget the order state of records untouched since `before_ms` (a bounded batch).
    pub async fn order_forget_before(&self, before_ms: i64) -> Result<u64, QueueError> {
        self.write(move |conn| {
            Ok(conn.execute(
                "DELETE FROM record_versions WHERE key IN (
                     SELECT key FROM record_versions WHERE touched < ?1 AND held_until < ?1 LIMIT 10000)",
                params![before_ms],
            )? as u64)
        })
        .await
    }

    /// When the oldest ledger entry was stored (ms since the epoch), if there is one.
    pub async fn ledger_oldest_ms(&self) -> Result<Option<i64>, QueueError> {
        self.read(|conn| {
            Ok(conn.query_row("SELECT min(stored_at) FROM ledger_jobs", [], |r| r.get(0))?)
        })
        .await
    }

    /// Checkpoint the WAL and truncate it: after deleting rows, their old page images (the
    /// payloads of delivered jobs) leave the WAL file too.
    pub async fn compact(&self) -> Result<(), QueueError> {
        self.read(|conn| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    /// Paused routes as an older relay kept them (one list); read once to migrate.
    pub async fn paused_routes(&self) -> Result<Vec<String>, QueueError> {
        self.read(|conn| {
            let v: Option<String> = conn
                .query_row("SELECT v FROM meta WHERE k = 'paused_routes'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(v.and_then(|v| serde_json::from_str(&v).ok())
                .unwrap_or_default())
        })
        .await
    }

    /// One field of a named map of shared control state (rows `{name}:{field}` of `meta`).
    pub async fn map_set(&self, name: &str, field: &str, value: &str) -> Result<(), QueueError> {
        let (k, v) = (format!("{name}:{field}"), value.to_owned());
        self.write(move |conn| {
            conn.prepare_cached("INSERT OR REPLACE INTO meta (k, v) VALUES (?1, ?2)")?
                .execute(params![k, v])?;
            Ok(())
        })
        .await
    }

    /// Every field of a named map (a primary-key range, not a scan).
    pub async fn map_get_all(
        &self,
        name: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, QueueError> {
        let (from, to) = (format!("{name}:"), format!("{name};"));
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached("SELECT k, v FROM meta WHERE k >= ?1 AND k < ?2")?;
            let rows = stmt.query_map(params![from, to], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut map = std::collections::BTreeMap::new();
            for row in rows {
                let (k, v) = row?;
                map.insert(k[from.len()..].to_owned(), v);
            }
            Ok(map)
        })
        .await
    }

    pub async fn map_remove(&self, name: &str, fields: &[String]) -> Result<(), QueueError> {
        let keys: Vec<String> = fields.iter().map(|f| format!("{name}:{f}")).collect();
        self.write(move |conn| {
            let mut stmt = conn.prepare_cached("DELETE FROM meta WHERE k = ?1")?;
            for k in &keys {
                stmt.execute(params![k])?;
            }
            Ok(())
        })
        .await
    }

    pub async fn load(&self, id: &str) -> Result<Option<Leased>, QueueError> {
        let id = id.to_owned();
        self.read(move |conn| {
            let row = conn
                .query_row(
                    "SELECT id, route, action, payload, attempts, age_from, org_id, notification_id, record_id, received_at
                     FROM jobs WHERE id = ?1",
                    params![id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, u32>(4)?,
                            r.get::<_, i64>(5)?,
                            r.get::<_, Option<String>>(6)?,
                            r.get::<_, Option<String>>(7)?,
                            r.get::<_, Option<String>>(8)?,
                            r.get::<_, Option<i64>>(9)?,
                        ))
                    },
                )
                .optional()?;
            row.map(|(id, route, action, payload, attempts, age_from, org_id, notification_id, record_id, received_at)| {
                let job = serde_json::from_str(&payload).map_err(|e| QueueError::Corrupt(e.to_string()))?;
                Ok(Leased {
                    received_at_ms: received_at.unwrap_or(age_from),
                    id,
                    route,
                    action,
                    job,
                    attempts,
                    first_seen_ms: age_from,
                    lease_token: String::new(),
                    org_id,
                    notification_id,
                    record_id,
                })
            })
            .transpose()
        })
        .await
    }

    pub async fn check_writable(&self) -> Result<(), QueueError> {
        let failed = *self
            .inner
            .last_enqueue_failure
            .lock()
            .expect("failure lock");
        if failed.is_some_and(|at| at.elapsed() < FAILURE_MEMORY) {
            return Err(QueueError::NotReady(
                "the last enqueue failed (disk full?); not ready until one succeeds".into(),
            ));
        }
        self.write(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO meta (k, v) VALUES ('ready_probe', ?1)",
                params![now_ms().to_string()],
            )?;
            Ok(())
        })
        .await
    }

    /// Forget up to [`super::DEDUPE_PURGE_BATCH`] dedupe keys past their TTL (one short
    /// write transaction; the caller repeats while batches come back full).
    pub async fn purge_expired_dedupe(&self) -> Result<u64, QueueError> {
        self.write(|conn| {
            let n = conn.execute(
                "DELETE FROM dedupe WHERE rowid IN (SELECT rowid FROM dedupe WHERE expires_at <= ?1 LIMIT ?2)",
                params![now_ms(), super::DEDUPE_PURGE_BATCH as i64],
            )?;
            Ok(n as u64)
        })
        .await
    }

    pub async fn notified(&self) {
        self.inner.notify.notified().await
    }
}

/// The WHERE clause (and its arguments) selecting parked jobs that match `f`.
fn filter_sql(f: &ParkedFilter) -> (String, Vec<SqlValue>) {
    let mut clause = String::from("state = 'parked'");
    let mut args = Vec::new();
    let mut add = |sql: &str, value: SqlValue| {
        args.push(value);
        clause.push_str(&sql.replace('?', &format!("?{}", args.len())));
    };
    let text = |s: &String| SqlValue::Text(s.clone());
    if let Some(v) = &f.route {
        add(" AND route = ?", text(v));
    }
    if let Some(v) = &f.action {
        add(" AND action = ?", text(v));
    }
    if let Some(v) = &f.org_id {
        // 15- and 18-character org ids name the same org.
        add(" AND substr(org_id, 1, 15) = substr(?, 1, 15)", text(v));
    }
    if let Some(v) = &f.record_id {
        add(" AND record_id = ?", text(v));
    }
    if let Some(v) = &f.reason {
        add(" AND instr(park_reason, ?) > 0", text(v));
    }
    if let Some(v) = f.since_ms {
        add(" AND parked_at >= ?", SqlValue::Integer(v));
    }
    if let Some(v) = f.until_ms {
        add(" AND parked_at < ?", SqlValue::Integer(v));
    }
    if let Some(ids) = &f.ids {
        add(
            " AND id IN (SELECT value FROM json_each(?))",
            SqlValue::Text(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())),
        );
    }
    (clause, args)
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Work>,
    commit_delay: Duration,
    commits: &std::sync::atomic::AtomicU64,
) {
    // Set when a write met a full disk (or a commit failed): until a checkpoint folds the WAL
    // into the file and truncates it, the WAL only grows (automatic checkpoints wait for
    // 1000 pages), so space that comes back would be eaten by the next writes before any
    // checkpoint ran, and the queue would stay full after the disk had room. Tried after
    // the first commit that goes through following a failed one (there is room now), and
    // otherwise at most every CHECKPOINT_RETRY (a WAL of rewritten pages folds in without the
    // file growing, even on a full disk).
    let mut needs_checkpoint = false;
    let mut last_commit_failed = false;
    let mut last_checkpoint_try = std::time::Instant::now();
    let mut try_checkpoint = |conn: &Connection, needs: &mut bool, room_just_came_back: bool| {
        if *needs && (room_just_came_back || last_checkpoint_try.elapsed() >= CHECKPOINT_RETRY) {
            last_checkpoint_try = std::time::Instant::now();
            *needs = !checkpoint_after_full_disk(conn);
        }
    };
    while let Ok(first) = rx.recv() {
        if !commit_delay.is_zero() {
            std::thread::sleep(commit_delay);
        }
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
        try_checkpoint(&conn, &mut needs_checkpoint, false);
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            // Dropping the work drops its reply channel: every waiter gets an error (503).
            drop(batch);
            needs_checkpoint |= is_disk_full(&e);
            last_commit_failed = true;
            tracing::error!(error = %e, "could not begin a queue transaction");
            continue;
        }
        let mut finishes: Vec<Finish> = Vec::with_capacity(batch.len());
        let mut works = batch.into_iter();
        let mut rolled_back = false;
        for work in works.by_ref() {
            let (finish, disk_full) = work(&conn);
            needs_checkpoint |= disk_full;
            finishes.push(finish);
            if conn.is_autocommit() {
                // SQLite rolled the whole transaction back (it may, on a full disk or an I/O
                // error): what ran so far is gone, and the works left would each commit on
                // their own outside it. They are not run: their callers get an error.
                rolled_back = true;
                break;
            }
        }
        drop(works);
        let commit = if rolled_back {
            Err("the transaction was rolled back by the database (disk full?)".to_owned())
        } else {
            conn.execute_batch("COMMIT").map_err(|e| e.to_string())
        };
        commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = &commit {
            tracing::error!(error = %e, "queue commit failed; every request of this batch gets 503");
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            needs_checkpoint = true;
        }
        for finish in finishes {
            finish(commit.clone());
        }
        let room_just_came_back = commit.is_ok() && last_commit_failed;
        last_commit_failed = commit.is_err();
        try_checkpoint(&conn, &mut needs_checkpoint, room_just_came_back);
    }
}

/// How often the writer tries to give a full disk's WAL space back.
const CHECKPOINT_RETRY: Duration = Duration::from_millis(250);
/// How long such a checkpoint waits for readers to finish.
const CHECKPOINT_BUSY_WAIT: Duration = Duration::from_millis(100);
/// How long a statement waits for a lock (the `busy_timeout` every connection opens with).
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// Fold the WAL into the queue file and truncate it; true once that fully succeeded (the
/// disk had room for it), false while it still cannot (tried again later).
fn checkpoint_after_full_disk(conn: &Connection) -> bool {
    // A TRUNCATE checkpoint waits for readers through the busy handler, holding up every
    // write on this thread meanwhile: wait briefly, and try again later instead.
    let _ = conn.busy_timeout(CHECKPOINT_BUSY_WAIT);
    let result = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    });
    let _ = conn.busy_timeout(BUSY_TIMEOUT);
    match result {
        Ok(0) => {
            tracing::info!(
                "queue file checkpointed after a full disk: its WAL space is free again"
            );
            true
        }
        Ok(_) | Err(_) => false,
    }
}

/// Whether `e` is SQLite's "database or disk is full".
fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Up to `max` due job ids of every route not in `paused` (a JSON array), oldest due first.
/// Routes are found by skipping through the `jobs_route_due` index (one seek per route), and
/// each route's due jobs are an index range: a paused route's backlog is never walked.
fn due_ids_skipping(
    conn: &rusqlite::Connection,
    now: i64,
    paused: &str,
    max: usize,
) -> rusqlite::Result<Vec<String>> {
    let paused: std::collections::HashSet<String> =
        serde_json::from_str(paused).unwrap_or_default();
    let mut routes_stmt = conn.prepare_cached(
        "WITH RECURSIVE r(route) AS (
            SELECT (SELECT min(route) FROM jobs INDEXED BY jobs_route_due WHERE state = 'queued')
            UNION ALL
            SELECT (SELECT min(route) FROM jobs INDEXED BY jobs_route_due WHERE state = 'queued' AND route > r.route)
            FROM r WHERE r.route IS NOT NULL
         )
         SELECT route FROM r WHERE route IS NOT NULL",
    )?;
    let routes: Vec<String> = routes_stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut due_stmt = conn.prepare_cached(
        "SELECT id, available_at FROM jobs INDEXED BY jobs_route_due
         WHERE state = 'queued' AND route = ?1 AND available_at <= ?2 AND lease_until <= ?2
         ORDER BY available_at LIMIT ?3",
    )?;
    let mut due: Vec<(i64, String)> = Vec::new();
    for route in routes.iter().filter(|r| !paused.contains(*r)) {
        for row in due_stmt.query_map(params![route, now, max as i64], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, String>(0)?))
        })? {
            due.push(row?);
        }
    }
    due.sort();
    Ok(due.into_iter().take(max).map(|(_, id)| id).collect())
}

/// A leased row before its payload is decoded.
struct RawLeased {
    received_at: Option<i64>,
    route: String,
    action: String,
    payload: String,
    attempts: u32,
    age_from: i64,
    org_id: Option<String>,
    notification_id: Option<String>,
    record_id: Option<String>,
}

/// What went wrong reading a column, without the value (it may be personal data).
fn column_error_kind(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::InvalidColumnType(i, name, ty) => {
            format!("column {i} `{name}` holds {ty}")
        }
        rusqlite::Error::FromSqlConversionFailure(i, ty, _) => {
            format!("column {i} holds {ty} that does not convert")
        }
        rusqlite::Error::IntegralValueOutOfRange(i, _) => format!("column {i} is out of range"),
        _ => "unreadable row".into(),
    }
}

/// Write what became of a job (its facts, an attempt, a final outcome) in the caller's
/// transaction.
fn ledger_write(
    conn: &Connection,
    facts: crate::ledger::JobFacts,
    attempt: Option<crate::ledger::Attempt>,
    outcome: Option<crate::ledger::FinalOutcome>,
) -> Result<(), QueueError> {
    conn.prepare_cached(
            "INSERT INTO ledger_jobs (job_id, route, action, org_id, notification_id, record_id, subject_key, stored_at, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (job_id) DO UPDATE SET subject_key = coalesce(ledger_jobs.subject_key, excluded.subject_key)",
        )?
        .execute(params![
            facts.job_id,
            facts.route,
            facts.action,
            facts.org_id,
            facts.notification_id,
            facts.record_id,
            facts.subject_key,
            facts.stored_at_ms,
            facts.received_at_ms
        ])?;
    if let Some(a) = attempt {
        conn.prepare_cached(
                "INSERT OR REPLACE INTO ledger_attempts (job_id, attempt, started_at, duration_ms, status, error_class, outcome, response)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                facts.job_id,
                a.attempt,
                a.started_at_ms,
                a.duration_ms,
                a.status,
                a.error_class,
                a.outcome,
                a.response
            ])?;
        if a.status.is_some() {
            conn.prepare_cached("UPDATE ledger_jobs SET last_status = ?2 WHERE job_id = ?1")?
                .execute(params![facts.job_id, a.status])?;
        }
    }
    if let Some(o) = outcome {
        conn.prepare_cached(
            "INSERT INTO ledger_outcomes (job_id, outcome, reason, at) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![facts.job_id, o.outcome, o.reason, o.at_ms])?;
        conn.prepare_cached(
            "UPDATE ledger_jobs SET last_outcome = ?2, last_outcome_at = ?3
                 WHERE job_id = ?1 AND coalesce(last_outcome_at, 0) <= ?3",
        )?
        .execute(params![facts.job_id, o.outcome, o.at_ms])?;
        if let Some(kept) = o.kept_payload {
            conn.prepare_cached(
                    "INSERT OR REPLACE INTO ledger_payloads (job_id, payload, expires_at) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![facts.job_id, kept.json, kept.expires_at_ms])?;
        }
    }
    Ok(())
}

/// Counts and ages per state over `jobs` (`?1` is now), as [`stats_row`] reads them.
const STATS_COLUMNS: &str = "
   coalesce(sum(state = 'queued' AND lease_until <= ?1 AND available_at <= ?1), 0),
   coalesce(sum(state = 'queued' AND lease_until > ?1), 0),
   coalesce(sum(state = 'queued' AND lease_until <= ?1 AND available_at > ?1), 0),
   coalesce(sum(state = 'parked'), 0),
   min(CASE WHEN state = 'queued' AND lease_until <= ?1 AND available_at <= ?1 THEN available_at END),
   min(CASE WHEN state = 'parked' THEN parked_at END),
   min(CASE WHEN state = 'queued' AND lease_until > ?1 THEN first_seen END),
   min(CASE WHEN state = 'queued' AND lease_until <= ?1 AND available_at > ?1 THEN first_seen END)";

/// A row of [`STATS_COLUMNS`] starting at column `at`.
fn stats_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<QueueStats> {
    Ok(QueueStats {
        held: 0,
        ready: r.get::<_, i64>(at)? as u64,
        in_flight: r.get::<_, i64>(at + 1)? as u64,
        retrying: r.get::<_, i64>(at + 2)? as u64,
        parked: r.get::<_, i64>(at + 3)? as u64,
        oldest_ready_ms: r.get(at + 4)?,
        oldest_parked_ms: r.get(at + 5)?,
        oldest_in_flight_ms: r.get(at + 6)?,
        oldest_retrying_ms: r.get(at + 7)?,
    })
}

/// Jobs in the queue that no worker has recorded in the ledger yet, as ledger summary rows.
const UNRECORDED_JOBS: &str = "(SELECT id AS job_id, route, action, org_id, notification_id, record_id,
        NULL AS subject_key, coalesce(received_at, first_seen) AS received_at, first_seen AS stored_at,
        NULL AS last_outcome, NULL AS last_outcome_at, NULL AS last_status
    FROM jobs WHERE NOT EXISTS (SELECT 1 FROM ledger_jobs l WHERE l.job_id = jobs.id))";

/// One ledger summary row ([`crate::ledger::SUMMARY_COLUMNS`]).
fn ledger_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<crate::ledger::Entry> {
    Ok(crate::ledger::Entry {
        facts: crate::ledger::JobFacts {
            job_id: r.get(0)?,
            route: r.get(1)?,
            action: r.get(2)?,
            org_id: r.get(3)?,
            notification_id: r.get(4)?,
            record_id: r.get(5)?,
            subject_key: r.get(6)?,
            stored_at_ms: r.get(7)?,
            received_at_ms: r.get(8)?,
        },
        last_outcome: r.get(9)?,
        last_outcome_at_ms: r.get(10)?,
        last_status: r.get(11)?,
        attempts: Vec::new(),
        outcomes: Vec::new(),
        payload: None,
    })
}

/// Note `outcome` at parameter `at` for every job `ids_sql` selects (replay, purge), in the
/// caller's transaction.
fn note_outcome(
    conn: &Connection,
    outcome: &str,
    ids_sql: &str,
    at: usize,
    args: Vec<SqlValue>,
) -> Result<(), QueueError> {
    conn.execute(
        &format!(
            "INSERT INTO ledger_outcomes (job_id, outcome, reason, at)
             SELECT id, '{outcome}', NULL, ?{at} FROM jobs WHERE id IN ({ids_sql})"
        ),
        rusqlite::params_from_iter(args.clone()),
    )?;
    conn.execute(
        &format!(
            "UPDATE ledger_jobs SET last_outcome = '{outcome}', last_outcome_at = ?{at} WHERE job_id IN ({ids_sql})"
        ),
        rusqlite::params_from_iter(args),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Action;

    fn job(n: u32, key: Option<&str>) -> NewJob {
        NewJob {
            received_at_ms: 0,
            id: format!("job-{n}"),
            route: "r".into(),
            action: Action::RemoveUser,
            dedupe_key: key.map(str::to_owned),
            body_hash: None,
            org_id: None,
            notification_id: None,
            record_id: None,
            job: Job::CalloutV1 {
                idempotency_key: None,
                body: serde_json::json!({"n": n}),
            },
        }
    }

    fn open(dir: &Path, lease: Duration) -> SqliteQueue {
        SqliteQueue::open(
            &dir.join("q.db"),
            lease,
            Duration::from_secs(90_000),
            Duration::ZERO,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_batch_rolled_back_by_a_full_disk_stores_none_of_its_requests() {
        // Arrange: a queue whose file may not grow much (max_page_count makes SQLite answer
        // "database or disk is full", and roll the whole transaction back, like a full disk),
        // and a commit delay so three requests share one transaction.
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open(
            &dir.path().join("q.db"),
            Duration::from_secs(60),
            Duration::from_secs(90_000),
            Duration::from_millis(100),
        )
        .unwrap();
        let limit = |extra: i64| {
            q.write(move |conn| {
                let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                conn.query_row(
                    &format!("PRAGMA max_page_count = {}", pages + extra),
                    [],
                    |_| Ok(()),
                )?;
                Ok(())
            })
        };
        limit(8).await.unwrap();
        let mut big = job(2, None);
        big.job = Job::CalloutV1 {
            idempotency_key: None,
            body: serde_json::json!({"filler": "x".repeat(200_000)}),
        };
        // Act: a small job, one too big for the room left, another small one.
        let (a, b, c) = tokio::join!(
            q.enqueue(vec![job(1, None)]),
            async {
                tokio::task::yield_now().await;
                q.enqueue(vec![big]).await
            },
            async {
                for _ in 0..2 {
                    tokio::task::yield_now().await;
                }
                q.enqueue(vec![job(3, None)]).await
            },
        );
        // Assert: none was stored and each caller was told so (before, the third committed
        // on its own after the rollback while its caller got an error).
        assert!(a.is_err() && b.is_err() && c.is_err(), "{a:?} {b:?} {c:?}");
        assert!(c.unwrap_err().may_clear(), "worth trying again");
        assert_eq!(q.stats().await.unwrap().ready, 0, "nothing stored");
        // The writer goes on: with room again, requests are stored.
        limit(10_000).await.unwrap();
        q.enqueue(vec![job(4, None)]).await.unwrap();
        assert_eq!(q.stats().await.unwrap().ready, 1);
    }

    #[tokio::test]
    async fn a_committed_job_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path(), Duration::from_secs(60));
        q.enqueue(vec![job(1, Some("k1"))]).await.unwrap();
        q.close();
        drop(q);
        let q = open(dir.path(), Duration::from_secs(60));
        let leased = q.lease(10, vec![]).await.unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].id, "job-1");
    }

    #[tokio::test]
    async fn a_repeated_key_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path(), Duration::from_secs(60));
        let out = q
            .enqueue(vec![job(1, Some("k")), job(2, Some("k"))])
            .await
            .unwrap();
        assert_eq!(out[0], EnqueueOutcome::Stored);
        assert_eq!(
            out[1],
            EnqueueOutcome::Duplicate {
                job_id: "job-1".into()
            }
        );
        assert_eq!(q.stats().await.unwrap().ready, 1);
    }

    #[tokio::test]
    async fn an_unacked_lease_comes_back_after_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path(), Duration::from_millis(50));
        q.enqueue(vec![job(1, None)]).await.unwrap();
        let first = q.lease(10, vec![]).await.unwrap();
        assert_eq!(first.len(), 1);
        assert!(
            q.lease(10, vec![]).await.unwrap().is_empty(),
            "leased job is invisible"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let again = loop {
            let l = q.lease(10, vec![]).await.unwrap();
            if !l.is_empty() || std::time::Instant::now() > deadline {
                break l;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempts, 2);
        // The first worker's late ack must not delete the job now leased by the second.
        q.ack(&first[0]).await.unwrap();
        assert_eq!(q.stats().await.unwrap().in_flight, 1);
    }

    #[tokio::test]
    async fn parked_jobs_are_listed_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path(), Duration::from_secs(60));
        q.enqueue(vec![job(1, None)]).await.unwrap();
        let l = q.lease(1, vec![]).await.unwrap();
        q.park(&l[0], "Centercode answered 400", Some(400))
            .await
            .unwrap();
        let parked = q.parked(10).await.unwrap();
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].last_status, Some(400));
        assert_eq!(q.replay(None).await.unwrap(), 1);
        let l = q.lease(1, vec![]).await.unwrap();
        assert_eq!(l[0].attempts, 1, "attempts reset on replay");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_commits() {
        // Arrange: 200 requests at once, as a burst of Outbound Messages would arrive.
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path(), Duration::from_secs(60));
        let before = q.commits();
        // Act
        let tasks: Vec<_> = (0..200)
            .map(|n| {
                let q = q.clone();
                tokio::spawn(async move { q.enqueue(vec![job(n, Some(&format!("k{n}")))]).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), vec![EnqueueOutcome::Stored]);
        }
        // Assert: every request committed, in far fewer transactions (one fsync each).
        let commits = q.commits() - before;
        assert_eq!(q.stats().await.unwrap().ready, 200);
        assert!(
            commits < 100,
            "200 requests took {commits} commits: no group commit"
        );
    }

    #[tokio::test]
    async fn paused_routes_are_not_leased() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path(), Duration::from_secs(60));
        q.enqueue(vec![job(1, None)]).await.unwrap();
        assert!(q.lease(1, vec!["r".into()]).await.unwrap().is_empty());
        assert_eq!(q.lease(1, vec![]).await.unwrap().len(), 1);
    }
}
