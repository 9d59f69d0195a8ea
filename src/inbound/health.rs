//! Liveness (the process answers), readiness (the queue accepts writes) and `/metrics`.

use super::AppState;
use crate::metrics::Metrics;
use actix_web::{web, HttpResponse};
use std::fmt::Write;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A readiness result younger than this is reused by `/metrics` instead of writing again.
const READY_REUSE: Duration = Duration::from_secs(1);
/// How long `/metrics` waits for its own readiness check (`/health/ready` waits 3 s).
const METRICS_READY_TIMEOUT: Duration = Duration::from_millis(500);

/// The last readiness result of each running app, keyed by its metrics registry (the weak
/// reference keeps the address from being reused while the entry exists).
type LastReady = Vec<(Weak<Metrics>, Instant, bool)>;
static LAST_READY: Mutex<LastReady> = Mutex::new(Vec::new());

fn remember_ready(app: &Arc<Metrics>, ready: bool) {
    let mut last = LAST_READY.lock().expect("readiness lock");
    last.retain(|(w, ..)| w.strong_count() > 0 && w.as_ptr() != Arc::as_ptr(app));
    last.push((Arc::downgrade(app), Instant::now(), ready));
}

fn recent_ready(app: &Arc<Metrics>) -> Option<bool> {
    let last = LAST_READY.lock().expect("readiness lock");
    last.iter()
        .find(|(w, at, _)| w.as_ptr() == Arc::as_ptr(app) && at.elapsed() < READY_REUSE)
        .map(|(.., ready)| *ready)
}

pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "live"}))
}

pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let result = tokio::time::timeout(Duration::from_secs(3), state.queue.check_writable()).await;
    remember_ready(&state.metrics, matches!(result, Ok(Ok(()))));
    match result {
        Ok(Ok(())) => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check failed");
            HttpResponse::ServiceUnavailable().json(serde_json::json!({"status": "not_ready", "reason": "queue does not accept writes"}))
        }
        Err(_) => HttpResponse::ServiceUnavailable()
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
    match state.queue.stats().await {
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
    // store; reuses a check made within the last second rather than writing on every scrape.
    let ready = match recent_ready(&state.metrics) {
        Some(ready) => ready,
        None => {
            let check = tokio::time::timeout(METRICS_READY_TIMEOUT, state.queue.check_writable());
            let ready = matches!(check.await, Ok(Ok(())));
            remember_ready(&state.metrics, ready);
            ready
        }
    };
    let mut body = m.render();
    let _ = writeln!(
        body,
        "# HELP relay_ready 1 when the queue accepts writes (as /health/ready), 0 otherwise.\n\
         # TYPE relay_ready gauge\nrelay_ready {}",
        u8::from(ready)
    );
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}
