//! Operator controls shared by the gateway and the workers: which routes are paused.

use std::collections::BTreeSet;
use std::sync::RwLock;

/// Paused routes (by an operator, or by the relay itself after a 401/403) and each route's
/// circuit breaker: workers do not take those jobs, which wait with their attempts untouched.
#[derive(Debug, Default)]
pub struct RouteControl {
    paused: RwLock<BTreeSet<String>>,
    /// When this process last changed its mind about each route (ms since the epoch).
    since: RwLock<std::collections::HashMap<String, i64>>,
    pub breaker: CircuitBreaker,
}

impl RouteControl {
    pub fn new(breaker: CircuitBreaker) -> Self {
        Self {
            paused: RwLock::default(),
            since: RwLock::default(),
            breaker,
        }
    }

    /// Routes whose circuit is open (their jobs wait a short while, then one probes).
    pub fn blocked(&self) -> Vec<String> {
        self.breaker.blocked()
    }

    /// What this process believes about each of `routes`, and since when.
    pub fn beliefs(
        &self,
        routes: &[String],
    ) -> std::collections::BTreeMap<String, crate::shared_control::Belief> {
        let paused = self.paused.read().expect("control lock");
        let since = self.since.read().expect("control lock");
        routes
            .iter()
            .map(|r| {
                (
                    r.clone(),
                    crate::shared_control::Belief {
                        paused: paused.contains(r),
                        since_ms: since.get(r).copied().unwrap_or(0),
                    },
                )
            })
            .collect()
    }

    pub fn is_paused(&self, route: &str) -> bool {
        self.paused.read().expect("control lock").contains(route)
    }

    pub fn paused(&self) -> Vec<String> {
        self.paused
            .read()
            .expect("control lock")
            .iter()
            .cloned()
            .collect()
    }

    /// This process's belief only; [`crate::shared_control::set_paused`] changes it for
    /// every process. Returns whether the belief changed.
    pub fn set_paused(&self, route: &str, paused: bool) -> bool {
        let set = self.paused.write().expect("control lock");
        self.set_paused_locked(set, route, paused)
    }

    /// Apply a shared record read at `read_at_ms`, unless this process changed its belief
    /// since (an admin call or an automatic pause is newer than what was read). The check
    /// and the change happen under one lock: a pause made between them is never undone.
    /// Returns whether the belief changed.
    pub fn apply_shared(&self, route: &str, paused: bool, read_at_ms: i64) -> bool {
        let set = self.paused.write().expect("control lock");
        let changed_here = self
            .since
            .read()
            .expect("control lock")
            .get(route)
            .is_some_and(|&since| since >= read_at_ms);
        if changed_here {
            return false;
        }
        self.set_paused_locked(set, route, paused)
    }

    fn set_paused_locked(
        &self,
        mut set: std::sync::RwLockWriteGuard<'_, BTreeSet<String>>,
        route: &str,
        paused: bool,
    ) -> bool {
        let changed = if paused {
            set.insert(route.to_owned())
        } else {
            set.remove(route)
        };
        if changed || !self.since.read().expect("control lock").contains_key(route) {
            self.since
                .write()
                .expect("control lock")
                .insert(route.to_owned(), crate::queue::now_ms());
        }
        changed
    }
}

/// Per-route circuit breaker: after `threshold` consecutive transient failures (timeouts,
/// 5xx, connection errors) the route is skipped for `cooldown` instead of spending retry
/// attempts; then one job probes, and its result closes or reopens the circuit.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: std::time::Duration,
    routes: std::sync::Mutex<std::collections::HashMap<String, Circuit>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Circuit {
    failures: u32,
    open_until: Option<std::time::Instant>,
    probe_in_flight: bool,
}

