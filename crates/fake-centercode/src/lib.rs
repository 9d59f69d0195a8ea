//! In-process fake Centercode server (user macro listeners, External Sources, `/__fake` control plane) per `docs/centercode.md` §7.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{ServerHandle, Service};
use actix_web::http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::http::{Method, StatusCode};
use actix_web::web::{self, Bytes};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer};
use percent_encoding::percent_decode_str;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use uuid::Uuid;

const JSON_CT: &str = "application/json; charset=utf-8";
const REQUEST_ID_HEADER: &str = "x-fake-request-id";
const MAX_BODY_TEXT: usize = 64 * 1024;
const DEFAULT_HANG_MS: u64 = 120_000;

// ---- Configuration (§7.2) ----

/// Whole fake configuration (§7.2). JSON fields that are absent take the §7.2 example's values;
/// `FakeConfig::default()` is that example with zero latency, for fast tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FakeConfig {
    /// Community API keys accepted in the `apiKey` query parameter.
    pub api_keys: Vec<ApiKeyConfig>,
    /// Initial user store (shared by community and project listeners).
    pub users: Vec<User>,
    /// User macro listeners (community or project scope).
    pub user_macro_listeners: Vec<ListenerConfig>,
    /// External Sources, one per (project, feedback type).
    pub external_sources: Vec<SourceConfig>,
    /// Path patterns with `{placeholders}`.
    pub routes: RoutesConfig,
    /// Body size limits per route kind.
    pub limits: LimitsConfig,
    /// Per-response delay. A missing `latency` object means the doc's 25 ms + 0..25 ms.
    #[serde(default)]
    pub latency: LatencyConfig,
    /// Optional token-bucket throttling per API key (or client IP).
    pub rate_limit: RateLimitConfig,
    /// Format of the fake's own error bodies.
    pub error_body_style: ErrorBodyStyle,
    /// `wall` or `virtual` (async removals only progress via `/__fake/clock/advance`).
    pub clock: ClockMode,
    /// Status for a non-JSON External Source request: 400 (default) or 415 (§7.5).
    pub unsupported_content_type_status: u16,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            api_keys: vec![ApiKeyConfig::default()],
            users: vec![User::new("tony@centercode.com", "tony", &["Participants"])],
            user_macro_listeners: vec![ListenerConfig::default()],
            external_sources: vec![SourceConfig::default()],
            routes: RoutesConfig::default(),
            limits: LimitsConfig::default(),
            latency: LatencyConfig {
                base_ms: 0,
                jitter_ms: 0,
                sync_macro_extra_ms: 0,
                seed: 42,
            },
            rate_limit: RateLimitConfig::default(),
            error_body_style: ErrorBodyStyle::Json,
            clock: ClockMode::Wall,
            unsupported_content_type_status: 400,
        }
    }
}

impl FakeConfig {
    /// A ready-made config for demos and relay tests: key `test-key`, four users, listeners
    /// `gdpr` (sync) and `gdpr-async` (async), sources `beta1/sf-issues` and `beta1/sf-ideas`.
    pub fn demo() -> Self {
        let summary =
            json!({"element": "Summary", "type": "text", "required": true, "maxLength": 255});
        let mut cfg: Self = serde_json::from_value(json!({
            "users": [
                {"email": "tony@centercode.com", "username": "tony", "teams": ["Participants"]},
                {"email": "marta.kowalska@example.org", "username": "marta", "teams": ["Participants"]},
                {"email": "aisha.okafor@example.net", "username": "aisha", "teams": ["Participants"]},
                {"email": "o'brien+beta@example.com", "username": "obrien", "teams": ["Participants"]}
            ],
            "userMacroListeners": [{"key": "gdpr", "mode": "sync"}, {"key": "gdpr-async", "mode": "async"}],
            "externalSources": [
                {"projectKey": "beta1", "sourceKey": "sf-issues", "feedbackType": "Issue", "idPrefix": "ISS",
                 "fields": {
                    "summary": summary,
                    "description": {"element": "Description", "maxLength": 20000},
                    "severity": {"element": "Severity", "type": "choice",
                                 "choices": ["Critical", "Major", "Minor", "Cosmetic"]},
                    "salesforce_id": {"element": "Internal Tracking ID"},
                    "platform": {"element": "Platform"},
                    "component": {"element": "Component"}}},
                {"projectKey": "beta1", "sourceKey": "sf-ideas", "feedbackType": "Idea", "idPrefix": "IDEA",
                 "fields": {
                    "summary": summary,
                    "description": {"element": "Description", "maxLength": 20000},
                    "salesforce_id": {"element": "Internal Tracking ID"},
                    "platform": {"element": "Platform"},
                    "component": {"element": "Component"}}}
            ]
        }))
        .expect("static demo config");
        cfg.latency = Self::default().latency;
        cfg
    }
}

/// One community API key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ApiKeyConfig {
    pub key: String,
    pub enabled: bool,
    /// Empty = any client IP; otherwise exact IP addresses.
    pub allowed_ips: Vec<String>,
}

impl Default for ApiKeyConfig {
    fn default() -> Self {
        Self {
            key: "test-key".into(),
            enabled: true,
            allowed_ips: vec![],
        }
    }
}

/// A Centercode user as the fake stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub email: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub teams: Vec<String>,
    #[serde(default)]
    pub state: UserState,
}

impl User {
    /// An active user.
    pub fn new(email: &str, username: &str, teams: &[&str]) -> Self {
        Self {
            email: email.into(),
            username: username.into(),
            teams: teams.iter().map(|t| t.to_string()).collect(),
            state: UserState::Active,
        }
    }
}

/// `active` or `pending_removal` (an async macro is running).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserState {
    #[default]
    Active,
    PendingRemoval,
}

/// A user macro listener (§7.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ListenerConfig {
    pub key: String,
    pub scope: Scope,
    /// Project scope only: restrict to this project key (`null` = any project).
    pub project_key: Option<String>,
    pub mode: MacroMode,
    pub async_delay_ms: u64,
    /// Users must be on one of these teams, else `404 user_not_found`.
    pub filter_teams: Option<Vec<String>>,
    pub repeat_while_pending: RepeatWhilePending,
    /// Body of the 200/202 (JSON if it parses, else text; `""` = empty).
    pub success_body: String,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            key: "demo".into(),
            scope: Scope::Community,
            project_key: None,
            mode: MacroMode::Sync,
            async_delay_ms: 2000,
            filter_teams: None,
            repeat_while_pending: RepeatWhilePending::Accepted,
            success_body: "{}".into(),
        }
    }
}

/// Listener scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Community,
    Project,
}

/// Whether the macro finishes inside the request (200) or later (202).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MacroMode {
    #[default]
    Sync,
    Async,
}

/// Answer to a repeat call while the user is `pending_removal`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RepeatWhilePending {
    /// `"202"`: 202 again, no second macro run.
    #[default]
    #[serde(rename = "202")]
    Accepted,
    /// `"409"`: `409 macro_in_progress`.
    #[serde(rename = "409")]
    Conflict,
}

/// An External Source (§7.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SourceConfig {
    pub project_key: String,
    pub source_key: String,
    pub feedback_type: String,
    pub id_prefix: String,
    pub id_digits: usize,
    pub id_start: u64,
    /// `null` makes the status key required.
    pub default_status: Option<String>,
    pub default_team: String,
    pub allowed_statuses: Vec<String>,
    /// `null` makes the submitter key required.
    pub default_submitter: Option<String>,
    pub status_key: String,
    pub submitter_key: String,
    pub unknown_submitter: UnknownSubmitter,
    pub strict_unknown_keys: bool,
    pub success_status: u16,
    /// JSON key → form element mapping and validation.
    pub fields: BTreeMap<String, FieldSpec>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        let fields = serde_json::from_value(json!({
            "title":       {"element": "Summary", "type": "text", "required": true,  "maxLength": 255},
            "description": {"element": "Steps to Reproduce", "type": "text", "required": false, "maxLength": 20000},
            "severity":    {"element": "Severity", "type": "choice", "required": false,
                            "choices": ["Critical", "Major", "Minor", "Cosmetic"]},
            "platform":    {"element": "Platform", "type": "text", "required": false},
            "salesforceId":{"element": "Internal Tracking ID", "type": "text", "required": false}
        }))
        .expect("static field map");
        Self {
            project_key: "beta1".into(),
            source_key: "salesforce-issues".into(),
            feedback_type: "Issue".into(),
            id_prefix: "ISS".into(),
            id_digits: 4,
            id_start: 1,
            default_status: Some("New".into()),
            default_team: "Participants".into(),
            allowed_statuses: vec!["New".into()],
            default_submitter: Some("relay@example.com".into()),
            status_key: "status".into(),
            submitter_key: "submitter".into(),
            unknown_submitter: UnknownSubmitter::Reject,
            strict_unknown_keys: false,
            success_status: 200,
            fields,
        }
    }
}

