//! Liveness (the process answers), readiness (the queue accepts writes) and `/metrics`.

use super::AppState;
use crate::queue::{Queue, QueueStats};
use actix_web::{web, HttpResponse};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long `/metrics` waits for its own readiness check (`/health/ready` waits 3 s).
const METRICS_READY_TIMEOUT: Duration = Duration::from_millis(500);
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// Recent queue readings: `/metrics` and `/health/ready` reuse one younger than
/// `server.probe_cache_ms`, so however often they are scraped or probed, the queue sees at
/// most one depth reading (a table aggregate, or broker declares) and one write check (an
/// fsync) per period. Concurrent callers wait for the one reading in progress.
pub struct ProbeCache {
    ttl: Duration,
    stats: tokio::sync::Mutex<Option<(Instant, QueueStats)>>,
    ready: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
    stats_reads: AtomicU64,
    ready_checks: AtomicU64,
}

/// The outcome of a write check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Ready,
    Refused,
    TimedOut,
}

impl ProbeCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            stats: tokio::sync::Mutex::new(None),
            ready: tokio::sync::Mutex::new(None),
            stats_reads: AtomicU64::new(0),
            ready_checks: AtomicU64::new(0),
        }
    }

    async fn stats(&self, queue: &Queue) -> Result<QueueStats, crate::queue::QueueError> {
        let mut cached = self.stats.lock().await;
        if let Some((at, stats)) = cached.as_ref() {
            if at.elapsed() < self.ttl {
                return Ok(stats.clone());
            }
        }
        self.stats_reads.fetch_add(1, Ordering::Relaxed);
        let stats = queue.stats().await?;
        *cached = Some((Instant::now(), stats.clone()));
        Ok(stats)
    }

    async fn readiness(&self, queue: &Queue, timeout: Duration) -> Readiness {
        let mut cached = self.ready.lock().await;
        if let Some((at, ready)) = *cached {
            if at.elapsed() < self.ttl {
                return ready;
            }
        }
        self.ready_checks.fetch_add(1, Ordering::Relaxed);
        let ready = match tokio::time::timeout(timeout, queue.check_writable()).await {
            Ok(Ok(())) => Readiness::Ready,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness check failed");
                Readiness::Refused
            }
            Err(_) => Readiness::TimedOut,
        };
        *cached = Some((Instant::now(), ready));
        ready
    }
}

pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "live"}))
}

pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    match state.probes.readiness(&state.queue, READY_TIMEOUT).await {
        Readiness::Ready => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        Readiness::Refused => HttpResponse::ServiceUnavailable().json(
            serde_json::json!({"status": "not_ready", "reason": "queue does not accept writes"}),
        ),
        Readiness::TimedOut => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"status": "not_ready", "reason": "queue write timed out"})),
    }
}

/// Prometheus metrics; queue depths are read from the queue at scrape time.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let m = &state.metrics;
    m.set(
        "relay_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    for route in &state.settings.routes {
        let paused = if state.control.is_paused(&route.name) {
            1.0
        } else {
            0.0
        };
        m.set(
            "relay_route_paused",
            &[("route", route.name.as_str())],
            paused,
        );
        let open = state.control.breaker.state(&route.name) != crate::control::CircuitState::Closed;
        m.set(
            "relay_circuit_open",
            &[("route", route.name.as_str())],
            if open { 1.0 } else { 0.0 },
        );
    }
    match state.probes.stats(&state.queue).await {
        Ok(s) => {
            let high = s.ready + s.retrying > state.settings.queue.depth_warning;
            m.set(
                "relay_queue_backlog_high",
                &[],
                if high { 1.0 } else { 0.0 },
            );
            let now = crate::queue::now_ms();
            let age = |t: Option<i64>| t.map(|t| ((now - t).max(0)) as f64 / 1000.0).unwrap_or(0.0);
            for (name, depth, oldest) in [
                ("ready", s.ready, s.oldest_ready_ms),
                ("in_flight", s.in_flight, s.oldest_in_flight_ms),
                ("retrying", s.retrying, s.oldest_retrying_ms),
                ("parked", s.parked, s.oldest_parked_ms),
                ("held", s.held, None),
            ] {
                m.set("relay_queue_depth", &[("state", name)], depth as f64);
                m.set(
                    "relay_queue_oldest_age_seconds",
                    &[("state", name)],
                    age(oldest),
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read queue depths for /metrics"),
    }
    // `relay_ready`: what `/health/ready` answers, so alerts see a relay that is up but cannot
    // store; from the same cached check, never a write per scrape.
    let ready = state
        .probes
        .readiness(&state.queue, METRICS_READY_TIMEOUT)
        .await
        == Readiness::Ready;
    let mut body = m.render();
    let _ = writeln!(
        body,
        "# HELP relay_ready 1 when the queue accepts writes (as /health/ready), 0 otherwise.\n\
         # TYPE relay_ready gauge\nrelay_ready {}",
        u8::from(ready)
    );
    let _ = writeln!(
        body,
        "# HELP relay_probe_queue_reads_total Queue depth readings and write checks made for /metrics and /health/ready (at most one of each per server.probe_cache_ms).\n\
         # TYPE relay_probe_queue_reads_total counter\n\
         relay_probe_queue_reads_total{{probe=\"stats\"}} {}\n\
         relay_probe_queue_reads_total{{probe=\"readiness\"}} {}",
        state.probes.stats_reads.load(Ordering::Relaxed),
        state.probes.ready_checks.load(Ordering::Relaxed)
    );
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}
