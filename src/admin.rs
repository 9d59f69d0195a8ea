//! The admin API under `/admin/`: list, show, replay and purge parked jobs; pause and resume
//! routes; every job in the ledger (`/admin/jobs`, see [`jobs`]). Off unless `admin.token` is set; every call needs `Authorization: Bearer <token>`.
//! Answers never contain API keys or session ids, and e-mail addresses are masked.

use crate::inbound::{error_json, AppState};
use crate::mapping;
use crate::queue::{ParkedFilter, ParkedJob};
use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

mod jobs;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        jobs::configure(web::scope("/admin"))
            .route("/parked", web::get().to(list))
            .route("/parked", web::delete().to(purge))
            .route("/parked/replay", web::post().to(replay))
            .route("/parked/{id}", web::get().to(show))
            .route("/routes", web::get().to(routes))
            .route("/routes/{route}/pause", web::post().to(pause))
            .route("/routes/{route}/resume", web::post().to(resume))
            .route("/openapi.json", web::get().to(openapi)),
    );
}

/// `docs/openapi.json`: the OpenAPI 3.1 document of every endpoint, built into the binary.
const OPENAPI: &str = include_str!("../docs/openapi.json");

/// The OpenAPI document, behind the admin token like every `/admin` route (the callout part
/// that Salesforce imports is in the repository's `docs/openapi.json` for anyone).
async fn openapi(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

fn error(status: actix_web::http::StatusCode, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(error_json(code, message))
}

/// An admin error answer, boxed (an `HttpResponse` is large to move through `Result`s).
type Refused = Box<HttpResponse>;

fn refuse(status: actix_web::http::StatusCode, code: &str, message: &str) -> Refused {
    Box::new(error(status, code, message))
}

/// `None` when the request carries the admin token; otherwise the refusal to send.
fn deny(req: &HttpRequest, state: &AppState) -> Option<HttpResponse> {
    use actix_web::http::StatusCode;
    let Some(token) = state.settings.admin.token() else {
        return Some(error(
            StatusCode::NOT_FOUND,
            "admin_disabled",
            "the admin API is off; set admin.token",
        ));
    };
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Digests make the comparison constant-time whatever the lengths.
    let ok: bool = Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(token.expose_secret().as_bytes()))
        .into();
    if ok {
        None
    } else {
        Some(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin token",
        ))
    }
}

/// Filter fields shared by list, replay and purge. Times are Unix seconds.
#[derive(Debug, Default, Deserialize)]
pub struct FilterParams {
    pub route: Option<String>,
    pub action: Option<String>,
    pub org_id: Option<String>,
    pub record_id: Option<String>,
    pub reason: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub ids: Option<Vec<String>>,
    #[serde(default)]
    pub all: bool,
}

impl FilterParams {
    fn filter(&self) -> ParkedFilter {
        ParkedFilter {
            route: self.route.clone(),
            action: self.action.clone(),
            org_id: self.org_id.clone(),
            record_id: self.record_id.clone(),
            reason: self.reason.clone(),
            since_ms: self.since.map(|s| s * 1000),
            until_ms: self.until.map(|s| s * 1000),
            ids: self.ids.clone(),
        }
    }

    /// The queue filter, refusing an empty or oversized id list (an empty `ids` would
    /// otherwise match nothing and look like success).
    fn checked_filter(&self) -> Result<ParkedFilter, Refused> {
        let mut filter = self.filter();
        if let Some(ids) = &mut filter.ids {
            ids.sort();
            ids.dedup();
            if ids.is_empty() || ids.len() > MAX_IDS {
                return Err(refuse(
                    actix_web::http::StatusCode::BAD_REQUEST,
                    "bad_ids",
                    &format!("ids must name between 1 and {MAX_IDS} job ids"),
                ));
            }
        }
        Ok(filter)
    }

    /// Bulk actions need a filter or an explicit `all`, so an empty request does nothing.
    fn selects_something(&self) -> bool {
        self.all || self.filter() != ParkedFilter::default()
    }
}