/// What to do with a submitter that matches no user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UnknownSubmitter {
    #[default]
    Reject,
    FallbackToDefault,
}

/// Validation of one mapped JSON key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FieldSpec {
    /// Centercode form element name (empty = the JSON key).
    pub element: String,
    #[serde(rename = "type")]
    pub kind: FieldType,
    pub required: bool,
    /// In characters (text only).
    pub max_length: Option<usize>,
    pub choices: Vec<String>,
}

/// Field type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    #[default]
    Text,
    Choice,
    Multichoice,
}

/// Route patterns; `{listenerKey}`, `{projectKey}`, `{sourceKey}` capture one path segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RoutesConfig {
    pub user_macro_listener: String,
    pub project_user_listener: String,
    pub external_source: String,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        Self {
            user_macro_listener: "/api/v1/userMacroListeners/{listenerKey}".into(),
            project_user_listener: "/api/v1/projects/{projectKey}/userMacroListeners/{listenerKey}"
                .into(),
            external_source: "/api/v1/projects/{projectKey}/externalSources/{sourceKey}".into(),
        }
    }
}

/// Body size limits (413 above them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LimitsConfig {
    pub listener_max_body_bytes: usize,
    pub source_max_body_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            listener_max_body_bytes: 65_536,
            source_max_body_bytes: 5_242_880,
        }
    }
}

/// Latency: `baseMs + uniform(0, jitterMs)` from a seeded RNG; sync macro success adds `syncMacroExtraMs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LatencyConfig {
    pub base_ms: u64,
    pub jitter_ms: u64,
    pub sync_macro_extra_ms: u64,
    pub seed: u64,
}

impl Default for LatencyConfig {
    /// The doc's values (25 + 0..25 ms, sync +200 ms, seed 42).
    fn default() -> Self {
        Self {
            base_ms: 25,
            jitter_ms: 25,
            sync_macro_extra_ms: 200,
            seed: 42,
        }
    }
}

/// Token-bucket rate limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub requests_per_minute: u32,
    /// When set, the bucket refills at this many requests per second instead of
    /// `requestsPerMinute` per minute (a WAF's per-second capacity).
    pub requests_per_second: Option<f64>,
    /// Bucket size: requests that may arrive at once. Default: a minute's worth.
    pub burst: Option<u32>,
    /// 429, or 403 to mimic an AWS WAF block.
    pub status_on_throttle: u16,
    pub retry_after_style: RetryAfterStyle,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            requests_per_minute: 60,
            requests_per_second: None,
            burst: None,
            status_on_throttle: 429,
            retry_after_style: RetryAfterStyle::Seconds,
        }
    }
}

/// `Retry-After` form on 429.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfterStyle {
    #[default]
    Seconds,
    HttpDate,
    #[serde(rename = "none")]
    Omit,
}

/// Format of error bodies (§7.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorBodyStyle {
    #[default]
    Json,
    Text,
    Html,
    Empty,
}

/// Clock used for async removals and the rate limiter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockMode {
    #[default]
    Wall,
    Virtual,
}

// ---- Faults and records ----

/// A queued one-shot fault (§7.7), consumed by `times` matching `/api/v1` requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Fault {
    pub route: FaultRoute,
    pub times: u32,
    pub status: u16,
    /// Delta-seconds or HTTP-date; `None` = no header. JSON numbers are accepted too.
    #[serde(deserialize_with = "de_opt_string")]
    pub retry_after: Option<String>,
    pub content_type: Option<String>,
    pub body: Option<String>,
    /// Extra delay; for `hang` the hold time (default 120000).
    pub delay_ms: Option<u64>,
    pub mode: FaultMode,
}

impl Default for Fault {
    fn default() -> Self {
        Self {
            route: FaultRoute::Any,
            times: 1,
            status: 503,
            retry_after: None,
            content_type: None,
            body: None,
            delay_ms: None,
            mode: FaultMode::Respond,
        }
    }
}

/// Route kinds; `Any` only makes sense in a fault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FaultRoute {
    #[default]
    Any,
    UserMacroListener,
    ProjectUserListener,
    ExternalSource,
}

impl FaultRoute {
    fn name(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::UserMacroListener => "userMacroListener",
            Self::ProjectUserListener => "projectUserListener",
            Self::ExternalSource => "externalSource",
        }
    }
}

/// How a fault behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultMode {
    /// Send `status` (after `delayMs`).
    #[default]
    Respond,
    /// Hold the request for `delayMs`, then close the connection without answering.
    Hang,
    /// Read the request, close the connection without a response.
    Drop,
    /// Apply the normal side effects, then close without a response ("outcome unknown").
    SucceedThenDrop,
}

/// One `/api/v1` request as seen by the fake (`GET /__fake/requests`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedRequest {
    /// Same value as the `X-Fake-Request-Id` response header.
    pub id: String,
    /// Arrival time, RFC 3339 UTC.
    pub at: String,
    /// Route kind name, or `unmatched`.
    pub route: String,
    pub method: String,
    pub path: String,
    /// Form-decoded query; the `apiKey` value is replaced by `"***"`.
    pub query: Map<String, Value>,
    pub headers: BTreeMap<String, String>,
    /// UTF-8 (lossy) body, truncated to 64 KiB.
    pub body_text: String,
    /// Body bytes actually read (0 when rejected on `Content-Length` alone).
    pub body_bytes: usize,
    /// Final status; 0 when the connection was dropped or hung.
    pub status: u16,
    pub response_headers: BTreeMap<String, String>,
    /// The `apiKey` equals a configured key (enabled or not).
    pub api_key_valid: bool,
    pub duration_ms: u64,
    /// The same, in microseconds.
    #[serde(default)]
    pub duration_us: u64,
}

// ---- Shared state ----

struct Shared {
    startup: FakeConfig,
    state: Mutex<State>,
    /// Woken on every recorded request (for `wait_for_requests`).
    notify: Notify,
}

struct State {
    config: Arc<FakeConfig>,
    users: Vec<User>,
    /// (arrival sequence, record), kept in arrival order although records complete out of order.
    requests: Vec<(u64, RecordedRequest)>,
    next_seq: u64,
    feedback: Vec<Value>,
    macro_runs: Vec<Value>,
    faults: VecDeque<Fault>,
    /// `Some(retryAfter)` while maintenance mode is on.
    maintenance: Option<String>,
    origin: Instant,
    clock_offset_ms: u64,
    /// (lower-cased e-mail, due time on the fake clock).
    pending_removals: Vec<(String, u64)>,
    counters: HashMap<(String, String), u64>,
    /// Rate-limit buckets: (tokens, last refill µs).
    buckets: HashMap<String, (f64, u64)>,
    /// Requests refused by the rate limit since the start (or the last reset).
    throttled: u64,
    rng: StdRng,
}

impl State {
    fn new(config: FakeConfig) -> Self {
        Self {
            users: config.users.clone(),
            rng: StdRng::seed_from_u64(config.latency.seed),
            config: Arc::new(config),
            requests: vec![],
            next_seq: 0,
            feedback: vec![],
            macro_runs: vec![],
            faults: VecDeque::new(),
            maintenance: None,
            origin: Instant::now(),
            clock_offset_ms: 0,
            pending_removals: vec![],
            counters: HashMap::new(),
            buckets: HashMap::new(),
            throttled: 0,
        }
    }

    /// Milliseconds on the fake clock; advancing also moves the wall clock so that
    /// `/__fake/clock/advance` is useful in both modes.
    fn now_ms(&self) -> u64 {
        match self.config.clock {
            ClockMode::Virtual => self.clock_offset_ms,
            ClockMode::Wall => self.origin.elapsed().as_millis() as u64 + self.clock_offset_ms,
        }
    }

    /// Completes async removals that are due. Called lazily on every access instead of
    /// running timers, which keeps the virtual clock deterministic.
    fn process_due(&mut self) {
        let now = self.now_ms();
        let (due, later): (Vec<_>, Vec<_>) = self
            .pending_removals
            .drain(..)
            .partition(|(_, at)| *at <= now);
        self.pending_removals = later;
        for (email, _) in due {
            self.users.retain(|u| {
                !(u.state == UserState::PendingRemoval && u.email.trim().to_lowercase() == email)
            });
        }
    }

