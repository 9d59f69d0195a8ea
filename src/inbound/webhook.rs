//! `POST /centercode/webhook/{route}`: a Centercode macro's Trigger Webhook (JSON composed by
//! the program manager, unsigned), authenticated by a static header token, deduplicated on
//! configured JSON pointers, stored for the worker to upsert into Salesforce. Never maps here.

use super::callout::{self, CalloutError};
use super::{error_json, media_type, read_body_limited, request_id, AppState};
use crate::queue::{Job, NewJob};
use crate::settings::{RouteKind, RouteSettings};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use secrecy::ExposeSecret;
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header the token comes in when a route's `auth.header` is not set.
pub const DEFAULT_TOKEN_HEADER: &str = "X-Relay-Token";

/// Why a webhook was not accepted. Bodies are `{"error":{"code","message"}}`.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("no centercode_webhook route named `{0}`")]
    UnknownRoute(String),
    /// The same answer for a missing and a wrong token (the header's name is configuration).
    #[error("missing or wrong {0}")]
    Unauthorized(String),
    #[error("Content-Type must be application/json (or absent): the macro's body is expected as JSON (a form-encoded body is not accepted)")]
    UnsupportedMediaType,
    /// A `dedupe` pointer finds nothing (or null, or an empty string) in the body.
    #[error("the body has no value at {0} (a dedupe pointer of this route), so a redelivery could not be recognised")]
    DedupeValueMissing(String),
    /// Refusals shared with callouts: size, time, JSON, IP allowlist, storage.
    #[error(transparent)]
    Shared(#[from] CalloutError),
}

impl WebhookError {
    fn code(&self) -> &'static str {
        match self {
            WebhookError::UnknownRoute(_) => "unknown_route",
            WebhookError::Unauthorized(_) => "unauthorized",
            WebhookError::UnsupportedMediaType => "unsupported_media_type",
            WebhookError::DedupeValueMissing(_) => "dedupe_value_missing",
            WebhookError::Shared(e) => e.code(),
        }
    }
}