/// `user@example.org` → `u***@example.org`.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => format!("{}***@{domain}", local.chars().next().unwrap_or('*')),
        None => "***".into(),
    }
}

/// RFC 3339 UTC from milliseconds since the epoch.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

fn job_json(j: &ParkedJob) -> Value {
    json!({
        "id": j.id,
        "route": j.route,
        "action": j.action,
        "org_id": j.org_id,
        "notification_id": j.notification_id,
        "record_id": j.record_id,
        "attempts": j.attempts,
        "first_seen": rfc3339(j.first_seen_ms),
        "parked_at": rfc3339(j.parked_at_ms),
        "reason": j.reason,
        "last_status": j.last_status,
        "replays": j.replays,
        "previous_reasons": j.history,
    })
}

/// Query-string form of the filter (serde's `flatten` cannot parse numbers from a query).
/// `ids` is comma-separated (`ids=a,b`), since a query string has no arrays.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryParams {
    ids: Option<String>,
    route: Option<String>,
    action: Option<String>,
    org_id: Option<String>,
    record_id: Option<String>,
    reason: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    #[serde(default)]
    all: bool,
    limit: Option<usize>,
    cursor: Option<String>,
    #[serde(default)]
    confirm: bool,
}

impl QueryParams {
    fn filter(&self) -> FilterParams {
        FilterParams {
            route: self.route.clone(),
            action: self.action.clone(),
            org_id: self.org_id.clone(),
            record_id: self.record_id.clone(),
            reason: self.reason.clone(),
            since: self.since,
            until: self.until,
            ids: self.ids.as_deref().map(|ids| {
                ids.split(',')
                    .map(str::trim)
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            all: self.all,
        }
    }
}

async fn list(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    let q: QueryParams = match parse_query(&req) {
        Ok(q) => q,
        Err(refused) => return *refused,
    };
    let filter = match q.filter().checked_filter() {
        Ok(f) => f,
        Err(refused) => return *refused,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let unmatched = match unmatched_ids(&state, &filter).await {
        Ok(u) => u,
        Err(e) => return queue_error(e),
    };
    match state
        .queue
        .parked_page(filter, limit, q.cursor.clone())
        .await
    {
        Ok(jobs) => {
            let next = (jobs.len() == limit)
                .then(|| jobs.last().map(crate::queue::ParkedCursor::after))
                .flatten();
            let mut body =
                json!({"jobs": jobs.iter().map(job_json).collect::<Vec<_>>(), "next_cursor": next});
            if let Some(unmatched) = unmatched {
                body["unmatched_ids"] = json!(unmatched);
            }
            HttpResponse::Ok().json(body)
        }
        Err(e) => queue_error(e),
    }
}

/// Parse the query string only after the token check, so a caller without the token learns
/// nothing from parse errors; a malformed query is a JSON 400 like every other admin error.
fn parse_query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T, Refused> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| {
            refuse(
                actix_web::http::StatusCode::BAD_REQUEST,
                "bad_query",
                &format!("malformed query string: {e}"),
            )
        })
}

/// Largest admin request body (a replay filter with up to `MAX_IDS` ids fits easily).
const MAX_ADMIN_BODY: usize = 256 * 1024;
/// Most ids one list, replay or purge may name.
const MAX_IDS: usize = 1000;

/// Read and parse a JSON body, after the token check, answering errors in the admin shape.
async fn parse_json_body<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<T, Refused> {
    use actix_web::http::StatusCode;
    let body = crate::inbound::read_body(
        req,
        payload,
        MAX_ADMIN_BODY,
        std::time::Duration::from_secs(10),
    )
    .await
    .map_err(|e| refuse(StatusCode::BAD_REQUEST, "bad_body", &e.to_string()))?;
    let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
    serde_json::from_slice(body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            "bad_body",
            &format!("malformed JSON body: {e}"),
        )
    })
}