    fn take_fault(&mut self, kind: Option<FaultRoute>) -> Option<Fault> {
        let idx = self
            .faults
            .iter()
            .position(|f| f.route == FaultRoute::Any || Some(f.route) == kind)?;
        let fault = self.faults[idx].clone();
        if fault.times <= 1 {
            self.faults.remove(idx);
        } else {
            self.faults[idx].times -= 1;
        }
        Some(fault)
    }

    fn next_latency(&mut self) -> u64 {
        let l = &self.config.latency;
        let (base, jitter) = (l.base_ms, l.jitter_ms);
        base + if jitter > 0 {
            self.rng.gen_range(0..=jitter)
        } else {
            0
        }
    }

    /// Microseconds on the fake clock (the rate limit refills per µs: at 55 requests/s a
    /// millisecond clock would round refills away).
    fn now_us(&self) -> u64 {
        match self.config.clock {
            ClockMode::Virtual => self.clock_offset_ms * 1000,
            ClockMode::Wall => {
                self.origin.elapsed().as_micros() as u64 + self.clock_offset_ms * 1000
            }
        }
    }

    /// Token bucket; returns the wait in ms until the next token when throttled.
    fn throttle(&mut self, who: &str) -> Option<u64> {
        let now = self.now_us();
        let rl = &self.config.rate_limit;
        let per_us = match rl.requests_per_second {
            Some(rps) if rps > 0.0 => rps / 1_000_000.0,
            _ => f64::from(rl.requests_per_minute.max(1)) / 60_000_000.0,
        };
        let cap = f64::from(rl.burst.unwrap_or(rl.requests_per_minute).max(1));
        let bucket = self.buckets.entry(who.to_string()).or_insert((cap, now));
        bucket.0 = (bucket.0 + now.saturating_sub(bucket.1) as f64 * per_us).min(cap);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            None
        } else {
            self.throttled += 1;
            Some(((1.0 - bucket.0) / per_us / 1000.0).ceil() as u64)
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not wedge the fake for the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, seq: u64, rec: RecordedRequest) {
        {
            let mut st = self.lock();
            let pos = st.requests.partition_point(|(s, _)| *s < seq);
            st.requests.insert(pos, (seq, rec));
        }
        self.notify.notify_waiters();
    }
}

/// Records the request when dropped, so hung/dropped requests (and handler futures cancelled
/// by a client disconnect) still appear in the log, with status 0.
struct RecordGuard {
    shared: Arc<Shared>,
    seq: u64,
    started: Instant,
    rec: Option<RecordedRequest>,
}

impl RecordGuard {
    fn finish(mut self, status: u16, headers: BTreeMap<String, String>) {
        if let Some(rec) = self.rec.as_mut() {
            rec.status = status;
            rec.response_headers = headers;
        }
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            let took = self.started.elapsed();
            rec.duration_ms = took.as_millis() as u64;
            rec.duration_us = took.as_micros() as u64;
            self.shared.record(self.seq, rec);
        }
    }
}

// ---- Server handle ----

/// A running fake Centercode server.
pub struct FakeCentercode {
    shared: Arc<Shared>,
    addr: SocketAddr,
    handle: ServerHandle,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl FakeCentercode {
    /// Starts on `127.0.0.1` with an ephemeral port.
    pub async fn start(config: FakeConfig) -> std::io::Result<Self> {
        Self::start_on(config, "127.0.0.1:0").await
    }

    /// Starts on `bind` (e.g. `127.0.0.1:9090`). Must be called inside a tokio runtime.
    pub async fn start_on(config: FakeConfig, bind: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            startup: config.clone(),
            state: Mutex::new(State::new(config)),
            notify: Notify::new(),
        });
        let data = web::Data::from(shared.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                // Control-plane bodies are JSON whatever the Content-Type (handy with curl).
                .app_data(
                    web::JsonConfig::default()
                        .content_type_required(false)
                        .limit(16 << 20),
                )
                .wrap_fn(|req, srv| {
                    let fut = srv.call(req);
                    async move {
                        let mut res = fut.await?;
                        // The /api/v1 handler sets its own id (== the record id); add one elsewhere.
                        if !res.headers().contains_key(REQUEST_ID_HEADER) {
                            let id = HeaderValue::from_str(&Uuid::new_v4().to_string())
                                .expect("uuid is ascii");
                            res.headers_mut()
                                .insert(HeaderName::from_static(REQUEST_ID_HEADER), id);
                        }
                        Ok(res)
                    }
                })
                .route("/__fake/reset", web::post().to(ctl_reset))
                .route("/__fake/config", web::get().to(ctl_get_config))
                .route("/__fake/config", web::put().to(ctl_put_config))
                .route("/__fake/users", web::get().to(ctl_get_users))
                .route("/__fake/users", web::put().to(ctl_put_users))
                .route("/__fake/requests", web::get().to(ctl_requests))
                .route("/__fake/throttled", web::get().to(ctl_throttled))
                .route("/__fake/feedback", web::get().to(ctl_feedback))
                .route("/__fake/macro-runs", web::get().to(ctl_macro_runs))
                .route("/__fake/faults", web::post().to(ctl_push_fault))
                .route("/__fake/faults", web::delete().to(ctl_clear_faults))
                .route("/__fake/maintenance", web::post().to(ctl_maintenance))
                .route("/__fake/clock/advance", web::post().to(ctl_clock_advance))
                .default_service(web::to(api_v1))
        })
        // Runs inside the relay's tests and process: one worker, and no signal handlers of its own.
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
        let handle = server.handle();
        let task = tokio::spawn(server);
        tracing::debug!(%addr, "fake Centercode started");
        Ok(Self {
            shared,
            addr,
            handle,
            task: Some(task),
        })
    }

    /// `http://IP:PORT` (an unspecified bind address is reported as 127.0.0.1).
    pub fn base_url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            self.addr.ip()
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Recorded `/api/v1` requests in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .lock()
            .requests
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Created feedback records.
    pub fn feedback(&self) -> Vec<Value> {
        self.shared.lock().feedback.clone()
    }

    /// Recorded macro runs (`{listenerKey, email, mode, at}`).
    pub fn macro_runs(&self) -> Vec<Value> {
        self.shared.lock().macro_runs.clone()
    }

    /// Requests refused by the rate limit (`rateLimit`) so far.
    pub fn throttled(&self) -> u64 {
        self.shared.lock().throttled
    }

    /// Appends a fault to the FIFO queue.
    pub fn push_fault(&self, fault: Fault) {
        self.shared.lock().faults.push_back(fault);
    }

    /// Replaces the user store.
    pub fn set_users(&self, users: Vec<User>) {
        self.shared.lock().users = users;
    }

    /// Waits until at least `n` requests are recorded and returns them.
    /// Panics with the number that arrived if `timeout` passes first.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            // Register before checking so a record made in between is not missed.
            notified.as_mut().enable();
            let reqs = self.requests();
            if reqs.len() >= n {
                return reqs;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let got = self.requests().len();
                panic!(
                    "fake Centercode: waited {timeout:?} for {n} request(s), only {got} arrived"
                );
            }
        }
    }

    /// Stops the server (in-flight requests are aborted).
    pub async fn stop(mut self) {
        self.handle.stop(false).await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FakeCentercode {
    fn drop(&mut self) {
        // Forgetting `stop()` must not leave worker threads serving; the command is sent eagerly.
        if self.task.is_some() {
            drop(self.handle.stop(false));
        }
    }
}

// ---- /api/v1 pipeline (§7.3) ----

/// A response to send (after `delay_ms`).
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    content_type: Option<String>,
    body: Vec<u8>,
    delay_ms: u64,
}

enum Outcome {
    Reply(Reply),
    /// Close the connection without a response after this many ms.
    Drop(u64),
}

struct Ctx<'a> {
    req: &'a HttpRequest,
    cfg: &'a FakeConfig,
    query: &'a [(String, String)],
    routed: Option<(FaultRoute, HashMap<String, String>)>,
    body: &'a [u8],
    too_large: bool,
}

/// A response body that fails at once: actix-http then aborts the connection before the
/// buffered response head is flushed, so the client sees a closed connection, not a status.
struct DropConnection;

impl MessageBody for DropConnection {
    type Error = std::io::Error;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Poll::Ready(Some(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "fake: dropping connection",
        ))))
    }
}