impl ResponseError for WebhookError {
    fn status_code(&self) -> StatusCode {
        match self {
            WebhookError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            WebhookError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            WebhookError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            WebhookError::DedupeValueMissing(_) => StatusCode::BAD_REQUEST,
            WebhookError::Shared(e) => e.status_code(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            WebhookError::Shared(e) => e.error_response(),
            _ => HttpResponse::build(self.status_code())
                .content_type("application/json")
                .body(error_json(self.code(), &self.to_string())),
        }
    }
}

/// Whether a webhook's media type says JSON. An absent Content-Type counts: the program
/// manager types the macro's headers by hand, and the body must still parse as a JSON
/// object; `application/*+json` is JSON by RFC 6839.
fn is_json_media_type(media_type: &str) -> bool {
    media_type.is_empty()
        || media_type == "application/json"
        || media_type
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

/// Compare the route's token with the one in its header, in constant time over digests (so
/// neither the token's length nor a matching prefix shows in the timing). Missing and wrong
/// get the same answer.
fn check_token(req: &HttpRequest, route: &RouteSettings) -> Result<(), WebhookError> {
    let auth = route.auth.as_ref();
    let name = auth
        .and_then(|a| a.header.as_deref())
        .unwrap_or(DEFAULT_TOKEN_HEADER);
    let refused = || WebhookError::Unauthorized(name.to_owned());
    // Validation requires a token; without one nothing can match.
    let expected = auth.and_then(|a| a.token.as_ref()).ok_or_else(refused)?;
    let given = req.headers().get(name).map(|v| v.as_bytes()).unwrap_or(b"");
    let ok: bool = Sha256::digest(trim(given))
        .ct_eq(&Sha256::digest(expected.expose_secret().as_bytes()))
        .into();
    if !ok {
        return Err(refused());
    }
    Ok(())
}

/// Leading and trailing spaces dropped: a token typed into the macro's header box.
fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Whether a value cannot stand for a record or a version: absent, null or blank text.
fn is_blank(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        _ => false,
    }
}

/// `webhook:{route}:{sha256}` of the values at the route's `dedupe` pointers (a JSON array, so
/// `["a,b"]` and `["a","b"]` differ), or of the whole body re-serialised (keys sorted) when
/// none are configured. A configured pointer that finds nothing refuses the request: storing
/// it unkeyed would store every redelivery again.
pub fn dedupe_key(route: &RouteSettings, body: &Value) -> Result<String, WebhookError> {
    let keyed = if route.dedupe.is_empty() {
        body.clone()
    } else {
        let values = route.dedupe.iter().map(|p| {
            body.pointer(p)
                .filter(|v| !is_blank(v))
                .cloned()
                .ok_or_else(|| WebhookError::DedupeValueMissing(p.clone()))
        });
        Value::Array(values.collect::<Result<_, _>>()?)
    };
    let hash = Sha256::digest(keyed.to_string().as_bytes());
    Ok(format!("webhook:{}:{hash:x}", route.name))
}

/// The record a webhook is about: the text (or number) at the route's `external_id`, so
/// `relay trace --record-id` finds it and its versions are applied in order. `None` when the
/// body has none: the worker then parks the job with the mapping's reason.
pub fn record_id(route: &RouteSettings, body: &Value) -> Option<String> {
    let value = body.pointer(route.external_id.as_deref()?)?;
    let text = match value {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!text.is_empty() && text.len() <= 255).then_some(text)
}

/// The job for one webhook body (a JSON object, see [`callout::parse_body`]).
pub fn job_from_webhook(route: &RouteSettings, body: Value) -> Result<NewJob, WebhookError> {
    Ok(NewJob {
        received_at_ms: 0,
        id: uuid::Uuid::new_v4().to_string(),
        route: route.name.clone(),
        action: route.action,
        dedupe_key: Some(dedupe_key(route, &body)?),
        // No body hash: the dedupe pointers say what identifies a change, so the same key with
        // other fields is a redelivery (202 duplicate), not a conflict.
        body_hash: None,
        org_id: None,
        notification_id: None,
        record_id: record_id(route, &body),
        job: Job::CentercodeWebhookV1 { body },
    })
}

#[tracing::instrument(name = "centercode_webhook", skip_all, fields(route = %path.as_str(), request_id = tracing::field::Empty, job_id = tracing::field::Empty))]
pub async fn receive(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebhookError> {
    super::counted(&state, &path, |at| handle(&req, &path, payload, &state, at)).await
}

/// Authenticate, check and store; returns the answer and whether a new job was stored.
async fn handle(
    req: &HttpRequest,
    path: &str,
    payload: web::Payload,
    state: &AppState,
    received_at_ms: i64,
) -> Result<(HttpResponse, bool), WebhookError> {
    let span = tracing::Span::current();
    span.record("request_id", request_id(req));
    let route = state
        .settings
        .route(path)
        .filter(|r| r.kind == RouteKind::CentercodeWebhook)
        .ok_or_else(|| WebhookError::UnknownRoute(path.chars().take(64).collect()))?;
    super::check_access(route, None, req, &state.networks).map_err(|denied| match denied {
        super::AccessDenied::NotFound => WebhookError::UnknownRoute(route.name.clone()),
        super::AccessDenied::Forbidden => CalloutError::IpNotAllowed.into(),
    })?;
    // The token before anything else about the request: a caller without it learns nothing
    // about the route and cannot make the relay wait for a body.
    check_token(req, route).inspect_err(|e| tracing::warn!(error = %e, "webhook refused"))?;
    if !is_json_media_type(&media_type(req)) {
        return Err(WebhookError::UnsupportedMediaType);
    }
    let raw = read_body_limited(req, payload, &state.settings.server)
        .await
        .map_err(CalloutError::from)?;
    // A processing slot only once the whole body is here (see the Outbound Message handler).
    let _slot = state.request_slots.acquire().await;
    let body = callout::parse_body(&raw)?;
    let mut job = job_from_webhook(route, body)
        .inspect_err(|e| tracing::warn!(error = %e, "webhook refused"))?;
    job.received_at_ms = received_at_ms;
    let (job_id, outcome) = callout::store_one(state, route, job).await?;
    let status = callout::accepted_status(&outcome);
    span.record("job_id", job_id.as_str());
    tracing::info!(%job_id, status, bytes = raw.len(), "centercode webhook stored");
    Ok((callout::accepted(&job_id, status), status == "queued"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(dedupe: &[&str]) -> RouteSettings {
        let toml = format!(
            r#"
[salesforce]
login_url = "http://127.0.0.1:9"
client_id = "3MVG9-relay-test"
client_secret = "test-secret-0123456789"
[[routes]]
name = "cc-feedback"
kind = "centercode_webhook"
action = "salesforce_upsert"
sobject = "Centercode_Feedback__c"
external_id_field = "Centercode_Id__c"
external_id = "/feedback/id"
dedupe = {dedupe:?}
auth = {{ token = "0123456789abcdef-token" }}
[routes.fields]
Title__c = "/feedback/title"
"#
        );
        let settings = crate::settings::Settings::from_toml(&toml).expect("settings");
        settings.routes[0].clone()
    }

    #[test]
    fn the_key_of_the_dedupe_values_ignores_other_fields() {
        let r = route(&["/feedback/id", "/feedback/modified"]);
        let a =
            json!({"feedback": {"id": "4711", "modified": "2026-01-02T03:04:05Z", "title": "A"}});
        let b =
            json!({"feedback": {"id": "4711", "modified": "2026-01-02T03:04:05Z", "title": "B"}});
        let c =
            json!({"feedback": {"id": "4711", "modified": "2026-01-02T03:09:00Z", "title": "A"}});
        let key = |v: &Value| dedupe_key(&r, v).unwrap();
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&c));
        assert!(key(&a).starts_with("webhook:cc-feedback:"));
        assert_eq!(key(&a).len(), "webhook:cc-feedback:".len() + 64);
    }

    #[test]
    fn values_are_joined_unambiguously() {
        let r = route(&["/a", "/b"]);
        let one = json!({"a": "x\",\"y", "b": "z"});
        let two = json!({"a": "x", "b": "y\",\"z"});
        assert_ne!(dedupe_key(&r, &one).unwrap(), dedupe_key(&r, &two).unwrap());
        let number = json!({"a": 1, "b": "z"});
        let text = json!({"a": "1", "b": "z"});
        assert_ne!(
            dedupe_key(&r, &number).unwrap(),
            dedupe_key(&r, &text).unwrap()
        );
    }

    #[test]
    fn without_pointers_the_body_is_keyed_whatever_its_key_order_and_spacing() {
        let r = route(&[]);
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": 2, "x": 3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":3,"y":2},"b":1}"#).unwrap();
        assert_eq!(dedupe_key(&r, &a).unwrap(), dedupe_key(&r, &b).unwrap());
        let c = json!({"a": {"x": 3, "y": 2}, "b": 2});
        assert_ne!(dedupe_key(&r, &a).unwrap(), dedupe_key(&r, &c).unwrap());
    }

