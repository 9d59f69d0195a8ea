//! Parked jobs: the list with the CLI's filters, one job with the request a replay would
//! send now, replay (a dry-run count, a confirmation, then batches with progress) and purge
//! (a typed confirmation).

use super::html::{self, esc, url_enc, Section};
use super::{action_session, page_session, see_other, Form};
use crate::admin::mask_email;
use crate::inbound::AppState;
use crate::queue::{now_ms, ParkedCursor, ParkedFilter, ParkedJob};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use std::fmt::Write;

/// The filter fields, as named by `relay parked list` (without the dashes).
const FILTER_FIELDS: [&str; 8] = [
    "route",
    "action",
    "org_id",
    "record_id",
    "reason",
    "since",
    "until",
    "ids",
];
/// Most jobs one replay batch moves (the script asks batch after batch and shows progress).
const BATCH: usize = 25;
/// Most ids one selection may name (as the admin API).
const MAX_IDS: usize = 1000;

/// The queue filter a form or query string describes: the CLI's filters, `since`/`until`
/// as Unix seconds, RFC 3339 or an age (`2h`), `ids` repeated or comma-separated.
fn filter_of(form: &Form) -> Result<ParkedFilter, String> {
    let text = |name: &str| form.get(name).map(str::to_owned);
    let time = |name: &str| -> Result<Option<i64>, String> {
        form.get(name)
            .map(|t| {
                crate::admin_cli::parse_time(t)
                    .map(|secs| secs.saturating_mul(1000))
                    .map_err(|e| format!("{name}: {e}"))
            })
            .transpose()
    };
    Ok(ParkedFilter {
        route: text("route"),
        action: text("action"),
        org_id: text("org_id"),
        record_id: text("record_id"),
        reason: text("reason"),
        since_ms: time("since")?,
        until_ms: time("until")?,
        ids: ids_of(form, "ids")?,
    })
}

/// The job ids of field `name` (repeated or comma-separated), sorted, at most [`MAX_IDS`].
fn ids_of(form: &Form, name: &str) -> Result<Option<Vec<String>>, String> {
    let mut ids: Vec<String> = form
        .all(name)
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids.dedup();
    if ids.len() > MAX_IDS {
        return Err(format!("select at most {MAX_IDS} jobs at a time"));
    }
    Ok((!ids.is_empty()).then_some(ids))
}

/// The filter fields of `form` again, as hidden inputs (carried into the confirmation).
fn hidden_filter(form: &Form) -> String {
    let mut out = String::new();
    for name in FILTER_FIELDS {
        // The filter's ids travel apart from the ticked boxes (see `selection`).
        let field = if name == "ids" { "ids_filter" } else { name };
        for v in form.all(name) {
            let _ = write!(
                out,
                "<input type=\"hidden\" name=\"{field}\" value=\"{}\">",
                esc(v)
            );
        }
    }
    out
}

