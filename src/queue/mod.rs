//! The durable queue: what a job is, and the backends that store it. Ingest enqueues;
//! workers lease, then ack, retry or park. Backends are a closed enum, not trait objects.

pub mod dedupe;
pub mod rabbitmq;
pub mod sqlite;

use crate::domain::Fields;
use crate::settings::Action;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use rabbitmq::RabbitQueue;
pub use sqlite::SqliteQueue;

/// What Salesforce sent, kept until delivery. Translation into a Centercode request happens
/// in the worker, so a replay after a mapping fix uses the fix. Never change a variant's shape:
/// add a `V2` instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Job {
    OutboundMessageV1 {
        org_id: String,
        notification_id: String,
        action_id: String,
        sobject_type: String,
        record_id: Option<String>,
        fields: Fields,
    },
    CalloutV1 {
        idempotency_key: Option<String>,
        body: serde_json::Value,
    },
    /// A Centercode macro's Trigger Webhook body, to upsert into Salesforce.
    CentercodeWebhookV1 { body: serde_json::Value },
    /// A job's outcome, to write back onto its Salesforce record (src/writeback.rs). The
    /// text is fixed when the outcome is known, so a retry writes the same values.
    StatusWritebackV1 {
        sobject: String,
        record_id: String,
        fields: serde_json::Map<String, serde_json::Value>,
    },
}

/// A job to store, with its deduplication key.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// When the request carrying it arrived (ms since the epoch; 0 = not known: the time it
    /// is stored stands in).
    pub received_at_ms: i64,
    pub id: String,
    pub route: String,
    pub action: Action,
    /// `om:{org15}:{notification id}` or `callout:{route}:{key}`; `None` means never deduplicated.
    pub dedupe_key: Option<String>,
    /// SHA-256 of the callout body, to refuse a reused Idempotency-Key with another body.
    pub body_hash: Option<String>,
    pub org_id: Option<String>,
    pub notification_id: Option<String>,
    pub record_id: Option<String>,
    pub job: Job,
}

/// What happened to one job of an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Newly stored.
    Stored,
    /// Seen before (within the dedupe TTL): acknowledged, not stored again.
    Duplicate { job_id: String },
    /// The idempotency key was used before with a different body.
    Conflict { job_id: String },
}

/// A job handed to a worker. `lease_token` proves the lease is still this worker's.
#[derive(Debug, Clone)]
pub struct Leased {
    /// When the request carrying it arrived (ms since the epoch).
    pub received_at_ms: i64,
    pub id: String,
    pub route: String,
    pub action: String,
    pub job: Job,
    /// Delivery attempts including this one.
    pub attempts: u32,
    pub first_seen_ms: i64,
    pub lease_token: String,
    pub org_id: Option<String>,
    pub notification_id: Option<String>,
    pub record_id: Option<String>,
}

/// A parked job, as operators see it (no payload).
#[derive(Debug, Clone, Serialize)]
pub struct ParkedJob {
    pub id: String,
    pub route: String,
    pub action: String,
    pub org_id: Option<String>,
    pub notification_id: Option<String>,
    pub record_id: Option<String>,
    pub attempts: u32,
    pub first_seen_ms: i64,
    pub parked_at_ms: i64,
    pub reason: String,
    pub last_status: Option<u16>,
    pub replays: u32,
    /// Reasons of earlier parkings, oldest first (a replayed job keeps its history).
    pub history: Vec<String>,
}

/// Which parked jobs an operator means: every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ParkedFilter {
    pub route: Option<String>,
    pub action: Option<String>,
    pub org_id: Option<String>,
    pub record_id: Option<String>,
    /// Substring of the park reason.
    pub reason: Option<String>,
    /// Parked at or after (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Parked before (ms since the epoch).
    pub until_ms: Option<i64>,
    /// Exactly these job ids.
    pub ids: Option<Vec<String>>,
}

