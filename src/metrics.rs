//! Prometheus metrics: a small in-process registry of counters, gauges and histograms rendered
//! in the text exposition format. Labels are route names, outcomes and status classes only,
//! never ids, e-mails or anything a sender controls.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Histogram buckets in seconds: sub-millisecond acks up to slow Centercode calls.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct Registry {
    counters: BTreeMap<&'static str, BTreeMap<Labels, u64>>,
    gauges: BTreeMap<&'static str, BTreeMap<Labels, f64>>,
    histograms: BTreeMap<&'static str, BTreeMap<Labels, Histogram>>,
}

/// The relay's metrics; one per process, shared by the gateway and the workers.
#[derive(Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// Help text for every metric the relay exports.
const HELP: &[(&str, &str, &str)] = &[
    (
        "relay_ledger_write_seconds",
        "histogram",
        "Time a worker waited for the delivery ledger to record an attempt or outcome.",
    ),
    (
        "relay_ledger_oldest_entry_age_seconds",
        "gauge",
        "Age of the oldest delivery ledger entry (retention keeps it under ledger.retention_days).",
    ),
    (
        "relay_ingest_requests_total",
        "counter",
        "Inbound requests by route and outcome (acked, duplicate, rejected_4xx, unavailable_5xx).",
    ),
    (
        "relay_ingest_notifications_total",
        "counter",
        "Notifications newly stored, by route.",
    ),
    (
        "relay_ack_latency_seconds",
        "histogram",
        "Time from request received to acknowledgement sent.",
    ),
    (
        "relay_deliveries_total",
        "counter",
        "Delivery outcomes by route, action and outcome (done, user_not_found, retried, parked, held, superseded, rate_limited).",
    ),
    (
        "relay_centercode_responses_total",
        "counter",
        "Centercode answers by route and status class (2xx, 4xx, 5xx, error).",
    ),
    (
        "relay_centercode_auth_failures_total",
        "counter",
        "Centercode 401/403 answers: API key disabled or address not allowed.",
    ),
    (
        "relay_centercode_latency_seconds",
        "histogram",
        "Centercode call duration by route.",
    ),
    (
        "relay_replayed_total",
        "counter",
        "Parked jobs moved back to the work queue.",
    ),
    (
        "relay_queue_depth",
        "gauge",
        "Jobs by state (ready, in_flight, retrying, parked).",
    ),
    (
        "relay_queue_oldest_age_seconds",
        "gauge",
        "Age of the oldest job in each state.",
    ),
    (
        "relay_route_paused",
        "gauge",
        "1 when deliveries of the route are paused.",
    ),
    (
        "relay_circuit_open",
        "gauge",
        "1 while the route's circuit breaker holds its jobs (Centercode failing).",
    ),
    (
        "relay_queue_backlog_high",
        "gauge",
        "1 while waiting jobs exceed queue.depth_warning (the gateway keeps accepting).",
    ),
    (
        "relay_rate_limited_total",
        "counter",
        "Jobs given back, attempt not spent, because their destination's [[limits]] rate was reached, or (host salesforce) Salesforce writes were stopped by its API limits.",
    ),
    (
        "relay_rate_limit_allowance",
        "gauge",
        "Requests a destination's limit lets go at once right now (the burst remaining), as this process last saw it.",
    ),
    (
        "relay_salesforce_api_usage_ratio",
        "gauge",
        "Share of the Salesforce org's daily API allocation used (Sforce-Limit-Info), as this process last read it; writes stop at salesforce.max_api_share.",
    ),
    (
        "relay_salesforce_latency_seconds",
        "histogram",
        "Salesforce write duration by route (one record, a Collections call, or a status write-back).",
    ),
    ("relay_build_info", "gauge", "Build information."),
];

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Create every route's series at zero, so dashboards and `increase()` see them before the
    /// first event.
    pub fn init_routes(&self, routes: &[crate::settings::RouteSettings]) {
        self.inc("relay_replayed_total", &[], 0);
        for r in routes {
            let route = r.name.as_str();
            for outcome in ["acked", "duplicate", "rejected_4xx", "unavailable_5xx"] {
                self.inc(
                    "relay_ingest_requests_total",
                    &[("route", route), ("outcome", outcome)],
                    0,
                );
            }
            self.inc("relay_ingest_notifications_total", &[("route", route)], 0);
            for outcome in [
                "done",
                "user_not_found",
                "retried",
                "parked",
                "held",
                "rate_limited",
            ] {
                self.inc(
                    "relay_deliveries_total",
                    &[
                        ("route", route),
                        ("action", r.action.as_str()),
                        ("outcome", outcome),
                    ],
                    0,
                );
            }
            self.inc(
                "relay_centercode_auth_failures_total",
                &[("route", route)],
                0,
            );
        }
    }

    /// Add `by` to a counter.
    pub fn inc(&self, name: &'static str, pairs: &[(&'static str, &str)], by: u64) {
        let mut r = self.registry.lock().expect("metrics lock");
        *r.counters
            .entry(name)
            .or_default()
            .entry(labels(pairs))
            .or_default() += by;
    }

    /// Set a gauge.
    pub fn set(&self, name: &'static str, pairs: &[(&'static str, &str)], value: f64) {
        let mut r = self.registry.lock().expect("metrics lock");
        r.gauges
            .entry(name)
            .or_default()
            .insert(labels(pairs), value);
    }

    /// Record one observation (seconds) in a histogram.
    pub fn observe(&self, name: &'static str, pairs: &[(&'static str, &str)], seconds: f64) {
        let mut r = self.registry.lock().expect("metrics lock");
        let h = r
            .histograms
            .entry(name)
            .or_default()
            .entry(labels(pairs))
            .or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// The current value of a counter (tests, demo).
    pub fn counter(&self, name: &str, pairs: &[(&'static str, &str)]) -> u64 {
        let r = self.registry.lock().expect("metrics lock");
        r.counters
            .get(name)
            .and_then(|m| m.get(&labels(pairs)))
            .copied()
            .unwrap_or(0)
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let r = self.registry.lock().expect("metrics lock");
        let mut out = String::new();
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if let Some(series) = r.counters.get(name) {
                for (l, v) in series {
                    let _ = writeln!(out, "{name}{} {v}", fmt_labels(l, None));
                }
            }
            if let Some(series) = r.gauges.get(name) {
                for (l, v) in series {
                    let _ = writeln!(out, "{name}{} {v}", fmt_labels(l, None));
                }
            }
            if let Some(series) = r.histograms.get(name) {
                for (l, h) in series {
                    for (i, bound) in BUCKETS.iter().enumerate() {
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {}",
                            fmt_labels(l, Some(&bound.to_string())),
                            h.counts[i]
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {}",
                        fmt_labels(l, Some("+Inf")),
                        h.count
                    );
                    let _ = writeln!(out, "{name}_sum{} {}", fmt_labels(l, None), h.sum);
                    let _ = writeln!(out, "{name}_count{} {}", fmt_labels(l, None), h.count);
                }
            }
        }
        out
    }
}

fn fmt_labels(l: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new();
        m.inc(
            "relay_ingest_requests_total",
            &[("route", "gdpr"), ("outcome", "acked")],
            2,
        );
        m.observe("relay_ack_latency_seconds", &[], 0.003);
        let text = m.render();
        assert!(
            text.contains("relay_ingest_requests_total{route=\"gdpr\",outcome=\"acked\"} 2"),
            "{text}"
        );
        assert!(text.contains("relay_ack_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("relay_ack_latency_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("relay_ack_latency_seconds_count 1"));
    }
}
