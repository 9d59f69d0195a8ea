//! Liveness (the process answers) and readiness (the queue accepts writes).

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
