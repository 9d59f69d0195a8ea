//! Trace: a job's timeline from the ledger, found by record id, notification id or job id
//! (a GET form), or by e-mail (a POST form: hashed into its subject key on the server at
//! once, never put in a URL, echoed or stored; the answer is not cached).

use super::html::{self, esc, url_enc, Section};
use super::{action_session, page_session, Form};
use crate::inbound::AppState;
use crate::ledger::{Entry, LedgerQuery};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::ExposeSecret;
use std::fmt::Write;

/// Most jobs one search shows.
const LIMIT: usize = 20;

fn forms(q: &Form, csrf: &str) -> String {
    let value = |name: &str| esc(q.get(name).unwrap_or(""));
    format!(
        "<div class=\"searches\"><form method=\"get\" action=\"/console/trace\" aria-label=\"Find by id\">\
<label>Record id<input name=\"record_id\" value=\"{}\"></label>\
<label>Notification id<input name=\"notification_id\" value=\"{}\"></label>\
<label>Job id<input name=\"job_id\" value=\"{}\"></label>\
<button type=\"submit\">Find</button></form>\
<form method=\"post\" action=\"/console/trace\" aria-label=\"Find by e-mail\" autocomplete=\"off\">{}\
<label>E-mail<input name=\"email\" type=\"email\" autocomplete=\"off\" spellcheck=\"false\"></label>\
<button type=\"submit\">Find by e-mail</button>\
<p class=\"hint\">Sent in the request body and hashed on the relay; it is not kept, not put in the address and not shown.</p></form></div>",
        value("record_id"),
        value("notification_id"),
        value("job_id"),
        super::html::csrf_field(csrf),
    )
}

pub async fn show(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let session = match page_session(&req, &state) {
        Ok(s) => s,
        Err(refusal) => return *refusal,
    };
    let q = Form::parse(req.query_string());
    let query = LedgerQuery {
        job_id: q.get("job_id").map(str::to_owned),
        record_id: q.get("record_id").map(str::to_owned),
        notification_id: q.get("notification_id").map(str::to_owned),
        ..LedgerQuery::default()
    };
    let asked = query != LedgerQuery::default();
    let results = if asked {
        timeline(&state, query).await
    } else {
        String::new()
    };
    let body = format!("{}{results}", forms(&q, &session.csrf));
    super::html(
        StatusCode::OK,
        html::page("Trace", Some(Section::Trace), Some(&session.csrf), &body),
    )
}

pub async fn by_email(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> HttpResponse {
    let (session, form) = match action_session(&req, &state, payload).await {
        Ok(s) => s,
        Err(refusal) => return *refusal,
    };
    let results = match form.get("email") {
        None => html::notice("Type an e-mail address.", true),
        Some(email) if !email.contains('@') => html::notice("That is not an e-mail address.", true),
        Some(_) if !state.queue.keeps_ledger() => html::notice(crate::queue::NO_LEDGER, true),
        Some(email) => {
            let secret = state.settings.ledger.subject_key.expose_secret();
            if secret.is_empty() {
                html::notice(
                    "ledger.subject_key is not set, so no subject keys were recorded.",
                    true,
                )
            } else {
                let key = crate::ledger::subject_key(secret.as_bytes(), email);
                timeline(
                    &state,
                    LedgerQuery {
                        subject_key: Some(key),
                        ..LedgerQuery::default()
                    },
                )
                .await
            }
        }
    };
    let body = format!("{}{results}", forms(&Form::default(), &session.csrf));
    super::html(
        StatusCode::OK,
        html::page("Trace", Some(Section::Trace), Some(&session.csrf), &body),
    )
}

/// One kind of event on a timeline.
struct Event {
    at_ms: i64,
    what: String,
    detail: String,
}

async fn timeline(state: &AppState, mut query: LedgerQuery) -> String {
    query.history = true;
    query.limit = LIMIT;
    let entries = match state.queue.ledger_query(query).await {
        Ok(e) => e,
        Err(crate::queue::QueueError::NotReady(why)) if !state.queue.keeps_ledger() => {
            return html::notice(&why, true)
        }
        Err(e) => {
            tracing::error!(error = %e, "console trace failed on the ledger");
            return html::notice("The ledger did not answer; try again.", true);
        }
    };
    if entries.is_empty() {
        return "<p id=\"trace-count\">No job found in the ledger.</p>".into();
    }
    let mut out = format!(
        "<p id=\"trace-count\">{} job(s){}, newest first.</p>",
        entries.len(),
        if entries.len() == LIMIT {
            " (the first ones)"
        } else {
            ""
        }
    );
    for e in &entries {
        out.push_str(&job(e));
    }
    out
}

fn job(e: &Entry) -> String {
    let f = &e.facts;
    let action = crate::settings::Action::parse(&f.action);
    let (source, destination) = action.map_or(("Salesforce", "Centercode"), |a| {
        (a.source(), a.destination())
    });
    let mut events = vec![
        Event {
            at_ms: f.received_at_ms,
            what: "received".into(),
            detail: format!("from {source}"),
        },
        Event {
            at_ms: f.stored_at_ms,
            what: "stored".into(),
            detail: "in the queue".into(),
        },
    ];
    for a in &e.attempts {
        let answer = match (a.status, &a.error_class) {
            (Some(s), _) => format!("{destination} answered {s}"),
            (None, Some(c)) => format!("no answer ({c})"),
            (None, None) => "no answer".into(),
        };
        let mut detail = format!("attempt {}: {answer} in {} ms", a.attempt, a.duration_ms);
        if let Some(r) = &a.response {
            let _ = write!(detail, " — {r}");
        }
        events.push(Event {
            at_ms: a.started_at_ms,
            what: format!("attempt → {}", a.outcome),
            detail,
        });
    }
    for o in &e.outcomes {
        events.push(Event {
            at_ms: o.at_ms,
            what: o.outcome.clone(),
            detail: o.reason.clone().unwrap_or_default(),
        });
    }
    events.sort_by_key(|ev| ev.at_ms);
    let ids = [
        ("record", &f.record_id),
        ("notification", &f.notification_id),
        ("org", &f.org_id),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} {}", esc(v))))
    .collect::<Vec<_>>()
    .join(" · ");
    let mut out = format!(
        "<section class=\"job\" data-job=\"{id}\" aria-label=\"Job {id}\"><h2><code>{id}</code> · {} · {}</h2>\
<p>Now: <strong class=\"outcome\">{}</strong>{} · {ids}</p><ol class=\"timeline\">",
        esc(&f.route),
        esc(&f.action),
        esc(e.last_outcome.as_deref().unwrap_or("pending")),
        e.last_status
            .map(|s| format!(" ({destination} {s})"))
            .unwrap_or_default(),
        id = esc(&f.job_id),
    );
    for ev in &events {
        let _ = write!(
            out,
            "<li data-event=\"{}\">{} <strong>{}</strong> {}</li>",
            esc(&ev.what),
            html::time(ev.at_ms),
            esc(&ev.what),
            esc(&ev.detail)
        );
    }
    out.push_str("</ol>");
    if e.last_outcome.as_deref() == Some("parked") {
        let _ = write!(
            out,
            "<p><a href=\"/console/parked/{}\">The parked job</a></p>",
            esc(&url_enc(&f.job_id))
        );
    }
    out.push_str("</section>");
    out
}
