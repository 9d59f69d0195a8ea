//! The HTTP gateway: routes, request ids, bounded body reading, and health endpoints.
//! Handlers check and store; they never call Centercode.

pub mod callout;
pub mod health;
pub mod salesforce;
pub mod soap;
pub mod webhook;

use crate::queue::Queue;
use crate::settings::Settings;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use futures_util::{FutureExt, StreamExt};
use sha2::Digest;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shared state of the gateway.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub queue: Queue,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub control: Arc<crate::control::RouteControl>,
    /// `server.max_concurrent_requests` permits, taken once a body has arrived (a slow sender
    /// holds a connection, never a processing slot).
    pub request_slots: Arc<tokio::sync::Semaphore>,
    /// Address ranges parsed once at start, not on every request.
    pub networks: Arc<Networks>,
    /// Recent queue readings shared by `/metrics` and `/health/ready`.
    pub probes: Arc<health::ProbeCache>,
    /// The console's samples and logged-out sessions.
    pub console: Arc<crate::console::Console>,
}

/// `server.trusted_proxies` and each route's `allowed_ips`, parsed.
#[derive(Debug, Default)]
pub struct Networks {
    pub trusted_proxies: Vec<crate::netaddr::IpNet>,
    pub allowed: std::collections::HashMap<String, Vec<crate::netaddr::IpNet>>,
}

impl Networks {
    /// Validation has already refused bad entries, so parsing cannot fail here.
    pub fn from_settings(settings: &Settings) -> Self {
        let parse = |list: &[String]| crate::netaddr::parse_list(list).unwrap_or_default();
        Self {
            trusted_proxies: parse(&settings.server.trusted_proxies),
            allowed: settings
                .routes
                .iter()
                .filter(|r| !r.allowed_ips.is_empty())
                .map(|r| (r.name.clone(), parse(&r.allowed_ips)))
                .collect(),
        }
    }
}

/// The id of one inbound request, echoed in `X-Request-Id` and in every log line about it.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

const REQUEST_ID: &str = "x-request-id";

/// Register every route on an actix `App` (one listener for everything: local development).
pub fn configure(cfg: &mut web::ServiceConfig) {
    configure_salesforce(cfg);
    configure_centercode(cfg);
    cfg.configure(configure_ops);
}

/// The listener Salesforce and Centercode call when `server.ops_bind` is set: inbound routes
/// and health.
pub fn configure_inbound(cfg: &mut web::ServiceConfig) {
    configure_salesforce(cfg);
    configure_centercode(cfg);
    configure_health(cfg);
    cfg.default_service(web::to(not_found));
}

/// Health only (a worker's main listener when `server.ops_bind` is set).
pub fn configure_health_only(cfg: &mut web::ServiceConfig) {
    configure_health(cfg);
    cfg.default_service(web::to(not_found));
}

fn configure_health(cfg: &mut web::ServiceConfig) {
    cfg.route("/health/live", web::get().to(health::live))
        .route("/health/ready", web::get().to(health::ready));
}

fn configure_salesforce(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/salesforce/outbound/{route}")
            .route(web::post().to(salesforce::receive))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/salesforce/outbound/{route}/{token}")
            .route(web::post().to(salesforce::receive_with_token))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/salesforce/callout/{route}")
            .route(web::post().to(callout::receive))
            .default_service(web::to(method_not_allowed)),
    );
}

fn configure_centercode(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/centercode/webhook/{route}")
            .route(web::post().to(webhook::receive))
            .default_service(web::to(method_not_allowed)),
    );
}

/// Health, metrics and the admin API: the ops listener, or all a worker-only process serves.
pub fn configure_ops(cfg: &mut web::ServiceConfig) {
    configure_health(cfg);
    cfg.route("/metrics", web::get().to(health::metrics))
        .configure(crate::admin::configure)
        .configure(crate::console::configure)
        .default_service(web::to(not_found));
}

