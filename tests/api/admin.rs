//! Operations: /metrics moves with events, the admin API (auth, parked, replay, purge, pause)
//! and the `relay parked` / `relay routes` commands.

use crate::helpers::{fixture, spawn_app, spawn_app_with, TestApp};
use fake_centercode::Fault;
use serde_json::{json, Value};
use sf_centercode_relay::worker::Outcome;

const TOKEN: &str = "admin-token-for-tests-0123456789abcdef";

async fn spawn_admin_app() -> TestApp {
    spawn_app_with(|s| s.admin.token = Some(TOKEN.to_owned().into())).await
}

impl TestApp {
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.address))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.address))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }
}

/// The value of one series, e.g. `relay_queue_depth{state="ready"}`; 0 when absent.
pub fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

pub fn with_id(n: u32) -> Vec<u8> {
    String::from_utf8(fixture("om_contact_gdpr_removal_single.xml"))
        .unwrap()
        .replace("04l8d0000100001AAA", &format!("04l8d00001{n:08}"))
        .into_bytes()
}

#[tokio::test]
async fn the_admin_api_is_off_without_a_token_and_refuses_a_wrong_one() {
    let off = spawn_app().await;
    let r = off
        .client
        .get(format!("{}/admin/parked", off.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let app = spawn_admin_app().await;
    let r = app
        .client
        .get(format!("{}/admin/parked", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .get(format!("{}/admin/parked", app.address))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (status, _) = app.admin(reqwest::Method::GET, "/admin/parked", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn metrics_move_with_ingest_retry_park_and_replay() {
    let app = spawn_admin_app().await;
    // Ingest: acked, duplicate, rejected.
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.post_outbound("gdpr", fixture("hostile_wrong_org_id.xml"))
        .await;
    let m = app.metrics().await;
    assert_eq!(
        series(
            &m,
            r#"relay_ingest_requests_total{route="gdpr",outcome="acked"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            r#"relay_ingest_requests_total{route="gdpr",outcome="duplicate"}"#
        ),
        1.0
    );
    assert_eq!(
        series(
            &m,
            r#"relay_ingest_requests_total{route="gdpr",outcome="rejected_4xx"}"#
        ),
        1.0
    );
    assert_eq!(
        series(&m, r#"relay_ingest_notifications_total{route="gdpr"}"#),
        1.0
    );
    assert_eq!(series(&m, "relay_ack_latency_seconds_count"), 2.0);
    assert_eq!(series(&m, r#"relay_queue_depth{state="ready"}"#), 1.0);
    assert!(m.contains("relay_build_info{version="));

    // A retry, then success.
    app.centercode.push_fault(Fault {
        status: 503,
        ..Fault::default()
    });
    app.deliver_until_settled().await;
    let m = app.metrics().await;
    assert_eq!(
        series(
            &m,
            r#"relay_deliveries_total{route="gdpr",action="remove_user",outcome="retried"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            r#"relay_deliveries_total{route="gdpr",action="remove_user",outcome="done"}"#
        ),
        1.0
    );
    assert_eq!(
        series(
            &m,
            r#"relay_centercode_responses_total{route="gdpr",status_class="5xx"}"#
        ),
        1.0
    );
    assert_eq!(
        series(
            &m,
            r#"relay_centercode_latency_seconds_count{route="gdpr"}"#
        ),
        2.0
    );

    // A park: depth and age of the parked state.
    app.centercode.push_fault(Fault {
        status: 400,
        ..Fault::default()
    });
    app.post_outbound("gdpr", with_id(7)).await;
    app.deliver_until_settled().await;
    let m = app.metrics().await;
    assert_eq!(
        series(
            &m,
            r#"relay_deliveries_total{route="gdpr",action="remove_user",outcome="parked"}"#
        ),
        1.0
    );
    assert_eq!(series(&m, r#"relay_queue_depth{state="parked"}"#), 1.0);
    assert!(series(&m, r#"relay_queue_oldest_age_seconds{state="parked"}"#) >= 0.0);

    // A replay.
    let (status, body) = app
        .admin(
            reqwest::Method::POST,
            "/admin/parked/replay",
            Some(json!({"all": true})),
        )
        .await;
    assert_eq!((status, body["moved"].as_u64()), (200, Some(1)));
    let m = app.metrics().await;
    assert_eq!(series(&m, "relay_replayed_total"), 1.0);
    assert_eq!(series(&m, r#"relay_queue_depth{state="parked"}"#), 0.0);
    assert_eq!(series(&m, r#"relay_queue_depth{state="ready"}"#), 1.0);
}

#[tokio::test]
async fn a_401_sets_the_alert_metric_and_pauses_the_route() {
    let app = spawn_admin_app().await;
    app.centercode.push_fault(Fault {
        status: 401,
        ..Fault::default()
    });
    app.post_outbound("gdpr", with_id(1)).await;
    app.worker.deliver_all().await.unwrap();
    let m = app.metrics().await;
    assert_eq!(
        series(&m, r#"relay_centercode_auth_failures_total{route="gdpr"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(series(&m, r#"relay_route_paused{route="gdpr"}"#), 1.0);
    assert_eq!(
        series(
            &m,
            r#"relay_deliveries_total{route="gdpr",action="remove_user",outcome="held"}"#
        ),
        1.0
    );
    let (_, routes) = app.admin(reqwest::Method::GET, "/admin/routes", None).await;
    assert!(routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "gdpr" && r["paused"] == true));
    app.admin(reqwest::Method::POST, "/admin/routes/gdpr/resume", None)
        .await;
    assert_eq!(app.deliver_until_settled().await.len(), 1);
    assert_eq!(
        series(&app.metrics().await, r#"relay_route_paused{route="gdpr"}"#),
        0.0
    );
}

#[tokio::test]
async fn oldest_age_reports_the_oldest_ready_job() {
    let app = spawn_admin_app().await;
    app.post_outbound("gdpr", with_id(1)).await;
    let first = std::time::Instant::now();
    // Wait until the job is measurably old (poll with deadline).
    while first.elapsed() < std::time::Duration::from_millis(1100) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // poll with deadline
    }
    app.post_outbound("gdpr", with_id(2)).await;
    let m = app.metrics().await;
    assert_eq!(series(&m, r#"relay_queue_depth{state="ready"}"#), 2.0);
    let age = series(&m, r#"relay_queue_oldest_age_seconds{state="ready"}"#);
    assert!((1.0..10.0).contains(&age), "oldest ready age {age}");
}

async fn park_some(app: &TestApp, removals: u32, feedback: bool) {
    app.centercode.push_fault(Fault {
        status: 400,
        times: removals + 1,
        ..Fault::default()
    });
    for n in 0..removals {
        app.post_outbound("gdpr", with_id(n)).await;
    }
    if feedback {
        app.post_outbound("feedback", fixture("om_feedback_custom_object.xml"))
            .await;
    }
    let outcomes = app.deliver_until_settled().await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Parked { .. })),
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn a_dry_run_counts_what_the_replay_then_moves() {
    let app = spawn_admin_app().await;
    park_some(&app, 3, true).await;
    let (_, dry) = app
        .admin(
            reqwest::Method::POST,
            "/admin/parked/replay",
            Some(json!({"route": "gdpr", "dry_run": true})),
        )
        .await;
    assert_eq!(dry["matched"], 3);
    assert_eq!(app.stats().await.parked, 4, "a dry run moves nothing");
    let (_, real) = app
        .admin(
            reqwest::Method::POST,
            "/admin/parked/replay",
            Some(json!({"route": "gdpr"})),
        )
        .await;
    assert_eq!(real["moved"], dry["matched"]);
    let (_, left) = app.admin(reqwest::Method::GET, "/admin/parked", None).await;
    let left = left["jobs"].as_array().unwrap().clone();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["route"], "feedback");
    // An empty filter is refused rather than replaying everything.
    let (status, _) = app
        .admin(
            reqwest::Method::POST,
            "/admin/parked/replay",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn parked_jobs_are_listed_without_personal_data_and_shown_with_the_request_now() {
    let app = spawn_admin_app().await;
    park_some(&app, 1, false).await;
    let (status, list) = app
        .admin(
            reqwest::Method::GET,
            "/admin/parked?route=gdpr&limit=10",
            None,
        )
        .await;
    assert_eq!(status, 200);
    let text = list.to_string();
    assert!(
        !text.contains("marta") && !text.contains("test-key"),
        "{text}"
    );
    let job = &list["jobs"][0];
    assert_eq!(job["notification_id"], "04l8d0000100000000");
    assert_eq!(job["last_status"], 400);
    let id = job["id"].as_str().unwrap();
    let (_, shown) = app
        .admin(reqwest::Method::GET, &format!("/admin/parked/{id}"), None)
        .await;
    let request = shown["request_now"]["text"].as_str().unwrap();
    assert!(
        request.contains("find=m%2A%2A%2A%40example.org&apiKey=***"),
        "{request}"
    );
    assert!(!shown.to_string().contains("test-key"));
}

#[tokio::test]
async fn purge_needs_confirmation_and_a_filter() {
    let app = spawn_admin_app().await;
    park_some(&app, 2, false).await;
    let (status, _) = app
        .admin(reqwest::Method::DELETE, "/admin/parked?route=gdpr", None)
        .await;
    assert_eq!(status, 400);
    let (status, _) = app
        .admin(reqwest::Method::DELETE, "/admin/parked?confirm=true", None)
        .await;
    assert_eq!(status, 400);
    let (status, body) = app
        .admin(
            reqwest::Method::DELETE,
            "/admin/parked?route=gdpr&confirm=true",
            None,
        )
        .await;
    assert_eq!((status, body["purged"].as_u64()), (200, Some(2)));
    assert_eq!(app.stats().await.parked, 0);
}

#[tokio::test]
async fn a_paused_route_holds_its_jobs_without_spending_attempts() {
    let app = spawn_admin_app().await;
    let (status, _) = app
        .admin(reqwest::Method::POST, "/admin/routes/gdpr/pause", None)
        .await;
    assert_eq!(status, 200);
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.post_outbound("feedback", fixture("om_feedback_custom_object.xml"))
        .await;
    let outcomes = app.worker.deliver_all().await.unwrap();
    assert_eq!(
        outcomes,
        vec![Outcome::Delivered { status: 200 }],
        "only the unpaused route moves"
    );
    assert_eq!(app.stats().await.ready, 1);
    let m = app.metrics().await;
    assert_eq!(series(&m, r#"relay_route_paused{route="gdpr"}"#), 1.0);
    let (_, routes) = app.admin(reqwest::Method::GET, "/admin/routes", None).await;
    assert!(routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "gdpr" && r["paused"] == true));

    app.admin(reqwest::Method::POST, "/admin/routes/gdpr/resume", None)
        .await;
    app.centercode.push_fault(Fault {
        status: 400,
        ..Fault::default()
    });
    app.deliver_until_settled().await;
    let parked = app.queue.parked(10).await.unwrap();
    assert_eq!(parked[0].attempts, 1, "the pause spent no attempts");
    let (status, _) = app
        .admin(reqwest::Method::POST, "/admin/routes/nope/pause", None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_parked_and_routes_commands_talk_to_the_admin_api() {
    let app = spawn_admin_app().await;
    park_some(&app, 2, false).await;
    let relay = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(args)
            .args(["--url", &app.address])
            .env("RELAY_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = relay(&["parked", "list"]);
    assert!(
        table.starts_with("ID") && table.lines().count() == 3,
        "{table}"
    );
    let json: Value = serde_json::from_str(&relay(&[
        "parked",
        "replay",
        "--route",
        "gdpr",
        "--dry-run",
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["matched"], 2);
    assert!(relay(&["parked", "replay", "--route", "gdpr"]).contains("replayed 2 of 2"));
    assert!(relay(&["routes", "pause", "feedback"]).contains("route feedback is paused"));
    assert!(relay(&["routes", "list"]).contains("paused"));
    assert_eq!(app.stats().await.parked, 0);
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    // Arrange: exercise ingest, delivery and the Centercode latency so every series exists.
    let app = spawn_admin_app().await;
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.deliver_until_settled().await;
    let exported = app.metrics().await;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut queried = std::collections::BTreeSet::new();
    for file in ["grafana/relay-dashboard.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for (i, _) in text.match_indices("relay_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `relay_` also starts label values and job names; metric names have a second part.
            if name.len() > "relay_".len()
                && !text[..i].ends_with('"')
                && !text[..i].ends_with("job=")
            {
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 8, "{queried:?}");
    for name in queried {
        let base = name.trim_end_matches("_bucket");
        assert!(
            exported.contains(&format!("\n{base}")),
            "{name} is queried but not exported"
        );
        assert!(
            exported.lines().any(|l| l.starts_with(name.as_str())),
            "{name} has no series yet"
        );
    }
}

#[tokio::test]
async fn a_deep_queue_is_exported_while_the_gateway_keeps_accepting() {
    let app = spawn_app_with(|s| s.queue.depth_warning = 2).await;
    for n in 0..3 {
        assert_eq!(app.post_outbound("gdpr", with_id(n)).await.status(), 200);
    }
    assert_eq!(
        series(&app.metrics().await, "relay_queue_backlog_high"),
        1.0
    );
    assert_eq!(
        app.post_outbound("gdpr", with_id(9)).await.status(),
        200,
        "still accepting"
    );
    app.deliver_until_settled().await;
    assert_eq!(
        series(&app.metrics().await, "relay_queue_backlog_high"),
        0.0
    );
}

#[tokio::test]
async fn the_admin_token_is_checked_before_any_input_and_every_error_is_json() {
    let app = spawn_admin_app().await;
    let send = |method: reqwest::Method, path: &str, token: Option<&str>, body: Option<&str>| {
        let mut req = app.client.request(method, format!("{}{path}", app.address));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_owned());
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let text = res.text().await.unwrap();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
            assert!(v["error"]["code"].is_string(), "{text}");
            assert!(v["error"]["message"].is_string(), "{text}");
            (status, v["error"]["code"].as_str().unwrap().to_owned())
        }
    };
    let bad_query = "/admin/parked?limit=lots&since=yesterday";
    let bad_body = Some("{\"route\": ");
    // Without the token, malformed input reveals nothing: the same 401 as a good request.
    for (method, path, body) in [
        (reqwest::Method::GET, bad_query, None),
        (reqwest::Method::DELETE, "/admin/parked?confirm=maybe", None),
        (reqwest::Method::POST, "/admin/parked/replay", bad_body),
    ] {
        assert_eq!(
            send(method.clone(), path, None, body).await,
            (401, "unauthorized".to_owned())
        );
        // With it, a JSON 400 naming the problem.
        let (status, code) = send(method, path, Some(TOKEN), body).await;
        assert_eq!(status, 400, "{path}");
        assert!(code == "bad_query" || code == "bad_body", "{code}");
    }
    let (status, code) = send(
        reqwest::Method::GET,
        "/admin/parked?ids=",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "bad_ids"));
}
