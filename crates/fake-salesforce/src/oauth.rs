//! `POST /services/oauth2/token`: the JWT bearer and client-credentials grants, refusals shaped
//! like Salesforce's. Verifies RS256 against the configured certificate; never touches records.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{web, HttpRequest, HttpResponse};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::configuration::JwtBearerConfig;
use crate::state::Shared;

/// The grant type of the JWT bearer flow (RFC 7523).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The fake org's id (what a real token starts with).
const ORG_ID: &str = "00D5g00000RELAY";
/// The integration user's id in the identity URL.
const USER_ID: &str = "0055g00000RELAY";

/// A refused token request: 400 with `{"error","error_description"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) error: &'static str,
    pub(crate) description: &'static str,
}

const fn refuse(error: &'static str, description: &'static str) -> Refusal {
    Refusal { error, description }
}

// Descriptions as Salesforce words them where known; each refusal is distinguishable.
const MALFORMED: Refusal = refuse("invalid_grant", "invalid assertion format");
const BAD_SIGNATURE: Refusal = refuse("invalid_grant", "invalid assertion");
const WRONG_ISSUER: Refusal = refuse("invalid_client_id", "client identifier invalid");
const WRONG_SUBJECT: Refusal = refuse("invalid_grant", "user hasn't approved this consumer");
const WRONG_AUDIENCE: Refusal = refuse("invalid_grant", "audience is invalid");
const NO_EXPIRY: Refusal = refuse("invalid_grant", "invalid assertion: missing exp");
const EXPIRED: Refusal = refuse("invalid_grant", "expired authorization code");
const TOO_LONG: Refusal = refuse(
    "invalid_grant",
    "invalid assertion: exp too far in the future",
);
const BAD_CLIENT: Refusal = refuse("invalid_client", "invalid client credentials");
const NO_RUN_AS: Refusal = refuse("invalid_grant", "no client credentials user enabled");
const UNSUPPORTED: Refusal = refuse("unsupported_grant_type", "grant type not supported");

pub(crate) async fn token(
    req: HttpRequest,
    form: web::Form<HashMap<String, String>>,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let fault = shared.lock().take_token_fault();
    if let Some(fault) = fault {
        if let Some((status, body, _)) = fault.kind.play().await {
            return HttpResponse::build(
                actix_web::http::StatusCode::from_u16(status)
                    .unwrap_or(actix_web::http::StatusCode::SERVICE_UNAVAILABLE),
            )
            .json(body);
        }
    }
    let form = form.into_inner();
    let origin = {
        let info = req.connection_info();
        format!("{}://{}", info.scheme(), info.host())
    };
    let config = shared.lock().config.clone();
    let param = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    let outcome = match param("grant_type") {
        JWT_BEARER_GRANT => match &config.jwt {
            Some(jwt) => {
                let audiences = [shared.base_url.as_str(), origin.as_str()];
                verify_assertion(
                    jwt,
                    param("assertion"),
                    &audiences,
                    unix_now() + config.clock_offset_secs,
                )
            }
            None => Err(UNSUPPORTED),
        },
        "client_credentials" => match &config.client_credentials {
            Some(cc) if cc.client_id == param("client_id") => {
                if cc.client_secret == param("client_secret") {
                    Ok(())
                } else {
                    Err(BAD_CLIENT)
                }
            }
            Some(_) => Err(BAD_CLIENT),
            None => Err(NO_RUN_AS),
        },
        _ => Err(UNSUPPORTED),
    };
    if let Err(refusal) = outcome {
        tracing::debug!(error = refusal.error, "fake Salesforce refused a token");
        return HttpResponse::BadRequest().json(json!({
            "error": refusal.error,
            "error_description": refusal.description,
        }));
    }
    let access_token = format!(
        "{ORG_ID}!AQ{}{}",
        Uuid::new_v4().simple(),
        Uuid::new_v4().simple()
    );
    shared.lock().mint_token(access_token.clone());
    let issued_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    HttpResponse::Ok().json(json!({
        "access_token": access_token,
        "instance_url": origin,
        "id": format!("{origin}/id/{ORG_ID}AAA/{USER_ID}AAA"),
        "token_type": "Bearer",
        "scope": "api",
        "issued_at": issued_at.to_string(),
        "signature": STANDARD.encode(Uuid::new_v4().as_bytes()),
    }))
}

