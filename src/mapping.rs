//! Salesforce fields → Centercode request, using the route's *current* mapping. Called by the
//! worker at delivery time (and by `relay preview`), never at ingest.

use crate::centercode::CentercodeRequest;
use crate::domain::Fields;
use crate::queue::Job;
use crate::settings::{Action, RouteKind, RouteSettings};
use serde_json::Value;

/// Why a job cannot become a Centercode request. The text is a park reason a person can act
/// on; it names fields, never their personal values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("record was deleted in Salesforce before delivery (the notification carries only its Id); nothing to send")]
    RecordDeleted,
    #[error("required field `{field}` (for Centercode key `{key}`) is missing or blank")]
    Missing { key: String, field: String },
    #[error("e-mail field `{field}` is missing or blank")]
    MissingEmail { field: String },
    #[error("e-mail field `{field}` does not hold a valid e-mail address")]
    InvalidEmail { field: String },
    /// The value itself is left out: it may be personal data, and reasons reach logs and the
    /// admin API. The Salesforce record (its id is on the job) shows it.
    #[error("the value of `{field}` (for Centercode key `{key}`) is not in the rule's `map` and the rule has no `default`")]
    Unmapped { key: String, field: String },
    #[error("`{field}` (for Centercode key `{key}`) is {len} characters, more than max_len {max}")]
    TooLong {
        key: String,
        field: String,
        len: usize,
        max: usize,
    },
    /// The value is left out, as for `Unmapped`.
    #[error("the external id at `{field}` is not usable in a Salesforce URL: it must be a string or a number, not only dots")]
    BadExternalId { field: String },
    #[error("this job came from a {came_from} but route `{route}` is now configured for {now}")]
    KindChanged {
        route: String,
        came_from: &'static str,
        now: &'static str,
    },
}

/// Where values are looked up: an sObject's fields or a callout's JSON body.
enum Source<'a> {
    Fields(&'a Fields),
    Json(&'a Value),
}

impl Source<'_> {
    /// The value at `path`; `None` when absent or null.
    fn get(&self, path: &str) -> Option<Value> {
        match self {
            Source::Fields(fields) => {
                // Salesforce API names are case-insensitive; prefer an exact match.
                let value = fields.get(path).or_else(|| {
                    fields
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(path))
                        .map(|(_, v)| v)
                })?;
                value.as_ref().map(|s| Value::String(s.clone()))
            }
            Source::Json(body) => body.pointer(path).filter(|v| !v.is_null()).cloned(),
        }
    }
}

fn is_blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        _ => false,
    }
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Translate a stored job with `route`'s mapping.
pub fn to_centercode(job: &Job, route: &RouteSettings) -> Result<CentercodeRequest, MappingError> {
    let source = match (job, route.kind) {
        (Job::OutboundMessageV1 { fields, .. }, RouteKind::OutboundMessage) => {
            if fields.keys().all(|k| k.eq_ignore_ascii_case("Id")) {
                return Err(MappingError::RecordDeleted);
            }
            Source::Fields(fields)
        }
        (Job::CalloutV1 { body, .. }, RouteKind::Callout) => Source::Json(body),
        (job, _) => {
            return Err(MappingError::KindChanged {
                route: route.name.clone(),
                came_from: job_kind(job),
                now: route.kind.as_str(),
            })
        }
    };
    let find = match route.action {
        Action::RemoveUser | Action::StoreUserData => {
            Some(email(&source, route.email_field.as_deref().unwrap_or(""))?)
        }
        Action::CreateFeedback => None,
        Action::SalesforceUpsert | Action::SalesforceStatus => {
            return Err(MappingError::KindChanged {
                route: route.name.clone(),
                came_from: job_kind(job),
                now: "writing into Salesforce",
            })
        }
    };
    let body = match route.action {
        Action::RemoveUser => None,
        _ => Some(Value::Object(map_fields(&source, route)?)),
    };
    Ok(CentercodeRequest {
        url: route.url.clone(),
        find,
        body,
    })
}