/// The state of one route's circuit, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self::new(5, std::time::Duration::from_secs(30))
    }
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: std::time::Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            routes: Default::default(),
        }
    }

    /// Whether a job of `route` may be sent now; a half-open circuit admits one probe.
    pub fn admit(&self, route: &str) -> bool {
        let mut routes = self.routes.lock().expect("breaker lock");
        let c = routes.entry(route.to_owned()).or_default();
        match c.open_until {
            None => true,
            Some(until) if std::time::Instant::now() < until => false,
            Some(_) if c.probe_in_flight => false,
            Some(_) => {
                c.probe_in_flight = true;
                true
            }
        }
    }

    /// Routes whose jobs should not be leased right now.
    pub fn blocked(&self) -> Vec<String> {
        let now = std::time::Instant::now();
        let routes = self.routes.lock().expect("breaker lock");
        routes
            .iter()
            .filter(|(_, c)| {
                c.open_until
                    .is_some_and(|until| now < until || c.probe_in_flight)
            })
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Record a delivery result: `Some(true)` success, `Some(false)` transient failure,
    /// `None` an answer that says nothing about Centercode's health (e.g. a 400).
    pub fn record(&self, route: &str, healthy: Option<bool>) {
        let mut routes = self.routes.lock().expect("breaker lock");
        let c = routes.entry(route.to_owned()).or_default();
        let was_probe = std::mem::take(&mut c.probe_in_flight);
        match healthy {
            Some(true) => *c = Circuit::default(),
            // Any answer to a probe shows Centercode is up again.
            None if was_probe => *c = Circuit::default(),
            None => {}
            Some(false) => {
                c.failures += 1;
                if was_probe || c.failures >= self.threshold {
                    tracing::warn!(route, failures = c.failures, "circuit open: Centercode keeps failing; holding this route's jobs for a cool-down");
                    c.open_until = Some(std::time::Instant::now() + self.cooldown);
                }
            }
        }
    }

    pub fn state(&self, route: &str) -> CircuitState {
        let routes = self.routes.lock().expect("breaker lock");
        match routes
            .get(route)
            .and_then(|c| c.open_until.map(|u| (u, c.probe_in_flight)))
        {
            None => CircuitState::Closed,
            Some((until, probing)) if std::time::Instant::now() < until && !probing => {
                CircuitState::Open
            }
            Some(_) => CircuitState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_shared_record_read_before_a_local_change_does_not_undo_it() {
        let control = RouteControl::default();
        // A refresh starts reading; an admin pause lands here before the read is applied.
        let read_at = crate::queue::now_ms();
        assert!(control.set_paused("r", true));
        assert!(
            !control.apply_shared("r", false, read_at),
            "the stale read is ignored"
        );
        assert!(control.is_paused("r"));
        // The next refresh, started after the change, applies what it reads.
        let later = control.beliefs(&["r".to_owned()])["r"].since_ms + 1;
        assert!(control.apply_shared("r", false, later));
        assert!(!control.is_paused("r"));
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_once() {
        let b = CircuitBreaker::new(3, Duration::from_millis(30));
        for _ in 0..2 {
            assert!(b.admit("r"));
            b.record("r", Some(false));
        }
        assert_eq!(b.state("r"), CircuitState::Closed);
        assert!(b.admit("r"));
        b.record("r", Some(false));
        assert_eq!(b.state("r"), CircuitState::Open);
        assert!(!b.admit("r"));
        assert_eq!(b.blocked(), vec!["r".to_owned()]);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while b.state("r") == CircuitState::Open {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        assert!(b.admit("r"), "one probe after the cool-down");
        assert!(!b.admit("r"), "only one");
        b.record("r", Some(true));
        assert_eq!(b.state("r"), CircuitState::Closed);
        assert!(b.admit("r"));
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = CircuitBreaker::new(1, Duration::ZERO);
        b.record("r", Some(false));
        assert!(b.admit("r"));
        b.record("r", Some(false));
        assert_ne!(b.state("r"), CircuitState::Closed);
        b.record("other", None);
        assert_eq!(b.state("other"), CircuitState::Closed);
    }
}
