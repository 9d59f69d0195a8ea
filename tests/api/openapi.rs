//! `docs/openapi.json` against the relay: every route the source registers is documented and
//! every documented operation answers; real answers (and the test's own requests) are checked
//! against the document's schemas by the small JSON Schema validator at the end of this file,
//! which panics on any keyword it does not implement, so the document cannot use one unchecked.

use crate::admin::with_id;
use crate::helpers::{bearer, fixture, hmac_headers, spawn_app, spawn_app_with, TestApp};
use fake_centercode::Fault;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const TOKEN: &str = "openapi-admin-token-0123456789abcdef";
const PATH_TOKEN: &str = "openapi-path-token-0123456789";
/// The outbound_message route of the test settings that gets `PATH_TOKEN`.
const TOKEN_ROUTE: &str = "case-feedback";
/// The relay's answer to a path it does not serve.
const NO_SUCH_ENDPOINT: &str = r#"{"error":{"code":"not_found","message":"no such endpoint"}}"#;
/// The operations of an OpenAPI path item.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
/// The files that register the relay's routes (`configure`, `configure_ops`,
/// `admin::configure`, `jobs::configure`), each with the prefix of the scope it is handed
/// (`jobs::configure(web::scope("/admin"))`); a route registered anywhere else in `src/` fails
/// the test.
const ROUTE_FILES: [(&str, &str); 3] = [
    ("src/inbound/mod.rs", ""),
    ("src/admin.rs", ""),
    ("src/admin/jobs.rs", "/admin"),
];

/// Files that register pages for people, not API operations: the console's HTML forms
/// (docs/console.md) are no contract for programs and stay out of the OpenAPI document.
const PAGE_FILES: [&str; 1] = ["src/console/mod.rs"];

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn document_bytes() -> Vec<u8> {
    std::fs::read(repo_file("docs/openapi.json")).expect("docs/openapi.json")
}

fn document() -> Value {
    serde_json::from_slice(&document_bytes()).expect("docs/openapi.json is JSON")
}

/// Every documented operation as (METHOD, path template).
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("the document has paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("a path item is an object");
            item.keys()
                .filter(|key| METHODS.contains(&key.as_str()))
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect()
}

/// The (METHOD, path) pairs a source file registers with actix: `web::scope("/p")` prefixes
/// the `.route("/q", web::get()…)` calls after it, and `web::resource("/r")` names the path of
/// the `.route(web::post()…)` calls after it. Comment lines are skipped.
fn routes_in(source: &str, scope: &str) -> Vec<(String, String)> {
    let text: String = source
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .flat_map(str::chars)
        .filter(|c| !c.is_whitespace())
        .collect();
    let quoted = |s: &str| s[..s.find('"').expect("a closing quote")].to_owned();
    let method = |s: &str| {
        let m: String = s.chars().take_while(char::is_ascii_alphabetic).collect();
        m.to_uppercase()
    };
    let patterns = [
        "web::scope(\"",
        "web::resource(\"",
        ".route(\"",
        ".route(web::",
    ];
    let (mut prefix, mut resource, mut found) = (scope.to_owned(), None, Vec::new());
    let mut rest = text.as_str();
    while let Some((at, pattern)) = patterns
        .iter()
        .filter_map(|p| rest.find(p).map(|at| (at, *p)))
        .min()
    {
        rest = &rest[at + pattern.len()..];
        match pattern {
            "web::scope(\"" => prefix = quoted(rest),
            "web::resource(\"" => resource = Some(quoted(rest)),
            ".route(\"" => {
                let path = quoted(rest);
                let after = &rest[rest.find("web::").expect("a method after the path") + 5..];
                found.push((method(after), format!("{prefix}{path}")));
            }
            _ => {
                let path = resource
                    .clone()
                    .expect("`.route(web::…)` inside a resource");
                found.push((method(rest), path));
            }
        }
    }
    found
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn every_registered_route_is_documented_and_every_documented_operation_is_registered() {
    let read = |f: &str| std::fs::read_to_string(repo_file(f)).unwrap();
    // The scope `src/admin/jobs.rs` is handed, as ROUTE_FILES says.
    assert!(
        read("src/admin.rs").contains("jobs::configure(web::scope(\"/admin\"))"),
        "src/admin.rs no longer hands /admin to jobs::configure: fix ROUTE_FILES"
    );
    let registered: BTreeSet<(String, String)> = ROUTE_FILES
        .iter()
        .flat_map(|(f, scope)| routes_in(&read(f), scope))
        .collect();
    for (method, path) in [
        ("POST", "/salesforce/outbound/{route}/{token}"),
        ("POST", "/salesforce/callout/{route}"),
        ("GET", "/health/live"),
        ("DELETE", "/admin/parked"),
        ("GET", "/admin/openapi.json"),
        ("POST", "/admin/jobs/{id}/resend"),
    ] {
        assert!(
            registered.contains(&(method.to_owned(), path.to_owned())),
            "the route scanner missed {method} {path}: {registered:?}"
        );
    }
    let documented = documented(&document());
    let undocumented: Vec<_> = registered.difference(&documented).collect();
    let unregistered: Vec<_> = documented.difference(&registered).collect();
    assert!(
        undocumented.is_empty(),
        "registered but not in docs/openapi.json: {undocumented:?}"
    );
    assert!(
        unregistered.is_empty(),
        "in docs/openapi.json but not registered: {unregistered:?}"
    );
    let mut files = Vec::new();
    rust_files(&repo_file("src"), &mut files);
    for file in files {
        let name = file.strip_prefix(repo_file("")).unwrap().to_string_lossy();
        if PAGE_FILES.contains(&name.as_ref()) {
            let pages = routes_in(&std::fs::read_to_string(&file).unwrap(), "");
            assert!(
                pages.iter().all(|(_, path)| path.starts_with("/console")),
                "{name} registers routes outside /console: {pages:?}"
            );
            continue;
        }
        if !ROUTE_FILES.iter().any(|(f, _)| *f == name) {
            let routes = routes_in(&std::fs::read_to_string(&file).unwrap(), "");
            assert!(
                routes.is_empty(),
                "{name} registers {routes:?}: add it to ROUTE_FILES and document them"
            );
        }
    }
}

#[test]
fn the_document_is_openapi_3_1_and_uses_only_checked_schema_keywords() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["jsonSchemaDialect"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    // Every schema vetted (unsupported keywords panic), every `$ref` resolved, every example
    // valid against its schema.
    let vetted = Schemas { doc: &doc }.vet_document();
    assert!(vetted >= 40, "only {vetted} schemas found");
    let mut ids = BTreeSet::new();
    for (method, path) in documented(&doc) {
        let op = &doc["paths"][&path][method.to_lowercase()];
        let id = op["operationId"]
            .as_str()
            .expect("every operation has an id");
        assert!(ids.insert(id.to_owned()), "operationId {id} is used twice");
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{method} {path} documents no response"
        );
        assert!(
            op["security"].is_array(),
            "{method} {path} does not say its security"
        );
    }
}

