//! The delivery ledger: for every delivered, parked, replayed or purged job, what happened
//! and when, kept after the job (and its payload) have left the queue, so "was this erasure
//! carried out, when, and what did Centercode say?" has an answer. It holds no e-mail: a
//! removal or user-data job carries a *subject key*, an HMAC-SHA256 of the normalised e-mail
//! under `ledger.subject_key`, so the question can be asked by someone who has the e-mail.
//! Centercode's answers are kept at most 1 KiB, with e-mail addresses, keys and anything that
//! looks like a token removed.
//!
//! Each outcome is written before the job leaves the queue (the worker records it, then
//! acks); a crash between the two records it twice, never zero times, and readers show one.

pub mod postgres;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

/// Most bytes of a Centercode answer kept per attempt.
pub const MAX_RESPONSE_BYTES: usize = 1024;

/// What is known of a job when it is recorded.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JobFacts {
    pub job_id: String,
    pub route: String,
    pub action: String,
    pub org_id: Option<String>,
    pub notification_id: Option<String>,
    pub record_id: Option<String>,
    pub subject_key: Option<String>,
    /// When the request carrying it arrived at the gateway (ms since the epoch).
    pub received_at_ms: i64,
    /// When the gateway stored it (ms since the epoch).
    pub stored_at_ms: i64,
}

/// One call to Centercode.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Attempt {
    pub attempt: u32,
    pub started_at_ms: i64,
    pub duration_ms: i64,
    /// Centercode's status, when it answered.
    pub status: Option<u16>,
    /// `connect`, `timeout` or `broken` when it did not.
    pub error_class: Option<String>,
    /// `done`, `user_not_found`, `retry`, `held` or `parked`.
    pub outcome: String,
    /// At most [`MAX_RESPONSE_BYTES`] of the answer, redacted.
    pub response: Option<String>,
}

/// How a job's life ended (or, for `replayed`, began again).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FinalOutcome {
    /// `delivered`, `user_not_found`, `parked`, `replayed` or `purged`.
    pub outcome: String,
    pub reason: Option<String>,
    pub at_ms: i64,
    /// Written with the outcome where the route keeps payloads; never read back here.
    #[serde(skip)]
    pub kept_payload: Option<KeptPayload>,
}

/// Everything the ledger holds about one job.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    #[serde(flatten)]
    pub facts: JobFacts,
    pub attempts: Vec<Attempt>,
    /// In the order they happened (a replayed job may be parked again, then delivered).
    pub outcomes: Vec<FinalOutcome>,
    /// The job's payload, only where its route sets `keep_payload_days` and until then.
    pub payload: Option<serde_json::Value>,
}

/// A completed job's payload kept on purpose (`keep_payload_days`), until `expires_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptPayload {
    pub json: String,
    pub expires_at_ms: i64,
}

/// Which entries to return.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerQuery {
    pub job_id: Option<String>,
    pub record_id: Option<String>,
    pub notification_id: Option<String>,
    pub subject_key: Option<String>,
    pub route: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only jobs whose last outcome is not `delivered`/`user_not_found`/`purged`.
    pub incomplete: bool,
    pub limit: usize,
}

/// The subject key of `email` under `secret`: lower-cased and trimmed first, so the same
/// address always gives the same key.
pub fn subject_key(secret: &[u8], email: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(email.trim().to_lowercase().as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// At most [`MAX_RESPONSE_BYTES`] of a response body, as text, with e-mail addresses, the
/// values of key- and token-like fields, and long token-like runs replaced.
pub fn redact_response(body: &[u8]) -> String {
    let cut = &body[..body.len().min(MAX_RESPONSE_BYTES)];
    let text = String::from_utf8_lossy(cut);
    let mut out = String::with_capacity(text.len());
    // A JSON or form field named like a secret (`"apiKey": "..."`): its next word goes too.
    let mut value_of_secret = false;
    for word in split_keep(&text) {
        let is_word = word.chars().any(char::is_alphanumeric);
        if !is_word {
            out.push_str(word);
            continue;
        }
        if value_of_secret {
            out.push_str("[redacted]");
            value_of_secret = false;
            continue;
        }
        let bare = word.trim_end_matches([':', '=']);
        // The word is a field name by itself (`apiKey`, `token:`), not `key=value`.
        value_of_secret = names_a_secret(bare) && !bare.contains(['=', ':']);
        out.push_str(&redact_word(word));
    }
    out
}

fn names_a_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "key", "token", "secret", "password", "session", "auth", "sig",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// Split into runs of "word" characters and single other characters, keeping both.
fn split_keep(text: &str) -> Vec<&str> {
    // `!` belongs to Salesforce session ids (`00D…!AQ…`).
    let is_word = |c: char| c.is_alphanumeric() || "@._-+%=:/!".contains(c);
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_word = None;
    for (i, c) in text.char_indices() {
        let w = is_word(c);
        match in_word {
            Some(prev) if prev == w && w => {}
            Some(_) => {
                parts.push(&text[start..i]);
                start = i;
            }
            None => {}
        }
        in_word = Some(w);
    }
    if start < text.len() {
        parts.push(&text[start..]);
    }
    parts
}

fn redact_word(word: &str) -> String {
    // key=value / key:value with a secret-sounding key: keep the key, drop the value.
    for sep in ['=', ':'] {
        if let Some((key, value)) = word.split_once(sep) {
            if names_a_secret(key) && !value.is_empty() {
                return format!("{key}{sep}[redacted]");
            }
        }
    }
    if word.contains('@') && word.split('@').nth(1).is_some_and(|d| d.contains('.')) {
        return "[email]".into();
    }
    let token_like = word.len() >= 20
        && word.chars().any(|c| c.is_ascii_digit())
        && word.chars().any(|c| c.is_ascii_alphabetic())
        && !word.contains("://");
    if token_like {
        return "[token]".into();
    }
    word.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_keys_ignore_case_and_spaces_and_depend_on_the_secret() {
        let a = subject_key(b"k1", " Marta.Kowalska@Example.org ");
        assert_eq!(a, subject_key(b"k1", "marta.kowalska@example.org"));
        assert_ne!(a, subject_key(b"k2", "marta.kowalska@example.org"));
        assert_eq!(a.len(), 64);
        assert!(!a.contains("marta"));
    }

    #[test]
    fn responses_lose_emails_keys_and_tokens_and_stay_short() {
        let body = br#"{"error":"user marta.kowalska@example.org not found","apiKey":"abc123","token":"eyJhbGciOiJIUzI1NiJ9x1","note":"see https://help.centercode.com/a"} sessionId=00D8d000001AbCdEAK!ARgAQxyz"#;
        let text = redact_response(body);
        assert!(!text.contains("marta"), "{text}");
        assert!(!text.contains("abc123"), "{text}");
        assert!(!text.contains("eyJhbGci"), "{text}");
        assert!(!text.contains("ARgAQ"), "{text}");
        assert!(text.contains("not found"), "{text}");
        assert!(text.contains("https://help.centercode.com/a"), "{text}");
        let long = vec![b'a'; 5000];
        assert_eq!(redact_response(&long).len(), MAX_RESPONSE_BYTES);
    }
}
