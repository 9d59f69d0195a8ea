//! Rate limits per destination (`[[limits]]`): a generic cell rate algorithm (GCRA) whose
//! state every worker shares, so ten processes together stay under one limit. The state
//! lives in Redis on RabbitMQ (one Lua script per decision, on Redis's clock), in the queue
//! file on the embedded backend (one write transaction per decision, so it survives a
//! restart and every process on the file shares it), and in process memory on RabbitMQ
//! without Redis. It only answers "go" or "wait"; the worker gives a waiting job back.
//! A `Retry-After` from a limited destination stops calls to it, for every worker, until then.

use crate::queue::Queue;
use crate::settings::{RouteSettings, Settings, SettingsError};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `[[limits]]`: one rate limit, shared by every route sending to `host` (or by `routes`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// The destination's authority as written in the route URLs: `acme.centercode.com`, or
    /// `host:port` when the URL has a port. Every route sending there shares the limit.
    #[serde(default)]
    pub host: Option<String>,
    /// Instead of `host`: the routes (by name) that share the limit.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    /// Requests per second, sustained (may be fractional: 0.5 is one every two seconds).
    pub rate: f64,
    /// Requests that may go back to back after a quiet spell (at least 1).
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_burst() -> u32 {
    1
}

/// The authority of a route URL as an operator writes it in `[[limits]]`: the host, with
/// `:port` when the URL names one (`None` when the URL does not parse).
pub fn authority(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?.to_ascii_lowercase();
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// The `[[limits]]` rules: rate > 0, burst ≥ 1, exactly one of `host`/`routes`, a host some
/// route sends to, known routes, and no route under two limits (which one would it obey?).
pub fn validate(limits: &[LimitSettings], routes: &[RouteSettings]) -> Result<(), SettingsError> {
    let err = |i: usize, k: &str, m: String| SettingsError {
        key: format!("limits[{i}].{k}"),
        message: m,
    };
    let mut limited: HashMap<&str, usize> = HashMap::new();
    for (i, limit) in limits.iter().enumerate() {
        // Beyond 1e6/s the interval rounds to 0 µs: no limit at all.
        if !limit.rate.is_finite() || limit.rate <= 0.0 || limit.rate > 1_000_000.0 {
            return Err(err(
                i,
                "rate",
                "expected requests per second, more than 0 and at most 1000000".into(),
            ));
        }
        if limit.burst == 0 || limit.burst > 1_000_000 {
            return Err(err(i, "burst", "expected 1 to 1000000".into()));
        }
        let members: Vec<&str> = match (&limit.host, &limit.routes) {
            (Some(host), None) => {
                let host = host.to_ascii_lowercase();
                let members: Vec<&str> = routes
                    .iter()
                    .filter(|r| authority(&r.url).as_deref() == Some(host.as_str()))
                    .map(|r| r.name.as_str())
                    .collect();
                if members.is_empty() {
                    let known: Vec<String> =
                        routes.iter().filter_map(|r| authority(&r.url)).collect();
                    return Err(err(i, "host", format!("no route sends to `{host}`; route URLs name {known:?} (write host:port when the URL has a port)")));
                }
                members
            }
            (None, Some(names)) if !names.is_empty() => {
                for name in names {
                    if !routes.iter().any(|r| &r.name == name) {
                        return Err(err(i, "routes", format!("no route is named `{name}`")));
                    }
                }
                names.iter().map(String::as_str).collect()
            }
            _ => {
                return Err(err(
                    i,
                    "host",
                    "expected exactly one of `host` or a non-empty `routes`".into(),
                ))
            }
        };
        for route in members {
            if let Some(j) = limited.insert(route, i) {
                return Err(err(
                    i,
                    if limit.host.is_some() {
                        "host"
                    } else {
                        "routes"
                    },
                    format!(
                        "route `{route}` is already under limits[{j}]; a route obeys one limit"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// One configured limit, as the worker applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The store key and the metrics label: the host, or `routes:a+b`.
    pub name: String,
    /// Microseconds between requests at the sustained rate.
    pub interval_us: i64,
    pub burst: u32,
}

/// How far ahead a request may take a place under the limit and wait for it in the worker
/// (without a call slot). Further ahead, the job goes back to the queue: this bounds the
/// jobs a worker keeps waiting to about `rate × HORIZON`, so a busy limit cannot take up
/// the leases other destinations' jobs need.
pub const HORIZON: Duration = Duration::from_millis(500);

/// The store's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// With `placed`: go after this long (0: now). Without: come back after this long.
    pub wait_us: i64,
    /// The request took a place under the limit (it is counted; it must not ask again).
    pub placed: bool,
    /// Requests that could still go at once after this one (the burst remaining).
    pub allowance: u32,
}

/// One limit's state: the theoretical arrival time of the next request (TAT), and the end of
/// a stop asked for with `Retry-After`. Microseconds since the epoch. The Redis scripts in
/// `crate::queue::dedupe` are this logic in Lua, so the stores agree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    pub tat_us: i64,
    pub slowed_until_us: i64,
}

impl Gcra {
    /// A request at `now`: it may go once the TAT is at most `burst - 1` intervals ahead.
    /// When that is at most `horizon_us` away it takes its place (the TAT moves one interval
    /// on) and is told when to go; further away it changes nothing (waiting costs no
    /// capacity) and is told when to ask again.
    pub fn acquire(&mut self, now: i64, interval: i64, burst: u32, horizon_us: i64) -> Answer {
        if self.slowed_until_us > now {
            return Answer {
                wait_us: self.slowed_until_us - now,
                placed: false,
                allowance: 0,
            };
        }
        let tolerance = (i64::from(burst) - 1) * interval;
        let base = self.tat_us.max(now);
        let wait = base - now - tolerance;
        if wait > horizon_us {
            return Answer {
                wait_us: wait - horizon_us,
                placed: false,
                allowance: 0,
            };
        }
        self.tat_us = base + interval;
        Answer {
            wait_us: wait.max(0),
            placed: true,
            allowance: ((i64::from(burst) * interval - (self.tat_us - now)) / interval).max(0)
                as u32,
        }
    }

    /// The destination said "not before `now + for_us`": nothing goes until then, and then
    /// at the sustained rate without a burst (the TAT is moved past the stop).
    pub fn slow(&mut self, now: i64, for_us: i64, interval: i64, burst: u32) {
        let until = now + for_us;
        self.slowed_until_us = self.slowed_until_us.max(until);
        self.tat_us = self.tat_us.max(until + (i64::from(burst) - 1) * interval);
    }
}

fn horizon_us() -> i64 {
    HORIZON.as_micros() as i64
}

/// Microseconds since the epoch.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The limits of one process's workers, and the memory state where no shared store exists.
#[derive(Default)]
pub struct RateLimiter {
    by_route: HashMap<String, Arc<Limit>>,
    /// The state on RabbitMQ without Redis: this process only (the embedded queue keeps it
    /// in its file, RabbitMQ with Redis in Redis).
    local: Mutex<HashMap<String, Gcra>>,
    /// When jobs given back for a limit come due (earliest first), so the lease loop looks
    /// again then instead of after its poll interval.
    due: Mutex<std::collections::BinaryHeap<std::cmp::Reverse<Instant>>>,
}

impl RateLimiter {
    /// The limits configured in `settings` (validated already).
    pub fn new(settings: &Settings) -> Self {
        let mut by_route = HashMap::new();
        for l in &settings.limits {
            let (name, members): (String, Vec<String>) = match (&l.host, &l.routes) {
                (Some(host), _) => {
                    let host = host.to_ascii_lowercase();
                    let members = settings
                        .routes
                        .iter()
                        .filter(|r| authority(&r.url).as_deref() == Some(host.as_str()))
                        .map(|r| r.name.clone())
                        .collect();
                    (host, members)
                }
                (None, Some(routes)) => (format!("routes:{}", routes.join("+")), routes.clone()),
                (None, None) => continue,
            };
            let limit = Arc::new(Limit {
                name,
                interval_us: ((1_000_000.0 / l.rate).round() as i64).max(1),
                burst: l.burst.max(1),
            });
            for route in members {
                by_route.insert(route, limit.clone());
            }
        }
        Self {
            by_route,
            ..Self::default()
        }
    }

    /// The limit `route` obeys, if any.
    pub fn limit_for(&self, route: &str) -> Option<Arc<Limit>> {
        self.by_route.get(route).cloned()
    }

    /// May one request under `limit` go now? Atomic in whichever store holds the state.
    pub async fn acquire(
        &self,
        queue: &Queue,
        limit: &Limit,
    ) -> Result<Answer, crate::queue::QueueError> {
        if let Queue::Embedded(q) = queue {
            let (interval, burst) = (limit.interval_us, limit.burst);
            return q
                .rate_update(limit.name.clone(), move |g| {
                    g.acquire(now_us(), interval, burst, horizon_us())
                })
                .await;
        }
        if let Some(shared) = shared_store(queue) {
            if let Some(answer) = shared
                .rate_acquire(&limit.name, limit.interval_us, limit.burst, horizon_us())
                .await
                .map_err(|e| crate::queue::QueueError::Dedupe(e.0))?
            {
                return Ok(answer);
            }
        }
        let mut local = self.local.lock().expect("rate limit lock");
        Ok(local.entry(limit.name.clone()).or_default().acquire(
            now_us(),
            limit.interval_us,
            limit.burst,
            horizon_us(),
        ))
    }

    /// How long a `Retry-After` still stops requests under `limit` (zero: not stopped).
    /// Asked by a job that waited for its place, since a stop may have come meanwhile.
    pub async fn stopped_for(
        &self,
        queue: &Queue,
        limit: &Limit,
    ) -> Result<Duration, crate::queue::QueueError> {
        let left_us = match (queue, shared_store(queue)) {
            (Queue::Embedded(q), _) => Some(
                q.rate_state(limit.name.clone())
                    .await?
                    .map_or(0, |g| g.slowed_until_us - now_us()),
            ),
            (_, Some(shared)) => shared
                .rate_stopped(&limit.name)
                .await
                .map_err(|e| crate::queue::QueueError::Dedupe(e.0))?,
            _ => None,
        };
        let left_us = left_us.unwrap_or_else(|| {
            let local = self.local.lock().expect("rate limit lock");
            local
                .get(&limit.name)
                .map_or(0, |g| g.slowed_until_us - now_us())
        });
        Ok(Duration::from_micros(left_us.max(0) as u64))
    }

    /// The destination asked for `pause` (`Retry-After`): every worker sharing the state
    /// holds its calls under `limit` until then.
    pub async fn slow(
        &self,
        queue: &Queue,
        limit: &Limit,
        pause: Duration,
    ) -> Result<(), crate::queue::QueueError> {
        let for_us = pause.as_micros().min(i64::MAX as u128) as i64;
        if let Queue::Embedded(q) = queue {
            let (interval, burst) = (limit.interval_us, limit.burst);
            return q
                .rate_update(limit.name.clone(), move |g| {
                    g.slow(now_us(), for_us, interval, burst)
                })
                .await;
        }
        if let Some(shared) = shared_store(queue) {
            if shared
                .rate_slow(&limit.name, for_us, limit.interval_us, limit.burst)
                .await
                .map_err(|e| crate::queue::QueueError::Dedupe(e.0))?
            {
                return Ok(());
            }
        }
        let mut local = self.local.lock().expect("rate limit lock");
        local.entry(limit.name.clone()).or_default().slow(
            now_us(),
            for_us,
            limit.interval_us,
            limit.burst,
        );
        Ok(())
    }

    /// A job was given back until `at`.
    pub fn note_due(&self, at: Instant) {
        let mut due = self.due.lock().expect("rate limit lock");
        // Bounded: past this many, the poll interval is the fallback.
        if due.len() < 100_000 {
            due.push(std::cmp::Reverse(at));
        }
    }

    /// How long until the next job given back for a limit comes due (`None`: none waits).
    pub fn until_next_due(&self) -> Option<Duration> {
        let mut due = self.due.lock().expect("rate limit lock");
        let now = Instant::now();
        while let Some(std::cmp::Reverse(at)) = due.peek().copied() {
            if at > now {
                return Some(at - now);
            }
            due.pop();
        }
        None
    }
}

/// Where state shared by every process lives: Redis, on RabbitMQ with `queue.redis_url`.
fn shared_store(queue: &Queue) -> Option<&crate::queue::dedupe::Dedupe> {
    match queue {
        Queue::Rabbit(q) if q.shares_control_state() => Some(q.dedupe()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn a_burst_goes_at_once_then_requests_are_spaced_by_the_interval() {
        // Arrange: 10/s, burst 3.
        let (interval, mut g) = (S / 10, Gcra::default());
        let now = 100 * S;
        // Act / Assert: no horizon, so a request either goes now or takes no place.
        let answers: Vec<Answer> = (0..4).map(|_| g.acquire(now, interval, 3, 0)).collect();
        assert_eq!(
            answers
                .iter()
                .map(|a| (a.allowance, a.placed))
                .collect::<Vec<_>>(),
            [(2, true), (1, true), (0, true), (0, false)]
        );
        assert_eq!(
            answers[3].wait_us, interval,
            "the fourth waits one interval"
        );
        assert_eq!(g.acquire(now + interval, interval, 3, 0).wait_us, 0);
        assert_eq!(g.acquire(now + interval, interval, 3, 0).wait_us, interval);
        // Over a long quiet spell the allowance refills to the burst, not beyond.
        assert_eq!(g.acquire(now + 60 * S, interval, 3, 0).allowance, 2);
    }

    #[test]
    fn within_the_horizon_requests_take_places_one_interval_apart() {
        let (interval, mut g) = (S / 10, Gcra::default());
        let waits: Vec<(i64, bool)> = (0..5)
            .map(|_| g.acquire(0, interval, 1, S / 4))
            .map(|a| (a.wait_us, a.placed))
            .collect();
        // 0, 100 and 200 ms are within 250 ms; the fourth would be 300 ms: ask again in 50.
        assert_eq!(
            waits,
            [
                (0, true),
                (interval, true),
                (2 * interval, true),
                (S / 20, false),
                (S / 20, false)
            ]
        );
    }

    #[test]
    fn a_refused_request_costs_no_capacity() {
        let (interval, mut g) = (S / 2, Gcra::default());
        assert_eq!(g.acquire(0, interval, 1, 0).wait_us, 0);
        let before = g;
        for _ in 0..100 {
            assert!(!g.acquire(1, interval, 1, 0).placed);
        }
        assert_eq!(g, before);
    }

    #[test]
    fn retry_after_stops_every_request_then_resumes_at_the_rate_without_a_burst() {
        let (interval, mut g) = (S / 10, Gcra::default());
        g.slow(0, 2 * S, interval, 5);
        assert_eq!(g.acquire(S, interval, 5, 0).wait_us, S);
        assert!(!g.acquire(S, interval, 5, 10 * S).placed, "not even ahead");
        assert_eq!(g.acquire(2 * S, interval, 5, 0).wait_us, 0);
        assert_eq!(g.acquire(2 * S, interval, 5, 0).wait_us, interval);
        // A shorter Retry-After later does not shorten the stop.
        g.slow(0, S, interval, 5);
        assert_eq!(g.slowed_until_us, 2 * S);
    }

    #[test]
    fn authorities_are_hosts_with_the_port_when_the_url_names_one() {
        assert_eq!(
            authority("https://Acme.Centercode.com/api/v1/x").as_deref(),
            Some("acme.centercode.com")
        );
        assert_eq!(
            authority("http://127.0.0.1:8081/api").as_deref(),
            Some("127.0.0.1:8081")
        );
        assert_eq!(authority("not a url"), None);
    }
}