/// What a job came from, for [`MappingError::KindChanged`].
fn job_kind(job: &Job) -> &'static str {
    match job {
        Job::OutboundMessageV1 { .. } => "Outbound Message",
        Job::CalloutV1 { .. } => "callout",
        Job::CentercodeWebhookV1 { .. } => "Centercode webhook",
        Job::StatusWritebackV1 { .. } => "status write-back",
    }
}

/// One record to upsert into Salesforce by its external id.
#[derive(Debug, Clone, PartialEq)]
pub struct SalesforceUpsert {
    pub sobject: String,
    pub external_id_field: String,
    pub external_id: String,
    /// Field API name → value; never the external id field itself.
    pub fields: serde_json::Map<String, Value>,
}

impl SalesforceUpsert {
    /// The request as text: what `relay preview` prints (no token: it is minted at delivery).
    pub fn render(&self, api_version: &str) -> String {
        let id: String = percent_encoding::utf8_percent_encode(
            &self.external_id,
            crate::salesforce::PATH_SEGMENT,
        )
        .collect();
        format!(
            "PATCH /services/data/v{api_version}/sobjects/{}/{}/{id}\nContent-Type: application/json\n\n{}\n",
            self.sobject,
            self.external_id_field,
            serde_json::to_string_pretty(&Value::Object(self.fields.clone())).unwrap_or_default()
        )
    }
}

/// Translate a stored Centercode webhook with `route`'s mapping into a Salesforce upsert.
pub fn to_salesforce(job: &Job, route: &RouteSettings) -> Result<SalesforceUpsert, MappingError> {
    let body = match (job, route.kind) {
        (Job::CentercodeWebhookV1 { body }, RouteKind::CentercodeWebhook) => body,
        (job, _) => {
            return Err(MappingError::KindChanged {
                route: route.name.clone(),
                came_from: job_kind(job),
                now: route.kind.as_str(),
            })
        }
    };
    let source = Source::Json(body);
    let pointer = route.external_id.clone().unwrap_or_default();
    let value = source
        .get(&pointer)
        .filter(|v| !is_blank(v))
        .ok_or_else(|| MappingError::Missing {
            key: route.external_id_field.clone().unwrap_or_default(),
            field: pointer.clone(),
        })?;
    // An object's JSON text would become the record's key; "." and ".." are dot segments a
    // URL resolves away, so the PATCH would not name the record (encoding does not help).
    let external_id = as_text(&value).trim().to_owned();
    if !(value.is_string() || value.is_number()) || external_id.chars().all(|c| c == '.') {
        return Err(MappingError::BadExternalId { field: pointer });
    }
    Ok(SalesforceUpsert {
        sobject: route.sobject.clone().unwrap_or_default(),
        external_id_field: route.external_id_field.clone().unwrap_or_default(),
        external_id,
        fields: map_fields(&source, route)?,
    })
}

