//! The fake's configuration: which app and user it trusts, token lifetime, API allocation, latency.
//! Plain data with serde defaults; it checks its own certificate but runs nothing.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::test_keys;

/// The login hosts whose audience Salesforce accepts in a JWT assertion. The fake's own base
/// URL (and the origin a request came in on) is accepted as well, like a My Domain URL.
pub const STANDARD_AUDIENCES: [&str; 2] = [
    "https://login.salesforce.com",
    "https://test.salesforce.com",
];

/// Whole fake configuration. Absent JSON fields take the values of [`FakeSalesforceConfig::demo`],
/// which trusts the checked-in [`test_keys`] and adds no latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FakeSalesforceConfig {
    /// The External Client App for the OAuth 2.0 JWT bearer flow; `None` refuses that grant.
    pub jwt: Option<JwtBearerConfig>,
    /// The client-credentials flow; `None` refuses that grant.
    pub client_credentials: Option<ClientCredentialsConfig>,
    /// How long a minted access token stays valid; after that: 401 `INVALID_SESSION_ID`.
    /// 0 makes every token expire at once.
    pub token_lifetime_secs: u64,
    /// The org's daily API allocation (`DailyApiRequests.Max`).
    pub api_allocation: u64,
    /// API calls already used when the fake starts (or is reset).
    pub api_used: u64,
    /// Added to every data API answer (the benchmark uses 50).
    pub latency_ms: u64,
    /// Lowest accepted API major version in `/services/data/vNN.N`; lower answers 404.
    pub min_api_version: u32,
    /// Seconds added to the fake's clock when it checks an assertion's `exp`: a positive
    /// value plays a client whose clock is behind (its assertions arrive expired).
    pub clock_offset_secs: i64,
}

impl Default for FakeSalesforceConfig {
    fn default() -> Self {
        Self::demo()
    }
}

impl FakeSalesforceConfig {
    /// Trusts [`test_keys::CERT_PEM`] for consumer key `3MVG9-relay-test` and user
    /// `integration@relay.test`; client credentials `3MVG9-relay-test` /
    /// [`test_keys::CLIENT_SECRET`]; 2 h tokens, 100,000 calls a day, no latency.
    pub fn demo() -> Self {
        Self {
            jwt: Some(JwtBearerConfig::default()),
            client_credentials: Some(ClientCredentialsConfig::default()),
            // Salesforce's default session timeout.
            token_lifetime_secs: 2 * 3600,
            api_allocation: 100_000,
            api_used: 0,
            latency_ms: 0,
            // API versions 21.0 to 30.0 were retired in 2025.
            min_api_version: 31,
            clock_offset_secs: 0,
        }
    }

    /// Checks what would otherwise fail on every token request: the certificate must parse.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(jwt) = &self.jwt {
            jwt.certificate()?;
        }
        Ok(())
    }
}

/// The External Client App ("Use digital signatures") and its pre-authorised user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JwtBearerConfig {
    /// PEM of the X.509 certificate uploaded to the app; assertions must verify against its key.
    pub certificate_pem: String,
    /// The consumer key, expected as the assertion's `iss`.
    pub client_id: String,
    /// The integration user's username, expected as `sub`.
    pub username: String,
    /// Accepted `aud` values besides the fake's own origin.
    pub audiences: Vec<String>,
    /// An `exp` further than this ahead of now is refused (Salesforce asks for a few minutes).
    pub max_assertion_lifetime_secs: u64,
}

impl Default for JwtBearerConfig {
    fn default() -> Self {
        Self {
            certificate_pem: test_keys::CERT_PEM.to_string(),
            client_id: test_keys::CLIENT_ID.to_string(),
            username: test_keys::USERNAME.to_string(),
            audiences: STANDARD_AUDIENCES.iter().map(|a| a.to_string()).collect(),
            max_assertion_lifetime_secs: 300,
        }
    }
}

impl JwtBearerConfig {
    /// The certificate's DER, or why it could not be read.
    pub(crate) fn certificate(&self) -> Result<CertificateDer<'static>, String> {
        let der = CertificateDer::from_pem_slice(self.certificate_pem.as_bytes())
            .map_err(|e| format!("jwt.certificate_pem is not a PEM certificate: {e}"))?;
        webpki::EndEntityCert::try_from(&der)
            .map_err(|e| format!("jwt.certificate_pem is not a usable X.509 certificate: {e}"))?;
        Ok(der)
    }
}

/// The client-credentials flow's consumer key and secret (the app's "Run As" user is implied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientCredentialsConfig {
    /// The consumer key.
    pub client_id: String,
    /// The consumer secret.
    pub client_secret: String,
}

impl Default for ClientCredentialsConfig {
    fn default() -> Self {
        Self {
            client_id: test_keys::CLIENT_ID.to_string(),
            client_secret: test_keys::CLIENT_SECRET.to_string(),
        }
    }
}
