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
    /// `delivered`, `user_not_found`, `parked`, `replayed`, `purged`, `resent` or
    /// `superseded`.
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
    /// The latest outcome (`None`: stored, not ended yet) and when.
    pub last_outcome: Option<String>,
    pub last_outcome_at_ms: Option<i64>,
    /// Centercode's status on the latest attempt that got an answer.
    pub last_status: Option<u16>,
    /// Filled only when the query asks for history (`LedgerQuery::history`).
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

/// Outcomes after which nothing more happens to a job (`resent`: a delivered job stored
/// again as a new job, which has its own entry).
pub const ENDING_OUTCOMES: [&str; 5] = [
    "delivered",
    "user_not_found",
    "purged",
    "resent",
    "superseded",
];

/// One write to the ledger: the job's facts, perhaps an attempt, perhaps a final outcome.
pub type Record = (JobFacts, Option<Attempt>, Option<FinalOutcome>);

/// Which entries to return, newest stored first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerQuery {
    pub job_id: Option<String>,
    pub record_id: Option<String>,
    pub notification_id: Option<String>,
    pub subject_key: Option<String>,
    pub route: Option<String>,
    pub action: Option<String>,
    /// The latest outcome; `pending` means none yet.
    pub outcome: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only jobs whose latest outcome does not end them (see [`ENDING_OUTCOMES`]).
    pub incomplete: bool,
    /// Continue after this position (the last entry of the previous page).
    pub after: Option<LedgerCursor>,
    /// Load each entry's attempts, outcomes and kept payload (detail views).
    pub history: bool,
    pub limit: usize,
}

/// A position in the ledger's order (newest stored first): `{stored_at_ms}~{job_id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerCursor {
    pub stored_at_ms: i64,
    pub job_id: String,
}

impl LedgerCursor {
    pub fn after(entry: &Entry) -> String {
        format!("{}~{}", entry.facts.stored_at_ms, entry.facts.job_id)
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (ms, id) = text.split_once('~')?;
        Some(Self {
            stored_at_ms: ms.parse().ok()?,
            job_id: id.to_owned(),
        })
    }
}

/// A bound value of a ledger query, for either database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlArg {
    Text(String),
    Int(i64),
}

/// The columns of a ledger entry's summary, in the order [`Entry`] readers expect.
pub const SUMMARY_COLUMNS: &str = "job_id, route, action, org_id, notification_id, record_id, subject_key, stored_at, received_at, last_outcome, last_outcome_at, last_status";

/// The `SELECT` of `q` against `ledger_jobs` for either database: `placeholder(n)` writes the
/// n-th (1-based) parameter (`?n` in SQLite, `$n` in PostgreSQL). One builder, so both
/// ledgers answer the same query the same way.
pub fn select_sql(q: &LedgerQuery, placeholder: impl Fn(usize) -> String) -> (String, Vec<SqlArg>) {
    select_sql_from(q, "ledger_jobs", placeholder)
}

