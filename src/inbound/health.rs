//! Liveness (the process answers), readiness (the queue accepts writes) and `/metrics`.

use super::AppState;
use actix_web::{web, HttpResponse};
use std::time::Duration;

pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "live"}))
}

pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    match tokio::time::timeout(Duration::from_secs(3), state.queue.check_writable()).await {
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
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(m.render())
}