async fn api_v1(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let started = Instant::now();
    if !req.path().starts_with("/api/v1/") {
        return json_response(
            404,
            &json!({"error": {"code": "not_found", "message": "no such route"}}),
        );
    }
    let id = Uuid::new_v4().to_string();
    let (cfg, seq) = {
        let mut st = shared.lock();
        st.next_seq += 1;
        (st.config.clone(), st.next_seq)
    };
    let query = parse_form(req.query_string());
    let routed = match_route(&cfg.routes, req.path());
    let kind = routed.as_ref().map(|(k, _)| *k);
    let limit = match kind {
        Some(FaultRoute::UserMacroListener | FaultRoute::ProjectUserListener) => {
            cfg.limits.listener_max_body_bytes
        }
        _ => cfg.limits.source_max_body_bytes,
    };
    let declared: Option<usize> = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    // §7.3.7: answer 413 on Content-Length alone, without reading the body.
    let (body, too_large) = if declared.is_some_and(|n| n > limit) {
        (Bytes::new(), true)
    } else {
        match payload.to_bytes_limited(limit).await {
            Ok(Ok(b)) => (b, false),
            Ok(Err(_)) => (Bytes::new(), false),
            Err(_) => (Bytes::new(), true),
        }
    };
    let api_key = first(&query, "apiKey");
    let mut masked = Map::new();
    for (k, v) in &query {
        let v = if k == "apiKey" { "***" } else { v.as_str() };
        masked
            .entry(k.clone())
            .or_insert_with(|| Value::String(v.to_string()));
    }
    let mut headers = BTreeMap::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v: &mut String| *v = format!("{v}, {value}"))
            .or_insert(value);
    }
    let text_end = body.len().min(MAX_BODY_TEXT);
    let guard = RecordGuard {
        shared: shared.clone().into_inner(),
        seq,
        started,
        rec: Some(RecordedRequest {
            id: id.clone(),
            at: rfc3339(SystemTime::now()),
            route: kind.map_or("unmatched", FaultRoute::name).to_string(),
            method: req.method().to_string(),
            path: req.path().to_string(),
            query: masked,
            headers,
            body_text: String::from_utf8_lossy(&body[..text_end]).into_owned(),
            body_bytes: body.len(),
            status: 0,
            response_headers: BTreeMap::new(),
            api_key_valid: api_key.is_some_and(|k| cfg.api_keys.iter().any(|c| c.key == k)),
            duration_ms: 0,
            duration_us: 0,
        }),
    };
    let cx = Ctx {
        req: &req,
        cfg: &cfg,
        query: &query,
        routed,
        body: &body,
        too_large,
    };
    let outcome = decide(&shared, &cx);
    match outcome {
        Outcome::Reply(reply) => {
            precise_sleep_until(started + Duration::from_millis(reply.delay_ms)).await;
            let mut builder = HttpResponse::build(
                StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            );
            builder.insert_header((REQUEST_ID_HEADER, id.as_str()));
            for (name, value) in &reply.headers {
                builder.insert_header((*name, value.as_str()));
            }
            if let Some(ct) = &reply.content_type {
                builder.insert_header((CONTENT_TYPE, ct.as_str()));
            }
            let resp = builder.body(reply.body);
            let resp_headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            guard.finish(resp.status().as_u16(), resp_headers);
            resp
        }
        Outcome::Drop(delay) => {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            drop(guard); // recorded with status 0
            HttpResponse::Ok().body(DropConnection)
        }
    }
}

