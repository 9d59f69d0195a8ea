//! The data API under `/services/data/vNN.N/`: bearer check, scripted faults, API usage and its
//! `Sforce-Limit-Info` header, then upsert / update / Collections upsert / reads on the records.

use std::time::{Duration, Instant};

use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::faults::{error_body, RecordRule, INVALID_SESSION, LIMIT_EXCEEDED, NOT_FOUND};
use crate::state::{clean, find_by_field, ApiUsage, RecordedWrite, SObjectRecord, Shared, State};

/// Most records one sObject Collections request may carry.
pub const MAX_COLLECTION_RECORDS: usize = 200;

const LIMIT_INFO_HEADER: &str = "Sforce-Limit-Info";
const CALL_OPTIONS_HEADER: &str = "Sforce-Call-Options";
const ROLLED_BACK: &str =
    "Record rolled back because not all records were valid and the request was using AllOrNone header";

/// An answer of the data API, before the `Sforce-Limit-Info` header is added.
struct Reply {
    status: u16,
    /// `None` for 204.
    body: Option<Value>,
}

impl Reply {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: Some(body),
        }
    }

    fn error(status: u16, (code, message): (&str, &str)) -> Self {
        Self::json(status, error_body(code, message, &[]))
    }

    fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }
}

/// Records a write when dropped, so a call cut short by a server stop is still listed, with
/// status 0.
struct WriteGuard<'a> {
    shared: &'a Shared,
    seq: u64,
    write: Option<RecordedWrite>,
}

impl WriteGuard<'_> {
    fn finish(&mut self, status: u16) {
        if let Some(write) = self.write.as_mut() {
            write.status = status;
        }
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if let Some(write) = self.write.take() {
            self.shared.record_write(self.seq, write);
        }
    }
}

pub(crate) async fn data_api(
    req: HttpRequest,
    body: web::Bytes,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let started = Instant::now();
    let (seq, latency) = {
        let mut st = shared.lock();
        (st.arrive(), Duration::from_millis(st.config.latency_ms))
    };
    let mut guard = WriteGuard {
        shared: &shared,
        seq,
        write: (req.method() != Method::GET).then(|| RecordedWrite {
            method: req.method().to_string(),
            path: req.path().to_string(),
            query: req.query_string().to_string(),
            call_options: req
                .headers()
                .get(CALL_OPTIONS_HEADER)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            status: 0,
        }),
    };
    tokio::time::sleep_until((started + latency).into()).await;
    let reply = answer(&shared, &req, &body).await;
    guard.finish(reply.status);
    let usage = shared.lock().usage;
    let mut resp = HttpResponse::build(
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    );
    resp.insert_header((LIMIT_INFO_HEADER, usage.header()));
    match reply.body {
        Some(body) => resp.json(body),
        None => resp.finish(),
    }
}

/// Bearer token, then a queued fault, then the allocation, then the resource.
async fn answer(shared: &Shared, req: &HttpRequest, body: &[u8]) -> Reply {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let fault = {
        let mut st = shared.lock();
        if !token.is_some_and(|t| st.token_is_live(t.trim())) {
            return Reply::error(401, INVALID_SESSION);
        }
        st.take_fault(req.path())
    };
    if let Some(fault) = fault {
        if let Some((status, body, counted)) = fault.kind.play().await {
            if counted {
                shared.lock().usage.used += 1;
            }
            return Reply::json(status, body);
        }
    }
    let mut st = shared.lock();
    if st.usage.used >= st.usage.allocation {
        return Reply::error(403, LIMIT_EXCEEDED);
    }
    st.usage.used += 1;
    route(&mut st, req, body)
}

fn route(st: &mut State, req: &HttpRequest, body: &[u8]) -> Reply {
    let rest = req.path().strip_prefix("/services/data/").unwrap_or("");
    let segments: Vec<String> = rest
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let Some((version, segments)) = segments.split_first() else {
        return Reply::error(404, NOT_FOUND);
    };
    if !version_ok(version, st.config.min_api_version) || segments.iter().any(String::is_empty) {
        return Reply::error(404, NOT_FOUND);
    }
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method();
    let get = method == Method::GET;
    let patch = method == Method::PATCH;
    let update_only = req
        .query_string()
        .split('&')
        .any(|p| p == "updateOnly=true");
    match segs[..] {
        ["limits"] if get => limits(st.usage),
        ["sobjects", sobject, id] if get => match st.find_by_id(sobject, id) {
            Some(i) => Reply::json(200, record_json(version, sobject, &st.records(sobject)[i])),
            None => Reply::error(404, NOT_FOUND),
        },
        ["sobjects", sobject, id] if patch => {
            with_object(body, |fields| update_by_id(st, sobject, id, fields))
        }
        ["sobjects", sobject, field, value] if get => {
            let hits = find_by_field(st.records(sobject), field, value);
            match hits[..] {
                [] => Reply::error(404, NOT_FOUND),
                [i] => Reply::json(200, record_json(version, sobject, &st.records(sobject)[i])),
                _ => Reply::json(300, urls(version, sobject, st.records(sobject), &hits)),
            }
        }
        ["sobjects", sobject, field, value] if patch => with_object(body, |fields| {
            upsert_one(st, version, sobject, field, value, fields, update_only)
        }),
        ["composite", "sobjects", sobject, field] if patch => {
            upsert_collection(st, sobject, field, body)
        }
        ["limits"]
        | ["sobjects", _, _]
        | ["sobjects", _, _, _]
        | ["composite", "sobjects", _, _] => {
            let message = format!("HTTP Method '{method}' not allowed. Allowed are GET,PATCH");
            Reply::error(405, ("METHOD_NOT_ALLOWED", &message))
        }
        _ => Reply::error(404, NOT_FOUND),
    }
}

