//! `POST /salesforce/callout/{route}`: JSON from Apex or a Flow HTTP Callout, authenticated
//! by a bearer token or an HMAC signature, deduplicated on its idempotency key.

use super::{error_json, media_type, read_body_limited, request_id, AppState, BodyError};
use crate::queue::{EnqueueOutcome, Job, NewJob, QueueError};
use crate::settings::{CalloutAuth, RouteKind, RouteSettings};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;

/// Why a callout was not accepted. Bodies are `{"error":{"code","message"}}`.
#[derive(Debug, thiserror::Error)]
pub enum CalloutError {
    #[error("no callout route named `{0}`")]
    UnknownRoute(String),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("{0}")]
    Body(#[from] BodyError),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("this address may not send to this route")]
    IpNotAllowed,
    #[error("body is not a JSON object: {0}")]
    InvalidJson(String),
    #[error("idempotency key must be 1 to 200 printable ASCII characters")]
    InvalidIdempotencyKey,
    #[error("Idempotency-Key was already used with a different body (job {0})")]
    KeyReused(String),
    #[error("could not store the request; retry later")]
    Enqueue(#[source] QueueError),
}

impl CalloutError {
    /// The `error.code` of the answer (shared with the Centercode webhook handler).
    pub(crate) fn code(&self) -> &'static str {
        match self {
            CalloutError::UnknownRoute(_) => "unknown_route",
            CalloutError::UnsupportedMediaType => "unsupported_media_type",
            CalloutError::Body(BodyError::TooLarge(_)) => "payload_too_large",
            CalloutError::Body(BodyError::Timeout) => "body_timeout",
            CalloutError::Body(BodyError::Broken) => "body_unreadable",
            CalloutError::Unauthorized(_) => "unauthorized",
            CalloutError::IpNotAllowed => "ip_not_allowed",
            CalloutError::InvalidJson(_) => "invalid_json",
            CalloutError::InvalidIdempotencyKey => "invalid_idempotency_key",
            CalloutError::KeyReused(_) => "idempotency_key_reused",
            CalloutError::Enqueue(_) => "unavailable",
        }
    }
}

