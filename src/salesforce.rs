//! Salesforce REST client for writing records: upsert by external id (one record, or up to
//! 200 as one sObject Collections call), update by id (status write-back). It reads the org's
//! API usage from every answer and stops writing at `salesforce.max_api_share`. It never
//! retries by itself, except once after `INVALID_SESSION_ID` with a fresh token (that costs
//! the job no attempt); the worker owns the retry policy.

pub mod auth;
pub mod batch;

use crate::mapping::SalesforceUpsert;
use crate::metrics::Metrics;
use crate::settings::SalesforceSettings;
use auth::{Credentials, SignIn, SignInError, Token};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Characters left as-is in a path segment (an external id): RFC 3986 unreserved only.
pub const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// What became of one record's write.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    /// Created (201) or updated (200/204).
    Done { status: u16 },
    /// Salesforce refused this record: a person must fix the data, mapping or org (parked).
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
    /// Try again later with the retry schedule (5xx, timeout, connection).
    Transient { status: Option<u16>, reason: String },
    /// The org's API allocation (or the relay's share of it) is used up: wait, no attempt.
    Limited { wait: Duration, reason: String },
    /// Salesforce refused the relay's sign-in (parked with what to check).
    SignInRefused { reason: String },
}

/// One write's answer, for the worker and the ledger.
#[derive(Debug, Clone)]
pub struct WriteResult {
    pub outcome: WriteOutcome,
    /// The HTTP status of the call that carried the record, when one came back.
    pub status: Option<u16>,
    /// The start of the answer (or of this record's result), redacted for the ledger.
    pub excerpt: Option<String>,
}

impl WriteResult {
    /// No answer came back: try again later.
    fn transient(reason: String) -> Self {
        Self::of(
            WriteOutcome::Transient {
                status: None,
                reason,
            },
            None,
            None,
        )
    }

    fn of(outcome: WriteOutcome, status: Option<u16>, excerpt: Option<String>) -> Self {
        Self {
            outcome,
            status,
            excerpt,
        }
    }
}

/// When writes stop: after `REQUEST_LIMIT_EXCEEDED` or at the API share, until `until`.
#[derive(Default)]
struct Gate {
    closed_until: Option<Instant>,
    reason: String,
    /// Closed by Salesforce's own refusal, not by the share: an answer reporting low daily
    /// usage does not reopen it (that refusal also comes from limits other than the daily
    /// one); only the `/limits` probe does.
    by_refusal: bool,
}

/// The client, one per process.
pub struct SalesforceClient {
    http: reqwest::Client,
    sign_in: SignIn,
    settings: SalesforceSettings,
    metrics: Arc<Metrics>,
    gate: Mutex<Gate>,
    /// One probe of `/limits` at a time when the gate's wait is over.
    probe: tokio::sync::Mutex<()>,
}

impl SalesforceClient {
    /// From `[salesforce]`; an unreadable key is a configuration error.
    pub fn new(settings: &SalesforceSettings, metrics: Arc<Metrics>) -> Result<Self, String> {
        let credentials = Credentials::from_settings(settings)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(
                Duration::from_millis(settings.timeout_ms / 2).min(Duration::from_secs(10)),
            )
            // A redirect would carry the bearer token to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sf-centercode-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("salesforce HTTP client: {e}"))?;
        Ok(Self {
            sign_in: SignIn::new(http.clone(), settings, credentials),
            http,
            settings: settings.clone(),
            metrics,
            gate: Mutex::default(),
            probe: Default::default(),
        })
    }

    pub fn batch_size(&self) -> usize {
        self.settings.batch_size
    }

    /// How long writes must still wait (API allocation or share used up), if at all. When
    /// the wait is over, one caller asks `/limits` whether usage fell; the others wait on it.
    pub async fn wait_before_writing(&self) -> Option<(Duration, String)> {
        if let Some(left) = self.gate_left() {
            return Some(left);
        }
        let closed = self.gate.lock().unwrap().closed_until.is_some();
        if !closed {
            return None;
        }
        let _probe = self.probe.lock().await;
        // Another caller's probe may have opened it meanwhile.
        self.gate.lock().unwrap().closed_until?;
        if let Some(left) = self.gate_left() {
            return Some(left);
        }
        match self.probe_usage().await {
            Ok(()) => {}
            Err(reason) => self.close_gate(reason, true),
        }
        self.gate_left()
    }

