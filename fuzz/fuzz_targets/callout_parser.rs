//! Arbitrary bytes into the callout body parser and, when it accepts them, through the job
//! builder and the Centercode mapping of every route below, as the worker would.
//!
//! Checks: `parse_body`, `job_from_callout`, `mapping::to_centercode`,
//! `CentercodeRequest::render_masked` and `url_with_key` never panic on any JSON object, and
//! a mapped request has the shape its action promises.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sf_centercode_relay::inbound::callout::{job_from_callout, parse_body};
use sf_centercode_relay::mapping::to_centercode;
use sf_centercode_relay::settings::{Action, Settings};

/// Callout routes using every kind of field rule: JSON pointers (nested, array index, the
/// empty pointer = the whole body), `required` + `max_len`, `map` + `default`, constants,
/// and an e-mail pointer for the user-listener actions.
const TOML: &str = r#"
[[routes]]
name = "fb"
kind = "callout"
action = "create_feedback"
url = "https://x.example/api"
auth = { bearer = "0123456789abcdef0123" }
idempotency_key_field = "/eventId"
[routes.fields]
summary = { from = "/feedback/title", required = true, max_len = 80 }
severity = { from = "/a/b", map = { High = "Major", Low = "Cosmetic", "4" = "Minor" }, default = "Minor" }
priority = { from = "/feedback/priority", map = { High = "P1", Medium = "P2" } }
rating = "/feedback/rating"
component = "/feedback/components/0"
description = { from = "/feedback/description", max_len = 4000 }
status = { value = "New" }
raw = ""

[[routes]]
name = "gdpr"
kind = "callout"
action = "remove_user"
url = "https://x.example/api/gdpr?project=1"
auth = { bearer = "0123456789abcdef0123" }
email_field = "/subject/email"

[[routes]]
name = "userdata"
kind = "callout"
action = "store_user_data"
url = "https://x.example/api/users"
auth = { hmac_secret = "0123456789abcdef0123" }
email_field = "/feedback/tester/email"
[routes.fields]
tier = { from = "/feedback/customFields/Customer_Tier__c", default = "Standard" }
"#;

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| Settings::from_toml(TOML).expect("fuzz route settings are valid"))
}

fuzz_target!(|data: &[u8]| {
    let settings = settings();
    let Ok(body) = parse_body(data) else {
        return;
    };
    assert!(body.is_object(), "parse_body accepted a non-object");
    for route in &settings.routes {
        let job = job_from_callout(route, None, body.clone(), None);
        assert_eq!(job.route, route.name);
        assert_eq!(job.action, route.action);
        let Ok(request) = to_centercode(&job.job, route) else {
            continue;
        };
        let masked = request.render_masked();
        let url = request.url_with_key("k");
        assert!(masked.starts_with(&format!("POST {}", route.url)));
        assert!(url.starts_with(&route.url));
        assert!(url.ends_with("apiKey=k"));
        match route.action {
            Action::RemoveUser => {
                assert!(request.find.is_some() && request.body.is_none());
            }
            Action::CreateFeedback => {
                assert!(request.find.is_none());
                let body = request.body.as_ref().expect("create_feedback has a body");
                let summary = body.get("summary").expect("summary is required");
                if let Some(s) = summary.as_str() {
                    assert!(!s.trim().is_empty() && s.chars().count() <= 80);
                }
                assert_eq!(body.get("status"), Some(&serde_json::json!("New")));
            }
            Action::StoreUserData => {
                assert!(request.find.is_some() && request.body.is_some());
            }
        }
    }
});