/// With an `ids` filter: the ids that match nothing (combined with the other filters), so a
/// typo is reported instead of silently ignored. `None` without an `ids` filter.
async fn unmatched_ids(
    state: &AppState,
    filter: &ParkedFilter,
) -> Result<Option<Vec<String>>, crate::queue::QueueError> {
    let Some(ids) = &filter.ids else {
        return Ok(None);
    };
    let found = state
        .queue
        .parked_page(filter.clone(), ids.len().max(1), None)
        .await?;
    let found: std::collections::HashSet<&str> = found.iter().map(|j| j.id.as_str()).collect();
    Ok(Some(
        ids.iter()
            .filter(|id| !found.contains(id.as_str()))
            .cloned()
            .collect(),
    ))
}

async fn show(req: HttpRequest, state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    let filter = ParkedFilter {
        ids: Some(vec![id.to_string()]),
        ..ParkedFilter::default()
    };
    let (parked, job) = match (
        state.queue.parked_page(filter, 1, None).await,
        state.queue.load(&id).await,
    ) {
        (Ok(p), Ok(j)) => (p, j),
        (Err(e), _) | (_, Err(e)) => return queue_error(e),
    };
    let (Some(parked), Some(job)) = (parked.first(), job) else {
        return error(
            actix_web::http::StatusCode::NOT_FOUND,
            "not_found",
            "no parked job with this id",
        );
    };
    let mut body = job_json(parked);
    // What a replay would send now, with the current mapping (key and e-mail masked).
    body["request_now"] = match state.settings.route(&job.route) {
        None => json!({"error": format!("route `{}` is no longer configured", job.route)}),
        Some(route) => match mapping::to_centercode(&job.job, route) {
            Ok(mut request) => {
                request.find = request.find.as_deref().map(mask_email);
                json!({"text": request.render_masked()})
            }
            Err(e) => json!({"error": e.to_string()}),
        },
    };
    HttpResponse::Ok().json(body)
}

#[derive(Debug, Deserialize)]
struct ReplayBody {
    #[serde(flatten)]
    filter: FilterParams,
    #[serde(default)]
    dry_run: bool,
    limit: Option<usize>,
}

async fn replay(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    let body: ReplayBody = match parse_json_body(&req, payload).await {
        Ok(b) => b,
        Err(refused) => return *refused,
    };
    if !body.filter.selects_something() {
        return error(
            actix_web::http::StatusCode::BAD_REQUEST,
            "no_filter",
            "give a filter, ids, or \"all\": true",
        );
    }
    let filter = match body.filter.checked_filter() {
        Ok(f) => f,
        Err(refused) => return *refused,
    };
    let unmatched = match unmatched_ids(&state, &filter).await {
        Ok(u) => u,
        Err(e) => return queue_error(e),
    };
    let matched = match state.queue.count_parked(filter.clone()).await {
        Ok(n) => n,
        Err(e) => return queue_error(e),
    };
    let with_unmatched = |mut v: Value| {
        if let Some(unmatched) = &unmatched {
            v["unmatched_ids"] = json!(unmatched);
        }
        v
    };
    if body.dry_run {
        return HttpResponse::Ok().json(with_unmatched(
            json!({"matched": matched, "moved": 0, "dry_run": true}),
        ));
    }
    match state.queue.replay_matching(filter, body.limit).await {
        Ok(moved) => {
            state.metrics.inc("relay_replayed_total", &[], moved);
            tracing::info!(matched, moved, "parked jobs replayed");
            HttpResponse::Ok().json(with_unmatched(
                json!({"matched": matched, "moved": moved, "dry_run": false}),
            ))
        }
        Err(e) => queue_error(e),
    }
}

async fn purge(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    let q: QueryParams = match parse_query(&req) {
        Ok(q) => q,
        Err(refused) => return *refused,
    };
    if !q.confirm {
        return error(
            actix_web::http::StatusCode::BAD_REQUEST,
            "confirm_required",
            "purging deletes jobs for good; add confirm=true",
        );
    }
    if !q.filter().selects_something() {
        return error(
            actix_web::http::StatusCode::BAD_REQUEST,
            "no_filter",
            "give a filter, ids, or all=true",
        );
    }
    let filter = match q.filter().checked_filter() {
        Ok(f) => f,
        Err(refused) => return *refused,
    };
    let unmatched = match unmatched_ids(&state, &filter).await {
        Ok(u) => u,
        Err(e) => return queue_error(e),
    };
    match state.queue.purge_parked(filter).await {
        Ok(n) => {
            tracing::warn!(purged = n, "parked jobs purged");
            let mut body = json!({"purged": n});
            if let Some(unmatched) = unmatched {
                body["unmatched_ids"] = json!(unmatched);
            }
            HttpResponse::Ok().json(body)
        }
        Err(e) => queue_error(e),
    }
}

