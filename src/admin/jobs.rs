//! `/admin/jobs`: every job the ledger knows, in any state — list and search them, show one
//! with its attempts, export erasure receipts, resend a delivered job whose payload is kept.
//! An e-mail is only ever accepted in a request body (`POST /admin/jobs/search`), hashed at
//! once into its subject key and forgotten.

use super::{deny, error, parse_json_body, parse_query, queue_error, refuse, rfc3339, Refused};
use crate::inbound::AppState;
use crate::ledger::{Entry, FinalOutcome, LedgerCursor, LedgerQuery};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};

pub fn configure(scope: actix_web::Scope) -> actix_web::Scope {
    scope
        .route("/jobs", web::get().to(list))
        .route("/jobs/search", web::post().to(search))
        .route("/jobs/export", web::get().to(export))
        .route("/jobs/{id}", web::get().to(show))
        .route("/jobs/{id}/resend", web::post().to(resend))
}

/// The filters `GET /admin/jobs` and `POST /admin/jobs/search` share. Times are Unix seconds.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Filters {
    record_id: Option<String>,
    notification_id: Option<String>,
    route: Option<String>,
    action: Option<String>,
    /// The latest outcome: delivered, user_not_found, parked, replayed, purged, resent, or
    /// `pending` (none yet).
    outcome: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    /// Only jobs not completed: parked, held, waiting, or with no outcome yet.
    #[serde(default)]
    undelivered: bool,
    /// Include each job's attempts and outcomes.
    #[serde(default)]
    history: bool,
    cursor: Option<String>,
    limit: Option<usize>,
    /// A subject key computed elsewhere (`relay trace --email`, hashed on the operator's side).
    subject_key: Option<String>,
    /// `POST /admin/jobs/search` only: hashed into `subject_key` and forgotten. Refused in a
    /// URL, where it would travel and be logged by proxies.
    email: Option<String>,
}

const OUTCOMES: [&str; 8] = [
    "superseded",
    "delivered",
    "user_not_found",
    "parked",
    "replayed",
    "purged",
    "resent",
    "pending",
];

impl Filters {
    fn query(self) -> Result<LedgerQuery, Refused> {
        if let Some(o) = &self.outcome {
            if !OUTCOMES.contains(&o.as_str()) {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    &format!("outcome: expected one of {}", OUTCOMES.join(", ")),
                ));
            }
        }
        let after = match &self.cursor {
            Some(c) => Some(LedgerCursor::parse(c).ok_or_else(|| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    "cursor: expected the next_cursor of an earlier page",
                )
            })?),
            None => None,
        };
        Ok(LedgerQuery {
            record_id: self.record_id,
            notification_id: self.notification_id,
            subject_key: self.subject_key,
            route: self.route,
            action: self.action,
            outcome: self.outcome,
            since_ms: self.since.map(|s| s.saturating_mul(1000)),
            until_ms: self.until.map(|s| s.saturating_mul(1000)),
            incomplete: self.undelivered,
            after,
            history: self.history,
            limit: self.limit.unwrap_or(100).clamp(1, crate::ledger::MAX_PAGE),
            ..LedgerQuery::default()
        })
    }
}

/// Where a job stands, in words an operator acts on.
fn state_of(e: &Entry, state: &AppState) -> &'static str {
    match e.last_outcome.as_deref() {
        Some("delivered" | "user_not_found") => "done",
        Some("superseded") => "superseded",
        Some("purged") => "purged",
        Some("resent") => "resent",
        Some("parked") => "parked",
        // No outcome yet, or replayed: in the queue.
        _ if state.control.is_paused(&e.facts.route) => "held",
        _ => "waiting",
    }
}

