//! Deduplication keys for the RabbitMQ backend: claim a key before publishing, record it
//! after the broker confirmed. A claim that is still pending is never reported as a
//! duplicate, so a notification is never acknowledged without having been stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lua: delete the key only while it still holds this request's claim.
const ABANDON: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) end return 0";
const PENDING: &str = "pending:";

/// What a key held when a request tried to claim it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request holds the key now: publish, then [`Dedupe::confirm`] or [`Dedupe::abandon`].
    Claimed,
    /// Stored before (broker-confirmed) as `job_id`.
    Stored {
        job_id: String,
        body_hash: Option<String>,
    },
    /// Another request is storing the same key right now; its outcome is unknown yet.
    Pending { job_id: String },
}

/// The dedupe store could not answer; the request gets 503 and Salesforce retries.
#[derive(Debug, thiserror::Error)]
#[error("dedupe store failed: {0}")]
pub struct DedupeError(pub String);

/// One key of one request: the dedupe key and the job that would store it.
#[derive(Debug, Clone)]
pub struct KeyedJob {
    pub key: String,
    pub job_id: String,
    pub body_hash: Option<String>,
}

/// Where claims live.
#[derive(Clone)]
pub enum Dedupe {
    /// In this process's memory: correct for ONE gateway process only (two gateways would
    /// each accept the same notification), and forgotten on restart. Multi-gateway
    /// deployments must set `queue.redis_url`.
    Local(LocalDedupe),
    /// Redis, shared by every gateway; keys expire by themselves.
    Redis(Box<RedisDedupe>),
}

impl Dedupe {
    /// An in-memory store (one gateway only).
    pub fn local(ttl: Duration, pending_ttl: Duration) -> Self {
        Dedupe::Local(LocalDedupe {
            records: Arc::default(),
            map: Arc::default(),
            state: Arc::default(),
            maps: Arc::default(),
            ttl,
            pending_ttl,
        })
    }

