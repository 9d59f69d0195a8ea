//! The overview: readiness, depth and age by state, each route's parked jobs, rates and
//! answer classes, paused and circuit-open routes, and the depth chart of the last hour.
//! Refreshes by itself (the script fetches the live part every 10 s; without script, a
//! `<noscript>` refresh).

use super::html::{self, esc, Section};
use super::{page_session, route_counters, wants_fragment, LedgerHealth, SAMPLE_INTERVAL};
use crate::control::CircuitState;
use crate::inbound::AppState;
use crate::queue::now_ms;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use std::fmt::Write;

/// How far back rates look.
const RATE_WINDOW_MS: i64 = 5 * 60_000;

pub async fn show(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let session = match page_session(&req, &state) {
        Ok(s) => s,
        Err(refusal) => return *refusal,
    };
    let live = live(&state).await;
    if wants_fragment(&req) {
        return super::html(StatusCode::OK, live);
    }
    let body = format!(
        "<div id=\"live\" data-refresh=\"10\" aria-live=\"off\">{live}</div>\
<noscript><p><a href=\"/console/overview\">Refresh</a></p></noscript>"
    );
    super::html(
        StatusCode::OK,
        html::page(
            "Overview",
            Some(Section::Overview),
            Some(&session.csrf),
            &body,
        ),
    )
}

async fn live(state: &AppState) -> String {
    let now = now_ms();
    let mut history = state.console.history();
    // The readiness shown is at most two sampling periods old; older (or none yet): read now.
    let fresh = history
        .last()
        .is_some_and(|s| now - s.at_ms < 2 * SAMPLE_INTERVAL.as_millis() as i64);
    if !fresh {
        let s = super::sample(state).await;
        state.console.record(s.clone());
        history.push(s);
    }
    let latest = history.last().cloned().expect("one sample at least");
    let stats = match state.queue.stats().await {
        Ok(s) => Some(s),
        Err(_) => latest.stats.clone(),
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "<p class=\"updated\">Updated {} · refreshes every 10 s</p>",
        html::time(now)
    );

    // Readiness, paused and circuit-open routes.
    let paused: Vec<String> = state.control.paused();
    let open: Vec<&str> = state
        .settings
        .routes
        .iter()
        .filter(|r| state.control.breaker.state(&r.name) != CircuitState::Closed)
        .map(|r| r.name.as_str())
        .collect();
    let badge = |ok: bool, text: &str| {
        format!(
            "<li class=\"badge {}\">{}</li>",
            if ok { "ok" } else { "bad" },
            esc(text)
        )
    };
    let list = |names: &[&str]| {
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    };
    let paused_refs: Vec<&str> = paused.iter().map(String::as_str).collect();
    let _ = write!(
        out,
        "<section aria-labelledby=\"h-ready\"><h2 id=\"h-ready\">Readiness</h2><ul class=\"badges\">{}{}{}{}</ul></section>",
        badge(
            latest.queue_writable && stats.is_some(),
            if latest.queue_writable {
                "Queue: accepts writes"
            } else {
                "Queue: does not accept writes"
            }
        ),
        badge(
            latest.ledger != LedgerHealth::Failing,
            match latest.ledger {
                LedgerHealth::Off => "Ledger: none kept",
                LedgerHealth::Answers => "Ledger: answers",
                LedgerHealth::Failing => "Ledger: does not answer",
            }
        ),
        badge(paused.is_empty(), &format!("Paused: {}", list(&paused_refs))),
        badge(open.is_empty(), &format!("Circuit open: {}", list(&open))),
    );

    // Depth and oldest age by state.
    out.push_str("<section aria-labelledby=\"h-queue\"><h2 id=\"h-queue\">Queue</h2>");
    match &stats {
        None => out.push_str(&html::notice("The queue did not answer.", true)),
        Some(s) => {
            out.push_str(
                "<table><thead><tr><th scope=\"col\">State</th><th scope=\"col\" class=\"num\">Jobs</th><th scope=\"col\">Oldest</th></tr></thead><tbody>",
            );
            for (name, depth, oldest) in [
                ("ready", s.ready, s.oldest_ready_ms),
                ("in flight", s.in_flight, s.oldest_in_flight_ms),
                ("retrying", s.retrying, s.oldest_retrying_ms),
                ("held (paused routes)", s.held, None),
                ("parked", s.parked, s.oldest_parked_ms),
            ] {
                let _ = write!(
                    out,
                    "<tr data-state=\"{}\"><th scope=\"row\">{name}</th><td class=\"num\">{depth}</td><td>{}</td></tr>",
                    name.split(' ').next().unwrap_or(name),
                    html::age(oldest, now)
                );
            }
            out.push_str("</tbody></table>");
        }
    }
    out.push_str("</section>");

    // The chart.
    let points = |f: fn(&crate::queue::QueueStats) -> u64| -> Vec<(i64, u64)> {
        history
            .iter()
            .filter_map(|s| s.stats.as_ref().map(|st| (s.at_ms, f(st))))
            .collect()
    };
    let _ = write!(
        out,
        "<section aria-labelledby=\"h-chart\"><h2 id=\"h-chart\">Depth, last hour</h2>{}<p class=\"hint\">Sampled by this process every {} s; kept in memory for an hour.</p></section>",
        html::chart(
            &[
                html::Series {
                    name: "waiting (ready, in flight, retrying, held)",
                    class: "waiting",
                    points: points(|s| s.ready + s.in_flight + s.retrying + s.held),
                },
                html::Series {
                    name: "parked",
                    class: "parked",
                    points: points(|s| s.parked),
                },
            ],
            now
        ),
        SAMPLE_INTERVAL.as_secs()
    );

    // Per route.
    let counters_now = route_counters(state);
    let base = history.iter().find(|s| now - s.at_ms <= RATE_WINDOW_MS);
    out.push_str(
        "<section aria-labelledby=\"h-routes\"><h2 id=\"h-routes\">Routes</h2><div class=\"scroll\"><table><thead><tr>\
<th scope=\"col\">Route</th><th scope=\"col\">State</th><th scope=\"col\" class=\"num\">Ready</th><th scope=\"col\" class=\"num\">In flight</th><th scope=\"col\" class=\"num\">Retrying</th><th scope=\"col\" class=\"num\">Held</th><th scope=\"col\" class=\"num\">Parked</th>\
<th scope=\"col\" class=\"num\">Stored /min</th><th scope=\"col\" class=\"num\">Delivered /min</th>\
<th scope=\"col\">Salesforce answers</th><th scope=\"col\">Centercode answers</th></tr></thead><tbody>",
    );
    // Per route by state: exact on the embedded queue, from the ledger on RabbitMQ.
    let by_route = state.queue.route_stats().await.ok().flatten();
    let leases_seen = state.queue.route_stats_see_leases();
    for r in &state.settings.routes {
        let name = r.name.as_str();
        let paused = state.control.is_paused(name);
        let cells = route_cells(
            by_route
                .as_ref()
                .map(|m| m.get(name).cloned().unwrap_or_default()),
            paused,
            leases_seen,
            now,
        );
        let mut route_state = Vec::new();
        if state.control.is_paused(name) {
            route_state.push("paused");
        }
        match state.control.breaker.state(name) {
            CircuitState::Closed => {}
            CircuitState::Open => route_state.push("circuit open"),
            CircuitState::HalfOpen => route_state.push("circuit half-open"),
        }
        if route_state.is_empty() {
            route_state.push("delivering");
        }
        let (rate_in, rate_out) = match (base, counters_now.get(name)) {
            // Under half a minute of history says little about a rate.
            (Some(b), Some(&(stored, delivered))) if now - b.at_ms >= 30_000 => {
                let minutes = (now - b.at_ms) as f64 / 60_000.0;
                let (s0, d0) = b.counters.get(name).copied().unwrap_or((0, 0));
                (
                    format!("{:.1}", stored.saturating_sub(s0) as f64 / minutes),
                    format!("{:.1}", delivered.saturating_sub(d0) as f64 / minutes),
                )
            }
            _ => ("—".to_owned(), "—".to_owned()),
        };
        let classes = |metric: &'static str, label: &'static str, names: &[&'static str]| {
            names
                .iter()
                .map(|c| {
                    let n = state
                        .metrics
                        .counter(metric, &[("route", name), (label, c)]);
                    format!("{} {n}", c.replace('_', " "))
                })
                .collect::<Vec<_>>()
                .join(" · ")
        };
        let _ = write!(
            out,
            "<tr data-route=\"{route}\"><th scope=\"row\"><a href=\"/console/routes#route-{route}\">{route}</a></th>\
<td class=\"state\">{}</td>{cells}<td class=\"num\">{rate_in}</td><td class=\"num\">{rate_out}</td><td>{}</td><td>{}</td></tr>",
            route_state.join(", "),
            esc(&classes(
                "relay_ingest_requests_total",
                "outcome",
                &["acked", "duplicate", "rejected_4xx", "unavailable_5xx"]
            )),
            esc(&classes(
                "relay_centercode_responses_total",
                "status_class",
                &["2xx", "4xx", "5xx", "error"]
            )),
            route = esc(name),
        );
    }
    out.push_str(if leases_seen {
        "</tbody></table></div><p class=\"hint\">Each count with its oldest job's age. Held: jobs of a paused route. Rates and answers are this process's; depths are the shared queue's.</p></section>"
    } else {
        "</tbody></table></div><p class=\"hint\">Each count with its oldest job's age, from the delivery ledger (RabbitMQ's queues do not split by route): ready means never attempted, retrying attempted and not ended; a job being delivered counts in the state it had before (the whole queue's in-flight count is above). Held: jobs of a paused route. Rates and answers are this process's.</p></section>"
    });
    out
}

