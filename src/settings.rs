//! Configuration: layered loading (defaults, `config/$RELAY_ENV.toml`, `--config`, env vars),
//! secrets that never print, and validation that names the offending key.

use crate::domain::OrgId;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The defaults, compiled in so the binary works from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A configuration problem, naming the key and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("configuration error at `{key}`: {message}")]
pub struct SettingsError {
    pub key: String,
    pub message: String,
}

impl SettingsError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub queue: QueueSettings,
    pub worker: WorkerSettings,
    pub centercode: CentercodeSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    #[serde(default)]
    pub admin: AdminSettings,
    #[serde(default)]
    pub control: ControlSettings,
    #[serde(default)]
    pub ledger: LedgerSettings,
    /// The Salesforce org written into (`salesforce_upsert` routes, status write-back).
    pub salesforce: Option<SalesforceSettings>,
    /// One entry per inbound endpoint (`/salesforce/outbound/{name}` or `/salesforce/callout/{name}`).
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
    /// Rate limits per destination, shared by every worker (src/ratelimit.rs).
    #[serde(default)]
    pub limits: Vec<crate::ratelimit::LimitSettings>,
}

/// `[ledger]`: the delivery ledger (src/ledger.rs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSettings {
    /// Keep the ledger (default). `false` turns it off: nothing is recorded and `relay trace`
    /// says so.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The HMAC key of subject keys (hashes of e-mails, so "was x@example.com erased?" can be
    /// answered without the ledger holding the e-mail). At least 32 characters; required in
    /// production. Empty in development: one is generated once and kept beside the queue file
    /// (`{queue.path}.subject-key`, owner-only). Secret: set `RELAY__LEDGER__SUBJECT_KEY`.
    #[serde(default = "empty_secret")]
    pub subject_key: SecretString,
    /// Ledger entries stored longer ago than this are forgotten.
    #[serde(default = "default_ledger_retention_days")]
    pub retention_days: u64,
    /// RabbitMQ backend: the PostgreSQL database of the ledger (`postgres://user:pass@host/db`);
    /// secret, set `RELAY__LEDGER__URL`. The embedded queue keeps its ledger in its own file.
    #[serde(default)]
    pub url: Option<SecretString>,
    /// The PostgreSQL schema the ledger's tables live in (created at start).
    #[serde(default = "default_ledger_schema")]
    pub schema: String,
    /// RabbitMQ backend: record each job in PostgreSQL as soon as it is stored, so a job still
    /// waiting in the broker is traceable. Off by default: every stored job then costs
    /// PostgreSQL a row at ingest (ingest was 0.76x on a 2-core machine, docs/performance.md);
    /// off, a job enters the ledger when a worker first takes it, with the stored and
    /// received times it carries. The embedded queue always answers from its file.
    #[serde(default)]
    pub record_on_store: bool,
}

/// Shortest `ledger.subject_key` accepted in production (and generated in development).
pub const MIN_SUBJECT_KEY_CHARS: usize = 32;

fn default_ledger_schema() -> String {
    "relay_ledger".into()
}

impl Default for LedgerSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            subject_key: empty_secret(),
            retention_days: default_ledger_retention_days(),
            url: None,
            schema: default_ledger_schema(),
            record_on_store: false,
        }
    }
}

fn empty_secret() -> SecretString {
    SecretString::from(String::new())
}

fn default_ledger_retention_days() -> u64 {
    400
}

/// `[control]`: pause state shared by every process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSettings {
    /// How often each process reads the shared pause state (and reports what it believes):
    /// a pause or resume reaches every process within this.
    #[serde(default = "default_control_refresh_ms")]
    pub refresh_ms: u64,
}

impl Default for ControlSettings {
    fn default() -> Self {
        Self {
            refresh_ms: default_control_refresh_ms(),
        }
    }
}

fn default_control_refresh_ms() -> u64 {
    1000
}

/// `[server]`: the inbound HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address to listen on; port 0 picks a free port (tests).
    pub bind: String,
    /// Largest request body accepted; larger bodies get 413 while streaming.
    pub max_body_bytes: usize,
    /// Time allowed to receive a whole request body; well under Salesforce's 60 s.
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// Time allowed to receive the request head.
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// Cap on open connections, so slow clients cannot exhaust the gateway.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests processed at once; more wait (their bodies unread, in the kernel's buffers),
    /// which bounds memory under bursts without refusing Salesforce.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// On SIGTERM, how long in-flight requests and deliveries may take to finish.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// HTTP worker threads; 0 means one per two cores (at least one).
    #[serde(default)]
    pub workers: usize,
    /// Proxies (CIDR) whose `X-Forwarded-For` is believed when checking `allowed_ips`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Serve HTTPS directly (otherwise terminate TLS at a load balancer).
    pub tls: Option<TlsSettings>,
    /// A second listener for `/metrics` and `/admin/*` (health on both), kept off the one
    /// Salesforce calls. Unset: everything on `bind` (local development).
    #[serde(default)]
    pub ops_bind: Option<String>,
    /// How long `/metrics` and `/health/ready` reuse a queue reading or write check, so a
    /// busy scraper or probe costs at most one per this period.
    #[serde(default = "default_probe_cache_ms")]
    pub probe_cache_ms: u64,
}

fn default_probe_cache_ms() -> u64 {
    1000
}

/// `[server.tls]`: certificate and key files (PEM), and optionally the CA that client
/// certificates must chain to (mutual TLS, e.g. Salesforce's client certificate).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Server certificate chain: leaf first, then intermediates (Salesforce needs the full chain).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients must present a certificate issued by this CA.
    pub client_ca: Option<PathBuf>,
}

fn default_body_timeout_ms() -> u64 {
    10_000
}
fn default_header_timeout_ms() -> u64 {
    5_000
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_concurrent_requests() -> usize {
    32
}
fn default_shutdown_grace_secs() -> u64 {
    30
}

/// Which durable queue stores jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueBackend {
    /// One SQLite file (WAL, synchronous=FULL): nothing else to install.
    Embedded,
    /// RabbitMQ: durable (quorum) queues, publisher confirms, per-tier TTL retry queues.
    Rabbitmq,
}

/// The kind of RabbitMQ queues declared for `queue.backend = "rabbitmq"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(try_from = "String")]
pub enum RabbitQueueType {
    /// Replicated Raft queues with at-least-once dead-lettering (RabbitMQ ≥ 3.10).
    #[default]
    Quorum,
    /// Classic durable queues (single node; dead-lettering is at-most-once).
    Classic,
}

impl TryFrom<String> for RabbitQueueType {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "quorum" => Ok(RabbitQueueType::Quorum),
            "classic" => Ok(RabbitQueueType::Classic),
            other => Err(format!(
                "queue.queue_type: expected \"quorum\" or \"classic\", got \"{other}\""
            )),
        }
    }
}

/// `[queue]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub backend: QueueBackend,
    /// The embedded queue's SQLite file.
    pub path: PathBuf,
    /// How long notification ids and Idempotency-Keys are remembered (longer than
    /// Salesforce's 24 h of retries).
    #[serde(default = "default_dedupe_ttl_secs")]
    pub dedupe_ttl_secs: u64,
    /// Visibility timeout of a leased job: a worker that dies leaves it to reappear after this.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// Longest time requests wait for one group commit to gather (microseconds).
    #[serde(default)]
    pub commit_delay_us: u64,
    /// Above this many waiting jobs (ready + retrying) the relay warns and sets
    /// `relay_queue_backlog_high`; it keeps accepting, since refusing Salesforce while storage
    /// is healthy would only move the backlog into Salesforce's 24 h retry window.
    #[serde(default = "default_depth_warning")]
    pub depth_warning: u64,
    /// RabbitMQ only: broker URL (`amqp://` or `amqps://`); it holds a password, so set it
    /// with `RELAY__QUEUE__URL` in production.
    #[serde(default = "default_amqp_url")]
    pub url: SecretString,
    /// RabbitMQ only: prefix of the queue names (`{prefix}.work`, `{prefix}.retry.{i}`,
    /// `{prefix}.parked`) and of the Redis dedupe keys.
    #[serde(default = "default_queue_prefix")]
    pub prefix: String,
    /// RabbitMQ only: `quorum` (default) or `classic`.
    #[serde(default)]
    pub queue_type: RabbitQueueType,
    /// RabbitMQ only: how long to wait for the broker to confirm a publish before the
    /// request is answered 503.
    #[serde(default = "default_confirm_timeout_ms")]
    pub confirm_timeout_ms: u64,
    /// RabbitMQ only: Redis holding the dedupe keys shared by all gateways. Without it the
    /// keys are kept in the gateway's memory, which is only correct with one gateway process
    /// (and forgets them on restart).
    #[serde(default)]
    pub redis_url: Option<SecretString>,
    /// RabbitMQ only: where gateways remember notification ids. Unset: Redis when
    /// `redis_url` is set, else memory. Production refuses memory unless it is explicit,
    /// since a second gateway would then accept duplicates.
    #[serde(default)]
    pub dedupe: Option<DedupeStore>,
}

/// `queue.dedupe`: `redis` or `memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupeStore {
    Redis,
    Memory,
}