/// Wrap an app so every response carries a request id and every request is logged once
/// (method, route pattern, status, duration; never bodies, query strings or path tokens).
pub fn request_id_middleware<S, B>(
    req: actix_web::dev::ServiceRequest,
    srv: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse<B>, actix_web::Error>>
where
    S: Service<
        actix_web::dev::ServiceRequest,
        Response = ServiceResponse<B>,
        Error = actix_web::Error,
    >,
{
    let incoming = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned);
    let id = incoming.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let started = Instant::now();
    srv.call(req).map(move |res| {
        res.map(|mut res| {
            let path = loggable_path(res.request());
            if let Ok(value) = HeaderValue::from_str(&id) {
                res.headers_mut()
                    .insert(HeaderName::from_static(REQUEST_ID), value);
            }
            tracing::info!(
                request_id = %id,
                method = %method,
                path = %path,
                status = res.status().as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "request handled"
            );
            res
        })
    })
}

/// The path for the access log: the matched route pattern with only the route name filled
/// in (`/salesforce/outbound/gdpr/{token}`), so a secret path token (or a job id typed into
/// a wrong URL) never reaches the logs. Unmatched paths are not logged verbatim either.
fn loggable_path(req: &HttpRequest) -> String {
    match req.match_pattern() {
        Some(pattern) => match req.match_info().get("route") {
            // Route names are configured names; an unknown one is cut and shown as a name.
            Some(route)
                if route.len() <= 64
                    && route
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                pattern.replace("{route}", route)
            }
            _ => pattern,
        },
        None => "(no matching endpoint)".to_owned(),
    }
}

/// The request id set by the middleware.
pub fn request_id(req: &HttpRequest) -> String {
    req.extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default()
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    let body = if req.path().starts_with("/salesforce/outbound/") {
        soap::render_fault(
            false,
            "method not allowed: Salesforce Outbound Messages are sent with POST",
        )
    } else {
        error_json("method_not_allowed", "use POST")
    };
    let content_type = if req.path().starts_with("/salesforce/outbound/") {
        "text/xml; charset=utf-8"
    } else {
        "application/json"
    };
    HttpResponse::MethodNotAllowed()
        .insert_header(("Allow", "POST"))
        .content_type(content_type)
        .body(body)
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound()
        .content_type("application/json")
        .body(error_json("not_found", "no such endpoint"))
}

/// `{"error":{"code":...,"message":...}}`.
pub fn error_json(code: &str, message: &str) -> String {
    serde_json::json!({"error": {"code": code, "message": message}}).to_string()
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("request body did not arrive in time")]
    Timeout,
    #[error("request body could not be read")]
    Broken,
}

/// The most a body buffer reserves before its bytes arrive.
const INITIAL_BODY_CAPACITY: u64 = 64 * 1024;

/// Read the body, refusing a declared or streamed size above `max` without buffering it,
/// and a body that does not arrive within `timeout` (slow senders).
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    max: usize,
    timeout: Duration,
) -> Result<web::Bytes, BodyError> {
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge(max));
    }
    let read = async {
        // Grow with what arrives: a slow sender declaring a large body must not reserve it.
        let mut body = web::BytesMut::with_capacity(
            declared.unwrap_or(8192).min(INITIAL_BODY_CAPACITY) as usize,
        );
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| BodyError::Broken)?;
            if body.len() + chunk.len() > max {
                return Err(BodyError::TooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| BodyError::Timeout)?
}

/// [`read_body`] within the server's `max_body_bytes` and `body_timeout_ms`.
pub async fn read_body_limited(
    req: &HttpRequest,
    payload: web::Payload,
    server: &crate::settings::ServerSettings,
) -> Result<web::Bytes, BodyError> {
    let timeout = Duration::from_millis(server.body_timeout_ms);
    read_body(req, payload, server.max_body_bytes, timeout).await
}