    fn gate_left(&self) -> Option<(Duration, String)> {
        let gate = self.gate.lock().unwrap();
        let until = gate.closed_until?;
        let left = until.saturating_duration_since(Instant::now());
        (left > Duration::ZERO).then(|| (left, gate.reason.clone()))
    }

    fn close_gate(&self, reason: String, by_refusal: bool) {
        let mut gate = self.gate.lock().unwrap();
        let until = Instant::now() + Duration::from_secs(self.settings.limit_wait_secs);
        if gate.closed_until.is_none() {
            tracing::warn!(reason = %reason, wait_secs = self.settings.limit_wait_secs, "Salesforce writes paused");
            gate.by_refusal = false;
        }
        gate.closed_until = Some(until);
        gate.reason = reason;
        gate.by_refusal |= by_refusal;
    }

    /// Writes resume; a gate Salesforce's refusal closed opens only when `probed`.
    fn open_gate(&self, probed: bool) {
        let mut gate = self.gate.lock().unwrap();
        if gate.by_refusal && !probed {
            return;
        }
        gate.by_refusal = false;
        if gate.closed_until.take().is_some() {
            tracing::info!("Salesforce API usage is below the relay's share again; writes resume");
        }
    }

    /// `GET /limits`: whether the org's usage fell below the share.
    async fn probe_usage(&self) -> Result<(), String> {
        let token = self.sign_in.token().await.map_err(|e| e.to_string())?;
        let url = format!(
            "{}/services/data/v{}/limits",
            token.instance_url, self.settings.api_version
        );
        let response = self
            .http
            .get(url)
            .bearer_auth(token.access.expose_secret())
            .send()
            .await
            .map_err(|e| {
                format!(
                    "could not read the org's API usage: {}",
                    error_text(&e.without_url())
                )
            })?;
        let status = response.status().as_u16();
        if status == 401 {
            self.sign_in.invalidate(&token).await;
        }
        if !(200..300).contains(&status) {
            // Refused (the limit again, or the token): look again after another wait.
            return Err(format!(
                "Salesforce answered {status} to GET /limits; writes wait and look again"
            ));
        }
        let header = usage_header(response.headers());
        let body: Value = response.json().await.unwrap_or_default();
        let daily = &body["DailyApiRequests"];
        let usage = match (daily["Max"].as_u64(), daily["Remaining"].as_u64()) {
            (Some(max), Some(remaining)) => Some((max.saturating_sub(remaining), max)),
            _ => header,
        };
        match usage {
            Some((used, max)) => self.note_usage(&token, used, max, true),
            // The org answered but gave no figures: nothing says writes must wait, and the
            // next answer's Sforce-Limit-Info will close the gate again if they must.
            None => self.open_gate(true),
        }
        match self.gate_left() {
            Some((_, reason)) => Err(reason),
            None => Ok(()),
        }
    }

    /// Record the usage an answer reported; close the gate at the share, open it below
    /// (one Salesforce's refusal closed only when `probed`).
    fn note_usage(&self, token: &Token, used: u64, max: u64, probed: bool) {
        if max == 0 {
            return;
        }
        let ratio = used as f64 / max as f64;
        self.metrics.set(
            "relay_salesforce_api_usage_ratio",
            &[("org", token.org.as_str())],
            ratio,
        );
        if ratio >= self.settings.max_api_share {
            self.close_gate(
                format!(
                    "the org has used {used} of its {max} daily API requests, at or above salesforce.max_api_share = {}",
                    self.settings.max_api_share
                ),
                false,
            );
        } else {
            self.open_gate(probed);
        }
    }

    /// Upsert one record: `PATCH …/sobjects/{S}/{F}/{value}`.
    pub async fn upsert_one(&self, record: &SalesforceUpsert) -> WriteResult {
        let path = format!(
            "sobjects/{}/{}/{}",
            record.sobject,
            record.external_id_field,
            percent_encoding::utf8_percent_encode(&record.external_id, PATH_SEGMENT)
        );
        self.write_one(&path, Value::Object(record.fields.clone()))
            .await
    }

    /// Update a record by its Salesforce id: `PATCH …/sobjects/{S}/{Id}`.
    pub async fn update(
        &self,
        sobject: &str,
        id: &str,
        fields: &serde_json::Map<String, Value>,
    ) -> WriteResult {
        let path = format!(
            "sobjects/{sobject}/{}",
            percent_encoding::utf8_percent_encode(id, PATH_SEGMENT)
        );
        self.write_one(&path, Value::Object(fields.clone())).await
    }