fn job_json(e: &Entry, state: &AppState) -> Value {
    let f = &e.facts;
    let mut v = json!({
        "id": f.job_id,
        "route": f.route,
        "action": f.action,
        "org_id": f.org_id,
        "notification_id": f.notification_id,
        "record_id": f.record_id,
        "subject_key": f.subject_key,
        "received_at": rfc3339(f.received_at_ms),
        "stored_at": rfc3339(f.stored_at_ms),
        "outcome": e.last_outcome.as_deref().unwrap_or("pending"),
        "outcome_at": e.last_outcome_at_ms.map(rfc3339),
        "centercode_status": e.last_status,
        "state": state_of(e, state),
    });
    if !e.attempts.is_empty() || !e.outcomes.is_empty() {
        v["attempts"] = e
            .attempts
            .iter()
            .map(|a| {
                json!({
                    "attempt": a.attempt,
                    "started_at": rfc3339(a.started_at_ms),
                    "duration_ms": a.duration_ms,
                    "status": a.status,
                    "error_class": a.error_class,
                    "outcome": a.outcome,
                    "response": a.response,
                })
            })
            .collect();
        v["outcomes"] = e
            .outcomes
            .iter()
            .map(|o| json!({"outcome": o.outcome, "reason": o.reason, "at": rfc3339(o.at_ms)}))
            .collect();
        v["payload_kept"] = json!(e.payload.is_some());
    }
    v
}

fn no_ledger(why: &str) -> HttpResponse {
    error(StatusCode::NOT_IMPLEMENTED, "no_ledger", why)
}

async fn answer(state: &AppState, q: LedgerQuery) -> HttpResponse {
    let limit = q.limit;
    match state.queue.ledger_query(q).await {
        Ok(entries) => {
            let next = (entries.len() == limit)
                .then(|| entries.last().map(LedgerCursor::after))
                .flatten();
            let mut body = json!({
                "jobs": entries.iter().map(|e| job_json(e, state)).collect::<Vec<_>>(),
                "next_cursor": next,
            });
            // Where jobs enter the ledger only when a worker takes them, say how many wait
            // in the queue, so "nothing recorded" is never read as "lost".
            if !state.queue.ledger_sees_stored_jobs() {
                if let Ok(s) = state.queue.stats().await {
                    body["not_yet_recorded"] = json!(s.ready + s.retrying + s.held);
                }
            }
            HttpResponse::Ok().json(body)
        }
        Err(crate::queue::QueueError::NotReady(why)) if !state.queue.keeps_ledger() => {
            no_ledger(&why)
        }
        Err(e) => queue_error(e),
    }
}

/// `GET /admin/jobs`: jobs in any state, newest stored first, by record, notification,
/// route, action, outcome and time; `undelivered=true` for the ones that need a look.
async fn list(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    let filters: Filters = match parse_query(&req) {
        Ok(f) => f,
        Err(refused) => return *refused,
    };
    if filters.email.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "email: an e-mail is never accepted in a URL; POST it to /admin/jobs/search",
        );
    }
    match filters.query() {
        Ok(q) => answer(&state, q).await,
        Err(refused) => *refused,
    }
}

/// `POST /admin/jobs/search` with `{"email": …}` and any of the list filters: the jobs of that
/// person, found by subject key. The e-mail travels in the body only, never in a URL.
async fn search(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    let mut filters: Filters = match parse_json_body(&req, payload).await {
        Ok(b) => b,
        Err(refused) => return *refused,
    };
    if let Some(email) = filters.email.take() {
        if !state.queue.keeps_ledger() {
            return no_ledger(crate::queue::NO_LEDGER);
        }
        let secret = state.settings.ledger.subject_key.expose_secret();
        if secret.is_empty() {
            return error(
                StatusCode::CONFLICT,
                "no_subject_key",
                "ledger.subject_key is not set, so no subject keys were recorded",
            );
        }
        if !email.contains('@') {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "email: expected an e-mail address",
            );
        }
        filters.subject_key = Some(crate::ledger::subject_key(secret.as_bytes(), &email));
    }
    if filters.subject_key.is_none()
        && filters.record_id.is_none()
        && filters.notification_id.is_none()
    {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "give email, subject_key, record_id or notification_id",
        );
    }
    match filters.query() {
        Ok(q) => answer(&state, q).await,
        Err(refused) => *refused,
    }
}

async fn one(state: &AppState, id: &str) -> Result<Entry, Refused> {
    let q = LedgerQuery {
        job_id: Some(id.to_owned()),
        history: true,
        limit: 1,
        ..LedgerQuery::default()
    };
    match state.queue.ledger_query(q).await {
        Ok(mut entries) if !entries.is_empty() => Ok(entries.remove(0)),
        Ok(_) => Err(refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("nothing recorded for job {id}"),
        )),
        Err(crate::queue::QueueError::NotReady(why)) if !state.queue.keeps_ledger() => {
            Err(Box::new(no_ledger(&why)))
        }
        Err(e) => Err(Box::new(queue_error(e))),
    }
}

