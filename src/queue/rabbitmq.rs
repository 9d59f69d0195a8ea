//! The RabbitMQ backend: durable topology (work, per-tier TTL retry queues, parked), publisher
//! confirms, manual acks and reconnection. A delivery is acked only after its next home (a
//! retry tier or the parked queue) has confirmed the copy; nothing is ever nack-requeued in a loop.

use super::dedupe::{Claim, Dedupe, KeyedJob};
use super::{
    now_ms, EnqueueOutcome, Job, Leased, NewJob, ParkedFilter, ParkedJob, QueueError, QueueStats,
};
use crate::settings::{RabbitQueueType, Settings};
use futures_util::StreamExt;
use lapin::acker::Acker;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Longest wait for the TCP + AMQP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an empty `lease` waits for a delivery that may be on its way.
const LEASE_WAIT: Duration = Duration::from_millis(150);
/// How often the supervisor checks the connection and expired leases.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Quorum queues return a message at most this many times (nack/requeue, lost consumers)
/// before dead-lettering it to the parked queue: a poison message cannot loop for ever.
const DELIVERY_LIMIT: i64 = 1000;
/// Jobs of a route whose circuit is open wait in the retry tier nearest to this, then are
/// looked at again: a slow cycle instead of a requeue loop. (Paused routes' jobs wait in
/// `{prefix}.held` instead, until resumed.)
const HOLD_DELAY: Duration = Duration::from_secs(30);
/// Longest error text kept in a header.
const MAX_ERROR_LEN: usize = 1024;
/// Largest AMQP frame asked of the broker unless the URL sets `frame_max`. lapin keeps a send
/// and a receive buffer of 32 frames each, zero-filled: at RabbitMQ's default of 128 KiB that
/// is 8 MiB resident in an idle relay. Jobs are a few KiB; a bigger one spans several frames.
const FRAME_MAX: u32 = 16 * 1024;
/// Publisher channels per connection, at most. A channel is one lock in lapin and one
/// process in the broker: with one channel, every HTTP thread's publishes queued behind one
/// another there (strace showed the threads spinning on lapin's channel lock).
const MAX_PUBLISHER_CHANNELS: usize = 4;

thread_local! {
    /// Which publisher channel this thread uses: threads are spread over them in turn.
    static PUBLISHER_SLOT: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

/// The connection URL, with [`FRAME_MAX`] and [`CONNECT_TIMEOUT`] unless it sets its own
/// `frame_max` or `connection_timeout`. The timeout matters: lapin connects in a blocking
/// thread, which a timeout around the future would leave hanging on an unreachable broker.
fn amqp_uri(url: &str) -> Result<lapin::uri::AMQPUri, QueueError> {
    // The parser's message may quote the URL, and with it the password: not repeated here.
    let mut uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|_: String| QueueError::Broker("queue.url is not a valid AMQP URL".into()))?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    uri.query
        .connection_timeout
        .get_or_insert(CONNECT_TIMEOUT.as_millis() as u64);
    Ok(uri)
}

/// Delivery limit of the parked queue: never reached by listings (see [`declare_parked`]).
const PARKED_DELIVERY_LIMIT: i64 = 1_000_000_000;
/// Retries remembered per tier for their age (see [`LocalAges`]); beyond it the earliest due
/// are forgotten.
const MAX_TRACKED_RETRIES: usize = 100_000;
/// Header: when the message is (or will be) ready in the work queue, ms since the epoch.
const READY_AT: &str = "x-ready-at";

/// What the backend needs from the settings.
#[derive(Clone)]
pub struct RabbitConfig {
    pub url: SecretString,
    pub prefix: String,
    pub queue_type: RabbitQueueType,
    /// One retry queue per entry, in the order of `worker.retry_schedule_secs`.
    pub retry_tiers: Vec<Duration>,
    pub prefetch: u16,
    pub confirm_timeout: Duration,
    /// A leased delivery not settled within this goes back to the queue (as on SQLite).
    pub lease: Duration,
    pub dedupe_ttl: Duration,
    pub redis_url: Option<SecretString>,
}

impl RabbitConfig {
    pub fn from_settings(settings: &Settings) -> Self {
        let q = &settings.queue;
        Self {
            url: q.url.clone(),
            prefix: q.prefix.clone(),
            queue_type: q.queue_type,
            retry_tiers: settings.worker.retry_delays(),
            prefetch: settings.prefetch(),
            confirm_timeout: Duration::from_millis(q.confirm_timeout_ms),
            lease: Duration::from_secs(q.lease_secs),
            dedupe_ttl: Duration::from_secs(q.dedupe_ttl_secs),
            redis_url: q.redis_url.clone(),
        }
    }
}

/// Names of the queues of one prefix.
#[derive(Debug, Clone)]
pub struct QueueNames {
    pub work: String,
    pub retry: Vec<String>,
    pub parked: String,
    /// Jobs of paused routes, set aside (no TTL, no consumer) until the route is resumed.
    pub held: String,
}

impl QueueNames {
    pub fn new(prefix: &str, tiers: usize) -> Self {
        Self {
            work: format!("{prefix}.work"),
            retry: (0..tiers).map(|i| format!("{prefix}.retry.{i}")).collect(),
            parked: format!("{prefix}.parked"),
            held: format!("{prefix}.held"),
        }
    }

    /// Every queue name, work first.
    pub fn all(&self) -> Vec<&str> {
        std::iter::once(self.work.as_str())
            .chain(self.retry.iter().map(String::as_str))
            .chain([self.parked.as_str(), self.held.as_str()])
            .collect()
    }
}

/// Declare the whole topology. Idempotent: re-declaring a queue with the same arguments is a
/// no-op; an existing queue with other arguments fails with PRECONDITION_FAILED (406).
/// <https://www.rabbitmq.com/docs/queues#property-equivalence>
pub async fn declare_topology(
    connection: &Connection,
    channel: &Channel,
    names: &QueueNames,
    queue_type: RabbitQueueType,
    retry_tiers: &[Duration],
) -> Result<(), lapin::Error> {
    // durable: the queue definition survives a broker restart (messages are persistent too).
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    // work: whatever the broker dead-letters (delivery limit, reject without requeue) is
    // routed to parked, never into the void.
    let mut work = base_args(queue_type);
    dead_letter_to(&mut work, queue_type, &names.parked);
    if queue_type == RabbitQueueType::Quorum {
        work.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
    }
    channel.queue_declare(&names.work, durable, work).await?;
    // retry tiers: nobody consumes them; a message waits out the queue's TTL, then is
    // dead-lettered back to work (no delayed-message plugin needed).
    // <https://www.rabbitmq.com/docs/ttl#per-queue-message-ttl>
    for (name, ttl) in names.retry.iter().zip(retry_tiers) {
        let mut args = base_args(queue_type);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(ttl.as_millis() as i64),
        );
        dead_letter_to(&mut args, queue_type, &names.work);
        channel.queue_declare(name, durable, args).await?;
    }
    declare_parked(connection, names, queue_type).await?;
    // held: read back (browsed) when a route is resumed, like parked, so the same delivery
    // limit; a fresh queue, so no older declaration to reconcile.
    let mut held = base_args(queue_type);
    if queue_type == RabbitQueueType::Quorum {
        held.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(PARKED_DELIVERY_LIMIT),
        );
    }
    channel.queue_declare(&names.held, durable, held).await?;
    Ok(())
}

/// Declare the parked queue. Listings, replays and purges read it and put back the jobs they
/// do not take; RabbitMQ 4.0-4.2 count each such read as a delivery and by default drop a
/// quorum queue message after 20. A delivery limit no listing reaches keeps parked jobs. A
/// parked queue declared by an older relay without it is kept as it is, with a warning:
/// redeclaring it would need deleting it, and a policy can add the limit instead.
async fn declare_parked(
    connection: &Connection,
    names: &QueueNames,
    queue_type: RabbitQueueType,
) -> Result<(), lapin::Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut args = base_args(queue_type);
    if queue_type == RabbitQueueType::Quorum {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(PARKED_DELIVERY_LIMIT),
        );
    }
    // Its own channel: a refused declare (406) closes the channel it was made on.
    let channel = connection.create_channel().await?;
    let declared = channel.queue_declare(&names.parked, durable, args).await;
    let result = match declared {
        Ok(_) => Ok(()),
        Err(lapin::Error::ProtocolError(e)) if e.get_id() == 406 => {
            tracing::warn!(
                queue = %names.parked,
                "the parked queue was declared without a delivery limit (by an older relay); on RabbitMQ 4.0-4.2 add one by policy (deploy/rabbitmq/README.md), or parked jobs may be dropped after about 20 listings"
            );
            let check = connection.create_channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let found = check
                .queue_declare(&names.parked, passive, FieldTable::default())
                .await
                .map(|_| ());
            let _ = check.close(200, "declared").await;
            found
        }
        Err(e) => Err(e),
    };
    let _ = channel.close(200, "declared").await;
    result
}

fn base_args(queue_type: RabbitQueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == RabbitQueueType::Quorum {
        // Raft-replicated, fsynced queues. <https://www.rabbitmq.com/docs/quorum-queues>
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        // When a length limit is hit, refuse new publishes (the publisher gets a nack, the
        // gateway a 503) instead of dropping the oldest message; at-least-once
        // dead-lettering requires it.
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    args
}

fn dead_letter_to(args: &mut FieldTable, queue_type: RabbitQueueType, queue: &str) {
    // "" is the default exchange, which routes by queue name.
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(queue.into()),
    );
    if queue_type == RabbitQueueType::Quorum {
        // Keep a dead-lettered message in the source queue until the target confirmed it
        // (RabbitMQ ≥ 3.10). <https://www.rabbitmq.com/blog/2022/03/29/at-least-once-dead-lettering>
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
    }
}

fn broker(e: lapin::Error) -> QueueError {
    QueueError::Broker(e.to_string())
}

/// One live connection with its channels.
struct Session {
    generation: u64,
    connection: Connection,
    /// In confirm mode; each thread publishes on one of them (see [`PUBLISHER_SLOT`]).
    publishers: Vec<Channel>,
    consumer: Mutex<Option<Channel>>,
    consumer_started: AtomicBool,
    consumer_alive: Arc<AtomicBool>,
}