/// The per-state cells of one route's row: count and oldest age for ready, in flight,
/// retrying, held (a paused route's ready and retrying jobs), parked; `?` where not known.
fn route_cells(
    stats: Option<crate::queue::QueueStats>,
    paused: bool,
    leases_seen: bool,
    now: i64,
) -> String {
    let Some(s) = stats else {
        return "<td class=\"num ready\">?</td><td class=\"num in-flight\">?</td><td class=\"num retrying\">?</td><td class=\"num held\">?</td><td class=\"num parked\">?</td>".into();
    };
    let cell = |class: &str, n: u64, oldest: Option<i64>| {
        let age = if n > 0 {
            format!(" <span class=\"age\">{}</span>", html::age(oldest, now))
        } else {
            String::new()
        };
        format!("<td class=\"num {class}\">{n}{age}</td>")
    };
    let waiting_oldest = [s.oldest_ready_ms, s.oldest_retrying_ms]
        .into_iter()
        .flatten()
        .min();
    let (ready, retrying, held) = if paused {
        (
            cell("ready", 0, None),
            cell("retrying", 0, None),
            cell("held", s.ready + s.retrying, waiting_oldest),
        )
    } else {
        (
            cell("ready", s.ready, s.oldest_ready_ms),
            cell("retrying", s.retrying, s.oldest_retrying_ms),
            cell("held", 0, None),
        )
    };
    let in_flight = if leases_seen {
        cell("in-flight", s.in_flight, s.oldest_in_flight_ms)
    } else {
        "<td class=\"num in-flight\">—</td>".to_owned()
    };
    format!(
        "{ready}{in_flight}{retrying}{held}{}",
        cell("parked", s.parked, s.oldest_parked_ms)
    )
}
