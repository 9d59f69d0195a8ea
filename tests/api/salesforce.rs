//! Centercode → Salesforce and the status write-back, over real HTTP against the fake
//! Salesforce (and the fake Centercode), on both queue backends: JWT bearer and
//! client-credentials sign-in, refusals parked with what to check, a token expiring mid-run,
//! `REQUEST_LIMIT_EXCEEDED` and the API share holding writes without an attempt, Collections
//! upserts with per-record failures, and the outcome written back onto the Contact.

use crate::helpers::*;
use fake_salesforce::faults::{Fault, FaultKind, RecordRule};
use fake_salesforce::{test_keys, FakeSalesforce, FakeSalesforceConfig};
use serde_json::{json, Value};
use sf_centercode_relay::queue::{now_ms, Job, NewJob};
use sf_centercode_relay::settings::{
    Action, RouteSettings, SalesforceSettings, Settings, StatusWriteback,
};
use sf_centercode_relay::worker::Outcome;
use std::time::{Duration, Instant};

pub const WEBHOOK_TOKEN: &str = "webhook-token-0123456789abcdef";

/// How the relay signs in to the fake.
#[derive(Clone, Copy)]
pub enum SignIn {
    Jwt,
    ClientCredentials,
}

/// `[salesforce]` for the fake at `base`.
pub fn salesforce_settings(base: &str, sign_in: SignIn) -> SalesforceSettings {
    let auth = match sign_in {
        SignIn::Jwt => format!(
            "username = \"{}\"\nprivate_key = '''{}'''",
            test_keys::USERNAME,
            test_keys::PRIVATE_KEY_PEM
        ),
        SignIn::ClientCredentials => format!("client_secret = \"{}\"", test_keys::CLIENT_SECRET),
    };
    toml::from_str(&format!(
        "login_url = \"{base}\"\nclient_id = \"{}\"\n{auth}\napi_version = \"61.0\"\nlimit_wait_secs = 1\ntimeout_ms = 2000",
        test_keys::CLIENT_ID
    ))
    .expect("salesforce settings")
}

/// The `cc-feedback` webhook route of the issue.
pub fn webhook_route() -> RouteSettings {
    toml::from_str(&format!(
        r#"
name = "cc-feedback"
kind = "centercode_webhook"
action = "salesforce_upsert"
sobject = "Centercode_Feedback__c"
external_id_field = "Centercode_Id__c"
external_id = "/feedback/id"
dedupe = ["/feedback/id", "/feedback/modified"]
auth = {{ header = "X-Relay-Token", token = "{WEBHOOK_TOKEN}" }}
[fields]
Title__c = {{ from = "/feedback/title", required = true, max_len = 255 }}
Status__c = {{ from = "/feedback/status", map = {{ "In Progress" = "Working" }}, default = "New" }}
"#
    ))
    .expect("webhook route")
}

/// Add the org and the webhook route to the test settings.
pub fn with_salesforce(settings: &mut Settings, base: &str, sign_in: SignIn) {
    settings.salesforce = Some(salesforce_settings(base, sign_in));
    settings.routes.push(webhook_route());
}

/// A feedback as a Centercode macro would send it.
pub fn feedback(id: &str, title: &str, status: &str) -> Value {
    json!({"feedback": {"id": id, "title": title, "status": status, "modified": "2026-12-01T10:00:00Z"}})
}

/// Store a webhook job directly (the gateway's own tests are in webhook.rs).
async fn store(app: &TestApp, body: Value) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let record_id = body
        .pointer("/feedback/id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    app.queue
        .enqueue(vec![NewJob {
            received_at_ms: now_ms(),
            id: id.clone(),
            route: "cc-feedback".into(),
            action: Action::SalesforceUpsert,
            dedupe_key: None,
            body_hash: None,
            org_id: None,
            notification_id: None,
            record_id,
            job: Job::CentercodeWebhookV1 { body },
        }])
        .await
        .expect("stored");
    id
}

async fn fake_salesforce() -> FakeSalesforce {
    FakeSalesforce::start(FakeSalesforceConfig::demo())
        .await
        .expect("fake salesforce")
}