#[test]
fn the_callout_part_for_salesforce_uses_only_openapi_3_0_constructs() {
    let doc = document();
    let schemas = Schemas { doc: &doc };
    let callout = "/salesforce/callout/{route}";
    assert!(doc["info"]["description"]
        .as_str()
        .is_some_and(|d| d.contains(callout) && d.contains("3.0")));
    // The operation and everything it references, transitively.
    let mut pending = vec![&doc["paths"][callout]];
    let mut refs = BTreeSet::new();
    while let Some(node) = pending.pop() {
        match node {
            Value::Object(map) => {
                for (key, value) in map {
                    let three_one_only = [
                        "oneOf",
                        "anyOf",
                        "allOf",
                        "not",
                        "const",
                        "examples",
                        "prefixItems",
                        "unevaluatedProperties",
                        "$defs",
                    ];
                    assert!(
                        !three_one_only.contains(&key.as_str()),
                        "the callout part uses `{key}`, which Salesforce cannot import"
                    );
                    if key == "type" {
                        assert!(
                            value.is_string() && value != "null",
                            "the callout part has type {value}: one non-null type per schema"
                        );
                    }
                    if key == "$ref" && refs.insert(value.as_str().unwrap()) {
                        pending.push(schemas.resolve(value.as_str().unwrap()));
                    }
                    pending.push(value);
                }
            }
            Value::Array(items) => pending.extend(items),
            _ => {}
        }
    }
    assert!(refs.len() >= 3, "{refs:?}");
}

// ---------------------------------------------------------------------------------------
// Against a running relay.

async fn spawn_contract_app() -> TestApp {
    spawn_app_with(|s| {
        s.admin.token = Some(TOKEN.to_owned().into());
        s.ledger.subject_key = "openapi-subject-key".to_owned().into();
        let feedback = s.routes.iter_mut().find(|r| r.name == "feedback");
        feedback
            .expect("the test settings have this route")
            .keep_payload_days = 2;
        let route = s.routes.iter_mut().find(|r| r.name == TOKEN_ROUTE);
        route.expect("the test settings have this route").path_token =
            Some(PATH_TOKEN.to_owned().into());
    })
    .await
}

/// One answer of the relay, already checked against the document.
struct Answer {
    status: u16,
    text: String,
    json: Value,
}

/// Sends requests to documented operations only, checks the request against the document
/// and the answer against the documented response, and records what each operation answered.
struct Contract {
    doc: Value,
    client: reqwest::Client,
    answered: BTreeMap<(String, String), BTreeSet<u16>>,
}

fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn is_default_answer(status: u16, text: &str) -> bool {
    status == 405 || (status == 404 && text == NO_SUCH_ENDPOINT)
}

/// Whether `path` is `template` with its `{parameters}` filled in.
fn instance_of(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}') && !p.is_empty()))
}

impl Contract {
    fn new() -> Self {
        Self {
            doc: document(),
            client: reqwest::Client::new(),
            answered: BTreeMap::new(),
        }
    }

    /// Send `target` (path and query, an instance of `template`), checking the request and
    /// the answer against the document.
    async fn send(
        &mut self,
        base: &str,
        method: &str,
        template: &str,
        target: &str,
        headers: &[(&str, String)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Answer {
        let schemas = Schemas { doc: &self.doc };
        let op = schemas.operation(method, template);
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        assert!(instance_of(template, path), "{path} is not a {template}");
        let parameters: Vec<&Value> = op["parameters"]
            .as_array()
            .map(|ps| ps.iter().map(|p| schemas.deref(p)).collect())
            .unwrap_or_default();
        for name in query.split('&').filter(|p| !p.is_empty()) {
            let name = name.split('=').next().unwrap_or_default();
            assert!(
                parameters
                    .iter()
                    .any(|p| p["in"] == "query" && p["name"] == name),
                "query parameter `{name}` of {method} {template} is not documented"
            );
        }
        // The test's own bodies follow the document, except a media type it does not name.
        let mut refusal_expected = false;
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("{base}{target}"));
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        if let Some((content_type, bytes)) = body {
            let documented = &schemas.deref(&op["requestBody"])["content"];
            match documented.get(media_type(content_type)) {
                Some(media) if media_type(content_type) == "application/json" => {
                    let value: Value = serde_json::from_slice(&bytes).expect("a JSON body");
                    let what = format!("the request body of {method} {template}");
                    schemas.assert_valid(&media["schema"], &value, &what);
                }
                Some(_) => {}
                None => refusal_expected = true,
            }
            req = req.header("Content-Type", content_type).body(bytes);
        }
        let res = req.send().await.expect("request sent");
        let status = res.status().as_u16();
        let header_names: BTreeSet<String> = res
            .headers()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect();
        let content_type = res
            .headers()
            .get("content-type")
            .map(|v| media_type(v.to_str().unwrap()))
            .unwrap_or_default();
        let text = res.text().await.unwrap();
        assert!(
            !is_default_answer(status, &text),
            "{method} {target} is documented but the relay does not serve it: {status} {text}"
        );
        assert!(
            !refusal_expected || status >= 400,
            "{method} {target} accepted an undocumented media type: {status} {text}"
        );
        let response = op["responses"]
            .get(status.to_string())
            .map(|r| schemas.deref(r))
            .unwrap_or_else(|| {
                panic!("{method} {target} answered {status}, not documented: {text}")
            });
        for (name, header) in response["headers"].as_object().into_iter().flatten() {
            assert!(
                header["required"] != true || header_names.contains(&name.to_ascii_lowercase()),
                "{method} {target} answered {status} without the {name} header"
            );
        }
        let json = match response.get("content") {
            None => {
                assert!(
                    text.is_empty(),
                    "{method} {target}: undocumented body {text}"
                );
                Value::Null
            }
            Some(content) => {
                let media = content.get(&content_type).unwrap_or_else(|| {
                    panic!("{method} {target} answered {status} as `{content_type}`, documented: {content}")
                });
                let instance = if content_type == "application/json" {
                    serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("{method} {target}: not JSON ({e}): {text}"))
                } else {
                    Value::String(text.clone())
                };
                let what = format!("the {status} answer of {method} {target}");
                schemas.assert_valid(&media["schema"], &instance, &what);
                instance
            }
        };
        self.answered
            .entry((method.to_owned(), template.to_owned()))
            .or_default()
            .insert(status);
        Answer { status, text, json }
    }

