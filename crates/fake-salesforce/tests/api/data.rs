//! The data API: upserts, updates, Collections, usage and its header, sessions, latency.

use std::time::{Duration, Instant};

use fake_salesforce::{RecordRule, MAX_COLLECTION_RECORDS};
use serde_json::{json, Value};

use crate::helpers::*;

const UPSERT: &str = "sobjects/Contact/Centercode_Id__c/CC-1";

#[tokio::test]
async fn upsert_creates_then_updates_then_answers_300_on_a_duplicate_external_id() {
    // Arrange
    let fake = spawn_fake().await;
    let token = token(&fake).await;

    // Act
    let created = outcome(patch(&fake, &token, UPSERT, json!({"LastName": "Okafor"})).await).await;
    let updated = outcome(patch(&fake, &token, UPSERT, json!({"Status__c": "Open"})).await).await;
    fake.insert_record(
        "Contact",
        json!({"Centercode_Id__c": "CC-1", "LastName": "Copy"}),
    );
    let ambiguous =
        outcome(patch(&fake, &token, UPSERT, json!({"Status__c": "Closed"})).await).await;

    // Assert
    assert_eq!(created.0, 201);
    assert_eq!(created.1["created"], true);
    assert_eq!(created.1["success"], true);
    assert_eq!(created.1["errors"], json!([]));
    let id = created.1["id"].as_str().unwrap().to_string();
    assert_eq!((id.len(), &id[..3]), (18, "003"));
    assert_eq!(
        updated,
        (
            200,
            json!({"id": id, "success": true, "errors": [], "created": false})
        )
    );
    assert_eq!(ambiguous.0, 300);
    assert_eq!(ambiguous.1.as_array().unwrap().len(), 2);
    assert!(ambiguous.1[0]
        .as_str()
        .unwrap()
        .ends_with(&format!("/sobjects/Contact/{id}")));
    let records = fake.records("Contact");
    assert_eq!(records[0].id, id);
    assert_eq!(records[0].get("LastName"), Some(&json!("Okafor")));
    assert_eq!(
        records[0].get("Status__c"),
        Some(&json!("Open")),
        "300 changed nothing"
    );
    assert_eq!(records[0].get("Centercode_Id__c"), Some(&json!("CC-1")));
    let (status, read) = outcome(get(&fake, &token, &format!("sobjects/Contact/{id}")).await).await;
    assert_eq!(
        (status, &read["Id"], &read["Status__c"]),
        (200, &json!(id), &json!("Open"))
    );
}

#[tokio::test]
async fn the_external_id_field_in_the_body_is_refused() {
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    let body = json!({"Centercode_Id__c": "CC-1", "LastName": "Okafor"});

    let (status, body) = outcome(patch(&fake, &token, UPSERT, body).await).await;

    assert_eq!((status, error_code(&body)), (400, "INVALID_FIELD"));
    assert_eq!(body[0]["fields"], json!(["Centercode_Id__c"]));
    assert!(fake.records("Contact").is_empty());
}

#[tokio::test]
async fn update_by_id_answers_204_and_404_for_an_unknown_id() {
    // Arrange
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    let id = fake.insert_record("Case", json!({"Status": "New"}));

    // Act
    let ok = patch(
        &fake,
        &token,
        &format!("sobjects/Case/{id}"),
        json!({"Status": "Closed"}),
    )
    .await;
    let missing = patch(&fake, &token, "sobjects/Case/5005g000000000AAAA", json!({})).await;

    // Assert
    assert_eq!(outcome(ok).await, (204, Value::Null));
    let (status, body) = outcome(missing).await;
    assert_eq!((status, error_code(&body)), (404, "NOT_FOUND"));
    assert_eq!(
        fake.records("Case")[0].get("Status"),
        Some(&json!("Closed"))
    );
}