    /// Connect to Redis; keys are `{namespace}:dedupe:{key}`.
    pub async fn redis(
        url: &str,
        namespace: &str,
        ttl: Duration,
        pending_ttl: Duration,
        timeout: Duration,
    ) -> Result<Self, DedupeError> {
        let client = redis::Client::open(url).map_err(|e| DedupeError(e.to_string()))?;
        let conn = connect_redis(&client, timeout).await?;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Dedupe::Redis(Box::new(RedisDedupe {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            client,
            conn,
            namespace: namespace.to_owned(),
            ttl,
            pending_ttl,
            timeout,
        })))
    }

    /// Claim every key (in one round trip on Redis). A key already claimed or stored keeps
    /// its value; the caller must `abandon` its own claims if it gives up.
    #[tracing::instrument(level = "debug", skip_all, fields(keys = jobs.len()))]
    pub async fn claim(&self, jobs: &[KeyedJob]) -> Result<Vec<Claim>, DedupeError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Dedupe::Local(d) => Ok(d.claim(jobs)),
            Dedupe::Redis(d) => d.claim(jobs).await,
        }
    }

    /// The broker confirmed these jobs: remember them for the dedupe TTL.
    #[tracing::instrument(level = "debug", skip_all, fields(keys = jobs.len()))]
    pub async fn confirm(&self, jobs: &[KeyedJob]) -> Result<(), DedupeError> {
        if jobs.is_empty() {
            return Ok(());
        }
        match self {
            Dedupe::Local(d) => {
                d.confirm(jobs);
                Ok(())
            }
            Dedupe::Redis(d) => d.confirm(jobs).await,
        }
    }

    /// Publishing failed: release these claims (only where they are still this request's).
    #[tracing::instrument(level = "debug", skip_all, fields(keys = jobs.len()))]
    pub async fn abandon(&self, jobs: &[KeyedJob]) -> Result<(), DedupeError> {
        if jobs.is_empty() {
            return Ok(());
        }
        match self {
            Dedupe::Local(d) => {
                d.abandon(jobs);
                Ok(())
            }
            Dedupe::Redis(d) => d.abandon(jobs).await,
        }
    }

    /// Whether the store answers (readiness).
    pub async fn check(&self) -> Result<(), DedupeError> {
        match self {
            Dedupe::Local(_) => Ok(()),
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("PING").ignore();
                d.run(pipe).await
            }
        }
    }

    /// A small named value kept beside the keys (the paused routes): shared and durable
    /// on Redis, per process in memory.
    pub async fn load_state(&self, name: &str) -> Result<Option<String>, DedupeError> {
        match self {
            Dedupe::Local(d) => Ok(d.state.lock().expect("state lock").get(name).cloned()),
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(d.state_key(name));
                let (value,): (Option<String>,) = d.run(pipe).await?;
                Ok(value)
            }
        }
    }

    pub async fn save_state(&self, name: &str, value: &str) -> Result<(), DedupeError> {
        match self {
            Dedupe::Local(d) => {
                d.state
                    .lock()
                    .expect("state lock")
                    .insert(name.to_owned(), value.to_owned());
                Ok(())
            }
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("SET").arg(d.state_key(name)).arg(value).ignore();
                d.run(pipe).await
            }
        }
    }

    /// Per-record order: note a version seen at ingest (the newest is kept).
    pub async fn order_seen(
        &self,
        versions: &[(String, i64)],
        remember_ms: i64,
    ) -> Result<(), DedupeError> {
        match self {
            Dedupe::Local(d) => {
                let mut records = d.records.lock().expect("records lock");
                for (key, version) in versions {
                    let r = records.entry(key.clone()).or_default();
                    r.seen = r.seen.max(Some(*version));
                }
                Ok(())
            }
            Dedupe::Redis(d) => {
                // One round trip for a whole message's records.
                let mut pipe = redis::pipe();
                for (key, version) in versions {
                    pipe.cmd("EVAL")
                        .arg(ORDER_SEEN_LUA)
                        .arg(1)
                        .arg(d.record_key(key))
                        .arg(*version)
                        .arg(remember_ms)
                        .ignore();
                }
                d.run(pipe).await
            }
        }
    }

    /// Per-record order: may `version` be delivered now? On `Go` the record is held for it
    /// for `hold_ms`.
    pub async fn order_begin(
        &self,
        key: &str,
        version: i64,
        hold_ms: i64,
        remember_ms: i64,
    ) -> Result<crate::ordering::Decision, DedupeError> {
        use crate::ordering::Decision;
        match self {
            Dedupe::Local(d) => {
                let now = crate::queue::now_ms();
                let mut records = d.records.lock().expect("records lock");
                Ok(records
                    .entry(key.to_owned())
                    .or_default()
                    .begin(version, now, hold_ms))
            }
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("EVAL")
                    .arg(ORDER_BEGIN_LUA)
                    .arg(1)
                    .arg(d.record_key(key))
                    .arg(version)
                    .arg(hold_ms)
                    .arg(remember_ms);
                let (code, newer): (i64, i64) = d.run::<((i64, i64),)>(pipe).await?.0;
                Ok(match code {
                    0 => Decision::Go,
                    1 => Decision::Superseded { newer },
                    _ => Decision::Busy,
                })
            }
        }
    }

    /// Per-record order: a job of `version` is done with the record; `delivered` when it
    /// was delivered.
    pub async fn order_finish(
        &self,
        key: &str,
        version: i64,
        delivered: bool,
        remember_ms: i64,
    ) -> Result<(), DedupeError> {
        match self {
            Dedupe::Local(d) => {
                let mut records = d.records.lock().expect("records lock");
                records
                    .entry(key.to_owned())
                    .or_default()
                    .finish(version, delivered);
                Ok(())
            }
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("EVAL")
                    .arg(ORDER_FINISH_LUA)
                    .arg(1)
                    .arg(d.record_key(key))
                    .arg(version)
                    .arg(if delivered { "1" } else { "0" })
                    .arg(remember_ms)
                    .ignore();
                d.run(pipe).await
            }
        }
    }

    /// Set one field of a named map kept beside the keys (per-route pause records, process
    /// reports): shared and durable on Redis (a hash), per process in memory.
    pub async fn map_set(&self, name: &str, field: &str, value: &str) -> Result<(), DedupeError> {
        match self {
            Dedupe::Local(d) => {
                d.maps
                    .lock()
                    .expect("state lock")
                    .entry(name.to_owned())
                    .or_default()
                    .insert(field.to_owned(), value.to_owned());
                Ok(())
            }
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("HSET")
                    .arg(d.state_key(name))
                    .arg(field)
                    .arg(value)
                    .ignore();
                d.run(pipe).await
            }
        }
    }

    /// Every field of a named map.
    pub async fn map_get_all(
        &self,
        name: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, DedupeError> {
        match self {
            Dedupe::Local(d) => Ok(d
                .maps
                .lock()
                .expect("state lock")
                .get(name)
                .cloned()
                .unwrap_or_default()),
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("HGETALL").arg(d.state_key(name));
                let (map,): (std::collections::BTreeMap<String, String>,) = d.run(pipe).await?;
                Ok(map)
            }
        }
    }

    /// Remove fields of a named map.
    pub async fn map_remove(&self, name: &str, fields: &[String]) -> Result<(), DedupeError> {
        if fields.is_empty() {
            return Ok(());
        }
        match self {
            Dedupe::Local(d) => {
                if let Some(map) = d.maps.lock().expect("state lock").get_mut(name) {
                    for f in fields {
                        map.remove(f);
                    }
                }
                Ok(())
            }
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("HDEL").arg(d.state_key(name)).arg(fields).ignore();
                d.run(pipe).await
            }
        }
    }

    /// Rate limits: one request under limit `name` (see `crate::ratelimit`). `None` from
    /// the in-memory store, which keeps no rate state: the caller keeps it.
    pub async fn rate_acquire(
        &self,
        name: &str,
        interval_us: i64,
        burst: u32,
        horizon_us: i64,
    ) -> Result<Option<crate::ratelimit::Answer>, DedupeError> {
        match self {
            Dedupe::Local(_) => Ok(None),
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("EVAL")
                    .arg(RATE_ACQUIRE_LUA)
                    .arg(1)
                    .arg(d.rate_key(name))
                    .arg(interval_us)
                    .arg(burst)
                    .arg(horizon_us);
                let (wait_us, placed, allowance): (i64, i64, i64) =
                    d.run::<((i64, i64, i64),)>(pipe).await?.0;
                Ok(Some(crate::ratelimit::Answer {
                    wait_us,
                    placed: placed == 1,
                    allowance: allowance.max(0) as u32,
                }))
            }
        }
    }

    /// Rate limits: how long requests under limit `name` are still stopped by a
    /// `Retry-After` (0: not stopped). `None` from the in-memory store.
    pub async fn rate_stopped(&self, name: &str) -> Result<Option<i64>, DedupeError> {
        match self {
            Dedupe::Local(_) => Ok(None),
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("EVAL")
                    .arg(RATE_STOPPED_LUA)
                    .arg(1)
                    .arg(d.rate_key(name));
                let (left,): (i64,) = d.run(pipe).await?;
                Ok(Some(left))
            }
        }
    }

    /// Rate limits: stop requests under limit `name` for `for_us` (a `Retry-After`).
    /// `false` from the in-memory store, which keeps no rate state.
    pub async fn rate_slow(
        &self,
        name: &str,
        for_us: i64,
        interval_us: i64,
        burst: u32,
    ) -> Result<bool, DedupeError> {
        match self {
            Dedupe::Local(_) => Ok(false),
            Dedupe::Redis(d) => {
                let mut pipe = redis::pipe();
                pipe.cmd("EVAL")
                    .arg(RATE_SLOW_LUA)
                    .arg(1)
                    .arg(d.rate_key(name))
                    .arg(for_us)
                    .arg(interval_us)
                    .arg(burst)
                    .ignore();
                d.run::<()>(pipe).await?;
                Ok(true)
            }
        }
    }

    /// Forget expired in-memory keys; Redis expires its keys by itself (0).
    pub fn purge_expired(&self) -> u64 {
        match self {
            Dedupe::Local(d) => d.purge_expired(),
            Dedupe::Redis(_) => 0,
        }
    }
}