    async fn write_one(&self, path: &str, body: Value) -> WriteResult {
        match self.call(path, &body).await {
            Err(result) => result,
            Ok((status, answer, excerpt)) => {
                let outcome = match status {
                    200 | 201 | 204 => WriteOutcome::Done { status },
                    300 => WriteOutcome::Rejected {
                        status,
                        code: "MULTIPLE_RECORDS".into(),
                        message: "several records have this external id; nothing was changed"
                            .into(),
                    },
                    _ => classify_error(status, &answer, self.limit_wait()),
                };
                WriteResult::of(outcome, Some(status), excerpt)
            }
        }
    }

    /// Upsert up to 200 records of one sObject in one call (`allOrNone=false`); one result
    /// per record, in order. A call Salesforce refuses as a whole (one record it cannot even
    /// parse, say) is split in halves and sent again, so only the records at fault park.
    pub async fn upsert_many(&self, records: &[&SalesforceUpsert]) -> Vec<WriteResult> {
        self.upsert_split(records).await
    }

    /// [`Self::upsert_many`], boxed: it calls itself on each half.
    fn upsert_split<'a>(
        &'a self,
        records: &'a [&'a SalesforceUpsert],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<WriteResult>> + Send + 'a>> {
        Box::pin(async move {
            let results = self.upsert_call(records).await;
            // Codes about the call itself (the object, the relay's access) would refuse every
            // half the same way: those park together at once.
            let refused_whole = records.len() > 1
                && results.iter().all(|r| match &r.outcome {
                    WriteOutcome::Rejected { code, .. } => {
                        r.status != Some(200) && !refuses_every_record(code)
                    }
                    _ => false,
                });
            if !refused_whole {
                return results;
            }
            let (left, right) = records.split_at(records.len() / 2);
            let mut results = self.upsert_split(left).await;
            results.extend(self.upsert_split(right).await);
            results
        })
    }

    /// One call for `records`: a single upsert, or one Collections upsert.
    async fn upsert_call(&self, records: &[&SalesforceUpsert]) -> Vec<WriteResult> {
        let Some(first) = records.first() else {
            return Vec::new();
        };
        if records.len() == 1 {
            return vec![self.upsert_one(first).await];
        }
        let path = format!(
            "composite/sobjects/{}/{}",
            first.sobject, first.external_id_field
        );
        let body = json!({
            "allOrNone": false,
            "records": records.iter().map(|r| {
                let mut fields = r.fields.clone();
                fields.insert("attributes".into(), json!({"type": r.sobject}));
                fields.insert(r.external_id_field.clone(), Value::String(r.external_id.clone()));
                Value::Object(fields)
            }).collect::<Vec<_>>(),
        });
        match self.call(&path, &body).await {
            Err(result) => vec![result; records.len()],
            Ok((200, Value::Array(results), _)) if results.len() == records.len() => results
                .iter()
                .map(|r| {
                    let excerpt = Some(crate::ledger::redact_response(
                        sanitized(r).to_string().as_bytes(),
                    ));
                    let error = &r["errors"][0];
                    let outcome = match (r["success"].as_bool(), error["statusCode"].as_str()) {
                        (Some(true), _) => WriteOutcome::Done {
                            status: if r["created"].as_bool() == Some(true) {
                                201
                            } else {
                                200
                            },
                        },
                        (Some(false), Some(code)) => error_outcome(
                            200,
                            code,
                            error["message"].as_str().unwrap_or(""),
                            &error["fields"],
                            self.limit_wait(),
                        ),
                        // Neither a success nor an error Salesforce explains: nothing to show
                        // a person, so try again rather than park.
                        _ => WriteOutcome::Transient {
                            status: Some(200),
                            reason: "Salesforce's result for this record said neither success nor an error code".into(),
                        },
                    };
                    WriteResult::of(outcome, Some(200), excerpt)
                })
                .collect(),
            Ok((200, _, excerpt)) => vec![
                WriteResult::of(
                    WriteOutcome::Transient {
                        status: Some(200),
                        reason:
                            "Salesforce's Collections answer did not have one result per record"
                                .into(),
                    },
                    Some(200),
                    excerpt,
                );
                records.len()
            ],
            Ok((status, answer, excerpt)) => {
                vec![
                    WriteResult::of(
                        classify_error(status, &answer, self.limit_wait()),
                        Some(status),
                        excerpt
                    );
                    records.len()
                ]
            }
        }
    }

    /// One authenticated PATCH under `/services/data/vNN.N/`: the status, the parsed answer
    /// and its redacted start; or the result every record of the call gets. After
    /// `INVALID_SESSION_ID` a fresh token is minted and the call made once more.
    async fn call(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<(u16, Value, Option<String>), WriteResult> {
        let payload = serde_json::to_vec(body).unwrap_or_default();
        for fresh in [false, true] {
            let token = match self.sign_in.token().await {
                Ok(token) => token,
                Err(SignInError::Refused(reason)) => {
                    return Err(WriteResult::of(
                        WriteOutcome::SignInRefused { reason },
                        None,
                        None,
                    ))
                }
                Err(SignInError::Unavailable(reason)) => {
                    return Err(WriteResult::transient(reason))
                }
            };
            let url = format!(
                "{}/services/data/v{}/{path}",
                token.instance_url, self.settings.api_version
            );
            let response = self
                .http
                .patch(url)
                .bearer_auth(token.access.expose_secret())
                .header(
                    "Sforce-Call-Options",
                    format!("client={}", self.settings.client_name),
                )
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(payload.clone())
                .send()
                .await;
            let response = match response {
                Ok(r) => r,
                Err(e) => {
                    let e = e.without_url();
                    let reason = if e.is_connect() {
                        format!("could not connect to Salesforce: {}", error_text(&e))
                    } else if e.is_timeout() {
                        "Salesforce did not answer within salesforce.timeout_ms (an upsert by external id is safe to repeat)".into()
                    } else {
                        format!("connection to Salesforce failed: {}", error_text(&e))
                    };
                    return Err(WriteResult::transient(reason));
                }
            };
            let status = response.status().as_u16();
            let usage = usage_header(response.headers());
            let bytes = tokio::time::timeout(Duration::from_secs(10), response.bytes())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            if let Some((used, max)) = usage {
                self.note_usage(&token, used, max, false);
            }
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            // An error's message can repeat the record's values: the ledger keeps the codes,
            // the fields and only the messages that cannot (see `keeps_message`).
            let excerpt = (!bytes.is_empty()).then(|| {
                if (200..300).contains(&status) {
                    crate::ledger::redact_response(&bytes)
                } else {
                    crate::ledger::redact_response(sanitized(&answer).to_string().as_bytes())
                }
            });
            if status == 403 && error_code(&answer) == Some("REQUEST_LIMIT_EXCEEDED") {
                self.close_gate(
                    "Salesforce answered REQUEST_LIMIT_EXCEEDED: the org's API allocation is used up".into(),
                    true,
                );
            }
            if status == 401 && error_code(&answer) == Some("INVALID_SESSION_ID") {
                self.sign_in.invalidate(&token).await;
                if !fresh {
                    tracing::info!("Salesforce session expired; minting a new token");
                    continue;
                }
            }
            return Ok((status, answer, excerpt));
        }
        unreachable!("the loop returns on its second pass")
    }

    fn limit_wait(&self) -> Duration {
        Duration::from_secs(self.settings.limit_wait_secs)
    }
}