impl ResponseError for CalloutError {
    fn status_code(&self) -> StatusCode {
        match self {
            CalloutError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            CalloutError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            CalloutError::Body(BodyError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            CalloutError::Body(BodyError::Timeout) => StatusCode::REQUEST_TIMEOUT,
            CalloutError::Body(BodyError::Broken) => StatusCode::BAD_REQUEST,
            CalloutError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            CalloutError::IpNotAllowed => StatusCode::FORBIDDEN,
            CalloutError::InvalidJson(_) | CalloutError::InvalidIdempotencyKey => {
                StatusCode::BAD_REQUEST
            }
            CalloutError::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            CalloutError::Enqueue(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        if matches!(self, CalloutError::Enqueue(_)) {
            res.insert_header(("Retry-After", "5"));
        }
        res.content_type("application/json")
            .body(error_json(self.code(), &self.to_string()))
    }
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The checks that need no body: the bearer token, and for HMAC the timestamp window and
/// the presence of a signature. [`authenticate`] repeats them and checks the signature.
pub fn authenticate_headers(
    req: &HttpRequest,
    auth: &CalloutAuth,
    now: SystemTime,
) -> Result<(), CalloutError> {
    check_bearer(req, auth)?;
    if auth.hmac_secret.is_some() {
        check_timestamp(req, auth, now)?;
        header(req, "x-relay-signature")
            .ok_or(CalloutError::Unauthorized("missing X-Relay-Signature"))?;
    }
    Ok(())
}

fn check_bearer(req: &HttpRequest, auth: &CalloutAuth) -> Result<(), CalloutError> {
    if let Some(expected) = &auth.bearer {
        let given = header(req, "authorization")
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or(CalloutError::Unauthorized(
                "missing Authorization: Bearer token",
            ))?;
        // Compare digests so the comparison takes the same time whatever the lengths.
        let ok: bool = sha256(given.trim().as_bytes())
            .ct_eq(&sha256(expected.expose_secret().as_bytes()))
            .into();
        if !ok {
            return Err(CalloutError::Unauthorized("bearer token does not match"));
        }
    }
    Ok(())
}

/// `X-Relay-Timestamp`, checked against the window; returns it as sent.
fn check_timestamp<'a>(
    req: &'a HttpRequest,
    auth: &CalloutAuth,
    now: SystemTime,
) -> Result<&'a str, CalloutError> {
    let timestamp = header(req, "x-relay-timestamp")
        .ok_or(CalloutError::Unauthorized("missing X-Relay-Timestamp"))?;
    let ts: u64 = timestamp
        .trim()
        .parse()
        .map_err(|_| CalloutError::Unauthorized("X-Relay-Timestamp must be Unix seconds"))?;
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    if now.abs_diff(ts) > auth.hmac_window_secs {
        return Err(CalloutError::Unauthorized(
            "X-Relay-Timestamp is outside the allowed window",
        ));
    }
    Ok(timestamp)
}

/// Check the bearer token and/or HMAC signature that the route requires (all that are set).
pub fn authenticate(
    req: &HttpRequest,
    body: &[u8],
    auth: &CalloutAuth,
    now: SystemTime,
) -> Result<(), CalloutError> {
    check_bearer(req, auth)?;
    if let Some(secret) = &auth.hmac_secret {
        let timestamp = check_timestamp(req, auth, now)?;
        let signatures = header(req, "x-relay-signature")
            .ok_or(CalloutError::Unauthorized("missing X-Relay-Signature"))?;
        let sign = |parts: &[&[u8]]| {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
                .expect("HMAC takes any key length");
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    mac.update(b".");
                }
                mac.update(part);
            }
            mac.finalize().into_bytes()
        };
        let timestamp = timestamp.trim().as_bytes();
        // v2 covers the Idempotency-Key header too (empty when absent), so a captured request
        // cannot be replayed within the window under a new key as a second job.
        let key = header(req, "idempotency-key")
            .unwrap_or("")
            .trim()
            .as_bytes();
        let v2 = sign(&[timestamp, key, body]);
        let v1 = auth.hmac_accept_v1.then(|| sign(&[timestamp, body]));
        // Several comma-separated signatures let a secret be rotated without downtime.
        let matched = signatures.split(',').any(|s| {
            let s = s.trim();
            let (expected, sig) = match (s.strip_prefix("v2="), s.strip_prefix("v1="), &v1) {
                (Some(sig), _, _) => (&v2, sig),
                (None, Some(sig), Some(v1)) => (v1, sig),
                _ => return false,
            };
            base64::engine::general_purpose::STANDARD
                .decode(sig)
                .is_ok_and(|given| bool::from(given.as_slice().ct_eq(expected.as_slice())))
        });
        if !matched {
            return Err(CalloutError::Unauthorized(
                "X-Relay-Signature does not match",
            ));
        }
    }
    Ok(())
}

/// The idempotency key: the header, else the route's `idempotency_key_field`.
fn idempotency_key(
    req: &HttpRequest,
    route: &RouteSettings,
    body: &serde_json::Value,
) -> Result<Option<String>, CalloutError> {
    let key = match header(req, "idempotency-key") {
        Some(k) => Some(k.trim().to_owned()),
        None => route
            .idempotency_key_field
            .as_deref()
            .and_then(|p| body.pointer(p))
            .and_then(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }),
    };
    match key {
        Some(k) if k.is_empty() || k.len() > 200 || !k.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(CalloutError::InvalidIdempotencyKey)
        }
        other => Ok(other),
    }
}

/// The job for one callout body.
pub fn job_from_callout(
    route: &RouteSettings,
    key: Option<String>,
    body: serde_json::Value,
    body_hash: Option<String>,
) -> NewJob {
    NewJob {
        received_at_ms: 0,
        id: uuid::Uuid::new_v4().to_string(),
        route: route.name.clone(),
        action: route.action,
        dedupe_key: key.as_ref().map(|k| format!("callout:{}:{k}", route.name)),
        body_hash,
        org_id: None,
        notification_id: key.clone(),
        record_id: crate::ordering::callout_record_id(route, &body),
        job: Job::CalloutV1 {
            idempotency_key: key,
            body,
        },
    }
}

/// Parse a callout body: a JSON object.
pub fn parse_body(raw: &[u8]) -> Result<serde_json::Value, CalloutError> {
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(CalloutError::InvalidJson(
            "top level must be an object".into(),
        )),
        // serde's message gives line and column, never the input.
        Err(e) => Err(CalloutError::InvalidJson(e.to_string())),
    }
}