fn stored_value(job: &KeyedJob) -> String {
    // Job ids are UUIDs, so `|` cannot occur in them.
    format!("{}|{}", job.job_id, job.body_hash.as_deref().unwrap_or(""))
}

fn parse_value(value: &str) -> Claim {
    if let Some(job_id) = value.strip_prefix(PENDING) {
        return Claim::Pending {
            job_id: job_id.to_owned(),
        };
    }
    let (job_id, hash) = value.split_once('|').unwrap_or((value, ""));
    Claim::Stored {
        job_id: job_id.to_owned(),
        body_hash: (!hash.is_empty()).then(|| hash.to_owned()),
    }
}

#[derive(Debug, Clone)]
enum Entry {
    Pending(String),
    Stored(String, Option<String>),
}

/// The in-memory store.
#[derive(Clone)]
pub struct LocalDedupe {
    /// Per-record order state (see `crate::ordering`).
    records: Arc<Mutex<HashMap<String, crate::ordering::RecordState>>>,
    map: Arc<Mutex<HashMap<String, (Entry, Instant)>>>,
    state: Arc<Mutex<HashMap<String, String>>>,
    maps: Arc<Mutex<HashMap<String, std::collections::BTreeMap<String, String>>>>,
    ttl: Duration,
    pending_ttl: Duration,
}

