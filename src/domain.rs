//! Salesforce identifiers and the parsed shape of a notification ("parse, don't validate").
//! Nothing here does I/O; every constructor checks its input so later code can trust it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use subtle::ConstantTimeEq;

/// Why an identifier was refused. The message is safe to show to a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be {expected}")]
pub struct IdError {
    pub what: &'static str,
    pub expected: &'static str,
}

fn is_alnum(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A Salesforce organization id, in its 15- or 18-character form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OrgId(String);

impl OrgId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if (s.len() == 15 || s.len() == 18) && is_alnum(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError {
                what: "OrganizationId",
                expected: "15 or 18 letters and digits",
            })
        }
    }

    /// The case-sensitive 15-character form, which both spellings share.
    pub fn prefix15(&self) -> &str {
        &self.0[..15]
    }

    /// True when both ids name the same org (15-char prefix compared in constant time).
    pub fn same_org(&self, other: &OrgId) -> bool {
        self.prefix15()
            .as_bytes()
            .ct_eq(other.prefix15().as_bytes())
            .into()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for OrgId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}

impl From<OrgId> for String {
    fn from(id: OrgId) -> String {
        id.0
    }
}

impl std::fmt::Display for OrgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An Outbound Message notification id: exactly 18 letters and digits (the WSDL's `ent:ID`).
/// Checked before it reaches a log line, a queue key or a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NotificationId(String);

impl NotificationId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() == 18 && is_alnum(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError {
                what: "Notification Id",
                expected: "exactly 18 letters and digits",
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NotificationId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}

impl From<NotificationId> for String {
    fn from(id: NotificationId) -> String {
        id.0
    }
}

impl std::fmt::Display for NotificationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Field values of one sObject as Salesforce sent them: `None` is `xsi:nil` (or listed in
/// `fieldsToNull`), `Some("")` an empty element; a field that was not sent is absent.
pub type Fields = BTreeMap<String, Option<String>>;

/// One `<Notification>` of an Outbound Message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub id: NotificationId,
    /// Local name of the `xsi:type` QName, e.g. `Contact` or `Feedback__c`.
    pub sobject_type: String,
    /// `sObject/Id`, when sent.
    pub record_id: Option<String>,
    /// Every field element of the sObject, `Id` included.
    pub fields: Fields,
}

impl Notification {
    /// Salesforce sends only the Id when the record was deleted before delivery.
    pub fn is_record_deleted(&self) -> bool {
        self.fields.keys().all(|k| k == "Id")
    }
}

/// A parsed Outbound Message (`notifications` element). The SessionId is never kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    pub org_id: OrgId,
    pub action_id: String,
    /// Whether a (non-nil) SessionId was present; its value is dropped at parse time.
    pub had_session_id: bool,
    /// Notifications in message order, duplicates of an earlier Id removed.
    pub notifications: Vec<Notification>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_ids_of_15_and_18_chars_name_the_same_org() {
        let a = OrgId::parse("00D8d000001AbCdEAK").unwrap();
        let b = OrgId::parse("00D8d000001AbCd").unwrap();
        let c = OrgId::parse("00D8d000001ABCD").unwrap();
        assert!(a.same_org(&b));
        assert!(!a.same_org(&c), "15-char ids are case-sensitive");
    }

    #[test]
    fn notification_id_rejects_anything_but_18_alphanumerics() {
        assert!(NotificationId::parse("04l8d0000100001AAA").is_ok());
        assert!(NotificationId::parse("04l8d0000100001AA").is_err());
        assert!(NotificationId::parse("'; DROP TABLE x;--").is_err());
        assert!(NotificationId::parse("04l8d0000100001AA\u{e9}").is_err());
    }
}
