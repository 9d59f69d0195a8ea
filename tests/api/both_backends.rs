//! The relay's main flows end to end, once per queue backend (embedded SQLite and RabbitMQ).

use crate::helpers::{bearer, fixture, spawn_app_on, Backend};
use fake_centercode::Fault;
use serde_json::{json, Value};
use sf_centercode_relay::worker::Outcome;
use std::time::{Duration, Instant};

const ADMIN: &str = "admin-token-for-both-backends-0123456789";

async fn removal_and_redelivery(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    for file in [
        "om_contact_gdpr_removal_single.xml",
        "om_contact_gdpr_removal_redelivery.xml",
    ] {
        let r = app.post_outbound("gdpr", fixture(file)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.bytes().await.unwrap().as_ref(),
            fixture("response_ack_true.xml").as_slice()
        );
    }
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes, vec![Outcome::Delivered { status: 200 }]);
    assert_eq!(
        app.centercode.requests()[0].query["find"],
        "marta.kowalska@example.org"
    );
}

async fn feedback_is_mapped(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    app.post_outbound("feedback", fixture("om_feedback_nil_fields.xml"))
        .await;
    assert_eq!(
        app.deliver_until_settled().await,
        vec![Outcome::Delivered { status: 200 }]
    );
    let sent: Value = serde_json::from_str(&app.centercode.requests()[0].body_text).unwrap();
    assert_eq!(
        sent,
        json!({"summary": "Add dark mode to the tester portal", "severity": "Minor", "status": "New", "salesforce_id": "a0B8d00000AbCdFEAV"})
    );
}

async fn transient_failures_are_retried(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    app.centercode.push_fault(Fault {
        status: 503,
        times: 2,
        ..Fault::default()
    });
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(
        outcomes,
        vec![
            Outcome::Retried { status: Some(503) },
            Outcome::Retried { status: Some(503) },
            Outcome::Delivered { status: 200 }
        ]
    );
}

async fn parked_then_replayed_through_the_admin_api(backend: Backend) {
    let app = spawn_app_on(backend, |s| s.admin.token = Some(ADMIN.to_owned().into())).await;
    app.centercode.push_fault(Fault {
        status: 400,
        ..Fault::default()
    });
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    let outcomes = app.deliver_until_settled().await;
    assert!(
        matches!(
            &outcomes[..],
            [Outcome::Parked {
                status: Some(400),
                ..
            }]
        ),
        "{outcomes:?}"
    );
    let replay = |dry_run: bool| {
        app.client
            .post(format!("{}/admin/parked/replay", app.address))
            .bearer_auth(ADMIN)
            .json(&json!({"route": "gdpr", "dry_run": dry_run}))
            .send()
    };
    let dry: Value = replay(true).await.unwrap().json().await.unwrap();
    assert_eq!(dry["matched"], 1);
    let done: Value = replay(false).await.unwrap().json().await.unwrap();
    assert_eq!(done["moved"], 1);
    assert_eq!(
        app.deliver_until_settled().await,
        vec![Outcome::Delivered { status: 200 }]
    );
    assert_eq!(app.stats().await.parked, 0);
}

