//! Scripted faults and the `/__fake` control plane over HTTP.

use std::time::Duration;

use fake_salesforce::{Fault, FaultKind};
use serde_json::{json, Value};

use crate::helpers::*;

const UPSERT: &str = "sobjects/Contact/Centercode_Id__c/CC-1";

#[tokio::test]
async fn an_unavailable_fault_answers_503_for_n_calls_then_calls_succeed() {
    // Arrange
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    fake.push_fault(Fault::times(FaultKind::Unavailable, 2));

    // Act
    let mut statuses = vec![];
    for _ in 0..3 {
        statuses.push(upsert_status(&fake, &token, "CC-1").await);
    }

    // Assert
    assert_eq!(statuses, [503, 503, 201]);
    assert_eq!(fake.api_usage().used, 1, "a 503 is not counted");
    let writes = fake.wait_for_writes(3, Duration::from_secs(5)).await;
    let recorded: Vec<u16> = writes.iter().map(|w| w.status).collect();
    assert_eq!(recorded, [503, 503, 201]);
}

#[tokio::test]
async fn a_hang_fault_outlasts_a_short_client_timeout() {
    // Arrange
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    fake.push_fault(Fault::once(FaultKind::Hang { ms: 600 }));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();

    // Act
    let hung = impatient
        .patch(data_url(&fake, UPSERT))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await;
    let next = impatient
        .patch(data_url(&fake, UPSERT))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await;

    // Assert
    assert!(hung.unwrap_err().is_timeout());
    assert!(next.unwrap().status().is_success());
    // The hung call is still applied once its hang is over, as Salesforce commits a write
    // whose client gave up.
    let writes = fake.wait_for_writes(2, Duration::from_secs(5)).await;
    let mut statuses: Vec<u16> = writes.iter().map(|w| w.status).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 201]);
}

#[tokio::test]
async fn a_validation_fault_hits_only_paths_that_contain_its_text() {
    // Arrange
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    let kind = FaultKind::Validation {
        error_code: "FIELD_CUSTOM_VALIDATION_EXCEPTION".into(),
        message: "Closed cases are read-only".into(),
        fields: vec!["Status".into()],
    };
    fake.push_fault(Fault::once(kind).on_path("/Case/"));

    // Act
    let contact = patch(&fake, &token, UPSERT, json!({})).await;
    let case = outcome(patch(&fake, &token, "sobjects/Case/Ext__c/1", json!({})).await).await;

    // Assert
    assert_eq!(contact.status(), 201);
    assert_eq!(
        case,
        (
            400,
            json!([{"message": "Closed cases are read-only", "errorCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "fields": ["Status"]}])
        )
    );
}

#[tokio::test]
async fn an_invalid_session_fault_forces_one_new_token() {
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    fake.push_fault(Fault::once(FaultKind::InvalidSession));

    let first = outcome(patch(&fake, &token, UPSERT, json!({})).await).await;
    let second = patch(&fake, &token, UPSERT, json!({})).await;

    assert_eq!((first.0, error_code(&first.1)), (401, "INVALID_SESSION_ID"));
    assert_eq!(second.status(), 201);
}

async fn control(
    fake: &fake_salesforce::FakeSalesforce,
    method: &str,
    path: &str,
    body: Value,
) -> Value {
    let url = format!("{}/__fake/{path}", fake.base_url());
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let resp = client()
        .request(method, url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "control call {path}");
    resp.json().await.unwrap()
}

#[tokio::test]
async fn the_control_plane_does_over_http_what_the_handle_does() {
    // Arrange
    let fake = spawn_fake().await;
    let token = token(&fake).await;

    // Act: script a fault, a rule and a duplicate through /__fake.
    control(
        &fake,
        "POST",
        "faults",
        json!({"kind": "request_limit", "times": 1}),
    )
    .await;
    let limited = upsert_status(&fake, &token, "CC-1").await;
    control(
        &fake,
        "POST",
        "record-rules",
        json!({"external_id": "CC-9", "error_code": "INVALID_EMAIL_ADDRESS", "message": "Email: invalid", "times": 1}),
    )
    .await;
    let ruled = upsert_status(&fake, &token, "CC-9").await;
    let again = upsert_status(&fake, &token, "CC-9").await;
    let inserted = control(
        &fake,
        "POST",
        "records/Contact",
        json!({"Centercode_Id__c": "CC-9"}),
    )
    .await;
    let records = control(&fake, "GET", "records/Contact", json!(null)).await;
    control(
        &fake,
        "PUT",
        "api-usage",
        json!({"used": 7, "allocation": 8}),
    )
    .await;
    let counters = control(&fake, "GET", "counters", json!(null)).await;
    control(&fake, "POST", "revoke-tokens", json!(null)).await;
    let revoked = upsert_status(&fake, &token, "CC-1").await;
    let writes = control(&fake, "GET", "writes", json!(null)).await;
    let config = control(&fake, "GET", "config", json!(null)).await;

    // Assert
    assert_eq!((limited, ruled, again, revoked), (403, 400, 201, 401));
    assert!(inserted["id"].as_str().unwrap().starts_with("003"));
    assert_eq!(records.as_array().unwrap().len(), 2);
    assert_eq!(records[1]["fields"]["Centercode_Id__c"], "CC-9");
    assert_eq!(
        counters,
        json!({"tokens_minted": 1, "data_calls": 3, "api_used": 7, "api_allocation": 8})
    );
    assert_eq!(writes.as_array().unwrap().len(), 4);
    assert_eq!(config["jwt"]["client_id"], "3MVG9-relay-test");

    // Act: reset forgets everything.
    control(&fake, "POST", "reset", json!(null)).await;
    assert!(fake.records("Contact").is_empty());
    assert_eq!(fake.counters().tokens_minted, 0);
}