fn delivered(outcomes: &[Outcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Delivered { .. }))
        .count()
}

async fn upsert_creates_then_updates(backend: Backend, sign_in: SignIn) {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let app = spawn_app_on(backend, |s| with_salesforce(s, &base, sign_in)).await;

    store(&app, feedback("CC-1", "Crash on start", "In Progress")).await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes, vec![Outcome::Delivered { status: 201 }]);
    let records = sf.records("Centercode_Feedback__c");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].get("Centercode_Id__c"), Some(&json!("CC-1")));
    assert_eq!(records[0].get("Title__c"), Some(&json!("Crash on start")));
    assert_eq!(
        records[0].get("Status__c"),
        Some(&json!("Working")),
        "mapped"
    );

    // The same feedback modified: the same record, updated (an upsert by external id).
    store(
        &app,
        feedback("CC-1", "Crash on start (fixed title)", "Closed"),
    )
    .await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes, vec![Outcome::Delivered { status: 200 }]);
    let records = sf.records("Centercode_Feedback__c");
    assert_eq!(records.len(), 1, "updated, not created again");
    assert_eq!(
        records[0].get("Status__c"),
        Some(&json!("New")),
        "default for an unmapped value"
    );

    let writes = sf.writes();
    assert_eq!(writes.len(), 2);
    for w in &writes {
        assert_eq!(w.method, "PATCH");
        assert_eq!(
            w.path,
            "/services/data/v61.0/sobjects/Centercode_Feedback__c/Centercode_Id__c/CC-1"
        );
        assert_eq!(w.call_options.as_deref(), Some("client=centercode-relay"));
        assert!(
            w.body.get("Centercode_Id__c").is_none(),
            "the external id travels in the URL"
        );
    }
    assert_eq!(sf.tokens_minted(), 1, "the token is cached");
}

async fn jwt_upsert_creates_then_updates(backend: Backend) {
    upsert_creates_then_updates(backend, SignIn::Jwt).await;
}

async fn client_credentials_upsert(backend: Backend) {
    upsert_creates_then_updates(backend, SignIn::ClientCredentials).await;
}

/// A sign-in Salesforce refuses parks the job with what to check, and writes nothing.
async fn refused_sign_in(
    backend: Backend,
    adjust_sf: impl FnOnce(&mut SalesforceSettings),
    fake: FakeSalesforceConfig,
    said: &str,
) {
    let sf = FakeSalesforce::start(fake).await.unwrap();
    let base = sf.base_url();
    let app = spawn_app_on(backend, |s| {
        with_salesforce(s, &base, SignIn::Jwt);
        adjust_sf(s.salesforce.as_mut().unwrap());
    })
    .await;
    store(&app, feedback("CC-2", "t", "New")).await;
    let outcomes = app.deliver_until_settled().await;
    let reasons = parked_reasons(&outcomes);
    assert_eq!(reasons.len(), 1, "{outcomes:?}");
    let reason = &reasons[0];
    assert!(
        reason.contains("Salesforce refused the relay's sign-in"),
        "{reason}"
    );
    assert!(reason.contains(said), "{reason} should say {said}");
    assert!(
        reason.contains("certificate"),
        "says what to check: {reason}"
    );
    assert!(!reason.contains("BEGIN"), "no key material in a reason");
    assert!(sf.writes().is_empty());
    assert_eq!(sf.counters().data_calls, 0);
}

async fn a_wrong_key_is_refused_and_parked_with_a_reason(backend: Backend) {
    refused_sign_in(
        backend,
        |sf| sf.private_key = Some(test_keys::OTHER_PRIVATE_KEY_PEM.to_owned().into()),
        FakeSalesforceConfig::demo(),
        "invalid_grant",
    )
    .await;
}

async fn a_wrong_audience_is_refused_and_parked_with_a_reason(backend: Backend) {
    refused_sign_in(
        backend,
        |sf| sf.audience = Some("https://wrong.example.com".into()),
        FakeSalesforceConfig::demo(),
        "audience",
    )
    .await;
}

