//! Per-record order: never apply an older version of a record after a newer one. Each job of
//! a record has a *version* (the route's `version_field`: `SystemModstamp`, else
//! `LastModifiedDate`, when the message carries it; a JSON pointer into a callout body;
//! otherwise the time its request reached the relay). For each (route, record) the shared store keeps
//! the newest version seen at ingest, the newest delivered, and who is delivering one now:
//!
//! - a job older than a version already delivered, or than one waiting, is `superseded`
//!   (recorded, counted, acked: accounted for, never silently dropped);
//! - only one version of a record is in flight at a time, across every worker process: a
//!   job of another version waits a moment without spending an attempt. Copies of the same
//!   version (one change notified twice) may go together: they say the same thing.
//!
//! The store is the queue's own: the SQLite file (embedded), Redis (RabbitMQ), or process
//! memory on RabbitMQ without Redis (one worker process only; warned at start).

use crate::queue::Job;
use crate::settings::RouteSettings;

/// The versions a message may carry, by default, in order of preference.
pub const DEFAULT_VERSION_FIELDS: [&str; 2] = ["SystemModstamp", "LastModifiedDate"];

/// How long a delivery holds its record (renewed by nothing: a delivery never takes longer
/// than [`Settings::longest_delivery_ms`](crate::settings::Settings::longest_delivery_ms),
/// and a crashed holder's claim lapses after this).
pub fn hold_ms(settings: &crate::settings::Settings) -> i64 {
    (settings.longest_delivery_ms() as i64).saturating_mul(2) + 5_000
}

/// How long a record's versions are remembered after it was last touched: longer than any
/// job lives, so a late retry or a replay months later still meets the newer version.
pub const REMEMBER_MS: i64 = 400 * 86_400_000;

/// What the store says about delivering one version of a record now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Deliver: the record is held for this version until [`crate::queue::Queue::order_finish`].
    Go,
    /// Do not deliver: `newer` was delivered already or is waiting.
    Superseded { newer: i64 },
    /// Another worker is delivering a version of this record right now: try again shortly.
    Busy,
}

/// The store key of a job's record: `None` when the job names no record (nothing to order).
pub fn record_key(route: &str, record_id: Option<&str>) -> Option<String> {
    record_id
        .filter(|r| !r.is_empty())
        .map(|r| format!("{route}\u{1f}{r}"))
}

/// The version of `job` under `route`'s `version_field`; when it carries none, the time its
/// request reached the relay (`received_at_ms`, which the gateway and the job both know).
pub fn version_of(job: &Job, route: &RouteSettings, received_at_ms: i64) -> i64 {
    let configured = route.version_field.as_deref().filter(|f| !f.is_empty());
    let names: Vec<&str> = match configured {
        Some(f) => vec![f],
        None => DEFAULT_VERSION_FIELDS.to_vec(),
    };
    let text: Option<String> = match job {
        Job::OutboundMessageV1 { fields, .. } => {
            names.iter().find_map(|n| fields.get(*n).cloned().flatten())
        }
        Job::StatusWritebackV1 { .. } => None,
        Job::CalloutV1 { body, .. } | Job::CentercodeWebhookV1 { body } => {
            names.iter().find_map(|n| {
                let value = if n.starts_with('/') {
                    body.pointer(n)
                } else {
                    body.get(*n)
                };
                match value? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }
            })
        }
    };
    text.and_then(|t| parse_version(&t))
        .unwrap_or(received_at_ms)
}

/// The (record key, version) of each job about to be stored, for [`note_seen`].
pub fn versions_of(
    route: &RouteSettings,
    jobs: &[crate::queue::NewJob],
) -> Vec<Option<(String, i64)>> {
    jobs.iter()
        .map(|j| {
            record_key(&route.name, j.record_id.as_deref())
                .map(|key| (key, version_of(&j.job, route, j.received_at_ms)))
        })
        .collect()
}

/// After an enqueue: note the versions of the jobs newly stored, without the acknowledgement
/// waiting. It only lets an older version still waiting be skipped sooner; what keeps order is
/// the check under the record's hold at delivery, so a note lost in a crash changes nothing.
pub fn note_seen(
    queue: &crate::queue::Queue,
    versions: Vec<Option<(String, i64)>>,
    outcomes: &[crate::queue::EnqueueOutcome],
) {
    let stored: Vec<(String, i64)> = versions
        .into_iter()
        .zip(outcomes)
        .filter(|(_, o)| **o == crate::queue::EnqueueOutcome::Stored)
        .filter_map(|(v, _)| v)
        .collect();
    if stored.is_empty() {
        return;
    }
    let queue = queue.clone();
    tokio::spawn(async move {
        if let Err(e) = queue.order_seen(stored).await {
            tracing::warn!(error = %e, "could not note the versions of stored records");
        }
    });
}