/// `vNN.N` with NN at least `min_major`.
fn version_ok(version: &str, min_major: u32) -> bool {
    let Some((major, minor)) = version.strip_prefix('v').and_then(|v| v.split_once('.')) else {
        return false;
    };
    !minor.is_empty()
        && minor.bytes().all(|b| b.is_ascii_digit())
        && major.parse::<u32>().is_ok_and(|m| m >= min_major)
}

fn limits(usage: ApiUsage) -> Reply {
    Reply::json(
        200,
        json!({"DailyApiRequests": {
            "Max": usage.allocation,
            "Remaining": usage.allocation.saturating_sub(usage.used),
        }}),
    )
}

fn record_url(version: &str, sobject: &str, id: &str) -> String {
    format!("/services/data/{version}/sobjects/{sobject}/{id}")
}

fn record_json(version: &str, sobject: &str, record: &SObjectRecord) -> Value {
    let mut out = Map::new();
    out.insert(
        "attributes".into(),
        json!({"type": sobject, "url": record_url(version, sobject, &record.id)}),
    );
    out.insert("Id".into(), Value::String(record.id.clone()));
    out.extend(record.fields.clone());
    Value::Object(out)
}

fn urls(version: &str, sobject: &str, records: &[SObjectRecord], hits: &[usize]) -> Value {
    hits.iter()
        .map(|&i| Value::String(record_url(version, sobject, &records[i].id)))
        .collect()
}

/// Runs `then` on a JSON object body, or answers 400 `JSON_PARSER_ERROR`.
fn with_object(body: &[u8], then: impl FnOnce(Map<String, Value>) -> Reply) -> Reply {
    match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => then(fields),
        Ok(_) => Reply::error(
            400,
            (
                "JSON_PARSER_ERROR",
                "Cannot deserialize instance of sObject from a value that is not an object",
            ),
        ),
        Err(e) => Reply::error(
            400,
            ("JSON_PARSER_ERROR", &format!("Unexpected input: {e}")),
        ),
    }
}

fn update_by_id(st: &mut State, sobject: &str, id: &str, fields: Map<String, Value>) -> Reply {
    let Some(i) = st.find_by_id(sobject, id) else {
        return Reply::error(404, NOT_FOUND);
    };
    st.records_mut(sobject)[i].fields.extend(clean(fields));
    Reply::no_content()
}

/// Why one upsert did not happen.
enum UpsertError {
    /// A record rule fired.
    Rule(Box<RecordRule>),
    /// Several records carry the external id: their indexes.
    Duplicates(Vec<usize>),
    /// `updateOnly=true` and no record matches.
    NoMatch,
}

/// Creates or updates the record of `table` whose `field` is `value`; `(id, created)`.
fn upsert(
    st: &mut State,
    table: &mut Vec<SObjectRecord>,
    sobject: &str,
    field: &str,
    value: &str,
    mut fields: Map<String, Value>,
    update_only: bool,
) -> Result<(String, bool), UpsertError> {
    if let Some(rule) = st.take_rule(sobject, value) {
        return Err(UpsertError::Rule(Box::new(rule)));
    }
    let hits = find_by_field(table, field, value);
    match hits[..] {
        [] if update_only => Err(UpsertError::NoMatch),
        [] => {
            fields
                .entry(field.to_string())
                .or_insert_with(|| Value::String(value.to_string()));
            let id = st.new_id(sobject);
            table.push(SObjectRecord {
                id: id.clone(),
                fields: clean(fields),
            });
            Ok((id, true))
        }
        [i] => {
            table[i].fields.extend(clean(fields));
            Ok((table[i].id.clone(), false))
        }
        _ => Err(UpsertError::Duplicates(hits)),
    }
}

