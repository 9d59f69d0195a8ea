//! Centercode HTTP client: sends one prepared request and reports the status. It never
//! retries (the worker owns retry policy) and never lets the API key into an error or log.

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use std::time::{Duration, SystemTime};

/// Characters left as-is in query values: RFC 3986 unreserved only, so `+` becomes `%2B`
/// (Centercode decodes `+` as a space) and `@` becomes `%40`.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A request the worker will send, before the API key is added.
#[derive(Debug, Clone, PartialEq)]
pub struct CentercodeRequest {
    /// The configured URL, opaque, without `apiKey`.
    pub url: String,
    /// `find=<email>` for user listeners.
    pub find: Option<String>,
    /// JSON body for External Sources and external-data listeners.
    pub body: Option<serde_json::Value>,
}

impl CentercodeRequest {
    /// The full URL with `find` and `apiKey` strictly percent-encoded.
    pub fn url_with_key(&self, api_key: &str) -> String {
        let encoded: String = percent_encoding::utf8_percent_encode(api_key, QUERY_VALUE).collect();
        self.build_url(&encoded)
    }

    fn build_url(&self, encoded_key: &str) -> String {
        let mut url = self.url.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        if let Some(find) = &self.find {
            url.push(sep);
            url.push_str("find=");
            url.extend(percent_encoding::utf8_percent_encode(find, QUERY_VALUE));
            sep = '&';
        }
        url.push(sep);
        url.push_str("apiKey=");
        url.push_str(encoded_key);
        url
    }

    /// The exact request as text, with the key masked: what `relay preview` prints.
    pub fn render_masked(&self) -> String {
        let mut out = format!("POST {}\n", self.build_url("***"));
        match &self.body {
            Some(body) => {
                out.push_str("Content-Type: application/json\n\n");
                out.push_str(&serde_json::to_string_pretty(body).unwrap_or_default());
                out.push('\n');
            }
            None => out.push_str("Content-Length: 0\n"),
        }
        out
    }
}

/// Centercode's answer, reduced to what the worker decides on.
#[derive(Debug, Clone, PartialEq)]
pub struct CentercodeResponse {
    pub status: u16,
    /// A `Retry-After` header, already turned into a delay.
    pub retry_after: Option<Duration>,
    /// The start of the answer's body, redacted for the ledger ([`crate::ledger::redact_response`]).
    pub excerpt: Option<String>,
}

/// Why no status came back. Messages never contain the URL (it carries the key).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Could not connect: the request certainly did not reach Centercode.
    #[error("could not connect to Centercode: {0}")]
    Connect(String),
    /// Timed out: Centercode may or may not have acted.
    #[error("Centercode did not answer within the timeout")]
    Timeout,
    /// The connection broke after the request was sent: outcome unknown.
    #[error("connection to Centercode failed after the request was sent: {0}")]
    Broken(String),
}

impl TransportError {
    /// `connect`, `timeout` or `broken`, for the ledger.
    pub fn class(&self) -> &'static str {
        match self {
            TransportError::Connect(_) => "connect",
            TransportError::Timeout => "timeout",
            TransportError::Broken(_) => "broken",
        }
    }

    /// True when the request may have been processed by Centercode.
    pub fn outcome_unknown(&self) -> bool {
        !matches!(self, TransportError::Connect(_))
    }
}

/// The reqwest client, built once from settings.
#[derive(Clone)]
pub struct CentercodeClient {
    http: reqwest::Client,
}

impl CentercodeClient {
    pub fn new(timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            // Shorter than the whole-call timeout, so a connect that hangs is reported as a
            // connect failure (safe to retry) rather than racing the call timeout.
            .connect_timeout((timeout / 2).min(Duration::from_secs(10)))
            // A redirect would carry the apiKey to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sf-centercode-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("reqwest client with static settings");
        Self { http }
    }

