//! Apex and Flow callouts: auth, idempotency, and delivery.

use crate::helpers::{
    bearer, fixture, hmac_headers, sign, sign_v2, spawn_app, spawn_app_with, BEARER, HMAC_SECRET,
};
use serde_json::Value;
use sf_centercode_relay::worker::Outcome;
use std::time::{SystemTime, UNIX_EPOCH};

fn body_of(raw: &[u8]) -> Vec<u8> {
    raw.to_vec()
}

#[tokio::test]
async fn an_apex_removal_is_accepted_and_delivered() {
    let app = spawn_app().await;
    let body = body_of(&fixture("apex_removal_request.json"));
    let r = app
        .post_callout("apex-removal", &body, &bearer("5c0d7a3e"))
        .await;
    assert_eq!(r.status(), 202);
    let reply: Value = r.json().await.unwrap();
    assert_eq!(reply["status"], "queued");
    assert!(reply["job_id"].as_str().is_some_and(|s| !s.is_empty()));
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes, vec![Outcome::Delivered { status: 200 }]);
    assert_eq!(
        app.centercode.requests()[0].query["find"],
        "marta.kowalska@example.org"
    );
}

#[tokio::test]
async fn a_repeated_idempotency_key_is_stored_once_and_a_different_body_is_refused() {
    let app = spawn_app().await;
    let body = fixture("apex_removal_request.json");
    let first: Value = app
        .post_callout("apex-removal", &body, &bearer("key-1"))
        .await
        .json()
        .await
        .unwrap();
    let again = app
        .post_callout("apex-removal", &body, &bearer("key-1"))
        .await;
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["status"], "duplicate");
    assert_eq!(again["job_id"], first["job_id"]);
    let mut other = body.clone();
    other.extend_from_slice(b" ");
    let conflict = app
        .post_callout("apex-removal", &other, &bearer("key-1"))
        .await;
    assert_eq!(conflict.status(), 422);
    let err: Value = conflict.json().await.unwrap();
    assert_eq!(err["error"]["code"], "idempotency_key_reused");
    assert_eq!(app.stats().await.ready, 1);
}

#[tokio::test]
async fn a_wrong_or_missing_bearer_is_401_and_stores_nothing() {
    let app = spawn_app().await;
    let body = fixture("apex_removal_request.json");
    let r = app
        .post_callout(
            "apex-removal",
            &body,
            &[("Authorization", "Bearer nope".into())],
        )
        .await;
    assert_eq!(r.status(), 401);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unauthorized");
    assert!(!err.to_string().contains(BEARER));
    let r = app.post_callout("apex-removal", &body, &[]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(app.stats().await.ready, 0);
}

#[tokio::test]
async fn an_hmac_signed_feedback_is_accepted_and_mapped() {
    let app = spawn_app().await;
    let body = fixture("apex_feedback_submission.json");
    let r = app
        .post_callout("apex-feedback", &body, &hmac_headers(&body, "9b2f4c61"))
        .await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes, vec![Outcome::Delivered { status: 200 }]);
    let sent: Value = serde_json::from_str(&app.centercode.requests()[0].body_text).unwrap();
    assert_eq!(sent["summary"], "Folder rename reverted after sync");
    assert_eq!(sent["severity"], "Minor");
    assert_eq!(sent["salesforce_id"], "a0B8d00000AbCdEEAV");
}