/// A callout's record id: the route's `record_id_field` (a JSON pointer, or a top-level
/// key), else a top-level `recordId`, `record_id` or `Id`.
pub fn callout_record_id(route: &RouteSettings, body: &serde_json::Value) -> Option<String> {
    let names: Vec<&str> = match route.record_id_field.as_deref() {
        Some(f) => vec![f],
        None => vec!["recordId", "record_id", "Id"],
    };
    names.iter().find_map(|n| {
        let v = if n.starts_with('/') {
            body.pointer(n)
        } else {
            body.get(*n)
        };
        v.and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 64)
            .map(str::to_owned)
    })
}

/// A version as a number: an integer as written, or an RFC 3339 date-time in milliseconds.
pub fn parse_version(text: &str) -> Option<i64> {
    let t = text.trim();
    t.parse::<i64>()
        .ok()
        .or_else(|| crate::admin_cli::parse_rfc3339_ms(t).ok())
}

/// One record's state in the shared store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordState {
    pub seen: Option<i64>,
    pub delivered: Option<i64>,
    /// The version being delivered now, by `holders` jobs, until `until` (ms).
    pub held_version: Option<i64>,
    pub holders: i64,
    pub until: i64,
}

impl RecordState {
    /// The decision for delivering `version` now; on `Go` the state is updated to hold the
    /// record for `hold_ms` (shared by the three stores so they agree; the Redis script is
    /// the same logic in Lua).
    pub fn begin(&mut self, version: i64, now: i64, hold_ms: i64) -> Decision {
        if let Some(newer) = [self.delivered, self.seen]
            .into_iter()
            .flatten()
            .filter(|v| *v > version)
            .max()
        {
            return Decision::Superseded { newer };
        }
        let held = self.holders > 0 && self.until > now;
        if held && self.held_version != Some(version) {
            return Decision::Busy;
        }
        self.holders = if held { self.holders + 1 } else { 1 };
        self.held_version = Some(version);
        self.until = now + hold_ms;
        Decision::Go
    }

    /// A job of `version` is done; `delivered` when it was delivered.
    pub fn finish(&mut self, version: i64, delivered: bool) {
        if delivered {
            self.delivered = self.delivered.max(Some(version));
        }
        if self.held_version == Some(version) && self.holders > 0 {
            self.holders -= 1;
            if self.holders == 0 {
                self.held_version = None;
                self.until = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_versions_are_superseded_and_a_record_held_for_another_version_is_busy() {
        let mut r = RecordState {
            seen: Some(5),
            delivered: Some(4),
            ..RecordState::default()
        };
        assert_eq!(r.begin(3, 1_000, 100), Decision::Superseded { newer: 5 });
        assert_eq!(r.begin(5, 1_000, 100), Decision::Go);
        assert_eq!(
            r.begin(5, 1_010, 100),
            Decision::Go,
            "the same version may go twice"
        );
        r.seen = Some(6);
        assert_eq!(
            r.begin(6, 1_020, 100),
            Decision::Busy,
            "version 5 is in flight"
        );
        r.finish(5, true);
        assert_eq!(
            r.begin(6, 1_030, 100),
            Decision::Busy,
            "one copy of 5 still in flight"
        );
        r.finish(5, true);
        assert_eq!(r.delivered, Some(5));
        assert_eq!(r.begin(6, 1_040, 100), Decision::Go);
        // A crashed holder's hold lapses.
        assert_eq!(r.begin(7, 2_000, 100), Decision::Go);
        r.finish(7, false);
        assert_eq!(
            (r.delivered, r.holders),
            (Some(5), 0),
            "a failed delivery records nothing"
        );
        assert_eq!(
            r.begin(6, 2_100, 100),
            Decision::Go,
            "6 is not older than anything delivered"
        );
    }

    #[test]
    fn versions_are_salesforce_times_or_integers() {
        assert_eq!(
            parse_version("2024-05-14T11:15:42.250Z"),
            Some(1_715_685_342_250)
        );
        assert_eq!(parse_version(" 42 "), Some(42));
        assert_eq!(parse_version("yesterday"), None);
    }
}