/// Run a JSON handler that stores at most one job (`Ok` carries whether it was newly stored)
/// with the time its request arrived, count its answer, and hand the answer on.
pub async fn counted<E, F>(
    state: &AppState,
    path: &str,
    handle: impl FnOnce(i64) -> F,
) -> Result<HttpResponse, E>
where
    E: ResponseError,
    F: std::future::Future<Output = Result<(HttpResponse, bool), E>>,
{
    let started = Instant::now();
    let result = handle(crate::queue::now_ms()).await;
    let route = state.settings.route(path).map(|r| r.name.as_str());
    match &result {
        Ok((_, stored)) => record_ingest(state, route, 202, !stored, u64::from(*stored), started),
        Err(e) => record_ingest(state, route, e.status_code().as_u16(), false, 0, started),
    }
    result.map(|(response, _)| response)
}

/// Count one inbound request: `stored` notifications newly stored, `status` the answer.
pub fn record_ingest(
    state: &AppState,
    route: Option<&str>,
    status: u16,
    all_duplicates: bool,
    stored: u64,
    started: Instant,
) {
    // Only configured route names become labels, so a sender cannot blow up cardinality.
    let route = route.unwrap_or("unknown");
    let outcome = match status {
        200..=299 if all_duplicates => "duplicate",
        200..=299 => "acked",
        400..=499 => "rejected_4xx",
        _ => "unavailable_5xx",
    };
    state.metrics.inc(
        "relay_ingest_requests_total",
        &[("route", route), ("outcome", outcome)],
        1,
    );
    if stored > 0 {
        state.metrics.inc(
            "relay_ingest_notifications_total",
            &[("route", route)],
            stored,
        );
    }
    if (200..300).contains(&status) {
        state.metrics.observe(
            "relay_ack_latency_seconds",
            &[],
            started.elapsed().as_secs_f64(),
        );
    }
}

/// Why a request may not use a route (checked before the body is read).
#[derive(Debug, PartialEq, Eq)]
pub enum AccessDenied {
    /// Missing or wrong path token: answered like an unknown route, revealing nothing.
    NotFound,
    /// The client address is not in the route's `allowed_ips`.
    Forbidden,
}

/// Check the route's secret path token (constant time) and IP allowlist.
pub fn check_access(
    route: &crate::settings::RouteSettings,
    token: Option<&str>,
    req: &HttpRequest,
    networks: &Networks,
) -> Result<(), AccessDenied> {
    use secrecy::ExposeSecret;
    use subtle::ConstantTimeEq;
    match (&route.path_token, token) {
        (None, None) => {}
        (Some(expected), Some(given)) => {
            let ok: bool = sha2::Sha256::digest(given.as_bytes())
                .ct_eq(&sha2::Sha256::digest(expected.expose_secret().as_bytes()))
                .into();
            if !ok {
                return Err(AccessDenied::NotFound);
            }
        }
        _ => return Err(AccessDenied::NotFound),
    }
    if let Some(allowed) = networks.allowed.get(&route.name) {
        let trusted = &networks.trusted_proxies;
        let forwarded = forwarded_for(req);
        let client = crate::netaddr::client_ip(
            req.peer_addr().map(|a| a.ip()),
            forwarded.as_deref(),
            trusted,
        );
        if !client.is_some_and(|ip| allowed.iter().any(|net| net.contains(ip))) {
            return Err(AccessDenied::Forbidden);
        }
    }
    Ok(())
}

/// Every `X-Forwarded-For` line, in order, as one list: a proxy may append its own line
/// after a forged one, and the right-most entries are the ones a trusted proxy vouches for.
/// A line that is not text makes the whole header garbled (`client_ip` then refuses).
fn forwarded_for(req: &HttpRequest) -> Option<String> {
    let mut joined: Option<String> = None;
    for line in req.headers().get_all("x-forwarded-for") {
        let Ok(line) = line.to_str() else {
            return Some("garbled".into());
        };
        match &mut joined {
            Some(j) => {
                j.push(',');
                j.push_str(line);
            }
            None => joined = Some(line.to_owned()),
        }
    }
    joined
}

/// The media type of a request, lower-cased, without parameters.
pub fn media_type(req: &HttpRequest) -> String {
    req.headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}
