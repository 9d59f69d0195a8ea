//! The fake org's memory: records per sObject, live tokens, API usage, faults, recorded writes.
//! Pure bookkeeping behind one mutex; no HTTP here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::configuration::FakeSalesforceConfig;
use crate::faults::{Fault, RecordRule};

/// One stored sObject record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SObjectRecord {
    /// The 18-character Salesforce id.
    pub id: String,
    /// Field values as last written (without `Id` and `attributes`).
    pub fields: Map<String, Value>,
}

impl SObjectRecord {
    /// A field's value, if set.
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.fields.get(field)
    }
}

/// One write request (any method but GET) to the data API, in arrival order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedWrite {
    /// `PATCH`, `POST`, …
    pub method: String,
    /// Path without the query, e.g. `/services/data/v62.0/sobjects/Contact/Ext__c/CC-1`.
    pub path: String,
    /// The raw query string ("" when there is none).
    pub query: String,
    /// The `Sforce-Call-Options` header (`client=…`), if sent.
    pub call_options: Option<String>,
    /// The body as JSON; `Null` when empty or not JSON.
    pub body: Value,
    /// The status answered; 0 when the server stopped before answering.
    pub status: u16,
}

/// The org's API usage, as in `Sforce-Limit-Info: api-usage=used/allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiUsage {
    /// Calls counted so far.
    pub used: u64,
    /// The daily allocation; at `used >= allocation` calls get 403 `REQUEST_LIMIT_EXCEEDED`.
    pub allocation: u64,
}

impl ApiUsage {
    pub(crate) fn header(self) -> String {
        format!("api-usage={}/{}", self.used, self.allocation)
    }
}

/// Counters readable through `GET /__fake/counters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Access tokens minted since the start or the last reset.
    pub tokens_minted: u64,
    /// Requests that reached the data API, whatever their answer.
    pub data_calls: u64,
    /// [`ApiUsage::used`].
    pub api_used: u64,
    /// [`ApiUsage::allocation`].
    pub api_allocation: u64,
}

pub(crate) struct Shared {
    pub(crate) startup: FakeSalesforceConfig,
    /// `http://127.0.0.1:PORT`, always accepted as an audience.
    pub(crate) base_url: String,
    state: Mutex<State>,
    /// Woken on every recorded write (for `wait_for_writes`).
    pub(crate) notify: Notify,
}