async fn callouts_are_deduplicated(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let body = fixture("apex_removal_request.json");
    let first: Value = app
        .post_callout("apex-removal", &body, &bearer("k-1"))
        .await
        .json()
        .await
        .unwrap();
    let again: Value = app
        .post_callout("apex-removal", &body, &bearer("k-1"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (first["status"].as_str(), again["status"].as_str()),
        (Some("queued"), Some("duplicate"))
    );
    assert_eq!(app.deliver_until_settled().await.len(), 1);
}

/// Poll /metrics until `series` reads at least `min`; it must never exceed the time since
/// `since` (the age cannot be older than the test's own clock).
async fn age_reaches(app: &crate::helpers::TestApp, series: &str, min: f64, since: Instant) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let age = crate::admin::series(&app.metrics().await, series);
        let bound = since.elapsed().as_secs_f64();
        assert!(
            age <= bound,
            "{series} = {age}, older than the {bound} s it can be"
        );
        if age >= min {
            return;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {age}");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
}

async fn queue_ages_show_on_metrics(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let ready = r#"relay_queue_oldest_age_seconds{state="ready"}"#;
    let parked = r#"relay_queue_oldest_age_seconds{state="parked"}"#;
    let before_post = Instant::now();
    assert_eq!(crate::admin::series(&app.metrics().await, ready), 0.0);
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    age_reaches(&app, ready, 1.0, before_post).await;
    app.centercode.push_fault(Fault {
        status: 400,
        ..Fault::default()
    });
    let before_park = Instant::now();
    let outcomes = app.deliver_until_settled().await;
    assert!(
        matches!(&outcomes[..], [Outcome::Parked { .. }]),
        "{outcomes:?}"
    );
    age_reaches(&app, parked, 1.0, before_park).await;
    let m = app.metrics().await;
    assert_eq!(crate::admin::series(&m, ready), 0.0);
    assert_eq!(
        crate::admin::series(&m, r#"relay_queue_depth{state="parked"}"#),
        1.0
    );
}

/// `--ids` narrows list, replay and purge (ANDed with the other filters), and an id that
/// matches nothing is reported, through the API and the `relay parked` command.
async fn ids_select_exactly_those_parked_jobs(backend: Backend) {
    let app = spawn_app_on(backend, |s| s.admin.token = Some(ADMIN.to_owned().into())).await;
    app.centercode.push_fault(Fault {
        status: 400,
        times: 3,
        ..Fault::default()
    });
    for n in 0..3 {
        app.post_outbound("gdpr", crate::admin::with_id(n)).await;
    }
    app.deliver_until_settled().await;
    let admin = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut req = app
            .client
            .request(method, format!("{}{path}", app.address))
            .bearer_auth(ADMIN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (_, all) = admin(reqwest::Method::GET, "/admin/parked".into(), None).await;
    let mut ids: Vec<String> = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 3);

    // The CLI purges exactly the named id, and says which id matched nothing.
    // tokio's Command: the relay under test (RabbitMQ's client) runs on this test's runtime.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args([
            "parked",
            "purge",
            "--route",
            "gdpr",
            "--yes",
            "--url",
            &app.address,
        ])
        .args(["--ids", &format!("{},no-such-job", ids[0])])
        .env("RELAY_ADMIN_TOKEN", ADMIN)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("purged 1 "));
    assert!(stderr.contains("no-such-job"), "{stderr}");
    assert_eq!(app.stats().await.parked, 2);

    // List by id, ANDed with the route: the right job, or nothing for another route.
    let (_, one) = admin(
        reqwest::Method::GET,
        format!("/admin/parked?ids={},{}", ids[1], ids[0]),
        None,
    )
    .await;
    let listed: Vec<&str> = one["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![ids[1].as_str()]);
    assert_eq!(one["unmatched_ids"], json!([ids[0]]));
    let (_, other_route) = admin(
        reqwest::Method::GET,
        format!("/admin/parked?ids={}&route=feedback", ids[1]),
        None,
    )
    .await;
    assert_eq!(other_route["jobs"], json!([]));
    assert_eq!(other_route["unmatched_ids"], json!([ids[1]]));

    // Replay by id moves that job only.
    let (_, replayed) = admin(
        reqwest::Method::POST,
        "/admin/parked/replay".into(),
        Some(json!({"ids": [ids[1]]})),
    )
    .await;
    assert_eq!(
        (replayed["matched"].as_u64(), replayed["moved"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(app.stats().await.parked, 1);
    let (_, left) = admin(reqwest::Method::GET, "/admin/parked".into(), None).await;
    assert_eq!(left["jobs"][0]["id"], json!(ids[2]));
}

/// Park `n` jobs straight through the queue (no Centercode round trips).
async fn park_directly(app: &crate::helpers::TestApp, n: u32) {
    use sf_centercode_relay::queue::{Job, NewJob};
    use sf_centercode_relay::settings::Action;
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob {
            received_at_ms: 0,
            id: uuid::Uuid::new_v4().to_string(),
            route: "gdpr".into(),
            action: Action::RemoveUser,
            dedupe_key: None,
            body_hash: None,
            org_id: None,
            notification_id: Some(format!("04l{i:015}")),
            record_id: None,
            job: Job::CalloutV1 {
                idempotency_key: None,
                body: json!({"n": i}),
            },
        })
        .collect();
    app.queue.enqueue(jobs).await.unwrap();
    let mut parked = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while parked < n {
        for job in app.queue.lease(64, Vec::new()).await.unwrap() {
            app.queue
                .park(&job, "Centercode rejected the request (400)", Some(400))
                .await
                .unwrap();
            parked += 1;
        }
        assert!(Instant::now() < deadline, "parked only {parked} of {n}");
    }
}

/// A listing cursor names a position, so it stays valid when the jobs before it (itself
/// included) are replayed meanwhile.
async fn a_cursor_stays_valid_after_the_jobs_before_it_are_replayed(backend: Backend) {
    let app = spawn_app_on(backend, |s| s.admin.token = Some(ADMIN.to_owned().into())).await;
    park_directly(&app, 4).await;
    let list = |query: String| {
        let req = app
            .client
            .get(format!("{}/admin/parked?{query}", app.address))
            .bearer_auth(ADMIN);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let first = list("limit=2".into()).await;
    let page_ids: Vec<String> = first["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let replayed: Value = app
        .client
        .post(format!("{}/admin/parked/replay", app.address))
        .bearer_auth(ADMIN)
        .json(&json!({"ids": page_ids}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replayed["moved"], 2);
    let second = list(format!("limit=2&cursor={cursor}")).await;
    let rest: Vec<&str> = second["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        rest.len(),
        2,
        "the page after a replayed cursor job: {second}"
    );
    assert!(rest.iter().all(|id| !page_ids.iter().any(|p| p == id)));
}

/// Listing (and counting) parked jobs takes them out of the queue to read them; the
/// depth and age monitoring sees must not move while it does.
async fn listing_parked_jobs_does_not_move_their_depth_or_age(backend: Backend) {
    let app = spawn_app_on(backend, |s| s.admin.token = Some(ADMIN.to_owned().into())).await;
    park_directly(&app, 300).await;
    let before = app.stats().await;
    assert_eq!(before.parked, 300);
    let lister = {
        let (client, url) = (
            app.client.clone(),
            format!("{}/admin/parked?limit=1000", app.address),
        );
        tokio::spawn(async move {
            for _ in 0..3 {
                let page: Value = client
                    .get(&url)
                    .bearer_auth(ADMIN)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert_eq!(page["jobs"].as_array().unwrap().len(), 300);
            }
        })
    };
    let mut samples = 0;
    while !lister.is_finished() {
        let s = app.stats().await;
        assert_eq!(s.parked, 300, "the parked depth moved during a listing");
        assert_eq!(
            s.oldest_parked_ms, before.oldest_parked_ms,
            "the parked age moved"
        );
        samples += 1;
    }
    lister.await.unwrap();
    assert!(samples > 3, "only {samples} readings during the listings");
    assert_eq!(app.stats().await.parked, 300);
}

macro_rules! on_both_backends {
    ($($name:ident),*) => {
        mod embedded {
            $(#[tokio::test] async fn $name() { super::$name(crate::helpers::Backend::Embedded).await })*
        }
        mod rabbitmq {
            $(#[tokio::test] async fn $name() { super::$name(crate::helpers::Backend::Rabbitmq).await })*
        }
    };
}
/// For other files whose tests run once per backend.
pub(crate) use on_both_backends;

on_both_backends!(
    removal_and_redelivery,
    feedback_is_mapped,
    transient_failures_are_retried,
    parked_then_replayed_through_the_admin_api,
    callouts_are_deduplicated,
    queue_ages_show_on_metrics,
    ids_select_exactly_those_parked_jobs,
    a_cursor_stays_valid_after_the_jobs_before_it_are_replayed,
    listing_parked_jobs_does_not_move_their_depth_or_age
);