/// Each route with its shared pause state and, per live process, what that process
/// believes (process id, role, since).
async fn routes(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    let refresh = std::time::Duration::from_millis(state.settings.control.refresh_ms);
    let (records, processes) = match (
        crate::shared_control::records(&state.queue).await,
        crate::shared_control::live_processes(&state.queue, refresh).await,
    ) {
        (Ok(r), Ok(p)) => (r, p),
        (Err(e), _) | (_, Err(e)) => return queue_error(e),
    };
    let routes: Vec<Value> = state
        .settings
        .routes
        .iter()
        .map(|r| {
            let record = records.get(&r.name);
            let beliefs: Vec<Value> = processes
                .iter()
                .filter_map(|p| {
                    let b = p.beliefs.get(&r.name)?;
                    Some(json!({
                        "process_id": p.process_id,
                        "role": p.role,
                        "paused": b.paused,
                        "since": (b.since_ms > 0).then(|| rfc3339(b.since_ms)),
                        "seen_at": rfc3339(p.seen_at_ms),
                    }))
                })
                .collect();
            json!({
                "name": r.name,
                "action": r.action.as_str(),
                "paused": record.is_some_and(|rec| rec.paused),
                "changed_at": record.map(|rec| rfc3339(rec.changed_at_ms)),
                "changed_by": record.map(|rec| rec.changed_by.clone()),
                "insecure_open": r.insecure_open,
                "processes": beliefs,
            })
        })
        .collect();
    HttpResponse::Ok().json(json!({ "routes": routes }))
}

async fn pause(
    req: HttpRequest,
    state: web::Data<AppState>,
    route: web::Path<String>,
) -> HttpResponse {
    set_paused(req, state, route.into_inner(), true).await
}

async fn resume(
    req: HttpRequest,
    state: web::Data<AppState>,
    route: web::Path<String>,
) -> HttpResponse {
    set_paused(req, state, route.into_inner(), false).await
}

async fn set_paused(
    req: HttpRequest,
    state: web::Data<AppState>,
    route: String,
    paused: bool,
) -> HttpResponse {
    if let Some(denied) = deny(&req, &state) {
        return denied;
    }
    if state.settings.route(&route).is_none() {
        return error(
            actix_web::http::StatusCode::NOT_FOUND,
            "unknown_route",
            "no route with this name",
        );
    }
    // The shared record first: if it cannot be written, nothing changed anywhere (503).
    if let Err(e) =
        crate::shared_control::set_paused(&state.queue, &state.control, &route, paused, "admin")
            .await
    {
        return queue_error(e);
    }
    if !paused {
        // Jobs set aside while paused (RabbitMQ) go back to work now; the workers' periodic
        // sweep catches whatever this misses.
        match state.queue.unhold(Some(&route), &[]).await {
            Ok(moved) if moved > 0 => {
                tracing::info!(route = %route, moved, "held jobs moved back to work")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(route = %route, error = %e, "could not move held jobs back yet; workers will")
            }
        }
    }
    tracing::info!(route = %route, paused, "route pause state changed for every process");
    HttpResponse::Ok().json(json!({"route": route, "paused": paused}))
}

fn queue_error(e: crate::queue::QueueError) -> HttpResponse {
    tracing::error!(error = %e, "admin request failed on the queue");
    error(
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
        "queue_unavailable",
        "the queue did not answer; try again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_715_678_467_123), "2024-05-14T09:21:07.123Z");
    }

    #[test]
    fn masks_emails() {
        assert_eq!(mask_email("marta@example.org"), "m***@example.org");
        assert_eq!(mask_email("nonsense"), "***");
    }
}