/// The first `errorCode` of a Salesforce error answer (`[{"errorCode","message"}]`).
fn error_code(answer: &Value) -> Option<&str> {
    answer[0]["errorCode"].as_str()
}

/// What a Salesforce error means for the record, by its code first (the same in a single
/// answer and in a Collections result), then by the HTTP status of the call.
fn error_outcome(
    status: u16,
    code: &str,
    message: &str,
    fields: &Value,
    limit_wait: Duration,
) -> WriteOutcome {
    match (status, code) {
        (_, "REQUEST_LIMIT_EXCEEDED") => WriteOutcome::Limited {
            wait: limit_wait,
            reason: "Salesforce answered REQUEST_LIMIT_EXCEEDED".into(),
        },
        (_, "UNABLE_TO_LOCK_ROW" | "SERVER_UNAVAILABLE") => WriteOutcome::Transient {
            status: Some(status),
            reason: format!("Salesforce could not write the record now ({code})"),
        },
        (408 | 429 | 500..=599, _) => WriteOutcome::Transient {
            status: Some(status),
            reason: format!("Salesforce answered {status}"),
        },
        (401, _) => WriteOutcome::Transient {
            status: Some(status),
            reason: format!("Salesforce refused a freshly minted token ({status} {code})"),
        },
        _ => WriteOutcome::Rejected {
            status,
            code: if code.is_empty() {
                format!("HTTP_{status}")
            } else {
                code.to_owned()
            },
            message: describe(code, message, fields),
        },
    }
}

