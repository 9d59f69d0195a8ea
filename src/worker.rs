//! Delivery workers: lease jobs, translate them with the current mapping, call Centercode,
//! and ack, schedule a retry or park, according to the answer. A job is never dropped.

use crate::centercode::{status_class, CentercodeClient, CentercodeResponse, TransportError};
use crate::control::{CircuitState, RouteControl};
use crate::mapping;
use crate::metrics::Metrics;
use crate::queue::Job;
use crate::queue::{now_ms, Leased, Queue, QueueError};
use crate::retry::RetryPolicy;
use crate::salesforce::batch::Batcher;
use crate::salesforce::{SalesforceClient, WriteOutcome, WriteResult};
use crate::settings::{Action, OnOutcomeUnknown, OnUserNotFound, RouteSettings, Settings};
use secrecy::ExposeSecret;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// A job that waited this long between its lease and its delivery has its lease extended
/// first, so the lease covers the call itself (`queue.lease_secs` must exceed
/// `centercode.timeout_ms` by more than this).
pub const LEASE_REFRESH_AFTER: Duration = Duration::from_millis(500);

/// How long a worker keeps trying to record an outcome before leaving the job to its lease:
/// half the lease (the rest covers a redelivery's own call), at most a minute, and never past
/// the lease itself.
fn record_retry_window(settings: &Settings) -> Duration {
    Duration::from_secs(settings.queue.lease_secs / 2).min(Duration::from_secs(60))
}

/// How long a job waits when another version of its record is being delivered.
pub const RECORD_BUSY_DELAY: Duration = Duration::from_millis(200);

/// A delivery's call slot, given up while the job waits for its place under a rate limit,
/// so the wait takes no slot another destination's job could use.
#[derive(Default)]
struct CallSlot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    pool: Option<Arc<Semaphore>>,
}

impl CallSlot {
    async fn wait(&mut self, pause: Duration) {
        self.permit = None;
        tokio::time::sleep(pause).await;
        if let Some(pool) = &self.pool {
            self.permit = pool.clone().acquire_owned().await.ok();
        }
    }
}

/// What one call to Centercode was, for the ledger. No `Debug`: it holds the e-mail, which
/// must not be printable by accident.
pub struct CallRecord {
    started_at_ms: i64,
    duration_ms: i64,
    status: Option<u16>,
    error_class: Option<String>,
    response: Option<String>,
    /// The e-mail the call was about (turned into a subject key, never stored).
    subject: Option<String>,
}

/// What became of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Centercode accepted it (status recorded).
    Delivered { status: u16 },
    /// Removal of a user Centercode does not know: nothing to remove, counted as done.
    UserNotFound,
    /// Scheduled for another attempt.
    Retried { status: Option<u16> },
    /// Given up on; kept where operators can replay it.
    Parked { reason: String, status: Option<u16> },
    /// Returned to the queue without spending an attempt (route paused or circuit open).
    Held { reason: String },
    /// Not sent: a newer version of the same record was delivered already or is waiting
    /// (see [`crate::ordering`]). Recorded and acked: accounted for, not lost.
    Superseded { version: i64, newer: i64 },
    /// Another version of the same record is being delivered right now: back shortly,
    /// attempt not spent.
    RecordBusy,
    /// The destination's `[[limits]]` rate was reached (or it asked, with `Retry-After`, to
    /// be left alone): given back for `wait`, attempt not spent (see [`crate::ratelimit`]).
    RateLimited { limit: String, wait: Duration },
}

impl Outcome {
    /// Whether the job leaves the queue (acked or parked) with this outcome.
    pub fn ends_the_job(&self) -> bool {
        matches!(
            self,
            Outcome::Delivered { .. }
                | Outcome::UserNotFound
                | Outcome::Parked { .. }
                | Outcome::Superseded { .. }
        )
    }
}

/// Delivers jobs from `queue` to Centercode.
#[derive(Clone)]
pub struct Worker {
    queue: Queue,
    settings: Arc<Settings>,
    client: CentercodeClient,
    policy: RetryPolicy,
    metrics: Arc<Metrics>,
    control: Arc<RouteControl>,
    limiter: Arc<crate::ratelimit::RateLimiter>,
    /// Writes into Salesforce (`salesforce_upsert` jobs and status write-backs).
    salesforce: Option<Arc<Batcher>>,
}

/// The Salesforce client and batcher for `[salesforce]`, if configured: `Err` when its key
/// cannot be read (the start fails, rather than every delivery).
pub fn salesforce_batcher(
    settings: &Settings,
    metrics: Arc<Metrics>,
) -> Result<Option<Arc<Batcher>>, String> {
    let Some(sf) = &settings.salesforce else {
        return Ok(None);
    };
    let client = SalesforceClient::new(sf, metrics)?;
    Ok(Some(Arc::new(Batcher::new(
        Arc::new(client),
        settings.worker.concurrency,
    ))))
}

impl Worker {
    /// A worker with its own metrics and no paused routes.
    pub fn new(queue: Queue, settings: Arc<Settings>) -> Self {
        Self::with_observers(queue, settings, Arc::default(), Arc::default())
    }