async fn an_expired_assertion_is_refused_and_parked_with_a_reason(backend: Backend) {
    // The fake's clock runs an hour ahead: the relay's assertion (exp in 3 minutes) is
    // expired when it arrives, as with a relay machine whose clock is behind.
    let mut fake = FakeSalesforceConfig::demo();
    fake.clock_offset_secs = 3600;
    refused_sign_in(backend, |_| {}, fake, "expired").await;
}

/// A token that expires mid-run is minted again without spending the job's attempt.
async fn token_expiry_mid_run_costs_no_attempt(backend: Backend) {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let app = spawn_app_on(backend, |s| with_salesforce(s, &base, SignIn::Jwt)).await;
    store(&app, feedback("CC-3", "first", "New")).await;
    assert_eq!(delivered(&app.deliver_until_settled().await), 1);
    sf.revoke_tokens();
    store(&app, feedback("CC-4", "second", "New")).await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(
        outcomes,
        vec![Outcome::Delivered { status: 201 }],
        "no retry, no park"
    );
    assert_eq!(sf.tokens_minted(), 2);
    let statuses: Vec<u16> = sf.writes().iter().map(|w| w.status).collect();
    assert_eq!(statuses, vec![201, 401, 201]);
}

/// `REQUEST_LIMIT_EXCEEDED` holds the job (no attempt, route not paused) and it is written
/// once usage falls.
async fn request_limit_exceeded_holds_without_pausing(backend: Backend) {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let app = spawn_app_on(backend, |s| with_salesforce(s, &base, SignIn::Jwt)).await;
    sf.push_fault(Fault::once(FaultKind::RequestLimit));
    let started = Instant::now();
    store(&app, feedback("CC-5", "t", "New")).await;
    let first = app.worker.deliver_all().await.unwrap();
    assert!(
        matches!(first.as_slice(), [Outcome::RateLimited { limit, .. }] if limit == "salesforce"),
        "{first:?}"
    );
    assert!(
        !app.control.is_paused("cc-feedback"),
        "back-pressure, not a pause"
    );
    let outcomes = app.deliver_until_settled().await;
    assert!(
        outcomes.contains(&Outcome::Delivered { status: 201 }),
        "{outcomes:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "held for limit_wait_secs"
    );
    assert!(parked_reasons(&outcomes).is_empty());
    assert_eq!(sf.records("Centercode_Feedback__c").len(), 1);
}

/// At `max_api_share` of the daily allocation writes stop; when usage falls they resume.
async fn the_api_share_stops_writes_until_usage_falls(backend: Backend) {
    let sf = fake_salesforce().await;
    sf.set_api_usage(49, 100);
    let base = sf.base_url();
    let app = spawn_app_on(backend, |s| with_salesforce(s, &base, SignIn::Jwt)).await;
    store(&app, feedback("CC-6", "t", "New")).await;
    assert_eq!(delivered(&app.worker.deliver_all().await.unwrap()), 1);
    // That write brought usage to 50/100: half, the relay's share.
    let metrics = app.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("relay_salesforce_api_usage_ratio{") && l.ends_with(" 0.5")),
        "{metrics}"
    );
    store(&app, feedback("CC-7", "t", "New")).await;
    let held = app.worker.deliver_all().await.unwrap();
    assert!(
        matches!(held.as_slice(), [Outcome::RateLimited { .. }]),
        "{held:?}"
    );
    assert_eq!(
        sf.records("Centercode_Feedback__c").len(),
        1,
        "nothing written past the share"
    );
    sf.set_api_usage(10, 100);
    let outcomes = app.deliver_until_settled().await;
    assert!(
        outcomes.contains(&Outcome::Delivered { status: 201 }),
        "{outcomes:?}"
    );
    assert_eq!(sf.records("Centercode_Feedback__c").len(), 2);
}