/// A non-2xx answer to a write (`[{"errorCode","message","fields"}]`).
fn classify_error(status: u16, answer: &Value, limit_wait: Duration) -> WriteOutcome {
    let error = &answer[0];
    error_outcome(
        status,
        error_code(answer).unwrap_or(""),
        error["message"].as_str().unwrap_or(""),
        &error["fields"],
        limit_wait,
    )
}

/// Codes that refuse a call whatever its records hold.
fn refuses_every_record(code: &str) -> bool {
    code.starts_with("HTTP_")
        || code.starts_with("INSUFFICIENT_ACCESS")
        || matches!(
            code,
            "NOT_FOUND"
                | "INVALID_TYPE"
                | "API_DISABLED_FOR_ORG"
                | "METHOD_NOT_ALLOWED"
                | "NOT_ACCEPTABLE"
        )
}

/// Codes whose message names the schema, a rule or the relay's access, never a value of the
/// record: their message helps a person and is kept. Others (`STRING_TOO_LONG`,
/// `JSON_PARSER_ERROR`, `INVALID_EMAIL_ADDRESS`, `DUPLICATE_EXTERNAL_ID`, a trigger's
/// exception…) can repeat what the record holds, and reasons reach logs and the ledger.
fn keeps_message(code: &str) -> bool {
    // A validation rule's error text is the admin's own, with no merge fields.
    matches!(
        code,
        "FIELD_CUSTOM_VALIDATION_EXCEPTION"
            | "INVALID_FIELD"
            | "INVALID_FIELD_FOR_INSERT_UPDATE"
            | "INVALID_TYPE"
            | "REQUIRED_FIELD_MISSING"
            | "NOT_FOUND"
            | "ENTITY_IS_DELETED"
            | "INSUFFICIENT_ACCESS"
            | "INSUFFICIENT_ACCESS_OR_READONLY"
            | "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY"
            | "API_DISABLED_FOR_ORG"
            | "INVALID_SESSION_ID"
            | "METHOD_NOT_ALLOWED"
            | "NOT_ACCEPTABLE"
    )
}

/// Salesforce's message for a reason: one line, bounded, kept only where it cannot repeat
/// the record's values; the fields it names either way.
fn describe(code: &str, message: &str, fields: &Value) -> String {
    let fields: Vec<&str> = fields
        .as_array()
        .map(|f| f.iter().filter_map(Value::as_str).take(10).collect())
        .unwrap_or_default();
    let mut text = if keeps_message(code) {
        let line: String = message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(300)
            .collect();
        crate::ledger::redact_response(line.as_bytes())
    } else {
        "(Salesforce's message is left out: it may repeat the record's values; the record's fields and the org's debug logs show them)".to_owned()
    };
    if !fields.is_empty() {
        text.push_str(&format!("; fields: {}", fields.join(", ")));
    }
    text
}

