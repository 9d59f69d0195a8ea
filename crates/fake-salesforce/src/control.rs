//! The `/__fake/...` control plane: the same operations as the Rust handle, over HTTP, for the
//! standalone binary. Each route is a thin wrapper over the shared state; no logic of its own.

use actix_web::{web, HttpResponse};
use serde_json::{json, Map, Value};

use crate::configuration::FakeSalesforceConfig;
use crate::faults::{Fault, RecordRule};
use crate::state::{ApiUsage, Shared, State};

/// Registers every control route under `/__fake`.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/__fake")
            .route("/reset", web::post().to(reset))
            .route("/config", web::get().to(get_config))
            .route("/config", web::put().to(put_config))
            .route("/records/{sobject}", web::get().to(get_records))
            .route("/records/{sobject}", web::post().to(insert_record))
            .route("/writes", web::get().to(writes))
            .route("/counters", web::get().to(counters))
            .route("/revoke-tokens", web::post().to(revoke_tokens))
            .route("/api-usage", web::put().to(put_api_usage))
            .route("/faults", web::post().to(push_fault))
            .route("/faults", web::delete().to(clear_faults))
            .route("/record-rules", web::post().to(push_rule))
            .route("/record-rules", web::delete().to(clear_rules)),
    );
}

/// Applies a new configuration: API usage restarts from its values; records, tokens, writes,
/// faults and rules are kept.
pub(crate) fn apply_config(st: &mut State, config: FakeSalesforceConfig) -> Result<(), String> {
    config.validate()?;
    st.usage = ApiUsage {
        used: config.api_used,
        allocation: config.api_allocation,
    };
    st.config = config;
    Ok(())
}

async fn reset(shared: web::Data<Shared>) -> HttpResponse {
    *shared.lock() = State::new(shared.startup.clone());
    HttpResponse::Ok().json(json!({"ok": true}))
}

async fn get_config(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(&shared.lock().config)
}

async fn put_config(
    shared: web::Data<Shared>,
    config: web::Json<FakeSalesforceConfig>,
) -> HttpResponse {
    let mut st = shared.lock();
    match apply_config(&mut st, config.into_inner()) {
        Ok(()) => HttpResponse::Ok().json(&st.config),
        Err(e) => HttpResponse::BadRequest().json(json!({"error": e})),
    }
}

async fn get_records(shared: web::Data<Shared>, sobject: web::Path<String>) -> HttpResponse {
    HttpResponse::Ok().json(shared.lock().records(&sobject))
}

async fn insert_record(
    shared: web::Data<Shared>,
    sobject: web::Path<String>,
    fields: web::Json<Map<String, Value>>,
) -> HttpResponse {
    let id = shared.lock().insert(&sobject, fields.into_inner());
    HttpResponse::Ok().json(json!({"id": id}))
}

async fn writes(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(shared.lock().writes())
}

async fn counters(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(shared.lock().counters())
}

async fn revoke_tokens(shared: web::Data<Shared>) -> HttpResponse {
    shared.lock().revoke_tokens();
    HttpResponse::Ok().json(json!({"ok": true}))
}

async fn put_api_usage(shared: web::Data<Shared>, usage: web::Json<ApiUsage>) -> HttpResponse {
    let usage = usage.into_inner();
    shared.lock().usage = usage;
    HttpResponse::Ok().json(usage)
}

async fn push_fault(shared: web::Data<Shared>, fault: web::Json<Fault>) -> HttpResponse {
    let mut st = shared.lock();
    st.faults.push_back(fault.into_inner());
    HttpResponse::Ok().json(json!({"queued": st.faults.len()}))
}

async fn clear_faults(shared: web::Data<Shared>) -> HttpResponse {
    shared.lock().faults.clear();
    HttpResponse::Ok().json(json!({"queued": 0}))
}

async fn push_rule(shared: web::Data<Shared>, rule: web::Json<RecordRule>) -> HttpResponse {
    let mut st = shared.lock();
    st.rules.push(rule.into_inner());
    HttpResponse::Ok().json(json!({"rules": st.rules.len()}))
}

async fn clear_rules(shared: web::Data<Shared>) -> HttpResponse {
    shared.lock().rules.clear();
    HttpResponse::Ok().json(json!({"rules": 0}))
}