    #[test]
    fn a_missing_null_or_blank_dedupe_value_is_named() {
        let r = route(&["/feedback/id", "/feedback/modified"]);
        for body in [
            json!({"feedback": {"id": "4711"}}),
            json!({"feedback": {"id": "4711", "modified": null}}),
            json!({"feedback": {"id": "4711", "modified": "  "}}),
        ] {
            let err = dedupe_key(&r, &body).unwrap_err();
            assert_eq!(err.status_code(), StatusCode::BAD_REQUEST);
            assert!(err.to_string().contains("/feedback/modified"), "{err}");
        }
    }

    #[test]
    fn the_record_id_is_the_external_id_as_text() {
        let r = route(&[]);
        let job = job_from_webhook(&r, json!({"feedback": {"id": 4711}})).unwrap();
        assert_eq!(job.record_id.as_deref(), Some("4711"));
        assert_eq!(job.notification_id, None);
        assert_eq!(job.action, crate::settings::Action::SalesforceUpsert);
        let job = job_from_webhook(&r, json!({"feedback": {"id": " FB-9 "}})).unwrap();
        assert_eq!(job.record_id.as_deref(), Some("FB-9"));
        let job = job_from_webhook(&r, json!({"feedback": {}})).unwrap();
        assert_eq!(job.record_id, None);
    }
}