    /// A worker sharing the gateway's metrics and route controls.
    pub fn with_observers(
        queue: Queue,
        settings: Arc<Settings>,
        metrics: Arc<Metrics>,
        control: Arc<RouteControl>,
    ) -> Self {
        let client = CentercodeClient::new(Duration::from_millis(settings.centercode.timeout_ms));
        let policy = RetryPolicy {
            schedule: settings.worker.retry_delays(),
            max_age: Duration::from_secs(settings.worker.max_age_secs),
            retry_after_max: Duration::from_secs(settings.worker.retry_after_max_secs),
        };
        let limiter = Arc::new(crate::ratelimit::RateLimiter::new(&settings));
        let salesforce =
            salesforce_batcher(&settings, metrics.clone()).unwrap_or_else(|e| panic!("{e}"));
        Self {
            queue,
            settings,
            client,
            policy,
            metrics,
            control,
            limiter,
            salesforce,
        }
    }

    /// Share the application's Salesforce client (one token and one API-usage gate per
    /// process) instead of this worker's own.
    pub fn with_salesforce(mut self, salesforce: Option<Arc<Batcher>>) -> Self {
        if salesforce.is_some() {
            self.salesforce = salesforce;
        }
        self
    }

    /// Lease and deliver until `stop` is cancelled; then let in-flight deliveries finish
    /// within the shutdown grace period (an unfinished job's lease expires and it comes back).
    pub async fn run_until_stopped(self, stop: CancellationToken) {
        let concurrency = self.settings.worker.concurrency;
        // `calls` bounds concurrent Centercode calls; `outstanding` bounds jobs between lease
        // and their recorded outcome, so a slow queue write never holds a call slot.
        let calls = Arc::new(Semaphore::new(concurrency));
        let outstanding = Arc::new(Semaphore::new(concurrency * 2));
        // Upserts into Salesforce wait in the batcher for a Collections call instead of
        // holding a call slot each: up to a full batch per Salesforce call slot.
        let batch_room = concurrency
            * self
                .salesforce
                .as_ref()
                .map_or(1, |b| b.client().batch_size());
        let batched = Arc::new(Semaphore::new(batch_room));
        // A feeder task leases ahead into a bounded channel, so a freed call slot never waits
        // for a lease round trip (one lease transaction serves many jobs).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Leased, Instant)>(concurrency);
        let feeder = tokio::spawn(self.clone().feed(tx, stop.clone()));
        let mut unstarted = Vec::new();
        loop {
            let (job, leased_at) = tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                _ = stop.cancelled() => break,
            };
            let to_batch =
                self.salesforce.is_some() && job.action == Action::SalesforceUpsert.as_str();
            let permits = tokio::select! {
                p = async {
                    if to_batch {
                        (batched.clone().acquire_owned().await, None)
                    } else {
                        let out = outstanding.clone().acquire_owned().await;
                        let call = calls.clone().acquire_owned().await;
                        (out, Some(call))
                    }
                } => p,
                _ = stop.cancelled() => {
                    unstarted.push(job);
                    break;
                }
            };
            let (Ok(out), call) = permits else { break };
            let call = match call {
                None => None,
                Some(Ok(call)) => Some(call),
                Some(Err(_)) => break,
            };
            let worker = self.clone();
            let pool = (!to_batch).then(|| calls.clone());
            tokio::spawn(async move {
                // The lease clock restarts when the delivery starts: a job leased ahead may
                // have waited behind slow calls for much of its lease.
                if leased_at.elapsed() >= LEASE_REFRESH_AFTER {
                    match worker.queue.extend_lease(&job).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(job_id = %job.id, "lease ran out while the job waited for a call slot; it was leased again, not delivering this copy");
                            drop(out);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(job_id = %job.id, error = %e, "could not extend the lease; delivering on the one it has")
                        }
                    }
                }
                let slot = CallSlot { permit: call, pool };
                worker.deliver(job, slot).await;
                drop(out);
            });
        }
        // Jobs leased but not started go back without spending an attempt.
        let _ = feeder.await;
        rx.close();
        while let Some((job, _)) = rx.recv().await {
            unstarted.push(job);
        }
        for job in unstarted {
            if let Err(e) = self.queue.release(&job).await {
                tracing::warn!(error = %e, job_id = %job.id, "could not return a job on shutdown; its lease will expire");
            }
        }
        let grace = Duration::from_secs(self.settings.server.shutdown_grace_secs);
        let drained = async {
            let _ = outstanding.acquire_many((concurrency * 2) as u32).await;
            let _ = batched.acquire_many(batch_room as u32).await;
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("shutdown grace period ended with deliveries in flight; their jobs will be redelivered");
        }
    }

    /// Lease due jobs into `tx` as room frees up, until `stop`.
    async fn feed(self, tx: tokio::sync::mpsc::Sender<(Leased, Instant)>, stop: CancellationToken) {
        let poll = Duration::from_millis(self.settings.worker.poll_interval_ms);
        while !stop.is_cancelled() {
            if tx.capacity() == 0 {
                tokio::select! {
                    permit = tx.reserve() => match permit {
                        Ok(permit) => drop(permit),
                        Err(_) => return,
                    },
                    _ = stop.cancelled() => return,
                }
                continue;
            }
            match self
                .queue
                .lease_holding(tx.capacity(), self.control.paused(), self.control.blocked())
                .await
            {
                Ok(jobs) if jobs.is_empty() => {
                    // A job given back for a rate limit is due before the next poll, maybe.
                    let wait = self.limiter.until_next_due().map_or(poll, |d| d.min(poll));
                    tokio::select! {
                        _ = self.queue.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                Ok(jobs) => {
                    for job in jobs {
                        // Room was reserved by `capacity()`; only a closed channel fails.
                        if let Err(tokio::sync::mpsc::error::SendError((job, _))) =
                            tx.send((job, Instant::now())).await
                        {
                            let _ = self.queue.release(&job).await;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not lease jobs; retrying shortly");
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// What the ledger records of this delivery: the attempt (when Centercode was called)
    /// and, for an outcome that ends the job, the final outcome. `None` for a job held without
    /// a call, or when no ledger is kept.
    fn ledger_record_of(
        &self,
        job: &Leased,
        outcome: &Outcome,
        call: Option<CallRecord>,
    ) -> Option<crate::ledger::Record> {
        if !self.queue.keeps_ledger() {
            return None;
        }
        // A job held without a call (paused route, record busy, rate limit) adds nothing to
        // a ledger that knows it from its storing; where a job enters the ledger when a
        // worker first takes it (RabbitMQ without `ledger.record_on_store`), this is that
        // moment: its facts go in, no attempt.
        let facts_only = call.is_none() && !outcome.ends_the_job();
        if facts_only && self.queue.ledger_sees_stored_jobs() {
            return None;
        }
        let (attempt_outcome, final_outcome, reason) = match outcome {
            Outcome::Delivered { .. } => ("done", Some("delivered"), None),
            Outcome::UserNotFound => ("user_not_found", Some("user_not_found"), None),
            Outcome::Retried { .. } => ("retry", None, None),
            Outcome::Held { .. } | Outcome::RecordBusy | Outcome::RateLimited { .. } => {
                ("held", None, None)
            }
            Outcome::Parked { reason, .. } => ("parked", Some("parked"), Some(reason.clone())),
            Outcome::Superseded { version, newer } => (
                "superseded",
                Some("superseded"),
                Some(format!(
                    "version {version} is older than {newer}, delivered or waiting"
                )),
            ),
        };
        let secret = self.settings.ledger.subject_key.expose_secret();
        let subject_key = call
            .as_ref()
            .and_then(|c| c.subject.as_deref())
            .filter(|_| !secret.is_empty())
            .map(|email| crate::ledger::subject_key(secret.as_bytes(), email));
        let facts = crate::ledger::JobFacts {
            job_id: job.id.clone(),
            route: job.route.clone(),
            action: job.action.clone(),
            org_id: job.org_id.clone(),
            notification_id: job.notification_id.clone(),
            record_id: job.record_id.clone(),
            subject_key,
            received_at_ms: job.received_at_ms,
            stored_at_ms: job.first_seen_ms,
        };
        let attempt = call.map(|c| crate::ledger::Attempt {
            attempt: job.attempts,
            started_at_ms: c.started_at_ms,
            duration_ms: c.duration_ms,
            status: c.status,
            error_class: c.error_class,
            outcome: attempt_outcome.to_owned(),
            response: c.response,
        });
        // A route may keep a completed job's payload for a while (keep_payload_days), e.g.
        // to resend feedback Centercode lost; by default it is gone with the job.
        let keep_days = self
            .settings
            .route(&job.route)
            .map_or(0, |r| r.keep_payload_days);
        let kept_payload = (keep_days > 0
            && matches!(outcome, Outcome::Delivered { .. } | Outcome::UserNotFound))
        .then(|| serde_json::to_string(&job.job).ok())
        .flatten()
        .map(|json| crate::ledger::KeptPayload {
            json,
            expires_at_ms: now_ms() + i64::from(keep_days) * 86_400_000,
        });
        let final_outcome = final_outcome.map(|o| crate::ledger::FinalOutcome {
            outcome: o.to_owned(),
            reason,
            at_ms: now_ms(),
            kept_payload,
        });
        Some((facts, attempt, final_outcome))
    }

    /// Lease and deliver everything that is due now, one batch at a time (tests, demo).
    pub async fn deliver_all(&self) -> Result<Vec<Outcome>, QueueError> {
        let mut outcomes = Vec::new();
        loop {
            let jobs = self
                .queue
                .lease_holding(
                    self.settings.worker.concurrency,
                    self.control.paused(),
                    self.control.blocked(),
                )
                .await?;
            if jobs.is_empty() {
                return Ok(outcomes);
            }
            let results =
                futures_util::future::join_all(jobs.into_iter().map(|j| self.process_one(j))).await;
            outcomes.extend(results);
        }
    }

    /// Deliver one leased job and record its outcome in the queue.
    pub async fn process_one(&self, job: Leased) -> Outcome {
        self.deliver(job, CallSlot::default()).await
    }

    /// Deliver, free the call slot, then record the outcome.
    async fn deliver(&self, job: Leased, mut call_slot: CallSlot) -> Outcome {
        // The lease was taken or renewed at most LEASE_REFRESH_AFTER ago (see `run`): retries
        // of this job's writes stop before it can have run out, when another worker may
        // have the job.
        let lease_left = Instant::now()
            + Duration::from_secs(self.settings.queue.lease_secs)
                .saturating_sub(LEASE_REFRESH_AFTER * 2);
        let span = tracing::info_span!(
            "deliver",
            job_id = %job.id,
            route = %job.route,
            notification_id = job.notification_id.as_deref().unwrap_or(""),
            record_id = job.record_id.as_deref().unwrap_or(""),
            attempt = job.attempts,
            centercode.status = tracing::field::Empty,
        );
        async move {
            let mut call = None;
            // A write-back keeps an order of its own per record, by the time of the outcome
            // it reports: an older status (retried after a 503, say) never overwrites a newer
            // one. Its own key, so it neither waits for nor advances the route's own jobs.
            let is_writeback = matches!(job.job, Job::StatusWritebackV1 { .. });
            let order = if is_writeback {
                crate::ordering::record_key(
                    &format!("{}\u{1f}status", job.route),
                    job.record_id.as_deref(),
                )
                .map(|key| (key, job.received_at_ms))
            } else {
                self.settings.route(&job.route).and_then(|route| {
                    crate::ordering::record_key(&job.route, job.record_id.as_deref()).map(|key| {
                        (key, crate::ordering::version_of(&job.job, route, job.received_at_ms))
                    })
                })
            };
            let outcome = match &order {
                None => self.decide(&job, &mut call, &mut call_slot).await,
                Some((key, version)) => {
                    self.decide_in_order(&job, key, *version, &mut call, &mut call_slot)
                        .await
                }
            };
            drop(call_slot);
            // A job leaves the queue only once its outcome is in the ledger: written with the
            // ack or park (one transaction on SQLite; the ledger first on RabbitMQ). An attempt
            // that does not end the job is written on its own.
            let record = self.ledger_record_of(&job, &outcome, call);
            let ledger_started = Instant::now();
            let writes_ledger = record.is_some();
            let record = match record {
                Some((facts, attempt, last)) if !outcome.ends_the_job() => {
                    if let Err(e) = self.queue.ledger_record(facts, attempt, last).await {
                        tracing::warn!(error = %e, "could not write the attempt to the ledger");
                    }
                    None
                }
                r => r,
            };
            if outcome.ends_the_job() && !is_writeback {
                self.enqueue_writeback(&job, &outcome).await;
            }
            let recorded = self
                .record_outcome_retrying(&job, &outcome, record, lease_left)
                .await;
            if writes_ledger {
                self.metrics.observe(
                    "relay_ledger_write_seconds",
                    &[],
                    ledger_started.elapsed().as_secs_f64(),
                );
            }
            if let Err(e) = recorded {
                // The lease will expire and the job come back: at-least-once, never lost.
                tracing::error!(error = %e, "could not record the delivery outcome (and its ledger entry); the job stays leased and comes back");
            }
            let label = match &outcome {
                Outcome::Delivered { .. } => "done",
                Outcome::UserNotFound => "user_not_found",
                Outcome::Retried { .. } => "retried",
                Outcome::Parked { .. } => "parked",
                Outcome::Held { .. } | Outcome::RecordBusy => "held",
                Outcome::Superseded { .. } => "superseded",
                Outcome::RateLimited { .. } => "rate_limited",
            };
            self.metrics.inc(
                "relay_deliveries_total",
                &[
                    ("route", job.route.as_str()),
                    ("action", job.action.as_str()),
                    ("outcome", label),
                ],
                1,
            );
            tracing::info!(outcome = ?outcome, "delivery finished");
            outcome
        }
        .instrument(span)
        .await
    }

    /// Record `outcome` (ack, park, or give the job back), retrying a failed write that may
    /// clear ([`QueueError::may_clear`]) for a while: a storage that fails for a moment (a
    /// full disk given space, the ledger database restarting) settles the job within seconds
    /// instead of leaving it leased until its lease runs out and it is delivered again. Past
    /// [`record_retry_window`], the lease's expiry brings the job back (at-least-once, never
    /// lost).
    async fn record_outcome_retrying(
        &self,
        job: &Leased,
        outcome: &Outcome,
        record: Option<crate::ledger::Record>,
        lease_left: Instant,
    ) -> Result<(), QueueError> {
        match outcome {
            Outcome::Superseded { version, newer } => {
                tracing::info!(
                    version,
                    newer,
                    "job superseded by a newer version of its record; not sent"
                );
            }
            Outcome::RateLimited { wait, .. } => self.limiter.note_due(Instant::now() + *wait),
            Outcome::Parked { reason, .. } => tracing::warn!(reason = %reason, "job parked"),
            _ => {}
        }
        let until = lease_left.min(Instant::now() + record_retry_window(&self.settings));
        self.write_retrying(until, || self.record_outcome(job, outcome, record.clone()))
            .await
    }

    /// Run `write` until it succeeds, fails for good, or `until` (100 ms between tries,
    /// doubling to 2 s): only errors that may clear are tried again. Retried writes are
    /// safe: each changes the job only under its lease token, and an outcome the ledger got
    /// twice is shown once.
    async fn write_retrying<F, Fut>(&self, until: Instant, mut write: F) -> Result<(), QueueError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), QueueError>>,
    {
        let mut pause = Duration::from_millis(100);
        loop {
            match write().await {
                Err(e) if e.may_clear() && Instant::now() + pause < until => {
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "could not record the delivery outcome; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    /// One try at recording `outcome` with its ledger `record`.
    async fn record_outcome(
        &self,
        job: &Leased,
        outcome: &Outcome,
        record: Option<crate::ledger::Record>,
    ) -> Result<(), QueueError> {
        match outcome {
            Outcome::Delivered { .. } | Outcome::UserNotFound | Outcome::Superseded { .. } => {
                self.queue.settle_recorded(job, None, record).await
            }
            Outcome::RecordBusy => self.queue.defer(job, RECORD_BUSY_DELAY).await,
            Outcome::RateLimited { wait, .. } => self.queue.defer_for(job, *wait).await,
            Outcome::Parked { reason, status } => {
                self.queue
                    .settle_recorded(job, Some((reason.clone(), *status)), record)
                    .await
            }
            Outcome::Retried { .. } => Ok(()), // recorded in `decide`, which knows the time
            // A paused route's job waits set aside until the resume; an open circuit's
            // job comes back after a short while to probe.
            Outcome::Held { .. } if self.control.is_paused(&job.route) => {
                self.queue.set_aside(job).await
            }
            Outcome::Held { .. } => self.queue.release(job).await,
        }
    }

    /// [`Worker::decide`] under the record's hold: only one version of a record in flight,
    /// and never one older than a version delivered or waiting.
    async fn decide_in_order(
        &self,
        job: &Leased,
        key: &str,
        version: i64,
        call: &mut Option<CallRecord>,
        slot: &mut CallSlot,
    ) -> Outcome {
        use crate::ordering::Decision;
        let hold = crate::ordering::hold_ms(&self.settings);
        match self.queue.order_begin(key, version, hold).await {
            Ok(Decision::Go) => {}
            Ok(Decision::Superseded { newer }) => return Outcome::Superseded { version, newer },
            Ok(Decision::Busy) => return Outcome::RecordBusy,
            Err(e) => {
                // Without the record's state the order cannot be kept: try again shortly.
                tracing::warn!(error = %e, "could not read the record's order state; trying again shortly");
                return Outcome::RecordBusy;
            }
        }
        let outcome = self.decide(job, call, slot).await;
        let delivered = matches!(outcome, Outcome::Delivered { .. } | Outcome::UserNotFound);
        if let Err(e) = self.queue.order_finish(key, version, delivered).await {
            // The hold lapses by itself; a lost "delivered" only lets an older late copy
            // through if one arrives before the next delivery of this record.
            tracing::warn!(error = %e, "could not record the record's delivered version");
        }
        outcome
    }

    async fn decide(
        &self,
        job: &Leased,
        call: &mut Option<CallRecord>,
        slot: &mut CallSlot,
    ) -> Outcome {
        let Some(route) = self.settings.route(&job.route) else {
            return Outcome::Parked {
                reason: format!("route `{}` is no longer configured", job.route),
                status: None,
            };
        };
        if matches!(job.job, Job::StatusWritebackV1 { .. }) {
            return self.decide_writeback(job, route, call).await;
        }
        if route.action == Action::SalesforceUpsert {
            return self.decide_salesforce(job, route, call, slot).await;
        }
        let request = match mapping::to_centercode(&job.job, route) {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Parked {
                    reason: e.to_string(),
                    status: None,
                }
            }
        };
        if self.control.is_paused(&route.name) {
            return Outcome::Held {
                reason: "route paused".into(),
            };
        }
        // The limit is asked last before the breaker, so a job held by either costs no
        // capacity of the other; under per-record order the record is held already.
        let limit = self.limiter.limit_for(&route.name);
        if let Some(limit) = &limit {
            if let Some(limited) = self.admit(limit, job, slot).await {
                return limited;
            }
        }
        // A job admitted while the circuit is not closed is the probe.
        let probing = self.control.breaker.state(&route.name) != CircuitState::Closed;
        if !self.control.breaker.admit(&route.name) {
            return Outcome::Held {
                reason: "circuit open: Centercode kept failing for this route".into(),
            };
        }
        let started = std::time::Instant::now();
        let started_at_ms = now_ms();
        let result = self
            .client
            .send(&request, self.settings.api_key_for(route))
            .await;
        *call = Some(CallRecord {
            started_at_ms,
            duration_ms: started.elapsed().as_millis() as i64,
            status: result.as_ref().ok().map(|r| r.status),
            error_class: result.as_ref().err().map(|e| e.class().to_owned()),
            response: result.as_ref().ok().and_then(|r| r.excerpt.clone()),
            subject: request.find.clone(),
        });
        // Feed the breaker: transient failures count, a permanent 4xx says Centercode is up.
        let healthy = match &result {
            Ok(r) if (200..300).contains(&r.status) || r.status == 404 => Some(true),
            Ok(r) if matches!(r.status, 408 | 429 | 500..=599) => Some(false),
            Ok(_) => None,
            Err(_) => Some(false),
        };
        self.control.breaker.record(&route.name, healthy);
        // A failed probe only says Centercode is still down: it costs the job no attempt (a
        // long outage would otherwise park every job one probe at a time), unless the job
        // is past max_age, or the request may have been acted on (outcome unknown).
        let unknown_outcome = matches!(&result, Err(e) if e.outcome_unknown())
            && route.on_outcome_unknown() == OnOutcomeUnknown::Park;
        if probing && healthy == Some(false) && !unknown_outcome {
            let age = Duration::from_millis((now_ms() - job.first_seen_ms).max(0) as u64);
            if age < self.policy.max_age {
                return Outcome::Held {
                    reason: "circuit still open: the probe to Centercode failed".into(),
                };
            }
        }
        let route_label = [("route", route.name.as_str())];
        self.metrics.observe(
            "relay_centercode_latency_seconds",
            &route_label,
            started.elapsed().as_secs_f64(),
        );
        let class = match &result {
            Ok(r) => status_class(r.status),
            Err(_) => "error",
        };
        self.metrics.inc(
            "relay_centercode_responses_total",
            &[("route", route.name.as_str()), ("status_class", class)],
            1,
        );
        if matches!(&result, Ok(r) if r.status == 401 || r.status == 403) {
            self.metrics
                .inc("relay_centercode_auth_failures_total", &route_label, 1);
        }
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "centercode call returned"
        );
        match result {
            Ok(CentercodeResponse {
                status,
                retry_after,
                ..
            }) => {
                tracing::Span::current().record("centercode.status", status);
                match (status, route.action) {
                    (200..=299, _) => Outcome::Delivered { status },
                    (404, Action::RemoveUser) => Outcome::UserNotFound,
                    (404, Action::StoreUserData) if route.on_user_not_found == OnUserNotFound::Done => Outcome::UserNotFound,
                    (404, Action::StoreUserData) => Outcome::Parked {
                        reason: "Centercode has no user with this e-mail (404)".into(),
                        status: Some(status),
                    },
                    (408 | 429 | 500..=599, _) => {
                        if let (Some(limit), Some(pause), 429 | 503) = (&limit, retry_after, status) {
                            // Tell every worker at once, instead of each job finding out.
                            let pause = pause.min(self.policy.retry_after_max);
                            if let Err(e) = self.limiter.slow(&self.queue, limit, pause).await {
                                tracing::warn!(error = %e, limit = %limit.name, "could not share the destination's Retry-After");
                            }
                        }
                        self.retry(job, Some(status), format!("Centercode answered {status}"), retry_after)
                            .await
                    }
                    (401 | 403, _) => {
                        // Every job of this route would fail the same way: pause the route
                        // (no attempts spent) until an operator fixes the key and resumes.
                        let by = format!("auto: Centercode answered {status} (process {})", crate::shared_control::process_id());
                        if let Err(e) = crate::shared_control::set_paused(&self.queue, &self.control, &route.name, true, &by).await {
                            // Paused here at least; other processes will meet the 401 themselves.
                            self.control.set_paused(&route.name, true);
                            tracing::warn!(error = %e, "could not share the automatic pause; paused in this process only");
                        }
                        tracing::error!(status, "Centercode refused the API key or the relay's address; route paused until `relay routes resume`");
                        Outcome::Held {
                            reason: format!("Centercode answered {status}: check centercode.api_key and the key's IP allow-list, then resume the route"),
                        }
                    }
                    _ => Outcome::Parked {
                        reason: format!("Centercode rejected the request ({status}); fix the mapping or the Centercode setup, then replay"),
                        status: Some(status),
                    },
                }
            }
            Err(e) => {
                let unknown = e.outcome_unknown();
                if unknown && route.on_outcome_unknown() == OnOutcomeUnknown::Park {
                    Outcome::Parked {
                        reason: format!("outcome unknown: {e}; Centercode may have created it already, check before replaying"),
                        status: None,
                    }
                } else {
                    let reason = match &e {
                        TransportError::Connect(_) => e.to_string(),
                        _ => format!(
                            "{e} (outcome unknown; retrying is safe for {})",
                            route.action.as_str()
                        ),
                    };
                    self.retry(job, None, reason, None).await
                }
            }
        }
    }

    /// Take the job's place under its rate limit: `None` to go (after waiting for a place
    /// near enough, without the call slot), else the job's outcome (given back).
    async fn admit(
        &self,
        limit: &crate::ratelimit::Limit,
        job: &Leased,
        slot: &mut CallSlot,
    ) -> Option<Outcome> {
        let label = [("host", limit.name.as_str())];
        let wait = match self.limiter.acquire(&self.queue, limit).await {
            Ok(answer) => {
                self.metrics.set(
                    "relay_rate_limit_allowance",
                    &label,
                    f64::from(answer.allowance),
                );
                if answer.placed {
                    if answer.wait_us > 0 {
                        self.metrics.inc("relay_rate_limited_total", &label, 1);
                        slot.wait(Duration::from_micros(answer.wait_us as u64))
                            .await;
                        // The destination may have asked every worker to stop meanwhile.
                        match self.limiter.stopped_for(&self.queue, limit).await {
                            Ok(left) if left > Duration::ZERO => {
                                return Some(Outcome::RateLimited {
                                    limit: limit.name.clone(),
                                    wait: left,
                                })
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, limit = %limit.name, "could not read the rate limit's state; trying again shortly");
                                return Some(Outcome::RateLimited {
                                    limit: limit.name.clone(),
                                    wait: RECORD_BUSY_DELAY,
                                });
                            }
                        }
                        // The wait may have eaten into the lease the call needs.
                        if let Ok(false) = self.queue.extend_lease(job).await {
                            return Some(Outcome::Held {
                                reason: "the lease ran out while waiting for the rate limit".into(),
                            });
                        }
                    }
                    return None;
                }
                // Up to one interval more, so jobs that waited together do not all come
                // back at the same instant to find one place free.
                let spread = rand::random::<f64>() * limit.interval_us as f64;
                Duration::from_micros((answer.wait_us as f64 + spread) as u64)
            }
            Err(e) => {
                // Without the shared state the limit cannot be kept: try again shortly.
                tracing::warn!(error = %e, limit = %limit.name, "could not read the rate limit's state; trying again shortly");
                RECORD_BUSY_DELAY
            }
        };
        self.metrics.inc("relay_rate_limited_total", &label, 1);
        tracing::debug!(wait_ms = wait.as_millis() as u64, limit = %limit.name, "rate limited; job given back");
        Some(Outcome::RateLimited {
            limit: limit.name.clone(),
            wait,
        })
    }

    /// A Centercode webhook's job: upsert its record into Salesforce (batched with others).
    async fn decide_salesforce(
        &self,
        job: &Leased,
        route: &RouteSettings,
        call: &mut Option<CallRecord>,
        slot: &mut CallSlot,
    ) -> Outcome {
        let record = match mapping::to_salesforce(&job.job, route) {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Parked {
                    reason: e.to_string(),
                    status: None,
                }
            }
        };
        if self.control.is_paused(&route.name) {
            return Outcome::Held {
                reason: "route paused".into(),
            };
        }
        let Some(salesforce) = self.salesforce.clone() else {
            return Outcome::Parked {
                reason:
                    "no [salesforce] org is configured to write into; configure it, then replay"
                        .into(),
                status: None,
            };
        };
        if let Some(limited) = self.salesforce_gate(&salesforce).await {
            return limited;
        }
        if let Some(limit) = self.limiter.limit_for(&route.name) {
            if let Some(limited) = self.admit(&limit, job, slot).await {
                return limited;
            }
        }
        // The batcher has Salesforce call slots of its own.
        slot.permit = None;
        let started = Instant::now();
        let started_at_ms = now_ms();
        let result = salesforce.upsert(record).await;
        self.salesforce_outcome(job, result, started, started_at_ms, call)
            .await
    }

    /// A status write-back job: update the originating Salesforce record.
    async fn decide_writeback(
        &self,
        job: &Leased,
        route: &RouteSettings,
        call: &mut Option<CallRecord>,
    ) -> Outcome {
        let Job::StatusWritebackV1 {
            sobject,
            record_id,
            fields,
        } = &job.job
        else {
            unreachable!("decide_writeback is only called for write-back jobs");
        };
        if self.control.is_paused(&route.name) {
            return Outcome::Held {
                reason: "route paused".into(),
            };
        }
        let Some(salesforce) = self.salesforce.clone() else {
            return Outcome::Parked {
                reason: "no [salesforce] org is configured for the status write-back".into(),
                status: None,
            };
        };
        if let Some(limited) = self.salesforce_gate(&salesforce).await {
            return limited;
        }
        let started = Instant::now();
        let started_at_ms = now_ms();
        let mut result = salesforce.client().update(sobject, record_id, fields).await;
        // The record is in the recycle bin (often the erased Contact itself): there is
        // nothing left to show the status on, and nothing for a person to fix.
        if let WriteOutcome::Rejected { status, code, .. } = &result.outcome {
            if code == "ENTITY_IS_DELETED" {
                tracing::info!(job_id = %job.id, "the record was deleted in Salesforce; no status to write");
                result.outcome = WriteOutcome::Done { status: *status };
            }
        }
        self.salesforce_outcome(job, result, started, started_at_ms, call)
            .await
    }

    /// Writes wait while the org's API allocation or the relay's share of it is used up.
    async fn salesforce_gate(&self, salesforce: &Batcher) -> Option<Outcome> {
        let (wait, reason) = salesforce.client().wait_before_writing().await?;
        tracing::debug!(wait_ms = wait.as_millis() as u64, reason = %reason, "Salesforce writes wait");
        self.metrics
            .inc("relay_rate_limited_total", &[("host", "salesforce")], 1);
        Some(Outcome::RateLimited {
            limit: "salesforce".into(),
            wait,
        })
    }

    /// A Salesforce answer as the job's outcome (and the ledger's attempt).
    async fn salesforce_outcome(
        &self,
        job: &Leased,
        result: WriteResult,
        started: Instant,
        started_at_ms: i64,
        call: &mut Option<CallRecord>,
    ) -> Outcome {
        let attempted = !matches!(result.outcome, WriteOutcome::Limited { .. });
        if attempted {
            *call = Some(CallRecord {
                started_at_ms,
                duration_ms: started.elapsed().as_millis() as i64,
                status: result.status,
                error_class: match (&result.outcome, result.status) {
                    (WriteOutcome::SignInRefused { .. }, _) => Some("sign_in".into()),
                    (_, None) => Some("transport".into()),
                    _ => None,
                },
                response: result.excerpt.clone(),
                subject: None,
            });
            self.metrics.observe(
                "relay_salesforce_latency_seconds",
                &[("route", job.route.as_str())],
                started.elapsed().as_secs_f64(),
            );
        }
        if let Some(status) = result.status {
            tracing::Span::current().record("centercode.status", status);
        }
        match result.outcome {
            WriteOutcome::Done { status } => Outcome::Delivered { status },
            WriteOutcome::Rejected {
                status,
                code,
                message,
            } => Outcome::Parked {
                reason: format!("Salesforce refused the record ({code}: {message}); fix the data, the mapping or the org's setup, then replay"),
                status: Some(status),
            },
            WriteOutcome::Transient { status, reason } => {
                self.retry(job, status, reason, None).await
            }
            WriteOutcome::Limited { wait, .. } => Outcome::RateLimited {
                limit: "salesforce".into(),
                wait,
            },
            WriteOutcome::SignInRefused { reason } => Outcome::Parked {
                reason,
                status: None,
            },
        }
    }

    /// Queue the write of `outcome` onto the job's Salesforce record, when its route asks
    /// for it. Stored before the job is acked (a crash between the two writes the status
    /// twice, never zero times); its own failure never changes the job's outcome.
    async fn enqueue_writeback(&self, job: &Leased, outcome: &Outcome) {
        let Some(route) = self.settings.route(&job.route) else {
            return;
        };
        let (Some(wb), Some(record_id)) = (&route.status_writeback, job.record_id.as_ref()) else {
            return;
        };
        let Some(new_job) = crate::writeback::job_for(route, wb, job, record_id, outcome) else {
            return;
        };
        // A storage hiccup should not cost the status: two more tries before giving up (the
        // delivery's outcome is settled either way; calling Centercode again to get another
        // chance at the write-back would be worse: a removal's redo reads "user not found").
        let mut tries = [100u64, 400].into_iter();
        loop {
            match self.queue.enqueue(vec![new_job.clone()]).await {
                Ok(_) => return,
                Err(e) => match tries.next() {
                    Some(ms) => {
                        tracing::warn!(error = %e, "could not queue the status write-back to Salesforce; trying again");
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    None => {
                        tracing::error!(error = %e, job_id = %job.id, "could not queue the status write-back to Salesforce; the record will not show this outcome (the delivery's own outcome stands, in the ledger)");
                        return;
                    }
                },
            }
        }
    }

    async fn retry(
        &self,
        job: &Leased,
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    ) -> Outcome {
        let age = Duration::from_millis((now_ms() - job.first_seen_ms).max(0) as u64);
        match self.policy.next_delay(job.attempts, age, retry_after) {
            Some(delay) => {
                let at = now_ms() + delay.as_millis() as i64;
                let not_before = retry_after
                    .map(|d| now_ms() + d.min(self.policy.retry_after_max).as_millis() as i64);
                // Not retried here: this runs under the record's hold and the call slot; a
                // retry that cannot be scheduled comes back when its lease runs out.
                if let Err(e) = self
                    .queue
                    .retry_not_before(job, at, not_before, &error, status)
                    .await
                {
                    tracing::error!(error = %e, "could not schedule the retry; the lease will expire instead");
                }
                tracing::info!(delay_ms = delay.as_millis() as u64, last_error = %error, "delivery will be retried");
                Outcome::Retried { status }
            }
            None => Outcome::Parked {
                reason: format!("gave up after {} attempts: {error}", job.attempts),
                status,
            },
        }
    }
}