/// Counts and ages per state.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct QueueStats {
    pub ready: u64,
    pub in_flight: u64,
    pub retrying: u64,
    pub parked: u64,
    /// Jobs of paused routes set aside until the route is resumed (RabbitMQ's
    /// `{prefix}.held`); on the embedded queue they stay in place and count as ready.
    pub held: u64,
    pub oldest_ready_ms: Option<i64>,
    pub oldest_parked_ms: Option<i64>,
    pub oldest_in_flight_ms: Option<i64>,
    pub oldest_retrying_ms: Option<i64>,
}

/// Why the queue could not do what was asked. Any of these on ingest means 503.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue storage failed: {0}")]
    Storage(#[from] rusqlite::Error),
    #[error("queue is shut down")]
    Closed,
    /// The transaction's work was done but its COMMIT failed (a full disk): nothing of it
    /// was stored.
    #[error("queue commit failed: {0}")]
    Commit(String),
    #[error("stored job is unreadable: {0}")]
    Corrupt(String),
    #[error("queue not ready: {0}")]
    NotReady(String),
    #[error("queue I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("message broker failed: {0}")]
    Broker(String),
    #[error("deduplication store failed: {0}")]
    Dedupe(String),
    #[error("the same notification is being stored by another request right now")]
    InProgress,
}

impl QueueError {
    /// Whether trying the same write again soon may succeed: storage that was full or
    /// briefly unavailable (the queue file, the ledger database). Not a closed queue, and not
    /// a broker failure: an ack on a channel that died can never succeed, and the broker
    /// delivers that message again by itself.
    pub fn may_clear(&self) -> bool {
        use rusqlite::ErrorCode as Code;
        match self {
            // Full, locked or failing I/O; not a constraint, a bad value or a corrupt file.
            QueueError::Storage(e) => matches!(
                e.sqlite_error_code(),
                Some(
                    Code::DiskFull
                        | Code::DatabaseBusy
                        | Code::DatabaseLocked
                        | Code::SystemIoFailure
                        | Code::OutOfMemory
                )
            ),
            QueueError::Commit(_) | QueueError::Io(_) | QueueError::NotReady(_) => true,
            _ => false,
        }
    }
}

/// The configured backend.
#[derive(Clone)]
pub enum Queue {
    Embedded(SqliteQueue),
    Rabbit(RabbitQueue),
}

impl Queue {
    pub async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>, QueueError> {
        match self {
            Queue::Embedded(q) => q.enqueue(jobs).await,
            Queue::Rabbit(q) => q.enqueue(jobs).await,
        }
    }

    /// Lease up to `max` due jobs of routes not in `paused`.
    pub async fn lease(&self, max: usize, paused: Vec<String>) -> Result<Vec<Leased>, QueueError> {
        match self {
            Queue::Embedded(q) => q.lease(max, paused).await,
            Queue::Rabbit(q) => q.lease(max, paused).await,
        }
    }