    /// Send once. The body of the answer is read (bounded) and dropped: decisions are made
    /// on the status code alone, since Centercode's error bodies are not a contract.
    pub async fn send(
        &self,
        request: &CentercodeRequest,
        api_key: &SecretString,
    ) -> Result<CentercodeResponse, TransportError> {
        let url = request.url_with_key(api_key.expose_secret());
        let mut builder = self.http.post(url);
        builder = match &request.body {
            Some(body) => builder.json(body),
            None => builder.header(reqwest::header::CONTENT_LENGTH, "0"),
        };
        let response = builder.send().await.map_err(classify)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        // Read the body so the connection can be reused; keep its start, redacted, for the
        // ledger. Decisions are made on the status alone.
        let excerpt = match tokio::time::timeout(Duration::from_secs(2), response.bytes()).await {
            Ok(Ok(body)) if !body.is_empty() => Some(crate::ledger::redact_response(&body)),
            _ => None,
        };
        Ok(CentercodeResponse {
            status: status.as_u16(),
            retry_after,
            excerpt,
        })
    }
}

fn classify(e: reqwest::Error) -> TransportError {
    let e = e.without_url();
    // A connect timeout is reported as both a connect error and a timeout. The request never
    // left, so it is a plain connect failure (safe to retry, even for feedback creation).
    if e.is_connect() {
        TransportError::Connect(error_text(&e))
    } else if e.is_timeout() {
        TransportError::Timeout
    } else {
        TransportError::Broken(error_text(&e))
    }
}

/// An error and its sources, one line (never the URL: `without_url` first).
pub(crate) fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `Retry-After` as delta-seconds or an HTTP-date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Status class label for metrics: `2xx`, `4xx`, ...
pub fn status_class(status: u16) -> &'static str {
    match StatusCode::from_u16(status).map(|s| s.as_u16() / 100) {
        Ok(2) => "2xx",
        Ok(3) => "3xx",
        Ok(4) => "4xx",
        Ok(5) => "5xx",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    /// times out instead of being refused.
    async fn unanswered_address() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, String) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        // Fill the accept queue until a connect stops completing.
        loop {
            match tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(stream)) => held.push(stream),
                Ok(Err(e)) => panic!("connect failed instead of hanging: {e}"),
                Err(_) => break,
            }
            assert!(held.len() < 64, "the accept queue never filled");
        }
        (
            listener,
            held,
            format!("http://{addr}/api/v1/projects/p/externalSources/s"),
        )
    }

    #[tokio::test]
    async fn a_connect_timeout_is_a_connect_failure_not_an_unknown_outcome() {
        let (_listener, _held, url) = unanswered_address().await;
        let client = CentercodeClient::new(Duration::from_millis(300));
        let request = CentercodeRequest {
            url,
            find: None,
            body: Some(serde_json::json!({"summary": "x"})),
        };
        let err = client
            .send(&request, &SecretString::from("k"))
            .await
            .expect_err("nothing answers");
        assert!(matches!(err, TransportError::Connect(_)), "{err:?}");
        assert!(!err.outcome_unknown(), "the request never left");
    }

    #[test]
    fn plus_in_an_email_is_sent_as_2b() {
        let req = CentercodeRequest {
            url: "https://x.centercode.com/api/v1/userMacroListeners/gdpr".into(),
            find: Some("o'brien+beta@example.com".into()),
            body: None,
        };
        assert_eq!(
            req.url_with_key("k&y"),
            "https://x.centercode.com/api/v1/userMacroListeners/gdpr?find=o%27brien%2Bbeta%40example.com&apiKey=k%26y"
        );
    }

    #[test]
    fn an_existing_query_string_is_kept() {
        let req = CentercodeRequest {
            url: "https://x/api?a=1".into(),
            find: None,
            body: None,
        };
        assert_eq!(req.url_with_key("k"), "https://x/api?a=1&apiKey=k");
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn preview_masks_the_key() {
        let req = CentercodeRequest {
            url: "https://x/api".into(),
            find: Some("a@b.c".into()),
            body: None,
        };
        assert_eq!(
            req.render_masked(),
            "POST https://x/api?find=a%40b.c&apiKey=***\nContent-Length: 0\n"
        );
    }
}