/// Resolve at `deadline`, to within tens of microseconds. tokio's timer rounds deadlines up
/// to its next millisecond tick, which made a configured 20 ms answer take 20.5–21 ms on
/// average; the benchmark measures the relay against exactly that configured latency.
async fn precise_sleep_until(deadline: Instant) {
    if deadline <= Instant::now() {
        return;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if precise_timer().send((deadline, tx)).is_ok() {
        let _ = rx.await;
    } else {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

type TimerEntry = (Instant, tokio::sync::oneshot::Sender<()>);

/// One thread for the whole process: it waits on its channel with a timeout (a futex with
/// a high-resolution kernel timer) until the earliest deadline, then fires what is due.
fn precise_timer() -> std::sync::mpsc::Sender<TimerEntry> {
    static TIMER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<TimerEntry>>> =
        std::sync::OnceLock::new();
    TIMER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<TimerEntry>();
            std::thread::Builder::new()
                .name("fake-timer".into())
                .spawn(move || run_timer(rx))
                .expect("spawn the fake's timer thread");
            Mutex::new(tx)
        })
        .lock()
        .expect("timer lock")
        .clone()
}

fn run_timer(rx: std::sync::mpsc::Receiver<TimerEntry>) {
    use std::cmp::Reverse;
    use std::sync::mpsc::RecvTimeoutError;
    // (deadline, sequence) orders the heap; the senders live in a map by sequence.
    let mut due: std::collections::BinaryHeap<Reverse<(Instant, u64)>> = Default::default();
    let mut waiting: HashMap<u64, tokio::sync::oneshot::Sender<()>> = HashMap::new();
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        while let Some(Reverse((at, n))) = due.peek().copied() {
            if at > now {
                break;
            }
            due.pop();
            if let Some(tx) = waiting.remove(&n) {
                let _ = tx.send(());
            }
        }
        let next = match due.peek() {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(Reverse((at, _))) => rx.recv_timeout(at.saturating_duration_since(now)),
        };
        match next {
            Ok((at, tx)) => {
                seq += 1;
                due.push(Reverse((at, seq)));
                waiting.insert(seq, tx);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Steps 1–8 of §7.3 (state changes happen here, under the lock; the handler sleeps after).
fn decide(shared: &Shared, cx: &Ctx<'_>) -> Outcome {
    let mut st = shared.lock();
    st.process_due();
    let latency = st.next_latency();
    if let Some(fault) = st.take_fault(cx.routed.as_ref().map(|(k, _)| *k)) {
        let delay = fault.delay_ms.unwrap_or(0);
        return match fault.mode {
            FaultMode::Respond => {
                let mut reply = fault_reply(&fault, cx.cfg.error_body_style);
                reply.delay_ms = latency + delay;
                Outcome::Reply(reply)
            }
            FaultMode::Hang => Outcome::Drop(fault.delay_ms.unwrap_or(DEFAULT_HANG_MS)),
            FaultMode::Drop => Outcome::Drop(latency + delay),
            FaultMode::SucceedThenDrop => {
                let _ = normal(&mut st, cx);
                Outcome::Drop(latency + delay)
            }
        };
    }
    let mut reply = normal(&mut st, cx);
    reply.delay_ms += latency;
    Outcome::Reply(reply)
}

fn normal(st: &mut State, cx: &Ctx<'_>) -> Reply {
    let style = cx.cfg.error_body_style;
    if let Some(retry_after) = &st.maintenance {
        let mut r = error_reply(ErrorBodyStyle::Html, 503, "maintenance", None);
        r.headers.push(("Retry-After", retry_after.clone()));
        return r;
    }
    let client_ip = cx.req.peer_addr().map(|a| a.ip());
    let api_key = first(cx.query, "apiKey").filter(|k| !k.is_empty());
    let rl = &cx.cfg.rate_limit;
    if rl.enabled {
        let who = api_key.map_or_else(
            || client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            str::to_string,
        );
        if let Some(wait_ms) = st.throttle(&who) {
            let mut r = error_reply(style, rl.status_on_throttle, "rate_limited", None);
            let secs = wait_ms.div_ceil(1000).max(1);
            if rl.status_on_throttle == 429 {
                match rl.retry_after_style {
                    RetryAfterStyle::Seconds => r.headers.push(("Retry-After", secs.to_string())),
                    RetryAfterStyle::HttpDate => r.headers.push((
                        "Retry-After",
                        httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(secs)),
                    )),
                    RetryAfterStyle::Omit => {}
                }
            }
            return r;
        }
    }
    let Some((kind, caps)) = &cx.routed else {
        return error_reply(style, 404, "not_found", None);
    };
    if cx.req.method() != Method::POST {
        let mut r = error_reply(style, 405, "method_not_allowed", None);
        r.headers.push(("Allow", "POST".into()));
        return r;
    }
    let Some(key) = api_key else {
        return error_reply(style, 401, "missing_api_key", None);
    };
    let Some(key_cfg) = cx.cfg.api_keys.iter().find(|k| k.key == key) else {
        return error_reply(style, 401, "invalid_api_key", None);
    };
    if !key_cfg.enabled {
        return error_reply(style, 403, "api_key_disabled", None);
    }
    if !key_cfg.allowed_ips.is_empty()
        && !key_cfg
            .allowed_ips
            .iter()
            .any(|ip| ip.trim().parse::<IpAddr>().ok() == client_ip)
    {
        return error_reply(style, 403, "ip_not_allowed", None);
    }
    if cx.too_large {
        return error_reply(style, 413, "payload_too_large", None);
    }
    match kind {
        FaultRoute::ExternalSource => handle_source(st, cx, caps),
        _ => handle_listener(st, cx, *kind, caps),
    }
}

/// §7.4.
fn handle_listener(
    st: &mut State,
    cx: &Ctx<'_>,
    kind: FaultRoute,
    caps: &HashMap<String, String>,
) -> Reply {
    let style = cx.cfg.error_body_style;
    let key = caps
        .get("listenerKey")
        .map(String::as_str)
        .unwrap_or_default();
    let project = caps.get("projectKey");
    let scope = if kind == FaultRoute::UserMacroListener {
        Scope::Community
    } else {
        Scope::Project
    };
    let Some(listener) = cx.cfg.user_macro_listeners.iter().find(|l| {
        l.key == key
            && l.scope == scope
            && (scope == Scope::Community
                || l.project_key.is_none()
                || l.project_key.as_ref() == project)
    }) else {
        return error_reply(style, 404, "listener_not_found", None);
    };
    let find = first(cx.query, "find")
        .unwrap_or_default()
        .trim()
        .to_lowercase();
    if find.is_empty() {
        return error_reply(style, 400, "missing_find", None);
    }
    let Some(idx) = st
        .users
        .iter()
        .position(|u| u.email.trim().to_lowercase() == find)
    else {
        return error_reply(style, 404, "user_not_found", None);
    };
    let user = st.users[idx].clone();
    if user.state == UserState::PendingRemoval {
        return match listener.repeat_while_pending {
            RepeatWhilePending::Accepted => body_reply(202, &listener.success_body),
            RepeatWhilePending::Conflict => error_reply(style, 409, "macro_in_progress", None),
        };
    }
    if let Some(teams) = &listener.filter_teams {
        if !user.teams.iter().any(|t| teams.contains(t)) {
            // Deliberately the same answer as an unknown user (A10).
            return error_reply(style, 404, "user_not_found", None);
        }
    }
    let mode = match listener.mode {
        MacroMode::Sync => "sync",
        MacroMode::Async => "async",
    };
    st.macro_runs.push(json!({
        "listenerKey": listener.key, "email": user.email, "mode": mode, "at": rfc3339(SystemTime::now()),
    }));
    match listener.mode {
        MacroMode::Sync => {
            st.users.remove(idx);
            let mut r = body_reply(200, &listener.success_body);
            r.delay_ms = cx.cfg.latency.sync_macro_extra_ms;
            r
        }
        MacroMode::Async => {
            st.users[idx].state = UserState::PendingRemoval;
            let due = st.now_ms() + listener.async_delay_ms;
            st.pending_removals.push((find, due));
            body_reply(202, &listener.success_body)
        }
    }
}

fn is_blank(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.trim().is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        _ => false,
    }
}

/// §7.5.
fn handle_source(st: &mut State, cx: &Ctx<'_>, caps: &HashMap<String, String>) -> Reply {
    let style = cx.cfg.error_body_style;
    let err = |status, code| error_reply(style, status, code, None);
    let field_err = |code, field: &str| error_reply(style, 400, code, Some(field));
    let is_json = cx
        .req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        });
    if !is_json {
        let status = cx.cfg.unsupported_content_type_status;
        return err(status, "unsupported_content_type");
    }
    let (project, source_key) = (caps.get("projectKey"), caps.get("sourceKey"));
    let Some(src) = cx
        .cfg
        .external_sources
        .iter()
        .find(|s| Some(&s.project_key) == project && Some(&s.source_key) == source_key)
    else {
        return err(404, "source_not_found");
    };
    let Ok(body) = serde_json::from_slice::<Value>(cx.body) else {
        return err(400, "invalid_json");
    };
    let Some(obj) = body.as_object() else {
        return err(400, "invalid_body");
    };

    let status_value = obj.get(&src.status_key);
    let status = if is_blank(status_value) {
        match &src.default_status {
            Some(s) => s.clone(),
            None => return err(400, "missing_status"),
        }
    } else {
        match status_value.and_then(Value::as_str) {
            Some(s) if src.allowed_statuses.iter().any(|a| a == s) => s.to_string(),
            _ => return err(400, "invalid_status"),
        }
    };

    let submitter_value = obj.get(&src.submitter_key);
    let submitter = if is_blank(submitter_value) {
        match &src.default_submitter {
            Some(s) => s.clone(),
            None => return err(400, "missing_submitter"),
        }
    } else {
        let wanted = submitter_value
            .and_then(Value::as_str)
            .map(|s| s.trim().to_lowercase());
        match wanted.and_then(|w| st.users.iter().find(|u| u.email.trim().to_lowercase() == w)) {
            Some(u) => u.email.clone(),
            None => match (src.unknown_submitter, &src.default_submitter) {
                (UnknownSubmitter::FallbackToDefault, Some(d)) => d.clone(),
                _ => return err(404, "submitter_not_found"),
            },
        }
    };

    let mut mapped = Map::new();
    for (key, spec) in &src.fields {
        let value = obj.get(key);
        if is_blank(value) {
            if spec.required {
                return field_err("missing_field", key);
            }
            continue;
        }
        let value = value.expect("not blank");
        let ok_str = |s: &str| spec.choices.iter().any(|c| c == s);
        match spec.kind {
            FieldType::Text => {
                let Some(s) = value.as_str() else {
                    return field_err("invalid_field_type", key);
                };
                if spec.max_length.is_some_and(|max| s.chars().count() > max) {
                    return field_err("field_too_long", key);
                }
            }
            FieldType::Choice => match value.as_str() {
                None => return field_err("invalid_field_type", key),
                Some(s) if !ok_str(s) => return field_err("invalid_choice", key),
                Some(_) => {}
            },
            FieldType::Multichoice => {
                let Some(items) = value.as_array() else {
                    return field_err("invalid_field_type", key);
                };
                for item in items {
                    match item.as_str() {
                        None => return field_err("invalid_field_type", key),
                        Some(s) if !ok_str(s) => return field_err("invalid_choice", key),
                        Some(_) => {}
                    }
                }
            }
        }
        let element = if spec.element.is_empty() {
            key
        } else {
            &spec.element
        };
        mapped.insert(element.clone(), value.clone());
    }
    let ignored: Vec<&String> = obj
        .keys()
        .filter(|k| {
            !src.fields.contains_key(*k) && **k != src.status_key && **k != src.submitter_key
        })
        .collect();
    if let (true, Some(first_unknown)) = (src.strict_unknown_keys, ignored.first()) {
        return field_err("unknown_field", first_unknown);
    }

    let counter = st
        .counters
        .entry((src.project_key.clone(), src.source_key.clone()))
        .or_insert(src.id_start);
    let n = *counter;
    *counter += 1;
    let id = format!("{}-{:0width$}", src.id_prefix, n, width = src.id_digits);
    st.feedback.push(json!({
        "id": id,
        "projectKey": src.project_key,
        "sourceKey": src.source_key,
        "feedbackType": src.feedback_type,
        "status": status,
        "team": src.default_team,
        "submitter": submitter,
        "fields": mapped,
        "ignoredKeys": ignored,
        "rawBody": String::from_utf8_lossy(cx.body),
        "receivedAt": rfc3339(SystemTime::now()),
    }));
    let body = json!({"id": id, "feedbackType": src.feedback_type, "status": status, "team": src.default_team});
    Reply {
        status: src.success_status,
        headers: vec![],
        content_type: Some(JSON_CT.into()),
        body: body.to_string().into_bytes(),
        delay_ms: 0,
    }
}

// ---- Response helpers ----

fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The fake's error body in the configured style (§7.1); the message is derived from the code
/// because the relay must not depend on error bodies anyway (A6).
fn error_reply(style: ErrorBodyStyle, status: u16, code: &str, field: Option<&str>) -> Reply {
    let message = match field {
        Some(f) => format!("{} ({f})", code.replace('_', " ")),
        None => code.replace('_', " "),
    };
    let (content_type, body) = match style {
        ErrorBodyStyle::Json => {
            let mut error = json!({"code": code, "message": message});
            if let Some(field) = field {
                error["field"] = json!(field);
            }
            (Some(JSON_CT), json!({ "error": error }).to_string())
        }
        ErrorBodyStyle::Text => (Some("text/plain; charset=utf-8"), message),
        ErrorBodyStyle::Html => (
            Some("text/html; charset=utf-8"),
            format!(
                "<html><body><h1>{status} {}</h1><p>{}</p></body></html>",
                reason(status),
                html_escape(&message)
            ),
        ),
        ErrorBodyStyle::Empty => (None, String::new()),
    };
    Reply {
        status,
        headers: vec![],
        content_type: content_type.map(String::from),
        body: body.into_bytes(),
        delay_ms: 0,
    }
}