impl Session {
    #[tracing::instrument(skip_all, fields(generation = generation))]
    async fn open(
        config: &RabbitConfig,
        names: &QueueNames,
        generation: u64,
        wake: &Arc<Notify>,
    ) -> Result<Arc<Session>, QueueError> {
        // lapin's own executor and reactor would add threads, and a thread hop for every
        // frame; the relay's tokio runtime runs its futures and watches its socket instead.
        let props = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio)
            .with_connection_name(format!("sf-centercode-relay {}", config.prefix).into());
        let uri = amqp_uri(config.url.expose_secret())?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props))
            .await
            .map_err(|_| QueueError::Broker("connecting to RabbitMQ timed out".into()))?
            .map_err(|e| QueueError::Broker(format!("connecting to RabbitMQ: {e}")))?;
        let w = wake.clone();
        connection.on_error(move |e| {
            tracing::warn!(error = %e, "RabbitMQ connection failed");
            w.notify_one();
        });
        let result = async {
            let count = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_PUBLISHER_CHANNELS);
            let mut publishers = Vec::with_capacity(count);
            for _ in 0..count {
                let publisher = connection.create_channel().await.map_err(broker)?;
                let w = wake.clone();
                publisher.on_error(move |e| {
                    tracing::warn!(error = %e, "RabbitMQ publisher channel closed");
                    w.notify_one();
                });
                // confirm.select: the broker acks every publish once the message is safely
                // enqueued (for quorum queues: written by a majority), or nacks it.
                // <https://www.rabbitmq.com/docs/confirms#publisher-confirms>
                publisher
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(broker)?;
                publishers.push(publisher);
            }
            declare_topology(
                &connection,
                &publishers[0],
                names,
                config.queue_type,
                &config.retry_tiers,
            )
                .await
                .map_err(|e| {
                    QueueError::Broker(format!(
                        "declaring the queues {}.*: {e} (a queue declared before with other arguments, \
                         e.g. another queue_type or retry schedule, must be deleted first or another \
                         queue.prefix used)",
                        config.prefix
                    ))
                })?;
            Ok::<_, QueueError>(publishers)
        }
        .await;
        match result {
            Ok(publishers) => Ok(Arc::new(Session {
                generation,
                connection,
                publishers,
                consumer: Mutex::new(None),
                consumer_started: AtomicBool::new(false),
                consumer_alive: Arc::new(AtomicBool::new(false)),
            })),
            Err(e) => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    connection.close(200, "topology failed"),
                )
                .await;
                Err(e)
            }
        }
    }

    fn healthy(&self) -> bool {
        let consumer_ok = !self.consumer_started.load(Ordering::SeqCst)
            || (self.consumer_alive.load(Ordering::SeqCst)
                && self
                    .consumer
                    .lock()
                    .expect("consumer lock")
                    .as_ref()
                    .is_some_and(|c| c.status().connected()));
        self.connection.status().connected()
            && self.publishers.iter().all(|p| p.status().connected())
            && consumer_ok
    }

    /// This thread's publisher channel.
    fn publisher(&self) -> &Channel {
        &self.publishers[PUBLISHER_SLOT.with(|slot| *slot) % self.publishers.len()]
    }

    /// Close channels and connection; unacked deliveries go back to their queue.
    async fn shut(&self) {
        let consumer = self.consumer.lock().expect("consumer lock").take();
        let wait = Duration::from_secs(1);
        if let Some(channel) = consumer {
            let _ = tokio::time::timeout(wait, channel.close(200, "relay stopping")).await;
        }
        for publisher in &self.publishers {
            let _ = tokio::time::timeout(wait, publisher.close(200, "relay stopping")).await;
        }
        let _ = tokio::time::timeout(wait, self.connection.close(200, "relay stopping")).await;
    }
}

/// A delivery handed to a worker and not settled yet.
#[derive(Clone)]
struct Held {
    acker: Acker,
    generation: u64,
    deadline: Instant,
    /// Headers of the delivered message, carried into its retry or parked copy.
    meta: Meta,
}

struct Inner {
    config: RabbitConfig,
    names: QueueNames,
    dedupe: Dedupe,
    /// The PostgreSQL ledger, when `ledger.url` is set (attached after connecting).
    ledger: std::sync::OnceLock<crate::ledger::postgres::PgLedger>,
    session: RwLock<Option<Arc<Session>>>,
    /// Deliveries received but not leased yet (at most `prefetch`), with their generation.
    buffer: Mutex<VecDeque<(u64, Delivery)>>,
    /// Leased deliveries by lease token.
    held: Mutex<HashMap<String, Held>>,
    /// Wakes the worker (`notified`) when deliveries arrive.
    work_ready: Notify,
    /// Wakes a `lease` waiting for its first delivery.
    arrived: Notify,
    /// Wakes the supervisor: an error callback fired or a consumer ended.
    wake: Arc<Notify>,
    want_consumer: AtomicBool,
    consumer_start: tokio::sync::Mutex<()>,
    stop: CancellationToken,
    closed: AtomicBool,
    /// What this process has seen of the work queue's head, to bound its age.
    head: Mutex<HeadClock>,
    /// What this process put in the retry tiers and the parked queue, for their ages.
    ages: Mutex<LocalAges>,
    /// Parked and held messages this process has taken out to read (listing, replay, purge)
    /// and not yet seen back in their queue: added to their depths, so reading a queue
    /// never makes it look smaller (nor resets its age) to monitoring.
    parked_in_hand: Arc<AtomicU64>,
    held_in_hand: Arc<AtomicU64>,
    /// Taking a message out and counting it in hand (or seeing it back in its queue and
    /// counting it out) happen under this gate; `stats` reads depths under it, so it never
    /// sees a message in neither place, or in both.
    browse_gate: Arc<tokio::sync::RwLock<()>>,
}

/// Ages of the retrying and parked jobs from what this process did, not from the queues:
/// reading a quorum queue's head returns it with its delivery count raised, and RabbitMQ
/// 4.0-4.2 drop a message after 20 deliveries by default. With several processes, the
/// oldest is the maximum across them (Prometheus `max`).
#[derive(Debug, Default)]
struct LocalAges {
    /// Per retry tier, in publish order (= due order, one TTL per tier): when each job is
    /// due back in work, and when Salesforce first sent it.
    retrying: Vec<VecDeque<(i64, i64)>>,
    /// When the oldest parked job was parked, as far as this process knows: the earlier of
    /// the first reading that found the parked queue non-empty and what it parked since.
    parked_since_ms: Option<i64>,
}

impl LocalAges {
    fn retried(&mut self, tier: usize, due_ms: i64, first_seen_ms: i64) {
        if self.retrying.len() <= tier {
            self.retrying.resize_with(tier + 1, VecDeque::new);
        }
        let queue = &mut self.retrying[tier];
        if queue.len() >= MAX_TRACKED_RETRIES {
            queue.pop_front();
        }
        queue.push_back((due_ms, first_seen_ms));
    }

    fn parked(&mut self, parked_at_ms: i64) {
        self.parked_since_ms = Some(
            self.parked_since_ms
                .map_or(parked_at_ms, |t| t.min(parked_at_ms)),
        );
    }

    /// The oldest first-seen time among retries not yet due, and the parked estimate, given
    /// the broker's counts read at `now_ms`.
    fn observe(&mut self, retrying: u64, parked: u64, now_ms: i64) -> (Option<i64>, Option<i64>) {
        for queue in &mut self.retrying {
            while queue.front().is_some_and(|(due, _)| *due <= now_ms) {
                queue.pop_front();
            }
            if retrying == 0 {
                queue.clear();
            }
        }
        let oldest_retrying = self
            .retrying
            .iter()
            .flatten()
            .map(|(_, first)| *first)
            .min();
        if parked == 0 {
            self.parked_since_ms = None;
        } else {
            self.parked(now_ms);
        }
        (oldest_retrying, self.parked_since_ms)
    }
}

/// Bounds on the age of the work queue's oldest ready message. RabbitMQ cannot report it
/// for quorum queues (rabbitmq-server#6813), and reading the head would count as a
/// delivery attempt (x-delivery-count), so it is derived from what this process sees.
/// The queue is FIFO, so its head became ready after (a) the last message this process
/// was delivered and (b) the last time this process saw the queue empty: the later of
/// the two is an upper bound on the head's age, tight while messages flow or a backlog
/// builds from empty. Returns to the queue (a lost consumer) can break the bound briefly.
#[derive(Debug, Default)]
struct HeadClock {
    /// When a stats read last found no ready message.
    last_empty_ms: Option<i64>,
    /// The first stats read that found ready messages since then.
    nonempty_since_ms: Option<i64>,
    /// When the newest message delivered to this process had become ready.
    last_delivered_ready_ms: Option<i64>,
}

impl HeadClock {
    fn delivered(&mut self, ready_at_ms: i64) {
        self.last_delivered_ready_ms = self.last_delivered_ready_ms.max(Some(ready_at_ms));
    }

    /// The estimated time the head became ready, given a stats read at `now_ms`.
    /// `consumers`: consumers of the work queue (any process); `consuming_here`: whether
    /// this process is one of them.
    fn observe(
        &mut self,
        ready: u64,
        consumers: u32,
        consuming_here: bool,
        now_ms: i64,
    ) -> Option<i64> {
        if ready == 0 {
            self.last_empty_ms = Some(now_ms);
            self.nonempty_since_ms = None;
            return None;
        }
        let first_seen = *self.nonempty_since_ms.get_or_insert(now_ms);
        if consumers > 0 && !consuming_here {
            // Others consume: only they see where the head is. A gateway-only process
            // would report a backlog that flows as ever older.
            return None;
        }
        // Neither bound known (the backlog predates this process): the head is at least
        // as old as the first read that saw it.
        Some(
            self.last_empty_ms
                .max(self.last_delivered_ready_ms)
                .unwrap_or(first_seen),
        )
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Inner {
    fn current(&self) -> Result<Arc<Session>, QueueError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(QueueError::Closed);
        }
        self.session
            .read()
            .expect("session lock")
            .clone()
            .ok_or_else(|| QueueError::Broker("not connected to RabbitMQ (reconnecting)".into()))
    }

    /// Drop what belonged to a lost connection: the broker requeues those deliveries itself.
    fn forget_session(&self, generation: u64) {
        {
            let mut slot = self.session.write().expect("session lock");
            if slot.as_ref().is_some_and(|s| s.generation == generation) {
                *slot = None;
            }
        }
        let buffered = {
            let mut buffer = self.buffer.lock().expect("buffer lock");
            let before = buffer.len();
            buffer.retain(|(g, _)| *g != generation);
            before - buffer.len()
        };
        let held = {
            let mut held = self.held.lock().expect("held lock");
            let before = held.len();
            held.retain(|_, h| h.generation != generation);
            before - held.len()
        };
        if buffered + held > 0 {
            tracing::warn!(
                buffered,
                held,
                "deliveries of the lost connection go back to the queue; their late acks are ignored"
            );
        }
    }