impl Shared {
    pub(crate) fn new(config: FakeSalesforceConfig, base_url: String) -> Self {
        Self {
            state: Mutex::new(State::new(config.clone())),
            startup: config,
            base_url,
            notify: Notify::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not wedge the fake for the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files a finished write under its arrival number, so a slow call keeps its place.
    pub(crate) fn record_write(&self, seq: u64, write: RecordedWrite) {
        {
            let mut st = self.lock();
            let pos = st.writes.partition_point(|(s, _)| *s < seq);
            st.writes.insert(pos, (seq, write));
        }
        self.notify.notify_waiters();
    }
}

pub(crate) struct State {
    pub(crate) config: FakeSalesforceConfig,
    pub(crate) usage: ApiUsage,
    /// access token → expiry.
    tokens: HashMap<String, Instant>,
    pub(crate) tokens_minted: u64,
    pub(crate) data_calls: u64,
    /// sObject type → records in creation order.
    records: BTreeMap<String, Vec<SObjectRecord>>,
    /// sObject type → 3-character key prefix.
    prefixes: HashMap<String, String>,
    next_id: u64,
    /// (arrival number, write), in arrival order.
    pub(crate) writes: Vec<(u64, RecordedWrite)>,
    next_seq: u64,
    pub(crate) faults: VecDeque<Fault>,
    pub(crate) rules: Vec<RecordRule>,
}

impl State {
    pub(crate) fn new(config: FakeSalesforceConfig) -> Self {
        Self {
            usage: ApiUsage {
                used: config.api_used,
                allocation: config.api_allocation,
            },
            config,
            tokens: HashMap::new(),
            tokens_minted: 0,
            data_calls: 0,
            records: BTreeMap::new(),
            prefixes: HashMap::new(),
            next_id: 0,
            writes: vec![],
            next_seq: 0,
            faults: VecDeque::new(),
            rules: vec![],
        }
    }

    /// Counts a data call and returns its arrival number.
    pub(crate) fn arrive(&mut self) -> u64 {
        self.data_calls += 1;
        self.next_seq += 1;
        self.next_seq
    }

    pub(crate) fn writes(&self) -> Vec<RecordedWrite> {
        self.writes.iter().map(|(_, w)| w.clone()).collect()
    }

    pub(crate) fn counters(&self) -> Counters {
        Counters {
            tokens_minted: self.tokens_minted,
            data_calls: self.data_calls,
            api_used: self.usage.used,
            api_allocation: self.usage.allocation,
        }
    }

    /// Stores a new access token, valid for the configured lifetime.
    pub(crate) fn mint_token(&mut self, token: String) {
        let lifetime = Duration::from_secs(self.config.token_lifetime_secs);
        self.tokens.insert(token, Instant::now() + lifetime);
        self.tokens_minted += 1;
    }

    pub(crate) fn token_is_live(&self, token: &str) -> bool {
        self.tokens
            .get(token)
            .is_some_and(|expiry| Instant::now() < *expiry)
    }

    pub(crate) fn live_tokens(&self) -> Vec<String> {
        let now = Instant::now();
        self.tokens
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(token, _)| token.clone())
            .collect()
    }

    pub(crate) fn revoke_tokens(&mut self) {
        self.tokens.clear();
    }

    /// Takes one use of the first fault aimed at the token endpoint (`on_path` set to a
    /// part of `/services/oauth2/token`); faults without a path are for data calls only.
    pub(crate) fn take_token_fault(&mut self) -> Option<Fault> {
        let aimed = |f: &Fault| {
            f.path_contains
                .as_deref()
                .is_some_and(|p| !p.is_empty() && "/services/oauth2/token".contains(p))
        };
        let idx = self.faults.iter().position(aimed)?;
        self.take_fault_at(idx)
    }

    /// Takes one use of the first queued fault that matches `path`.
    pub(crate) fn take_fault(&mut self, path: &str) -> Option<Fault> {
        let idx = self.faults.iter().position(|f| f.matches(path))?;
        self.take_fault_at(idx)
    }

    fn take_fault_at(&mut self, idx: usize) -> Option<Fault> {
        let fault = self.faults[idx].clone();
        if fault.times <= 1 {
            self.faults.remove(idx);
        } else {
            self.faults[idx].times -= 1;
        }
        Some(fault)
    }

    /// Takes one use of the first record rule for this record, if any.
    pub(crate) fn take_rule(&mut self, sobject: &str, external_id: &str) -> Option<RecordRule> {
        let idx = self
            .rules
            .iter()
            .position(|r| r.matches(sobject, external_id))?;
        let rule = self.rules[idx].clone();
        match rule.times {
            Some(n) if n <= 1 => {
                self.rules.remove(idx);
            }
            Some(n) => self.rules[idx].times = Some(n - 1),
            None => {}
        }
        Some(rule)
    }

    pub(crate) fn records(&self, sobject: &str) -> &[SObjectRecord] {
        self.records.get(sobject).map_or(&[], Vec::as_slice)
    }

    pub(crate) fn records_mut(&mut self, sobject: &str) -> &mut Vec<SObjectRecord> {
        self.records.entry(sobject.to_string()).or_default()
    }

    /// Index of the record with this 15- or 18-character id.
    pub(crate) fn find_by_id(&self, sobject: &str, id: &str) -> Option<usize> {
        if id.len() != 15 && id.len() != 18 {
            return None;
        }
        self.records(sobject)
            .iter()
            .position(|r| r.id == id || r.id[..15] == *id)
    }

    /// A new 18-character id: key prefix, pod `5g`, a counter, and the case-safe suffix.
    pub(crate) fn new_id(&mut self, sobject: &str) -> String {
        let custom = self
            .prefixes
            .values()
            .filter(|p| p.starts_with('a'))
            .count();
        let prefix = self
            .prefixes
            .entry(sobject.to_string())
            .or_insert_with(|| key_prefix(sobject, custom))
            .clone();
        self.next_id += 1;
        let mut n = self.next_id;
        let mut digits = [b'0'; 10];
        for d in digits.iter_mut().rev() {
            *d = BASE62[(n % 62) as usize];
            n /= 62;
        }
        let id15 = format!("{prefix}5g{}", String::from_utf8_lossy(&digits));
        let suffix = case_suffix(&id15);
        id15 + &suffix
    }

    /// Creates a record with `fields` and returns its id: the `Id` among the fields when it
    /// is one (15 or 18 letters and digits, to seed records a fixture names), else a new one.
    pub(crate) fn insert(&mut self, sobject: &str, fields: Map<String, Value>) -> String {
        let given = fields
            .get("Id")
            .and_then(Value::as_str)
            .filter(|id| {
                matches!(id.len(), 15 | 18) && id.bytes().all(|b| b.is_ascii_alphanumeric())
            })
            .map(str::to_owned);
        let id = given.unwrap_or_else(|| self.new_id(sobject));
        self.records_mut(sobject).push(SObjectRecord {
            id: id.clone(),
            fields: clean(fields),
        });
        id
    }
}

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Standard objects keep their real key prefix; others get `a00`, `a01`, … in order of first use.
fn key_prefix(sobject: &str, custom: usize) -> String {
    let standard = match sobject {
        "Account" => "001",
        "Contact" => "003",
        "User" => "005",
        "Opportunity" => "006",
        "Lead" => "00Q",
        "Task" => "00T",
        "Case" => "500",
        _ => "",
    };
    if standard.is_empty() {
        format!("a0{}", BASE62[custom % 62] as char)
    } else {
        standard.to_string()
    }
}

/// The 3 characters that make a 15-character id case-insensitive: one per 5-character chunk,
/// whose bits say which characters are upper case.
fn case_suffix(id15: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    id15.as_bytes()
        .chunks(5)
        .map(|chunk| {
            let bits = chunk
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_ascii_uppercase())
                .fold(0usize, |acc, (i, _)| acc | 1 << i);
            ALPHABET[bits] as char
        })
        .collect()
}

/// Indexes of the records whose `field` equals `value` (compared as text, exactly).
pub(crate) fn find_by_field(records: &[SObjectRecord], field: &str, value: &str) -> Vec<usize> {
    let matches = |v: &Value| match v {
        Value::String(s) => s == value,
        Value::Number(n) => n.to_string() == value,
        Value::Bool(b) => b.to_string() == value,
        _ => false,
    };
    records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.fields.get(field).is_some_and(matches))
        .map(|(i, _)| i)
        .collect()
}

/// Drops what is not a field value: `attributes` and `Id`.
pub(crate) fn clean(mut fields: Map<String, Value>) -> Map<String, Value> {
    fields.remove("attributes");
    fields.remove("Id");
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_18_characters_with_the_case_suffix() {
        // A published example: 001A0000006Vm9r → 001A0000006Vm9rIAC.
        assert_eq!(case_suffix("001A0000006Vm9r"), "IAC");
        let mut st = State::new(FakeSalesforceConfig::default());
        let a = st.new_id("Contact");
        let b = st.new_id("Feedback__c");
        assert_eq!(a.len(), 18);
        assert!(a.starts_with("0035g"));
        assert!(b.starts_with("a00"));
        assert_ne!(a[3..15], b[3..15]);
    }
}