    /// Delivery finished: forget the job.
    pub async fn ack(&self, job: &Leased) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.ack(job).await,
            Queue::Rabbit(q) => q.ack(job).await,
        }
    }

    /// Try again at `at_ms`.
    pub async fn retry(
        &self,
        job: &Leased,
        at_ms: i64,
        error: &str,
        status: Option<u16>,
    ) -> Result<(), QueueError> {
        self.retry_not_before(job, at_ms, None, error, status).await
    }

    /// As [`Queue::retry`], never before `not_before_ms` (a destination's `Retry-After`).
    pub async fn retry_not_before(
        &self,
        job: &Leased,
        at_ms: i64,
        not_before_ms: Option<i64>,
        error: &str,
        status: Option<u16>,
    ) -> Result<(), QueueError> {
        match self {
            // `at_ms` is already at or after `not_before_ms`; the row waits exactly.
            Queue::Embedded(q) => {
                q.retry(job, at_ms.max(not_before_ms.unwrap_or(0)), error, status)
                    .await
            }
            Queue::Rabbit(q) => {
                q.retry_not_before(job, at_ms, not_before_ms, error, status)
                    .await
            }
        }
    }

    /// Give the job back without counting the attempt (shutdown, paused route).
    pub async fn release(&self, job: &Leased) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.release(job).await,
            Queue::Rabbit(q) => q.release(job).await,
        }
    }

    /// Stop trying; keep the job where operators can see and replay it.
    pub async fn park(
        &self,
        job: &Leased,
        reason: &str,
        status: Option<u16>,
    ) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.park(job, reason, status).await,
            Queue::Rabbit(q) => q.park(job, reason, status).await,
        }
    }

    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        match self {
            Queue::Embedded(q) => q.stats().await,
            Queue::Rabbit(q) => q.stats().await,
        }
    }

    /// Per route, counts and ages by state. Exact on the embedded queue; on RabbitMQ, whose
    /// queues do not split by route, as the ledger knows them (`None` without a ledger): a
    /// job in flight counts in the state it had before, and `in_flight` is 0.
    pub async fn route_stats(
        &self,
    ) -> Result<Option<std::collections::BTreeMap<String, QueueStats>>, QueueError> {
        match self {
            Queue::Embedded(q) => q.route_stats().await.map(Some),
            Queue::Rabbit(q) => match q.ledger() {
                Some(l) => l.route_stats().await.map(Some),
                None => Ok(None),
            },
        }
    }

    /// Whether [`Queue::route_stats`] sees jobs in flight per route.
    pub fn route_stats_see_leases(&self) -> bool {
        matches!(self, Queue::Embedded(_))
    }

    pub async fn parked(&self, limit: usize) -> Result<Vec<ParkedJob>, QueueError> {
        match self {
            Queue::Embedded(q) => q.parked(limit).await,
            Queue::Rabbit(q) => q.parked(limit).await,
        }
    }

    /// Move parked jobs (all, or the given ids) back to the work queue with attempts reset.
    pub async fn replay(&self, ids: Option<Vec<String>>) -> Result<u64, QueueError> {
        match self {
            Queue::Embedded(q) => q.replay(ids).await,
            Queue::Rabbit(q) => q.replay(ids).await,
        }
    }

    /// The payload of one job, for preview of a parked job.
    pub async fn load(&self, id: &str) -> Result<Option<Leased>, QueueError> {
        match self {
            Queue::Embedded(q) => q.load(id).await,
            Queue::Rabbit(q) => q.load(id).await,
        }
    }

    /// A cheap write that proves the store accepts writes (readiness).
    pub async fn check_writable(&self) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.check_writable().await,
            Queue::Rabbit(q) => q.check_writable().await,
        }
    }

    /// Forget deduplication keys past their TTL, up to [`DEDUPE_PURGE_BATCH`] per call.
    pub async fn purge_expired_dedupe(&self) -> Result<u64, QueueError> {
        match self {
            Queue::Embedded(q) => q.purge_expired_dedupe().await,
            Queue::Rabbit(q) => q.purge_expired_dedupe().await,
        }
    }

    /// Finish pending writes and refuse new ones.
    pub fn close(&self) {
        match self {
            Queue::Embedded(q) => q.close(),
            Queue::Rabbit(q) => q.close(),
        }
    }

    /// Resolves when new work may be available (an enqueue or replay happened).
    pub async fn notified(&self) {
        match self {
            Queue::Embedded(q) => q.notified().await,
            Queue::Rabbit(q) => q.notified().await,
        }
    }

    /// Parked jobs matching `filter`, oldest first, after `cursor` (a job id from a previous page).
    pub async fn parked_page(
        &self,
        filter: ParkedFilter,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<Vec<ParkedJob>, QueueError> {
        match self {
            Queue::Embedded(q) => q.parked_page(filter, limit, cursor).await,
            Queue::Rabbit(q) => q.parked_page(filter, limit, cursor).await,
        }
    }

    /// How many parked jobs match (a replay's dry run).
    pub async fn count_parked(&self, filter: ParkedFilter) -> Result<u64, QueueError> {
        match self {
            Queue::Embedded(q) => q.count_parked(filter).await,
            Queue::Rabbit(q) => q.count_parked(filter).await,
        }
    }

    /// Move up to `limit` matching parked jobs back to the work queue with attempts reset.
    pub async fn replay_matching(
        &self,
        filter: ParkedFilter,
        limit: Option<usize>,
    ) -> Result<u64, QueueError> {
        match self {
            Queue::Embedded(q) => q.replay_matching(filter, limit).await,
            Queue::Rabbit(q) => q.replay_matching(filter, limit).await,
        }
    }

    /// Routes paused by a relay older than the shared pause records (read once, to migrate).
    pub async fn paused_routes(&self) -> Result<Vec<String>, QueueError> {
        match self {
            Queue::Embedded(q) => q.paused_routes().await,
            Queue::Rabbit(q) => q.paused_routes().await,
        }
    }

    /// Set one field of a named map of shared control state (pause records, process
    /// reports): the SQLite file, or Redis on RabbitMQ (process memory without Redis).
    pub async fn map_set(&self, name: &str, field: &str, value: &str) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.map_set(name, field, value).await,
            Queue::Rabbit(q) => q.map_set(name, field, value).await,
        }
    }

    pub async fn map_get_all(
        &self,
        name: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, QueueError> {
        match self {
            Queue::Embedded(q) => q.map_get_all(name).await,
            Queue::Rabbit(q) => q.map_get_all(name).await,
        }
    }

    pub async fn map_remove(&self, name: &str, fields: &[String]) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.map_remove(name, fields).await,
            Queue::Rabbit(q) => q.map_remove(name, fields).await,
        }
    }

    /// Whether control state reaches other processes: always for the SQLite file (every
    /// process opening it sees it), on RabbitMQ only with Redis.
    pub fn shares_control_state(&self) -> bool {
        match self {
            Queue::Embedded(_) => true,
            Queue::Rabbit(q) => q.shares_control_state(),
        }
    }

    /// Move held jobs of `route` (set aside while it was paused) back to work; the number
    /// moved. The embedded queue holds nothing aside (paused jobs stay where they are).
    pub async fn unhold(
        &self,
        route: Option<&str>,
        still_paused: &[String],
    ) -> Result<u64, QueueError> {
        match self {
            Queue::Embedded(_) => Ok(0),
            Queue::Rabbit(q) => q.unhold(route, still_paused).await,
        }
    }

    /// Restart the lease clock of a job about to be delivered. `false`: the lease ran out
    /// and the job was (or will be) leased again, so this copy must not be delivered.
    pub async fn extend_lease(&self, job: &Leased) -> Result<bool, QueueError> {
        match self {
            Queue::Embedded(q) => q.extend_lease(job).await,
            Queue::Rabbit(q) => Ok(q.extend_lease(job)),
        }
    }

    /// Give back a leased job of a paused route without spending its attempt, to wait until
    /// the route is resumed (RabbitMQ: `{prefix}.held`; embedded: in place, skipped by lease).
    pub async fn set_aside(&self, job: &Leased) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.release(job).await,
            Queue::Rabbit(q) => q.hold(job).await,
        }
    }

    /// Lease like [`Queue::lease`], holding jobs of `paused` routes aside until they are
    /// resumed (RabbitMQ: in `{prefix}.held`, not cycled through a retry tier) and setting
    /// jobs of `blocked` routes (open circuit) back for a short while.
    pub async fn lease_holding(
        &self,
        max: usize,
        paused: Vec<String>,
        blocked: Vec<String>,
    ) -> Result<Vec<Leased>, QueueError> {
        match self {
            Queue::Embedded(q) => {
                let mut excluded = paused;
                excluded.extend(blocked);
                q.lease(max, excluded).await
            }
            Queue::Rabbit(q) => q.lease_holding(max, paused, blocked).await,
        }
    }

    /// Per-record order: note the versions of records just stored (the newest is kept).
    pub async fn order_seen(&self, versions: Vec<(String, i64)>) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.order_seen(versions).await,
            Queue::Rabbit(q) => q
                .dedupe()
                .order_seen(&versions, crate::ordering::REMEMBER_MS)
                .await
                .map_err(|e| QueueError::Dedupe(e.0)),
        }
    }

    /// Per-record order: may `version` of `key` be delivered now? (see [`crate::ordering`])
    pub async fn order_begin(
        &self,
        key: &str,
        version: i64,
        hold_ms: i64,
    ) -> Result<crate::ordering::Decision, QueueError> {
        match self {
            Queue::Embedded(q) => q.order_begin(key.to_owned(), version, hold_ms).await,
            Queue::Rabbit(q) => q
                .dedupe()
                .order_begin(key, version, hold_ms, crate::ordering::REMEMBER_MS)
                .await
                .map_err(|e| QueueError::Dedupe(e.0)),
        }
    }

    /// Per-record order: a job of `version` is done with `key` (`delivered` if it was).
    pub async fn order_finish(
        &self,
        key: &str,
        version: i64,
        delivered: bool,
    ) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.order_finish(key.to_owned(), version, delivered).await,
            Queue::Rabbit(q) => q
                .dedupe()
                .order_finish(key, version, delivered, crate::ordering::REMEMBER_MS)
                .await
                .map_err(|e| QueueError::Dedupe(e.0)),
        }
    }

    /// Forget the order state of records untouched for [`crate::ordering::REMEMBER_MS`]
    /// (Redis expires its own).
    pub async fn order_forget_old(&self) -> Result<u64, QueueError> {
        match self {
            Queue::Embedded(q) => {
                q.order_forget_before(now_ms() - crate::ordering::REMEMBER_MS)
                    .await
            }
            Queue::Rabbit(_) => Ok(0),
        }
    }

    /// Ack a delivered (or superseded) job, or park it (`park`: reason and status), with its
    /// ledger record: one transaction on SQLite; on RabbitMQ the ledger first, then the
    /// broker, so a crash between them records the outcome twice, never zero times.
    pub async fn settle_recorded(
        &self,
        job: &Leased,
        park: Option<(String, Option<u16>)>,
        record: Option<crate::ledger::Record>,
    ) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.settle_recorded(job, park, record).await,
            Queue::Rabbit(q) => {
                if let (Some(ledger), Some((facts, attempt, outcome))) = (q.ledger(), record) {
                    ledger.record(facts, attempt, outcome).await?;
                }
                match park {
                    Some((reason, status)) => q.park(job, &reason, status).await,
                    None => q.ack(job).await,
                }
            }
        }
    }

    /// Give a job back for `delay` without spending its attempt (its record is busy).
    pub async fn defer(&self, job: &Leased, delay: Duration) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.defer(job, delay).await,
            // The shortest way round on the broker: a retry tier near HOLD_DELAY.
            Queue::Rabbit(q) => q.release(job).await,
        }
    }

    /// Give a job back for at least `delay` without spending its attempt (a rate limit):
    /// exactly that long on the embedded queue, on RabbitMQ through the shortest retry tier
    /// at least that long.
    pub async fn defer_for(&self, job: &Leased, delay: Duration) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.defer(job, delay).await,
            Queue::Rabbit(q) => q.defer(job, delay).await,
        }
    }

    /// Whether this backend keeps the delivery ledger (the embedded queue in its file; the
    /// RabbitMQ backend in PostgreSQL, when `ledger.url` is set).
    pub fn keeps_ledger(&self) -> bool {
        match self {
            Queue::Embedded(q) => q.keeps_ledger(),
            Queue::Rabbit(q) => q.ledger().is_some(),
        }
    }

    /// Whether a job is in the ledger from the moment it is stored (the embedded queue
    /// answers from its file; RabbitMQ with `ledger.record_on_store`), rather than from the
    /// moment a worker first takes it.
    pub fn ledger_sees_stored_jobs(&self) -> bool {
        match self {
            Queue::Embedded(q) => q.keeps_ledger(),
            Queue::Rabbit(q) => q.ledger().is_some_and(|l| l.notes_stored_jobs()),
        }
    }

    /// Record what became of a job in the ledger (see [`crate::ledger`]); a no-op where none
    /// is kept (RabbitMQ without `ledger.url`).
    pub async fn ledger_record(
        &self,
        facts: crate::ledger::JobFacts,
        attempt: Option<crate::ledger::Attempt>,
        outcome: Option<crate::ledger::FinalOutcome>,
    ) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) if !q.keeps_ledger() => Ok(()),
            Queue::Embedded(q) => q.ledger_record(facts, attempt, outcome).await,
            Queue::Rabbit(q) => match q.ledger() {
                Some(l) => l.record(facts, attempt, outcome).await,
                None => Ok(()),
            },
        }
    }

    pub async fn ledger_query(
        &self,
        q: crate::ledger::LedgerQuery,
    ) -> Result<Vec<crate::ledger::Entry>, QueueError> {
        if !self.keeps_ledger() {
            return Err(QueueError::NotReady(NO_LEDGER.into()));
        }
        match self {
            Queue::Embedded(s) => s.ledger_query(q).await,
            Queue::Rabbit(r) => match r.ledger() {
                Some(l) => l.query(q).await,
                None => Err(QueueError::NotReady(NO_LEDGER.into())),
            },
        }
    }

    /// When the oldest ledger entry was stored, if the ledger is kept and holds any.
    pub async fn ledger_oldest_ms(&self) -> Result<Option<i64>, QueueError> {
        match self {
            Queue::Embedded(q) if q.keeps_ledger() => q.ledger_oldest_ms().await,
            Queue::Rabbit(q) => match q.ledger() {
                Some(l) => l.oldest_ms().await,
                None => Ok(None),
            },
            Queue::Embedded(_) => Ok(None),
        }
    }

    /// Retention: forget ledger entries stored before `before_ms`, then compact.
    pub async fn ledger_purge_before(&self, before_ms: i64) -> Result<u64, QueueError> {
        match self {
            Queue::Embedded(q) => {
                let n = q.ledger_purge_before(before_ms).await?;
                q.compact().await?;
                Ok(n)
            }
            Queue::Rabbit(q) => match q.ledger() {
                Some(l) => l.purge_before(before_ms).await,
                None => Ok(0),
            },
        }
    }

    /// Fold the embedded queue's WAL into its file and truncate it (nothing elsewhere).
    pub async fn compact(&self) -> Result<(), QueueError> {
        match self {
            Queue::Embedded(q) => q.compact().await,
            Queue::Rabbit(_) => Ok(()),
        }
    }

    /// Delete matching parked jobs for good.
    pub async fn purge_parked(&self, filter: ParkedFilter) -> Result<u64, QueueError> {
        match self {
            Queue::Embedded(q) => q.purge_parked(filter).await,
            Queue::Rabbit(q) => q.purge_parked(filter).await,
        }
    }
}