fn upsert_one(
    st: &mut State,
    version: &str,
    sobject: &str,
    field: &str,
    value: &str,
    fields: Map<String, Value>,
    update_only: bool,
) -> Reply {
    if fields.contains_key(field) {
        let message = format!("The external ID field {field} must not be set in the request body");
        return Reply::json(
            400,
            error_body("INVALID_FIELD", &message, &[field.to_string()]),
        );
    }
    let mut table = std::mem::take(st.records_mut(sobject));
    let outcome = upsert(st, &mut table, sobject, field, value, fields, update_only);
    let reply = match outcome {
        Ok((id, created)) => Reply::json(
            if created { 201 } else { 200 },
            json!({"id": id, "success": true, "errors": [], "created": created}),
        ),
        Err(UpsertError::Rule(rule)) => Reply::json(
            400,
            error_body(&rule.error_code, &rule.message, &rule.fields),
        ),
        Err(UpsertError::Duplicates(hits)) => {
            Reply::json(300, urls(version, sobject, &table, &hits))
        }
        Err(UpsertError::NoMatch) => Reply::error(404, NOT_FOUND),
    };
    *st.records_mut(sobject) = table;
    reply
}

#[derive(Deserialize)]
struct CollectionBody {
    #[serde(default, rename = "allOrNone")]
    all_or_none: bool,
    records: Vec<Value>,
}

fn upsert_collection(st: &mut State, sobject: &str, field: &str, body: &[u8]) -> Reply {
    let request: CollectionBody = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return Reply::error(
                400,
                ("JSON_PARSER_ERROR", &format!("Unexpected input: {e}")),
            )
        }
    };
    if request.records.len() > MAX_COLLECTION_RECORDS {
        return Reply::error(
            400,
            (
                "EXCEEDED_ID_LIMIT",
                "record limit reached. cannot submit more than 200 records into this call",
            ),
        );
    }
    let external_id = |record: &Value| match record.get(field) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(v @ Value::Number(_)) => Some(v.to_string()),
        _ => None,
    };
    // A record Salesforce cannot read refuses the whole request before anything is written.
    let unreadable = request
        .records
        .iter()
        .filter_map(external_id)
        .find_map(|value| {
            st.rules
                .iter()
                .find(|r| r.whole_call && r.matches(sobject, &value))
                .cloned()
        });
    if let Some(rule) = unreadable {
        return Reply::json(
            400,
            error_body(&rule.error_code, &rule.message, &rule.fields),
        );
    }
    // Salesforce refuses every record of a call whose external id appears twice in it.
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    for id in request.records.iter().filter_map(external_id) {
        *seen.entry(id).or_default() += 1;
    }
    // Worked on a copy, so allOrNone can drop every change at once.
    let mut table = st.records(sobject).to_vec();
    let outcomes: Vec<Result<(String, bool), Value>> = request
        .records
        .into_iter()
        .map(|record| {
            if let Some(id) = external_id(&record).filter(|id| seen[id] > 1) {
                let message = format!("Duplicate external id specified: {id}");
                return Err(record_error("DUPLICATE_VALUE", &message, &[field]));
            }
            let fields = match record {
                Value::Object(fields) => fields,
                _ => {
                    return Err(record_error(
                        "JSON_PARSER_ERROR",
                        "record is not an object",
                        &[],
                    ))
                }
            };
            let value = match fields.get(field) {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(v @ Value::Number(_)) => v.to_string(),
                _ => {
                    let message = format!("Required fields are missing: [{field}]");
                    return Err(record_error("REQUIRED_FIELD_MISSING", &message, &[field]));
                }
            };
            upsert(st, &mut table, sobject, field, &value, fields, false).map_err(|e| match e {
                UpsertError::Rule(rule) => {
                    let fields: Vec<&str> = rule.fields.iter().map(String::as_str).collect();
                    record_error(&rule.error_code, &rule.message, &fields)
                }
                UpsertError::Duplicates(hits) => {
                    let ids: Vec<&str> = hits.iter().map(|&i| table[i].id.as_str()).collect();
                    let message = format!(
                        "{field}: more than one record found for external id field: [{}]",
                        ids.join(", ")
                    );
                    record_error("DUPLICATE_EXTERNAL_ID", &message, &[])
                }
                UpsertError::NoMatch => record_error(NOT_FOUND.0, NOT_FOUND.1, &[]),
            })
        })
        .collect();
    let failed = outcomes.iter().any(Result::is_err);
    let rolled_back = request.all_or_none && failed;
    if !rolled_back {
        *st.records_mut(sobject) = table;
    }
    let results: Vec<Value> = outcomes
        .into_iter()
        .map(|outcome| match outcome {
            Ok((id, created)) if !rolled_back => {
                json!({"id": id, "success": true, "errors": [], "created": created})
            }
            Ok(_) => failure(record_error(
                "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                ROLLED_BACK,
                &[],
            )),
            Err(error) => failure(error),
        })
        .collect();
    Reply::json(200, Value::Array(results))
}

fn record_error(code: &str, message: &str, fields: &[&str]) -> Value {
    json!({"statusCode": code, "message": message, "fields": fields})
}

fn failure(error: Value) -> Value {
    json!({"id": null, "success": false, "errors": [error], "created": false})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_are_vnn_dot_n() {
        assert!(version_ok("v62.0", 31));
        assert!(!version_ok("v30.0", 31));
        assert!(!version_ok("62.0", 31));
        assert!(!version_ok("v62", 31));
        assert!(!version_ok("v62.x", 31));
    }
}