fn email(source: &Source<'_>, field: &str) -> Result<String, MappingError> {
    let value =
        source
            .get(field)
            .filter(|v| !is_blank(v))
            .ok_or_else(|| MappingError::MissingEmail {
                field: field.to_owned(),
            })?;
    let text = as_text(&value);
    let email = text.trim();
    let valid = email.len() <= 320
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(email.split_once('@'), Some((local, domain)) if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
    if valid {
        Ok(email.to_owned())
    } else {
        Err(MappingError::InvalidEmail {
            field: field.to_owned(),
        })
    }
}

fn map_fields(
    source: &Source<'_>,
    route: &RouteSettings,
) -> Result<serde_json::Map<String, Value>, MappingError> {
    let mut out = serde_json::Map::new();
    for (key, mapping) in &route.fields {
        let rule = mapping.rule();
        if let Some(constant) = &rule.value {
            out.insert(key.clone(), constant.clone());
            continue;
        }
        let field = rule.from.clone().unwrap_or_default();
        let raw = source.get(&field).filter(|v| !is_blank(v));
        let value = match raw {
            None => match (&rule.default, rule.required) {
                (Some(d), _) => d.clone(),
                (None, true) => {
                    return Err(MappingError::Missing {
                        key: key.clone(),
                        field,
                    })
                }
                (None, false) => continue,
            },
            Some(raw) => match &rule.map {
                Some(map) => match (map.get(&as_text(&raw)), &rule.default) {
                    (Some(mapped), _) => Value::String(mapped.clone()),
                    (None, Some(d)) => d.clone(),
                    (None, None) => {
                        return Err(MappingError::Unmapped {
                            key: key.clone(),
                            field,
                        })
                    }
                },
                None => raw,
            },
        };
        if let (Some(max), Value::String(s)) = (rule.max_len, &value) {
            let len = s.chars().count();
            if len > max {
                return Err(MappingError::TooLong {
                    key: key.clone(),
                    field,
                    len,
                    max,
                });
            }
        }
        out.insert(key.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{RouteSettings, Settings};
    use serde_json::json;

    fn settings() -> Settings {
        Settings::from_toml(
            r#"
[[routes]]
name = "gdpr"
kind = "outbound_message"
org_ids = ["00D8d000001AbCdEAK"]
sobject = "Contact"
action = "remove_user"
url = "https://cc/api/v1/userMacroListeners/gdpr"
email_field = "Email"

[[routes]]
name = "fb"
kind = "outbound_message"
org_ids = ["00D8d000001AbCdEAK"]
sobject = "Feedback__c"
action = "create_feedback"
url = "https://cc/api/v1/projects/beta1/externalSources/sf-issues"
[routes.fields]
summary = { from = "Subject__c", required = true, max_len = 10 }
description = "Description__c"
severity = { from = "Priority__c", map = { High = "Major", Low = "Cosmetic" }, default = "Minor" }
status = { value = "New" }
salesforce_id = "Id"

[[routes]]
name = "apex"
kind = "callout"
action = "create_feedback"
url = "https://cc/api/v1/projects/beta1/externalSources/sf-issues"
auth = { bearer = "0123456789abcdef0123" }
[routes.fields]
summary = { from = "/feedback/title", required = true }
rating = "/feedback/rating"
"#,
        )
        .unwrap()
    }

    fn om(fields: &[(&str, Option<&str>)]) -> Job {
        Job::OutboundMessageV1 {
            org_id: "00D8d000001AbCdEAK".into(),
            notification_id: "04l8d0000100001AAA".into(),
            action_id: "04k8d0000009GdPAAU".into(),
            sobject_type: "Contact".into(),
            record_id: Some("0038d0000000041AAA".into()),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
                .collect(),
        }
    }

    #[test]
    fn removal_takes_the_email_field() {
        let s = settings();
        let req = to_centercode(
            &om(&[
                ("Id", Some("0038d0000000041AAA")),
                ("email", Some("A+b@x.org")),
            ]),
            &s.routes[0],
        )
        .unwrap();
        assert_eq!(req.find.as_deref(), Some("A+b@x.org"));
        assert!(req.body.is_none());
    }

    #[test]
    fn a_deleted_record_cannot_be_removed_by_email() {
        let s = settings();
        let err =
            to_centercode(&om(&[("Id", Some("0038d0000000041AAA"))]), &s.routes[0]).unwrap_err();
        assert_eq!(err, MappingError::RecordDeleted);
    }

    #[test]
    fn a_bad_email_is_refused_without_echoing_it() {
        let s = settings();
        let err = to_centercode(
            &om(&[("Id", Some("x")), ("Email", Some("not an email"))]),
            &s.routes[0],
        )
        .unwrap_err();
        assert!(!err.to_string().contains("not an email"));
    }

    #[test]
    fn feedback_fields_follow_the_mapping() {
        let s = settings();
        let job = om(&[
            ("Id", Some("a0B8d00000AbCdFEAV")),
            ("Subject__c", Some("Dark mode")),
            ("Description__c", None),
            ("Priority__c", Some("Medium")),
        ]);
        let req = to_centercode(&job, &s.routes[1]).unwrap();
        assert_eq!(
            req.body.unwrap(),
            json!({"summary": "Dark mode", "severity": "Minor", "status": "New", "salesforce_id": "a0B8d00000AbCdFEAV"})
        );
    }

    #[test]
    fn missing_required_and_too_long_values_are_refused() {
        let s = settings();
        let err = to_centercode(
            &om(&[("Id", Some("x")), ("Subject__c", Some(" "))]),
            &s.routes[1],
        )
        .unwrap_err();
        assert!(matches!(err, MappingError::Missing { .. }));
        let err = to_centercode(
            &om(&[("Id", Some("x")), ("Subject__c", Some("12345678901"))]),
            &s.routes[1],
        )
        .unwrap_err();
        assert!(matches!(
            err,
            MappingError::TooLong {
                len: 11,
                max: 10,
                ..
            }
        ));
    }

    #[test]
    fn callouts_are_read_with_json_pointers() {
        let s = settings();
        let job = Job::CalloutV1 {
            idempotency_key: None,
            body: json!({"feedback": {"title": "T", "rating": 4}}),
        };
        let req = to_centercode(&job, &s.routes[2]).unwrap();
        assert_eq!(req.body.unwrap(), json!({"summary": "T", "rating": 4}));
    }

    #[test]
    fn a_webhook_external_id_must_be_a_string_or_number_that_names_a_path_segment() {
        let route: RouteSettings = toml::from_str(
            r#"
name = "cc-feedback"
kind = "centercode_webhook"
action = "salesforce_upsert"
sobject = "Centercode_Feedback__c"
external_id_field = "Centercode_Id__c"
external_id = "/feedback/id"
[fields]
Title__c = "/feedback/title"
"#,
        )
        .unwrap();
        let upsert = |id: Value| {
            to_salesforce(
                &Job::CentercodeWebhookV1 {
                    body: json!({"feedback": {"id": id, "title": "T"}}),
                },
                &route,
            )
        };
        assert_eq!(upsert(json!(" FB/1 é ")).unwrap().external_id, "FB/1 é");
        assert_eq!(upsert(json!(4711)).unwrap().external_id, "4711");
        assert_eq!(upsert(json!("a.b")).unwrap().external_id, "a.b");
        for bad in [
            json!({"v": "FB-1"}),
            json!(["FB-1"]),
            json!(true),
            json!(".."),
            json!("."),
        ] {
            let err = upsert(bad.clone()).unwrap_err();
            assert!(
                matches!(&err, MappingError::BadExternalId { field } if field == "/feedback/id"),
                "{bad}: {err:?}"
            );
        }
        assert!(matches!(
            upsert(json!("  ")),
            Err(MappingError::Missing { .. })
        ));
    }

    #[test]
    fn an_unmapped_value_is_named_by_field_and_rule_never_by_value() {
        let mut s = settings();
        // No default: a value outside the map parks the job.
        if let Some(crate::settings::FieldMapping::Rule(rule)) =
            s.routes[1].fields.get_mut("severity")
        {
            rule.default = None;
        }
        let err = to_centercode(
            &om(&[
                ("Subject__c", Some("Short")),
                ("Priority__c", Some("Jane Doe <jane@example.org>")),
            ]),
            &s.routes[1],
        )
        .unwrap_err();
        let reason = err.to_string();
        assert!(matches!(err, MappingError::Unmapped { .. }), "{err:?}");
        assert!(
            reason.contains("Priority__c") && reason.contains("map"),
            "{reason}"
        );
        assert!(
            !reason.contains("Jane") && !reason.contains("jane@example.org"),
            "{reason}"
        );
        assert!(!format!("{err:?}").contains("Jane"), "the Debug form too");
    }
}