/// An answer as the ledger may keep it: each error's code, fields and, where
/// [`keeps_message`], its message; other keys (ids, success, created) as they are.
fn sanitized(answer: &Value) -> Value {
    match answer {
        Value::Array(items) => Value::Array(items.iter().map(sanitized).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| match k.as_str() {
                    "message" => {
                        let code = map
                            .get("errorCode")
                            .or_else(|| map.get("statusCode"))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        let kept = keeps_message(code).then(|| v.clone());
                        (k.clone(), kept.unwrap_or_else(|| json!("(left out)")))
                    }
                    _ => (k.clone(), sanitized(v)),
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `Sforce-Limit-Info: api-usage=18/5000` → (18, 5000).
pub fn usage_header(headers: &reqwest::header::HeaderMap) -> Option<(u64, u64)> {
    let value = headers.get("sforce-limit-info")?.to_str().ok()?;
    parse_usage(value)
}

/// The `api-usage=used/max` part of a `Sforce-Limit-Info` value.
pub fn parse_usage(value: &str) -> Option<(u64, u64)> {
    value.split(',').find_map(|part| {
        let (name, counts) = part.trim().split_once('=')?;
        if name.trim() != "api-usage" {
            return None;
        }
        let (used, max) = counts.trim().split_once('/')?;
        Some((used.trim().parse().ok()?, max.trim().parse().ok()?))
    })
}

pub(crate) use crate::centercode::error_text;

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    #[test]
    fn only_the_probe_reopens_writes_salesforce_refused() {
        let settings: SalesforceSettings = toml::from_str(
            "login_url = \"http://127.0.0.1:9\"\nclient_id = \"x\"\nclient_secret = \"s\"",
        )
        .unwrap();
        let client = SalesforceClient::new(&settings, Arc::new(Metrics::new())).unwrap();
        let token = Token {
            access: String::new().into(),
            instance_url: String::new(),
            org: "00D".into(),
        };
        // The share closes the gate; an answer with usage below it opens it again.
        client.note_usage(&token, 60, 100, false);
        assert!(client.gate_left().is_some());
        client.note_usage(&token, 10, 100, false);
        assert!(client.gate_left().is_none());
        // REQUEST_LIMIT_EXCEEDED closes it; an in-flight answer with low daily usage does not
        // open it (the refusal may come from another limit); the probe's figures do.
        client.close_gate("REQUEST_LIMIT_EXCEEDED".into(), true);
        client.note_usage(&token, 10, 100, false);
        assert!(client.gate_left().is_some(), "still closed");
        client.note_usage(&token, 10, 100, true);
        assert!(client.gate_left().is_none(), "opened by the probe");
        assert!(client.gate.lock().unwrap().closed_until.is_none());
    }

    #[test]
    fn usage_is_read_from_sforce_limit_info() {
        assert_eq!(parse_usage("api-usage=18/5000"), Some((18, 5000)));
        assert_eq!(
            parse_usage("per-app-api-usage=1/10(appName=x), api-usage=25/100"),
            Some((25, 100))
        );
        assert_eq!(parse_usage("api-usage=x/5"), None);
    }

    #[test]
    fn errors_are_classified_by_status_and_code() {
        let limit = json!([{"errorCode": "REQUEST_LIMIT_EXCEEDED", "message": "TotalRequests Limit exceeded."}]);
        assert!(matches!(
            classify_error(403, &limit, W),
            WriteOutcome::Limited { .. }
        ));
        let denied = json!([{"errorCode": "INSUFFICIENT_ACCESS", "message": "no"}]);
        assert!(matches!(
            classify_error(403, &denied, W),
            WriteOutcome::Rejected { .. }
        ));
        let invalid =
            json!([{"errorCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "Title needed"}]);
        assert_eq!(
            classify_error(400, &invalid, W),
            WriteOutcome::Rejected {
                status: 400,
                code: "FIELD_CUSTOM_VALIDATION_EXCEPTION".into(),
                message: "Title needed".into()
            }
        );
        assert!(matches!(
            classify_error(503, &Value::Null, W),
            WriteOutcome::Transient { .. }
        ));
        // The same code means the same thing alone and in a Collections result.
        let locked = json!([{"errorCode": "UNABLE_TO_LOCK_ROW", "message": "unable to obtain exclusive access"}]);
        assert!(matches!(
            classify_error(400, &locked, W),
            WriteOutcome::Transient { .. }
        ));
    }

    #[test]
    fn a_message_that_may_repeat_the_records_values_is_left_out() {
        let too_long = json!([{"errorCode": "STRING_TOO_LONG", "message": "Title: data value too large: Jane Doe's private note (max length=10)", "fields": ["Title__c"]}]);
        let WriteOutcome::Rejected { code, message, .. } = classify_error(400, &too_long, W) else {
            panic!("rejected")
        };
        assert_eq!(code, "STRING_TOO_LONG");
        assert!(!message.contains("Jane"), "{message}");
        assert!(message.contains("fields: Title__c"), "{message}");
        let kept = sanitized(&too_long).to_string();
        assert!(
            !kept.contains("Jane") && kept.contains("STRING_TOO_LONG"),
            "{kept}"
        );
        let result = json!({"id": null, "success": false, "errors": [{"statusCode": "JSON_PARSER_ERROR", "message": "Cannot deserialize value next week", "fields": []}]});
        assert!(!sanitized(&result).to_string().contains("next week"));
        let rule = json!([{"errorCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "Title must not be TBD"}]);
        assert!(sanitized(&rule)
            .to_string()
            .contains("Title must not be TBD"));
    }
}
