//! deploy/prometheus/alerts.yml and deploy/grafana/relay-dashboard.json: the rules pass
//! `promtool` (syntax and their unit tests), and every metric they query is one a running relay
//! really exports, so an alert can never watch a series that does not exist.

use crate::helpers::{fixture, spawn_app};
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet};

const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/relay-dashboard.json";
/// Series Prometheus adds itself when it scrapes, not the relay.
const SCRAPE_SERIES: &[&str] = &["up"];

fn repo(path: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str]) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}); install it: apt-get install prometheus")
        });
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_are_valid_and_their_unit_tests_pass() {
    promtool(&["check", "rules", ALERTS]);
    promtool(&["test", "rules", ALERT_TESTS]);
}

/// The index just past the `close` that ends the bracket or string opened at `i`.
fn past(s: &[char], i: usize, close: char) -> Option<usize> {
    let in_string = close == '"' || close == '\'';
    let mut j = i + 1;
    while *s.get(j)? != close {
        j = match s[j] {
            '\\' if in_string => j + 2,
            quote @ ('"' | '\'') if !in_string => past(s, j, quote)?,
            _ => j + 1,
        };
    }
    Some(j + 1)
}

/// The selectors of a PromQL expression: (metric name, text between its braces).
fn selectors(expr: &str) -> Vec<(String, String)> {
    // Aggregations, modifiers and operators; a name followed by `(` is a function.
    const KEYWORDS: &str = "sum min max avg group stddev stdvar count count_values bottomk topk \
                            quantile bool and or unless offset inf nan";
    // Modifiers followed by a list of label names.
    const LABEL_LISTS: &str = "by without on ignoring group_left group_right";
    let is = |list: &str, name: &str| list.split_whitespace().any(|k| k == name);
    let s: Vec<char> = expr.chars().collect();
    let past = |i: usize, close: char| {
        past(&s, i, close).unwrap_or_else(|| panic!("unbalanced `{close}` in {expr}"))
    };
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut found = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == '[' || c == '"' || c == '\'' {
            i = past(i, if c == '[' { ']' } else { c });
        } else if c == '{' {
            panic!("a selector without a metric name in {expr}");
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // Grafana variables, numbers and durations.
            i += 1;
            while i < s.len() && (word(s[i]) || s[i] == '.') {
                i += 1;
            }
        } else if word(c) {
            let start = i;
            while i < s.len() && word(s[i]) {
                i += 1;
            }
            let name: String = s[start..i].iter().collect();
            let mut next = i;
            while next < s.len() && s[next].is_whitespace() {
                next += 1;
            }
            let opens = s.get(next) == Some(&'(');
            if is(LABEL_LISTS, &name) && opens {
                i = past(next, ')');
            } else if is(KEYWORDS, &name) || is(LABEL_LISTS, &name) || opens {
                // An aggregation or function: its arguments are read next.
            } else if s.get(i) == Some(&'{') {
                let end = past(i, '}');
                found.push((name, s[i + 1..end - 1].iter().collect()));
                i = end;
            } else {
                found.push((name, String::new()));
            }
        } else {
            i += 1;
        }
    }
    assert!(!found.is_empty(), "no metric found in {expr}");
    found
}

/// What a scrape shows: each metric's labels by name (a histogram's series under its base
/// name), and which names are histograms.
struct Exported {
    labels: BTreeMap<String, BTreeSet<String>>,
    histograms: BTreeSet<String>,
}

impl Exported {
    fn parse(text: &str) -> Self {
        let histograms: BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.strip_suffix(" histogram"))
            .map(str::to_owned)
            .collect();
        let mut exported = Self {
            labels: BTreeMap::new(),
            histograms,
        };
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = exported.base(&line[..end]).to_owned();
            let labels = exported.labels.entry(name).or_default();
            if let Some(rest) = line[end..].strip_prefix('{') {
                for pair in rest.split('}').next().unwrap_or("").split(',') {
                    if let Some((label, _)) = pair.split_once('=') {
                        labels.insert(label.to_owned());
                    }
                }
            }
        }
        exported
    }

    /// `name` without a histogram's `_bucket`, `_sum` or `_count`.
    fn base<'a>(&self, name: &'a str) -> &'a str {
        ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| self.histograms.contains(*base))
            .unwrap_or(name)
    }

    /// The labels of the metric a query names, if the relay exports it.
    fn get(&self, name: &str) -> Option<&BTreeSet<String>> {
        self.labels.get(self.base(name))
    }
}

/// (where, expression) pairs.
type Queries = Vec<(String, String)>;