#[tracing::instrument(name = "callout", skip_all, fields(route = %path.as_str(), request_id = tracing::field::Empty, job_id = tracing::field::Empty))]
pub async fn receive(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, CalloutError> {
    super::counted(&state, &path, |at| handle(&req, &path, payload, &state, at)).await
}

/// Authenticate, check and store; returns the answer and whether a new job was stored.
async fn handle(
    req: &HttpRequest,
    path: &str,
    payload: web::Payload,
    state: &AppState,
    received_at_ms: i64,
) -> Result<(HttpResponse, bool), CalloutError> {
    let req = req.clone();
    let span = tracing::Span::current();
    span.record("request_id", request_id(&req));
    let route = state
        .settings
        .route(path)
        .filter(|r| r.kind == RouteKind::Callout)
        .ok_or_else(|| CalloutError::UnknownRoute(path.chars().take(64).collect()))?;
    super::check_access(route, None, &req, &state.networks).map_err(|denied| match denied {
        super::AccessDenied::NotFound => CalloutError::UnknownRoute(route.name.clone()),
        super::AccessDenied::Forbidden => CalloutError::IpNotAllowed,
    })?;
    if media_type(&req) != "application/json" {
        return Err(CalloutError::UnsupportedMediaType);
    }
    let auth = route
        .auth
        .as_ref()
        .ok_or(CalloutError::Unauthorized("route has no auth configured"))?;
    // Everything the headers can prove, before the body is read: a caller without the
    // bearer token (or a signature in the window) cannot make the relay wait for a body.
    let now = SystemTime::now();
    authenticate_headers(&req, auth, now)
        .inspect_err(|e| tracing::warn!(error = %e, "callout refused"))?;
    let raw = read_body_limited(&req, payload, &state.settings.server).await?;
    // A processing slot only once the whole body is here (see the Outbound Message handler).
    let _slot = state.request_slots.acquire().await;
    authenticate(&req, &raw, auth, now)
        .inspect_err(|e| tracing::warn!(error = %e, "callout refused"))?;
    let body = parse_body(&raw)?;
    let key = idempotency_key(&req, route, &body)?;
    let hash = key.as_ref().map(|_| format!("{:x}", Sha256::digest(&raw)));
    let mut job = job_from_callout(route, key, body, hash);
    job.received_at_ms = received_at_ms;
    let (job_id, status) = match store_one(state, route, job).await? {
        (_, EnqueueOutcome::Conflict { job_id }) => return Err(CalloutError::KeyReused(job_id)),
        (job_id, outcome) => (job_id, accepted_status(&outcome)),
    };
    span.record("job_id", job_id.as_str());
    tracing::info!(%job_id, status, "callout stored");
    Ok((accepted(&job_id, status), status == "queued"))
}

/// Store one job of a JSON request and note its record version; returns the id that answers
/// for it (the earlier job's, for a duplicate) and what the queue did.
pub(crate) async fn store_one(
    state: &AppState,
    route: &RouteSettings,
    job: NewJob,
) -> Result<(String, EnqueueOutcome), CalloutError> {
    let job_id = job.id.clone();
    let jobs = vec![job];
    let versions = crate::ordering::versions_of(route, &jobs);
    let outcome = state.queue.enqueue(jobs).await.map_err(|e| {
        tracing::error!(error = %e, "could not store the request; answering 503");
        CalloutError::Enqueue(e)
    })?;
    crate::ordering::note_seen(&state.queue, versions, &outcome);
    let outcome = outcome.into_iter().next().unwrap_or(EnqueueOutcome::Stored);
    let answering = match &outcome {
        EnqueueOutcome::Duplicate { job_id } | EnqueueOutcome::Conflict { job_id } => {
            job_id.clone()
        }
        EnqueueOutcome::Stored => job_id,
    };
    Ok((answering, outcome))
}

/// `queued` for a job newly stored, else `duplicate`.
pub(crate) fn accepted_status(outcome: &EnqueueOutcome) -> &'static str {
    match outcome {
        EnqueueOutcome::Stored => "queued",
        _ => "duplicate",
    }
}

/// The 202 answer: `{"job_id": …, "status": "queued" | "duplicate"}`.
pub(crate) fn accepted(job_id: &str, status: &str) -> HttpResponse {
    HttpResponse::Accepted().json(serde_json::json!({"job_id": job_id, "status": status}))
}
