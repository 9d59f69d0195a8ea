//! The status write-back: after a Salesforce → Centercode job's final outcome, a job of its
//! own that writes what happened onto the originating Salesforce record
//! (`[routes.status_writeback]`), so an admin sees the outcome on the Contact. The text is
//! fixed here, when the outcome is known, so every retry writes the same values.

use crate::queue::{now_ms, Job, Leased, NewJob};
use crate::settings::{Action, RouteSettings, StatusWriteback};
use crate::worker::Outcome;
use serde_json::{Map, Value};

/// Salesforce's default text field length: longer values would be refused.
const MAX_TEXT: usize = 255;

/// The status and detail a Salesforce admin reads for `outcome`; `None` when nothing is
/// written back (a superseded version: the newer one writes its own).
pub fn status_text(outcome: &Outcome) -> Option<(String, String)> {
    let (status, detail) = match outcome {
        Outcome::Delivered { status: 202 } => (
            "Sent to Centercode (202)".to_owned(),
            "Centercode accepted the request; its macro runs later".to_owned(),
        ),
        Outcome::Delivered { status } => (
            format!("Sent to Centercode ({status})"),
            format!("Centercode carried it out ({status})"),
        ),
        Outcome::UserNotFound => (
            "User not found in Centercode".to_owned(),
            "Centercode has no user with this e-mail (404); nothing to do".to_owned(),
        ),
        Outcome::Parked { reason, .. } => (format!("Parked: {reason}"), reason.clone()),
        _ => return None,
    };
    Some((truncate(&status), truncate(&detail)))
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_TEXT {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(MAX_TEXT - 1).collect();
    out.push('…');
    out
}

/// The write-back job for `job`'s `outcome` on `record_id`, if the outcome is written back.
pub fn job_for(
    route: &RouteSettings,
    wb: &StatusWriteback,
    job: &Leased,
    record_id: &str,
    outcome: &Outcome,
) -> Option<NewJob> {
    let (status, detail) = status_text(outcome)?;
    let sobject = match (&wb.sobject, &job.job) {
        (Some(s), _) => s.clone(),
        (None, Job::OutboundMessageV1 { sobject_type, .. }) => sobject_type.clone(),
        (None, _) => return None, // refused by validation for callouts
    };
    let now = now_ms();
    let mut fields = Map::new();
    fields.insert(wb.status_field.clone(), Value::String(status));
    if let Some(f) = &wb.detail_field {
        fields.insert(f.clone(), Value::String(detail));
    }
    if let Some(f) = &wb.time_field {
        fields.insert(f.clone(), Value::String(crate::admin::rfc3339(now)));
    }
    let label = match outcome {
        Outcome::Delivered { .. } => "delivered",
        Outcome::UserNotFound => "user_not_found",
        _ => "parked",
    };
    Some(NewJob {
        received_at_ms: now,
        id: uuid::Uuid::new_v4().to_string(),
        route: route.name.clone(),
        action: Action::SalesforceStatus,
        // One write-back per outcome of a delivery attempt: a crash-and-redo of the same
        // attempt stores it once; a replay's later outcome gets its own.
        dedupe_key: Some(format!("writeback:{}:{label}:{}", job.id, job.attempts)),
        body_hash: None,
        org_id: job.org_id.clone(),
        notification_id: job.notification_id.clone(),
        record_id: Some(record_id.to_owned()),
        job: Job::StatusWritebackV1 {
            sobject,
            record_id: record_id.to_owned(),
            fields,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_read_as_an_admin_expects() {
        assert_eq!(
            status_text(&Outcome::Delivered { status: 200 }).unwrap().0,
            "Sent to Centercode (200)"
        );
        assert_eq!(
            status_text(&Outcome::UserNotFound).unwrap().0,
            "User not found in Centercode"
        );
        let long = "x".repeat(400);
        let (status, detail) = status_text(&Outcome::Parked {
            reason: long,
            status: None,
        })
        .unwrap();
        assert!(status.starts_with("Parked: xxx"));
        assert_eq!(status.chars().count(), MAX_TEXT);
        assert_eq!(detail.chars().count(), MAX_TEXT);
        assert!(status_text(&Outcome::Superseded {
            version: 1,
            newer: 2
        })
        .is_none());
    }
}