    /// Leases past their deadline go back to the queue, as an expired SQLite lease does.
    async fn requeue_expired_leases(&self) {
        let now = Instant::now();
        let expired: Vec<(String, Held)> = {
            let mut held = self.held.lock().expect("held lock");
            let tokens: Vec<String> = held
                .iter()
                .filter(|(_, h)| h.deadline <= now)
                .map(|(t, _)| t.clone())
                .collect();
            tokens
                .into_iter()
                .filter_map(|t| held.remove(&t).map(|h| (t, h)))
                .collect()
        };
        for (token, h) in expired {
            tracing::warn!(lease_token = %token, "lease expired before the job was settled; it goes back to the queue");
            // One requeue per expired lease (bounded by x-delivery-limit), not a loop.
            let _ = h
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await;
        }
    }
}

/// Handle to the RabbitMQ backend; cheap to clone.
#[derive(Clone)]
pub struct RabbitQueue {
    inner: Arc<Inner>,
}

impl RabbitQueue {
    /// Connect, declare the topology and start the reconnecting supervisor. Fails when the
    /// broker (or Redis, when configured) cannot be reached now; later losses are retried.
    pub async fn connect(config: RabbitConfig) -> Result<Self, QueueError> {
        // lapin and reqwest both use rustls; pick its provider once so neither panics on
        // "no process-level CryptoProvider" (an Err only means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let names = QueueNames::new(&config.prefix, config.retry_tiers.len());
        // A claim outlives the slowest publish, so a live claim is never taken over.
        let pending_ttl = (config.confirm_timeout * 3).max(Duration::from_secs(30));
        let dedupe = match &config.redis_url {
            Some(url) => Dedupe::redis(
                url.expose_secret(),
                &config.prefix,
                config.dedupe_ttl,
                pending_ttl,
                config.confirm_timeout,
            )
            .await
            .map_err(|e| QueueError::Dedupe(e.0))?,
            // Only correct for one gateway process: see `Dedupe::Local`.
            None => Dedupe::local(config.dedupe_ttl, pending_ttl),
        };
        let wake = Arc::new(Notify::new());
        let session = Session::open(&config, &names, 1, &wake).await?;
        let inner = Arc::new(Inner {
            config,
            names,
            dedupe,
            ledger: std::sync::OnceLock::new(),
            session: RwLock::new(Some(session.clone())),
            buffer: Mutex::default(),
            held: Mutex::default(),
            work_ready: Notify::new(),
            arrived: Notify::new(),
            wake,
            want_consumer: AtomicBool::new(false),
            consumer_start: tokio::sync::Mutex::new(()),
            stop: CancellationToken::new(),
            closed: AtomicBool::new(false),
            head: Mutex::default(),
            ages: Mutex::default(),
            parked_in_hand: Arc::default(),
            held_in_hand: Arc::default(),
            browse_gate: Arc::default(),
        });
        let span = tracing::info_span!("rabbitmq_supervisor", queue = %inner.names.work);
        tokio::spawn(
            supervise(Arc::downgrade(&inner), inner.stop.clone(), session).instrument(span),
        );
        Ok(Self { inner })
    }

    pub fn names(&self) -> &QueueNames {
        &self.inner.names
    }