#[tokio::test]
async fn a_stale_or_tampered_signature_is_refused() {
    let app = spawn_app().await;
    let body = fixture("apex_feedback_submission.json");
    // The fixture's own signature is valid but its timestamp is from 2024: outside the window.
    let stale = vec![
        ("X-Relay-Timestamp", "1715678467".to_owned()),
        (
            "X-Relay-Signature",
            "v1=dS4zFB0Dp+wjk01VJGpwGLUXqLCLWLASSsV+kufpI5w=".to_owned(),
        ),
    ];
    assert_eq!(
        sign(HMAC_SECRET, "1715678467", &body),
        stale[1].1,
        "fixture test vector"
    );
    assert_eq!(
        app.post_callout("apex-feedback", &body, &stale)
            .await
            .status(),
        401
    );
    let mut headers = hmac_headers(&body, "k");
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    assert_eq!(
        app.post_callout("apex-feedback", &tampered, &headers)
            .await
            .status(),
        401
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    headers[0].1 = (now - 600).to_string();
    headers[1].1 = sign_v2(HMAC_SECRET, &headers[0].1, "k", &body);
    assert_eq!(
        app.post_callout("apex-feedback", &body, &headers)
            .await
            .status(),
        401
    );
    assert_eq!(app.stats().await.ready, 0);
}

#[tokio::test]
async fn a_captured_signed_callout_cannot_be_replayed_under_a_new_idempotency_key() {
    let app = spawn_app().await;
    let body = fixture("apex_feedback_submission.json");
    let signed = hmac_headers(&body, "key-1");
    assert_eq!(
        app.post_callout("apex-feedback", &body, &signed)
            .await
            .status(),
        202
    );
    // Same timestamp and signature, another key: v2 signs the key, so this is refused.
    let mut replayed = signed.clone();
    replayed[2].1 = "key-2".into();
    let r = app.post_callout("apex-feedback", &body, &replayed).await;
    assert_eq!(r.status(), 401);
    // A v1 signature (timestamp and body only) is refused unless the route accepts it.
    let mut v1 = signed.clone();
    v1[1].1 = sign(HMAC_SECRET, &signed[0].1, &body);
    v1[2].1 = "key-3".into();
    assert_eq!(
        app.post_callout("apex-feedback", &body, &v1).await.status(),
        401
    );
    assert_eq!(
        app.stats().await.ready,
        1,
        "one job, from the genuine request"
    );

    let lenient = spawn_app_with(|s| {
        let route = s
            .routes
            .iter_mut()
            .find(|r| r.name == "apex-feedback")
            .unwrap();
        route.auth.as_mut().unwrap().hmac_accept_v1 = true;
    })
    .await;
    assert_eq!(
        lenient
            .post_callout("apex-feedback", &body, &v1)
            .await
            .status(),
        202
    );
}

#[tokio::test]
async fn a_flow_callout_without_headers_dedupes_on_its_record_id() {
    let app = spawn_app().await;
    let body = fixture("flow_http_callout_feedback.json");
    let auth = [("Authorization", format!("Bearer {BEARER}"))];
    assert_eq!(
        app.post_callout("flow-feedback", &body, &auth)
            .await
            .status(),
        202
    );
    let again: Value = app
        .post_callout("flow-feedback", &body, &auth)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["status"], "duplicate");
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes, vec![Outcome::Delivered { status: 200 }]);
    assert_eq!(
        app.centercode.requests()[0].path,
        "/api/v1/projects/beta1/externalSources/sf-ideas"
    );
}

#[tokio::test]
async fn bad_callouts_get_json_errors() {
    let app = spawn_app().await;
    let auth = bearer("k");
    let r = app.post_callout("apex-removal", b"{not json", &auth).await;
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_json");
    let r = app.post_callout("apex-removal", b"[1,2]", &auth).await;
    assert_eq!(r.status(), 400);
    let r = app
        .client
        .post(format!("{}/salesforce/callout/apex-removal", app.address))
        .header("Content-Type", "text/plain")
        .header("Authorization", format!("Bearer {BEARER}"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(2 * 1024 * 1024));
    let r = app
        .post_callout("apex-removal", big.as_bytes(), &auth)
        .await;
    assert_eq!(r.status(), 413);
    let r = app.post_callout("no-such", b"{}", &auth).await;
    assert_eq!(r.status(), 404);
    assert_eq!(app.stats().await.ready, 0);
}