impl LocalDedupe {
    fn claim(&self, jobs: &[KeyedJob]) -> Vec<Claim> {
        let now = Instant::now();
        let mut map = self.map.lock().expect("dedupe lock");
        jobs.iter()
            .map(|job| match map.get(&job.key) {
                Some((entry, expires)) if *expires > now => match entry {
                    Entry::Pending(id) => Claim::Pending { job_id: id.clone() },
                    Entry::Stored(id, hash) => Claim::Stored {
                        job_id: id.clone(),
                        body_hash: hash.clone(),
                    },
                },
                _ => {
                    map.insert(
                        job.key.clone(),
                        (Entry::Pending(job.job_id.clone()), now + self.pending_ttl),
                    );
                    Claim::Claimed
                }
            })
            .collect()
    }

    fn confirm(&self, jobs: &[KeyedJob]) {
        let expires = Instant::now() + self.ttl;
        let mut map = self.map.lock().expect("dedupe lock");
        for job in jobs {
            map.insert(
                job.key.clone(),
                (
                    Entry::Stored(job.job_id.clone(), job.body_hash.clone()),
                    expires,
                ),
            );
        }
    }

    fn abandon(&self, jobs: &[KeyedJob]) {
        let mut map = self.map.lock().expect("dedupe lock");
        for job in jobs {
            if matches!(map.get(&job.key), Some((Entry::Pending(id), _)) if *id == job.job_id) {
                map.remove(&job.key);
            }
        }
    }

    fn purge_expired(&self) -> u64 {
        let now = Instant::now();
        let mut map = self.map.lock().expect("dedupe lock");
        let before = map.len();
        map.retain(|_, (_, expires)| *expires > now);
        (before - map.len()) as u64
    }
}

/// A reconnecting, multiplexed connection: after a Redis restart it reconnects by itself,
/// and calls fail (503) meanwhile.
async fn connect_redis(
    client: &redis::Client,
    timeout: Duration,
) -> Result<redis::aio::ConnectionManager, DedupeError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout)
        .set_number_of_retries(2)
        .set_max_delay(1000);
    tokio::time::timeout(timeout, client.get_connection_manager_with_config(config))
        .await
        .map_err(|_| DedupeError("Redis did not answer in time".into()))?
        .map_err(|e| DedupeError(e.to_string()))
}

