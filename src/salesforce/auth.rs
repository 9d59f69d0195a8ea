//! Signing in to Salesforce as a server: the OAuth 2.0 JWT bearer flow (RS256 with ring, the
//! crypto rustls already brings) or the client-credentials flow. Tokens are cached and minted
//! again only when Salesforce says the session is invalid. No key, assertion or token is ever
//! logged or put into an error.

use crate::settings::SalesforceSettings;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long an assertion is valid: Salesforce accepts a few minutes at most.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(180);

/// A refused sign-in is remembered this long, so a burst of jobs does not each ask again.
const REFUSAL_MEMORY: Duration = Duration::from_secs(5);

/// How the relay proves who it is.
pub enum Credentials {
    /// JWT bearer flow: `iss` = client id, `sub` = username, `aud`, signed with the key.
    Jwt {
        key: Box<RsaKeyPair>,
        username: String,
        audience: String,
    },
    /// Client-credentials flow.
    ClientSecret(SecretString),
}

/// Why no token: `Refused` (Salesforce said no: a person must act) or `Unavailable` (try
/// again later).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignInError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
}

/// An access token and where to use it.
pub struct Token {
    pub access: SecretString,
    pub instance_url: String,
    /// The org id from the token's identity URL (a metric label), or `unknown`.
    pub org: String,
}

#[derive(Default)]
struct Cache {
    token: Option<Arc<Token>>,
    refused: Option<(Instant, String)>,
}

/// Mints tokens one at a time and hands the cached one to every caller.
pub struct SignIn {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    credentials: Credentials,
    cache: tokio::sync::Mutex<Cache>,
}

impl Credentials {
    /// From `[salesforce]`: the key file or PEM text (JWT), else the client secret.
    pub fn from_settings(sf: &SalesforceSettings) -> Result<Self, String> {
        if let Some(secret) = &sf.client_secret {
            return Ok(Credentials::ClientSecret(secret.clone()));
        }
        let pem = match (&sf.private_key, &sf.private_key_file) {
            (Some(text), _) => text.expose_secret().as_bytes().to_vec(),
            (None, Some(path)) => std::fs::read(path).map_err(|e| {
                format!(
                    "salesforce.private_key_file {}: cannot read it: {e}",
                    path.display()
                )
            })?,
            (None, None) => {
                return Err("salesforce: no private key and no client secret".into());
            }
        };
        let key = parse_private_key(&pem)?;
        Ok(Credentials::Jwt {
            key: Box::new(key),
            username: sf.username.clone().unwrap_or_default(),
            audience: sf
                .audience
                .clone()
                .unwrap_or_else(|| sf.login_url.trim_end_matches('/').to_owned()),
        })
    }
}

/// An RSA private key in PEM, PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`).
pub fn parse_private_key(pem: &[u8]) -> Result<RsaKeyPair, String> {
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
        "salesforce private key: expected an RSA private key in PEM (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY)".to_owned()
    })?;
    let parsed = match &der {
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        _ => return Err("salesforce private key: expected an RSA key, not an EC key".into()),
    };
    parsed.map_err(|e| format!("salesforce private key: not a usable RSA key ({e})"))
}

/// A signed RS256 assertion for the JWT bearer flow.
pub fn assertion(
    key: &RsaKeyPair,
    client_id: &str,
    username: &str,
    audience: &str,
    now: SystemTime,
) -> Result<String, String> {
    let exp = (now + ASSERTION_LIFETIME)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
    let claims =
        serde_json::json!({"iss": client_id, "sub": username, "aud": audience, "exp": exp});
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{header}.{claims}");
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "could not sign the JWT assertion".to_owned())?;
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

impl SignIn {
    pub fn new(http: reqwest::Client, sf: &SalesforceSettings, credentials: Credentials) -> Self {
        Self {
            http,
            token_url: format!(
                "{}/services/oauth2/token",
                sf.login_url.trim_end_matches('/')
            ),
            client_id: sf.client_id.clone(),
            credentials,
            cache: Default::default(),
        }
    }