/// [`select_sql`] against `source`: a table or a parenthesised subquery with the columns of
/// [`SUMMARY_COLUMNS`].
pub fn select_sql_from(
    q: &LedgerQuery,
    source: &str,
    placeholder: impl Fn(usize) -> String,
) -> (String, Vec<SqlArg>) {
    let mut clause = vec!["1 = 1".to_owned()];
    let mut args: Vec<SqlArg> = Vec::new();
    let bind = |args: &mut Vec<SqlArg>, v: SqlArg| {
        args.push(v);
        placeholder(args.len())
    };
    for (col, v) in [
        ("job_id", &q.job_id),
        ("record_id", &q.record_id),
        ("notification_id", &q.notification_id),
        ("subject_key", &q.subject_key),
        ("route", &q.route),
        ("action", &q.action),
    ] {
        if let Some(v) = v {
            let p = bind(&mut args, SqlArg::Text(v.clone()));
            clause.push(format!("{col} = {p}"));
        }
    }
    match q.outcome.as_deref() {
        Some("pending") => clause.push("last_outcome IS NULL".into()),
        Some(o) => {
            let p = bind(&mut args, SqlArg::Text(o.to_owned()));
            clause.push(format!("last_outcome = {p}"));
        }
        None => {}
    }
    if let Some(t) = q.since_ms {
        let p = bind(&mut args, SqlArg::Int(t));
        clause.push(format!("stored_at >= {p}"));
    }
    if let Some(t) = q.until_ms {
        let p = bind(&mut args, SqlArg::Int(t));
        clause.push(format!("stored_at < {p}"));
    }
    if q.incomplete {
        let ending = ENDING_OUTCOMES.map(|o| format!("'{o}'")).join(", ");
        clause.push(format!(
            "(last_outcome IS NULL OR last_outcome NOT IN ({ending}))"
        ));
    }
    if let Some(c) = &q.after {
        let t = bind(&mut args, SqlArg::Int(c.stored_at_ms));
        let id = bind(&mut args, SqlArg::Text(c.job_id.clone()));
        clause.push(format!(
            "(stored_at < {t} OR (stored_at = {t} AND job_id < {id}))"
        ));
    }
    let limit = bind(&mut args, SqlArg::Int(q.limit.clamp(1, MAX_PAGE) as i64));
    (
        format!(
            "SELECT {SUMMARY_COLUMNS} FROM {source} WHERE {} ORDER BY stored_at DESC, job_id DESC LIMIT {limit}",
            clause.join(" AND ")
        ),
        args,
    )
}

/// Whether a job stored but not yet recorded by a worker (no outcome, no subject key yet)
/// could match `q`.
pub fn may_match_unrecorded(q: &LedgerQuery) -> bool {
    q.subject_key.is_none() && matches!(q.outcome.as_deref(), None | Some("pending"))
}

/// Most entries one query returns.
pub const MAX_PAGE: usize = 1000;

/// Drop the copies of an outcome that a crash between recording and acking wrote twice
/// (the same outcome and reason, one after the other): readers show one.
pub fn dedup_outcomes(outcomes: Vec<FinalOutcome>) -> Vec<FinalOutcome> {
    let mut out: Vec<FinalOutcome> = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        if out
            .last()
            .is_some_and(|l| l.outcome == o.outcome && l.reason == o.reason)
        {
            continue;
        }
        out.push(o);
    }
    out
}

/// Most ledger jobs one retention batch forgets (one short write transaction).
pub const PURGE_BATCH: usize = 2_000;

/// Development convenience: with the ledger on and no `ledger.subject_key`, use the key kept
/// beside the queue file (`{queue.path}.subject-key`), generating it once (owner-only), and
/// warn, so erasures are provable from the first run. Production refuses to start without a
/// configured key (see `Settings::validate_for`), so this never picks one there.
pub fn ensure_subject_key(settings: &mut crate::settings::Settings) -> anyhow::Result<()> {
    use anyhow::Context;
    use secrecy::ExposeSecret;
    if !settings.ledger.enabled || !settings.ledger.subject_key.expose_secret().is_empty() {
        return Ok(());
    }
    let path = generated_key_file(settings);
    let key = match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= crate::settings::MIN_SUBJECT_KEY_CHARS => {
            text.trim().to_owned()
        }
        _ => {
            use rand::RngCore;
            let mut bytes = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut bytes);
            let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write_owner_only(&path, &key).with_context(|| {
                format!(
                    "writing a generated ledger.subject_key to {}",
                    path.display()
                )
            })?;
            key
        }
    };
    tracing::warn!(
        file = %path.display(),
        "ledger.subject_key is not set: using a generated key kept in this file (owner-only). Set RELAY__LEDGER__SUBJECT_KEY before production; erasures recorded under this key stay findable with `relay trace --email … --key-file` on that file"
    );
    settings.ledger.subject_key = secrecy::SecretString::from(key);
    Ok(())
}

/// Where a development relay keeps its generated subject key: beside the queue file.
pub fn generated_key_file(settings: &crate::settings::Settings) -> std::path::PathBuf {
    let mut name = settings.queue.path.clone().into_os_string();
    name.push(".subject-key");
    std::path::PathBuf::from(name)
}

fn write_owner_only(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
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