/// `GET /admin/jobs/{id}`: one job with every attempt and outcome.
async fn show(req: HttpRequest, state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    match one(&state, &id).await {
        Ok(e) => HttpResponse::Ok().json(job_json(&e, &state)),
        Err(refused) => *refused,
    }
}

/// `POST /admin/jobs/{id}/resend`: store a delivered job again, as a new job, from the
/// payload its route keeps (`keep_payload_days`), e.g. feedback Centercode lost. Refused with
/// the reason when the job is not completed (a parked job is replayed instead) or its payload
/// is not kept.
async fn resend(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    let entry = match one(&state, &id).await {
        Ok(e) => e,
        Err(refused) => return *refused,
    };
    let outcome = entry.last_outcome.as_deref().unwrap_or("pending");
    if !matches!(outcome, "delivered" | "user_not_found" | "resent") {
        let hint = if outcome == "parked" {
            format!("; a parked job is replayed: relay parked replay --ids {id}")
        } else {
            String::new()
        };
        return error(
            StatusCode::CONFLICT,
            "not_completed",
            &format!("job {id} is {outcome}, not delivered: only a completed job is resent{hint}"),
        );
    }
    let Some(route) = state.settings.route(&entry.facts.route) else {
        return error(
            StatusCode::CONFLICT,
            "unknown_route",
            &format!(
                "job {id}'s route `{}` is no longer configured",
                entry.facts.route
            ),
        );
    };
    let Some(payload) = entry.payload.clone() else {
        return error(
            StatusCode::CONFLICT,
            "payload_not_kept",
            &format!(
                "job {id}'s payload is not kept: route `{}` keeps completed payloads for {} days (keep_payload_days), and this one is gone or was never kept",
                route.name, route.keep_payload_days
            ),
        );
    };
    let job: crate::queue::Job = match serde_json::from_value(payload) {
        Ok(j) => j,
        Err(_) => {
            return error(
                StatusCode::CONFLICT,
                "payload_not_kept",
                &format!("job {id}'s kept payload is not a job this relay can deliver"),
            )
        }
    };
    let new_id = uuid::Uuid::new_v4().to_string();
    let f = &entry.facts;
    let new_job = crate::queue::NewJob {
        received_at_ms: crate::queue::now_ms(),
        id: new_id.clone(),
        route: f.route.clone(),
        action: route.action,
        dedupe_key: None,
        body_hash: None,
        org_id: f.org_id.clone(),
        notification_id: f.notification_id.clone(),
        record_id: f.record_id.clone(),
        job,
    };
    if let Err(e) = state.queue.enqueue(vec![new_job]).await {
        return queue_error(e);
    }
    let note = FinalOutcome {
        outcome: "resent".into(),
        reason: Some(format!("as job {new_id}")),
        at_ms: crate::queue::now_ms(),
        kept_payload: None,
    };
    if let Err(e) = state.queue.ledger_record(f.clone(), None, Some(note)).await {
        // The new job is stored and will be delivered; only the note on the old one is missing.
        tracing::warn!(error = %e, "could not note the resend in the ledger");
    }
    tracing::info!(job_id = %id, new_job_id = %new_id, "job resent from its kept payload");
    HttpResponse::Accepted().json(json!({"job_id": new_id, "resent_from": id.as_str()}))
}