fn default_amqp_url() -> SecretString {
    SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f")
}
fn default_queue_prefix() -> String {
    "relay".into()
}
fn default_confirm_timeout_ms() -> u64 {
    5_000
}

fn default_dedupe_ttl_secs() -> u64 {
    90_000
}
fn default_depth_warning() -> u64 {
    100_000
}
fn default_lease_secs() -> u64 {
    120
}

/// `[worker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Jobs delivered at the same time.
    pub concurrency: usize,
    /// Delay before each retry, in seconds (fractions allowed); once used up the job is parked.
    pub retry_schedule_secs: Vec<f64>,
    /// Park a job older than this, whatever its attempts.
    pub max_age_secs: u64,
    /// Upper bound on a `Retry-After` that Centercode asks for.
    #[serde(default = "default_retry_after_max_secs")]
    pub retry_after_max_secs: u64,
    /// How often an idle worker looks for due retries.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Set false to run the gateway only (jobs wait in the queue).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Consecutive transient failures (timeouts, 5xx, connection errors) of one route that
    /// open its circuit: its jobs wait instead of spending retry attempts.
    #[serde(default = "default_circuit_failure_threshold")]
    pub circuit_failure_threshold: u32,
    /// How long an open circuit holds a route's jobs before one job probes Centercode.
    #[serde(default = "default_circuit_cooldown_secs")]
    pub circuit_cooldown_secs: f64,
    /// RabbitMQ only: unacknowledged deliveries the broker may push to one worker process
    /// (`basic.qos` prefetch count); see [`WorkerSettings::prefetch`] for the default.
    #[serde(default)]
    pub prefetch: Option<u16>,
}

fn default_retry_after_max_secs() -> u64 {
    3600
}
fn default_poll_interval_ms() -> u64 {
    500
}
fn default_circuit_failure_threshold() -> u32 {
    5
}
fn default_circuit_cooldown_secs() -> f64 {
    30.0
}
fn default_true() -> bool {
    true
}

impl WorkerSettings {
    /// The prefetch count: as set, or twice `concurrency`. With no more than `concurrency`,
    /// a worker that settles a job waits for the broker to take the ack and push the next
    /// delivery (a Raft round on a quorum queue, ~3 ms here) before it can start again.
    pub fn prefetch(&self) -> u16 {
        self.prefetch.unwrap_or_else(|| {
            self.concurrency
                .saturating_mul(2)
                .clamp(1, usize::from(u16::MAX)) as u16
        })
    }

    pub fn retry_delays(&self) -> Vec<Duration> {
        self.retry_schedule_secs
            .iter()
            .map(|s| Duration::from_secs_f64(*s))
            .collect()
    }
}