thread_local! {
    /// Per thread and per store: a connection whose driver task runs on this thread's
    /// runtime (an actix worker's), so a command does not hop to another thread and back.
    /// `None` while it is being made.
    static THREAD_CONNS: std::cell::RefCell<HashMap<u64, Option<redis::aio::ConnectionManager>>> =
        std::cell::RefCell::default();
}

// Per-record order in Redis: one hash per record (`seen`, `delivered`, `held`, `holders`,
// `until`), the logic of `crate::ordering::RecordState` in Lua.
// Lua numbers are doubles: millisecond times (and integers below 2^53) are exact. The
// clock is Redis's own (`TIME`), so workers on hosts with skewed clocks agree on holds.

/// ARGV: version, remember_ms.
const ORDER_SEEN_LUA: &str = "
local cur = tonumber(redis.call('HGET', KEYS[1], 'seen'))
if not cur or tonumber(ARGV[1]) > cur then redis.call('HSET', KEYS[1], 'seen', ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0";

/// ARGV: version, hold_ms, remember_ms. Returns {0, 0} go, {1, newer} superseded, {2, 0}
/// busy.
const ORDER_BEGIN_LUA: &str = "
local v = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'seen', 'delivered', 'held', 'holders', 'until')
local newer = nil
for i = 1, 2 do
  local x = tonumber(h[i])
  if x and x > v and (not newer or x > newer) then newer = x end
end
if newer then return {1, newer} end
local holders = tonumber(h[4] or '0')
local held = holders > 0 and tonumber(h[5] or '0') > now
if held and tonumber(h[3]) ~= v then return {2, 0} end
if not held then holders = 0 end
redis.call('HSET', KEYS[1], 'held', ARGV[1], 'holders', tostring(holders + 1), 'until', tostring(now + tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {0, 0}";

/// ARGV: version, delivered ('1' or '0'), remember_ms.
const ORDER_FINISH_LUA: &str = "
local v = tonumber(ARGV[1])
if ARGV[2] == '1' then
  local d = tonumber(redis.call('HGET', KEYS[1], 'delivered'))
  if not d or v > d then redis.call('HSET', KEYS[1], 'delivered', ARGV[1]) end
end
local h = redis.call('HMGET', KEYS[1], 'held', 'holders')
local holders = tonumber(h[2] or '0')
if tonumber(h[1]) == v and holders > 0 then
  if holders == 1 then redis.call('HDEL', KEYS[1], 'held', 'holders', 'until')
  else redis.call('HSET', KEYS[1], 'holders', tostring(holders - 1)) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0";

// Rate limits in Redis: one hash per limit (`tat`, `slowed`, microseconds on Redis's clock),
// the logic of `crate::ratelimit::Gcra` in Lua. Microsecond times (~1.8e15) are exact in
// Lua's doubles; `%.0f` keeps them from being written in exponent form.

/// ARGV: interval_us, burst, horizon_us. Returns {wait_us, placed (1/0), allowance}.
const RATE_ACQUIRE_LUA: &str = "
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'tat', 'slowed')
local tat = tonumber(h[1]) or 0
local slowed = tonumber(h[2]) or 0
if slowed > now then return {slowed - now, 0, 0} end
local base = math.max(tat, now)
local wait = base - now - (burst - 1) * interval
if wait > tonumber(ARGV[3]) then return {wait - tonumber(ARGV[3]), 0, 0} end
tat = base + interval
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat))
redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(tat, slowed) - now) / 1000) + 60000)
return {math.max(wait, 0), 1, math.max(math.floor((burst * interval - (tat - now)) / interval), 0)}";

/// Returns the microseconds the limit is still stopped for (0: not stopped).
const RATE_STOPPED_LUA: &str = "
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slowed = tonumber(redis.call('HGET', KEYS[1], 'slowed')) or 0
return math.max(slowed - now, 0)";

/// ARGV: for_us, interval_us, burst.
const RATE_SLOW_LUA: &str = "
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untl = now + tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'tat', 'slowed')
local slowed = math.max(tonumber(h[2]) or 0, untl)
local tat = math.max(tonumber(h[1]) or 0, untl + (tonumber(ARGV[3]) - 1) * tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat), 'slowed', string.format('%.0f', slowed))
redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(tat, slowed) - now) / 1000) + 60000)
return 0";