/// Many ready jobs go as Collections upserts; a record Salesforce refuses parks its own job
/// with the code, and only it.
async fn collections_upsert_maps_per_record_failures(backend: Backend) {
    let sf = fake_salesforce().await;
    sf.add_record_rule(RecordRule::new(
        "CC-13",
        "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        "Title must not be TBD",
    ));
    let base = sf.base_url();
    let app = spawn_app_on(backend, |s| with_salesforce(s, &base, SignIn::Jwt)).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            store(
                &app,
                feedback(&format!("CC-{i}"), &format!("title {i}"), "New"),
            )
            .await,
        );
    }
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(delivered(&outcomes), 39, "{outcomes:?}");
    let reasons = parked_reasons(&outcomes);
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].contains("FIELD_CUSTOM_VALIDATION_EXCEPTION"),
        "{}",
        reasons[0]
    );
    assert!(
        reasons[0].contains("Title must not be TBD"),
        "{}",
        reasons[0]
    );
    let parked = app.queue.parked(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(
        parked[0].record_id.as_deref(),
        Some("CC-13"),
        "the failing record's own job"
    );
    let records = sf.records("Centercode_Feedback__c");
    assert_eq!(records.len(), 39);
    assert!(records
        .iter()
        .all(|r| r.get("Centercode_Id__c") != Some(&json!("CC-13"))));
    let composite: Vec<_> = sf
        .writes()
        .into_iter()
        .filter(|w| {
            w.path
                .contains("/composite/sobjects/Centercode_Feedback__c/Centercode_Id__c")
        })
        .collect();
    assert!(!composite.is_empty(), "Collections upserts were used");
    assert!(composite
        .iter()
        .any(|w| w.body["records"].as_array().map_or(0, Vec::len) > 1));
    for w in &composite {
        assert_eq!(w.body["allOrNone"], json!(false));
        assert_eq!(w.call_options.as_deref(), Some("client=centercode-relay"));
    }
}

/// One record Salesforce cannot even read gets a Collections call refused whole (400): the
/// relay splits the call until that record goes alone, so only its job parks, and the
/// reason names the code and field but not the value Salesforce's message repeats.
async fn a_collections_call_refused_whole_parks_only_the_record_at_fault(backend: Backend) {
    let sf = fake_salesforce().await;
    let mut rule = RecordRule::new(
        "CC-13",
        "JSON_PARSER_ERROR",
        "Cannot deserialize instance of date from VALUE_STRING value next week",
    )
    .whole_call();
    rule.fields = vec!["Due__c".into()];
    sf.add_record_rule(rule);
    let base = sf.base_url();
    let app = spawn_app_on(backend, |s| with_salesforce(s, &base, SignIn::Jwt)).await;
    for i in 0..40 {
        store(&app, feedback(&format!("CC-{i}"), "t", "New")).await;
    }
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(delivered(&outcomes), 39, "{outcomes:?}");
    let parked = app.queue.parked(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].record_id.as_deref(), Some("CC-13"));
    let reason = &parked[0].reason;
    assert!(reason.contains("JSON_PARSER_ERROR"), "{reason}");
    assert!(reason.contains("Due__c"), "{reason}");
    assert!(
        !reason.contains("next week"),
        "a value in a reason: {reason}"
    );
    assert_eq!(sf.records("Centercode_Feedback__c").len(), 39);
    let writes = sf.writes();
    assert!(
        writes
            .iter()
            .any(|w| w.status == 400 && w.body["records"].is_array()),
        "a Collections call was refused whole"
    );
    assert!(
        writes.len() < 40,
        "split in halves, not one call per record: {} calls",
        writes.len()
    );
}

/// Two jobs of one external id that reach the batcher together (copies of one version, or
/// a record id too long to order) go in separate calls: Salesforce refuses every record of a
/// Collections call that names an external id twice.
#[tokio::test]
async fn one_external_id_twice_goes_in_separate_calls() {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let app = spawn_app_with(|s| with_salesforce(s, &base, SignIn::Jwt)).await;
    let long = format!("CC-{}", "9".repeat(300));
    for i in 0..10 {
        store(&app, feedback(&format!("CC-{i}"), "t", "New")).await;
    }
    store(&app, feedback(&long, "first", "New")).await;
    store(&app, feedback(&long, "second", "New")).await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(delivered(&outcomes), 12, "{outcomes:?}");
    assert_eq!(sf.records("Centercode_Feedback__c").len(), 11);
    let writes = sf.writes();
    assert!(
        writes.iter().any(|w| w.body["records"].is_array()),
        "batched"
    );
    for w in &writes {
        let copies = w.body["records"].as_array().map_or(0, |r| {
            r.iter()
                .filter(|r| r["Centercode_Id__c"] == json!(long))
                .count()
        });
        assert!(copies <= 1, "one external id twice in one call");
    }
}