/// A success body: JSON if it parses, text otherwise, nothing when empty.
fn body_reply(status: u16, body: &str) -> Reply {
    let content_type = if body.is_empty() {
        None
    } else if serde_json::from_str::<Value>(body).is_ok() {
        Some(JSON_CT.to_string())
    } else {
        Some("text/plain; charset=utf-8".to_string())
    };
    Reply {
        status,
        headers: vec![],
        content_type,
        body: body.as_bytes().to_vec(),
        delay_ms: 0,
    }
}

fn fault_reply(fault: &Fault, style: ErrorBodyStyle) -> Reply {
    let mut reply = match (&fault.body, (200..300).contains(&fault.status)) {
        (Some(body), _) => {
            let mut r = body_reply(fault.status, body);
            if fault.content_type.is_some() {
                r.content_type = fault.content_type.clone();
            }
            r
        }
        (None, true) => body_reply(fault.status, "{}"),
        (None, false) => {
            let code = reason(fault.status).to_lowercase().replace([' ', '-'], "_");
            error_reply(style, fault.status, &code, None)
        }
    };
    if let Some(retry_after) = &fault.retry_after {
        reply.headers.push(("Retry-After", retry_after.clone()));
    }
    reply
}

fn json_response<T: Serialize>(status: u16, value: &T) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::OK))
        .insert_header((CONTENT_TYPE, JSON_CT))
        .body(serde_json::to_string(value).unwrap_or_default())
}

// ---- Parsing helpers ----

/// `application/x-www-form-urlencoded` decoding: `+` is a space, then `%XX` (A12).
fn form_decode(s: &str) -> String {
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn parse_form(qs: &str) -> Vec<(String, String)> {
    qs.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

/// First value of a query parameter (exact, case-sensitive name).
fn first<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn match_pattern(pattern: &str, path: &str) -> Option<HashMap<String, String>> {
    let pat: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if pat.len() != segs.len() {
        return None;
    }
    let mut caps = HashMap::new();
    for (p, s) in pat.iter().zip(&segs) {
        if let Some(name) = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            if s.is_empty() {
                return None;
            }
            caps.insert(
                name.to_string(),
                percent_decode_str(s).decode_utf8_lossy().into_owned(),
            );
        } else if p != s {
            return None;
        }
    }
    Some(caps)
}

fn match_route(routes: &RoutesConfig, path: &str) -> Option<(FaultRoute, HashMap<String, String>)> {
    [
        (FaultRoute::UserMacroListener, &routes.user_macro_listener),
        (
            FaultRoute::ProjectUserListener,
            &routes.project_user_listener,
        ),
        (FaultRoute::ExternalSource, &routes.external_source),
    ]
    .into_iter()
    .find_map(|(kind, pattern)| match_pattern(pattern, path).map(|caps| (kind, caps)))
}

/// Accepts a string, a number or null (for `retryAfter`).
fn de_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(serde::de::Error::custom(format!(
            "expected string or number, got {other}"
        ))),
    }
}