/// The filter fields of `form` as a query string (for links).
fn query_of(form: &Form) -> String {
    FILTER_FIELDS
        .iter()
        .flat_map(|name| {
            form.all(name)
                .map(move |v| format!("{name}={}", url_enc(v)))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// What a filter selects, in words.
fn describe(filter: &ParkedFilter) -> String {
    let mut parts = Vec::new();
    if let Some(ids) = &filter.ids {
        parts.push(format!("{} selected job(s)", ids.len()));
    }
    for (name, v) in [
        ("route", &filter.route),
        ("action", &filter.action),
        ("org", &filter.org_id),
        ("record", &filter.record_id),
        ("reason containing", &filter.reason),
    ] {
        if let Some(v) = v {
            parts.push(format!("{name} {v}"));
        }
    }
    if let Some(t) = filter.since_ms {
        parts.push(format!("parked since {}", crate::admin::rfc3339(t)));
    }
    if let Some(t) = filter.until_ms {
        parts.push(format!("parked before {}", crate::admin::rfc3339(t)));
    }
    if parts.is_empty() {
        "every parked job".into()
    } else {
        parts.join(", ")
    }
}

fn queue_failed(e: crate::queue::QueueError) -> HttpResponse {
    tracing::error!(error = %e, "console request failed on the queue");
    super::refused(
        StatusCode::SERVICE_UNAVAILABLE,
        "the queue did not answer; try again",
    )
}

fn filter_form(form: &Form, state: &AppState) -> String {
    let value = |name: &str| esc(form.get(name).unwrap_or(""));
    let mut routes = String::from("<option value=\"\">any</option>");
    for r in &state.settings.routes {
        let selected = if form.get("route") == Some(r.name.as_str()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(routes, "<option{selected}>{}</option>", esc(&r.name));
    }
    let mut actions = String::from("<option value=\"\">any</option>");
    for a in ["remove_user", "create_feedback", "store_user_data"] {
        let selected = if form.get("action") == Some(a) {
            " selected"
        } else {
            ""
        };
        let _ = write!(actions, "<option{selected}>{a}</option>");
    }
    let text = |name: &str, label: &str, hint: &str| {
        format!(
            "<label>{label}<input name=\"{name}\" value=\"{}\" placeholder=\"{hint}\"></label>",
            value(name)
        )
    };
    format!(
        "<form method=\"get\" action=\"/console/parked\" class=\"filters\" aria-label=\"Filter parked jobs\">\
<label>Route<select name=\"route\">{routes}</select></label>\
<label>Action<select name=\"action\">{actions}</select></label>{}{}{}{}{}{}\
<button type=\"submit\">Filter</button> <a href=\"/console/parked\">Clear</a></form>",
        text("org_id", "Org id", ""),
        text("record_id", "Record id", ""),
        text("reason", "Reason contains", ""),
        text("since", "Parked since", "2h, 2026-12-01T10:00:00Z"),
        text("until", "Parked before", "unix seconds, RFC 3339, age"),
        text("ids", "Job ids", "a,b"),
    )
}

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let session = match page_session(&req, &state) {
        Ok(s) => s,
        Err(refusal) => return *refusal,
    };
    let q = Form::parse(req.query_string());
    let mut body = String::new();
    for (name, verb) in [("replayed", "Replayed"), ("purged", "Purged")] {
        if let Some(n) = q.get(name).and_then(|n| n.parse::<u64>().ok()) {
            body.push_str(&html::notice(&format!("{verb} {n} job(s)."), false));
        }
    }
    body.push_str(&filter_form(&q, &state));
    let filter = match filter_of(&q) {
        Ok(f) => f,
        Err(e) => {
            body.push_str(&html::notice(&e, true));
            return super::html(
                StatusCode::BAD_REQUEST,
                html::page("Parked", Some(Section::Parked), Some(&session.csrf), &body),
            );
        }
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    let total = match state.queue.count_parked(filter.clone()).await {
        Ok(n) => n,
        Err(e) => return queue_failed(e),
    };
    let jobs = match state
        .queue
        .parked_page(filter.clone(), limit, q.get("cursor").map(str::to_owned))
        .await
    {
        Ok(j) => j,
        Err(e) => return queue_failed(e),
    };
    let now = now_ms();
    let _ = write!(
        body,
        "<p id=\"count\">{total} parked job(s) match: {}.</p>",
        esc(&describe(&filter))
    );
    if !jobs.is_empty() {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/console/parked/replay\" class=\"selection\">{}{}<input type=\"hidden\" name=\"step\" value=\"count\">\
<div class=\"scroll\"><table class=\"jobs\"><caption class=\"sr-only\">Parked jobs, oldest parked first</caption><thead><tr>\
<th scope=\"col\"><span class=\"sr-only\">Select</span></th><th scope=\"col\">Job</th><th scope=\"col\">Route</th><th scope=\"col\">Reason</th>\
<th scope=\"col\" class=\"num\">Attempts</th><th scope=\"col\">Last status</th><th scope=\"col\">Salesforce ids</th><th scope=\"col\">Parked</th></tr></thead><tbody>",
            super::html::csrf_field(&session.csrf),
            hidden_filter(&q),
        );
        for j in &jobs {
            body.push_str(&row(j, now));
        }
        let _ = write!(
            body,
            "</tbody></table></div><div class=\"actions\">\
<button type=\"submit\" name=\"scope\" value=\"selected\">Replay selected…</button>\
<button type=\"submit\" name=\"scope\" value=\"filter\">Replay all {total} matching…</button>\
<button type=\"submit\" name=\"scope\" value=\"selected\" formaction=\"/console/parked/purge\" class=\"danger\">Purge selected…</button>\
<button type=\"submit\" name=\"scope\" value=\"filter\" formaction=\"/console/parked/purge\" class=\"danger\">Purge all {total} matching…</button>\
</div></form>"
        );
        if jobs.len() == limit {
            if let Some(last) = jobs.last() {
                let _ = write!(
                    body,
                    "<p><a rel=\"next\" href=\"/console/parked?{}&amp;limit={limit}&amp;cursor={}\">Next page</a></p>",
                    esc(&query_of(&q)),
                    esc(&url_enc(&ParkedCursor::after(last)))
                );
            }
        }
    }
    super::html(
        StatusCode::OK,
        html::page("Parked", Some(Section::Parked), Some(&session.csrf), &body),
    )
}

fn row(j: &ParkedJob, now: i64) -> String {
    let ids = [
        ("record", &j.record_id),
        ("notification", &j.notification_id),
        ("org", &j.org_id),
    ]
    .iter()
    .filter_map(|(k, v)| {
        v.as_ref()
            .map(|v| format!("<span class=\"id\">{k} {}</span>", esc(v)))
    })
    .collect::<Vec<_>>()
    .join(" ");
    format!(
        "<tr data-job=\"{id}\"><td><input type=\"checkbox\" name=\"ids\" value=\"{id}\" id=\"sel-{id}\" aria-label=\"Select job {id}\"></td>\
<td><a href=\"/console/parked/{}\"><code>{id}</code></a></td><td>{}<br><small>{}</small></td><td class=\"reason\">{}</td>\
<td class=\"num\">{}</td><td>{}</td><td>{ids}</td><td>{} ago</td></tr>",
        url_enc(&j.id),
        esc(&j.route),
        esc(&j.action),
        esc(&j.reason),
        j.attempts,
        j.last_status.map_or("—".to_owned(), |s| s.to_string()),
        html::age(Some(j.parked_at_ms), now),
        id = esc(&j.id),
    )
}

pub async fn show(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> HttpResponse {
    let session = match page_session(&req, &state) {
        Ok(s) => s,
        Err(refusal) => return *refusal,
    };
    let filter = ParkedFilter {
        ids: Some(vec![id.to_string()]),
        ..ParkedFilter::default()
    };
    let (parked, job) = match (
        state.queue.parked_page(filter, 1, None).await,
        state.queue.load(&id).await,
    ) {
        (Ok(p), Ok(j)) => (p, j),
        (Err(e), _) | (_, Err(e)) => return queue_failed(e),
    };
    let (Some(p), Some(job)) = (parked.first(), job) else {
        return super::html(
            StatusCode::NOT_FOUND,
            html::page(
                "Not parked",
                Some(Section::Parked),
                Some(&session.csrf),
                &format!(
                    "<p>No parked job <code>{}</code>: it was replayed, purged or never parked. <a href=\"/console/trace?job_id={}\">Trace it</a>.</p>",
                    esc(&id),
                    esc(&url_enc(&id))
                ),
            ),
        );
    };
    // What a replay would send now, with the current mapping (key and e-mail masked), as
    // `GET /admin/parked/{id}` shows it.
    let request_now = match state.settings.route(&job.route) {
        None => Err(format!("route `{}` is no longer configured", job.route)),
        Some(route) => match crate::mapping::to_centercode(&job.job, route) {
            Ok(mut request) => {
                request.find = request.find.as_deref().map(mask_email);
                Ok(request.render_masked())
            }
            Err(e) => Err(e.to_string()),
        },
    };
    let dl = |pairs: &[(&str, String)]| {
        pairs
            .iter()
            .map(|(k, v)| format!("<dt>{k}</dt><dd>{}</dd>", esc(v)))
            .collect::<String>()
    };
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "—".into());
    let mut body = format!(
        "<dl class=\"facts\">{}</dl>",
        dl(&[
            ("Job", p.id.clone()),
            ("Route", p.route.clone()),
            ("Action", p.action.clone()),
            ("Reason", p.reason.clone()),
            ("Attempts", p.attempts.to_string()),
            (
                "Last status",
                p.last_status.map_or("—".into(), |s| s.to_string())
            ),
            ("Record id", opt(&p.record_id)),
            ("Notification id", opt(&p.notification_id)),
            ("Org id", opt(&p.org_id)),
            ("First seen", crate::admin::rfc3339(p.first_seen_ms)),
            ("Parked at", crate::admin::rfc3339(p.parked_at_ms)),
            ("Replays", p.replays.to_string()),
        ])
    );
    if !p.history.is_empty() {
        body.push_str("<h2>Earlier reasons</h2><ol>");
        for r in &p.history {
            let _ = write!(body, "<li>{}</li>", esc(r));
        }
        body.push_str("</ol>");
    }
    body.push_str("<h2>The request a replay would send now</h2>");
    match request_now {
        Ok(text) => {
            let _ = write!(body, "<pre id=\"request-now\">{}</pre>", esc(&text));
        }
        Err(e) => body.push_str(&html::notice(&format!("It cannot be built: {e}"), true)),
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/console/parked/replay\">{}<input type=\"hidden\" name=\"ids\" value=\"{id}\">\
<input type=\"hidden\" name=\"step\" value=\"count\"><button type=\"submit\">Replay this job…</button></form>\
<p><a href=\"/console/trace?job_id={}\">Its trace</a> · <a href=\"/console/parked\">All parked jobs</a></p>",
        super::html::csrf_field(&session.csrf),
        esc(&url_enc(&p.id)),
        id = esc(&p.id),
    );
    super::html(
        StatusCode::OK,
        html::page(
            &format!("Parked job {}", p.id),
            Some(Section::Parked),
            Some(&session.csrf),
            &body,
        ),
    )
}

/// A form posted with `scope=selected` means the ticked ids (`ids`), with `scope=filter` the
/// list's filter, whose own ids field travels as `ids_filter` so ticked boxes do not narrow
/// "all matching". The confirmation posts the confirmed filter back with `scope=filter`.
fn selection(form: &Form) -> Result<ParkedFilter, String> {
    let mut filter = filter_of(form)?;
    match form.get("scope") {
        Some("filter") if form.get("step") != Some("run") => {
            filter.ids = ids_of(form, "ids_filter")?;
        }
        Some("filter") => {}
        _ if filter.ids.is_none() => {
            return Err("Tick at least one job, or use the button for all matching jobs.".into())
        }
        _ => {}
    }
    Ok(filter)
}

fn message_page(
    csrf: &str,
    status: StatusCode,
    title: &str,
    text: &str,
    error: bool,
) -> HttpResponse {
    super::html(
        status,
        html::page(
            title,
            Some(Section::Parked),
            Some(csrf),
            &format!(
                "{}<p><a href=\"/console/parked\">Back to the parked jobs</a></p>",
                html::notice(text, error)
            ),
        ),
    )
}

/// A bulk action's request: checked, with the jobs it selects and how many match now.
struct Selected {
    session: super::session::Session,
    form: Form,
    filter: ParkedFilter,
    matched: u64,
}

async fn selected(
    req: &HttpRequest,
    state: &AppState,
    payload: web::Payload,
    title: &str,
) -> Result<Selected, Box<HttpResponse>> {
    let (session, form) = action_session(req, state, payload).await?;
    let filter = selection(&form).map_err(|e| {
        Box::new(message_page(
            &session.csrf,
            StatusCode::BAD_REQUEST,
            title,
            &e,
            true,
        ))
    })?;
    let matched = state
        .queue
        .count_parked(filter.clone())
        .await
        .map_err(|e| Box::new(queue_failed(e)))?;
    Ok(Selected {
        session,
        form,
        filter,
        matched,
    })
}

/// `step=count`: the dry run and the confirmation form. `step=run`: replay up to the
/// confirmed count, then back to the list (or, from the script with `batch=1`, one batch
/// answered in JSON for the progress bar).
pub async fn replay(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> HttpResponse {
    let Selected {
        session,
        form,
        filter,
        matched,
    } = match selected(&req, &state, payload, "Replay").await {
        Ok(s) => s,
        Err(refusal) => return *refusal,
    };
    if form.get("step") != Some("run") {
        if matched == 0 {
            return message_page(
                &session.csrf,
                StatusCode::OK,
                "Replay",
                "Dry run: no parked job matches; nothing to replay.",
                false,
            );
        }
        let body = format!(
            "{}<p>Replaying sends them to their destination (Centercode, or Salesforce for its writes) again, translated with the current mapping; their attempts start again from zero.</p>\
<form method=\"post\" action=\"/console/parked/replay\" data-batch-replay=\"{matched}\">{}{}\
<input type=\"hidden\" name=\"step\" value=\"run\"><input type=\"hidden\" name=\"scope\" value=\"filter\"><input type=\"hidden\" name=\"expected\" value=\"{matched}\">\
<button type=\"submit\" id=\"confirm\">Replay {matched} job(s)</button> <a href=\"/console/parked\">Cancel</a>\
<p class=\"progress\" hidden><progress max=\"{matched}\" value=\"0\"></progress> <span role=\"status\" aria-live=\"polite\"></span></p></form>",
            html::notice(
                &format!("Dry run: {matched} parked job(s) match ({}).", describe(&filter)),
                false
            ),
            super::html::csrf_field(&session.csrf),
            confirmed_filter(&filter),
        );
        return super::html(
            StatusCode::OK,
            html::page(
                "Replay parked jobs",
                Some(Section::Parked),
                Some(&session.csrf),
                &body,
            ),
        );
    }
    let expected = form
        .get("expected")
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let batch = form.get("batch").is_some();
    let already = form
        .get("done")
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    // Never more than the operator confirmed: jobs parked again meanwhile wait for another look.
    let remaining = expected.saturating_sub(already) as usize;
    let limit = if batch {
        remaining.min(BATCH)
    } else {
        remaining
    };
    let moved = if limit == 0 || matched == 0 {
        0
    } else {
        match state.queue.replay_matching(filter, Some(limit)).await {
            Ok(n) => n,
            Err(e) => return queue_failed(e),
        }
    };
    state.metrics.inc("relay_replayed_total", &[], moved);
    tracing::info!(matched, moved, "parked jobs replayed from the console");
    if batch {
        return HttpResponse::Ok().json(serde_json::json!({"moved": moved}));
    }
    see_other(&format!("/console/parked?replayed={moved}"))
}

/// The confirmed filter as hidden fields (the ids as one comma-separated field).
fn confirmed_filter(filter: &ParkedFilter) -> String {
    let mut out = String::new();
    let mut field = |name: &str, v: &str| {
        let _ = write!(
            out,
            "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
            esc(v)
        );
    };
    for (name, v) in [
        ("route", &filter.route),
        ("action", &filter.action),
        ("org_id", &filter.org_id),
        ("record_id", &filter.record_id),
        ("reason", &filter.reason),
    ] {
        if let Some(v) = v {
            field(name, v);
        }
    }
    if let Some(t) = filter.since_ms {
        field("since", &(t / 1000).to_string());
    }
    if let Some(t) = filter.until_ms {
        field("until", &(t / 1000).to_string());
    }
    if let Some(ids) = &filter.ids {
        field("ids", &ids.join(","));
    }
    out
}

/// `step=count`: how many match, and a field to type `purge N`. `step=run`: purge when the
/// typed text matches and the count has not changed since.
pub async fn purge(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> HttpResponse {
    let Selected {
        session,
        form,
        filter,
        matched,
    } = match selected(&req, &state, payload, "Purge").await {
        Ok(s) => s,
        Err(refusal) => return *refusal,
    };
    let expected = form.get("expected").and_then(|n| n.parse::<u64>().ok());
    let phrase = format!("purge {matched}");
    if form.get("step") == Some("run")
        && expected == Some(matched)
        && form.get("typed") == Some(phrase.as_str())
        && matched > 0
    {
        return match state.queue.purge_parked(filter).await {
            Ok(n) => {
                tracing::warn!(purged = n, "parked jobs purged from the console");
                see_other(&format!("/console/parked?purged={n}"))
            }
            Err(e) => queue_failed(e),
        };
    }
    if matched == 0 {
        return message_page(
            &session.csrf,
            StatusCode::OK,
            "Purge",
            "No parked job matches; nothing to purge.",
            false,
        );
    }
    let error = match (form.get("step"), expected) {
        (Some("run"), Some(e)) if e != matched => Some(format!(
            "The selection changed: {matched} job(s) match now, not {e}. Check and confirm again."
        )),
        (Some("run"), _) => Some(format!("Type exactly: {phrase}")),
        _ => None,
    };
    let body = format!(
        "{}{}<p>Purging deletes these jobs for good: they are never delivered.</p>\
<form method=\"post\" action=\"/console/parked/purge\">{}{}\
<input type=\"hidden\" name=\"step\" value=\"run\"><input type=\"hidden\" name=\"scope\" value=\"filter\"><input type=\"hidden\" name=\"expected\" value=\"{matched}\">\
<label for=\"typed\">Type <kbd>{phrase}</kbd> to confirm</label><input id=\"typed\" name=\"typed\" autocomplete=\"off\" required>\
<button type=\"submit\" class=\"danger\">Purge</button> <a href=\"/console/parked\">Cancel</a></form>",
        error.map(|e| html::notice(&e, true)).unwrap_or_default(),
        html::notice(
            &format!("{matched} parked job(s) match ({}).", describe(&filter)),
            false
        ),
        super::html::csrf_field(&session.csrf),
        confirmed_filter(&filter),
    );
    super::html(
        StatusCode::OK,
        html::page(
            "Purge parked jobs",
            Some(Section::Parked),
            Some(&session.csrf),
            &body,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_filter_reads_the_clis_fields() {
        let f = filter_of(&Form::parse(
            "route=gdpr&reason=refused&since=1700000000&ids=b,a&ids=c&ids=a",
        ))
        .unwrap();
        assert_eq!(f.route.as_deref(), Some("gdpr"));
        assert_eq!(f.reason.as_deref(), Some("refused"));
        assert_eq!(f.since_ms, Some(1_700_000_000_000));
        assert_eq!(f.ids, Some(vec!["a".into(), "b".into(), "c".into()]));
        assert!(filter_of(&Form::parse("since=yesterday")).is_err());
    }

    #[test]
    fn a_bulk_action_needs_ticked_jobs_or_the_filter_button() {
        assert!(selection(&Form::parse("route=gdpr&step=count")).is_err());
        let all = selection(&Form::parse("route=gdpr&scope=filter&step=count&ids=x")).unwrap();
        assert_eq!(all.ids, None, "ticked boxes do not narrow 'all matching'");
        let typed = selection(&Form::parse("scope=filter&step=count&ids=x&ids_filter=y")).unwrap();
        assert_eq!(typed.ids, Some(vec!["y".into()]));
        let confirmed = selection(&Form::parse("scope=filter&step=run&ids=x")).unwrap();
        assert_eq!(confirmed.ids, Some(vec!["x".into()]));
        let some = selection(&Form::parse("scope=selected&ids=x&step=count")).unwrap();
        assert_eq!(some.ids, Some(vec!["x".into()]));
    }
}