/// `GET /admin/jobs/export?action=&since=&until=&format=csv|json`: one row per job (the
/// record a data-protection officer files for erasures), streamed page by page so a year of
/// rows never sits in memory.
async fn export(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Export {
        action: Option<String>,
        route: Option<String>,
        since: Option<i64>,
        until: Option<i64>,
        format: Option<String>,
    }
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    let p: Export = match parse_query(&req) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let csv = match p.format.as_deref() {
        None | Some("csv") => true,
        Some("json") => false,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                "format: expected csv or json",
            )
        }
    };
    if !state.queue.keeps_ledger() {
        return no_ledger(crate::queue::NO_LEDGER);
    }
    let base = LedgerQuery {
        action: p.action,
        route: p.route,
        since_ms: p.since.map(|s| s.saturating_mul(1000)),
        until_ms: p.until.map(|s| s.saturating_mul(1000)),
        limit: crate::ledger::MAX_PAGE,
        ..LedgerQuery::default()
    };
    let queue = state.queue.clone();
    /// Where the stream is: not started, after a cursor, or done.
    enum Pos {
        Start,
        After(LedgerCursor),
        Done,
    }
    let pages = futures_util::stream::unfold(Pos::Start, move |pos| {
        let queue = queue.clone();
        let mut q = base.clone();
        async move {
            let first = matches!(pos, Pos::Start);
            match pos {
                Pos::Done => return None,
                Pos::After(c) => q.after = Some(c),
                Pos::Start => {}
            }
            let entries = match queue.ledger_query(q).await {
                Ok(e) => e,
                Err(e) => {
                    // The status is sent already: end the body short, so the consumer sees a
                    // truncated file (no closing `]`) rather than a complete-looking one.
                    tracing::error!(error = %e, "ledger export stopped");
                    return Some((
                        Err(std::io::Error::other("ledger export stopped")),
                        Pos::Done,
                    ));
                }
            };
            let full = entries.len() == crate::ledger::MAX_PAGE;
            let mut out = String::new();
            if first {
                out.push_str(if csv { EXPORT_CSV_HEADER } else { "[" });
            }
            for (i, e) in entries.iter().enumerate() {
                if csv {
                    out.push_str(&export_csv_row(e));
                } else {
                    if !(first && i == 0) {
                        out.push(',');
                    }
                    out.push_str(&export_json_row(e).to_string());
                    out.push('\n');
                }
            }
            let next = match entries.last() {
                Some(e) if full => Pos::After(LedgerCursor {
                    stored_at_ms: e.facts.stored_at_ms,
                    job_id: e.facts.job_id.clone(),
                }),
                _ => {
                    if !csv {
                        out.push(']');
                    }
                    Pos::Done
                }
            };
            Some((Ok(web::Bytes::from(out)), next))
        }
    });
    HttpResponse::Ok()
        .content_type(if csv {
            "text/csv; charset=utf-8"
        } else {
            "application/json"
        })
        .streaming(pages)
}

const EXPORT_CSV_HEADER: &str = "job_id,route,action,notification_id,record_id,subject_key,received_at,stored_at,completed_at,outcome,centercode_status\n";

/// When the job completed: the time of its ending outcome, if it has one.
fn completed_at(e: &Entry) -> Option<String> {
    e.last_outcome
        .as_deref()
        .filter(|o| crate::ledger::ENDING_OUTCOMES.contains(o))
        .and(e.last_outcome_at_ms)
        .map(rfc3339)
}

fn export_json_row(e: &Entry) -> Value {
    let f = &e.facts;
    json!({
        "job_id": f.job_id,
        "route": f.route,
        "action": f.action,
        "notification_id": f.notification_id,
        "record_id": f.record_id,
        "subject_key": f.subject_key,
        "received_at": rfc3339(f.received_at_ms),
        "stored_at": rfc3339(f.stored_at_ms),
        "completed_at": completed_at(e),
        "outcome": e.last_outcome.as_deref().unwrap_or("pending"),
        "centercode_status": e.last_status,
    })
}

fn export_csv_row(e: &Entry) -> String {
    let f = &e.facts;
    let cells = [
        f.job_id.clone(),
        f.route.clone(),
        f.action.clone(),
        f.notification_id.clone().unwrap_or_default(),
        f.record_id.clone().unwrap_or_default(),
        f.subject_key.clone().unwrap_or_default(),
        rfc3339(f.received_at_ms),
        rfc3339(f.stored_at_ms),
        completed_at(e).unwrap_or_default(),
        e.last_outcome.clone().unwrap_or_else(|| "pending".into()),
        e.last_status.map(|s| s.to_string()).unwrap_or_default(),
    ];
    let mut line = cells
        .iter()
        .map(|c| csv_cell(c))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

/// One CSV cell: quoted when it holds a separator or quote, and defused when a spreadsheet
/// would read it as a formula (an idempotency key is chosen by the sender).
fn csv_cell(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_never_formulas() {
        assert_eq!(csv_cell("003abc"), "003abc");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_cell("-1,2"), "\"'-1,2\"");
    }
}
