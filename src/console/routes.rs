//! Routes: pause and resume (for every process, through the shared records), what each live
//! process believes, the circuit breaker, and the route's configuration with secrets masked.

use super::html::{self, esc, Section};
use super::{action_session, page_session, see_other};
use crate::control::CircuitState;
use crate::inbound::AppState;
use crate::settings::{FieldMapping, RouteSettings};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use std::fmt::Write;

pub async fn show(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let session = match page_session(&req, &state) {
        Ok(s) => s,
        Err(refusal) => return *refusal,
    };
    let refresh = std::time::Duration::from_millis(state.settings.control.refresh_ms);
    let (records, processes) = match (
        crate::shared_control::records(&state.queue).await,
        crate::shared_control::live_processes(&state.queue, refresh).await,
    ) {
        (Ok(r), Ok(p)) => (r, p),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "console routes failed on the queue");
            return super::refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "the queue did not answer; try again",
            );
        }
    };
    let q = super::Form::parse(req.query_string());
    let mut body = String::new();
    if let (Some(route), Some(change)) = (q.get("route"), q.get("changed")) {
        if state.settings.route(route).is_some() && matches!(change, "paused" | "resumed") {
            body.push_str(&html::notice(
                &format!("Route {route} {change} for every process."),
                false,
            ));
        }
    }
    if !state.queue.shares_control_state() {
        body.push_str(&html::notice(
            "Pause state is kept in each process only (RabbitMQ without queue.redis_url): a pause here does not reach the others.",
            true,
        ));
    }
    for r in &state.settings.routes {
        let record = records.get(&r.name);
        let paused = record.is_some_and(|rec| rec.paused);
        let circuit = match state.control.breaker.state(&r.name) {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open (Centercode failing; jobs held)",
            CircuitState::HalfOpen => "half-open (one job probing)",
        };
        let changed = record
            .map(|rec| {
                format!(
                    " since {} by {}",
                    html::time(rec.changed_at_ms),
                    esc(&rec.changed_by)
                )
            })
            .unwrap_or_default();
        let (verb, button) = if paused {
            ("resume", "Resume deliveries")
        } else {
            ("pause", "Pause deliveries")
        };
        let _ = write!(
            body,
            "<section class=\"route\" id=\"route-{name}\" data-route=\"{name}\" aria-labelledby=\"h-{name}\">\
<h2 id=\"h-{name}\">{name}</h2>\
<p>Deliveries: <strong class=\"paused-state\">{}</strong>{changed} · circuit {circuit}</p>\
<form method=\"post\" action=\"/console/routes/{name}/{verb}\">{}<button type=\"submit\">{button}</button></form>",
            if paused { "paused" } else { "running" },
            super::html::csrf_field(&session.csrf),
            name = esc(&r.name),
        );
        body.push_str("<h3>What each process believes</h3>");
        let beliefs: Vec<String> = processes
            .iter()
            .filter_map(|p| {
                let b = p.beliefs.get(&r.name)?;
                Some(format!(
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&p.process_id),
                    esc(&p.role),
                    if b.paused { "paused" } else { "running" },
                    if b.since_ms > 0 {
                        html::time(b.since_ms)
                    } else {
                        "—".into()
                    },
                    html::time(p.seen_at_ms),
                ))
            })
            .collect();
        if beliefs.is_empty() {
            body.push_str("<p>No live process has reported yet.</p>");
        } else {
            let _ = write!(
                body,
                "<div class=\"scroll\"><table><thead><tr><th scope=\"col\">Process</th><th scope=\"col\">Role</th><th scope=\"col\">Believes</th><th scope=\"col\">Since</th><th scope=\"col\">Reported</th></tr></thead><tbody>{}</tbody></table></div>",
                beliefs.join("")
            );
        }
        let _ = write!(
            body,
            "<details><summary>Configuration</summary><dl class=\"facts\">{}</dl></details></section>",
            configuration(r)
        );
    }
    super::html(
        StatusCode::OK,
        html::page("Routes", Some(Section::Routes), Some(&session.csrf), &body),
    )
}