    /// With the admin token, and a JSON body if given.
    async fn admin(
        &mut self,
        app: &TestApp,
        method: &str,
        template: &str,
        target: &str,
        body: Option<Value>,
    ) -> Answer {
        let headers = [("Authorization", format!("Bearer {TOKEN}"))];
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        self.send(&app.address, method, template, target, &headers, body)
            .await
    }
}

fn error_code(answer: &Answer) -> (u16, &str) {
    (
        answer.status,
        answer.json["error"]["code"].as_str().unwrap_or_default(),
    )
}

fn xml(name: &str) -> Option<(&'static str, Vec<u8>)> {
    Some(("text/xml; charset=utf-8", fixture(name)))
}

/// Health, metrics, the Outbound Message paths (parking three jobs), and this document.
async fn exercise_ops_and_outbound(c: &mut Contract, app: &TestApp) {
    let base = app.address.as_str();
    let live = c.send(base, "GET", "/health/live", "/health/live", &[], None);
    assert_eq!(live.await.json, json!({"status": "live"}));
    let ready = c.send(base, "GET", "/health/ready", "/health/ready", &[], None);
    assert_eq!(ready.await.status, 200);
    let metrics = c.send(base, "GET", "/metrics", "/metrics", &[], None).await;
    assert!(metrics.text.contains("relay_ready 1"), "{}", metrics.text);

    // Centercode refuses the next three deliveries: the three jobs of the outbound paths park
    // (later deliveries go through).
    app.centercode.push_fault(Fault {
        status: 400,
        times: 3,
        ..Fault::default()
    });
    let outbound = "/salesforce/outbound/{route}";
    for n in 0..2 {
        let body = Some(("text/xml; charset=utf-8", with_id(n)));
        let ack = c.send(
            base,
            "POST",
            outbound,
            "/salesforce/outbound/gdpr",
            &[],
            body,
        );
        let ack = ack.await;
        assert!(ack.text.contains("<Ack>true</Ack>"), "{}", ack.text);
    }
    let unknown = "/salesforce/outbound/no-such-route";
    let fault = c.send(
        base,
        "POST",
        outbound,
        unknown,
        &[],
        xml("om_case_feedback.xml"),
    );
    assert_eq!(fault.await.status, 404);
    let with_token = "/salesforce/outbound/{route}/{token}";
    let target = format!("/salesforce/outbound/{TOKEN_ROUTE}/{PATH_TOKEN}");
    let body = xml("om_case_feedback.xml");
    let ack = c.send(base, "POST", with_token, &target, &[], body).await;
    assert_eq!(ack.status, 200, "{}", ack.text);
    app.deliver_until_settled().await;
    assert_eq!(app.stats().await.parked, 3);

    // The document, byte for byte.
    let doc = "/admin/openapi.json";
    let served = c.admin(app, "GET", doc, doc, None).await;
    assert_eq!(served.text.as_bytes(), document_bytes().as_slice());
    assert_eq!(served.json["openapi"], "3.1.0");
    let refused = c.send(base, "GET", doc, doc, &[], None).await;
    assert_eq!(error_code(&refused), (401, "unauthorized"));
}

/// Follow the `next_cursor` of `target`'s first page (one job a page): the next page starts
/// with another job.
async fn second_page(c: &mut Contract, app: &TestApp, template: &str, target: &str) {
    let page = c.admin(app, "GET", template, target, None).await.json;
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let next = format!("{target}&cursor={cursor}");
    let next = c.admin(app, "GET", template, &next, None).await.json;
    assert_ne!(next["jobs"][0]["id"], page["jobs"][0]["id"]);
}