/// Salesforce's sign-in down (503) or slow is no refusal: the job is retried, not parked.
#[tokio::test]
async fn a_sign_in_that_fails_for_now_is_retried_not_parked() {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let app = spawn_app_with(|s| {
        with_salesforce(s, &base, SignIn::ClientCredentials);
        s.salesforce.as_mut().unwrap().timeout_ms = 300;
    })
    .await;
    sf.push_fault(Fault::once(FaultKind::Unavailable).on_path("/oauth2/token"));
    sf.push_fault(Fault::once(FaultKind::Hang { ms: 1_000 }).on_path("/oauth2/token"));
    store(&app, feedback("CC-22", "t", "New")).await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(
        outcomes,
        vec![
            Outcome::Retried { status: None },
            Outcome::Retried { status: None },
            Outcome::Delivered { status: 201 }
        ]
    );
    assert!(app.queue.parked(10).await.unwrap().is_empty());
}

/// A token refused right after it was minted spends the attempt (no loop of sign-ins): the
/// job is retried on the schedule and written.
#[tokio::test]
async fn invalid_session_twice_spends_the_attempt_without_looping() {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let app = spawn_app_with(|s| with_salesforce(s, &base, SignIn::Jwt)).await;
    sf.push_fault(Fault::times(FaultKind::InvalidSession, 2));
    store(&app, feedback("CC-23", "t", "New")).await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(
        outcomes,
        vec![
            Outcome::Retried { status: Some(401) },
            Outcome::Delivered { status: 201 }
        ]
    );
    let statuses: Vec<u16> = sf.writes().iter().map(|w| w.status).collect();
    assert_eq!(statuses, vec![401, 401, 201], "one fresh token per attempt");
}

/// External ids with a slash, spaces or accents reach the record they name (one path
/// segment, percent-encoded), and an upsert of it again updates that record.
#[tokio::test]
async fn external_ids_with_slashes_spaces_and_accents_name_their_record() {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let app = spawn_app_with(|s| {
        with_salesforce(s, &base, SignIn::Jwt);
        s.salesforce.as_mut().unwrap().batch_size = 1;
    })
    .await;
    let ids = ["FB/2026/7", "Beta feedback 7", "Café-#7?x=1", "a.b"];
    for id in ids {
        store(&app, feedback(id, "first", "New")).await;
    }
    assert_eq!(delivered(&app.deliver_until_settled().await), 4);
    for id in ids {
        store(&app, feedback(id, "second", "New")).await;
    }
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(
        outcomes,
        vec![Outcome::Delivered { status: 200 }; 4],
        "updated"
    );
    let records = sf.records("Centercode_Feedback__c");
    assert_eq!(records.len(), 4);
    for id in ids {
        let record = records
            .iter()
            .find(|r| r.get("Centercode_Id__c") == Some(&json!(id)))
            .unwrap_or_else(|| panic!("no record for {id}"));
        assert_eq!(record.get("Title__c"), Some(&json!("second")));
    }
}

/// A 5xx and a call that outlives `timeout_ms` are retried on the schedule; a validation
/// error parks with Salesforce's code.
#[tokio::test]
async fn unavailable_and_timeouts_retry_and_validation_parks() {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let app = spawn_app_with(|s| {
        with_salesforce(s, &base, SignIn::Jwt);
        s.salesforce.as_mut().unwrap().timeout_ms = 300;
    })
    .await;
    // Salesforce answers after 2 s; the relay stops waiting at 300 ms and tries again.
    sf.push_fault(Fault::once(FaultKind::Hang { ms: 2_000 }));
    store(&app, feedback("CC-19", "t", "New")).await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(
        outcomes,
        vec![
            Outcome::Retried { status: None },
            Outcome::Delivered { status: 201 }
        ]
    );
    // The timed-out call may still land; an upsert by external id makes it the same record.
    assert_eq!(sf.records("Centercode_Feedback__c").len(), 1);

    sf.push_fault(Fault::times(FaultKind::Unavailable, 2));
    store(&app, feedback("CC-20", "t", "New")).await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(
        outcomes,
        vec![
            Outcome::Retried { status: Some(503) },
            Outcome::Retried { status: Some(503) },
            Outcome::Delivered { status: 201 }
        ]
    );
    sf.push_fault(Fault::once(FaultKind::Validation {
        error_code: "INVALID_FIELD".into(),
        message: "No such column 'Title__c' on entity".into(),
        fields: vec![],
    }));
    store(&app, feedback("CC-21", "t", "New")).await;
    let outcomes = app.deliver_until_settled().await;
    let reasons = parked_reasons(&outcomes);
    assert_eq!(reasons.len(), 1, "{outcomes:?}");
    assert!(reasons[0].contains("INVALID_FIELD"), "{}", reasons[0]);
}