fn collection(all_or_none: bool, ids: &[&str]) -> Value {
    let records: Vec<Value> = ids
        .iter()
        .map(|id| json!({"attributes": {"type": "Contact"}, "Centercode_Id__c": id, "LastName": "L"}))
        .collect();
    json!({"allOrNone": all_or_none, "records": records})
}

const COLLECTION: &str = "composite/sobjects/Contact/Centercode_Id__c";

#[tokio::test]
async fn a_record_rule_fails_its_own_record_in_a_collection() {
    // Arrange
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    fake.add_record_rule(RecordRule {
        fields: vec!["Status__c".into()],
        ..RecordRule::new(
            "CC-2",
            "FIELD_CUSTOM_VALIDATION_EXCEPTION",
            "Status is locked",
        )
    });
    fake.insert_record("Contact", json!({"Centercode_Id__c": "CC-3"}));
    fake.insert_record("Contact", json!({"Centercode_Id__c": "CC-3"}));

    // Act
    let body = collection(false, &["CC-1", "CC-2", "CC-3", "CC-4"]);
    let (status, results) = outcome(patch(&fake, &token, COLLECTION, body).await).await;

    // Assert
    assert_eq!(status, 200);
    let success: Vec<&Value> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["success"])
        .collect();
    assert_eq!(
        success,
        [&json!(true), &json!(false), &json!(false), &json!(true)]
    );
    assert_eq!(
        results[1]["errors"],
        json!([{"statusCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "Status is locked", "fields": ["Status__c"]}])
    );
    assert_eq!(
        results[2]["errors"][0]["statusCode"],
        "DUPLICATE_EXTERNAL_ID"
    );
    assert_eq!(results[0]["created"], true);
    assert_eq!(
        fake.records("Contact").len(),
        4,
        "two inserted, CC-1 and CC-4 created"
    );
    assert_eq!(fake.api_usage().used, 1, "a Collections call counts once");
}

#[tokio::test]
async fn all_or_none_writes_nothing_when_one_record_fails() {
    // Arrange
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    fake.add_record_rule(RecordRule::new(
        "CC-2",
        "STRING_TOO_LONG",
        "LastName: data value too large",
    ));

    // Act
    let body = collection(true, &["CC-1", "CC-2"]);
    let (status, results) = outcome(patch(&fake, &token, COLLECTION, body).await).await;

    // Assert
    assert_eq!(status, 200);
    assert_eq!(
        results[0]["errors"][0]["statusCode"],
        "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    );
    assert_eq!(results[1]["errors"][0]["statusCode"], "STRING_TOO_LONG");
    assert!(fake.records("Contact").is_empty());
}

#[tokio::test]
async fn a_collection_of_more_than_200_records_is_refused() {
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    let ids: Vec<String> = (0..=MAX_COLLECTION_RECORDS)
        .map(|i| format!("CC-{i}"))
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();

    let (status, body) =
        outcome(patch(&fake, &token, COLLECTION, collection(false, &ids)).await).await;

    assert_eq!((status, error_code(&body)), (400, "EXCEEDED_ID_LIMIT"));
    assert!(fake.records("Contact").is_empty());
}

#[tokio::test]
async fn every_answer_carries_the_api_usage_and_each_call_counts() {
    // Arrange
    let fake = spawn_fake_with(|c| {
        c.api_used = 10;
        c.api_allocation = 5000;
    })
    .await;
    let token = token(&fake).await;

    // Act
    let first = patch(&fake, &token, UPSERT, json!({})).await;
    let refused = patch(&fake, &token, UPSERT, json!({"Centercode_Id__c": "x"})).await;
    let unauthenticated = get(&fake, "not-a-token", "limits").await;
    let limits = get(&fake, &token, "limits").await;

    // Assert
    assert_eq!(limit_info(&first), "api-usage=11/5000");
    assert_eq!(limit_info(&refused), "api-usage=12/5000");
    assert_eq!(
        limit_info(&unauthenticated),
        "api-usage=12/5000",
        "a 401 is not counted"
    );
    assert_eq!(limit_info(&limits), "api-usage=13/5000");
    let body: Value = limits.json().await.unwrap();
    assert_eq!(
        body["DailyApiRequests"],
        json!({"Max": 5000, "Remaining": 4987})
    );
    assert_eq!(fake.data_calls(), 4);
}

#[tokio::test]
async fn calls_are_refused_with_request_limit_exceeded_once_the_allocation_is_used() {
    // Arrange
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    fake.set_api_usage(99, 100);

    // Act
    let last = patch(&fake, &token, UPSERT, json!({})).await;
    let over = patch(
        &fake,
        &token,
        "sobjects/Contact/Centercode_Id__c/CC-2",
        json!({}),
    )
    .await;

    // Assert
    assert_eq!(last.status(), 201);
    assert_eq!(limit_info(&over), "api-usage=100/100");
    let (status, body) = outcome(over).await;
    assert_eq!((status, error_code(&body)), (403, "REQUEST_LIMIT_EXCEEDED"));
    assert_eq!(fake.records("Contact").len(), 1);
}

#[tokio::test]
async fn revoked_and_expired_tokens_get_invalid_session_id() {
    // Arrange
    let fake = spawn_fake().await;
    let old = token(&fake).await;

    // Act
    fake.revoke_tokens();
    let revoked = outcome(patch(&fake, &old, UPSERT, json!({})).await).await;
    let new = token(&fake).await;
    let fresh = patch(&fake, &new, UPSERT, json!({})).await;

    // Assert
    assert_eq!(
        (revoked.0, error_code(&revoked.1)),
        (401, "INVALID_SESSION_ID")
    );
    assert_eq!(revoked.1[0]["message"], "Session expired or invalid");
    assert_eq!(fresh.status(), 201);
    assert_eq!(fake.tokens_minted(), 2);

    let mut config = fake.config();
    config.token_lifetime_secs = 0;
    fake.set_config(config).unwrap();
    let short_lived = token(&fake).await;
    let expired = outcome(get(&fake, &short_lived, "limits").await).await;
    assert_eq!(
        (expired.0, error_code(&expired.1)),
        (401, "INVALID_SESSION_ID")
    );
}

#[tokio::test]
async fn writes_are_recorded_with_their_call_options() {
    // Arrange
    let fake = spawn_fake().await;
    let token = token(&fake).await;

    // Act
    let resp = client()
        .patch(data_url(&fake, UPSERT))
        .bearer_auth(&token)
        .header("Sforce-Call-Options", "client=centercode-relay")
        .json(&json!({"LastName": "Okafor"}))
        .send()
        .await
        .unwrap();
    get(&fake, &token, "limits").await;

    // Assert
    assert_eq!(resp.status(), 201);
    let writes = fake.wait_for_writes(1, Duration::from_secs(5)).await;
    assert_eq!(writes.len(), 1, "reads are not recorded");
    assert_eq!(writes[0].method, "PATCH");
    assert_eq!(writes[0].path, format!("/services/data/{VERSION}/{UPSERT}"));
    assert_eq!(
        writes[0].call_options.as_deref(),
        Some("client=centercode-relay")
    );
    assert_eq!(writes[0].body, json!({"LastName": "Okafor"}));
    assert_eq!(writes[0].status, 201);
}

#[tokio::test]
async fn the_configured_latency_is_added_to_data_calls() {
    let fake = spawn_fake_with(|c| c.latency_ms = 120).await;
    let token = token(&fake).await;

    let started = Instant::now();
    let resp = get(&fake, &token, "limits").await;

    assert_eq!(resp.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(120),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_unknown_api_version_or_resource_is_not_found() {
    let fake = spawn_fake().await;
    let token = token(&fake).await;
    let url = format!("{}/services/data/v20.0/limits", fake.base_url());
    let old = client().get(url).bearer_auth(&token).send().await.unwrap();
    let unknown = get(&fake, &token, "query").await;
    assert_eq!(old.status(), 404);
    assert_eq!(unknown.status(), 404);
}