/// `[centercode]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentercodeSettings {
    /// Community API key, sent as `apiKey`; set it with `RELAY__CENTERCODE__API_KEY`.
    pub api_key: SecretString,
    /// Per-request timeout for calls to Centercode.
    pub timeout_ms: u64,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable, for local use.
    #[default]
    Pretty,
}

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `relay=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

/// `[admin]`: the admin API under `/admin/`, off unless a token is set.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Bearer token for `/admin/*` (at least 32 characters); set `RELAY__ADMIN__TOKEN`.
    pub token: Option<SecretString>,
}

impl AdminSettings {
    /// The token, when the admin API is enabled.
    pub fn token(&self) -> Option<&SecretString> {
        self.token
            .as_ref()
            .filter(|t| !t.expose_secret().is_empty())
    }
}

/// How Salesforce reaches a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// SOAP Outbound Message (workflow rule or flow).
    OutboundMessage,
    /// JSON from Apex or a Flow HTTP Callout.
    Callout,
    /// JSON from a Centercode macro's Trigger Webhook (`POST /centercode/webhook/{name}`),
    /// written into Salesforce (action `salesforce_upsert`).
    CentercodeWebhook,
}

impl RouteKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            RouteKind::OutboundMessage => "outbound_message",
            RouteKind::Callout => "callout",
            RouteKind::CentercodeWebhook => "centercode_webhook",
        }
    }

    /// Whether the route's jobs come from Salesforce (and go to Centercode).
    pub fn from_salesforce(&self) -> bool {
        !matches!(self, RouteKind::CentercodeWebhook)
    }
}

/// What the worker does in Centercode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// User macro listener: `POST <url>?find=<email>&apiKey=<key>`.
    RemoveUser,
    /// External Source: `POST <url>?apiKey=<key>` with the mapped JSON.
    CreateFeedback,
    /// External-data user listener: `POST <url>?find=<email>&apiKey=<key>` with the mapped JSON.
    StoreUserData,
    /// Into Salesforce: `PATCH …/sobjects/{sobject}/{external_id_field}/{value}` with the
    /// mapped fields (src/salesforce.rs); many ready jobs go as one Collections upsert.
    SalesforceUpsert,
    /// A job's outcome written back onto its Salesforce record (`[routes.status_writeback]`);
    /// the relay creates these jobs, no route is configured with it.
    SalesforceStatus,
}

impl Action {
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::RemoveUser => "remove_user",
            Action::CreateFeedback => "create_feedback",
            Action::StoreUserData => "store_user_data",
            Action::SalesforceUpsert => "salesforce_upsert",
            Action::SalesforceStatus => "salesforce_status",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "remove_user" => Some(Action::RemoveUser),
            "create_feedback" => Some(Action::CreateFeedback),
            "store_user_data" => Some(Action::StoreUserData),
            "salesforce_upsert" => Some(Action::SalesforceUpsert),
            "salesforce_status" => Some(Action::SalesforceStatus),
            _ => None,
        }
    }

    /// Whether the destination is Salesforce rather than Centercode.
    pub fn to_salesforce(&self) -> bool {
        matches!(self, Action::SalesforceUpsert | Action::SalesforceStatus)
    }

    /// Who answers this action's calls, as people name it.
    pub fn destination(&self) -> &'static str {
        if self.to_salesforce() {
            "Salesforce"
        } else {
            "Centercode"
        }
    }

    /// Where this action's jobs come from, as people name it.
    pub fn source(&self) -> &'static str {
        match self {
            Action::SalesforceUpsert => "Centercode",
            Action::SalesforceStatus => "the relay (a status write-back)",
            _ => "Salesforce",
        }
    }

    /// Whether sending the same request twice is harmless at the destination (an upsert by
    /// external id is).
    pub fn is_idempotent(&self) -> bool {
        !matches!(self, Action::CreateFeedback)
    }
}

/// What a 404 from a `store_user_data` listener means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnUserNotFound {
    #[default]
    Park,
    Done,
}

/// What to do when a request may have reached Centercode but no answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnOutcomeUnknown {
    /// Send again later (safe for idempotent actions).
    Retry,
    /// Park with reason `outcome_unknown` so a person checks before replaying.
    Park,
}

/// Callout authentication; secrets usually come from `RELAY_ROUTE__<NAME>__BEARER` /
/// `RELAY_ROUTE__<NAME>__HMAC_SECRET`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CalloutAuth {
    pub bearer: Option<SecretString>,
    /// `centercode_webhook` routes: the header Centercode's macro sends the token in
    /// (default `X-Relay-Token`); Centercode does not sign its webhooks.
    pub header: Option<String>,
    /// `centercode_webhook` routes: the static token, compared in constant time; set it with
    /// `RELAY_ROUTE__<NAME>__TOKEN`.
    pub token: Option<SecretString>,
    pub hmac_secret: Option<SecretString>,
    /// Allowed clock skew for `X-Relay-Timestamp`.
    #[serde(default = "default_hmac_window_secs")]
    pub hmac_window_secs: u64,
    /// Also accept `v1=` signatures (timestamp and body only, not the Idempotency-Key), for
    /// senders not yet moved to `v2=`. Off by default: v1 lets a captured request be replayed
    /// under a new key within the window.
    #[serde(default)]
    pub hmac_accept_v1: bool,
}

fn default_hmac_window_secs() -> u64 {
    300
}

/// One Centercode field: where its value comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FieldMapping {
    /// Shorthand: `description = "Description__c"`.
    From(String),
    /// Full form.
    Rule(FieldRule),
}

/// `{ from = ..., required = ..., max_len = ..., map = {...}, default = ..., value = ... }`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    /// A Salesforce field name (Outbound Messages) or a JSON pointer (callouts).
    pub from: Option<String>,
    /// A constant instead of `from`.
    pub value: Option<serde_json::Value>,
    /// Park the job when the value is missing or blank (and there is no default).
    #[serde(default)]
    pub required: bool,
    /// Park the job when the value is longer than this many characters.
    pub max_len: Option<usize>,
    /// Translate Salesforce values to Centercode values; an unlisted value uses `default`.
    pub map: Option<BTreeMap<String, String>>,
    /// Used when the value is missing, blank or not in `map`.
    pub default: Option<serde_json::Value>,
}

impl FieldMapping {
    pub fn rule(&self) -> FieldRule {
        match self {
            FieldMapping::From(from) => FieldRule {
                from: Some(from.clone()),
                ..FieldRule::default()
            },
            FieldMapping::Rule(rule) => rule.clone(),
        }
    }
}

/// `[routes.status_writeback]`: where a job's outcome lands on its Salesforce record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusWriteback {
    /// The record's sObject; default: the Outbound Message's (callouts must name it).
    pub sobject: Option<String>,
    /// Gets `Sent to Centercode (200)`, `User not found in Centercode`, `Parked: <reason>`.
    pub status_field: String,
    /// Gets the detail (Centercode's status, the park reason), up to 255 characters.
    pub detail_field: Option<String>,
    /// Gets the time of the outcome (RFC 3339, UTC).
    pub time_field: Option<String>,
}

/// `[salesforce]`: the one org the relay writes into (Centercode → Salesforce and status
/// write-back). Secrets through the environment: `RELAY__SALESFORCE__PRIVATE_KEY` (PEM
/// text) or `RELAY__SALESFORCE__CLIENT_SECRET`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceSettings {
    /// Token endpoint base: `{login_url}/services/oauth2/token`; also the JWT audience.
    #[serde(default = "default_sf_login_url")]
    pub login_url: String,
    /// The JWT `aud`, when it differs from `login_url` (a My Domain token URL with the
    /// audience `https://login.salesforce.com`).
    pub audience: Option<String>,
    /// Consumer key of the External Client App (JWT `iss`, client-credentials id).
    pub client_id: String,
    /// The integration user (JWT `sub`).
    pub username: Option<String>,
    /// PEM file of the private key whose certificate is uploaded to the app.
    pub private_key_file: Option<std::path::PathBuf>,
    /// The private key as PEM text (`RELAY__SALESFORCE__PRIVATE_KEY`).
    pub private_key: Option<SecretString>,
    /// Instead of a key: the client-credentials flow.
    pub client_secret: Option<SecretString>,
    #[serde(default = "default_sf_api_version")]
    pub api_version: String,
    /// Sent as `Sforce-Call-Options: client=…` on every write.
    #[serde(default = "default_sf_client_name")]
    pub client_name: String,
    /// Stop writing when this share of the org's daily API allocation is used.
    #[serde(default = "default_sf_max_api_share")]
    pub max_api_share: f64,
    /// Per-request timeout.
    #[serde(default = "default_sf_timeout_ms")]
    pub timeout_ms: u64,
    /// Most records in one Collections upsert (Salesforce allows 200); 1 sends each alone.
    #[serde(default = "default_sf_batch_size")]
    pub batch_size: usize,
    /// How long writes wait after `REQUEST_LIMIT_EXCEEDED` or the API share was reached,
    /// before one call looks again.
    #[serde(default = "default_sf_limit_wait_secs")]
    pub limit_wait_secs: u64,
}

fn default_sf_login_url() -> String {
    "https://login.salesforce.com".into()
}
fn default_sf_api_version() -> String {
    "61.0".into()
}
fn default_sf_client_name() -> String {
    "centercode-relay".into()
}
fn default_sf_max_api_share() -> f64 {
    0.5
}
fn default_sf_timeout_ms() -> u64 {
    20_000
}
fn default_sf_batch_size() -> usize {
    200
}
fn default_sf_limit_wait_secs() -> u64 {
    60
}

/// `[[routes]]`: one Salesforce source to one Centercode target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Appears in the inbound URL.
    pub name: String,
    pub kind: RouteKind,
    /// Orgs allowed to send (15- or 18-char ids; compared on the 15-char prefix).
    #[serde(default)]
    pub org_ids: Vec<String>,
    /// Outbound Messages only: the sObject type accepted.
    pub sobject: Option<String>,
    pub action: Action,
    /// Full Centercode URL, copied from Centercode (opaque). Not for `salesforce_upsert`.
    #[serde(default)]
    pub url: String,
    /// Field holding the user's e-mail (a field name, or a JSON pointer for callouts).
    pub email_field: Option<String>,
    /// Centercode key = mapping.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldMapping>,
    /// Overrides `centercode.api_key` for this route.
    pub api_key: Option<SecretString>,
    /// Callouts only.
    pub auth: Option<CalloutAuth>,
    /// Callouts only: JSON pointer used as the idempotency key when no `Idempotency-Key`
    /// header is sent (Flow HTTP Callouts cannot set per-request headers).
    pub idempotency_key_field: Option<String>,
    /// `store_user_data` only.
    #[serde(default)]
    pub on_user_not_found: OnUserNotFound,
    /// Defaults to `park` for create_feedback (not idempotent in Centercode), `retry` otherwise.
    pub on_outcome_unknown: Option<OnOutcomeUnknown>,
    /// A secret path segment: the route then answers only at `/salesforce/outbound/{name}/{token}`
    /// (set it with `RELAY_ROUTE__<NAME>__PATH_TOKEN`).
    pub path_token: Option<SecretString>,
    /// Client addresses (CIDR) allowed to call this route; empty allows any. Salesforce's
    /// ranges: https://ip-ranges.salesforce.com/ip-ranges.json
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// Keep the payload of a completed job this many days in the ledger (default 0: gone
    /// when the job completes), e.g. to resend feedback Centercode lost.
    #[serde(default)]
    pub keep_payload_days: u32,
    /// The record's version, for per-record order (src/ordering.rs): a field of the
    /// Outbound Message's sObject, or for callouts a JSON pointer (`/record/SystemModstamp`)
    /// or top-level key. Default: `SystemModstamp`, else `LastModifiedDate`; a message
    /// without one is versioned by the time it reached the relay.
    #[serde(default)]
    pub version_field: Option<String>,
    /// Callouts: where the Salesforce record id is (JSON pointer or top-level key). Default:
    /// a top-level `recordId`, `record_id` or `Id`. Jobs with a record id are delivered in
    /// version order per record and can be traced by it.
    #[serde(default)]
    pub record_id_field: Option<String>,
    /// `salesforce_upsert`: the field whose value names the record (`Centercode_Id__c`).
    pub external_id_field: Option<String>,
    /// `salesforce_upsert`: JSON pointer to the external id's value in the webhook body.
    pub external_id: Option<String>,
    /// `centercode_webhook`: JSON pointers whose values together make the dedupe key (e.g.
    /// the feedback id and its modified time); empty: a hash of the body.
    #[serde(default)]
    pub dedupe: Vec<String>,
    /// Salesforce → Centercode routes: write each job's outcome back onto the originating
    /// Salesforce record (src/writeback.rs).
    pub status_writeback: Option<StatusWriteback>,
    /// Production only: accept an outbound_message route with none of `path_token`,
    /// `allowed_ips` or mutual TLS (warned at start and shown on `/admin/routes`).
    #[serde(default)]
    pub insecure_open: bool,
}

impl RouteSettings {
    pub fn parsed_org_ids(&self) -> Vec<OrgId> {
        self.org_ids
            .iter()
            .filter_map(|o| OrgId::parse(o).ok())
            .collect()
    }

    pub fn on_outcome_unknown(&self) -> OnOutcomeUnknown {
        self.on_outcome_unknown
            .unwrap_or(if self.action.is_idempotent() {
                OnOutcomeUnknown::Retry
            } else {
                OnOutcomeUnknown::Park
            })
    }

    /// The environment variable prefix for this route's secrets.
    pub fn env_prefix(&self) -> String {
        let upper: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("RELAY_ROUTE__{upper}__")
    }
}

/// Deployment environment, from `RELAY_ENV`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Local,
    Test,
    Production,
}

impl Environment {
    pub fn as_str(&self) -> &'static str {
        match self {
            Environment::Local => "local",
            Environment::Test => "test",
            Environment::Production => "production",
        }
    }

    pub fn from_env() -> Result<Self, SettingsError> {
        match std::env::var("RELAY_ENV").as_deref() {
            Err(_) | Ok("") | Ok("local") => Ok(Environment::Local),
            Ok("test") => Ok(Environment::Test),
            Ok("production") => Ok(Environment::Production),
            Ok(other) => Err(SettingsError::new(
                "RELAY_ENV",
                format!("unknown environment `{other}`; expected local, test or production"),
            )),
        }
    }
}

impl Settings {
    /// The longest one delivery can take: a Centercode call, or a Salesforce write (signing
    /// in and the call, and both again after `INVALID_SESSION_ID`). The record's hold and the
    /// lease must outlast it.
    pub fn longest_delivery_ms(&self) -> u64 {
        let salesforce = self
            .salesforce
            .as_ref()
            .map_or(0, |sf| sf.timeout_ms.saturating_mul(4));
        self.centercode.timeout_ms.max(salesforce)
    }

    /// The RabbitMQ prefetch count: `worker.prefetch` as set; else twice `concurrency`, plus
    /// one full Collections batch when a route upserts into Salesforce. The batcher keeps
    /// each record unacknowledged until its Collections call answers, so with only twice
    /// `concurrency` deliveries a batch could never grow past that many records.
    pub fn prefetch(&self) -> u16 {
        let upserts = self
            .routes
            .iter()
            .any(|r| r.action == Action::SalesforceUpsert);
        let batch = match &self.salesforce {
            Some(sf) if upserts && self.worker.prefetch.is_none() => sf.batch_size,
            _ => 0,
        };
        (usize::from(self.worker.prefetch()) + batch).min(usize::from(u16::MAX)) as u16
    }

    /// Load: built-in defaults, `config/default.toml`, `config/$RELAY_ENV.toml`, then `extra`
    /// (`--config FILE`), then `RELAY__SECTION__KEY` variables; then per-route secrets and
    /// validation. The config directory is `RELAY_CONFIG_DIR` or `./config`.
    pub fn load(extra: Option<&Path>) -> Result<Self, SettingsError> {
        let env = Environment::from_env()?;
        let dir = std::env::var_os("RELAY_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("config"));
        let mut builder = ::config::Config::builder()
            .add_source(::config::File::from_str(
                DEFAULT_TOML,
                ::config::FileFormat::Toml,
            ))
            .add_source(::config::File::from(dir.join("default.toml")).required(false))
            .add_source(
                ::config::File::from(dir.join(format!("{}.toml", env.as_str()))).required(false),
            );
        if let Some(path) = extra {
            if !path.exists() {
                return Err(SettingsError::new(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            builder = builder.add_source(::config::File::from(path));
        }
        builder = builder.add_source(
            ::config::Environment::with_prefix("RELAY")
                .prefix_separator("__")
                .separator("__"),
        );
        let raw = builder.build().map_err(config_error)?;
        let mut settings: Settings = raw.try_deserialize().map_err(config_error)?;
        settings.apply_route_secrets_from_env();
        settings.validate_for(env)?;
        Ok(settings)
    }

    /// Parse one TOML document on top of the built-in defaults (tests, demo).
    pub fn from_toml(toml_text: &str) -> Result<Self, SettingsError> {
        let raw = ::config::Config::builder()
            .add_source(::config::File::from_str(
                DEFAULT_TOML,
                ::config::FileFormat::Toml,
            ))
            .add_source(::config::File::from_str(
                toml_text,
                ::config::FileFormat::Toml,
            ))
            .build()
            .map_err(config_error)?;
        let mut settings: Settings = raw.try_deserialize().map_err(config_error)?;
        settings.apply_route_secrets_from_env();
        settings.validate()?;
        Ok(settings)
    }

    fn apply_route_secrets_from_env(&mut self) {
        for route in &mut self.routes {
            let prefix = route.env_prefix();
            let var = |name: &str| {
                std::env::var(format!("{prefix}{name}"))
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(SecretString::from)
            };
            if let Some(key) = var("API_KEY") {
                route.api_key = Some(key);
            }
            if let Some(token) = var("PATH_TOKEN") {
                route.path_token = Some(token);
            }
            let bearer = var("BEARER");
            let hmac = var("HMAC_SECRET");
            let token = var("TOKEN");
            if bearer.is_some() || hmac.is_some() || token.is_some() {
                let auth = route.auth.get_or_insert_with(|| CalloutAuth {
                    hmac_window_secs: default_hmac_window_secs(),
                    ..CalloutAuth::default()
                });
                if bearer.is_some() {
                    auth.bearer = bearer;
                }
                if hmac.is_some() {
                    auth.hmac_secret = hmac;
                }
                if token.is_some() {
                    auth.token = token;
                }
            }
        }
    }

    /// Cross-field rules for the environment `RELAY_ENV` names.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.validate_for(Environment::from_env()?)
    }

    /// Cross-field rules. Every error names the key and what is expected. Production adds
    /// the refusals of [`Settings::validate_production`].
    pub fn validate_for(&self, env: Environment) -> Result<(), SettingsError> {
        self.validate_ranges()?;
        self.validate_salesforce(env)?;
        if env == Environment::Production {
            self.validate_production()?;
        }
        self.server.bind.parse::<SocketAddr>().map_err(|_| {
            SettingsError::new("server.bind", "expected host:port, e.g. 127.0.0.1:8080")
        })?;
        if let Some(ops) = &self.server.ops_bind {
            let ops: SocketAddr = ops.parse().map_err(|_| {
                SettingsError::new("server.ops_bind", "expected host:port, e.g. 0.0.0.0:9090")
            })?;
            if ops.port() != 0 && Some(ops) == self.server.bind.parse().ok() {
                return Err(SettingsError::new(
                    "server.ops_bind",
                    "must differ from server.bind",
                ));
            }
        }
        if self.server.probe_cache_ms > 60_000 {
            return Err(SettingsError::new(
                "server.probe_cache_ms",
                "expected at most 60000",
            ));
        }
        if self.server.max_body_bytes < 1024 {
            return Err(SettingsError::new(
                "server.max_body_bytes",
                "expected at least 1024",
            ));
        }
        if self.queue.backend == QueueBackend::Rabbitmq {
            self.validate_rabbitmq()?;
        }
        if self.queue.path.as_os_str().is_empty() {
            return Err(SettingsError::new("queue.path", "expected a file path"));
        }
        if let Some(tls) = &self.server.tls {
            for (name, path) in [
                ("cert_file", Some(&tls.cert_file)),
                ("key_file", Some(&tls.key_file)),
                ("client_ca", tls.client_ca.as_ref()),
            ] {
                if let Some(path) = path {
                    if !path.is_file() {
                        return Err(SettingsError::new(
                            format!("server.tls.{name}"),
                            format!("{} is not a readable file", path.display()),
                        ));
                    }
                }
            }
        }
        if let Err((j, e)) = crate::netaddr::parse_list(&self.server.trusted_proxies) {
            return Err(SettingsError::new(
                format!("server.trusted_proxies[{j}]"),
                e,
            ));
        }
        if self.server.max_concurrent_requests == 0 {
            return Err(SettingsError::new(
                "server.max_concurrent_requests",
                "expected at least 1",
            ));
        }
        if self.worker.concurrency == 0 {
            return Err(SettingsError::new(
                "worker.concurrency",
                "expected at least 1",
            ));
        }
        if self
            .admin
            .token()
            .is_some_and(|t| t.expose_secret().len() < 32)
        {
            return Err(SettingsError::new(
                "admin.token",
                "expected at least 32 characters (e.g. `openssl rand -hex 32`), or leave it empty to turn the admin API off",
            ));
        }
        if self.centercode.timeout_ms == 0 {
            return Err(SettingsError::new(
                "centercode.timeout_ms",
                "expected more than 0",
            ));
        }
        // A delivery's lease is renewed when it starts if it waited longer than
        // LEASE_REFRESH_AFTER (0.5 s) since its lease; so the worst case left for the call
        // is lease - 0.5 s, which must cover the longest delivery.
        let refresh_ms = crate::worker::LEASE_REFRESH_AFTER.as_millis() as u64;
        if self.queue.lease_secs.saturating_mul(1000)
            <= self.longest_delivery_ms().saturating_add(refresh_ms)
        {
            return Err(SettingsError::new(
                "queue.lease_secs",
                "must be longer than the longest delivery plus 0.5 s (centercode.timeout_ms, or with [salesforce] 4 × salesforce.timeout_ms: signing in and the write, twice after an expired session; a job may wait 0.5 s after its lease before its lease is renewed), or a slow delivery would be handed to a second worker",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            self.validate_route(i, route)?;
            if !names.insert(route.name.as_str()) {
                return Err(SettingsError::new(
                    format!("routes[{i}].name"),
                    format!("route name `{}` is used twice", route.name),
                ));
            }
        }
        crate::ratelimit::validate(&self.limits, &self.routes)?;
        Ok(())
    }

    /// Numbers that would panic or overflow when turned into durations or timestamps.
    fn validate_ranges(&self) -> Result<(), SettingsError> {
        const DAY: u64 = 86_400;
        for (key, value, max) in [
            ("queue.lease_secs", self.queue.lease_secs, 7 * DAY),
            (
                "queue.dedupe_ttl_secs",
                self.queue.dedupe_ttl_secs,
                366 * DAY,
            ),
            (
                "queue.commit_delay_us",
                self.queue.commit_delay_us,
                1_000_000,
            ),
            (
                "queue.confirm_timeout_ms",
                self.queue.confirm_timeout_ms,
                3_600_000,
            ),
            ("worker.max_age_secs", self.worker.max_age_secs, 366 * DAY),
            (
                "worker.retry_after_max_secs",
                self.worker.retry_after_max_secs,
                30 * DAY,
            ),
            (
                "worker.poll_interval_ms",
                self.worker.poll_interval_ms,
                3_600_000,
            ),
            (
                "centercode.timeout_ms",
                self.centercode.timeout_ms,
                3_600_000,
            ),
            (
                "server.body_timeout_ms",
                self.server.body_timeout_ms,
                3_600_000,
            ),
            (
                "server.header_timeout_ms",
                self.server.header_timeout_ms,
                3_600_000,
            ),
            (
                "server.shutdown_grace_secs",
                self.server.shutdown_grace_secs,
                DAY,
            ),
        ] {
            if value > max {
                return Err(SettingsError::new(key, format!("expected at most {max}")));
            }
        }
        if let Some(url) = &self.ledger.url {
            if !matches!(url.expose_secret().split_once("://"), Some(("postgres" | "postgresql", rest)) if !rest.is_empty())
            {
                return Err(SettingsError::new(
                    "ledger.url",
                    "expected postgres://user:password@host:5432/database",
                ));
            }
        }
        if self.ledger.schema.is_empty()
            || !self
                .ledger
                .schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(SettingsError::new(
                "ledger.schema",
                "expected letters, digits, '_' or '-'",
            ));
        }
        if !(50..=60_000).contains(&self.control.refresh_ms) {
            return Err(SettingsError::new(
                "control.refresh_ms",
                "expected 50 to 60000 milliseconds",
            ));
        }
        if self.queue.lease_secs == 0 {
            return Err(SettingsError::new(
                "queue.lease_secs",
                "expected at least 1",
            ));
        }
        let cooldown = self.worker.circuit_cooldown_secs;
        if !cooldown.is_finite() || !(0.0..=DAY as f64).contains(&cooldown) {
            return Err(SettingsError::new(
                "worker.circuit_cooldown_secs",
                format!("expected a number of seconds from 0 to {DAY}"),
            ));
        }
        if let Some(bad) = self
            .worker
            .retry_schedule_secs
            .iter()
            .position(|s| !s.is_finite() || *s < 0.0 || *s > (366 * DAY) as f64)
        {
            return Err(SettingsError::new(
                format!("worker.retry_schedule_secs[{bad}]"),
                "expected a non-negative number of seconds, at most a year",
            ));
        }
        Ok(())
    }

    /// `RELAY_ENV=production` refuses what would expose or lose data.
    fn validate_production(&self) -> Result<(), SettingsError> {
        let mutual_tls = self
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some());
        for (i, route) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            if route.kind == RouteKind::OutboundMessage
                && route.path_token.is_none()
                && route.allowed_ips.is_empty()
                && !mutual_tls
                && !route.insecure_open
            {
                return Err(SettingsError::new(
                    key("path_token"),
                    format!(
                        "in production an outbound_message route needs a path_token ({}PATH_TOKEN), allowed_ips, or mutual TLS (server.tls.client_ca); org_ids is not a secret. Set insecure_open = true to accept anyone who knows the URL",
                        route.env_prefix()
                    ),
                ));
            }
            if route.url.starts_with("http://") {
                return Err(SettingsError::new(
                    key("url"),
                    "in production Centercode URLs must be https:// (the API key travels in the query)",
                ));
            }
            if self.api_key_for(route).expose_secret().is_empty() {
                return Err(SettingsError::new(
                    if route.api_key.is_some() {
                        key("api_key")
                    } else {
                        "centercode.api_key".into()
                    },
                    format!(
                        "in production route `{}` needs a Centercode API key (RELAY__CENTERCODE__API_KEY or {}API_KEY)",
                        route.name,
                        route.env_prefix()
                    ),
                ));
            }
        }
        if self.queue.backend == QueueBackend::Rabbitmq {
            if self.queue.queue_type == RabbitQueueType::Classic {
                return Err(SettingsError::new(
                    "queue.queue_type",
                    "in production use quorum queues; a classic queue lives on one broker node and is lost with it",
                ));
            }
            if self.queue.redis_url.is_none() && self.queue.dedupe != Some(DedupeStore::Memory) {
                return Err(SettingsError::new(
                    "queue.redis_url",
                    "in production a RabbitMQ gateway needs Redis for dedupe (a second gateway would accept duplicates); set queue.dedupe = \"memory\" if exactly one gateway runs",
                ));
            }
            if self.ledger.enabled && self.ledger.url.is_none() {
                return Err(SettingsError::new(
                    "ledger.url",
                    "in production the RabbitMQ backend keeps its delivery ledger in PostgreSQL: set RELAY__LEDGER__URL (or ledger.enabled = false to run without proof of delivery)",
                ));
            }
        }
        if self.ledger.enabled
            && self.ledger.subject_key.expose_secret().chars().count() < MIN_SUBJECT_KEY_CHARS
        {
            return Err(SettingsError::new(
                "ledger.subject_key",
                format!("in production the ledger needs a subject key of at least {MIN_SUBJECT_KEY_CHARS} characters (RELAY__LEDGER__SUBJECT_KEY); it is what lets an erasure be proven without keeping the e-mail"),
            ));
        }
        Ok(())
    }

    /// `[queue]` and `[worker]` keys that only matter with `queue.backend = "rabbitmq"`.
    fn validate_rabbitmq(&self) -> Result<(), SettingsError> {
        let url = self.queue.url.expose_secret();
        // Only the scheme is named in errors: the URL holds the broker password.
        match url.split_once("://") {
            Some(("amqp" | "amqps", rest)) if !rest.is_empty() => {}
            _ => {
                return Err(SettingsError::new(
                    "queue.url",
                    "expected amqp://user:password@host:5672/vhost or amqps://…",
                ))
            }
        }
        if url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(SettingsError::new(
                "queue.url",
                "is not a valid AMQP URI (percent-encode the vhost: `/` is %2f)",
            ));
        }
        let prefix = &self.queue.prefix;
        if prefix.is_empty()
            || prefix.len() > 200
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(SettingsError::new(
                "queue.prefix",
                "expected 1 to 200 letters, digits, '-', '_' or '.'",
            ));
        }
        if self.queue.confirm_timeout_ms == 0 {
            return Err(SettingsError::new(
                "queue.confirm_timeout_ms",
                "expected more than 0",
            ));
        }
        match (self.queue.dedupe, &self.queue.redis_url) {
            (Some(DedupeStore::Redis), None) => {
                return Err(SettingsError::new(
                    "queue.dedupe",
                    "\"redis\" needs queue.redis_url",
                ))
            }
            (Some(DedupeStore::Memory), Some(_)) => {
                return Err(SettingsError::new(
                    "queue.dedupe",
                    "\"memory\" with queue.redis_url set: remove one of them",
                ))
            }
            _ => {}
        }
        if let Some(redis) = &self.queue.redis_url {
            match redis.expose_secret().split_once("://") {
                Some(("redis", rest)) if !rest.is_empty() => {}
                _ => {
                    return Err(SettingsError::new(
                        "queue.redis_url",
                        "expected redis://[:password@]host:6379[/db]",
                    ))
                }
            }
        }
        if self.worker.prefetch == Some(0) {
            return Err(SettingsError::new("worker.prefetch", "expected at least 1"));
        }
        if let Some(bad) = self
            .worker
            .retry_schedule_secs
            .iter()
            .position(|s| *s * 1000.0 > f64::from(u32::MAX))
        {
            return Err(SettingsError::new(
                format!("worker.retry_schedule_secs[{bad}]"),
                "too long for a RabbitMQ message TTL (at most 49 days)",
            ));
        }
        Ok(())
    }

    fn validate_route(&self, i: usize, route: &RouteSettings) -> Result<(), SettingsError> {
        let key = |k: &str| format!("routes[{i}].{k}");
        if route.name.is_empty()
            || !route
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(SettingsError::new(
                key("name"),
                "expected letters, digits, '-' or '_' (it appears in the URL)",
            ));
        }
        if route.action.to_salesforce() || route.kind == RouteKind::CentercodeWebhook {
            self.validate_salesforce_route(i, route)?;
        } else if route.external_id_field.is_some()
            || route.external_id.is_some()
            || !route.dedupe.is_empty()
        {
            return Err(SettingsError::new(
                key("external_id_field"),
                "external_id_field, external_id and dedupe are for centercode_webhook routes",
            ));
        }
        if let Some(wb) = &route.status_writeback {
            self.validate_status_writeback(i, route, wb)?;
        }
        if route.action.to_salesforce() {
            // The destination is the [salesforce] org; the rest is Centercode-only.
            return Ok(());
        }
        match reqwest::Url::parse(&route.url) {
            Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {
                if u.query_pairs().any(|(k, _)| k == "apiKey" || k == "find") {
                    return Err(SettingsError::new(
                        key("url"),
                        "must not contain apiKey or find; the relay adds them (put the key in centercode.api_key)",
                    ));
                }
            }
            _ => {
                return Err(SettingsError::new(
                    key("url"),
                    "expected an http(s) URL copied from Centercode",
                ))
            }
        }
        if let Err((j, e)) = crate::netaddr::parse_list(&route.allowed_ips) {
            return Err(SettingsError::new(
                format!("routes[{i}].allowed_ips[{j}]"),
                e,
            ));
        }
        if route.path_token.as_ref().is_some_and(|t| {
            let t = t.expose_secret();
            t.len() < 16
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }) {
            return Err(SettingsError::new(
                key("path_token"),
                "expected at least 16 letters, digits, '-' or '_' (it is a URL path segment)",
            ));
        }
        for (j, org) in route.org_ids.iter().enumerate() {
            OrgId::parse(org).map_err(|e| {
                SettingsError::new(format!("routes[{i}].org_ids[{j}]"), e.to_string())
            })?;
        }
        let pointer_ok = |p: &str| p.is_empty() || p.starts_with('/');
        match route.kind {
            RouteKind::CentercodeWebhook => {}
            RouteKind::OutboundMessage => {
                if route.org_ids.is_empty() {
                    return Err(SettingsError::new(
                        key("org_ids"),
                        "expected at least one Salesforce org id for an outbound_message route",
                    ));
                }
                match &route.sobject {
                    Some(s)
                        if !s.is_empty()
                            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {}
                    _ => {
                        return Err(SettingsError::new(
                            key("sobject"),
                            "expected the sObject API name this route accepts, e.g. Contact",
                        ))
                    }
                }
                if route.auth.is_some() {
                    return Err(SettingsError::new(
                        key("auth"),
                        "only callout routes take auth",
                    ));
                }
            }
            RouteKind::Callout if route.path_token.is_some() => {
                return Err(SettingsError::new(
                    key("path_token"),
                    "only outbound_message routes take a path token; callouts authenticate with auth",
                ));
            }
            RouteKind::Callout => {
                let auth = route.auth.as_ref();
                let has_secret =
                    auth.is_some_and(|a| a.bearer.is_some() || a.hmac_secret.is_some());
                if !has_secret {
                    return Err(SettingsError::new(
                        key("auth"),
                        format!(
                            "a callout route needs auth = {{ bearer = ... }} or {{ hmac_secret = ... }} (or {}BEARER / {}HMAC_SECRET in the environment)",
                            route.env_prefix(),
                            route.env_prefix()
                        ),
                    ));
                }
                if let Some(a) = auth {
                    for (name, s) in [("bearer", &a.bearer), ("hmac_secret", &a.hmac_secret)] {
                        if s.as_ref().is_some_and(|s| s.expose_secret().len() < 16) {
                            return Err(SettingsError::new(
                                key(&format!("auth.{name}")),
                                "expected at least 16 characters",
                            ));
                        }
                    }
                }
                if let Some(e) = &route.email_field {
                    if !pointer_ok(e) {
                        return Err(SettingsError::new(
                            key("email_field"),
                            "expected a JSON pointer such as /subject/email",
                        ));
                    }
                }
                if let Some(p) = &route.idempotency_key_field {
                    if !pointer_ok(p) {
                        return Err(SettingsError::new(
                            key("idempotency_key_field"),
                            "expected a JSON pointer such as /eventId",
                        ));
                    }
                }
            }
        }
        if matches!(route.action, Action::RemoveUser | Action::StoreUserData)
            && route.email_field.as_deref().unwrap_or("").is_empty()
        {
            return Err(SettingsError::new(
                key("email_field"),
                format!(
                    "action {} needs the field that holds the user's e-mail",
                    route.action.as_str()
                ),
            ));
        }
        if route.keep_payload_days > 366 {
            return Err(SettingsError::new(
                key("keep_payload_days"),
                "expected at most 366 days",
            ));
        }
        if route.action == Action::RemoveUser && !route.fields.is_empty() {
            return Err(SettingsError::new(
                key("fields"),
                "remove_user sends no body; remove [routes.fields]",
            ));
        }
        if route.action != Action::RemoveUser && route.fields.is_empty() {
            return Err(SettingsError::new(
                key("fields"),
                format!(
                    "action {} needs [routes.fields] (Centercode key = Salesforce field)",
                    route.action.as_str()
                ),
            ));
        }
        for (name, mapping) in &route.fields {
            let fkey = format!("routes[{i}].fields.{name}");
            let rule = mapping.rule();
            match (&rule.from, &rule.value) {
                (Some(_), Some(_)) => {
                    return Err(SettingsError::new(
                        fkey,
                        "give either `from` or `value`, not both",
                    ))
                }
                (None, None) => {
                    return Err(SettingsError::new(
                        fkey,
                        "expected `from = \"FieldName\"` or `value = ...`",
                    ))
                }
                (Some(from), None) => {
                    if route.kind == RouteKind::Callout && !pointer_ok(from) {
                        return Err(SettingsError::new(
                            fkey + ".from",
                            "expected a JSON pointer such as /feedback/title",
                        ));
                    }
                    if route.kind == RouteKind::OutboundMessage && from.is_empty() {
                        return Err(SettingsError::new(
                            fkey + ".from",
                            "expected a Salesforce field API name",
                        ));
                    }
                }
                (None, Some(_)) => {}
            }
            if rule.max_len == Some(0) {
                return Err(SettingsError::new(fkey + ".max_len", "expected at least 1"));
            }
        }
        Ok(())
    }

    /// A `centercode_webhook` route: action, target, dedupe, token and mapping.
    fn validate_salesforce_route(
        &self,
        i: usize,
        route: &RouteSettings,
    ) -> Result<(), SettingsError> {
        let key = |k: &str| format!("routes[{i}].{k}");
        let pointer_ok = |p: &str| p.is_empty() || p.starts_with('/');
        let api_name_ok =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if route.kind != RouteKind::CentercodeWebhook || route.action != Action::SalesforceUpsert {
            return Err(SettingsError::new(
                key("action"),
                "a centercode_webhook route takes action = \"salesforce_upsert\", and only it does",
            ));
        }
        if self.salesforce.is_none() {
            return Err(SettingsError::new(
                "salesforce",
                format!("route `{}` writes into Salesforce: add a [salesforce] section (login_url, client_id, and a private key or client secret)", route.name),
            ));
        }
        if !route.sobject.as_deref().is_some_and(api_name_ok) {
            return Err(SettingsError::new(
                key("sobject"),
                "expected the sObject API name to upsert, e.g. Centercode_Feedback__c",
            ));
        }
        if !route.external_id_field.as_deref().is_some_and(api_name_ok) {
            return Err(SettingsError::new(
                key("external_id_field"),
                "expected the external id field's API name, e.g. Centercode_Id__c",
            ));
        }
        match route.external_id.as_deref() {
            Some(p) if p.starts_with('/') => {}
            _ => {
                return Err(SettingsError::new(
                    key("external_id"),
                    "expected a JSON pointer into the webhook body, e.g. /feedback/id",
                ))
            }
        }
        for (j, p) in route.dedupe.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(SettingsError::new(
                    format!("routes[{i}].dedupe[{j}]"),
                    "expected a JSON pointer, e.g. /feedback/modified",
                ));
            }
        }
        if !route.url.is_empty() || route.email_field.is_some() || route.api_key.is_some() {
            return Err(SettingsError::new(
                key("url"),
                "a salesforce_upsert route writes into the [salesforce] org: remove url, email_field and api_key",
            ));
        }
        if route.path_token.is_some() || route.status_writeback.is_some() {
            return Err(SettingsError::new(
                key("path_token"),
                "path_token and status_writeback are for Salesforce → Centercode routes",
            ));
        }
        let token = route.auth.as_ref().and_then(|a| a.token.as_ref());
        match token {
            Some(t) if t.expose_secret().len() >= 16 => {}
            Some(_) => {
                return Err(SettingsError::new(
                    key("auth.token"),
                    "expected at least 16 characters",
                ))
            }
            None => {
                return Err(SettingsError::new(
                    key("auth"),
                    format!(
                        "a centercode_webhook route needs auth = {{ header = \"X-Relay-Token\", token = ... }} (or {}TOKEN in the environment)",
                        route.env_prefix()
                    ),
                ))
            }
        }
        if let Some(h) = route.auth.as_ref().and_then(|a| a.header.as_deref()) {
            if actix_web::http::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(SettingsError::new(
                    key("auth.header"),
                    "expected an HTTP header name such as X-Relay-Token",
                ));
            }
        }
        if route.fields.is_empty() {
            return Err(SettingsError::new(
                key("fields"),
                "salesforce_upsert needs [routes.fields] (Salesforce field = JSON pointer)",
            ));
        }
        for (name, mapping) in &route.fields {
            let fkey = format!("routes[{i}].fields.{name}");
            if !api_name_ok(name) || Some(name) == route.external_id_field.as_ref() {
                return Err(SettingsError::new(
                    fkey,
                    "expected a Salesforce field API name other than the external id field (the relay sets that one)",
                ));
            }
            if let Some(from) = mapping.rule().from {
                if !pointer_ok(&from) {
                    return Err(SettingsError::new(
                        fkey + ".from",
                        "expected a JSON pointer such as /feedback/title",
                    ));
                }
            }
        }
        Ok(())
    }

    /// `[routes.status_writeback]` on a Salesforce → Centercode route.
    fn validate_status_writeback(
        &self,
        i: usize,
        route: &RouteSettings,
        wb: &StatusWriteback,
    ) -> Result<(), SettingsError> {
        let key = |k: &str| format!("routes[{i}].status_writeback.{k}");
        let api_name_ok =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !route.kind.from_salesforce() {
            return Err(SettingsError::new(
                key("status_field"),
                "status_writeback is for Salesforce → Centercode routes",
            ));
        }
        if self.salesforce.is_none() {
            return Err(SettingsError::new(
                "salesforce",
                format!(
                    "route `{}` writes its status back into Salesforce: add a [salesforce] section",
                    route.name
                ),
            ));
        }
        if wb.sobject.is_none() && route.kind == RouteKind::Callout {
            return Err(SettingsError::new(
                key("sobject"),
                "a callout does not say its record's sObject: name it (e.g. Contact)",
            ));
        }
        for (name, value) in [
            ("sobject", wb.sobject.as_deref()),
            ("status_field", Some(wb.status_field.as_str())),
            ("detail_field", wb.detail_field.as_deref()),
            ("time_field", wb.time_field.as_deref()),
        ] {
            if value.is_some_and(|v| !api_name_ok(v)) {
                return Err(SettingsError::new(
                    key(name),
                    "expected a Salesforce API name",
                ));
            }
        }
        Ok(())
    }

    /// `[salesforce]`: one way to authenticate, sane limits.
    fn validate_salesforce(&self, env: Environment) -> Result<(), SettingsError> {
        let Some(sf) = &self.salesforce else {
            return Ok(());
        };
        match reqwest::Url::parse(&sf.login_url) {
            Ok(u) if u.scheme() == "https" => {}
            Ok(u) if u.scheme() == "http" && env != Environment::Production => {}
            _ => {
                return Err(SettingsError::new(
                    "salesforce.login_url",
                    "expected an https URL such as https://login.salesforce.com (or https://test.salesforce.com, or your My Domain)",
                ))
            }
        }
        if sf.client_id.is_empty() {
            return Err(SettingsError::new(
                "salesforce.client_id",
                "expected the External Client App's consumer key",
            ));
        }
        let has_key = sf.private_key_file.is_some() || sf.private_key.is_some();
        match (has_key, sf.client_secret.is_some()) {
            (true, true) => {
                return Err(SettingsError::new(
                    "salesforce.client_secret",
                    "give either a private key (JWT bearer flow) or a client secret (client-credentials flow), not both",
                ))
            }
            (false, false) => {
                return Err(SettingsError::new(
                    "salesforce.private_key_file",
                    "expected private_key_file (or RELAY__SALESFORCE__PRIVATE_KEY) for the JWT bearer flow, or client_secret (RELAY__SALESFORCE__CLIENT_SECRET) for the client-credentials flow",
                ))
            }
            (true, false) if sf.username.as_deref().unwrap_or("").is_empty() => {
                return Err(SettingsError::new(
                    "salesforce.username",
                    "the JWT bearer flow needs the integration user's username (the JWT sub)",
                ))
            }
            _ => {}
        }
        let version_ok = sf.api_version.split_once('.').is_some_and(|(a, b)| {
            a.parse::<u32>().is_ok_and(|v| v >= 46) && b.parse::<u32>().is_ok()
        });
        if !version_ok {
            return Err(SettingsError::new(
                "salesforce.api_version",
                "expected an API version such as 61.0 (46.0 or later: Collections upsert)",
            ));
        }
        if !(sf.max_api_share > 0.0 && sf.max_api_share <= 1.0) {
            return Err(SettingsError::new(
                "salesforce.max_api_share",
                "expected a share of the daily allocation above 0 and at most 1, e.g. 0.5",
            ));
        }
        if !(1..=200).contains(&sf.batch_size) {
            return Err(SettingsError::new(
                "salesforce.batch_size",
                "expected 1 to 200 records per Collections upsert",
            ));
        }
        if sf.timeout_ms == 0 || sf.limit_wait_secs == 0 {
            return Err(SettingsError::new(
                "salesforce.timeout_ms",
                "timeout_ms and limit_wait_secs must be above 0",
            ));
        }
        if sf.client_name.is_empty()
            || !sf
                .client_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(SettingsError::new(
                "salesforce.client_name",
                "expected letters, digits, '-' or '_' (sent as Sforce-Call-Options: client=…)",
            ));
        }
        Ok(())
    }

    /// The route called `name`.
    pub fn route(&self, name: &str) -> Option<&RouteSettings> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// The key a route delivers with.
    pub fn api_key_for<'a>(&'a self, route: &'a RouteSettings) -> &'a SecretString {
        route.api_key.as_ref().unwrap_or(&self.centercode.api_key)
    }
}

fn config_error(e: ::config::ConfigError) -> SettingsError {
    // config's messages name the key ("missing field `x`", "invalid type ... for key `a.b`").
    let text = e.to_string();
    let key = text
        .split("for key `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or("(file)")
        .to_owned();
    SettingsError::new(key, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = r#"
[[routes]]
name = "gdpr-removal"
kind = "outbound_message"
org_ids = ["00D8d000001AbCdEAK"]
sobject = "Contact"
action = "remove_user"
url = "https://acme.centercode.com/api/v1/userMacroListeners/gdpr"
email_field = "Email"

[[routes]]
name = "beta-feedback"
kind = "outbound_message"
org_ids = ["00D8d000001AbCdEAK"]
sobject = "Feedback__c"
action = "create_feedback"
url = "https://acme.centercode.com/api/v1/projects/beta1/externalSources/sf-issues"
[routes.fields]
summary = { from = "Subject__c", required = true, max_len = 255 }
description = "Description__c"
severity = { from = "Priority__c", map = { High = "Major", Medium = "Minor", Low = "Cosmetic" }, default = "Minor" }
status = { value = "New" }
salesforce_id = "Id"
"#;

    #[test]
    fn the_documented_example_loads() {
        let s = Settings::from_toml(ROUTES).expect("valid");
        assert_eq!(s.routes.len(), 2);
        assert_eq!(s.routes[1].fields.len(), 5);
        assert_eq!(s.queue.dedupe_ttl_secs, 90_000);
    }

    #[test]
    fn a_bad_url_is_reported_with_its_key() {
        let bad = ROUTES.replace(
            "https://acme.centercode.com/api/v1/userMacroListeners/gdpr",
            "not a url",
        );
        let err = Settings::from_toml(&bad).unwrap_err();
        assert_eq!(err.key, "routes[0].url");
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let err = Settings::from_toml("[worker]\nconcurrency = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("worker.concurrency"), "{err}");
    }

    const SALESFORCE: &str = r#"
[salesforce]
login_url = "https://login.salesforce.com"
client_id = "3MVG9-consumer-key"
username = "integration@acme.example"
private_key_file = "/run/secrets/sf.pem"
"#;

    /// `[salesforce]` with `line` added or `drop` removed.
    fn salesforce_error(line: &str, drop: &str) -> SettingsError {
        let text = format!("{ROUTES}{}{line}\n", SALESFORCE.replace(drop, ""));
        Settings::from_toml(&text).unwrap_err()
    }

    #[test]
    fn the_salesforce_section_refuses_what_cannot_sign_in() {
        let ok = Settings::from_toml(&format!("{ROUTES}{SALESFORCE}")).expect("valid");
        let sf = ok.salesforce.unwrap();
        assert_eq!(
            (sf.api_version.as_str(), sf.max_api_share, sf.batch_size),
            ("61.0", 0.5, 200)
        );
        assert_eq!(
            salesforce_error("client_secret = \"s\"", "").key,
            "salesforce.client_secret",
            "a key and a secret: which flow?"
        );
        assert_eq!(
            salesforce_error("", "private_key_file = \"/run/secrets/sf.pem\"").key,
            "salesforce.private_key_file",
            "neither"
        );
        assert_eq!(
            salesforce_error("", "username = \"integration@acme.example\"").key,
            "salesforce.username",
            "JWT needs its sub"
        );
        assert_eq!(
            salesforce_error("max_api_share = 1.5", "").key,
            "salesforce.max_api_share"
        );
        assert_eq!(
            salesforce_error("batch_size = 201", "").key,
            "salesforce.batch_size"
        );
        assert_eq!(
            salesforce_error("api_version = \"45.0\"", "").key,
            "salesforce.api_version"
        );
        assert_eq!(
            salesforce_error("client_name = \"a b\"", "").key,
            "salesforce.client_name"
        );
        let http = Settings::from_toml(&format!(
            "{ROUTES}{}",
            SALESFORCE.replace("https://login.salesforce.com", "http://127.0.0.1:9")
        ))
        .expect("http is fine outside production");
        assert_eq!(
            http.validate_salesforce(Environment::Production)
                .unwrap_err()
                .key,
            "salesforce.login_url"
        );
    }

    #[test]
    fn the_lease_and_the_records_hold_outlast_a_salesforce_write() {
        let plain = Settings::from_toml(ROUTES).unwrap();
        assert_eq!(plain.longest_delivery_ms(), plain.centercode.timeout_ms);
        // 4 × 20 s: sign-in and write, twice after an expired session.
        let sf = Settings::from_toml(&format!("{ROUTES}{SALESFORCE}")).unwrap();
        assert_eq!(sf.longest_delivery_ms(), 80_000);
        assert!(crate::ordering::hold_ms(&sf) > 160_000);
        let err = Settings::from_toml(&format!("[queue]\nlease_secs = 60\n{ROUTES}{SALESFORCE}"))
            .unwrap_err();
        assert_eq!(err.key, "queue.lease_secs");
        assert!(err.to_string().contains("salesforce.timeout_ms"), "{err}");
        Settings::from_toml(&format!(
            "[queue]\nlease_secs = 60\n{ROUTES}{SALESFORCE}timeout_ms = 10000\n"
        ))
        .expect("4 × 10 s fits in 60 s");
    }

    #[test]
    fn prefetch_leaves_room_for_a_full_collections_batch_only_where_one_can_form() {
        let webhook = r#"
[[routes]]
name = "cc-feedback"
kind = "centercode_webhook"
action = "salesforce_upsert"
sobject = "Centercode_Feedback__c"
external_id_field = "Centercode_Id__c"
external_id = "/feedback/id"
auth = { header = "X-Relay-Token", token = "webhook-token-0123456789abcdef" }
[routes.fields]
Title__c = "/feedback/title"
"#;
        let plain = Settings::from_toml(&format!("{ROUTES}{SALESFORCE}")).unwrap();
        let twice = 2 * plain.worker.concurrency as u16;
        assert_eq!(
            plain.prefetch(),
            twice,
            "no upsert route: twice concurrency"
        );
        let upserts = Settings::from_toml(&format!("{ROUTES}{webhook}{SALESFORCE}")).unwrap();
        assert_eq!(upserts.prefetch(), twice + 200, "one batch of 200 ahead");
        let set = Settings::from_toml(&format!(
            "[worker]\nprefetch = 5\n{ROUTES}{webhook}{SALESFORCE}"
        ))
        .unwrap();
        assert_eq!(set.prefetch(), 5, "an operator's prefetch stands");
    }

    #[test]
    fn a_status_writeback_needs_the_org_and_an_sobject_it_can_name() {
        let writeback = "[routes.status_writeback]\nstatus_field = \"Centercode_Status__c\"\n";
        let one_route = ROUTES
            .split("\n[[routes]]\nname = \"beta-feedback\"")
            .next()
            .unwrap();
        let err = Settings::from_toml(&format!("{one_route}{writeback}")).unwrap_err();
        assert_eq!(err.key, "salesforce", "{err}");
        let ok =
            Settings::from_toml(&format!("{SALESFORCE}{one_route}{writeback}")).expect("valid");
        assert!(ok.routes[0].status_writeback.is_some());
        let bad_field = writeback.replace("Centercode_Status__c", "Status; DROP");
        let err = Settings::from_toml(&format!("{SALESFORCE}{one_route}{bad_field}")).unwrap_err();
        assert_eq!(err.key, "routes[0].status_writeback.status_field");
    }

    #[test]
    fn secrets_do_not_print() {
        let mut s = Settings::from_toml(ROUTES).unwrap();
        s.centercode.api_key = SecretString::from("super-secret-key");
        assert!(!format!("{s:?}").contains("super-secret-key"));
    }

    /// What production asks of the ledger: a long subject key and, on RabbitMQ, a database.
    fn ledger_ready(s: &mut Settings) {
        s.ledger.subject_key = SecretString::from("k".repeat(MIN_SUBJECT_KEY_CHARS));
        s.ledger.url = Some(SecretString::from("postgres://relay@db/relay".to_owned()));
    }

    #[test]
    fn production_needs_a_long_subject_key_and_on_rabbitmq_a_ledger_database_unless_the_ledger_is_off(
    ) {
        let open = ROUTES
            .replace(
                "email_field = \"Email\"",
                "email_field = \"Email\"\ninsecure_open = true",
            )
            .replace("[routes.fields]", "insecure_open = true\n[routes.fields]");
        let rabbit = format!(
            "[queue]\nbackend = \"rabbitmq\"\nredis_url = \"redis://127.0.0.1:6379\"\n{open}"
        );
        let check = |text: &str, tweak: &dyn Fn(&mut Settings)| {
            let mut s = Settings::from_toml(text).unwrap();
            s.centercode.api_key = SecretString::from("community-key");
            ledger_ready(&mut s);
            tweak(&mut s);
            s.validate_for(Environment::Production).err().map(|e| e.key)
        };
        assert_eq!(check(&open, &|_| {}), None);
        assert_eq!(check(&rabbit, &|_| {}), None);
        let short = |s: &mut Settings| s.ledger.subject_key = SecretString::from("k".repeat(31));
        assert_eq!(check(&open, &short).as_deref(), Some("ledger.subject_key"));
        let no_db = |s: &mut Settings| s.ledger.url = None;
        assert_eq!(
            check(&open, &no_db),
            None,
            "the embedded ledger lives in the queue file"
        );
        assert_eq!(check(&rabbit, &no_db).as_deref(), Some("ledger.url"));
        let off = |s: &mut Settings| {
            s.ledger.enabled = false;
            s.ledger.url = None;
            s.ledger.subject_key = SecretString::from(String::new());
        };
        assert_eq!(
            check(&rabbit, &off),
            None,
            "an explicit opt-out is accepted"
        );
        let mut dev = Settings::from_toml(&rabbit).unwrap();
        dev.ledger.subject_key = SecretString::from(String::new());
        dev.validate_for(Environment::Local).unwrap();
    }

    fn production(extra: &str) -> Result<(), SettingsError> {
        let mut s =
            Settings::from_toml(&format!("{extra}\n{ROUTES}")).expect("valid outside production");
        if s.centercode.api_key.expose_secret().is_empty() {
            s.centercode.api_key = SecretString::from("community-key");
            ledger_ready(&mut s);
        }
        s.validate_for(Environment::Production)
    }

    #[test]
    fn production_refuses_an_outbound_route_anyone_can_call() {
        assert_eq!(production("").unwrap_err().key, "routes[0].path_token");
        let guarded = ROUTES
            .replace(
                "sobject = \"Contact\"",
                "sobject = \"Contact\"\npath_token = \"0123456789abcdef-token\"",
            )
            .replace(
                "sobject = \"Feedback__c\"",
                "sobject = \"Feedback__c\"\nallowed_ips = [\"13.108.0.0/14\"]",
            );
        let mut s = Settings::from_toml(&guarded).unwrap();
        s.centercode.api_key = SecretString::from("community-key");
        ledger_ready(&mut s);
        s.validate_for(Environment::Production)
            .expect("token and allowlist suffice");
        // An explicit opt-out is accepted (and warned about at start).
        let open = ROUTES.replace(
            "email_field = \"Email\"",
            "email_field = \"Email\"\ninsecure_open = true",
        );
        let mut s = Settings::from_toml(&open).unwrap();
        s.centercode.api_key = SecretString::from("community-key");
        ledger_ready(&mut s);
        assert_eq!(
            s.validate_for(Environment::Production).unwrap_err().key,
            "routes[1].path_token"
        );
        // Outside production nothing changes.
        Settings::from_toml(ROUTES)
            .unwrap()
            .validate_for(Environment::Local)
            .unwrap();
    }

    #[test]
    fn production_refuses_plain_http_an_empty_key_classic_queues_and_lone_memory_dedupe() {
        let guarded = ROUTES
            .replace(
                "email_field = \"Email\"",
                "email_field = \"Email\"\ninsecure_open = true",
            )
            .replace("[routes.fields]", "insecure_open = true\n[routes.fields]");
        let check = |text: &str, key: &str| {
            let mut s = Settings::from_toml(text).unwrap();
            if key != "centercode.api_key" {
                s.centercode.api_key = SecretString::from("community-key");
            }
            ledger_ready(&mut s);
            assert_eq!(
                s.validate_for(Environment::Production).unwrap_err().key,
                key,
                "{text}"
            );
        };
        check(
            &guarded.replacen("https://acme", "http://acme", 1),
            "routes[0].url",
        );
        check(&guarded, "centercode.api_key");
        let rabbit = "[queue]\nbackend = \"rabbitmq\"\nredis_url = \"redis://127.0.0.1:6379\"\n";
        check(
            &format!("{rabbit}queue_type = \"classic\"\n{guarded}"),
            "queue.queue_type",
        );
        check(
            &format!("[queue]\nbackend = \"rabbitmq\"\n{guarded}"),
            "queue.redis_url",
        );
        // One gateway, said explicitly: accepted.
        let mut s = Settings::from_toml(&format!(
            "[queue]\nbackend = \"rabbitmq\"\ndedupe = \"memory\"\n{guarded}"
        ))
        .unwrap();
        s.centercode.api_key = SecretString::from("community-key");
        ledger_ready(&mut s);
        s.validate_for(Environment::Production).unwrap();
        let mut s = Settings::from_toml(&format!("{rabbit}{guarded}")).unwrap();
        s.centercode.api_key = SecretString::from("community-key");
        ledger_ready(&mut s);
        s.validate_for(Environment::Production).unwrap();
    }

    #[test]
    fn numbers_that_would_panic_or_overflow_are_errors_naming_the_key() {
        for (text, key) in [
            (
                "[worker]\ncircuit_cooldown_secs = -1.0\n",
                "worker.circuit_cooldown_secs",
            ),
            (
                "[worker]\ncircuit_cooldown_secs = nan\n",
                "worker.circuit_cooldown_secs",
            ),
            (
                "[worker]\ncircuit_cooldown_secs = inf\n",
                "worker.circuit_cooldown_secs",
            ),
            (
                "[queue]\nlease_secs = 9223372036854775807\n",
                "queue.lease_secs",
            ),
            ("[queue]\nlease_secs = 0\n", "queue.lease_secs"),
            (
                "[worker]\nretry_schedule_secs = [1e300]\n",
                "worker.retry_schedule_secs[0]",
            ),
            (
                "[worker]\nmax_age_secs = 9223372036854775807\n",
                "worker.max_age_secs",
            ),
            (
                "[queue]\ndedupe_ttl_secs = 9223372036854775807\n",
                "queue.dedupe_ttl_secs",
            ),
        ] {
            let err = Settings::from_toml(text).expect_err(text);
            assert_eq!(err.key, key, "{text}: {err}");
        }
    }
}