/// RFC 3339 UTC with milliseconds, as the relay's admin API writes them. A copy of the
/// relay's formatter: this crate is a test double and must not depend on the relay it fakes
/// a peer of (the relay's demo depends on it).
fn rfc3339(t: SystemTime) -> String {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

// ---- Control plane (§7.7) ----

async fn ctl_reset(shared: web::Data<Shared>) -> HttpResponse {
    *shared.lock() = State::new(shared.startup.clone());
    json_response(200, &json!({"ok": true}))
}

async fn ctl_get_config(shared: web::Data<Shared>) -> HttpResponse {
    let cfg = shared.lock().config.clone();
    json_response(200, &*cfg)
}

async fn ctl_put_config(shared: web::Data<Shared>, cfg: web::Json<FakeConfig>) -> HttpResponse {
    let cfg = cfg.into_inner();
    let mut st = shared.lock();
    // New users, id counters, buckets and RNG; logs, records, faults and the clock are kept.
    st.users = cfg.users.clone();
    st.rng = StdRng::seed_from_u64(cfg.latency.seed);
    st.counters.clear();
    st.buckets.clear();
    st.pending_removals.clear();
    st.config = Arc::new(cfg);
    json_response(200, &*st.config)
}

async fn ctl_get_users(shared: web::Data<Shared>) -> HttpResponse {
    let mut st = shared.lock();
    st.process_due();
    json_response(200, &st.users)
}

async fn ctl_put_users(shared: web::Data<Shared>, users: web::Json<Vec<User>>) -> HttpResponse {
    let users = users.into_inner();
    shared.lock().users = users;
    json_response(200, &json!({"ok": true}))
}

async fn ctl_requests(shared: web::Data<Shared>) -> HttpResponse {
    let st = shared.lock();
    let reqs: Vec<&RecordedRequest> = st.requests.iter().map(|(_, r)| r).collect();
    json_response(200, &reqs)
}

async fn ctl_throttled(shared: web::Data<Shared>) -> HttpResponse {
    json_response(200, &json!({"throttled": shared.lock().throttled}))
}

async fn ctl_feedback(shared: web::Data<Shared>) -> HttpResponse {
    json_response(200, &shared.lock().feedback)
}

async fn ctl_macro_runs(shared: web::Data<Shared>) -> HttpResponse {
    json_response(200, &shared.lock().macro_runs)
}

async fn ctl_push_fault(shared: web::Data<Shared>, fault: web::Json<Fault>) -> HttpResponse {
    let fault = fault.into_inner();
    let mut st = shared.lock();
    st.faults.push_back(fault);
    json_response(200, &json!({"queued": st.faults.len()}))
}

async fn ctl_clear_faults(shared: web::Data<Shared>) -> HttpResponse {
    shared.lock().faults.clear();
    json_response(200, &json!({"queued": 0}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MaintenanceBody {
    on: bool,
    #[serde(default, deserialize_with = "de_opt_string")]
    retry_after: Option<String>,
}

async fn ctl_maintenance(shared: web::Data<Shared>, m: web::Json<MaintenanceBody>) -> HttpResponse {
    let m = m.into_inner();
    shared.lock().maintenance = m.on.then(|| m.retry_after.unwrap_or_else(|| "30".into()));
    json_response(200, &json!({"on": m.on}))
}

#[derive(Deserialize)]
struct AdvanceBody {
    ms: u64,
}

async fn ctl_clock_advance(shared: web::Data<Shared>, a: web::Json<AdvanceBody>) -> HttpResponse {
    let a = a.into_inner();
    let mut st = shared.lock();
    st.clock_offset_ms += a.ms;
    st.process_due();
    json_response(200, &json!({"nowMs": st.now_ms()}))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "test-key";
    const TONY: &str = "tony%40centercode.com";

    async fn fake_with(edit: impl FnOnce(&mut FakeConfig)) -> FakeCentercode {
        let mut cfg = FakeConfig::demo();
        edit(&mut cfg);
        FakeCentercode::start(cfg).await.expect("fake starts")
    }

    /// No pooling: a dropped connection must not be silently retried on another one.
    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    }

    /// `find` goes into the URL as given, so tests control its encoding.
    fn listener_url(fake: &FakeCentercode, listener: &str, find: &str) -> String {
        let base = fake.base_url();
        format!("{base}/api/v1/userMacroListeners/{listener}?find={find}&apiKey={KEY}")
    }

    fn source_url(fake: &FakeCentercode, source: &str) -> String {
        let base = fake.base_url();
        format!("{base}/api/v1/projects/beta1/externalSources/{source}?apiKey={KEY}")
    }

    /// Status and `error.code` ("" when there is none).
    async fn outcome(resp: reqwest::Response) -> (u16, String) {
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        (
            status,
            body["error"]["code"].as_str().unwrap_or("").to_string(),
        )
    }

    async fn removal(fake: &FakeCentercode, listener: &str, find: &str) -> (u16, String) {
        outcome(
            client()
                .post(listener_url(fake, listener, find))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn submit(fake: &FakeCentercode, source: &str, body: Value) -> reqwest::Response {
        client()
            .post(source_url(fake, source))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn control(fake: &FakeCentercode, path: &str, body: Value) -> Value {
        let url = format!("{}/__fake/{path}", fake.base_url());
        let resp = client().post(url).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "control call {path}");
        resp.json().await.unwrap()
    }

    fn ok() -> (u16, String) {
        (200, String::new())
    }

    fn fail(status: u16, code: &str) -> (u16, String) {
        (status, code.to_string())
    }

    #[test]
    fn empty_json_config_is_the_doc_example() {
        let cfg: FakeConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(
            cfg.latency,
            LatencyConfig {
                base_ms: 25,
                jitter_ms: 25,
                sync_macro_extra_ms: 200,
                seed: 42
            }
        );
        assert_eq!(cfg.user_macro_listeners[0].key, "demo");
        assert!(cfg.external_sources[0].fields["title"].required);
        // Rust Default is the same example, only with zero latency.
        let fast = FakeConfig::default();
        assert_eq!(
            fast.latency.base_ms + fast.latency.jitter_ms + fast.latency.sync_macro_extra_ms,
            0
        );
        assert_eq!(
            FakeConfig {
                latency: LatencyConfig::default(),
                ..fast
            },
            cfg
        );
        let fault: Fault =
            serde_json::from_str(r#"{"mode":"succeed-then-drop","retryAfter":2}"#).unwrap();
        assert_eq!(
            (fault.mode, fault.retry_after.as_deref(), fault.times),
            (FaultMode::SucceedThenDrop, Some("2"), 1)
        );
        assert_eq!(form_decode("a+b%2Bc%40d"), "a b+c@d");
    }

    #[tokio::test]
    async fn sync_removal_then_404() {
        let fake = fake_with(|_| {}).await;
        let resp = client()
            .post(listener_url(&fake, "gdpr", TONY))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()[REQUEST_ID_HEADER]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(
            removal(&fake, "gdpr", TONY).await,
            fail(404, "user_not_found")
        );
        assert_eq!(
            removal(&fake, "nope", TONY).await,
            fail(404, "listener_not_found")
        );
        assert_eq!(fake.macro_runs().len(), 1);
        assert_eq!(fake.macro_runs()[0]["mode"], "sync");
        let reqs = fake.wait_for_requests(3, Duration::from_secs(5)).await;
        assert_eq!(reqs[0].id, id);
        assert_eq!(
            reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
            [200, 404, 404]
        );
        fake.stop().await;
    }

    #[tokio::test]
    async fn async_removal_pending_then_clock_advance() {
        let fake = fake_with(|c| c.clock = ClockMode::Virtual).await;
        let marta = "marta.kowalska%40example.org";
        assert_eq!(
            removal(&fake, "gdpr-async", marta).await,
            (202, String::new())
        );
        assert_eq!(
            removal(&fake, "gdpr-async", marta).await,
            (202, String::new())
        );
        assert_eq!(
            fake.macro_runs().len(),
            1,
            "a repeat while pending runs no second macro"
        );
        let users_url = format!("{}/__fake/users", fake.base_url());
        let users: Vec<User> = client()
            .get(users_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            users.iter().find(|u| u.username == "marta").unwrap().state,
            UserState::PendingRemoval
        );
        control(&fake, "clock/advance", json!({"ms": 1999})).await;
        assert_eq!(removal(&fake, "gdpr-async", marta).await.0, 202);
        control(&fake, "clock/advance", json!({"ms": 1})).await;
        assert_eq!(
            removal(&fake, "gdpr-async", marta).await,
            fail(404, "user_not_found")
        );
        fake.stop().await;
    }

    #[tokio::test]
    async fn repeat_while_pending_409() {
        let conflict = |c: &mut FakeConfig| {
            c.user_macro_listeners[1].repeat_while_pending = RepeatWhilePending::Conflict
        };
        let fake = fake_with(conflict).await;
        let aisha = "aisha.okafor%40example.net";
        assert_eq!(removal(&fake, "gdpr-async", aisha).await.0, 202);
        assert_eq!(
            removal(&fake, "gdpr-async", aisha).await,
            fail(409, "macro_in_progress")
        );
        fake.stop().await;
    }

    #[tokio::test]
    async fn plus_must_be_percent_encoded_and_match_is_case_insensitive() {
        let fake = fake_with(|_| {}).await;
        assert_eq!(
            removal(&fake, "gdpr", "o'brien+beta@example.com").await,
            fail(404, "user_not_found")
        );
        assert_eq!(
            removal(&fake, "gdpr", "o'brien%2Bbeta%40example.com").await,
            ok()
        );
        assert_eq!(
            removal(&fake, "gdpr", "+%20AISHA.Okafor%40Example.NET+").await,
            ok()
        );
        assert_eq!(removal(&fake, "gdpr", "+").await, fail(400, "missing_find"));
        assert_eq!(fake.requests()[0].query["find"], "o'brien beta@example.com");
        fake.stop().await;
    }

    #[tokio::test]
    async fn api_key_checks() {
        let fake = fake_with(|c| {
            let key = |key: &str, enabled, ip: &[&str]| ApiKeyConfig {
                key: key.into(),
                enabled,
                allowed_ips: ip.iter().map(|s| s.to_string()).collect(),
            };
            c.api_keys
                .extend([key("off", false, &[]), key("ip", true, &["10.1.2.3"])]);
        })
        .await;
        let base = format!(
            "{}/api/v1/userMacroListeners/gdpr?find={TONY}",
            fake.base_url()
        );
        for (query, status, code) in [
            ("", 401, "missing_api_key"),
            ("&apiKey=", 401, "missing_api_key"),
            ("&apikey=test-key", 401, "missing_api_key"),
            ("&apiKey=wrong", 401, "invalid_api_key"),
            ("&apiKey=off", 403, "api_key_disabled"),
            ("&apiKey=ip", 403, "ip_not_allowed"),
        ] {
            // A bearer header must not count as a key.
            let resp = client()
                .post(format!("{base}{query}"))
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(outcome(resp).await, fail(status, code), "query {query:?}");
        }
        let valid: Vec<bool> = fake.requests().iter().map(|r| r.api_key_valid).collect();
        assert_eq!(valid, [false, false, false, false, true, true]);
        assert!(fake.macro_runs().is_empty());
        fake.stop().await;
    }

    #[tokio::test]
    async fn feedback_created_with_sequential_ids() {
        let fake = fake_with(|_| {}).await;
        let body =
            json!({"summary": "Crash", "severity": "Major", "salesforce_id": "500XX1", "extra": 1});
        for expected in ["ISS-0001", "ISS-0002"] {
            let resp = submit(&fake, "sf-issues", body.clone()).await;
            assert_eq!(resp.status(), 200);
            let created: Value = resp.json().await.unwrap();
            let want = json!({"id": expected, "feedbackType": "Issue", "status": "New", "team": "Participants"});
            assert_eq!(created, want);
        }
        let idea = submit(&fake, "sf-ideas", json!({"summary": "Dark mode"})).await;
        assert_eq!(idea.json::<Value>().await.unwrap()["id"], "IDEA-0001");
        let records = fake.feedback();
        assert_eq!(records.len(), 3, "no deduplication");
        assert_eq!(records[0]["fields"]["Internal Tracking ID"], "500XX1");
        assert_eq!(records[0]["submitter"], "relay@example.com");
        assert_eq!(records[0]["ignoredKeys"], json!(["extra"]));
        fake.stop().await;
    }

    #[tokio::test]
    async fn feedback_validation_errors() {
        let fake = fake_with(|_| {}).await;
        let cases = [
            (
                json!({"description": "no summary"}),
                400,
                "missing_field",
                "summary",
            ),
            (json!({"summary": "  "}), 400, "missing_field", "summary"),
            (
                json!({"summary": "s", "severity": "Blocker"}),
                400,
                "invalid_choice",
                "severity",
            ),
            (
                json!({"summary": "s", "severity": "major"}),
                400,
                "invalid_choice",
                "severity",
            ),
            (
                json!({"summary": "x".repeat(256)}),
                400,
                "field_too_long",
                "summary",
            ),
            (json!({"summary": 5}), 400, "invalid_field_type", "summary"),
            (
                json!({"summary": "s", "status": "Closed"}),
                400,
                "invalid_status",
                "",
            ),
            (
                json!({"summary": "s", "submitter": "nobody@example.com"}),
                404,
                "submitter_not_found",
                "",
            ),
        ];
        for (body, status, code, field) in cases {
            let resp = submit(&fake, "sf-issues", body.clone()).await;
            assert_eq!(resp.status(), status, "{body}");
            let err = resp.json::<Value>().await.unwrap()["error"].clone();
            assert_eq!(
                (err["code"].as_str(), err["field"].as_str().unwrap_or("")),
                (Some(code), field),
                "{body}"
            );
        }
        let body = json!({"summary": "x".repeat(255), "submitter": "TONY@centercode.com"});
        assert_eq!(submit(&fake, "sf-issues", body).await.status(), 200);
        assert_eq!(fake.feedback()[0]["submitter"], "tony@centercode.com");
        fake.stop().await;
    }

    #[tokio::test]
    async fn content_type_json_and_body_checks() {
        let fake = fake_with(|_| {}).await;
        for (ct, body, code) in [
            (
                "text/plain",
                r#"{"summary":"s"}"#,
                "unsupported_content_type",
            ),
            (
                "multipart/form-data; boundary=x",
                "--x--",
                "unsupported_content_type",
            ),
            (
                "application/json; charset=utf-8",
                "{not json",
                "invalid_json",
            ),
            ("application/json", "[1]", "invalid_body"),
        ] {
            let req = client()
                .post(source_url(&fake, "sf-issues"))
                .header("content-type", ct);
            assert_eq!(
                outcome(req.body(body).send().await.unwrap()).await,
                fail(400, code),
                "{ct}"
            );
        }
        let resp = submit(&fake, "unknown", json!({"summary": "s"})).await;
        assert_eq!(outcome(resp).await, fail(404, "source_not_found"));
        fake.stop().await;
    }

    #[tokio::test]
    async fn routing_method_size_and_error_styles() {
        let fake = fake_with(|c| c.error_body_style = ErrorBodyStyle::Text).await;
        let resp = client()
            .get(listener_url(&fake, "gdpr", TONY))
            .send()
            .await
            .unwrap();
        assert_eq!(
            (
                resp.status().as_u16(),
                resp.headers()["allow"].to_str().unwrap()
            ),
            (405, "POST")
        );
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        let big = client()
            .post(listener_url(&fake, "gdpr", TONY))
            .body(vec![b'a'; 70_000]);
        assert_eq!(big.send().await.unwrap().status(), 413);
        let unknown = format!("{}/api/v1/nothing?apiKey={KEY}", fake.base_url());
        assert_eq!(client().post(unknown).send().await.unwrap().status(), 404);
        assert_eq!(fake.requests()[2].route, "unmatched");
        fake.stop().await;
    }

    #[tokio::test]
    async fn rate_limit_429_with_retry_after() {
        let fake = fake_with(|c| {
            c.clock = ClockMode::Virtual;
            c.rate_limit = RateLimitConfig {
                enabled: true,
                requests_per_minute: 2,
                ..RateLimitConfig::default()
            };
        })
        .await;
        assert_eq!(removal(&fake, "gdpr", "x").await.0, 404);
        assert_eq!(removal(&fake, "gdpr", "x").await.0, 404);
        let resp = client()
            .post(listener_url(&fake, "gdpr", "x"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            (
                resp.status().as_u16(),
                resp.headers()["retry-after"].to_str().unwrap()
            ),
            (429, "30")
        );
        control(&fake, "clock/advance", json!({"ms": 30_000})).await;
        assert_eq!(removal(&fake, "gdpr", "x").await.0, 404);
        fake.stop().await;
    }

    #[tokio::test]
    async fn fault_respond_is_fifo_and_one_shot() {
        let fake = fake_with(|_| {}).await;
        let fault = json!({"route": "userMacroListener", "status": 503, "retryAfter": "2",
                           "contentType": "text/html", "body": "<html>busy</html>"});
        assert_eq!(control(&fake, "faults", fault).await["queued"], 1);
        fake.push_fault(Fault {
            route: FaultRoute::ExternalSource,
            status: 502,
            ..Fault::default()
        });
        let resp = client()
            .post(listener_url(&fake, "gdpr", TONY))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(resp.headers()["content-type"], "text/html");
        assert_eq!(resp.text().await.unwrap(), "<html>busy</html>");
        assert_eq!(removal(&fake, "gdpr", TONY).await, ok());
        assert_eq!(
            submit(&fake, "sf-issues", json!({"summary": "s"}))
                .await
                .status(),
            502
        );
        assert!(fake.feedback().is_empty());
        fake.stop().await;
    }

    #[tokio::test]
    async fn fault_hang_times_out_client() {
        let fake = fake_with(|_| {}).await;
        fake.push_fault(Fault {
            mode: FaultMode::Hang,
            delay_ms: Some(400),
            ..Fault::default()
        });
        let started = Instant::now();
        let req = client()
            .post(listener_url(&fake, "gdpr", TONY))
            .timeout(Duration::from_millis(150));
        let err = req.send().await.unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert!(started.elapsed() < Duration::from_millis(400));
        let reqs = fake.wait_for_requests(1, Duration::from_secs(5)).await;
        assert_eq!(reqs[0].status, 0);
        assert!(fake.macro_runs().is_empty());
        fake.stop().await;
    }

    #[tokio::test]
    async fn fault_drop_gives_connection_error() {
        let fake = fake_with(|_| {}).await;
        fake.push_fault(Fault {
            mode: FaultMode::Drop,
            ..Fault::default()
        });
        let err = client()
            .post(listener_url(&fake, "gdpr", TONY))
            .send()
            .await
            .unwrap_err();
        assert!(err.status().is_none() && !err.is_timeout(), "{err:?}");
        let reqs = fake.wait_for_requests(1, Duration::from_secs(5)).await;
        assert_eq!(reqs[0].status, 0);
        assert!(fake.macro_runs().is_empty(), "drop has no side effect");
        assert_eq!(
            removal(&fake, "gdpr", TONY).await,
            ok(),
            "the fault was one-shot"
        );
        fake.stop().await;
    }

    #[tokio::test]
    async fn fault_succeed_then_drop_applies_side_effects() {
        let fake = fake_with(|_| {}).await;
        control(
            &fake,
            "faults",
            json!({"route": "externalSource", "mode": "succeed-then-drop", "times": 2}),
        )
        .await;
        for _ in 0..2 {
            let req = client()
                .post(source_url(&fake, "sf-issues"))
                .json(&json!({"summary": "s"}));
            let err = req.send().await.unwrap_err();
            assert!(err.status().is_none() && !err.is_timeout(), "{err:?}");
        }
        let ids: Vec<Value> = fake.feedback().iter().map(|f| f["id"].clone()).collect();
        assert_eq!(ids, [json!("ISS-0001"), json!("ISS-0002")]);
        let mode = FaultMode::SucceedThenDrop;
        fake.push_fault(Fault {
            route: FaultRoute::UserMacroListener,
            mode,
            ..Fault::default()
        });
        assert!(client()
            .post(listener_url(&fake, "gdpr", TONY))
            .send()
            .await
            .is_err());
        assert_eq!(
            removal(&fake, "gdpr", TONY).await,
            fail(404, "user_not_found"),
            "user was removed"
        );
        fake.stop().await;
    }

    #[tokio::test]
    async fn maintenance_and_reset() {
        let fake = fake_with(|_| {}).await;
        control(
            &fake,
            "maintenance",
            json!({"on": true, "retryAfter": "30"}),
        )
        .await;
        let resp = client()
            .post(listener_url(&fake, "gdpr", TONY))
            .send()
            .await
            .unwrap();
        assert_eq!(
            (
                resp.status().as_u16(),
                resp.headers()["retry-after"].to_str().unwrap()
            ),
            (503, "30")
        );
        assert!(resp.text().await.unwrap().starts_with("<html>"));
        control(&fake, "maintenance", json!({"on": false})).await;
        assert_eq!(removal(&fake, "gdpr", TONY).await, ok());
        control(&fake, "reset", json!({})).await;
        assert!(fake.requests().is_empty() && fake.macro_runs().is_empty());
        assert_eq!(removal(&fake, "gdpr", TONY).await, ok(), "users restored");
        fake.stop().await;
    }

    #[tokio::test]
    async fn requests_log_masks_api_key() {
        let fake = fake_with(|_| {}).await;
        submit(&fake, "sf-issues", json!({"summary": "s"})).await;
        removal(&fake, "gdpr", TONY).await;
        let resp = client()
            .get(format!("{}/__fake/requests", fake.base_url()))
            .send()
            .await
            .unwrap();
        assert!(resp.headers().contains_key(REQUEST_ID_HEADER));
        let text = resp.text().await.unwrap();
        assert!(!text.contains(KEY), "key leaked: {text}");
        let log: Vec<RecordedRequest> = serde_json::from_str(&text).unwrap();
        assert_eq!(log, fake.requests());
        assert_eq!(
            (log[0].query["apiKey"].as_str(), log[0].api_key_valid),
            (Some("***"), true)
        );
        assert_eq!(
            (log[0].route.as_str(), log[0].body_text.as_str()),
            ("externalSource", r#"{"summary":"s"}"#)
        );
        assert_eq!(log[1].query["find"], "tony@centercode.com");
        fake.stop().await;
    }

    #[tokio::test]
    #[should_panic(expected = "only 0 arrived")]
    async fn wait_for_requests_panics_on_timeout() {
        let fake = fake_with(|_| {}).await;
        fake.wait_for_requests(1, Duration::from_millis(50)).await;
    }
}