/// Why a ledger question has no answer here.
pub const NO_LEDGER: &str = "no delivery ledger is kept: it is off (ledger.enabled = false), or this RabbitMQ relay has no ledger.url (PostgreSQL)";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A park reason for a stored job whose payload does not decode: the job id, the kind of
/// error and where, never the text serde quotes (it can hold personal data).
pub fn decode_error(id: &str, e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => "not a job this relay knows",
        serde_json::error::Category::Eof => "truncated",
    };
    format!(
        "job {id}: the stored payload is {kind} (line {}, column {}); it cannot be delivered",
        e.line(),
        e.column()
    )
}

/// Most expired dedupe keys one purge call removes (one short write transaction).
pub const DEDUPE_PURGE_BATCH: u64 = 10_000;

/// Where a page of parked jobs ended: the last job's parking time and id, so the next page
/// starts after that position even when that job was replayed or purged meanwhile. Written
/// as `{parked_at_ms}~{id}`; a bare job id (older cursors) is still understood.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ParkedCursor {
    pub parked_at_ms: i64,
    pub id: String,
}

impl ParkedCursor {
    pub fn after(job: &ParkedJob) -> String {
        format!("{}~{}", job.parked_at_ms, job.id)
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (ms, id) = text.split_once('~')?;
        Some(Self {
            parked_at_ms: ms.parse().ok()?,
            id: id.to_owned(),
        })
    }

    /// Whether `job` comes after this position in parking order.
    pub fn is_before(&self, job: &ParkedJob) -> bool {
        (job.parked_at_ms, job.id.as_str()) > (self.parked_at_ms, self.id.as_str())
    }
}