/// A duplicate external id in Salesforce (300) parks: nothing is changed.
#[tokio::test]
async fn several_matching_records_park() {
    let sf = fake_salesforce().await;
    for _ in 0..2 {
        sf.insert_record(
            "Centercode_Feedback__c",
            json!({"Centercode_Id__c": "CC-30"}),
        );
    }
    let base = sf.base_url();
    let app = spawn_app_with(|s| with_salesforce(s, &base, SignIn::Jwt)).await;
    store(&app, feedback("CC-30", "t", "New")).await;
    let outcomes = app.deliver_until_settled().await;
    let reasons = parked_reasons(&outcomes);
    assert_eq!(reasons.len(), 1, "{outcomes:?}");
    assert!(reasons[0].contains("several records"), "{}", reasons[0]);
}

/// The org at `base`, and the `gdpr` removals' outcome written back on their Contact (with
/// the detail and time fields when `details`).
fn write_back_removals(s: &mut Settings, base: &str, details: bool) {
    s.salesforce = Some(salesforce_settings(base, SignIn::Jwt));
    let gdpr = s.routes.iter_mut().find(|r| r.name == "gdpr").unwrap();
    gdpr.status_writeback = Some(StatusWriteback {
        sobject: None,
        status_field: "Centercode_Status__c".into(),
        detail_field: details.then(|| "Centercode_Detail__c".into()),
        time_field: details.then(|| "Centercode_Synced_At__c".into()),
    });
}

/// The fixture's removal, for the Contact `contact`, acknowledged by the gateway.
async fn send_removal_of(app: &TestApp, contact: &str) {
    let message = String::from_utf8(fixture("om_contact_gdpr_removal_single.xml"))
        .unwrap()
        .replace("0038d0000000041AAA", contact);
    let response = app.post_outbound("gdpr", message.into_bytes()).await;
    assert_eq!(response.status(), 200);
}

/// The removal's outcome lands on the Contact, written by a job of its own.
async fn the_status_is_written_back_on_the_contact(backend: Backend) {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let contact = sf.insert_record("Contact", json!({"LastName": "Doe"}));
    let app = spawn_app_on(backend, |s| {
        write_back_removals(s, &base, true);
    })
    .await;
    send_removal_of(&app, &contact).await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(
        outcomes,
        vec![
            Outcome::Delivered { status: 200 },
            Outcome::Delivered { status: 204 }
        ],
        "the removal, then its write-back"
    );
    let records = sf.records("Contact");
    let record = records.iter().find(|r| r.id == contact).unwrap();
    assert_eq!(
        record.get("Centercode_Status__c"),
        Some(&json!("Sent to Centercode (200)"))
    );
    assert!(record.get("Centercode_Detail__c").is_some());
    assert!(record
        .get("Centercode_Synced_At__c")
        .and_then(Value::as_str)
        .is_some_and(|t| t.ends_with('Z')));
    let writes = sf.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!(
        writes[0].path,
        format!("/services/data/v61.0/sobjects/Contact/{contact}")
    );
    assert_eq!(
        writes[0].call_options.as_deref(),
        Some("client=centercode-relay")
    );
}