    /// Publish all jobs of one request and wait for every broker confirm; deduplicate on
    /// their keys first. Any failure is an error (503): Salesforce sends the batch again.
    #[tracing::instrument(skip_all, fields(jobs = jobs.len(), queue = %self.inner.names.work, messaging.operation = "publish"))]
    pub async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>, QueueError> {
        // Fail fast while disconnected, before touching the dedupe store.
        let session = self.inner.current()?;
        let n = jobs.len();
        let mut outcomes: Vec<Option<EnqueueOutcome>> = vec![None; n];
        // A key repeated inside the request refers to its first job.
        let mut first_with_key: HashMap<&str, usize> = HashMap::new();
        let mut same_as: Vec<Option<usize>> = vec![None; n];
        let mut keyed: Vec<(usize, KeyedJob)> = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            if let Some(key) = job.dedupe_key.as_deref() {
                match first_with_key.get(key) {
                    Some(&first) => same_as[i] = Some(first),
                    None => {
                        first_with_key.insert(key, i);
                        keyed.push((
                            i,
                            KeyedJob {
                                key: key.to_owned(),
                                job_id: job.id.clone(),
                                body_hash: job.body_hash.clone(),
                            },
                        ));
                    }
                }
            }
        }
        let dedupe = &self.inner.dedupe;
        let keyed_jobs: Vec<KeyedJob> = keyed.iter().map(|(_, k)| k.clone()).collect();
        let claims = dedupe
            .claim(&keyed_jobs)
            .await
            .map_err(|e| QueueError::Dedupe(e.0))?;
        // What the first job of each key turned out to be: (job id, body hash).
        let mut known: HashMap<usize, (String, Option<String>)> = HashMap::new();
        let mut claimed: Vec<(usize, KeyedJob)> = Vec::new();
        let mut pending = false;
        for ((i, kj), claim) in keyed.into_iter().zip(claims) {
            match claim {
                Claim::Claimed => claimed.push((i, kj)),
                Claim::Stored { job_id, body_hash } => {
                    outcomes[i] = Some(match (&body_hash, &jobs[i].body_hash) {
                        (Some(a), Some(b)) if a != b => EnqueueOutcome::Conflict {
                            job_id: job_id.clone(),
                        },
                        _ => EnqueueOutcome::Duplicate {
                            job_id: job_id.clone(),
                        },
                    });
                    known.insert(i, (job_id, body_hash));
                }
                // Another request is storing it and may still fail: answering "duplicate"
                // now could acknowledge a message that never gets stored.
                Claim::Pending { .. } => pending = true,
            }
        }
        if pending {
            let mine: Vec<KeyedJob> = claimed.into_iter().map(|(_, k)| k).collect();
            if let Err(e) = dedupe.abandon(&mine).await {
                tracing::warn!(error = %e, "could not release dedupe claims; they expire by themselves");
            }
            return Err(QueueError::InProgress);
        }
        let to_publish: Vec<usize> = (0..n)
            .filter(|&i| outcomes[i].is_none() && same_as[i].is_none())
            .collect();
        let results = futures_util::future::join_all(
            to_publish
                .iter()
                .map(|&i| self.publish_new(&session, &jobs[i])),
        )
        .await;
        let mut first_error = None;
        for (&i, result) in to_publish.iter().zip(results) {
            match result {
                Ok(()) => outcomes[i] = Some(EnqueueOutcome::Stored),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let (confirmed, failed): (Vec<_>, Vec<_>) = claimed
            .into_iter()
            .partition(|(i, _)| outcomes[*i] == Some(EnqueueOutcome::Stored));
        let failed: Vec<KeyedJob> = failed.into_iter().map(|(_, k)| k).collect();
        if let Err(e) = dedupe.abandon(&failed).await {
            tracing::warn!(error = %e, "could not release dedupe claims; they expire by themselves");
        }
        let confirmed: Vec<KeyedJob> = confirmed.into_iter().map(|(_, k)| k).collect();
        if let Err(e) = dedupe.confirm(&confirmed).await {
            // The jobs are stored; only their keys stay "pending" until the claim expires,
            // so a redelivery meanwhile gets 503 and one after it may be stored twice.
            tracing::warn!(error = %e, "could not record dedupe keys of stored jobs");
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        for i in 0..n {
            let Some(first) = same_as[i] else { continue };
            let (job_id, hash) = known
                .get(&first)
                .cloned()
                .unwrap_or_else(|| (jobs[first].id.clone(), jobs[first].body_hash.clone()));
            outcomes[i] = Some(match (&hash, &jobs[i].body_hash) {
                (Some(a), Some(b)) if a != b => EnqueueOutcome::Conflict { job_id },
                _ => EnqueueOutcome::Duplicate { job_id },
            });
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(EnqueueOutcome::Stored))
            .collect())
    }

    async fn publish_new(&self, session: &Session, job: &NewJob) -> Result<(), QueueError> {
        let body = serde_json::to_vec(&job.job).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        let meta = Meta {
            route: job.route.clone(),
            action: job.action.as_str().to_owned(),
            first_seen_ms: now_ms(),
            org_id: job.org_id.clone(),
            notification_id: job.notification_id.clone(),
            record_id: job.record_id.clone(),
            received_at_ms: (job.received_at_ms > 0).then_some(job.received_at_ms),
            ..Meta::default()
        };
        self.publish(session, &self.inner.names.work, &job.id, &body, &meta)
            .await?;
        // Confirmed: the ledger learns of the job now, without the ack waiting for it.
        if let Some(ledger) = self.ledger() {
            ledger.stored(crate::ledger::JobFacts {
                job_id: job.id.clone(),
                route: job.route.clone(),
                action: job.action.as_str().to_owned(),
                org_id: job.org_id.clone(),
                notification_id: job.notification_id.clone(),
                record_id: job.record_id.clone(),
                subject_key: None,
                received_at_ms: meta.received_at_ms.unwrap_or(meta.first_seen_ms),
                stored_at_ms: meta.first_seen_ms,
            });
        }
        Ok(())
    }

    /// `x-ready-at`: when the message will be ready in the work queue: now when published
    /// there, after the tier's TTL when published to a retry tier.
    fn stamp_ready_at(&self, queue: &str, mut headers: FieldTable) -> FieldTable {
        let names = &self.inner.names;
        let wait = if queue == names.work {
            Some(Duration::ZERO)
        } else {
            names
                .retry
                .iter()
                .position(|n| n == queue)
                .and_then(|i| self.inner.config.retry_tiers.get(i).copied())
        };
        if let Some(wait) = wait {
            let at = now_ms().saturating_add(wait.as_millis() as i64);
            headers.insert(READY_AT.into(), AMQPValue::LongLongInt(at));
        }
        headers
    }

    /// Publish one persistent message to `queue` and wait for the broker's confirm.
    async fn publish(
        &self,
        session: &Session,
        queue: &str,
        job_id: &str,
        body: &[u8],
        meta: &Meta,
    ) -> Result<(), QueueError> {
        let props = BasicProperties::default()
            // The job id as AMQP message id: one grep follows a job end to end.
            .with_message_id(job_id.into())
            .with_content_type("application/json".into())
            // delivery_mode 2 = persistent: kept across broker restarts.
            .with_delivery_mode(2)
            .with_timestamp((now_ms() / 1000) as u64)
            .with_headers(self.stamp_ready_at(queue, meta.to_headers()));
        let send = async {
            // Default exchange "" routes by queue name. mandatory: a message that matches no
            // queue comes back (basic.return) instead of being dropped silently.
            let confirm = session
                .publisher()
                .basic_publish(
                    "",
                    queue,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    props,
                )
                .await?;
            confirm.await
        };
        let timeout = self.inner.config.confirm_timeout;
        match tokio::time::timeout(timeout, send).await {
            Err(_) => Err(QueueError::Broker(format!(
                "no publisher confirm from RabbitMQ within {} ms",
                timeout.as_millis()
            ))),
            Ok(Err(e)) => Err(broker(e)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(QueueError::Broker(format!(
                "RabbitMQ returned the message as unroutable ({} {}): queue {queue} is missing",
                returned.reply_code, returned.reply_text
            ))),
            Ok(Ok(Confirmation::Nack(_))) => Err(QueueError::Broker(format!(
                "RabbitMQ refused the message for {queue} (nack)"
            ))),
            Ok(Ok(Confirmation::NotRequested)) => Err(QueueError::Broker(
                "publisher confirms are not enabled on the channel".into(),
            )),
        }
    }

    /// Start consuming the work queue once (lazily: a gateway-only process never holds
    /// deliveries).
    async fn ensure_consumer(&self) -> Result<(), QueueError> {
        self.inner.want_consumer.store(true, Ordering::SeqCst);
        start_consumer(&self.inner).await
    }

    /// Up to `max` deliveries already received; waits briefly for the first one. Jobs of
    /// `paused` routes are not handed out: they wait in a retry tier (see [`HOLD_DELAY`])
    /// with their attempts untouched.
    pub async fn lease(&self, max: usize, blocked: Vec<String>) -> Result<Vec<Leased>, QueueError> {
        self.lease_holding(max, Vec::new(), blocked).await
    }

    /// Lease, setting jobs of `paused` routes aside in `{prefix}.held` until they are
    /// resumed, and jobs of `blocked` routes (open circuit) in the retry tier nearest to
    /// [`HOLD_DELAY`].
    #[tracing::instrument(skip_all, fields(max = max, queue = %self.inner.names.work, messaging.operation = "receive"))]
    pub async fn lease_holding(
        &self,
        max: usize,
        paused: Vec<String>,
        blocked: Vec<String>,
    ) -> Result<Vec<Leased>, QueueError> {
        self.ensure_consumer().await?;
        let arrived = self.inner.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        if self.inner.buffer.lock().expect("buffer lock").is_empty() {
            let _ = tokio::time::timeout(LEASE_WAIT, arrived).await;
        }
        let generation = self.inner.current()?.generation;
        let taken: Vec<Delivery> = {
            let mut buffer = self.inner.buffer.lock().expect("buffer lock");
            buffer.retain(|(g, _)| *g == generation);
            let k = max.min(buffer.len());
            buffer.drain(..k).map(|(_, d)| d).collect()
        };
        let mut leased = Vec::with_capacity(taken.len());
        let mut held_back = Vec::new();
        let mut too_early = Vec::new();
        let mut set_aside = Vec::new();
        for delivery in taken {
            match decode(&delivery, generation) {
                Ok((job, meta)) => {
                    self.inner.held.lock().expect("held lock").insert(
                        job.lease_token.clone(),
                        Held {
                            acker: delivery.acker.clone(),
                            generation,
                            deadline: Instant::now() + self.inner.config.lease,
                            meta,
                        },
                    );
                    // A little early is fine (TTLs expire on the broker's clock).
                    let not_before = meta_not_before(&self.inner, &job.lease_token)
                        .filter(|t| *t > now_ms() + NOT_BEFORE_TOLERANCE_MS);
                    if let Some(at) = not_before {
                        too_early.push((job, at));
                    } else if paused.contains(&job.route) {
                        set_aside.push(job);
                    } else if blocked.contains(&job.route) {
                        held_back.push(job);
                    } else {
                        leased.push(job);
                    }
                }
                Err(reason) => {
                    // Unreadable: reject without requeue, so the broker dead-letters it to
                    // parked (work's dead-letter route) where operators can look at it.
                    tracing::error!(reason = %reason, bytes = delivery.data.len(), "unreadable message parked by the broker");
                    if let Err(e) = delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await
                    {
                        // The channel is gone: the broker redelivers it to the next consumer.
                        tracing::warn!(error = %e, "could not reject an unreadable message");
                    }
                }
            }
        }
        let waited = futures_util::future::join_all(
            too_early.iter().map(|(job, at)| self.wait_longer(job, *at)),
        )
        .await;
        if let Some(e) = waited.into_iter().find_map(Result::err) {
            tracing::warn!(error = %e, "could not send a job round another retry tier");
        }
        // A worker took these jobs: where the ledger learns of a job then (no
        // `ledger.record_on_store`), a paused route's job enters it now, not after the resume.
        if let Some(ledger) = self.ledger().filter(|l| !l.notes_stored_jobs()) {
            for job in &set_aside {
                ledger.taken(crate::ledger::JobFacts {
                    job_id: job.id.clone(),
                    route: job.route.clone(),
                    action: job.action.clone(),
                    org_id: job.org_id.clone(),
                    notification_id: job.notification_id.clone(),
                    record_id: job.record_id.clone(),
                    subject_key: None,
                    received_at_ms: job.received_at_ms,
                    stored_at_ms: job.first_seen_ms,
                });
            }
        }
        let aside =
            futures_util::future::join_all(set_aside.iter().map(|job| self.hold(job))).await;
        if let Some(e) = aside.into_iter().find_map(Result::err) {
            tracing::warn!(error = %e, "could not set aside jobs of paused routes");
        }
        let deferred =
            futures_util::future::join_all(held_back.iter().map(|job| self.release(job))).await;
        if let Some(e) = deferred.into_iter().find_map(Result::err) {
            // Still held: the lease deadline puts them back in the queue later.
            tracing::warn!(error = %e, "could not set aside jobs of paused routes");
        }
        Ok(leased)
    }

    /// Keep the delivery ledger in `ledger` (once, right after connecting).
    pub fn attach_ledger(&self, ledger: crate::ledger::postgres::PgLedger) {
        let _ = self.inner.ledger.set(ledger);
    }

    pub fn ledger(&self) -> Option<&crate::ledger::postgres::PgLedger> {
        self.inner.ledger.get()
    }

    /// Note an outcome of a parked job (replayed, purged) in the ledger before the parked
    /// copy goes.
    async fn note(&self, job_id: &str, outcome: &str) -> Result<(), QueueError> {
        match self.ledger() {
            Some(l) => l.note(job_id, outcome).await,
            None => Ok(()),
        }
    }

    /// Read `queue` (parked or held) message by message, counting what is taken out.
    async fn browse(&self, session: &Arc<Session>, queue: &str) -> Result<Browser, QueueError> {
        let in_hand = if queue == self.inner.names.held {
            self.inner.held_in_hand.clone()
        } else {
            self.inner.parked_in_hand.clone()
        };
        Browser::open(session, queue, in_hand, self.inner.browse_gate.clone()).await
    }

    /// Restart the lease clock of a held delivery (in memory: the broker has no lease);
    /// `false` when it already expired and went back to the queue.
    pub fn extend_lease(&self, job: &Leased) -> bool {
        let mut held = self.inner.held.lock().expect("held lock");
        match held.get_mut(&job.lease_token) {
            Some(h) if h.deadline > Instant::now() => {
                h.deadline = Instant::now() + self.inner.config.lease;
                true
            }
            _ => false,
        }
    }

    fn held(&self, job: &Leased) -> Option<Held> {
        let held = self
            .inner
            .held
            .lock()
            .expect("held lock")
            .get(&job.lease_token)
            .cloned();
        if held.is_none() {
            tracing::warn!(job_id = %job.id, "job's lease expired or its connection was lost; it is (or will be) delivered again");
        }
        held
    }

    /// Remove the delivery from the held set and ack it.
    async fn settle(&self, job: &Leased) -> Result<(), QueueError> {
        let held = self
            .inner
            .held
            .lock()
            .expect("held lock")
            .remove(&job.lease_token);
        match held {
            Some(h) => h
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(broker),
            None => {
                tracing::warn!(job_id = %job.id, "ack of a job whose lease had expired or whose connection was lost; it may be delivered twice");
                Ok(())
            }
        }
    }

    /// Delivery finished: ack it.
    #[tracing::instrument(skip_all, fields(job_id = %job.id, messaging.operation = "ack"))]
    pub async fn ack(&self, job: &Leased) -> Result<(), QueueError> {
        self.settle(job).await
    }

    /// Publish a copy to the retry tier nearest to `at_ms` (confirmed), then ack the original.
    pub async fn retry(
        &self,
        job: &Leased,
        at_ms: i64,
        error: &str,
        status: Option<u16>,
    ) -> Result<(), QueueError> {
        self.retry_not_before(job, at_ms, None, error, status).await
    }

    /// As [`RabbitQueue::retry`], never earlier than `not_before_ms` (a `Retry-After`): the
    /// tier is the smallest at least that long, and a wait longer than the longest tier is
    /// chained through tiers instead of being cut short.
    #[tracing::instrument(skip_all, fields(job_id = %job.id, attempt = job.attempts, queue))]
    pub async fn retry_not_before(
        &self,
        job: &Leased,
        at_ms: i64,
        not_before_ms: Option<i64>,
        error: &str,
        status: Option<u16>,
    ) -> Result<(), QueueError> {
        let Some(held) = self.held(job) else {
            return Ok(());
        };
        let session = self.inner.current()?;
        let now = now_ms();
        let delay = Duration::from_millis((at_ms - now).max(0) as u64);
        let hard = Duration::from_millis(not_before_ms.map_or(0, |t| (t - now).max(0)) as u64);
        let tiers = &self.inner.config.retry_tiers;
        let tier = retry_tier(tiers, delay, hard).ok_or_else(|| {
            QueueError::Broker("no retry queue: worker.retry_schedule_secs is empty".into())
        })?;
        let queue = &self.inner.names.retry[tier];
        tracing::Span::current().record("queue", queue.as_str());
        let mut meta = held.meta.with_job(job);
        meta.last_error = Some(truncate(error));
        meta.last_status = status;
        meta.not_before_ms = if tiers[tier] < hard {
            not_before_ms
        } else {
            None
        };
        let body = serde_json::to_vec(&job.job).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        self.publish(&session, queue, &job.id, &body, &meta).await?;
        self.note_retry(tier, job);
        self.settle(job).await
    }

    /// A job back in work before its `not_before`: round another tier, no attempt spent.
    async fn wait_longer(&self, job: &Leased, not_before_ms: i64) -> Result<(), QueueError> {
        let Some(held) = self.held(job) else {
            return Ok(());
        };
        let session = self.inner.current()?;
        let left = Duration::from_millis((not_before_ms - now_ms()).max(0) as u64);
        let tiers = &self.inner.config.retry_tiers;
        let tier = retry_tier(tiers, left, left).ok_or_else(|| {
            QueueError::Broker("no retry queue: worker.retry_schedule_secs is empty".into())
        })?;
        let mut meta = held.meta.with_job(job);
        meta.attempts = job.attempts.saturating_sub(1);
        meta.not_before_ms = (tiers[tier] < left).then_some(not_before_ms);
        let body = serde_json::to_vec(&job.job).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        self.publish(
            &session,
            &self.inner.names.retry[tier],
            &job.id,
            &body,
            &meta,
        )
        .await?;
        self.note_retry(tier, job);
        self.settle(job).await
    }

    /// Give a job back for at least `delay`, attempt not spent: a copy waits in the shortest
    /// retry tier that long (chained when longer than every tier), then the original is acked.
    pub async fn defer(&self, job: &Leased, delay: Duration) -> Result<(), QueueError> {
        self.wait_longer(job, now_ms().saturating_add(delay.as_millis() as i64))
            .await
    }

    /// Remember a job set in retry tier `tier` until it is due back in work, for its age.
    fn note_retry(&self, tier: usize, job: &Leased) {
        let wait = self
            .inner
            .config
            .retry_tiers
            .get(tier)
            .copied()
            .unwrap_or_default();
        let due = now_ms().saturating_add(wait.as_millis() as i64);
        self.inner
            .ages
            .lock()
            .expect("ages lock")
            .retried(tier, due, job.first_seen_ms);
    }

    /// Give the job back without spending the attempt (route paused, circuit open): a copy
    /// waits in the retry tier nearest to [`HOLD_DELAY`] (confirmed), then the original is
    /// acked. Never a requeue, which would hand the job straight back in a loop. When the
    /// copy cannot be published the job stays held until its lease expires.
    #[tracing::instrument(skip_all, fields(job_id = %job.id, queue))]
    pub async fn release(&self, job: &Leased) -> Result<(), QueueError> {
        let Some(held) = self.held(job) else {
            return Ok(());
        };
        let session = self.inner.current()?;
        let tier = retry_tier(&self.inner.config.retry_tiers, HOLD_DELAY, Duration::ZERO)
            .ok_or_else(|| {
                QueueError::Broker(
                    "no retry queue to set the job aside in: worker.retry_schedule_secs is empty"
                        .into(),
                )
            })?;
        let queue = &self.inner.names.retry[tier];
        tracing::Span::current().record("queue", queue.as_str());
        let mut meta = held.meta.with_job(job);
        meta.attempts = job.attempts.saturating_sub(1);
        let body = serde_json::to_vec(&job.job).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        self.publish(&session, queue, &job.id, &body, &meta).await?;
        self.note_retry(tier, job);
        self.settle(job).await
    }

    /// Set a paused route's job aside in `{prefix}.held` (confirmed), attempt not spent,
    /// then ack the original: it waits there, not cycling, until [`RabbitQueue::unhold`].
    #[tracing::instrument(skip_all, fields(job_id = %job.id, queue = %self.inner.names.held))]
    pub async fn hold(&self, job: &Leased) -> Result<(), QueueError> {
        let Some(held) = self.held(job) else {
            return Ok(());
        };
        let session = self.inner.current()?;
        let mut meta = held.meta.with_job(job);
        meta.attempts = job.attempts.saturating_sub(1);
        let body = serde_json::to_vec(&job.job).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        self.publish(&session, &self.inner.names.held, &job.id, &body, &meta)
            .await?;
        self.settle(job).await
    }

    /// Move held jobs back to work: those of `route`, or (with `None`) of every route not in
    /// `still_paused`. Each is published to work (confirmed) before its held copy is acked.
    #[tracing::instrument(skip_all, fields(queue = %self.inner.names.held))]
    pub async fn unhold(
        &self,
        route: Option<&str>,
        still_paused: &[String],
    ) -> Result<u64, QueueError> {
        let session = self.inner.current()?;
        let mut browser = self.browse(&session, &self.inner.names.held).await?;
        if browser.initial == 0 {
            browser.finish().await;
            return Ok(0);
        }
        let mut moved = 0;
        while let Some(delivery) = browser.next().await? {
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            let meta = Meta::read(&headers);
            let wanted = match route {
                Some(r) => meta.route == r,
                None => !still_paused.contains(&meta.route),
            };
            if !wanted {
                continue;
            }
            let id = message_id(&delivery);
            self.publish(&session, &self.inner.names.work, &id, &delivery.data, &meta)
                .await?;
            browser.remove(&delivery).await?;
            moved += 1;
        }
        browser.finish().await;
        Ok(moved)
    }

    /// Publish a copy to `{prefix}.parked` with the reason (confirmed), then ack the original.
    #[tracing::instrument(skip_all, fields(job_id = %job.id, attempt = job.attempts, queue = %self.inner.names.parked))]
    pub async fn park(
        &self,
        job: &Leased,
        reason: &str,
        status: Option<u16>,
    ) -> Result<(), QueueError> {
        let Some(held) = self.held(job) else {
            return Ok(());
        };
        let session = self.inner.current()?;
        let mut meta = held.meta.with_job(job);
        meta.last_error = Some(truncate(reason));
        meta.last_status = status;
        let parked_at = now_ms();
        meta.failed_at_ms = Some(parked_at);
        meta.status = Some("parked".into());
        let body = serde_json::to_vec(&job.job).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        self.publish(&session, &self.inner.names.parked, &job.id, &body, &meta)
            .await?;
        self.inner.ages.lock().expect("ages lock").parked(parked_at);
        self.settle(job).await
    }

    /// Depths from passive declares; `in_flight` counts deliveries held by this process.
    /// Ages: in flight, exact for this process; retrying and parked, from what this process
    /// put there ([`LocalAges`]); ready, bounded by [`HeadClock`]. No queue is read.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let session = self.inner.current()?;
        // A separate channel: a passive declare of a missing queue closes its channel.
        let channel = session.connection.create_channel().await.map_err(broker)?;
        // Before the counts: an empty work queue read now bounds what arrives after.
        let read_at = now_ms();
        let gate = self.inner.browse_gate.clone();
        let result = async {
            // Not while a browse takes a message out or puts them back (see `browse_gate`).
            let _gate = gate.read().await;
            let work = queue_counts(&channel, &self.inner.names.work).await?;
            let mut retrying = 0;
            for name in &self.inner.names.retry {
                retrying += message_count(&channel, name).await?;
            }
            let parked = message_count(&channel, &self.inner.names.parked).await?
                + self.inner.parked_in_hand.load(Ordering::SeqCst);
            let held = message_count(&channel, &self.inner.names.held).await?
                + self.inner.held_in_hand.load(Ordering::SeqCst);
            Ok::<_, QueueError>((work, retrying, parked, held))
        }
        .await;
        let _ = channel.close(200, "stats").await;
        let ((ready, consumers), retrying, parked, held) = result?;
        let oldest_ready_ms = self.inner.head.lock().expect("head lock").observe(
            ready,
            consumers,
            self.inner.want_consumer.load(Ordering::SeqCst),
            read_at,
        );
        let (oldest_retrying_ms, oldest_parked_ms) = self
            .inner
            .ages
            .lock()
            .expect("ages lock")
            .observe(retrying, parked, read_at);
        let (in_flight, oldest_in_flight_ms) = {
            let buffer = self.inner.buffer.lock().expect("buffer lock");
            let held = self.inner.held.lock().expect("held lock");
            let oldest = buffer
                .iter()
                .map(|(_, d)| {
                    d.properties
                        .headers()
                        .as_ref()
                        .and_then(|h| get_int(h, "x-first-seen-ms"))
                })
                .chain(held.values().map(|h| Some(h.meta.first_seen_ms)))
                .flatten()
                .min();
            (buffer.len() + held.len(), oldest)
        };
        Ok(QueueStats {
            held,
            ready,
            in_flight: in_flight as u64,
            retrying,
            parked,
            oldest_ready_ms,
            oldest_parked_ms,
            oldest_in_flight_ms,
            oldest_retrying_ms,
        })
    }

    /// The first `limit` parked jobs, in queue order.
    pub async fn parked(&self, limit: usize) -> Result<Vec<ParkedJob>, QueueError> {
        self.parked_page(ParkedFilter::default(), limit, None).await
    }

    /// Move parked jobs (all, or the given ids) back to work with attempts reset.
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

    /// Parked jobs matching `filter`, in queue order (≈ parking order), after the position
    /// `cursor` ([`super::ParkedCursor`]).
    pub async fn parked_page(
        &self,
        filter: ParkedFilter,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<Vec<ParkedJob>, QueueError> {
        let session = self.inner.current()?;
        let mut browser = self.browse(&session, &self.inner.names.parked).await?;
        // A position cursor skips what was parked up to it (valid when its job is gone); a
        // bare id (an older cursor) skips up to that job.
        let position = cursor.as_deref().and_then(super::ParkedCursor::parse);
        let mut after_cursor = cursor.is_none() || position.is_some();
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(delivery) = browser.next().await? else {
                break;
            };
            let job = parked_job(&delivery);
            if let Some(p) = &position {
                if !p.is_before(&job) {
                    continue;
                }
            }
            if !after_cursor {
                after_cursor = cursor.as_deref() == Some(job.id.as_str());
                continue;
            }
            if filter_matches(&filter, &job) {
                out.push(job);
            }
        }
        browser.finish().await;
        Ok(out)
    }

    /// How many parked jobs match (reads the whole parked queue).
    pub async fn count_parked(&self, filter: ParkedFilter) -> Result<u64, QueueError> {
        let session = self.inner.current()?;
        let mut browser = self.browse(&session, &self.inner.names.parked).await?;
        let mut n = 0;
        while let Some(delivery) = browser.next().await? {
            if filter_matches(&filter, &parked_job(&delivery)) {
                n += 1;
            }
        }
        browser.finish().await;
        Ok(n)
    }

    /// Move up to `limit` matching parked jobs back to work with attempts reset: each is
    /// republished to work (confirmed) before its parked copy is acked. Jobs not selected
    /// stay unacked and return to the parked queue, in place, when the browse ends.
    #[tracing::instrument(skip_all, fields(queue = %self.inner.names.parked))]
    pub async fn replay_matching(
        &self,
        filter: ParkedFilter,
        limit: Option<usize>,
    ) -> Result<u64, QueueError> {
        let session = self.inner.current()?;
        let mut browser = self.browse(&session, &self.inner.names.parked).await?;
        let mut wanted: Option<std::collections::HashSet<String>> =
            filter.ids.as_ref().map(|ids| ids.iter().cloned().collect());
        let mut replayed = 0u64;
        while limit.map_or(true, |l| replayed < l as u64)
            && !matches!(&wanted, Some(w) if w.is_empty())
        {
            let Some(delivery) = browser.next().await? else {
                break;
            };
            let parked = parked_job(&delivery);
            if !filter_matches(&filter, &parked) {
                continue;
            }
            if let Some(w) = wanted.as_mut() {
                w.remove(&parked.id);
            }
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            let old = Meta::read(&headers);
            let mut history = old.history.clone();
            history.push(parked.reason.clone());
            // Attempts and the age clock restart; earlier reasons are kept in the history.
            let fresh = Meta {
                route: old.route,
                action: old.action,
                first_seen_ms: now_ms(),
                org_id: old.org_id,
                notification_id: old.notification_id,
                record_id: old.record_id,
                replays: old.replays + 1,
                history,
                received_at_ms: old.received_at_ms,
                ..Meta::default()
            };
            self.publish(
                &session,
                &self.inner.names.work,
                &parked.id,
                &delivery.data,
                &fresh,
            )
            .await?;
            self.note(&parked.id, "replayed").await?;
            browser.remove(&delivery).await?;
            replayed += 1;
        }
        browser.finish().await;
        Ok(replayed)
    }

    /// Delete matching parked jobs for good (acked without a copy).
    #[tracing::instrument(skip_all, fields(queue = %self.inner.names.parked))]
    pub async fn purge_parked(&self, filter: ParkedFilter) -> Result<u64, QueueError> {
        let session = self.inner.current()?;
        let mut browser = self.browse(&session, &self.inner.names.parked).await?;
        let mut purged = 0;
        while let Some(delivery) = browser.next().await? {
            let job = parked_job(&delivery);
            if filter_matches(&filter, &job) {
                self.note(&job.id, "purged").await?;
                browser.remove(&delivery).await?;
                purged += 1;
            }
        }
        browser.finish().await;
        Ok(purged)
    }

    /// Paused routes as an older relay kept them (one list in Redis); read once to migrate.
    pub async fn paused_routes(&self) -> Result<Vec<String>, QueueError> {
        let value = self
            .inner
            .dedupe
            .load_state("paused-routes")
            .await
            .map_err(|e| QueueError::Dedupe(e.0))?;
        Ok(value
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default())
    }

    /// One field of a named map of shared control state: in Redis when configured (shared by
    /// every process), otherwise in this process only.
    pub async fn map_set(&self, name: &str, field: &str, value: &str) -> Result<(), QueueError> {
        self.inner
            .dedupe
            .map_set(name, field, value)
            .await
            .map_err(|e| QueueError::Dedupe(e.0))
    }

    pub async fn map_get_all(
        &self,
        name: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, QueueError> {
        self.inner
            .dedupe
            .map_get_all(name)
            .await
            .map_err(|e| QueueError::Dedupe(e.0))
    }

    pub async fn map_remove(&self, name: &str, fields: &[String]) -> Result<(), QueueError> {
        self.inner
            .dedupe
            .map_remove(name, fields)
            .await
            .map_err(|e| QueueError::Dedupe(e.0))
    }

    /// The dedupe store, which also keeps per-record order state.
    pub fn dedupe(&self) -> &super::dedupe::Dedupe {
        &self.inner.dedupe
    }

    /// Whether control state is shared with other processes (Redis configured).
    pub fn shares_control_state(&self) -> bool {
        matches!(self.inner.dedupe, super::dedupe::Dedupe::Redis(_))
    }

    /// A parked job's payload (preview). Jobs in the work or retry queues are not found.
    pub async fn load(&self, id: &str) -> Result<Option<Leased>, QueueError> {
        let session = self.inner.current()?;
        let mut browser = self.browse(&session, &self.inner.names.parked).await?;
        let mut found = None;
        while let Some(delivery) = browser.next().await? {
            if message_id(&delivery) == id {
                found = Some(decode(&delivery, 0).map(|(mut leased, _)| {
                    leased.lease_token = String::new();
                    leased
                }));
                break;
            }
        }
        browser.finish().await;
        found.transpose().map_err(QueueError::Corrupt)
    }

    /// Readiness: the publisher channel is open, the broker answers a passive declare and
    /// Redis (when configured) answers a PING.
    pub async fn check_writable(&self) -> Result<(), QueueError> {
        let session = self.inner.current()?;
        if !session.healthy() {
            return Err(QueueError::Broker("RabbitMQ channel is not open".into()));
        }
        let channel = session.connection.create_channel().await.map_err(broker)?;
        let result = message_count(&channel, &self.inner.names.work).await;
        let _ = channel.close(200, "ready probe").await;
        result?;
        // Every enqueue needs the dedupe store too.
        self.inner
            .dedupe
            .check()
            .await
            .map_err(|e| QueueError::Dedupe(e.0))
    }

    /// In-memory dedupe keys past their TTL; Redis expires its keys itself (0).
    pub async fn purge_expired_dedupe(&self) -> Result<u64, QueueError> {
        Ok(self.inner.dedupe.purge_expired())
    }

    /// Refuse new work and close the connection in the background (unacked deliveries
    /// return to their queue).
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.session.write().expect("session lock").take();
        self.inner.stop.cancel();
    }

    /// Resolves when deliveries may be waiting.
    pub async fn notified(&self) {
        self.inner.work_ready.notified().await
    }
}

/// The same rules as the SQLite filter: every set field must match.
fn filter_matches(f: &ParkedFilter, p: &ParkedJob) -> bool {
    let org15 = |s: &str| s.chars().take(15).collect::<String>();
    f.route.as_ref().map_or(true, |v| *v == p.route)
        && f.action.as_ref().map_or(true, |v| *v == p.action)
        && f.org_id.as_ref().map_or(true, |v| {
            p.org_id.as_deref().is_some_and(|o| org15(o) == org15(v))
        })
        && f.record_id
            .as_ref()
            .map_or(true, |v| p.record_id.as_ref() == Some(v))
        && f.reason
            .as_ref()
            .map_or(true, |v| p.reason.contains(v.as_str()))
        && f.since_ms.map_or(true, |v| p.parked_at_ms >= v)
        && f.until_ms.map_or(true, |v| p.parked_at_ms < v)
        && f.ids.as_ref().map_or(true, |ids| ids.contains(&p.id))
}

/// The smallest tier whose TTL is not shorter than `delay` less the worker's ±20 % jitter,
/// nor shorter than `at_least` (a `Retry-After`, which jitter never shortens); the longest
/// tier when none is long enough (the caller then chains tiers with `x-not-before`).
fn retry_tier(tiers: &[Duration], delay: Duration, at_least: Duration) -> Option<usize> {
    let floor = delay
        .mul_f64(1.0 / 1.2)
        .saturating_sub(Duration::from_millis(1))
        .max(at_least);
    let mut order: Vec<usize> = (0..tiers.len()).collect();
    order.sort_by_key(|&i| (tiers[i], i));
    order
        .iter()
        .copied()
        .find(|&i| tiers[i] >= floor)
        .or_else(|| order.last().copied())
}

async fn message_count(channel: &Channel, queue: &str) -> Result<u64, QueueError> {
    Ok(queue_counts(channel, queue).await?.0)
}

/// Ready messages (not unacked ones) and consumers of `queue`, from a passive declare: it
/// only checks that the queue exists.
async fn queue_counts(channel: &Channel, queue: &str) -> Result<(u64, u32), QueueError> {
    let q = channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(broker)?;
    Ok((u64::from(q.message_count()), q.consumer_count()))
}

async fn start_consumer(inner: &Arc<Inner>) -> Result<(), QueueError> {
    let session = inner.current()?;
    if session.consumer_started.load(Ordering::SeqCst) {
        return Ok(());
    }
    let _guard = inner.consumer_start.lock().await;
    if session.consumer_started.load(Ordering::SeqCst) {
        return Ok(());
    }
    let channel = session.connection.create_channel().await.map_err(broker)?;
    // basic.qos, global = false: at most `prefetch` unacked deliveries per consumer, i.e.
    // pushed to this process. <https://www.rabbitmq.com/docs/consumer-prefetch>
    channel
        .basic_qos(inner.config.prefetch, BasicQosOptions { global: false })
        .await
        .map_err(broker)?;
    let tag = format!("{}-{}", inner.config.prefix, uuid::Uuid::new_v4());
    // no_ack = false: manual acks; an unacked delivery returns to the queue when the channel
    // or connection closes. <https://www.rabbitmq.com/docs/confirms#consumer-acknowledgements>
    let consumer = channel
        .basic_consume(
            &inner.names.work,
            &tag,
            BasicConsumeOptions {
                no_ack: false,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(broker)?;
    let wake = inner.wake.clone();
    channel.on_error(move |e| {
        tracing::warn!(error = %e, "RabbitMQ consumer channel closed");
        wake.notify_one();
    });
    *session.consumer.lock().expect("consumer lock") = Some(channel);
    session.consumer_alive.store(true, Ordering::SeqCst);
    session.consumer_started.store(true, Ordering::SeqCst);
    let span = tracing::info_span!("rabbitmq_consumer", queue = %inner.names.work, generation = session.generation);
    tokio::spawn(
        consume(
            Arc::downgrade(inner),
            session.generation,
            session.consumer_alive.clone(),
            consumer,
        )
        .instrument(span),
    );
    Ok(())
}

/// Move deliveries into the buffer until the consumer ends.
async fn consume(
    weak: Weak<Inner>,
    generation: u64,
    alive: Arc<AtomicBool>,
    mut consumer: lapin::Consumer,
) {
    while let Some(item) = consumer.next().await {
        let Some(inner) = weak.upgrade() else { break };
        match item {
            Ok(delivery) => {
                let headers = delivery.properties.headers().as_ref();
                if let Some(at) = headers.and_then(|h| get_int(h, READY_AT)) {
                    inner.head.lock().expect("head lock").delivered(at);
                }
                inner
                    .buffer
                    .lock()
                    .expect("buffer lock")
                    .push_back((generation, delivery));
                inner.arrived.notify_waiters();
                inner.work_ready.notify_one();
            }
            Err(e) => {
                tracing::warn!(error = %e, "RabbitMQ consumer stopped");
                break;
            }
        }
    }
    alive.store(false, Ordering::SeqCst);
    if let Some(inner) = weak.upgrade() {
        inner.wake.notify_one();
    }
}

/// Keep a session up: watch it, and after a loss reconnect with backoff (lapin 2 has no
/// automatic recovery), re-declare the topology and restart the consumer.
async fn supervise(weak: Weak<Inner>, stop: CancellationToken, first: Arc<Session>) {
    let mut session = Some(first);
    let mut generation = 1;
    let mut backoff = BACKOFF_MIN;
    loop {
        if let Some(current) = session.take() {
            watch(&weak, &stop, &current).await;
            if let Some(inner) = weak.upgrade() {
                inner.forget_session(current.generation);
            }
            let stopping = stop.is_cancelled() || weak.strong_count() == 0;
            if !stopping {
                tracing::warn!(
                    "lost the RabbitMQ connection; enqueues fail (503) until it is back"
                );
            }
            current.shut().await;
            if stopping {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        let Some(inner) = weak.upgrade() else { return };
        generation += 1;
        match Session::open(&inner.config, &inner.names, generation, &inner.wake).await {
            Ok(s) if stop.is_cancelled() => {
                // Closed while reconnecting: do not install a session nobody will use.
                s.shut().await;
                return;
            }
            Ok(s) => {
                *inner.session.write().expect("session lock") = Some(s.clone());
                tracing::info!(generation, "reconnected to RabbitMQ");
                backoff = BACKOFF_MIN;
                session = Some(s);
            }
            Err(e) => {
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "RabbitMQ still unreachable");
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Return when the session is unhealthy, the queue is closed or dropped.
async fn watch(weak: &Weak<Inner>, stop: &CancellationToken, session: &Arc<Session>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let wake = inner.wake.clone();
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if stop.is_cancelled() || !session.healthy() {
            return;
        }
        inner.requeue_expired_leases().await;
        if inner.want_consumer.load(Ordering::SeqCst)
            && !session.consumer_started.load(Ordering::SeqCst)
        {
            if let Err(e) = start_consumer(&inner).await {
                tracing::warn!(error = %e, "could not start consuming; reconnecting");
                return;
            }
        }
        drop(inner);
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Reads a queue message by message without removing it: `basic.get` with manual ack keeps
/// each message invisible to others until acked or this channel closes, when the broker
/// puts back every unacked one. So each message is seen once per browse.
struct Browser {
    session: Arc<Session>,
    channel: Channel,
    queue: String,
    /// Messages of this queue out of it in this process's hands (see `parked_in_hand`).
    in_hand: Arc<AtomicU64>,
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Whether `finish` already counted the returned messages out of `in_hand`.
    settled: bool,
    /// Ready messages when the browse began, and how many of them it removed.
    initial: u64,
    removed: u64,
    taken: u64,
}

impl Browser {
    async fn open(
        session: &Arc<Session>,
        queue: &str,
        in_hand: Arc<AtomicU64>,
        gate: Arc<tokio::sync::RwLock<()>>,
    ) -> Result<Self, QueueError> {
        let channel = session.connection.create_channel().await.map_err(broker)?;
        let initial = message_count(&channel, queue).await?;
        Ok(Self {
            session: session.clone(),
            channel,
            queue: queue.to_owned(),
            in_hand,
            gate,
            settled: false,
            initial,
            removed: 0,
            taken: 0,
        })
    }

    async fn next(&mut self) -> Result<Option<Delivery>, QueueError> {
        let gate = self.gate.clone();
        let _gate = gate.write().await;
        let message = self.get().await?;
        if message.is_some() {
            self.taken += 1;
            self.in_hand.fetch_add(1, Ordering::SeqCst);
        }
        Ok(message.map(|m| m.delivery))
    }

    async fn get(&self) -> Result<Option<lapin::message::BasicGetMessage>, QueueError> {
        self.channel
            .basic_get(&self.queue, BasicGetOptions { no_ack: false })
            .await
            .map_err(broker)
    }

    /// Ack a message taken by `next`: it leaves the queue for good.
    async fn remove(&mut self, delivery: &Delivery) -> Result<(), QueueError> {
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(broker)?;
        self.removed += 1;
        self.in_hand.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    /// Close the channel, so the messages not removed go back to the queue, and wait (10 s
    /// at most) until the queue counts them again: a quorum queue takes them back
    /// asynchronously, and a listing must not make them look gone to the next call. A busy
    /// or just-restarted broker can take seconds; the wait ends as soon as they are back.
    async fn finish(mut self) {
        let wait = Duration::from_secs(10);
        let gate = self.gate.clone();
        let _gate = gate.write().await;
        let _ = tokio::time::timeout(wait, self.channel.close(200, "browse done")).await;
        if self.taken == self.removed {
            return;
        }
        // They leave this process's hands only once the queue counts them again.
        self.settle_back(wait).await;
        self.in_hand
            .fetch_sub(self.taken - self.removed, Ordering::SeqCst);
        self.settled = true;
    }

    async fn settle_back(&self, wait: Duration) {
        let expected = self.initial.saturating_sub(self.removed);
        let settle = async {
            let channel = self.session.connection.create_channel().await.ok()?;
            loop {
                match message_count(&channel, &self.queue).await {
                    Ok(n) if n < expected => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    _ => break,
                }
            }
            let _ = channel.close(200, "browse settled").await;
            Some(())
        };
        let _ = tokio::time::timeout(wait, settle).await;
    }
}

impl Drop for Browser {
    /// A browse abandoned on an error: its messages go back when the channel closes.
    fn drop(&mut self) {
        if !self.settled {
            self.in_hand
                .fetch_sub(self.taken - self.removed, Ordering::SeqCst);
        }
    }
}

/// How early a job may come back before its `x-not-before` and still be delivered.
const NOT_BEFORE_TOLERANCE_MS: i64 = 50;

/// The `x-not-before` of a job this process holds.
fn meta_not_before(inner: &Inner, lease_token: &str) -> Option<i64> {
    inner
        .held
        .lock()
        .expect("held lock")
        .get(lease_token)
        .and_then(|h| h.meta.not_before_ms)
}

fn message_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default()
}

/// A delivery as a leased job; `Err` when it cannot be read.
fn decode(delivery: &Delivery, generation: u64) -> Result<(Leased, Meta), String> {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let meta = Meta::read(&headers);
    let id = message_id(delivery);
    if id.is_empty() {
        return Err("message without message_id".into());
    }
    let job: Job =
        serde_json::from_slice(&delivery.data).map_err(|e| super::decode_error(&id, &e))?;
    // The attempt counter lives in the header and is counted at lease time, as on SQLite:
    // quorum queues also count returns to the queue (lost consumer, requeue) in
    // x-delivery-count; classic queues only flag a redelivery.
    let returns = get_int(&headers, "x-delivery-count")
        .map(|n| n.max(0) as u32)
        .unwrap_or(u32::from(delivery.redelivered));
    let leased = Leased {
        received_at_ms: meta.received_at_ms.unwrap_or(meta.first_seen_ms),
        id,
        route: meta.route.clone(),
        action: meta.action.clone(),
        job,
        attempts: meta.attempts + returns + 1,
        first_seen_ms: meta.first_seen_ms,
        lease_token: format!("amqp:{generation}:{}", delivery.delivery_tag),
        org_id: meta.org_id.clone(),
        notification_id: meta.notification_id.clone(),
        record_id: meta.record_id.clone(),
    };
    Ok((leased, meta))
}

fn parked_job(delivery: &Delivery) -> ParkedJob {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let meta = Meta::read(&headers);
    let parked_at_ms = meta.failed_at_ms.unwrap_or_else(|| {
        delivery
            .properties
            .timestamp()
            .map_or(0, |s| (s as i64).saturating_mul(1000))
    });
    ParkedJob {
        id: message_id(delivery),
        reason: park_reason(&meta, &headers),
        route: meta.route,
        action: meta.action,
        org_id: meta.org_id,
        notification_id: meta.notification_id,
        record_id: meta.record_id,
        attempts: meta.attempts,
        first_seen_ms: meta.first_seen_ms,
        parked_at_ms,
        last_status: meta.last_status,
        replays: meta.replays,
        history: meta.history,
    }
}

/// Our reason, or why the broker dead-lettered the message (delivery limit, rejected).
fn park_reason(meta: &Meta, headers: &FieldTable) -> String {
    meta.last_error.clone().unwrap_or_else(|| {
        let why = get_str(headers, "x-first-death-reason").unwrap_or_else(|| "unknown".into());
        format!("dead-lettered by RabbitMQ ({why})")
    })
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_ERROR_LEN) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// What travels in the message headers (never the payload).
#[derive(Debug, Clone, Default)]
struct Meta {
    route: String,
    action: String,
    /// Attempts made before this message was published.
    attempts: u32,
    first_seen_ms: i64,
    org_id: Option<String>,
    notification_id: Option<String>,
    record_id: Option<String>,
    last_error: Option<String>,
    last_status: Option<u16>,
    failed_at_ms: Option<i64>,
    replays: u32,
    history: Vec<String>,
    status: Option<String>,
    /// Not to be delivered before this time (a `Retry-After`, or a wait longer than the
    /// longest retry tier): a job back in work too early goes round another tier.
    not_before_ms: Option<i64>,
    /// When the request carrying it arrived at a gateway.
    received_at_ms: Option<i64>,
}

impl Meta {
    /// These headers, updated from the leased job (attempts so far, identifiers).
    fn with_job(&self, job: &Leased) -> Meta {
        Meta {
            route: job.route.clone(),
            action: job.action.clone(),
            attempts: job.attempts,
            first_seen_ms: job.first_seen_ms,
            org_id: job.org_id.clone(),
            notification_id: job.notification_id.clone(),
            record_id: job.record_id.clone(),
            ..self.clone()
        }
    }

    fn to_headers(&self) -> FieldTable {
        let mut t = FieldTable::default();
        put_str(&mut t, "x-route", Some(&self.route));
        put_str(&mut t, "x-action", Some(&self.action));
        t.insert(
            "x-attempts".into(),
            AMQPValue::LongLongInt(i64::from(self.attempts)),
        );
        t.insert(
            "x-first-seen-ms".into(),
            AMQPValue::LongLongInt(self.first_seen_ms),
        );
        put_str(&mut t, "x-org-id", self.org_id.as_deref());
        put_str(&mut t, "x-notification-id", self.notification_id.as_deref());
        put_str(&mut t, "x-record-id", self.record_id.as_deref());
        put_str(&mut t, "x-last-error", self.last_error.as_deref());
        if let Some(status) = self.last_status {
            t.insert(
                "x-last-status".into(),
                AMQPValue::LongLongInt(i64::from(status)),
            );
        }
        if let Some(at) = self.failed_at_ms {
            t.insert("x-failed-at".into(), AMQPValue::LongLongInt(at));
        }
        if self.replays > 0 {
            t.insert(
                "x-replays".into(),
                AMQPValue::LongLongInt(i64::from(self.replays)),
            );
        }
        if !self.history.is_empty() {
            let items: Vec<AMQPValue> = self
                .history
                .iter()
                .map(|h| AMQPValue::LongString(h.as_str().into()))
                .collect();
            t.insert(
                "x-history".into(),
                AMQPValue::FieldArray(FieldArray::from(items)),
            );
        }
        put_str(&mut t, "x-status", self.status.as_deref());
        if let Some(at) = self.not_before_ms {
            t.insert("x-not-before".into(), AMQPValue::LongLongInt(at));
        }
        if let Some(at) = self.received_at_ms {
            t.insert("x-received-at".into(), AMQPValue::LongLongInt(at));
        }
        t
    }

    fn read(t: &FieldTable) -> Meta {
        let history = match find(t, "x-history") {
            Some(AMQPValue::FieldArray(items)) => {
                items.as_slice().iter().filter_map(value_str).collect()
            }
            _ => Vec::new(),
        };
        Meta {
            route: get_str(t, "x-route").unwrap_or_default(),
            action: get_str(t, "x-action").unwrap_or_default(),
            attempts: get_int(t, "x-attempts")
                .map_or(0, |n| n.clamp(0, i64::from(u32::MAX)) as u32),
            first_seen_ms: get_int(t, "x-first-seen-ms").unwrap_or_else(now_ms),
            org_id: get_str(t, "x-org-id"),
            notification_id: get_str(t, "x-notification-id"),
            record_id: get_str(t, "x-record-id"),
            last_error: get_str(t, "x-last-error"),
            last_status: get_int(t, "x-last-status").and_then(|s| u16::try_from(s).ok()),
            failed_at_ms: get_int(t, "x-failed-at"),
            replays: get_int(t, "x-replays").map_or(0, |n| n.clamp(0, i64::from(u32::MAX)) as u32),
            history,
            status: get_str(t, "x-status"),
            not_before_ms: get_int(t, "x-not-before"),
            received_at_ms: get_int(t, "x-received-at"),
        }
    }
}

fn put_str(t: &mut FieldTable, key: &str, value: Option<&str>) {
    if let Some(v) = value {
        t.insert(key.into(), AMQPValue::LongString(v.into()));
    }
}

fn find<'a>(t: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    t.inner()
        .iter()
        .find(|(k, _)| k.as_str() == key)
        .map(|(_, v)| v)
}

fn value_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn get_str(t: &FieldTable, key: &str) -> Option<String> {
    find(t, key).and_then(value_str)
}

fn get_int(t: &FieldTable, key: &str) -> Option<i64> {
    match find(t, key)? {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &[f64]) -> Vec<Duration> {
        s.iter().map(|s| Duration::from_secs_f64(*s)).collect()
    }

    #[test]
    fn small_frames_unless_the_url_asks_for_others() {
        let uri = amqp_uri("amqp://guest:secret@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(uri.query.frame_max, Some(FRAME_MAX));
        assert_eq!(uri.query.connection_timeout, Some(5_000));
        let uri = amqp_uri("amqps://u:p@rabbit.internal/vh?frame_max=131072&heartbeat=30").unwrap();
        assert_eq!(uri.query.frame_max, Some(131_072));
        assert_eq!(uri.query.heartbeat, Some(30));
        let e = amqp_uri("http://guest:secret@x").unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn a_retry_counts_until_it_is_due_back_in_work() {
        let mut ages = LocalAges::default();
        ages.retried(1, 5_000, 100);
        ages.retried(0, 2_000, 300);
        assert_eq!(ages.observe(2, 0, 1_000), (Some(100), None));
        // The tier-1 job came back at 5 s; the tier-0 one went earlier.
        assert_eq!(ages.observe(0, 0, 6_000), (None, None));
    }

    #[test]
    fn the_parked_age_counts_from_the_oldest_park_seen() {
        let mut ages = LocalAges::default();
        assert_eq!(ages.observe(0, 0, 1_000).1, None);
        // Parked by another process before this one looked: at least since the first reading.
        assert_eq!(ages.observe(0, 3, 2_000).1, Some(2_000));
        ages.parked(2_500);
        assert_eq!(ages.observe(0, 4, 3_000).1, Some(2_000));
        // All replayed: the next park starts the clock again.
        assert_eq!(ages.observe(0, 0, 4_000).1, None);
        ages.parked(4_200);
        assert_eq!(ages.observe(0, 1, 5_000).1, Some(4_200));
    }

    #[test]
    fn the_head_became_ready_after_the_queue_was_last_seen_empty() {
        let mut clock = HeadClock::default();
        assert_eq!(clock.observe(0, 0, false, 1_000), None);
        // A backlog builds with nobody consuming: the head is younger than the empty read.
        assert_eq!(clock.observe(5, 0, false, 4_000), Some(1_000));
        assert_eq!(clock.observe(9, 0, false, 9_000), Some(1_000));
        // Drained: no age, and the next backlog counts from the new empty read.
        assert_eq!(clock.observe(0, 1, false, 10_000), None);
        assert_eq!(clock.observe(2, 0, false, 12_000), Some(10_000));
    }

    #[test]
    fn a_consumer_bounds_the_head_by_its_newest_delivery() {
        let mut clock = HeadClock::default();
        assert_eq!(clock.observe(0, 1, true, 1_000), None);
        // Messages flow and a backlog stays: the head became ready after the newest
        // delivered message did, which is later than the last empty read.
        clock.delivered(5_000);
        clock.delivered(4_000);
        assert_eq!(clock.observe(40, 1, true, 6_000), Some(5_000));
    }

    #[test]
    fn a_process_that_does_not_consume_reports_no_age_while_others_do() {
        let mut clock = HeadClock::default();
        assert_eq!(clock.observe(0, 0, false, 1_000), None);
        // Others consume: only they can tell how far the head has moved.
        assert_eq!(clock.observe(40, 3, false, 60_000), None);
        // Everyone stopped consuming: the bound applies again.
        assert_eq!(clock.observe(40, 0, false, 61_000), Some(1_000));
    }

    #[test]
    fn a_backlog_older_than_the_process_is_at_least_as_old_as_its_first_read() {
        let mut clock = HeadClock::default();
        assert_eq!(clock.observe(7, 0, false, 2_000), Some(2_000));
        assert_eq!(clock.observe(7, 0, false, 9_000), Some(2_000));
    }

    #[test]
    fn the_retry_tier_follows_the_schedule_despite_jitter() {
        let tiers = secs(&[5.0, 30.0, 120.0]);
        assert_eq!(
            retry_tier(&tiers, Duration::from_secs_f64(4.0), Duration::ZERO),
            Some(0)
        );
        assert_eq!(
            retry_tier(&tiers, Duration::from_secs_f64(6.0), Duration::ZERO),
            Some(0)
        );
        assert_eq!(
            retry_tier(&tiers, Duration::from_secs_f64(24.0), Duration::ZERO),
            Some(1)
        );
        assert_eq!(
            retry_tier(&tiers, Duration::from_secs_f64(36.0), Duration::ZERO),
            Some(1)
        );
    }

    #[test]
    fn a_long_retry_after_takes_a_tier_at_least_as_long_or_the_longest() {
        let tiers = secs(&[5.0, 30.0, 120.0]);
        assert_eq!(
            retry_tier(&tiers, Duration::from_secs(60), Duration::ZERO),
            Some(2)
        );
        assert_eq!(
            retry_tier(&tiers, Duration::from_secs(3600), Duration::ZERO),
            Some(2)
        );
        assert_eq!(
            retry_tier(&[], Duration::from_secs(1), Duration::ZERO),
            None
        );
    }

    #[test]
    fn a_retry_after_is_never_cut_by_the_jitter_allowance() {
        let tiers = secs(&[5.0, 30.0, 120.0]);
        // A schedule delay of 6 s (5 s jittered) fits the 5 s tier; a Retry-After of 6 s does not.
        assert_eq!(
            retry_tier(&tiers, Duration::from_secs(6), Duration::ZERO),
            Some(0)
        );
        assert_eq!(
            retry_tier(&tiers, Duration::from_secs(6), Duration::from_secs(6)),
            Some(1)
        );
        assert_eq!(
            retry_tier(&tiers, Duration::from_secs(30), Duration::from_secs(30)),
            Some(1)
        );
    }

    #[test]
    fn headers_round_trip() {
        let meta = Meta {
            route: "gdpr".into(),
            action: "remove_user".into(),
            attempts: 3,
            first_seen_ms: 42,
            org_id: Some("00D".into()),
            notification_id: Some("04l".into()),
            record_id: None,
            last_error: Some("Centercode answered 503".into()),
            last_status: Some(503),
            failed_at_ms: Some(99),
            replays: 2,
            history: vec!["first".into(), "second".into()],
            status: Some("parked".into()),
            not_before_ms: Some(1_234),
            received_at_ms: Some(1_000),
        };
        let back = Meta::read(&meta.to_headers());
        assert_eq!(format!("{back:?}"), format!("{meta:?}"));
    }

    #[test]
    fn long_errors_are_cut() {
        let long = "é".repeat(MAX_ERROR_LEN + 10);
        assert_eq!(truncate(&long).chars().count(), MAX_ERROR_LEN + 1);
        assert_eq!(truncate("short"), "short");
    }
}