/// The Redis store.
#[derive(Clone)]
pub struct RedisDedupe {
    /// Tells this store's per-thread connections from another store's.
    id: u64,
    client: redis::Client,
    /// The shared connection, made at start; used until a thread has its own.
    conn: redis::aio::ConnectionManager,
    namespace: String,
    ttl: Duration,
    pending_ttl: Duration,
    timeout: Duration,
}

impl RedisDedupe {
    fn key(&self, key: &str) -> String {
        format!("{}:dedupe:{key}", self.namespace)
    }

    fn record_key(&self, key: &str) -> String {
        format!("{}:record:{key}", self.namespace)
    }

    fn rate_key(&self, name: &str) -> String {
        format!("{}:rate:{name}", self.namespace)
    }

    fn state_key(&self, name: &str) -> String {
        format!("{}:state:{name}", self.namespace)
    }

    /// This thread's connection, or the shared one until it is made. It is made in the
    /// background, so no request waits for a connect (or its timeout while Redis is down).
    fn conn(&self) -> redis::aio::ConnectionManager {
        let (own, start) = THREAD_CONNS.with(|m| {
            let mut m = m.borrow_mut();
            match m.get(&self.id) {
                Some(own) => (own.clone(), false),
                None => {
                    m.insert(self.id, None);
                    (None, true)
                }
            }
        });
        if start {
            let (id, client, timeout) = (self.id, self.client.clone(), self.timeout);
            // On the current runtime: an actix worker's runs it on this same thread.
            tokio::spawn(async move {
                let made = connect_redis(&client, timeout).await.ok();
                THREAD_CONNS.with(|m| match made {
                    Some(conn) => m.borrow_mut().insert(id, Some(conn)),
                    // Try again on a later call.
                    None => m.borrow_mut().remove(&id),
                });
            });
        }
        own.unwrap_or_else(|| self.conn.clone())
    }