/// `relay trace` on a Contact shows both of its jobs, each attempt labelled with the side
/// that answered: Centercode for the removal, Salesforce for the write-back.
#[tokio::test]
async fn relay_trace_names_who_answered_each_attempt() {
    const ADMIN: &str = "trace-admin-token-0123456789abcdef0123";
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let contact = sf.insert_record("Contact", json!({"LastName": "Doe"}));
    let app = spawn_app_with(|s| {
        s.admin.token = Some(ADMIN.to_owned().into());
        write_back_removals(s, &base, false);
    })
    .await;
    send_removal_of(&app, &contact).await;
    assert_eq!(app.deliver_until_settled().await.len(), 2);

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["trace", "--record-id", &contact])
        .args(["--url", &app.address, "--token", ADMIN])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("remove_user"), "{text}");
    assert!(text.contains("salesforce_status"), "{text}");
    assert!(text.contains("attempt 1: Centercode 200 -> done"), "{text}");
    assert!(text.contains("attempt 1: Salesforce 204 -> done"), "{text}");

    // The console's trace page says the same.
    let (cookie, _) = crate::console::log_in_as(&app.address, ADMIN).await;
    let page = app
        .client
        .get(format!("{}/console/trace?record_id={contact}", app.address))
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Centercode answered 200"), "{page}");
    assert!(page.contains("Salesforce answered 204"), "{page}");
    assert!(
        page.contains("from the relay (a status write-back)"),
        "{page}"
    );
}

/// The write-back's own failure never changes the Centercode outcome: it retries, and parks
/// on its own.
#[tokio::test]
async fn a_failing_write_back_leaves_the_delivery_alone() {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let app = spawn_app_with(|s| {
        write_back_removals(s, &base, false);
    })
    .await;
    // The Contact does not exist in the fake: the write-back gets 404 NOT_FOUND.
    let response = app
        .post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    assert_eq!(response.status(), 200);
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(
        outcomes[0],
        Outcome::Delivered { status: 200 },
        "{outcomes:?}"
    );
    let parked = app.queue.parked(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].action, "salesforce_status");
    assert!(
        parked[0].reason.contains("NOT_FOUND"),
        "{}",
        parked[0].reason
    );
    assert_eq!(app.centercode.macro_runs().len(), 1, "the removal ran once");
}

/// Write-backs of one record keep the order of the outcomes they report: an older status
/// that comes late (retried after a 503, say) is superseded, never written over a newer one.
async fn an_older_status_never_overwrites_a_newer_one(backend: Backend) {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let contact = sf.insert_record("Contact", json!({"LastName": "Doe"}));
    let app = spawn_app_on(backend, |s| write_back_removals(s, &base, false)).await;
    let write_back = |status: &str, at_ms: i64| NewJob {
        received_at_ms: at_ms,
        id: uuid::Uuid::new_v4().to_string(),
        route: "gdpr".into(),
        action: Action::SalesforceStatus,
        dedupe_key: None,
        body_hash: None,
        org_id: None,
        notification_id: None,
        record_id: Some(contact.clone()),
        job: Job::StatusWritebackV1 {
            sobject: "Contact".into(),
            record_id: contact.clone(),
            fields: json!({"Centercode_Status__c": status})
                .as_object()
                .unwrap()
                .clone(),
        },
    };
    let now = now_ms();
    app.queue
        .enqueue(vec![write_back("Sent to Centercode (200)", now)])
        .await
        .unwrap();
    assert_eq!(
        app.deliver_until_settled().await,
        vec![Outcome::Delivered { status: 204 }]
    );
    app.queue
        .enqueue(vec![write_back(
            "Parked: Centercode answered 503",
            now - 60_000,
        )])
        .await
        .unwrap();
    let outcomes = app.deliver_until_settled().await;
    assert!(
        matches!(outcomes.as_slice(), [Outcome::Superseded { .. }]),
        "{outcomes:?}"
    );
    let records = sf.records("Contact");
    let record = records.iter().find(|r| r.id == contact).unwrap();
    assert_eq!(
        record.get("Centercode_Status__c"),
        Some(&json!("Sent to Centercode (200)"))
    );
    assert_eq!(sf.writes().len(), 1, "the older status was not sent");
}