/// The route's settings as a definition list; secrets are named, never shown.
fn configuration(r: &RouteSettings) -> String {
    let set = |present: bool| if present { "set (hidden)" } else { "not set" };
    let mut rows: Vec<(&str, String)> = vec![
        ("kind", r.kind.as_str().into()),
        ("action", r.action.as_str().into()),
        ("url", mask_url(&r.url)),
        ("org_ids", r.org_ids.join(", ")),
    ];
    if let Some(s) = &r.sobject {
        rows.push(("sobject", s.clone()));
    }
    if let Some(f) = &r.email_field {
        rows.push(("email_field", f.clone()));
    }
    for (key, m) in &r.fields {
        rows.push(("field", format!("{key} ← {}", mapping(m))));
    }
    rows.push((
        "api_key",
        if r.api_key.is_some() {
            "route's own (hidden)".into()
        } else {
            "centercode.api_key (hidden)".into()
        },
    ));
    rows.push(("path_token", set(r.path_token.is_some()).into()));
    if let Some(auth) = &r.auth {
        rows.push(("auth.bearer", set(auth.bearer.is_some()).into()));
        rows.push(("auth.hmac_secret", set(auth.hmac_secret.is_some()).into()));
    }
    if let Some(k) = &r.idempotency_key_field {
        rows.push(("idempotency_key_field", k.clone()));
    }
    if !r.allowed_ips.is_empty() {
        rows.push(("allowed_ips", r.allowed_ips.join(", ")));
    }
    rows.push(("keep_payload_days", r.keep_payload_days.to_string()));
    rows.push((
        "on_user_not_found",
        format!("{:?}", r.on_user_not_found).to_lowercase(),
    ));
    rows.push((
        "on_outcome_unknown",
        format!("{:?}", r.on_outcome_unknown()).to_lowercase(),
    ));
    if r.insecure_open {
        rows.push((
            "insecure_open",
            "true: anyone who knows the URL can call it".into(),
        ));
    }
    rows.iter()
        .map(|(k, v)| format!("<dt>{k}</dt><dd>{}</dd>", esc(v)))
        .collect()
}

fn mapping(m: &FieldMapping) -> String {
    match m {
        FieldMapping::From(from) => from.clone(),
        FieldMapping::Rule(rule) => {
            let mut parts = Vec::new();
            if let Some(f) = &rule.from {
                parts.push(f.clone());
            }
            if let Some(v) = &rule.value {
                parts.push(format!("value {v}"));
            }
            if rule.required {
                parts.push("required".into());
            }
            if let Some(n) = rule.max_len {
                parts.push(format!("at most {n} characters"));
            }
            if let Some(map) = &rule.map {
                let pairs: Vec<String> = map.iter().map(|(k, v)| format!("{k}→{v}")).collect();
                parts.push(format!("map {}", pairs.join(", ")));
            }
            if let Some(d) = &rule.default {
                parts.push(format!("default {d}"));
            }
            parts.join(", ")
        }
    }
}

/// A URL with the values of query parameters that look secret (`apiKey`, `token`, …) and
/// any user-info replaced by `***`.
pub fn mask_url(url: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}{path}"),
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    if query.is_empty() {
        return base;
    }
    let masked: Vec<String> = query
        .split('&')
        .map(|pair| {
            let (k, _) = pair.split_once('=').unwrap_or((pair, ""));
            let lower = k.to_ascii_lowercase();
            if ["key", "token", "secret", "sig", "password"]
                .iter()
                .any(|s| lower.contains(s))
            {
                format!("{k}=***")
            } else {
                pair.to_owned()
            }
        })
        .collect();
    format!("{base}?{}", masked.join("&"))
}

/// `POST /console/routes/{route}/pause|resume`: the shared record first (nothing changes
/// anywhere if it cannot be written), then held jobs back to work on resume.
pub async fn change(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> HttpResponse {
    if let Err(refusal) = action_session(&req, &state, payload).await {
        return *refusal;
    }
    let (route, change) = path.into_inner();
    let paused = match change.as_str() {
        "pause" => true,
        "resume" => false,
        _ => return super::refused(StatusCode::NOT_FOUND, "no such action"),
    };
    if state.settings.route(&route).is_none() {
        return super::refused(StatusCode::NOT_FOUND, "no route with this name");
    }
    if let Err(e) =
        crate::shared_control::set_paused(&state.queue, &state.control, &route, paused, "console")
            .await
    {
        tracing::error!(error = %e, "console could not change a route's pause state");
        return super::refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "the shared pause state could not be written; nothing changed",
        );
    }
    if !paused {
        if let Err(e) = state.queue.unhold(Some(&route), &[]).await {
            tracing::warn!(route = %route, error = %e, "could not move held jobs back yet; workers will");
        }
    }
    tracing::info!(route = %route, paused, "route pause state changed from the console");
    see_other(&format!(
        "/console/routes?route={}&changed={}#route-{}",
        html::url_enc(&route),
        if paused { "paused" } else { "resumed" },
        html::url_enc(&route)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_a_url_are_masked() {
        assert_eq!(
            mask_url("https://a.centercode.com/x?apiKey=abc&find=z"),
            "https://a.centercode.com/x?apiKey=***&find=z"
        );
        assert_eq!(
            mask_url("https://user:pw@host/path"),
            "https://***@host/path"
        );
        assert_eq!(mask_url("https://host/p"), "https://host/p");
    }
}
