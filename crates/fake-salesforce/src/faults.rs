//! Scripted failures: whole-call faults for the next N data calls, and per-record rules keyed
//! by external id. Only the shapes and their matching live here; the data API applies them.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A fault for the next `times` data calls whose path contains `path_contains`.
///
/// JSON: `{"kind":"unavailable","times":2}`, `{"kind":"hang","ms":3000}`,
/// `{"kind":"validation","error_code":"FIELD_CUSTOM_VALIDATION_EXCEPTION","message":"…",
/// "fields":["Status__c"],"path_contains":"/Contact/"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// What happens (the `kind` tag and its fields, flattened).
    #[serde(flatten)]
    pub kind: FaultKind,
    /// How many matching calls it applies to (default 1).
    #[serde(default = "one")]
    pub times: u32,
    /// Only calls whose path contains this text; `None` = any data call. A part of
    /// `/services/oauth2/token` aims the fault at sign-in instead (`unavailable`, `hang`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_contains: Option<String>,
}

fn one() -> u32 {
    1
}

impl Fault {
    /// `kind` once, on any data call.
    pub fn once(kind: FaultKind) -> Self {
        Self::times(kind, 1)
    }

    /// `kind` for the next `times` data calls.
    pub fn times(kind: FaultKind, times: u32) -> Self {
        Self {
            kind,
            times,
            path_contains: None,
        }
    }

    /// Restricts the fault to paths containing `text`.
    pub fn on_path(mut self, text: &str) -> Self {
        self.path_contains = Some(text.to_string());
        self
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        self.path_contains
            .as_deref()
            .map_or(true, |text| path.contains(text))
    }
}

/// What a [`Fault`] does to a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// 401 `INVALID_SESSION_ID`, as for an expired or revoked token; not counted.
    InvalidSession,
    /// 403 `REQUEST_LIMIT_EXCEEDED`; not counted.
    RequestLimit,
    /// 400 with this error (counted, as Salesforce counts a refused call).
    Validation {
        /// `errorCode`, e.g. `FIELD_CUSTOM_VALIDATION_EXCEPTION`.
        #[serde(alias = "errorCode")]
        error_code: String,
        /// `message`.
        message: String,
        /// `fields` (omitted from the answer when empty).
        #[serde(default)]
        fields: Vec<String>,
    },
    /// 404 `NOT_FOUND`, as for an unknown sObject or field; counted.
    NotFound,
    /// 503 `SERVER_UNAVAILABLE`; not counted.
    Unavailable,
    /// Sleeps `ms` before handling the call normally. A client timeout shorter than that gives
    /// up first, and the write is still applied afterwards (the outcome the client never saw).
    Hang {
        /// How long to sleep.
        ms: u64,
    },
}

impl FaultKind {
    /// Play the fault: hold the call for a `hang` (then `None`: the call goes on), or the
    /// answer it gives instead, with whether it counts toward the API usage.
    pub(crate) async fn play(&self) -> Option<(u16, Value, bool)> {
        if let Self::Hang { ms } = self {
            tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
        }
        self.reply()
    }

    /// The answer this fault gives instead of handling the call, and whether the call counts
    /// toward the API usage; `None` for `hang`.
    pub(crate) fn reply(&self) -> Option<(u16, Value, bool)> {
        let (status, code, message, fields, counted) = match self {
            Self::InvalidSession => (401, INVALID_SESSION.0, INVALID_SESSION.1, &[][..], false),
            Self::RequestLimit => (403, LIMIT_EXCEEDED.0, LIMIT_EXCEEDED.1, &[][..], false),
            Self::Validation {
                error_code,
                message,
                fields,
            } => (
                400,
                error_code.as_str(),
                message.as_str(),
                &fields[..],
                true,
            ),
            Self::NotFound => (404, NOT_FOUND.0, NOT_FOUND.1, &[][..], true),
            Self::Unavailable => (
                503,
                "SERVER_UNAVAILABLE",
                "Server temporarily unavailable, please retry",
                &[][..],
                false,
            ),
            Self::Hang { .. } => return None,
        };
        Some((status, error_body(code, message, fields), counted))
    }
}

/// (errorCode, message) pairs of Salesforce's common refusals.
pub(crate) const INVALID_SESSION: (&str, &str) =
    ("INVALID_SESSION_ID", "Session expired or invalid");
pub(crate) const LIMIT_EXCEEDED: (&str, &str) =
    ("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.");
pub(crate) const NOT_FOUND: (&str, &str) = ("NOT_FOUND", "The requested resource does not exist");

/// The REST API's error body: an array with one `{message, errorCode, fields}`.
pub(crate) fn error_body(code: &str, message: &str, fields: &[String]) -> Value {
    if fields.is_empty() {
        json!([{"message": message, "errorCode": code}])
    } else {
        json!([{"message": message, "errorCode": code, "fields": fields}])
    }
}

/// Fails the record whose external id is `external_id`: a single upsert answers 400 with this
/// error, a Collections upsert gives that record `success:false` with it.
///
/// JSON: `{"external_id":"CC-7","error_code":"FIELD_CUSTOM_VALIDATION_EXCEPTION",
/// "message":"Status is locked","fields":["Status__c"],"sobject":"Contact","times":1}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordRule {
    /// The external id value (compared exactly).
    pub external_id: String,
    /// `errorCode` of a single upsert's 400, `statusCode` of a Collections record's error.
    #[serde(alias = "errorCode")]
    pub error_code: String,
    /// The error's `message`.
    pub message: String,
    /// The error's `fields`.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Only this sObject type; `None` = any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sobject: Option<String>,
    /// How many times it fires; `None` = until the rules are cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
    /// A value Salesforce cannot even read (a date that is not one, say): a Collections call
    /// carrying this record is refused whole (400 with the rule's error, nothing written),
    /// as Salesforce refuses a request it cannot deserialize.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole_call: bool,
}

impl RecordRule {
    /// Fails every write of `external_id` with `error_code` and `message`.
    pub fn new(external_id: &str, error_code: &str, message: &str) -> Self {
        Self {
            external_id: external_id.to_string(),
            error_code: error_code.to_string(),
            message: message.to_string(),
            fields: vec![],
            sobject: None,
            times: None,
            whole_call: false,
        }
    }

    /// The same rule, refusing a whole Collections call that carries the record.
    pub fn whole_call(mut self) -> Self {
        self.whole_call = true;
        self
    }

    pub(crate) fn matches(&self, sobject: &str, external_id: &str) -> bool {
        self.external_id == external_id && self.sobject.as_deref().map_or(true, |s| s == sobject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_json_is_flat_with_a_kind_tag() {
        let fault: Fault = serde_json::from_value(json!({
            "kind": "validation", "errorCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION",
            "message": "locked", "times": 2, "path_contains": "/Contact/"
        }))
        .unwrap();
        assert_eq!(fault.times, 2);
        assert!(fault.matches("/services/data/v62.0/sobjects/Contact/Ext__c/1"));
        assert!(!fault.matches("/services/data/v62.0/limits"));
        let hang: Fault = serde_json::from_value(json!({"kind": "hang", "ms": 5})).unwrap();
        assert_eq!(hang, Fault::once(FaultKind::Hang { ms: 5 }));
        let back = serde_json::to_value(&hang).unwrap();
        assert_eq!(back, json!({"kind": "hang", "ms": 5, "times": 1}));
    }
}