/// The form body could not be read: Salesforce answers such requests with `invalid_request`.
pub(crate) fn form_error(
    err: actix_web::error::UrlencodedError,
    _: &HttpRequest,
) -> actix_web::Error {
    let body = json!({"error": "invalid_request", "error_description": err.to_string()});
    actix_web::error::InternalError::from_response(err, HttpResponse::BadRequest().json(body))
        .into()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Checks an assertion `header.claims.signature` (base64url, no padding) as Salesforce does.
/// `extra_audiences` are the fake's own origins, accepted besides the configured ones.
pub(crate) fn verify_assertion(
    jwt: &JwtBearerConfig,
    assertion: &str,
    extra_audiences: &[&str],
    now: i64,
) -> Result<(), Refusal> {
    let mut parts = assertion.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(MALFORMED);
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| MALFORMED);
    let header_json: Value = serde_json::from_slice(&decode(header)?).map_err(|_| MALFORMED)?;
    let claims_json: Value = serde_json::from_slice(&decode(claims)?).map_err(|_| MALFORMED)?;
    let signature = decode(signature)?;
    if header_json["alg"] != "RS256" {
        return Err(MALFORMED);
    }
    // The certificate was checked when the config was accepted.
    let cert = jwt.certificate().map_err(|_| BAD_SIGNATURE)?;
    let cert = webpki::EndEntityCert::try_from(&cert).map_err(|_| BAD_SIGNATURE)?;
    let signing_input = &assertion[..header.len() + 1 + claims.len()];
    cert.verify_signature(
        webpki::ring::RSA_PKCS1_2048_8192_SHA256,
        signing_input.as_bytes(),
        &signature,
    )
    .map_err(|_| BAD_SIGNATURE)?;
    if claims_json["iss"] != jwt.client_id.as_str() {
        return Err(WRONG_ISSUER);
    }
    if claims_json["sub"] != jwt.username.as_str() {
        return Err(WRONG_SUBJECT);
    }
    // RFC 7519: `aud` is one string or an array of them; one accepted value is enough.
    let accepted = |aud: &Value| {
        aud.as_str().is_some_and(|a| {
            let a = a.trim_end_matches('/');
            jwt.audiences.iter().any(|x| x.trim_end_matches('/') == a)
                || extra_audiences.contains(&a)
        })
    };
    let aud_ok = match &claims_json["aud"] {
        Value::Array(list) => list.iter().any(accepted),
        one => accepted(one),
    };
    if !aud_ok {
        return Err(WRONG_AUDIENCE);
    }
    let Some(exp) = claims_json["exp"].as_f64() else {
        return Err(NO_EXPIRY);
    };
    if exp < now as f64 {
        return Err(EXPIRED);
    }
    if exp > (now + jwt.max_assertion_lifetime_secs as i64) as f64 {
        return Err(TOO_LONG);
    }
    Ok(())
}

/// Signs `claims` as an RS256 JWT with a PKCS#8 PEM key, for tests and the demo.
/// Panics on a key that is not RSA PKCS#8 PEM.
#[doc(hidden)]
pub fn sign_test_assertion(private_key_pem: &str, claims: &Value) -> String {
    use ring::rand::SystemRandom;
    use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::PrivatePkcs8KeyDer;

    let der = PrivatePkcs8KeyDer::from_pem_slice(private_key_pem.as_bytes())
        .expect("a PKCS#8 PEM private key");
    let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("an RSA private key");
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .expect("RSA signing");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Claims the demo config accepts: `iss` and `sub` of [`crate::test_keys`], `exp` in
/// `lifetime_secs` (negative for an expired assertion).
#[doc(hidden)]
pub fn test_claims(aud: &str, lifetime_secs: i64) -> Value {
    json!({
        "iss": crate::test_keys::CLIENT_ID,
        "sub": crate::test_keys::USERNAME,
        "aud": aud,
        "exp": unix_now() + lifetime_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_keys;

    const LOGIN: &str = "https://login.salesforce.com";

    fn check(key: &str, claims: &Value) -> Result<(), Refusal> {
        let assertion = sign_test_assertion(key, claims);
        verify_assertion(&JwtBearerConfig::default(), &assertion, &[], unix_now())
    }

    #[test]
    fn each_flaw_of_an_assertion_has_its_own_refusal() {
        let good = test_claims(LOGIN, 180);
        assert_eq!(check(test_keys::PRIVATE_KEY_PEM, &good), Ok(()));
        assert_eq!(
            check(test_keys::OTHER_PRIVATE_KEY_PEM, &good),
            Err(BAD_SIGNATURE)
        );
        let with = |k: &str, v: Value| {
            let mut c = good.clone();
            c[k] = v;
            check(test_keys::PRIVATE_KEY_PEM, &c)
        };
        assert_eq!(with("iss", json!("3MVG9-other")), Err(WRONG_ISSUER));
        assert_eq!(with("sub", json!("someone@else")), Err(WRONG_SUBJECT));
        assert_eq!(
            with("aud", json!("https://evil.example")),
            Err(WRONG_AUDIENCE)
        );
        assert_eq!(
            with("aud", json!(["x", "https://test.salesforce.com/"])),
            Ok(())
        );
        assert_eq!(with("exp", json!(unix_now() - 10)), Err(EXPIRED));
        assert_eq!(with("exp", json!(unix_now() + 3600)), Err(TOO_LONG));
        assert_eq!(with("exp", Value::Null), Err(NO_EXPIRY));
        let assertion = sign_test_assertion(test_keys::PRIVATE_KEY_PEM, &good);
        let config = JwtBearerConfig::default();
        // The claims of another assertion under this one's signature.
        let mut later = good.clone();
        later["exp"] = json!(unix_now() + 200);
        let other = sign_test_assertion(test_keys::PRIVATE_KEY_PEM, &later);
        let (parts, theirs): (Vec<&str>, Vec<&str>) =
            (assertion.split('.').collect(), other.split('.').collect());
        let tampered = format!("{}.{}.{}", parts[0], theirs[1], parts[2]);
        assert_eq!(
            verify_assertion(&config, &tampered, &[], unix_now()),
            Err(BAD_SIGNATURE)
        );
        assert_eq!(
            verify_assertion(&config, "a.b", &[], unix_now()),
            Err(MALFORMED)
        );
    }
}