    async fn run<T: redis::FromRedisValue>(&self, pipe: redis::Pipeline) -> Result<T, DedupeError> {
        let mut conn = self.conn();
        let Ok(result) = tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut conn)).await
        else {
            // Slow, not dead: another connection would only add to Redis's load.
            return Err(DedupeError("Redis did not answer in time".into()));
        };
        let result = result.map_err(|e| DedupeError(e.to_string()));
        if result.is_err() {
            // A thread may outlive the runtime its connection's driver ran on, and so may the
            // shared connection's. Connect afresh now, on this runtime, so the next call does
            // not meet a dead connection again (a connect started in the background might not
            // have run yet). This call still fails: its request gets 503 and is retried.
            let fresh = connect_redis(&self.client, self.timeout).await.ok();
            THREAD_CONNS.with(|m| {
                let mut m = m.borrow_mut();
                match fresh {
                    Some(conn) => m.insert(self.id, Some(conn)),
                    None => m.remove(&self.id),
                }
            });
        }
        result
    }

    async fn claim(&self, jobs: &[KeyedJob]) -> Result<Vec<Claim>, DedupeError> {
        // Per key `SET NX` (atomic: only one request can claim it) then `GET` (what the key
        // holds). Two plain commands cost Redis about a third of one Lua `EVAL` (2.4 + 1.1
        // against 9.8 µs here), and need no Redis 7 (`SET NX GET`).
        let mut pipe = redis::pipe();
        for job in jobs {
            let key = self.key(&job.key);
            pipe.cmd("SET")
                .arg(&key)
                .arg(format!("{PENDING}{}", job.job_id))
                .arg("NX")
                .arg("PX")
                .arg(self.pending_ttl.as_millis() as u64)
                .cmd("GET")
                .arg(key);
        }
        let replies: Vec<(Option<String>, Option<String>)> = self.run(pipe).await?;
        Ok(replies
            .into_iter()
            .zip(jobs)
            .map(|((set, held), job)| match (set, held) {
                (Some(_), _) => Claim::Claimed,
                (None, Some(held)) => parse_value(&held),
                // The key expired between the two commands: someone held it a moment ago,
                // with an unknown outcome. Salesforce retries after a 503.
                (None, None) => Claim::Pending {
                    job_id: job.job_id.clone(),
                },
            })
            .collect())
    }

    async fn confirm(&self, jobs: &[KeyedJob]) -> Result<(), DedupeError> {
        let mut pipe = redis::pipe();
        for job in jobs {
            pipe.cmd("SET")
                .arg(self.key(&job.key))
                .arg(stored_value(job))
                .arg("PX")
                .arg(self.ttl.as_millis() as u64)
                .ignore();
        }
        self.run(pipe).await
    }

    async fn abandon(&self, jobs: &[KeyedJob]) -> Result<(), DedupeError> {
        let mut pipe = redis::pipe();
        for job in jobs {
            pipe.cmd("EVAL")
                .arg(ABANDON)
                .arg(1)
                .arg(self.key(&job.key))
                .arg(format!("{PENDING}{}", job.job_id))
                .ignore();
        }
        self.run(pipe).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(key: &str, id: &str, hash: Option<&str>) -> KeyedJob {
        KeyedJob {
            key: key.into(),
            job_id: id.into(),
            body_hash: hash.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn a_pending_claim_is_never_reported_as_stored() {
        // Arrange
        let d = Dedupe::local(Duration::from_secs(60), Duration::from_secs(30));
        // Act
        let first = d.claim(&[job("k", "a", None)]).await.unwrap();
        let second = d.claim(&[job("k", "b", None)]).await.unwrap();
        // Assert
        assert_eq!(first, vec![Claim::Claimed]);
        assert_eq!(second, vec![Claim::Pending { job_id: "a".into() }]);
    }

    #[tokio::test]
    async fn a_confirmed_key_is_stored_and_an_abandoned_one_is_free() {
        let d = Dedupe::local(Duration::from_secs(60), Duration::from_secs(30));
        d.claim(&[job("k1", "a", Some("h")), job("k2", "b", None)])
            .await
            .unwrap();
        d.confirm(&[job("k1", "a", Some("h"))]).await.unwrap();
        d.abandon(&[job("k2", "b", None)]).await.unwrap();
        let again = d
            .claim(&[job("k1", "c", None), job("k2", "d", None)])
            .await
            .unwrap();
        assert_eq!(
            again,
            vec![
                Claim::Stored {
                    job_id: "a".into(),
                    body_hash: Some("h".into())
                },
                Claim::Claimed
            ]
        );
    }

    #[tokio::test]
    async fn abandoning_does_not_release_someone_elses_claim() {
        let d = Dedupe::local(Duration::from_secs(60), Duration::from_secs(30));
        d.claim(&[job("k", "a", None)]).await.unwrap();
        d.abandon(&[job("k", "b", None)]).await.unwrap();
        assert_eq!(
            d.claim(&[job("k", "c", None)]).await.unwrap(),
            vec![Claim::Pending { job_id: "a".into() }]
        );
    }

    #[tokio::test]
    async fn expired_keys_are_claimable_and_purged() {
        let d = Dedupe::local(Duration::ZERO, Duration::ZERO);
        d.claim(&[job("k", "a", None)]).await.unwrap();
        assert_eq!(d.purge_expired(), 1);
        assert_eq!(
            d.claim(&[job("k", "b", None)]).await.unwrap(),
            vec![Claim::Claimed]
        );
    }

    #[test]
    fn stored_values_round_trip() {
        assert_eq!(
            parse_value(&stored_value(&job("k", "id-1", Some("abc")))),
            Claim::Stored {
                job_id: "id-1".into(),
                body_hash: Some("abc".into())
            }
        );
        assert_eq!(
            parse_value("pending:id-2"),
            Claim::Pending {
                job_id: "id-2".into()
            }
        );
    }
}