/// List, show, replay and purge parked jobs (three parked by `exercise_ops_and_outbound`).
async fn exercise_parked(c: &mut Contract, app: &TestApp) {
    let list = "/admin/parked";
    let all = c.admin(app, "GET", list, list, None).await;
    let jobs = all.json["jobs"].as_array().unwrap().clone();
    assert_eq!((jobs.len(), &all.json["next_cursor"]), (3, &Value::Null));
    let gdpr: Vec<&str> = jobs
        .iter()
        .filter(|j| j["route"] == "gdpr")
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(gdpr.len(), 2);

    second_page(c, app, list, "/admin/parked?route=gdpr&limit=1").await;
    let target = "/admin/parked?action=remove_user&org_id=00D8d000001AbCdEAK&since=0&until=4102444800&reason=400&record_id=003&all=true";
    c.admin(app, "GET", list, target, None).await;
    let target = format!("/admin/parked?ids={},ghost-id", gdpr[0]);
    let matched = c.admin(app, "GET", list, &target, None).await.json;
    assert_eq!(matched["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(matched["unmatched_ids"], json!(["ghost-id"]));

    let show = "/admin/parked/{id}";
    for job in &jobs {
        let target = format!("/admin/parked/{}", job["id"].as_str().unwrap());
        let shown = c.admin(app, "GET", show, &target, None).await.json;
        assert!(shown["request_now"]["text"].is_string(), "{shown}");
    }
    let missing = c
        .admin(app, "GET", show, "/admin/parked/ghost-id", None)
        .await;
    assert_eq!(error_code(&missing), (404, "not_found"));

    let bad = c
        .admin(app, "GET", list, "/admin/parked?limit=lots", None)
        .await;
    assert_eq!(error_code(&bad), (400, "bad_query"));
    let bad = c.admin(app, "GET", list, "/admin/parked?ids=", None).await;
    assert_eq!(error_code(&bad), (400, "bad_ids"));
    let refused = c.send(&app.address, "GET", list, list, &[], None).await;
    assert_eq!(error_code(&refused), (401, "unauthorized"));

    let replay = "/admin/parked/replay";
    let dry = json!({"route": "gdpr", "dry_run": true});
    let dry = c.admin(app, "POST", replay, replay, Some(dry)).await.json;
    assert_eq!(
        (dry["matched"].as_u64(), dry["moved"].as_u64()),
        (Some(2), Some(0))
    );
    let named = json!({"ids": [gdpr[0], "ghost-id"], "dry_run": true});
    let named = c.admin(app, "POST", replay, replay, Some(named)).await.json;
    assert_eq!(named["unmatched_ids"], json!(["ghost-id"]));
    let empty = c.admin(app, "POST", replay, replay, Some(json!({}))).await;
    assert_eq!(error_code(&empty), (400, "no_filter"));
    let real = json!({"ids": [gdpr[0]], "limit": 5});
    let real = c.admin(app, "POST", replay, replay, Some(real)).await.json;
    assert_eq!(
        real,
        json!({"matched": 1, "moved": 1, "dry_run": false, "unmatched_ids": []})
    );

    let unconfirmed = c.admin(app, "DELETE", list, "/admin/parked?route=gdpr", None);
    assert_eq!(error_code(&unconfirmed.await), (400, "confirm_required"));
    let target = format!("/admin/parked?ids={},ghost-id&confirm=true", gdpr[1]);
    let purged = c.admin(app, "DELETE", list, &target, None).await.json;
    assert_eq!(purged, json!({"purged": 1, "unmatched_ids": ["ghost-id"]}));
    assert_eq!(app.stats().await.parked, 1);
}

/// Route listing, pause and resume.
async fn exercise_routes(c: &mut Contract, app: &TestApp) {
    let routes = "/admin/routes";
    let listed = c.admin(app, "GET", routes, routes, None).await.json;
    assert_eq!(
        listed["routes"].as_array().unwrap().len(),
        app.settings.routes.len()
    );
    let pause = "/admin/routes/{route}/pause";
    let paused = c.admin(app, "POST", pause, "/admin/routes/gdpr/pause", None);
    assert_eq!(paused.await.json, json!({"route": "gdpr", "paused": true}));
    let listed = c.admin(app, "GET", routes, routes, None).await.json;
    let mut all = listed["routes"].as_array().unwrap().iter();
    let gdpr = all.find(|r| r["name"] == "gdpr").unwrap();
    // Each live process's view is in the answer (and so checked against the schema).
    assert!(gdpr["processes"].as_array().is_some_and(|p| !p.is_empty()));
    assert_eq!(
        (&gdpr["paused"], &gdpr["changed_by"]),
        (&json!(true), &json!("admin"))
    );
    let resume = "/admin/routes/{route}/resume";
    let resumed = c.admin(app, "POST", resume, "/admin/routes/gdpr/resume", None);
    assert_eq!(
        resumed.await.json,
        json!({"route": "gdpr", "paused": false})
    );
    let unknown = c.admin(app, "POST", pause, "/admin/routes/nope/pause", None);
    assert_eq!(error_code(&unknown.await), (404, "unknown_route"));
}

/// The CSV header of `GET /admin/jobs/export`.
const EXPORT_HEADER: &str = "job_id,route,action,notification_id,record_id,subject_key,received_at,stored_at,completed_at,outcome,centercode_status";

/// List, search, show and resend the ledger's jobs: those of the parks, replay and purge of
/// the steps before, plus one feedback delivered here on a route that keeps payloads (so it
/// can be resent).
async fn exercise_jobs(c: &mut Contract, app: &TestApp) {
    let feedback = app
        .post_outbound("feedback", fixture("om_feedback_custom_object.xml"))
        .await;
    assert_eq!(feedback.status(), 200);
    // The feedback and the replayed removal are delivered; the case feedback stays parked.
    app.deliver_until_settled().await;

    let list = "/admin/jobs";
    let all = c
        .admin(app, "GET", list, "/admin/jobs?limit=50", None)
        .await;
    let jobs = all.json["jobs"].as_array().unwrap().clone();
    assert_eq!((jobs.len(), &all.json["next_cursor"]), (4, &Value::Null));
    let id_where = |route: &str, state: &str| {
        let job = jobs
            .iter()
            .find(|j| j["route"] == route && j["state"] == state);
        let job = job.unwrap_or_else(|| panic!("no {state} job of {route}: {jobs:?}"));
        job["id"].as_str().unwrap().to_owned()
    };
    let delivered_feedback = id_where("feedback", "done");
    let delivered_removal = id_where("gdpr", "done");
    let parked = id_where(TOKEN_ROUTE, "parked");
    id_where("gdpr", "purged");
    assert!(jobs.iter().all(|j| j.get("attempts").is_none()), "{jobs:?}");

    let open = c.admin(app, "GET", list, "/admin/jobs?undelivered=true", None);
    let open = open.await.json;
    assert_eq!(open["jobs"].as_array().unwrap().len(), 1, "{open}");
    assert_eq!(open["jobs"][0]["id"], parked.as_str());
    second_page(c, app, list, "/admin/jobs?route=gdpr&limit=1").await;
    let notification = jobs.iter().find(|j| j["id"] == delivered_removal.as_str());
    let notification = notification.unwrap()["notification_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let target = format!("/admin/jobs?record_id=0038d0000000041AAA&notification_id={notification}&route=gdpr&action=remove_user&outcome=delivered&since=0&until=4102444800&undelivered=false&history=true&limit=5");
    let one = c.admin(app, "GET", list, &target, None).await.json;
    assert_eq!(one["jobs"][0]["id"], delivered_removal.as_str(), "{one}");
    let outcomes = &one["jobs"][0]["outcomes"];
    let names: Vec<&str> = outcomes
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["parked", "replayed", "delivered"]);
    let pending = c.admin(app, "GET", list, "/admin/jobs?outcome=pending", None);
    assert_eq!(pending.await.json["jobs"], json!([]));

    // By e-mail, in the body only; then by the subject key it was hashed into.
    let search = "/admin/jobs/search";
    let body = json!({"email": "Marta.Kowalska@example.org", "history": true});
    let found = c.admin(app, "POST", search, search, Some(body)).await.json;
    let found = found["jobs"].as_array().unwrap().clone();
    assert_eq!(found.len(), 2, "both removals: {found:?}");
    let key = found[0]["subject_key"].as_str().unwrap().to_owned();
    assert_eq!(key.len(), 64);
    let target = format!("/admin/jobs?subject_key={key}");
    let by_key = c.admin(app, "GET", list, &target, None).await.json;
    assert_eq!(by_key["jobs"].as_array().unwrap().len(), 2);
    let body = json!({"email": "nobody@example.org"});
    let nobody = c.admin(app, "POST", search, search, Some(body)).await.json;
    assert_eq!(nobody, json!({"jobs": [], "next_cursor": null}));
    let body = json!({"subject_key": key, "record_id": "0038d0000000041AAA",
        "notification_id": notification, "route": "gdpr", "action": "remove_user",
        "outcome": "delivered", "since": 0, "until": 4_102_444_800_i64, "undelivered": false,
        "history": false, "limit": 10});
    let filtered = c.admin(app, "POST", search, search, Some(body)).await.json;
    assert_eq!(filtered["jobs"][0]["id"], delivered_removal.as_str());
    let body = json!({"email": "not-an-address"});
    let bad = c.admin(app, "POST", search, search, Some(body)).await;
    assert_eq!(error_code(&bad), (400, "bad_body"));
    let body = json!({"route": "gdpr"});
    let unfiltered = c.admin(app, "POST", search, search, Some(body)).await;
    assert_eq!(error_code(&unfiltered), (400, "bad_body"));

    let show = "/admin/jobs/{id}";
    let target = format!("/admin/jobs/{delivered_feedback}");
    let shown = c.admin(app, "GET", show, &target, None).await.json;
    assert_eq!(
        (&shown["payload_kept"], &shown["outcome"]),
        (&json!(true), &json!("delivered"))
    );
    assert_eq!(shown["attempts"][0]["status"], 200, "{shown}");
    let missing = c
        .admin(app, "GET", show, "/admin/jobs/ghost-id", None)
        .await;
    assert_eq!(error_code(&missing), (404, "not_found"));

    // Resend: the kept feedback once; a job not completed, or without a payload, refused.
    let resend = "/admin/jobs/{id}/resend";
    let target = format!("/admin/jobs/{delivered_feedback}/resend");
    let resent = c.admin(app, "POST", resend, &target, None).await;
    assert_eq!(resent.status, 202, "{}", resent.text);
    assert_eq!(resent.json["resent_from"], delivered_feedback.as_str());
    let new_id = resent.json["job_id"].as_str().unwrap().to_owned();
    let target = format!("/admin/jobs/{delivered_feedback}");
    let old = c.admin(app, "GET", show, &target, None).await.json;
    assert_eq!(
        (&old["outcome"], &old["state"]),
        (&json!("resent"), &json!("resent"))
    );
    for (id, code) in [
        (parked.as_str(), "not_completed"),
        (new_id.as_str(), "not_completed"),
        (delivered_removal.as_str(), "payload_not_kept"),
    ] {
        let target = format!("/admin/jobs/{id}/resend");
        let refused = c.admin(app, "POST", resend, &target, None).await;
        assert_eq!(error_code(&refused), (409, code), "{}", refused.text);
    }
    let ghost = c.admin(app, "POST", resend, "/admin/jobs/ghost-id/resend", None);
    assert_eq!(error_code(&ghost.await), (404, "not_found"));
}

/// The export of the five jobs `exercise_jobs` leaves (as CSV, the default, and as JSON), and
/// the refusals of every `/admin/jobs` operation.
async fn exercise_job_export_and_refusals(c: &mut Contract, app: &TestApp) {
    let export = "/admin/jobs/export";
    let csv = c.admin(app, "GET", export, export, None).await.text;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!((lines[0], lines.len()), (EXPORT_HEADER, 1 + 5), "{csv}");
    let target =
        "/admin/jobs/export?action=remove_user&route=gdpr&since=0&until=4102444800&format=json";
    let rows = c.admin(app, "GET", export, target, None).await.json;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter().all(|r| r["completed_at"].is_string()),
        "{rows:?}"
    );
    let csv = c.admin(app, "GET", export, "/admin/jobs/export?format=csv", None);
    assert!(csv.await.text.starts_with(EXPORT_HEADER));

    let list = "/admin/jobs";
    for target in [
        "/admin/jobs?outcome=nonsense",
        "/admin/jobs?since=yesterday",
        "/admin/jobs?cursor=not-a-cursor",
        "/admin/jobs?limit=lots",
    ] {
        let bad = c.admin(app, "GET", list, target, None).await;
        assert_eq!(error_code(&bad), (400, "bad_query"), "{target}");
    }
    let bad = c.admin(app, "GET", export, "/admin/jobs/export?format=xml", None);
    assert_eq!(error_code(&bad.await), (400, "bad_query"));
    let bad = c.admin(
        app,
        "GET",
        export,
        "/admin/jobs/export?since=yesterday",
        None,
    );
    assert_eq!(error_code(&bad.await), (400, "bad_query"));
    for (method, template, target) in [
        ("GET", list, list),
        ("POST", "/admin/jobs/search", "/admin/jobs/search"),
        ("GET", "/admin/jobs/{id}", "/admin/jobs/ghost-id"),
        (
            "POST",
            "/admin/jobs/{id}/resend",
            "/admin/jobs/ghost-id/resend",
        ),
        ("GET", export, export),
    ] {
        let refused = c
            .send(&app.address, method, template, target, &[], None)
            .await;
        assert_eq!(
            error_code(&refused),
            (401, "unauthorized"),
            "{method} {target}"
        );
    }
}

/// With the ledger off, every `/admin/jobs` operation answers 501 `no_ledger`.
async fn exercise_jobs_without_a_ledger(c: &mut Contract) {
    let app = spawn_app_with(|s| {
        s.admin.token = Some(TOKEN.to_owned().into());
        s.ledger.enabled = false;
    })
    .await;
    let body = Some(json!({"email": "marta.kowalska@example.org"}));
    for (method, template, target, body) in [
        ("GET", "/admin/jobs", "/admin/jobs", None),
        ("POST", "/admin/jobs/search", "/admin/jobs/search", body),
        ("GET", "/admin/jobs/{id}", "/admin/jobs/ghost-id", None),
        (
            "POST",
            "/admin/jobs/{id}/resend",
            "/admin/jobs/ghost-id/resend",
            None,
        ),
        ("GET", "/admin/jobs/export", "/admin/jobs/export", None),
    ] {
        let off = c.admin(&app, method, template, target, body).await;
        assert_eq!(error_code(&off), (501, "no_ledger"), "{method} {target}");
    }
}

/// One callout to `route`.
async fn callout(
    c: &mut Contract,
    app: &TestApp,
    route: &str,
    headers: &[(&str, String)],
    content_type: &str,
    body: &[u8],
) -> Answer {
    let target = format!("/salesforce/callout/{route}");
    let body = Some((content_type, body.to_vec()));
    let template = "/salesforce/callout/{route}";
    c.send(&app.address, "POST", template, &target, headers, body)
        .await
}

/// Callouts: queued, duplicate, key reused, and refusals.
async fn exercise_callouts(c: &mut Contract, app: &TestApp) {
    const JSON: &str = "application/json";
    let body = fixture("apex_removal_request.json");
    let first = callout(c, app, "apex-removal", &bearer("k1"), JSON, &body).await;
    assert_eq!(first.json["status"], "queued");
    let again = callout(c, app, "apex-removal", &bearer("k1"), JSON, &body).await;
    assert_eq!(again.json["status"], "duplicate");
    assert_eq!(again.json["job_id"], first.json["job_id"]);
    let other = br#"{"eventId": "other"}"#;
    let reused = callout(c, app, "apex-removal", &bearer("k1"), JSON, other).await;
    assert_eq!(error_code(&reused), (422, "idempotency_key_reused"));
    let anonymous = callout(c, app, "apex-removal", &[], JSON, &body).await;
    assert_eq!(error_code(&anonymous), (401, "unauthorized"));
    let as_text = callout(c, app, "apex-removal", &bearer("k2"), "text/plain", &body).await;
    assert_eq!(error_code(&as_text), (415, "unsupported_media_type"));
    let unknown = callout(c, app, "no-such-route", &bearer("k3"), JSON, &body).await;
    assert_eq!(error_code(&unknown), (404, "unknown_route"));
    let signed = fixture("apex_feedback_submission.json");
    let headers = hmac_headers(&signed, "f1");
    let signed = callout(c, app, "apex-feedback", &headers, JSON, &signed).await;
    assert_eq!(signed.json["status"], "queued");
}

/// One Centercode webhook to `route`, with the right token or none.
async fn webhook(
    c: &mut Contract,
    app: &TestApp,
    route: &str,
    with_token: bool,
    content_type: &str,
    body: &[u8],
) -> Answer {
    let target = format!("/centercode/webhook/{route}");
    let token = [("X-Relay-Token", crate::webhook::TOKEN.to_owned())];
    let headers: &[(&str, String)] = if with_token { &token } else { &[] };
    let body = Some((content_type, body.to_vec()));
    let template = "/centercode/webhook/{route}";
    c.send(&app.address, "POST", template, &target, headers, body)
        .await
}

/// Centercode webhooks, on an app of their own with the webhook routes: queued, duplicate,
/// and refusals.
async fn exercise_webhooks(c: &mut Contract) {
    const JSON: &str = "application/json";
    let app = crate::webhook::spawn_webhook_app(crate::helpers::Backend::Embedded, |_| {}).await;
    let body = crate::webhook::feedback("4711", "2026-03-01T10:00:00Z", "Crash on login");
    let first = webhook(c, &app, "cc-feedback", true, JSON, &body).await;
    assert_eq!(first.json["status"], "queued");
    let again = webhook(c, &app, "cc-feedback", true, JSON, &body).await;
    assert_eq!(again.json["status"], "duplicate");
    let anonymous = webhook(c, &app, "cc-feedback", false, JSON, &body).await;
    assert_eq!(error_code(&anonymous), (401, "unauthorized"));
    let form_type = "application/x-www-form-urlencoded";
    let form = webhook(c, &app, "cc-feedback", true, form_type, b"id=4711").await;
    assert_eq!(error_code(&form), (415, "unsupported_media_type"));
    let unkeyed = br#"{"feedback": {"id": "4711"}}"#;
    let unkeyed = webhook(c, &app, "cc-feedback", true, JSON, unkeyed).await;
    assert_eq!(error_code(&unkeyed), (400, "dedupe_value_missing"));
    let unknown = webhook(c, &app, "apex-removal", true, JSON, &body).await;
    assert_eq!(error_code(&unknown), (404, "unknown_route"));
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let mut c = Contract::new();
    let app = spawn_contract_app().await;
    exercise_ops_and_outbound(&mut c, &app).await;
    exercise_parked(&mut c, &app).await;
    exercise_routes(&mut c, &app).await;
    exercise_jobs(&mut c, &app).await;
    exercise_job_export_and_refusals(&mut c, &app).await;
    exercise_jobs_without_a_ledger(&mut c).await;
    exercise_callouts(&mut c, &app).await;
    exercise_webhooks(&mut c).await;
    // The admin API turned off: every admin path answers 404 `admin_disabled`.
    let off = spawn_app().await;
    let doc = "/admin/openapi.json";
    let disabled = c.send(&off.address, "GET", doc, doc, &[], None).await;
    assert_eq!(error_code(&disabled), (404, "admin_disabled"));

    let documented = documented(&c.doc);
    let answered: BTreeSet<(String, String)> = c.answered.keys().cloned().collect();
    let never: Vec<_> = documented.difference(&answered).collect();
    assert!(
        never.is_empty(),
        "documented but never exercised: {never:?}"
    );
    assert!(c.answered.len() >= 19, "{:?}", c.answered);
}

#[tokio::test]
async fn methods_the_document_does_not_name_get_the_default_404_or_405() {
    let app = spawn_contract_app().await;
    let doc = document();
    let documented = documented(&doc);
    let send = |method: &str, path: String| {
        let req = app
            .client
            .request(method.parse().unwrap(), format!("{}{path}", app.address));
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    // The check is not vacuous: an unknown path gets exactly this answer.
    let (status, text) = send("GET", "/no/such/path".into()).await;
    assert!(is_default_answer(status, &text), "{status} {text}");
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in paths {
        let filled: Vec<&str> = path
            .split('/')
            .map(|s| {
                if s.starts_with('{') {
                    "x0123456789abcdef"
                } else {
                    s
                }
            })
            .collect();
        let filled = filled.join("/");
        for method in METHODS.map(str::to_uppercase) {
            // `GET /admin/parked/replay` is `GET /admin/parked/{id}`: documented.
            let answered_by = documented
                .iter()
                .find(|(m, template)| *m == method && instance_of(template, &filled));
            if answered_by.is_some() {
                continue;
            }
            let (status, text) = send(&method, filled.clone()).await;
            // A HEAD answer has no body to compare.
            let default = is_default_answer(status, &text) || (method == "HEAD" && status == 404);
            assert!(
                default,
                "{method} {filled} answers {status} but is not documented: {text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The JSON Schema validator.

/// The document's schemas, JSON Schema 2020-12 with only the keywords `check` implements;
/// any other keyword, `type` name or `format` panics.
struct Schemas<'a> {
    doc: &'a Value,
}

impl<'a> Schemas<'a> {
    /// A `$ref` within the document (`#/components/schemas/Name`, …).
    fn resolve(&self, reference: &str) -> &'a Value {
        reference
            .strip_prefix('#')
            .and_then(|pointer| self.doc.pointer(pointer))
            .unwrap_or_else(|| panic!("`$ref` {reference} does not resolve in the document"))
    }

    /// A parameter, request body or response, following its `$ref`.
    fn deref(&self, node: &'a Value) -> &'a Value {
        match node.get("$ref") {
            Some(reference) => self.resolve(reference.as_str().expect("a string `$ref`")),
            None => node,
        }
    }

    fn operation(&self, method: &str, template: &str) -> &'a Value {
        self.doc["paths"][template]
            .get(method.to_lowercase())
            .unwrap_or_else(|| panic!("{method} {template} is not documented"))
    }

    fn errors(&self, schema: &Value, instance: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.check(schema, instance, "$", &mut errors);
        errors
    }

    fn assert_valid(&self, schema: &Value, instance: &Value, what: &str) {
        let errors = self.errors(schema, instance);
        assert!(
            errors.is_empty(),
            "{what} does not match its schema:\n  {}\n{instance:#}",
            errors.join("\n  ")
        );
    }

    fn check(&self, schema: &Value, instance: &Value, at: &str, errors: &mut Vec<String>) {
        let keywords = match schema {
            Value::Bool(true) => return,
            Value::Bool(false) => return errors.push(format!("{at}: no value is allowed here")),
            Value::Object(keywords) => keywords,
            other => panic!("{at}: a schema is an object or a boolean, not {other}"),
        };
        for (keyword, value) in keywords {
            match keyword.as_str() {
                "$ref" => {
                    let target = self.resolve(value.as_str().expect("a string `$ref`"));
                    self.check(target, instance, at, errors);
                }
                "type" => {
                    let names: Vec<&str> = match value {
                        Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
                        other => vec![other.as_str().expect("`type` is a name or a list")],
                    };
                    // Every name is looked at, so an unknown one panics even after a match.
                    let matches: Vec<bool> = names.iter().map(|t| has_type(instance, t)).collect();
                    if !matches.contains(&true) {
                        let expected = names.join(" or ");
                        errors.push(format!("{at}: expected {expected}, found {instance}"));
                    }
                }
                "enum" => {
                    if !value
                        .as_array()
                        .expect("`enum` is a list")
                        .contains(instance)
                    {
                        errors.push(format!("{at}: {instance} is not one of {value}"));
                    }
                }
                "const" => {
                    if value != instance {
                        errors.push(format!("{at}: expected {value}, found {instance}"));
                    }
                }
                "properties" => {
                    let properties = value.as_object().expect("`properties` is an object");
                    for (name, v) in instance.as_object().into_iter().flatten() {
                        if let Some(property) = properties.get(name) {
                            self.check(property, v, &format!("{at}.{name}"), errors);
                        }
                    }
                }
                "required" => {
                    if let Some(object) = instance.as_object() {
                        for name in value.as_array().expect("`required` is a list") {
                            let name = name.as_str().expect("property names are strings");
                            if !object.contains_key(name) {
                                errors.push(format!("{at}: missing required property `{name}`"));
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    let declared = keywords.get("properties").and_then(Value::as_object);
                    for (name, v) in instance.as_object().into_iter().flatten() {
                        if declared.is_some_and(|d| d.contains_key(name)) {
                            continue;
                        }
                        match value {
                            Value::Bool(false) => {
                                errors.push(format!("{at}: unexpected property `{name}`"))
                            }
                            other => self.check(other, v, &format!("{at}.{name}"), errors),
                        }
                    }
                }
                "items" => {
                    for (i, item) in instance.as_array().into_iter().flatten().enumerate() {
                        self.check(value, item, &format!("{at}[{i}]"), errors);
                    }
                }
                "minItems" | "maxItems" => {
                    if let Some(items) = instance.as_array() {
                        bound(keyword, value, items.len() as f64, at, errors);
                    }
                }
                "minLength" | "maxLength" => {
                    if let Some(text) = instance.as_str() {
                        bound(keyword, value, text.chars().count() as f64, at, errors);
                    }
                }
                "minimum" | "maximum" => {
                    if let Some(number) = instance.as_f64() {
                        bound(keyword, value, number, at, errors);
                    }
                }
                "format" => {
                    let valid: fn(&str) -> bool = match value.as_str() {
                        Some("date-time") => is_date_time,
                        other => panic!("{at}: unsupported format {other:?}"),
                    };
                    if instance.as_str().is_some_and(|s| !valid(s)) {
                        errors.push(format!("{at}: {instance} is not a {value}"));
                    }
                }
                "allOf" => {
                    for sub in value.as_array().expect("`allOf` is a list") {
                        self.check(sub, instance, at, errors);
                    }
                }
                "oneOf" => {
                    let subs = value.as_array().expect("`oneOf` is a list");
                    let matching = subs
                        .iter()
                        .filter(|sub| self.errors(sub, instance).is_empty())
                        .count();
                    if matching != 1 {
                        errors.push(format!("{at}: matches {matching} oneOf schemas, not 1"));
                    }
                }
                "description" | "title" => {}
                other => panic!("{at}: unsupported schema keyword `{other}`"),
            }
        }
    }

    /// Panics on an unsupported keyword anywhere in `schema`, not only where a value goes.
    fn vet(&self, schema: &Value, at: &str) {
        self.check(schema, &Value::Null, at, &mut Vec::new());
        for (keyword, value) in schema.as_object().into_iter().flatten() {
            match (keyword.as_str(), value) {
                ("properties", Value::Object(properties)) => {
                    for (name, sub) in properties {
                        self.vet(sub, &format!("{at}/properties/{name}"));
                    }
                }
                ("additionalProperties" | "items", sub) => {
                    self.vet(sub, &format!("{at}/{keyword}"));
                }
                ("allOf" | "oneOf", Value::Array(subs)) => {
                    for (i, sub) in subs.iter().enumerate() {
                        self.vet(sub, &format!("{at}/{keyword}/{i}"));
                    }
                }
                _ => {}
            }
        }
    }

    /// Vet every schema of the document (`components/schemas` and every `schema`), resolve
    /// every `$ref`, and check every `example` against its schema; returns how many schemas.
    fn vet_document(&self) -> usize {
        let mut count = 0;
        self.walk(self.doc, "#", &mut count);
        count
    }

    fn walk(&self, node: &Value, at: &str, count: &mut usize) {
        match node {
            Value::Object(map) => {
                if let Some(reference) = map.get("$ref") {
                    self.resolve(reference.as_str().expect("a string `$ref`"));
                }
                if let (Some(schema), Some(example)) = (map.get("schema"), map.get("example")) {
                    self.assert_valid(schema, example, &format!("the example at {at}"));
                }
                for (key, value) in map {
                    let here = format!("{at}/{key}");
                    if key == "schema" || at == "#/components/schemas" {
                        self.vet(value, &here);
                        *count += 1;
                    } else {
                        self.walk(value, &here, count);
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.walk(item, &format!("{at}/{i}"), count);
                }
            }
            _ => {}
        }
    }
}

fn has_type(instance: &Value, name: &str) -> bool {
    match name {
        "null" => instance.is_null(),
        "boolean" => instance.is_boolean(),
        "string" => instance.is_string(),
        "number" => instance.is_number(),
        "integer" => {
            instance.is_i64()
                || instance.is_u64()
                || instance.as_f64().is_some_and(|n| n.fract() == 0.0)
        }
        "array" => instance.is_array(),
        "object" => instance.is_object(),
        other => panic!("unsupported type `{other}`"),
    }
}

/// `minimum`, `maxItems`, …: a lower bound when the keyword starts with `min`.
fn bound(keyword: &str, limit: &Value, actual: f64, at: &str, errors: &mut Vec<String>) {
    let limit = limit
        .as_f64()
        .unwrap_or_else(|| panic!("`{keyword}` is a number"));
    let ok = if keyword.starts_with("min") {
        actual >= limit
    } else {
        actual <= limit
    };
    if !ok {
        errors.push(format!("{at}: {actual} is outside {keyword} {limit}"));
    }
}

/// RFC 3339 date-time: `2024-05-14T09:21:07.123Z`, `2024-05-14T11:21:07+02:00`.
fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |from: usize, to: usize| {
        b.get(from..to)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let at = |i: usize, c: u8| b.get(i).is_some_and(|x| x.eq_ignore_ascii_case(&c));
    let date_time = digits(0, 4)
        && at(4, b'-')
        && digits(5, 7)
        && at(7, b'-')
        && digits(8, 10)
        && at(10, b'T')
        && digits(11, 13)
        && at(13, b':')
        && digits(14, 16)
        && at(16, b':')
        && digits(17, 19);
    if !date_time {
        return false;
    }
    let mut zone = 19;
    if at(19, b'.') {
        let fraction = b[20..].iter().take_while(|d| d.is_ascii_digit()).count();
        if fraction == 0 {
            return false;
        }
        zone = 20 + fraction;
    }
    let offset = (at(zone, b'+') || at(zone, b'-'))
        && digits(zone + 1, zone + 3)
        && at(zone + 3, b':')
        && digits(zone + 4, zone + 6)
        && b.len() == zone + 6;
    (at(zone, b'Z') && b.len() == zone + 1) || offset
}

fn sample_document() -> Value {
    json!({"components": {"schemas": {"Job": {
        "type": "object",
        "required": ["id", "attempts"],
        "additionalProperties": false,
        "properties": {
            "id": {"type": "string"},
            "attempts": {"type": "integer", "minimum": 0},
            "status": {"type": ["integer", "null"]},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
            "at": {"type": "string", "format": "date-time"},
            "kind": {"const": "job"}
        }
    }}}})
}

#[test]
fn the_validator_rejects_a_wrong_type_a_missing_property_and_an_unexpected_one() {
    let doc = sample_document();
    let schemas = Schemas { doc: &doc };
    let job = json!({"$ref": "#/components/schemas/Job"});
    let valid = json!({"id": "j1", "attempts": 2, "status": null, "tags": ["a"],
        "at": "2024-05-14T09:21:07.123Z", "kind": "job"});
    assert_eq!(schemas.errors(&job, &valid), Vec::<String>::new());
    assert_eq!(
        schemas.errors(&job, &json!({"id": 7, "attempts": 2})),
        ["$.id: expected string, found 7"]
    );
    assert_eq!(
        schemas.errors(&job, &json!({"id": "j1"})),
        ["$: missing required property `attempts`"]
    );
    assert_eq!(
        schemas.errors(&job, &json!({"id": "j1", "attempts": 1, "extra": true})),
        ["$: unexpected property `extra`"]
    );
    // The other keywords the document relies on.
    let wrong = json!({"id": "j1", "attempts": -1, "status": "x", "tags": ["a", "c", "b"],
        "at": "2024-05-14 09:21", "kind": "other"});
    let mut errors = schemas.errors(&job, &wrong);
    errors.sort();
    assert_eq!(
        errors,
        [
            "$.at: \"2024-05-14 09:21\" is not a \"date-time\"",
            "$.attempts: -1 is outside minimum 0",
            "$.kind: expected \"job\", found \"other\"",
            "$.status: expected integer or null, found \"x\"",
            "$.tags: 3 is outside maxItems 2",
            "$.tags[1]: \"c\" is not one of [\"a\",\"b\"]",
        ]
    );
    let one_of = json!({"oneOf": [{"required": ["text"]}, {"required": ["error"]}]});
    assert!(schemas.errors(&one_of, &json!({"text": "t"})).is_empty());
    assert_eq!(schemas.errors(&one_of, &json!({})).len(), 1);
    assert!(is_date_time("2024-05-14T11:21:07+02:00") && !is_date_time("2024-05-14T11:21:07"));
}

#[test]
#[should_panic(expected = "unsupported schema keyword `pattern`")]
fn the_validator_refuses_a_keyword_it_does_not_check() {
    let doc = sample_document();
    Schemas { doc: &doc }.vet(&json!({"type": "string", "pattern": "^a"}), "#");
}