/// A Contact deleted since (in the recycle bin, `ENTITY_IS_DELETED`) has nowhere to show the
/// status: the write-back is done, not parked for a person who can fix nothing.
#[tokio::test]
async fn a_write_back_to_a_deleted_record_is_done_not_parked() {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let contact = sf.insert_record("Contact", json!({"LastName": "Doe"}));
    let app = spawn_app_with(|s| write_back_removals(s, &base, false)).await;
    sf.push_fault(Fault::once(FaultKind::Validation {
        error_code: "ENTITY_IS_DELETED".into(),
        message: "entity is deleted".into(),
        fields: vec![],
    }));
    send_removal_of(&app, &contact).await;
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert!(parked_reasons(&outcomes).is_empty(), "{outcomes:?}");
    assert!(app.queue.parked(10).await.unwrap().is_empty());
}

/// A Centercode webhook sent twice (Centercode retries, or the macro fires again for the
/// same change) reaches Salesforce once; through the gateway, as Centercode sends it.
async fn a_redelivered_webhook_is_written_once(backend: Backend) {
    let sf = fake_salesforce().await;
    let base = sf.base_url();
    let app = spawn_app_on(backend, |s| with_salesforce(s, &base, SignIn::Jwt)).await;
    let body = feedback("CC-40", "Sync stalls", "In Progress").to_string();
    for _ in 0..2 {
        let response = app
            .client
            .post(format!("{}/centercode/webhook/cc-feedback", app.address))
            .header("Content-Type", "application/json")
            .header("X-Relay-Token", WEBHOOK_TOKEN)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes, vec![Outcome::Delivered { status: 201 }]);
    assert_eq!(sf.writes().len(), 1, "written once");
    assert_eq!(sf.records("Centercode_Feedback__c").len(), 1);
}

/// A key that cannot be read stops the start (not every delivery), naming the key's setting
/// and not its content; `check-config` says how the relay signs in and where each route writes.
#[tokio::test]
async fn an_unreadable_key_fails_the_start_and_check_config_describes_the_org() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir.path().join("relay.db"), "http://127.0.0.1:9");
    with_salesforce(&mut settings, "https://login.salesforce.com", SignIn::Jwt);
    let described = sf_centercode_relay::cli::describe(&settings);
    assert!(
        described.contains("salesforce: https://login.salesforce.com (API 61.0, JWT bearer as client 3MVG9-relay-test)"),
        "{described}"
    );
    assert!(
        described.contains("cc-feedback: POST /centercode/webhook/cc-feedback -> salesforce_upsert Centercode_Feedback__c by Centercode_Id__c = /feedback/id"),
        "{described}"
    );
    let sf = settings.salesforce.as_mut().unwrap();
    sf.private_key = None;
    sf.private_key_file = Some(dir.path().join("missing.pem"));
    let err = sf_centercode_relay::startup::Application::build(settings)
        .await
        .err()
        .expect("refused");
    let text = format!("{err:#}");
    assert!(text.contains("salesforce.private_key_file"), "{text}");
    let mut settings = test_settings(&dir.path().join("relay2.db"), "http://127.0.0.1:9");
    with_salesforce(&mut settings, "https://login.salesforce.com", SignIn::Jwt);
    settings.salesforce.as_mut().unwrap().private_key = Some(
        "-----BEGIN PRIVATE KEY-----\nnot-base64\n-----END PRIVATE KEY-----\n"
            .to_owned()
            .into(),
    );
    let err = sf_centercode_relay::startup::Application::build(settings)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("salesforce private key"),
        "{err:#}"
    );
}

crate::both_backends::on_both_backends!(
    jwt_upsert_creates_then_updates,
    client_credentials_upsert,
    a_wrong_key_is_refused_and_parked_with_a_reason,
    a_wrong_audience_is_refused_and_parked_with_a_reason,
    an_expired_assertion_is_refused_and_parked_with_a_reason,
    token_expiry_mid_run_costs_no_attempt,
    request_limit_exceeded_holds_without_pausing,
    the_api_share_stops_writes_until_usage_falls,
    collections_upsert_maps_per_record_failures,
    a_collections_call_refused_whole_parks_only_the_record_at_fault,
    the_status_is_written_back_on_the_contact,
    an_older_status_never_overwrites_a_newer_one,
    a_redelivered_webhook_is_written_once
);
