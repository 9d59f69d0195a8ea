//! `POST /salesforce/outbound/{route}`: a SOAP Outbound Message. Checked, stored in one
//! transaction (or confirmed), and only then acknowledged with `<Ack>true</Ack>`.

use super::soap::{self, SoapError};
use super::{media_type, read_body, record_ingest, request_id, AppState, BodyError};
use crate::domain::{Notification, OutboundMessage};
use crate::queue::{EnqueueOutcome, Job, NewJob, QueueError};
use crate::settings::{RouteKind, RouteSettings};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use std::time::Duration;

/// Why an Outbound Message was not acknowledged. Every variant answers a SOAP Fault.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("no outbound_message route named `{0}`")]
    UnknownRoute(String),
    #[error("Content-Type must be text/xml")]
    UnsupportedMediaType,
    #[error("{0}")]
    Body(#[from] BodyError),
    #[error("malformed outbound message: {0}")]
    Malformed(#[from] SoapError),
    #[error("OrganizationId is not allowed on this route")]
    ForeignOrg,
    #[error("this address may not send to this route")]
    IpNotAllowed,
    #[error("sObject type `{found}` is not accepted by this route (expected `{expected}`)")]
    WrongSObject { found: String, expected: String },
    #[error("could not store the notifications; Salesforce will retry")]
    Enqueue(#[source] QueueError),
}

impl ResponseError for InboundError {
    fn status_code(&self) -> StatusCode {
        match self {
            InboundError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            InboundError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            InboundError::Body(BodyError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            InboundError::Body(BodyError::Timeout) => StatusCode::REQUEST_TIMEOUT,
            InboundError::Body(BodyError::Broken) => StatusCode::BAD_REQUEST,
            InboundError::Malformed(_) | InboundError::WrongSObject { .. } => {
                StatusCode::BAD_REQUEST
            }
            InboundError::ForeignOrg | InboundError::IpNotAllowed => StatusCode::FORBIDDEN,
            InboundError::Enqueue(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let server_side = matches!(self, InboundError::Enqueue(_));
        HttpResponse::build(self.status_code())
            .content_type("text/xml; charset=utf-8")
            .body(soap::render_fault(server_side, &self.to_string()))
    }
}

/// The gateway's checks beyond the envelope: the org and the sObject type.
pub fn check_message(route: &RouteSettings, message: &OutboundMessage) -> Result<(), InboundError> {
    if !route
        .parsed_org_ids()
        .iter()
        .any(|allowed| allowed.same_org(&message.org_id))
    {
        return Err(InboundError::ForeignOrg);
    }
    let expected = route.sobject.as_deref().unwrap_or_default();
    if let Some(n) = message
        .notifications
        .iter()
        .find(|n| !n.sobject_type.eq_ignore_ascii_case(expected))
    {
        return Err(InboundError::WrongSObject {
            found: n.sobject_type.clone(),
            expected: expected.to_owned(),
        });
    }
    Ok(())
}

/// One job per notification, deduplicated on (org, notification id).
pub fn jobs_from_message(route: &RouteSettings, message: &OutboundMessage) -> Vec<NewJob> {
    message
        .notifications
        .iter()
        .map(|n: &Notification| NewJob {
            received_at_ms: 0,
            id: uuid::Uuid::new_v4().to_string(),
            route: route.name.clone(),
            action: route.action,
            dedupe_key: Some(format!("om:{}:{}", message.org_id.prefix15(), n.id)),
            body_hash: None,
            org_id: Some(message.org_id.to_string()),
            notification_id: Some(n.id.to_string()),
            record_id: n.record_id.clone(),
            job: Job::OutboundMessageV1 {
                org_id: message.org_id.to_string(),
                notification_id: n.id.to_string(),
                action_id: message.action_id.clone(),
                sobject_type: n.sobject_type.clone(),
                record_id: n.record_id.clone(),
                fields: n.fields.clone(),
            },
        })
        .collect()
}

#[tracing::instrument(name = "outbound_message", skip_all, fields(route = %path.as_str(), request_id = tracing::field::Empty, sf_org_id = tracing::field::Empty, notifications = tracing::field::Empty))]
pub async fn receive(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, InboundError> {
    receive_on(req, &path, None, payload, state).await
}

/// `POST /salesforce/outbound/{route}/{token}`: the same, for routes with a secret path token.
/// The span names the route, never the token.
#[tracing::instrument(name = "outbound_message", skip_all, fields(route = %path.0, request_id = tracing::field::Empty, sf_org_id = tracing::field::Empty, notifications = tracing::field::Empty))]
pub async fn receive_with_token(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, InboundError> {
    let (route, token) = path.into_inner();
    receive_on(req, &route, Some(&token), payload, state).await
}

async fn receive_on(
    req: HttpRequest,
    path: &str,
    token: Option<&str>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, InboundError> {
    let started = std::time::Instant::now();
    let received_at_ms = crate::queue::now_ms();
    let result = handle(&req, path, token, payload, &state, received_at_ms).await;
    let route = state.settings.route(path).map(|r| r.name.as_str());
    match &result {
        Ok((_, stored)) => record_ingest(&state, route, 200, *stored == 0, *stored, started),
        Err(e) => record_ingest(&state, route, e.status_code().as_u16(), false, 0, started),
    }
    result.map(|(response, _)| response)
}

/// Check and store; returns the ack and how many notifications were newly stored.
async fn handle(
    req: &HttpRequest,
    path: &str,
    token: Option<&str>,
    payload: web::Payload,
    state: &AppState,
    received_at_ms: i64,
) -> Result<(HttpResponse, u64), InboundError> {
    let req = req.clone();
    let span = tracing::Span::current();
    span.record("request_id", request_id(&req));
    let route = state
        .settings
        .route(path)
        .filter(|r| r.kind == RouteKind::OutboundMessage)
        .ok_or_else(|| InboundError::UnknownRoute(path.chars().take(64).collect()))?;
    super::check_access(route, token, &req, &state.networks).map_err(|denied| match denied {
        super::AccessDenied::NotFound => InboundError::UnknownRoute(route.name.clone()),
        super::AccessDenied::Forbidden => InboundError::IpNotAllowed,
    })?;
    let media = media_type(&req);
    if media != "text/xml" && media != "application/xml" {
        return Err(InboundError::UnsupportedMediaType);
    }
    let settings = &state.settings.server;
    let body = read_body(
        &req,
        payload,
        settings.max_body_bytes,
        Duration::from_millis(settings.body_timeout_ms),
    )
    .await;
    let body = body.inspect_err(|e| tracing::warn!(error = %e, "outbound message body refused"))?;
    // A processing slot only once the whole body is here: slow senders hold connections
    // (bounded by server.max_connections), never the slots Salesforce's traffic needs.
    let _slot = state.request_slots.acquire().await;
    let message = soap::parse_outbound_message(&body).inspect_err(|e| {
        tracing::warn!(
            reason = e.code(),
            bytes = body.len(),
            "malformed outbound message refused"
        )
    })?;
    span.record("sf_org_id", message.org_id.as_str());
    span.record("notifications", message.notifications.len());
    if message.had_session_id {
        // The value was dropped at parse time; it is never stored or logged.
        tracing::warn!("message carried a SessionId, which the relay discards; turn off \"Send Session ID\" on the Outbound Message");
    }
    check_message(route, &message)
        .inspect_err(|e| tracing::warn!(error = %e, "outbound message refused"))?;
    let mut jobs = jobs_from_message(route, &message);
    for job in &mut jobs {
        job.received_at_ms = received_at_ms;
    }
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let notification_ids: Vec<String> = message
        .notifications
        .iter()
        .map(|n| n.id.to_string())
        .collect();
    let versions = crate::ordering::versions_of(route, &jobs);
    let outcomes = state.queue.enqueue(jobs).await.map_err(|e| {
        tracing::error!(error = %e, "could not store outbound message; answering 503 so Salesforce retries");
        InboundError::Enqueue(e)
    })?;
    crate::ordering::note_seen(&state.queue, versions, &outcomes);
    let stored = outcomes
        .iter()
        .filter(|o| **o == EnqueueOutcome::Stored)
        .count() as u64;
    for ((outcome, job_id), notification_id) in outcomes.iter().zip(&ids).zip(&notification_ids) {
        match outcome {
            EnqueueOutcome::Stored => {
                tracing::info!(%job_id, %notification_id, "notification stored")
            }
            EnqueueOutcome::Duplicate { job_id } | EnqueueOutcome::Conflict { job_id } => {
                tracing::info!(%job_id, %notification_id, "notification already received; acknowledged again")
            }
        }
    }
    let ack = HttpResponse::Ok()
        .content_type("text/xml; charset=utf-8")
        .body(soap::ACK_TRUE);
    Ok((ack, stored))
}