/// (alert, expression) of every rule in alerts.yml.
fn alert_exprs() -> Queries {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo(ALERTS)).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            exprs.push((name.to_owned(), rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    assert!(exprs.len() >= 8, "alerts.yml lost its rules: {exprs:?}");
    exprs
}

/// The dashboard's panel queries (where, expression) and its variable queries (name, selector
/// part of `label_values(selector, label)`), after checking the datasource wiring.
fn dashboard_queries(dash: &Json) -> (Queries, Queries) {
    const DS: &str = "${DS_PROMETHEUS}";
    let inputs = dash["__inputs"].as_array().expect("__inputs for import");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let vars = dash["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("template variable {name} missing"))
    };
    // Provisioned from a file, __inputs is not applied: a datasource variable of the same
    // name resolves ${DS_PROMETHEUS} there.
    assert_eq!(var("DS_PROMETHEUS")["type"], "datasource");
    let mut variable_queries = Vec::new();
    for name in ["instance", "route"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], DS, "variable {name}");
        let query = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap();
        let selector = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(&format!(", {name})")))
            .unwrap_or_else(|| panic!("{name}: not a label_values query: {query}"));
        variable_queries.push((format!("variable {name}"), selector.to_owned()));
    }
    let mut panel_queries = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert_eq!(panel["datasource"]["uid"], DS, "panel {title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            if !target["datasource"].is_null() {
                assert_eq!(target["datasource"]["uid"], DS, "panel {title}");
            }
            let expr = target["expr"].as_str().unwrap();
            panel_queries.push((format!("panel {title}"), expr.to_owned()));
        }
    }
    (panel_queries, variable_queries)
}

#[tokio::test]
async fn alerts_and_dashboard_query_only_metrics_the_relay_exports() {
    // Arrange: a real relay that has acked and delivered, so its histograms have series.
    let app = spawn_app().await;
    let response = app
        .post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    assert_eq!(response.status(), 200);
    assert!(!app.deliver_until_settled().await.is_empty());
    let dash: Json =
        serde_json::from_str(&std::fs::read_to_string(repo(DASHBOARD)).unwrap()).unwrap();
    // Act
    let text = app.metrics().await;
    // Assert
    let metrics = Exported::parse(&text);
    assert!(text.contains("\nrelay_ready 1\n"), "{text}");
    let (panels, variables) = dashboard_queries(&dash);
    let alerts = alert_exprs();
    let queries = alerts.iter().map(|q| (q, SCRAPE_SERIES));
    let queries = queries.chain(panels.iter().chain(&variables).map(|q| (q, &[][..])));
    for ((place, expr), also_allowed) in queries {
        for (name, _) in selectors(expr) {
            assert!(
                metrics.get(&name).is_some() || also_allowed.contains(&name.as_str()),
                "{place} queries {name}, which the relay does not export:\n{text}"
            );
        }
    }
    // Every panel follows the variables: each selector filters on $instance, and on $route
    // where the metric has a route label.
    for (place, expr) in &panels {
        for (name, matchers) in selectors(expr) {
            assert!(
                matchers.contains(r#"instance=~"$instance""#),
                "{place}: {name} ignores $instance"
            );
            if metrics.get(&name).unwrap().contains("route") {
                assert!(
                    matchers.contains(r#"route=~"$route""#),
                    "{place}: {name} ignores $route"
                );
            }
        }
    }
}

#[tokio::test]
async fn relay_ready_says_what_health_ready_answers() {
    // Arrange
    let app = spawn_app().await;
    let ready = || async {
        let url = format!("{}/health/ready", app.address);
        app.client.get(url).send().await.unwrap().status().as_u16()
    };
    assert!(app.metrics().await.contains("\nrelay_ready 1\n"));
    assert_eq!(ready().await, 200);
    // Act: the queue stops accepting writes.
    app.queue.close();
    // Assert: the scrape reuses the readiness just checked, or checks again: either way, 0.
    assert_eq!(ready().await, 503);
    assert!(app.metrics().await.contains("\nrelay_ready 0\n"));
}

#[test]
fn selectors_skip_functions_labels_and_durations() {
    assert_eq!(
        selectors(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route=~"$route"}[5m]))) > on(route) group_left max(b{x="}it's"}) or label_replace(c, "d", "\"$1", "e", "(.*)")"#
        ),
        vec![
            ("a_bucket".to_owned(), r#"route=~"$route""#.to_owned()),
            ("b".to_owned(), r#"x="}it's""#.to_owned()),
            ("c".to_owned(), String::new()),
        ]
    );
}
