//! Starting a fake on port 0 and speaking to it the way the relay's client will.

use fake_salesforce::{
    sign_test_assertion, test_claims, test_keys, FakeSalesforce, FakeSalesforceConfig,
    JWT_BEARER_GRANT,
};
use serde_json::Value;

pub const VERSION: &str = "v62.0";
pub const LOGIN: &str = "https://login.salesforce.com";

pub async fn spawn_fake() -> FakeSalesforce {
    spawn_fake_with(|_| {}).await
}

pub async fn spawn_fake_with(edit: impl FnOnce(&mut FakeSalesforceConfig)) -> FakeSalesforce {
    let mut config = FakeSalesforceConfig::default();
    edit(&mut config);
    FakeSalesforce::start(config).await.expect("fake starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// POSTs a JWT bearer grant signed with `key`.
pub async fn jwt_grant(fake: &FakeSalesforce, key: &str, claims: &Value) -> reqwest::Response {
    let assertion = sign_test_assertion(key, claims);
    client()
        .post(fake.token_url())
        .form(&[("grant_type", JWT_BEARER_GRANT), ("assertion", &assertion)])
        .send()
        .await
        .unwrap()
}

/// A fresh access token through the JWT bearer flow.
pub async fn token(fake: &FakeSalesforce) -> String {
    let resp = jwt_grant(fake, test_keys::PRIVATE_KEY_PEM, &test_claims(LOGIN, 180)).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

/// `{base}/services/data/v62.0/{path}`.
pub fn data_url(fake: &FakeSalesforce, path: &str) -> String {
    format!("{}/services/data/{VERSION}/{path}", fake.base_url())
}

pub async fn patch(
    fake: &FakeSalesforce,
    token: &str,
    path: &str,
    body: Value,
) -> reqwest::Response {
    client()
        .patch(data_url(fake, path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The status of an empty upsert of the Contact with `Centercode_Id__c` = `external_id`.
pub async fn upsert_status(fake: &FakeSalesforce, token: &str, external_id: &str) -> u16 {
    let path = format!("sobjects/Contact/Centercode_Id__c/{external_id}");
    patch(fake, token, &path, serde_json::json!({}))
        .await
        .status()
        .as_u16()
}

pub async fn get(fake: &FakeSalesforce, token: &str, path: &str) -> reqwest::Response {
    client()
        .get(data_url(fake, path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// Status and body (`Null` when empty).
pub async fn outcome(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The `errorCode` of a REST error body (`[{"errorCode": …}]`).
pub fn error_code(body: &Value) -> &str {
    body[0]["errorCode"].as_str().unwrap_or("")
}

pub fn limit_info(resp: &reqwest::Response) -> String {
    resp.headers()["sforce-limit-info"]
        .to_str()
        .unwrap()
        .to_string()
}
