//! The token endpoint: JWT bearer and client-credentials grants, accepted and refused.

use fake_salesforce::{test_claims, test_keys};
use serde_json::{json, Value};

use crate::helpers::*;

async fn refusal(resp: reqwest::Response) -> (u16, String, String) {
    let (status, body) = outcome(resp).await;
    let field = |k: &str| body[k].as_str().unwrap_or("").to_string();
    (status, field("error"), field("error_description"))
}

#[tokio::test]
async fn an_assertion_signed_by_the_trusted_key_gets_a_token_that_works() {
    // Arrange
    let fake = spawn_fake().await;

    // Act
    let resp = jwt_grant(&fake, test_keys::PRIVATE_KEY_PEM, &test_claims(LOGIN, 180)).await;

    // Assert
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "api");
    assert_eq!(body["instance_url"], fake.base_url().as_str());
    assert!(body["issued_at"].as_str().unwrap().parse::<u64>().is_ok());
    assert!(body["id"].as_str().unwrap().contains("/id/"));
    assert!(body["signature"].is_string());
    assert_eq!(fake.tokens_minted(), 1);
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(get(&fake, token, "limits").await.status(), 200);
}

#[tokio::test]
async fn the_fakes_own_url_is_an_accepted_audience() {
    let fake = spawn_fake().await;
    let claims = test_claims(&fake.base_url(), 60);
    let resp = jwt_grant(&fake, test_keys::PRIVATE_KEY_PEM, &claims).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn each_bad_assertion_is_refused_with_its_own_reason() {
    // Arrange
    let fake = spawn_fake().await;
    let good = test_claims(LOGIN, 180);
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let now = good["exp"].as_i64().unwrap() - 180;
    let cases = [
        (
            test_keys::OTHER_PRIVATE_KEY_PEM,
            good.clone(),
            "invalid_grant",
            "invalid assertion",
        ),
        (
            test_keys::PRIVATE_KEY_PEM,
            with("aud", json!("https://evil.example")),
            "invalid_grant",
            "audience is invalid",
        ),
        (
            test_keys::PRIVATE_KEY_PEM,
            with("exp", json!(now - 60)),
            "invalid_grant",
            "expired authorization code",
        ),
        (
            test_keys::PRIVATE_KEY_PEM,
            with("iss", json!("3MVG9-someone-else")),
            "invalid_client_id",
            "client identifier invalid",
        ),
        (
            test_keys::PRIVATE_KEY_PEM,
            with("sub", json!("admin@relay.test")),
            "invalid_grant",
            "user hasn't approved this consumer",
        ),
    ];

    for (key, claims, error, description) in cases {
        // Act
        let got = refusal(jwt_grant(&fake, key, &claims).await).await;

        // Assert
        assert_eq!(
            got,
            (400, error.to_string(), description.to_string()),
            "{claims}"
        );
    }
    assert_eq!(fake.tokens_minted(), 0);
}

#[tokio::test]
async fn client_credentials_get_a_token_and_a_wrong_secret_is_refused() {
    // Arrange
    let fake = spawn_fake().await;
    let grant = |secret: &'static str| {
        client().post(fake.token_url()).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", test_keys::CLIENT_ID),
            ("client_secret", secret),
        ])
    };

    // Act
    let ok = grant(test_keys::CLIENT_SECRET).send().await.unwrap();
    let wrong = grant("guessed").send().await.unwrap();

    // Assert
    assert_eq!(ok.status(), 200);
    let body: Value = ok.json().await.unwrap();
    assert!(body["access_token"].is_string());
    assert_eq!(
        refusal(wrong).await,
        (
            400,
            "invalid_client".into(),
            "invalid client credentials".into()
        )
    );
    assert_eq!(fake.tokens_minted(), 1);
}

#[tokio::test]
async fn an_unknown_grant_type_is_unsupported() {
    let fake = spawn_fake().await;
    let resp = client()
        .post(fake.token_url())
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(resp).await.1, "unsupported_grant_type");
}