    /// The cached token, minted first when there is none.
    pub async fn token(&self) -> Result<Arc<Token>, SignInError> {
        let mut cache = self.cache.lock().await;
        if let Some(token) = &cache.token {
            return Ok(token.clone());
        }
        if let Some((at, reason)) = &cache.refused {
            if at.elapsed() < REFUSAL_MEMORY {
                return Err(SignInError::Refused(reason.clone()));
            }
        }
        match self.mint().await {
            Ok(token) => {
                let token = Arc::new(token);
                cache.token = Some(token.clone());
                cache.refused = None;
                Ok(token)
            }
            Err(SignInError::Refused(reason)) => {
                cache.refused = Some((Instant::now(), reason.clone()));
                Err(SignInError::Refused(reason))
            }
            Err(e) => Err(e),
        }
    }

    /// Forget `used` (Salesforce answered INVALID_SESSION_ID): the next caller mints anew.
    /// A token minted meanwhile by another caller is kept.
    pub async fn invalidate(&self, used: &Arc<Token>) {
        let mut cache = self.cache.lock().await;
        if cache.token.as_ref().is_some_and(|t| Arc::ptr_eq(t, used)) {
            cache.token = None;
        }
    }

    async fn mint(&self) -> Result<Token, SignInError> {
        let form: Vec<(&str, String)> = match &self.credentials {
            Credentials::Jwt {
                key,
                username,
                audience,
            } => {
                let jwt = assertion(key, &self.client_id, username, audience, SystemTime::now())
                    .map_err(SignInError::Refused)?;
                vec![
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:jwt-bearer".into(),
                    ),
                    ("assertion", jwt),
                ]
            }
            Credentials::ClientSecret(secret) => vec![
                ("grant_type", "client_credentials".into()),
                ("client_id", self.client_id.clone()),
                ("client_secret", secret.expose_secret().to_owned()),
            ],
        };
        let response = self
            .http
            .post(&self.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                SignInError::Unavailable(format!(
                    "could not reach Salesforce's token endpoint: {}",
                    super::error_text(&e.without_url())
                ))
            })?;
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let text = |k: &str| {
            body.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        match status {
            200 => {
                let access = text("access_token");
                let instance_url = text("instance_url");
                if access.is_empty() || instance_url.is_empty() {
                    return Err(SignInError::Unavailable(
                        "Salesforce's token answer had no access_token or instance_url".into(),
                    ));
                }
                Ok(Token {
                    access: SecretString::from(access),
                    instance_url: instance_url.trim_end_matches('/').to_owned(),
                    org: org_of_identity(&text("id")),
                })
            }
            400 | 401 | 403 => Err(SignInError::Refused(self.refusal(
                status,
                &text("error"),
                &text("error_description"),
            ))),
            _ => Err(SignInError::Unavailable(format!(
                "Salesforce's token endpoint answered {status}"
            ))),
        }
    }

    /// A refusal, with what to check. Salesforce's own words are short codes, safe to show.
    fn refusal(&self, status: u16, error: &str, description: &str) -> String {
        let hint = match &self.credentials {
            Credentials::Jwt { .. } => "check salesforce.client_id (the app's consumer key), salesforce.username (pre-authorised on the app through a profile or permission set), salesforce.login_url / audience (login, test or My Domain), the certificate uploaded to the app matching the private key, and this machine's clock",
            Credentials::ClientSecret(_) => "check salesforce.client_id, the client secret, that the app enables the client-credentials flow with a Run As user, and that login_url is your My Domain",
        };
        let said: String = format!("{error}: {description}")
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        format!("Salesforce refused the relay's sign-in ({status} {said}); {hint}, then replay")
    }
}

/// `https://login.salesforce.com/id/00D…/005…` → `00D…`.
fn org_of_identity(id: &str) -> String {
    id.split("/id/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .filter(|org| !org.is_empty() && org.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or("unknown")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_org_comes_from_the_identity_url() {
        assert_eq!(
            org_of_identity(
                "https://login.salesforce.com/id/00D5e000000AbCdEAK/0055e000001XyZ1AAK"
            ),
            "00D5e000000AbCdEAK"
        );
        assert_eq!(org_of_identity(""), "unknown");
        assert_eq!(org_of_identity("https://x/id/<script>/1"), "unknown");
    }

    #[test]
    fn a_non_rsa_or_garbled_key_is_refused_with_a_reason() {
        let err = parse_private_key(b"not a key").err().unwrap();
        assert!(err.contains("PEM"), "{err}");
    }
}
