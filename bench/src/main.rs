//! `relay-bench`: measures the real `relay serve` against its broker and disk baselines in one run (see bench/README.md).

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use fake_centercode::{FakeCentercode, FakeConfig, LatencyConfig, RecordedRequest};
use fake_salesforce::{FakeSalesforce, FakeSalesforceConfig};
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ConnectionProperties};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

type Res<T> = anyhow::Result<T>;

// Embedded at compile time so the bench runs from any directory.
const OM_FIXTURE: &str =
    include_str!("../../examples/salesforce/om_contact_gdpr_removal_single.xml");
const CALLOUT_FIXTURE: &str = include_str!("../../examples/salesforce/apex_removal_request.json");
const FIXTURE_NOTIFICATION_ID: &str = "04l8d0000100001AAA";
const FIXTURE_EVENT_ID: &str = "5c0d7a3e-8f4b-4d7e-9a51-2f6c1b0e9d42";
const ORG_ID: &str = "00D8d000001AbCdEAK";
const BEARER: &str = "relay-bench-bearer-token-0123456789";
/// `FakeConfig::default()` accepts this key and has a listener `demo`.
const API_KEY: &str = "test-key";
/// Routes must name a URL even when no worker runs; nothing listens on the discard port.
const NO_CENTERCODE: &str = "http://127.0.0.1:9";
const MESSAGE_BYTES: usize = 2048;
const SENDERS: [usize; 4] = [1, 8, 32, 128];
const WORKERS: usize = 64;
const FAKE_LATENCY_MS: u64 = 20;
const MB: f64 = 1024.0;
/// `ledger.subject_key`: production asks for at least 32 characters.
const SUBJECT_KEY: &str = "relay-bench-subject-key-0123456789abcdef";
/// `admin.token` (at least 32 characters), for `GET /admin/jobs`.
const ADMIN_TOKEN: &str = "relay-bench-admin-token-0123456789abcdef";
/// The ingest cell measured with the ledger on and off.
const LEDGER_CELL: (Kind, usize) = (Kind::Om(1), 32);

/// Benchmark of the Salesforce → Centercode relay; see bench/README.md.
#[derive(Debug, Parser)]
#[command(name = "relay-bench", version)]
struct Args {
    /// Which queue backend(s) of the relay to measure.
    #[arg(long, value_enum, default_value_t = BackendArg::Embedded)]
    backend: BackendArg,
    /// Short run (about 1 s per figure, 10,000-job drain, 100,000-job backlog, 100,000-entry
    /// ledger).
    #[arg(long)]
    quick: bool,
    /// RabbitMQ for the lapin baselines and the rabbitmq backend.
    #[arg(
        long,
        env = "RELAY_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Publisher-confirm window of the lapin baseline.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Redis for the rabbitmq backend's dedupe keys, as production runs it; `none` uses the
    /// relay's in-memory dedupe (one gateway only, memory grows with notifications seen).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// PostgreSQL for the rabbitmq backend's delivery ledger (`ledger.url`; each relay gets a
    /// schema of its own, dropped afterwards); `none` runs that backend without a ledger and
    /// skips its ledger figures.
    #[arg(
        long,
        env = "RELAY_BENCH_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg_url: String,
    /// Entries in the ledger of the trace test (default 1,000,000, `--quick` 100,000).
    #[arg(long)]
    ledger_entries: Option<u64>,
    /// The relay's log level (production logs at `info`).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Seconds per ingest cell (default 5, `--quick` 1).
    #[arg(long)]
    cell_secs: Option<f64>,
    /// Jobs in the drain test (default 100,000, `--quick` 10,000).
    #[arg(long)]
    drain_jobs: Option<u64>,
    /// Jobs in the memory backlog test (default 1,000,000, `--quick` 100,000).
    #[arg(long)]
    backlog_jobs: Option<u64>,
    /// The relay binary (default: `relay` next to this executable).
    #[arg(long)]
    relay: Option<PathBuf>,
    /// The relay's `server.workers` (HTTP threads); 0 = the relay's default (one per two
    /// cores), as shipped.
    #[arg(long, default_value_t = 0)]
    http_threads: usize,
    /// Measure only these ingest cells, e.g. `om1x32,calloutx32` (kinds om1, om10, om100,
    /// callout; any sender count), and skip the latency, end-to-end, memory and ledger phases: to
    /// re-measure or profile one figure. The targets of skipped figures read "not measured".
    #[arg(long, value_parser = parse_cells)]
    cells: Option<Cells>,
    /// Run only the rate-limit check: a fake Centercode whose WAF lets 55 requests/s
    /// through, a relay with `[[limits]] rate = 50` on RabbitMQ, one gateway and two
    /// `--role worker` processes draining a backlog for 60 s; reports the achieved rate and
    /// the fake's 429s (see bench/README.md).
    #[arg(long)]
    rate_limit: bool,
    /// Run only the Salesforce batching phase on the chosen backend(s): Centercode webhooks
    /// stored first, then upserted into a fake Salesforce answering in 50 ms at
    /// `worker.concurrency = 8`, one record per request and then batched (up to 200 per
    /// Collections call); reports both rates and their ratio (see bench/README.md).
    #[arg(long, conflicts_with = "rate_limit")]
    salesforce: bool,
    /// Where the JSON result goes.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Parent of the temporary stores (default: the system temp dir; keep it on a real disk).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Embedded,
    Rabbitmq,
    Both,
}

/// The ingest cells `--cells` selected.
#[derive(Debug, Clone)]
struct Cells(Vec<(Kind, usize)>);

fn parse_cells(text: &str) -> Result<Cells, String> {
    text.split(',')
        .map(|cell| {
            let cell = cell.trim();
            let (kind, senders) = cell
                .split_once('x')
                .ok_or_else(|| format!("`{cell}`: expected KINDxSENDERS, e.g. om1x32"))?;
            let kind = match kind {
                "callout" => Kind::Callout,
                om => Kind::Om(
                    om.strip_prefix("om")
                        .and_then(|n| n.parse().ok())
                        .filter(|n| [1, 10, 100].contains(n))
                        .ok_or_else(|| format!("`{kind}`: kinds are om1, om10, om100, callout"))?,
                ),
            };
            let senders = senders
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("`{senders}`: senders must be a positive number"))?;
            Ok((kind, senders))
        })
        .collect::<Result<_, _>>()
        .map(Cells)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Embedded,
    Rabbitmq,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Rabbitmq => "rabbitmq",
        }
    }
}

/// Durations and sizes of one run.
#[derive(Debug, Clone)]
struct Plan {
    cell: Duration,
    lapin_publish: Duration,
    lapin_single: Duration,
    lapin_consume: Duration,
    sqlite_each: Duration,
    latency: Duration,
    idle_wait: Duration,
    backlog_delivering: Duration,
    drain_jobs: u64,
    backlog_jobs: u64,
    drain_timeout: Duration,
    /// Ledger on/off pairs of the ingest cell [`LEDGER_CELL`] (run alternately).
    ledger_pairs: usize,
    /// Entries in the filled ledger of the trace test.
    ledger_entries: u64,
    /// Records traced (one request each), spread over the filled ledger.
    trace_records: u64,
    /// Webhooks upserted into Salesforce one record per request, and batched: the batched run
    /// gets more, so that it too lasts seconds.
    sf_single_jobs: u64,
    sf_batched_jobs: u64,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let q = args.quick;
        let secs = |quick: f64, full: f64| Duration::from_secs_f64(if q { quick } else { full });
        Plan {
            cell: args
                .cell_secs
                .map(Duration::from_secs_f64)
                .unwrap_or_else(|| secs(1.0, 5.0)),
            lapin_publish: secs(1.0, 5.0),
            lapin_single: secs(1.0, 3.0),
            lapin_consume: secs(1.0, 5.0),
            sqlite_each: secs(0.5, 2.0),
            latency: secs(2.0, 5.0),
            idle_wait: secs(1.0, 2.0),
            backlog_delivering: secs(1.0, 3.0),
            drain_jobs: args.drain_jobs.unwrap_or(if q { 10_000 } else { 100_000 }),
            backlog_jobs: args
                .backlog_jobs
                .unwrap_or(if q { 100_000 } else { 1_000_000 }),
            drain_timeout: secs(60.0, 180.0),
            ledger_pairs: if q { 2 } else { 3 },
            ledger_entries: args
                .ledger_entries
                .unwrap_or(if q { 100_000 } else { 1_000_000 }),
            trace_records: if q { 200 } else { 500 },
            sf_single_jobs: if q { 800 } else { 2_000 },
            sf_batched_jobs: if q { 8_000 } else { 20_000 },
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "cell_secs": self.cell.as_secs_f64(),
            "lapin_publish_secs": self.lapin_publish.as_secs_f64(),
            "lapin_single_secs": self.lapin_single.as_secs_f64(),
            "lapin_consume_secs": self.lapin_consume.as_secs_f64(),
            "sqlite_secs_per_batch_size": self.sqlite_each.as_secs_f64(),
            "latency_secs": self.latency.as_secs_f64(),
            "drain_jobs": self.drain_jobs,
            "backlog_jobs": self.backlog_jobs,
            "ledger_ingest_pairs": self.ledger_pairs,
            "ledger_entries": self.ledger_entries,
            "trace_records": self.trace_records,
            "salesforce_single_jobs": self.sf_single_jobs,
            "salesforce_batched_jobs": self.sf_batched_jobs,
        })
    }
}

// ---------------------------------------------------------------- output helpers

fn say(text: impl AsRef<str>) {
    println!("{}", text.as_ref());
}

/// 12345.6 → "12,346".
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

fn mb(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.1} MB", k as f64 / MB))
}

fn ratio(a: f64, b: Option<f64>) -> Option<f64> {
    b.filter(|b| *b > 0.0).map(|b| a / b)
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}×"))
}

// ---------------------------------------------------------------- time and git

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// (`20250101T120000Z`, `2025-01-01T12:00:00Z`) for now, in UTC.
fn utc_stamps() -> (String, String) {
    let secs = epoch_ms() / 1000;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    (
        format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z"),
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
    )
}

/// The fake's `at` (`2025-01-01T12:00:00.123Z`) in Unix milliseconds.
fn parse_fake_time(at: &str) -> Option<i64> {
    let n = |r: std::ops::Range<usize>| at.get(r)?.parse::<i64>().ok();
    let days = days_from_civil(n(0..4)?, n(5..7)?, n(8..10)?);
    let secs = days * 86_400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?;
    Some(secs * 1000 + n(20..23).unwrap_or(0))
}

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

// ---------------------------------------------------------------- /proc

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU seconds (user + system, all threads) of a process so far; `self` for this one.
/// Linux reports them in USER_HZ ticks, which is 100 on every architecture Rust targets.
fn cpu_secs(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU use of the relay and of the bench over an interval, in cores.
struct CpuMeter {
    pid: String,
    relay0: Option<f64>,
    bench0: Option<f64>,
    t0: Instant,
}

impl CpuMeter {
    fn start(pid: u32) -> Self {
        let pid = pid.to_string();
        CpuMeter {
            relay0: cpu_secs(&pid),
            bench0: cpu_secs("self"),
            pid,
            t0: Instant::now(),
        }
    }

    /// (relay cores, bench cores).
    fn read(&self) -> (Option<f64>, Option<f64>) {
        let secs = self.t0.elapsed().as_secs_f64().max(1e-9);
        let d = |now: Option<f64>, then: Option<f64>| Some((now? - then?) / secs);
        (
            d(cpu_secs(&self.pid), self.relay0),
            d(cpu_secs("self"), self.bench0),
        )
    }
}

/// Busy CPU seconds of the whole machine so far (all cores; not idle, not iowait).
fn machine_busy_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let (idle, iowait) = (*ticks.get(3)?, *ticks.get(4)?);
    // guest time is already counted in user time.
    let total: u64 = ticks.iter().take(8).sum();
    Some((total - idle - iowait) as f64 / 100.0)
}

/// Processes of the services the relay uses, when they run on this machine: RabbitMQ's
/// Erlang VM and Redis. Their CPU next to the relay's shows who limits a figure.
const LOCAL_SERVICES: [(&str, &str); 2] = [("broker", "beam.smp"), ("redis", "redis-server")];

/// The pids of local processes whose command name is `comm`.
fn pids_named(comm: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// Cores the whole machine kept busy over an interval (relay, bench, broker, Redis and
/// anything else), and those of the local broker and Redis, if they run here.
struct MachineMeter {
    busy0: Option<f64>,
    services0: Vec<(&'static str, Vec<(String, f64)>)>,
    t0: Instant,
}

/// What [`MachineMeter`] saw, in cores.
#[derive(Debug, Clone, Default)]
struct MachineCpu {
    busy: Option<f64>,
    services: Vec<(&'static str, f64)>,
}

impl MachineCpu {
    fn brief(&self) -> String {
        let mut text = format!("machine {:.2}", self.busy.unwrap_or(f64::NAN));
        for (name, cores) in &self.services {
            let _ = write!(text, " (of which {name} {cores:.2})");
        }
        text
    }

    fn json(&self) -> Value {
        let mut v = json!({"machine_busy_cores": self.busy});
        for (name, cores) in &self.services {
            v[format!("{name}_cpu_cores")] = json!(cores);
        }
        v
    }
}

impl MachineMeter {
    fn start() -> Self {
        let services0 = LOCAL_SERVICES
            .iter()
            .map(|&(name, comm)| {
                let pids = pids_named(comm)
                    .into_iter()
                    .filter_map(|pid| Some((pid.clone(), cpu_secs(&pid)?)))
                    .collect();
                (name, pids)
            })
            .collect();
        MachineMeter {
            busy0: machine_busy_secs(),
            services0,
            t0: Instant::now(),
        }
    }

    fn read(&self) -> MachineCpu {
        let secs = self.t0.elapsed().as_secs_f64().max(1e-9);
        let busy = machine_busy_secs()
            .zip(self.busy0)
            .map(|(now, then)| (now - then) / secs);
        let services = self
            .services0
            .iter()
            .filter(|(_, pids)| !pids.is_empty())
            .map(|(name, pids)| {
                let used: f64 = pids
                    .iter()
                    .filter_map(|(pid, then)| Some(cpu_secs(pid)? - then))
                    .sum();
                (*name, used / secs)
            })
            .collect();
        MachineCpu { busy, services }
    }
}

/// The 1-minute load average: other work on the machine skews every figure.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------- request bodies

/// The fixtures split around the parts each request makes unique.
struct Templates {
    om_head: String,
    om_before_id: String,
    om_after_id: String,
    om_tail: String,
    callout_before: String,
    callout_after: String,
}

impl Templates {
    fn new() -> Res<Self> {
        let start = OM_FIXTURE
            .find("<Notification>")
            .context("fixture has no <Notification>")?;
        let end = OM_FIXTURE
            .find("</Notification>")
            .context("fixture has no </Notification>")?
            + "</Notification>".len();
        let (before, after) = OM_FIXTURE[start..end]
            .split_once(FIXTURE_NOTIFICATION_ID)
            .context("fixture notification id not found")?;
        let (c_before, c_after) = CALLOUT_FIXTURE
            .split_once(FIXTURE_EVENT_ID)
            .context("callout fixture eventId not found")?;
        Ok(Templates {
            om_head: OM_FIXTURE[..start].to_owned(),
            om_before_id: before.to_owned(),
            om_after_id: after.to_owned(),
            om_tail: OM_FIXTURE[end..].to_owned(),
            callout_before: c_before.to_owned(),
            callout_after: c_after.to_owned(),
        })
    }
}

/// Notification ids `04l` + 15 digits, unique per notification. The start comes from the clock
/// (10^7 ids per second of start time) so later runs never reuse an id, even against a dedupe
/// store (Redis) that outlives a run.
struct Ids {
    next: AtomicU64,
}

impl Ids {
    fn new() -> Self {
        let secs = (epoch_ms() / 1000) as u64;
        Ids {
            next: AtomicU64::new((secs % 100_000_000) * 10_000_000),
        }
    }

    fn take(&self, n: u64) -> u64 {
        self.next.fetch_add(n, Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An Outbound Message with this many notifications.
    Om(usize),
    /// A JSON callout (one job).
    Callout,
    /// A Centercode webhook for the Salesforce phase (one job, one record).
    Webhook,
}

impl Kind {
    fn label(self) -> String {
        match self {
            Kind::Om(n) => format!("om{n}"),
            Kind::Callout => "callout".into(),
            Kind::Webhook => "webhook".into(),
        }
    }

    fn notifications(self) -> u64 {
        match self {
            Kind::Om(n) => n as u64,
            Kind::Callout | Kind::Webhook => 1,
        }
    }
}

/// Builds and sends requests to one relay.
struct LoadGen {
    client: reqwest::Client,
    om_url: String,
    callout_url: String,
    webhook_url: String,
    t: Arc<Templates>,
    ids: Arc<Ids>,
}

impl LoadGen {
    fn new(b: &Bench, base: &str) -> Arc<Self> {
        Arc::new(LoadGen {
            client: b.client.clone(),
            om_url: format!("{base}/salesforce/outbound/bench-om"),
            callout_url: format!("{base}/salesforce/callout/bench-callout"),
            webhook_url: format!("{base}/centercode/webhook/{SF_ROUTE}"),
            t: b.templates.clone(),
            ids: b.ids.clone(),
        })
    }

    /// A ready request; built before the clock starts (building is the sender's cost).
    fn prepare(&self, kind: Kind) -> reqwest::RequestBuilder {
        let t = &self.t;
        match kind {
            Kind::Om(n) => {
                let first = self.ids.take(n as u64);
                let per = t.om_before_id.len() + 18 + t.om_after_id.len();
                let mut body = String::with_capacity(t.om_head.len() + n * per + t.om_tail.len());
                body.push_str(&t.om_head);
                for i in 0..n as u64 {
                    body.push_str(&t.om_before_id);
                    let _ = write!(body, "04l{:015}", first + i);
                    body.push_str(&t.om_after_id);
                }
                body.push_str(&t.om_tail);
                self.client
                    .post(&self.om_url)
                    .header("content-type", "text/xml; charset=utf-8")
                    .header("soapaction", "\"\"")
                    .body(body)
            }
            Kind::Callout => {
                let key = uuid::Uuid::new_v4().to_string();
                let body = format!("{}{key}{}", t.callout_before, t.callout_after);
                self.client
                    .post(&self.callout_url)
                    .header("content-type", "application/json")
                    .header("authorization", format!("Bearer {BEARER}"))
                    .header("idempotency-key", key)
                    .body(body)
            }
            Kind::Webhook => {
                // A unique feedback id: a record of its own in the fake, never a duplicate.
                let id = format!("CC-{}", self.ids.take(1));
                let body = json!({"feedback": {
                    "id": id, "title": format!("Feedback {id}"), "status": "In Progress",
                    "modified": "2026-12-01T10:00:00Z",
                }});
                self.client
                    .post(&self.webhook_url)
                    .header("content-type", "application/json")
                    .header(SF_TOKEN_HEADER, SF_WEBHOOK_TOKEN)
                    .body(body.to_string())
            }
        }
    }

    /// Send and read the whole answer (so the connection is reused); Ok on 200/202.
    async fn execute(rb: reqwest::RequestBuilder) -> Result<(), String> {
        match rb.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.bytes().await;
                match (status, body) {
                    (200 | 202, Ok(_)) => Ok(()),
                    (200 | 202, Err(e)) => Err(format!("reading the answer: {e}")),
                    (s, body) => {
                        let text = body
                            .map(|b| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned())
                            .unwrap_or_default();
                        Err(format!("HTTP {s}: {text}"))
                    }
                }
            }
            Err(e) => Err(format!("transport: {e}")),
        }
    }
}

// ---------------------------------------------------------------- load loops

#[derive(Debug, Default)]
struct LoadResult {
    ok: u64,
    notifications: u64,
    errors: u64,
    error_samples: Vec<String>,
    /// Sorted ack latencies in microseconds.
    lat_us: Vec<u32>,
    elapsed: Duration,
}

impl LoadResult {
    fn absorb(&mut self, other: TaskOut) {
        self.ok += other.ok;
        self.notifications += other.notifications;
        self.errors += other.errors;
        for s in other.error_samples {
            if self.error_samples.len() < 5 {
                self.error_samples.push(s);
            }
        }
        self.lat_us.extend(other.lat_us);
    }

    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64().max(1e-9)
    }

    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs()
    }

    fn nps(&self) -> f64 {
        self.notifications as f64 / self.secs()
    }

    /// Nearest-rank percentile in ms.
    fn pct(&self, q: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.lat_us.len() as f64).ceil() as usize).clamp(1, self.lat_us.len());
        f64::from(self.lat_us[rank - 1]) / 1000.0
    }

    fn max_ms(&self) -> f64 {
        self.lat_us
            .last()
            .map_or(f64::NAN, |v| f64::from(*v) / 1000.0)
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.ok,
            "notifications": self.notifications,
            "seconds": self.secs(),
            "requests_per_s": self.rps(),
            "notifications_per_s": self.nps(),
            "ack_p50_ms": self.pct(0.50),
            "ack_p99_ms": self.pct(0.99),
            "ack_max_ms": self.max_ms(),
            "errors": self.errors,
            "error_samples": self.error_samples,
        })
    }

    fn brief(&self) -> String {
        format!(
            "{} req/s, {} notif/s, ack p50 {:.2} / p99 {:.2} / max {:.1} ms, errors {}",
            num(self.rps()),
            num(self.nps()),
            self.pct(0.5),
            self.pct(0.99),
            self.max_ms(),
            self.errors
        )
    }
}

#[derive(Default)]
struct TaskOut {
    ok: u64,
    notifications: u64,
    errors: u64,
    error_samples: Vec<String>,
    lat_us: Vec<u32>,
    last_done: Option<Instant>,
}

impl TaskOut {
    fn record(&mut self, r: Result<(), String>, kind: Kind) {
        match r {
            Ok(()) => {
                self.ok += 1;
                self.notifications += kind.notifications();
            }
            Err(e) => {
                self.errors += 1;
                if self.error_samples.len() < 2 {
                    self.error_samples.push(e);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    After(Duration),
    Requests(u64),
}

/// `senders` tasks, each sending its next request as soon as the previous one is answered.
/// With `warmup`, each first sends one unmeasured request (opens its connection).
async fn closed_loop(
    gen: Arc<LoadGen>,
    kind: Kind,
    senders: usize,
    stop: Stop,
    warmup: bool,
) -> LoadResult {
    let barrier = Arc::new(tokio::sync::Barrier::new(senders));
    let start: Arc<OnceLock<Instant>> = Arc::default();
    let issued = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(senders);
    for _ in 0..senders {
        let (gen, barrier, start, issued) =
            (gen.clone(), barrier.clone(), start.clone(), issued.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = TaskOut::default();
            if warmup {
                // Stored but neither timed nor counted; a failure still counts as an error.
                if let Err(e) = LoadGen::execute(gen.prepare(kind)).await {
                    out.record(Err(e), kind);
                }
            }
            barrier.wait().await;
            // Every task gets the same start: the first one to get here sets it.
            let start = *start.get_or_init(Instant::now);
            loop {
                match stop {
                    Stop::After(d) if start.elapsed() >= d => break,
                    Stop::Requests(n) if issued.fetch_add(1, Ordering::Relaxed) >= n => break,
                    _ => {}
                }
                let rb = gen.prepare(kind);
                let t = Instant::now();
                let r = LoadGen::execute(rb).await;
                let done = Instant::now();
                out.lat_us
                    .push((done - t).as_micros().min(u32::MAX as u128) as u32);
                out.last_done = Some(done);
                out.record(r, kind);
            }
            out
        }));
    }
    collect(tasks, &start).await
}

/// Open loop: request i is due at start + i / rate, whoever is free sends it, and its latency
/// counts from when it was due, so a relay that falls behind shows it (no coordinated omission).
async fn open_loop(
    gen: Arc<LoadGen>,
    kind: Kind,
    senders: usize,
    rate: f64,
    duration: Duration,
) -> LoadResult {
    let barrier = Arc::new(tokio::sync::Barrier::new(senders));
    let start: Arc<OnceLock<Instant>> = Arc::default();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(senders);
    for _ in 0..senders {
        let (gen, barrier, start, next) =
            (gen.clone(), barrier.clone(), start.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = TaskOut::default();
            if let Err(e) = LoadGen::execute(gen.prepare(kind)).await {
                out.record(Err(e), kind);
            }
            barrier.wait().await;
            let t0 = *start.get_or_init(|| Instant::now() + Duration::from_millis(20));
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                if due >= t0 + duration {
                    break;
                }
                let rb = gen.prepare(kind);
                tokio::time::sleep_until(due.into()).await;
                let r = LoadGen::execute(rb).await;
                let done = Instant::now();
                out.lat_us
                    .push((done - due).as_micros().min(u32::MAX as u128) as u32);
                out.last_done = Some(done);
                out.record(r, kind);
            }
            out
        }));
    }
    collect(tasks, &start).await
}

async fn collect(
    tasks: Vec<tokio::task::JoinHandle<TaskOut>>,
    start: &OnceLock<Instant>,
) -> LoadResult {
    let mut result = LoadResult::default();
    let mut last = None;
    for t in tasks {
        match t.await {
            Ok(out) => {
                last = last.max(out.last_done);
                result.absorb(out);
            }
            Err(e) => {
                result.errors += 1;
                result
                    .error_samples
                    .push(format!("sender task failed: {e}"));
            }
        }
    }
    result.lat_us.sort_unstable();
    if let (Some(s), Some(l)) = (start.get(), last) {
        result.elapsed = l.saturating_duration_since(*s);
    }
    result
}

// ---------------------------------------------------------------- the relay child process

/// A store (temp dir, or RabbitMQ prefix and PostgreSQL ledger schema) and config for one or
/// more `relay serve` runs.
struct RelayRun {
    backend: Backend,
    dir: tempfile::TempDir,
    prefix: String,
    /// Whether this relay keeps the delivery ledger (`ledger.enabled`).
    ledger: bool,
    /// The ledger's PostgreSQL schema (rabbitmq backend with the ledger on).
    schema: String,
    /// `worker.concurrency` ([`WORKERS`] unless a phase sets its own).
    concurrency: usize,
    /// Extra `[worker]` keys, and TOML appended after the routes (`[[limits]]`, a
    /// `[salesforce]` org and its webhook route).
    worker_extra: String,
    tail_extra: String,
}

impl RelayRun {
    /// A run with the ledger as production keeps it: on, where the backend has one here.
    fn new(b: &Bench, backend: Backend) -> Res<Self> {
        Self::with_ledger(b, backend, b.has_ledger(backend))
    }

    fn with_ledger(b: &Bench, backend: Backend, ledger: bool) -> Res<Self> {
        let dir = tempfile::Builder::new()
            .prefix("relay-bench-")
            .tempdir_in(&b.tmp_root)?;
        // An empty config dir: the repo's config/local.toml must not add routes or settings.
        std::fs::create_dir(dir.path().join("config"))?;
        let unique = &uuid::Uuid::new_v4().simple().to_string()[..12];
        Ok(RelayRun {
            backend,
            dir,
            prefix: format!("relay-bench-{unique}"),
            ledger: ledger && b.has_ledger(backend),
            schema: format!("relay_bench_{unique}"),
            concurrency: WORKERS,
            worker_extra: String::new(),
            tail_extra: String::new(),
        })
    }

    /// The PostgreSQL URL of this run's ledger, if it keeps one there.
    fn pg_ledger<'a>(&self, b: &'a Bench) -> Option<&'a str> {
        (self.ledger && self.backend == Backend::Rabbitmq)
            .then_some(b.pg_url.as_deref())
            .flatten()
    }

    fn db_path(&self) -> PathBuf {
        self.store_dir().join("relay.db")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("relay-bench.toml")
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn write_config(&self, b: &Bench, workers: bool, centercode: &str) -> Res<()> {
        let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
        let queue = match self.backend {
            Backend::Embedded => format!(
                "backend = \"embedded\"\npath = {}\n",
                s(&self.db_path().to_string_lossy())
            ),
            Backend::Rabbitmq => {
                let mut q = format!(
                    "backend = \"rabbitmq\"\nurl = {}\nprefix = {}\n",
                    s(&b.args.amqp_url),
                    s(&self.prefix)
                );
                if let Some(r) = Some(&b.args.redis_url).filter(|r| *r != "none") {
                    let _ = writeln!(q, "redis_url = {}", s(r));
                }
                q
            }
        };
        // As production runs it: a configured subject key (production refuses one shorter
        // than 32 characters) and, on RabbitMQ, the ledger in PostgreSQL.
        let mut ledger = format!(
            "enabled = {}\nsubject_key = \"{SUBJECT_KEY}\"\n",
            self.ledger
        );
        if let Some(url) = self.pg_ledger(b) {
            let _ = write!(ledger, "url = {}\nschema = {}\n", s(url), s(&self.schema));
        }
        let listener = s(&format!("{centercode}/api/v1/userMacroListeners/demo"));
        let http_threads = b.args.http_threads;
        let text = format!(
            r#"# Written by relay-bench.
[server]
bind = "127.0.0.1:0"
shutdown_grace_secs = 10
workers = {http_threads}

[queue]
{queue}
[worker]
enabled = {workers}
concurrency = {concurrency}
{worker_extra}

[centercode]
api_key = "{API_KEY}"

[telemetry]
format = "json"
level = {level}

[admin]
token = "{ADMIN_TOKEN}"

[ledger]
{ledger}

[[routes]]
name = "bench-om"
kind = "outbound_message"
org_ids = ["{ORG_ID}"]
sobject = "Contact"
action = "remove_user"
url = {listener}
email_field = "Email"

[[routes]]
name = "bench-callout"
kind = "callout"
action = "remove_user"
url = {listener}
email_field = "/subject/email"
idempotency_key_field = "/eventId"
auth = {{ bearer = "{BEARER}" }}
{tail_extra}"#,
            level = s(&b.args.log_level),
            concurrency = self.concurrency,
            worker_extra = self.worker_extra,
            tail_extra = self.tail_extra,
        );
        std::fs::write(self.config_path(), text)?;
        Ok(())
    }

    fn command(&self, b: &Bench) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&b.relay_bin);
        // The caller's RELAY_* variables (and RUST_LOG) would override the bench's config.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RELAY") {
                cmd.env_remove(&k);
            }
        }
        cmd.env_remove("RUST_LOG")
            .env("RELAY_CONFIG_DIR", self.dir.path().join("config"))
            .env("NO_PROXY", "127.0.0.1,localhost")
            .current_dir(self.dir.path())
            .arg("--config")
            .arg(self.config_path());
        cmd
    }

    /// `relay check-config` with this run's config; the error text if it refuses.
    async fn check(&self, b: &Bench) -> Result<(), String> {
        self.write_config(b, false, NO_CENTERCODE)
            .map_err(|e| e.to_string())?;
        let out = self
            .command(b)
            .arg("check-config")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("running {}: {e}", b.relay_bin.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "relay check-config failed: {}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }

    async fn start(&self, b: &Bench, workers: bool, centercode: &str) -> Res<Relay> {
        self.start_as(b, workers, centercode, &[]).await
    }

    /// [`RelayRun::start`] with more `serve` arguments (`--role worker`).
    async fn start_as(
        &self,
        b: &Bench,
        workers: bool,
        centercode: &str,
        serve_args: &[&str],
    ) -> Res<Relay> {
        self.write_config(b, workers, centercode)?;
        let mut cmd = self.command(b);
        cmd.arg("serve")
            .args(serve_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", b.relay_bin.display()))?;
        let pid = child.id().context("relay exited at once")?;
        // Logs are drained in big chunks (cheap for the bench) and only the tail is kept.
        let tail = Arc::new(Mutex::new(Vec::<u8>::new()));
        if let Some(mut stderr) = child.stderr.take() {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = stderr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    t.extend_from_slice(&buf[..n]);
                    if t.len() > 1 << 15 {
                        let cut = t.len() - (1 << 14);
                        t.drain(..cut);
                    }
                }
            });
        }
        let stdout = child.stdout.take().context("relay stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        let mut relay = Relay {
            child,
            pid,
            base: String::new(),
            tail,
        };
        let first = match first {
            Ok(Ok(Some(line))) => line,
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bail!(
                    "relay did not report its address; its log ends:\n{}",
                    relay.tail()
                );
            }
        };
        relay.base = first
            .strip_prefix("relay listening on ")
            .map(|s| s.trim().to_owned())
            .with_context(|| format!("unexpected first line from relay: {first}"))?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let ready = format!("{}/health/ready", relay.base);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match b.client.get(&ready).send().await {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() > deadline => {
                    bail!(
                        "relay not ready within 30 s; its log ends:\n{}",
                        relay.tail()
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(relay)
    }

    /// Drop the store: the temp dir goes with `self`; RabbitMQ queues are deleted by name, the
    /// ledger's PostgreSQL schema with everything in it.
    async fn cleanup(self, b: &Bench) {
        if let Some(url) = self.pg_ledger(b) {
            let dropped = async {
                let client = pg_connect(url).await?;
                client
                    .batch_execute(&format!(
                        "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                        self.schema
                    ))
                    .await?;
                Ok::<(), anyhow::Error>(())
            };
            if let Err(e) = dropped.await {
                say(format!(
                    "  warning: could not drop the ledger schema {}: {e:#}",
                    self.schema
                ));
            }
        }
        if self.backend == Backend::Rabbitmq {
            // A broker that is briefly away (restarted by someone else) gets a few chances.
            let mut attempt = 0;
            while let Err(e) = delete_relay_queues(&b.args.amqp_url, &self.prefix).await {
                attempt += 1;
                if attempt == 5 {
                    say(format!(
                        "  warning: could not delete RabbitMQ queues {}.* (work, parked, retry.N): {e:#}",
                        self.prefix
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            // Dedupe keys expire only after queue.dedupe_ttl_secs (25 h): delete this run's.
            if b.args.redis_url != "none" {
                if let Err(e) = delete_redis_keys(&b.args.redis_url, &self.prefix).await {
                    say(format!(
                        "  warning: could not delete Redis keys {}:*: {e:#}",
                        self.prefix
                    ));
                }
            }
        }
    }
}

async fn pg_connect(url: &str) -> Res<tokio_postgres::Client> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .context("connecting to PostgreSQL timed out")??;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Delete the dedupe keys `{prefix}:*` the relay wrote to Redis.
async fn delete_redis_keys(url: &str, prefix: &str) -> Res<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The relay's queues are `{prefix}.work`, `{prefix}.retry.{i}` (one per retry tier) and
/// `{prefix}.parked`; AMQP cannot list queues, so try the names.
async fn delete_relay_queues(url: &str, prefix: &str) -> Res<()> {
    let conn = lapin::Connection::connect(url, ConnectionProperties::default()).await?;
    let mut names = vec![format!("{prefix}.work"), format!("{prefix}.parked")];
    names.extend((0..32).map(|i| format!("{prefix}.retry.{i}")));
    for name in names {
        // A missing queue closes the channel (404), so use one channel per name.
        let ch = conn.create_channel().await?;
        let _ = ch.queue_delete(&name, QueueDeleteOptions::default()).await;
    }
    let _ = conn.close(200, "relay-bench done").await;
    Ok(())
}

struct Relay {
    child: tokio::process::Child,
    pid: u32,
    base: String,
    tail: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    fn rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmRSS")
    }

    /// Peak RSS since the process started.
    fn hwm_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmHWM")
    }

    fn tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&t);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM, as in production: in-flight work finishes and the store is closed cleanly.
    async fn stop(mut self) -> Res<()> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("relay exited with {status}; its log ends:\n{}", self.tail()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("relay did not stop within 30 s of SIGTERM (killed)")
            }
        }
    }
}

// ---------------------------------------------------------------- baselines

fn payload() -> Vec<u8> {
    (0..MESSAGE_BYTES).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Keep `window` publishes unconfirmed until `duration` is over; confirmed messages per second.
async fn publish_confirm(
    ch: &lapin::Channel,
    queue: &str,
    window: usize,
    duration: Duration,
) -> Res<(u64, f64)> {
    let body = payload();
    let props = BasicProperties::default().with_delivery_mode(2);
    let mut inflight = FuturesUnordered::new();
    let (mut acked, mut nacked) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < duration {
        while inflight.len() < window {
            let confirm = ch
                .basic_publish(
                    "",
                    queue,
                    BasicPublishOptions::default(),
                    &body,
                    props.clone(),
                )
                .await?;
            inflight.push(confirm);
        }
        if let Some(c) = inflight.next().await {
            if c?.is_ack() {
                acked += 1;
            } else {
                nacked += 1;
            }
        }
    }
    while let Some(c) = inflight.next().await {
        if c?.is_ack() {
            acked += 1;
        } else {
            nacked += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if nacked > 0 {
        bail!("broker nacked {nacked} publishes");
    }
    Ok((acked, acked as f64 / secs))
}

async fn consume_ack(
    conn: &lapin::Connection,
    queue: &str,
    prefetch: u16,
    available: u64,
    duration: Duration,
) -> Res<(u64, f64)> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue,
            "relay-bench",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let start = Instant::now();
    let mut got = 0u64;
    while got < available {
        let Some(left) = duration.checked_sub(start.elapsed()) else {
            break;
        };
        match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(delivery)) => {
                // One ack per message, as a worker that acks each delivery after its outcome.
                delivery?.ack(BasicAckOptions::default()).await?;
                got += 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = ch.close(200, "done").await;
    Ok((got, got as f64 / secs))
}

async fn lapin_baselines(b: &Bench) -> Res<Value> {
    let url = &b.args.amqp_url;
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .context("connecting to RabbitMQ timed out")??;
    let ch = conn.create_channel().await?;
    let queue = format!("relay-bench-baseline-{}", uuid::Uuid::new_v4().simple());
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(&queue, durable, args).await?;
    let result = async {
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let w = b.args.window;
        let (n_w, rate_w) = publish_confirm(&ch, &queue, w, b.plan.lapin_publish).await?;
        say(format!(
            "baseline lapin publish+confirm, {w} in flight, quorum queue: {} msg/s",
            num(rate_w)
        ));
        let (n_1, rate_1) = publish_confirm(&ch, &queue, 1, b.plan.lapin_single).await?;
        say(format!(
            "baseline lapin publish+confirm, 1 in flight: {} msg/s",
            num(rate_1)
        ));
        let prefetch = w.min(u16::MAX as usize) as u16;
        let (n_c, rate_c) =
            consume_ack(&conn, &queue, prefetch, n_w + n_1, b.plan.lapin_consume).await?;
        say(format!(
            "baseline lapin consume + ack each, prefetch {prefetch}: {} msg/s",
            num(rate_c)
        ));
        Ok::<Value, anyhow::Error>(json!({
            "queue_type": "quorum",
            "message_bytes": MESSAGE_BYTES,
            "publish_confirm": {"window": w, "messages": n_w, "msgs_per_s": rate_w},
            "publish_confirm_1": {"window": 1, "messages": n_1, "msgs_per_s": rate_1},
            "consume_ack": {"prefetch": prefetch, "messages": n_c, "msgs_per_s": rate_c},
        }))
    }
    .await;
    // The queue goes whatever happened; a fresh channel in case the error closed this one.
    let deleted = match conn.create_channel().await {
        Ok(del) => del
            .queue_delete(&queue, QueueDeleteOptions::default())
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = deleted {
        say(format!(
            "  warning: could not delete the baseline queue {queue}: {e}"
        ));
    }
    let _ = conn.close(200, "relay-bench done").await;
    result
}

/// One SQLite baseline measurement.
struct SqliteRun {
    rows: u64,
    commits: u64,
    rows_per_s: f64,
    /// Sorted COMMIT durations (µs): the disk's own fsync latency and its tail.
    commit_us: Vec<u32>,
}

/// Rows of 2 KiB inserted per second with `batch` rows per committed transaction.
fn sqlite_batch(dir: &Path, batch: usize, duration: Duration) -> Res<SqliteRun> {
    let conn = rusqlite::Connection::open(dir.join(format!("baseline-{batch}.db")))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE t (id TEXT PRIMARY KEY, payload TEXT NOT NULL);",
    )?;
    let body = String::from_utf8(payload())?;
    let mut run = SqliteRun {
        rows: 0,
        commits: 0,
        rows_per_s: 0.0,
        commit_us: Vec::new(),
    };
    let start = Instant::now();
    while start.elapsed() < duration {
        conn.execute_batch("BEGIN")?;
        {
            let mut stmt = conn.prepare_cached("INSERT INTO t (id, payload) VALUES (?1, ?2)")?;
            for _ in 0..batch {
                stmt.execute(rusqlite::params![uuid::Uuid::new_v4().to_string(), body])?;
            }
        }
        let t = Instant::now();
        conn.execute_batch("COMMIT")?;
        run.commit_us
            .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        run.rows += batch as u64;
        run.commits += 1;
    }
    run.rows_per_s = run.rows as f64 / start.elapsed().as_secs_f64();
    run.commit_us.sort_unstable();
    Ok(run)
}

fn sqlite_baseline(b: &Bench) -> Res<Value> {
    let dir = tempfile::Builder::new()
        .prefix("relay-bench-sqlite-")
        .tempdir_in(&b.tmp_root)?;
    let mut batches = Vec::new();
    let mut best: f64 = 0.0;
    for batch in [1usize, 10, 100, 1000] {
        let run = sqlite_batch(dir.path(), batch, b.plan.sqlite_each)?;
        let commits_per_s = run.rows_per_s / batch as f64;
        let pct = |q: f64| {
            let n = run.commit_us.len();
            let rank = ((q * n as f64).ceil() as usize).clamp(1, n.max(1));
            run.commit_us
                .get(rank - 1)
                .map_or(f64::NAN, |v| f64::from(*v) / 1000.0)
        };
        say(format!(
            "baseline SQLite insert 2 KiB rows, WAL + synchronous=FULL, {batch} per transaction: {} rows/s ({} commits/s, commit p50 {:.2} / p99 {:.2} / max {:.1} ms)",
            num(run.rows_per_s),
            num(commits_per_s),
            pct(0.5),
            pct(0.99),
            pct(1.0),
        ));
        best = best.max(run.rows_per_s);
        batches.push(json!({
            "batch": batch,
            "rows": run.rows,
            "commits": run.commits,
            "rows_per_s": run.rows_per_s,
            "commits_per_s": commits_per_s,
            "commit_p50_ms": pct(0.5),
            "commit_p99_ms": pct(0.99),
            "commit_max_ms": pct(1.0),
        }));
    }
    Ok(json!({"message_bytes": MESSAGE_BYTES, "batches": batches, "best_rows_per_s": best}))
}

// ---------------------------------------------------------------- relay phases

struct Bench {
    args: Args,
    plan: Plan,
    relay_bin: PathBuf,
    tmp_root: PathBuf,
    client: reqwest::Client,
    templates: Arc<Templates>,
    ids: Arc<Ids>,
    /// Baseline rates: lapin publish-confirm at the window, SQLite best batched insert.
    lapin_rate: Option<f64>,
    sqlite_rate: Option<f64>,
    cores: usize,
    /// PostgreSQL for the rabbitmq backend's ledger; `None` when `--pg-url none` or it could
    /// not be reached (then `pg_note` says which).
    pg_url: Option<String>,
    pg_note: Option<String>,
}

impl Bench {
    /// Whether relays of `backend` can keep the ledger here (the embedded one always does,
    /// in its queue file; the rabbitmq one needs PostgreSQL).
    fn has_ledger(&self, backend: Backend) -> bool {
        backend == Backend::Embedded || self.pg_url.is_some()
    }

    fn ledger_name(&self, backend: Backend) -> &'static str {
        match backend {
            Backend::Embedded => "ledger in the queue file",
            Backend::Rabbitmq if self.pg_url.is_some() => "ledger in PostgreSQL",
            Backend::Rabbitmq => "no ledger",
        }
    }
}

fn fake_config() -> FakeConfig {
    FakeConfig {
        latency: LatencyConfig {
            base_ms: FAKE_LATENCY_MS,
            jitter_ms: 0,
            sync_macro_extra_ms: 0,
            seed: 42,
        },
        ..FakeConfig::default()
    }
}

/// RSS of an idle relay (workers on, empty store), as deployed.
async fn idle_rss(b: &Bench, backend: Backend) -> Res<Value> {
    let run = RelayRun::new(b, backend)?;
    let relay = run.start(b, true, NO_CENTERCODE).await?;
    tokio::time::sleep(b.plan.idle_wait).await;
    let rss = relay.rss_kib();
    relay.stop().await?;
    run.cleanup(b).await;
    say(format!("[{}] RSS idle: {}", backend.name(), mb(rss)));
    Ok(json!({"rss_idle_kib": rss}))
}

struct Cell {
    kind: Kind,
    senders: usize,
    load: LoadResult,
    rss_peak_kib: Option<u64>,
    cpu: (Option<f64>, Option<f64>),
    machine: MachineCpu,
}

/// One fresh relay (gateway only) per cell, so no cell pays for an earlier cell's store.
async fn ingest_cell(
    b: &Bench,
    backend: Backend,
    kind: Kind,
    senders: usize,
    ledger: bool,
) -> Res<Cell> {
    let run = RelayRun::with_ledger(b, backend, ledger)?;
    let cell = async {
        let relay = run.start(b, false, NO_CENTERCODE).await?;
        let gen = LoadGen::new(b, &relay.base);
        // Includes the warm-up request of each sender: a few ms in a cell of seconds.
        let meter = CpuMeter::start(relay.pid);
        let machine = MachineMeter::start();
        let load = closed_loop(gen, kind, senders, Stop::After(b.plan.cell), true).await;
        let cpu = meter.read();
        let machine = machine.read();
        let rss_peak_kib = relay.hwm_kib();
        relay.stop().await?;
        Ok(Cell {
            kind,
            senders,
            load,
            rss_peak_kib,
            cpu,
            machine,
        })
    }
    .await;
    run.cleanup(b).await;
    cell
}

fn cell_json(b: &Bench, c: &Cell) -> Value {
    let mut v = c.load.json();
    v["kind"] = json!(c.kind.label());
    v["notifications_per_request"] = json!(c.kind.notifications());
    v["senders"] = json!(c.senders);
    v["rss_peak_kib"] = json!(c.rss_peak_kib);
    v["relay_cpu_cores"] = json!(c.cpu.0);
    v["bench_cpu_cores"] = json!(c.cpu.1);
    if let (Value::Object(v), Value::Object(m)) = (&mut v, c.machine.json()) {
        v.extend(m);
    }
    v["ratio_to_lapin_publish_confirm"] = json!(ratio(c.load.nps(), b.lapin_rate));
    v["ratio_to_sqlite_batched_insert"] = json!(ratio(c.load.nps(), b.sqlite_rate));
    v
}

async fn latency_under_load(b: &Bench, backend: Backend, max_rps: f64) -> Res<Value> {
    let rate = max_rps / 2.0;
    let run = RelayRun::new(b, backend)?;
    let relay = run.start(b, false, NO_CENTERCODE).await?;
    let gen = LoadGen::new(b, &relay.base);
    let meter = CpuMeter::start(relay.pid);
    let load = open_loop(gen, Kind::Om(10), 32, rate, b.plan.latency).await;
    let cpu = meter.read();
    relay.stop().await?;
    run.cleanup(b).await;
    say(format!(
        "[{}] latency at half max ({} req/s offered, om10, 32 senders, open loop): achieved {}, CPU relay {:.2} / bench {:.2} cores",
        backend.name(),
        num(rate),
        load.brief(),
        cpu.0.unwrap_or(f64::NAN),
        cpu.1.unwrap_or(f64::NAN),
    ));
    let mut v = load.json();
    v["relay_cpu_cores"] = json!(cpu.0);
    v["bench_cpu_cores"] = json!(cpu.1);
    v["offered_requests_per_s"] = json!(rate);
    v["kind"] = json!("om10");
    v["senders"] = json!(32);
    Ok(v)
}

/// Store `jobs` notifications through the gateway (100 per message, 32 senders, no workers).
async fn fill(b: &Bench, relay: &Relay, jobs: u64) -> Res<LoadResult> {
    let gen = LoadGen::new(b, &relay.base);
    let load = closed_loop(
        gen,
        Kind::Om(100),
        32,
        Stop::Requests(jobs.div_ceil(100)),
        false,
    )
    .await;
    if load.errors > 0 {
        bail!(
            "{} enqueue requests failed, e.g. {:?}",
            load.errors,
            load.error_samples
        );
    }
    Ok(load)
}

/// Jobs the relay has finished (any delivery outcome but `retried`/`held`), from the
/// `relay_deliveries_total` counter on its `/metrics`; `None` when it has no such endpoint.
async fn finished_jobs(client: &reqwest::Client, base: &str) -> Option<u64> {
    let resp = client.get(format!("{base}/metrics")).send().await.ok()?;
    let text = resp.error_for_status().ok()?.text().await.ok()?;
    if !text.contains("relay_deliveries_total") {
        return None;
    }
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with("relay_deliveries_total{")
            && !line.contains("outcome=\"retried\"")
            && !line.contains("outcome=\"held\"")
        {
            total += line.rsplit(' ').next()?.parse::<f64>().ok()?;
        }
    }
    Some(total as u64)
}

/// Wait until `n` jobs were delivered, then return the fake's log. No check before the
/// Little's-law limit could have delivered `n`. Progress comes from the relay's `/metrics`
/// (cheap). Without it, the fake's log is polled instead, but each poll copies the whole log
/// under the fake's lock (it has no counter) and stalls it, so polls are spaced to keep the
/// copying under ~5% of the time. The figures come from the records' own timestamps, not from
/// when a check saw them. Returns the log, the longest time one copy of it took, and where
/// progress came from.
async fn wait_for_deliveries(
    b: &Bench,
    relay: &Relay,
    fake: &FakeCentercode,
    n: usize,
    timeout: Duration,
) -> (Vec<RecordedRequest>, Duration, &'static str) {
    let deadline = Instant::now() + timeout;
    let limit = WORKERS as f64 * 1000.0 / FAKE_LATENCY_MS as f64;
    tokio::time::sleep(Duration::from_secs_f64(n as f64 / limit)).await;
    let mut interval = Duration::ZERO;
    let mut worst = Duration::ZERO;
    loop {
        tokio::time::sleep(interval).await;
        if let Some(done) = finished_jobs(&b.client, &relay.base).await {
            if done >= n as u64 || Instant::now() > deadline {
                let t = Instant::now();
                let reqs = fake.requests();
                return (reqs, worst.max(t.elapsed()), "relay /metrics");
            }
            interval = Duration::from_millis(100);
            continue;
        }
        let t = Instant::now();
        let reqs = fake.requests();
        let cost = t.elapsed();
        worst = worst.max(cost);
        if reqs.len() >= n || Instant::now() > deadline {
            return (reqs, worst, "fake log polls");
        }
        interval = (cost * 20).clamp(Duration::from_millis(250), Duration::from_secs(5));
    }
}

/// What one drain of the end-to-end test saw.
struct Drained {
    fill: LoadResult,
    jobs: u64,
    spawn_ms: i64,
    startup: Duration,
    records: Vec<RecordedRequest>,
    worst_poll: Duration,
    progress_from: &'static str,
    cpu: (Option<f64>, Option<f64>),
    rss: Option<u64>,
    ledger_wait: Option<(f64, u64)>,
}

async fn drain(b: &Bench, run: &RelayRun, fake: &FakeCentercode) -> Res<Drained> {
    let relay = run.start(b, false, &fake.base_url()).await?;
    let fill_load = fill(b, &relay, b.plan.drain_jobs).await?;
    relay.stop().await?;
    let jobs = fill_load.notifications;
    if !fake.requests().is_empty() {
        bail!("the fake was called while workers were disabled");
    }
    let spawn_ms = epoch_ms();
    let t = Instant::now();
    let relay = run.start(b, true, &fake.base_url()).await?;
    let startup = t.elapsed();
    let meter = CpuMeter::start(relay.pid);
    let (records, worst_poll, progress_from) =
        wait_for_deliveries(b, &relay, fake, jobs as usize, b.plan.drain_timeout).await;
    // Over the whole wait, which may end up to one poll interval after the last delivery.
    let cpu = meter.read();
    let rss = relay.rss_kib();
    let ledger_wait = ledger_write_wait(&b.client, &relay.base).await;
    relay.stop().await?;
    Ok(Drained {
        fill: fill_load,
        jobs,
        spawn_ms,
        startup,
        records,
        worst_poll,
        progress_from,
        cpu,
        rss,
        ledger_wait,
    })
}

/// Whether a relay of `backend` asked to keep the ledger (`on`) keeps one here.
fn run_keeps_ledger(b: &Bench, backend: Backend, on: bool) -> bool {
    on && b.has_ledger(backend)
}

/// Mean seconds a worker waited for its ledger write (`relay_ledger_write_seconds`), and how
/// many writes, from the relay's `/metrics`.
async fn ledger_write_wait(client: &reqwest::Client, base: &str) -> Option<(f64, u64)> {
    let resp = client.get(format!("{base}/metrics")).send().await.ok()?;
    let text = resp.error_for_status().ok()?.text().await.ok()?;
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    };
    let count = value("relay_ledger_write_seconds_count")?;
    let sum = value("relay_ledger_write_seconds_sum")?;
    (count > 0.0).then(|| (sum / count, count as u64))
}

/// Store the drain test's jobs with the workers off, then restart the relay with them on and
/// measure the delivery from the fake's own log; `ledger` turns the relay's ledger on or off.
async fn end_to_end(b: &Bench, backend: Backend, ledger: bool) -> Res<Value> {
    let fake = FakeCentercode::start(fake_config()).await?;
    let run = RelayRun::with_ledger(b, backend, ledger)?;
    let measured = drain(b, &run, &fake).await;
    fake.stop().await;
    run.cleanup(b).await;
    let d = measured?;
    let (fill_load, jobs, spawn_ms, startup) = (d.fill, d.jobs, d.spawn_ms, d.startup);
    let (records, worst_poll, progress_from) = (d.records, d.worst_poll, d.progress_from);
    let (cpu, rss, ledger_wait) = (d.cpu, d.rss, d.ledger_wait);
    let label = format!(
        "{}, {}",
        backend.name(),
        if run_keeps_ledger(b, backend, ledger) {
            b.ledger_name(backend)
        } else {
            "ledger off"
        }
    );

    let received = records.len() as u64;
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut arrivals: Vec<i64> = Vec::with_capacity(records.len());
    let mut done_ms = spawn_ms;
    // The fake's own measure of how long it held each request: what the limit assumes.
    let held_us: Vec<u64> = records.iter().map(|r| r.duration_us).collect();
    let fake_answer_ms = (!held_us.is_empty())
        .then(|| held_us.iter().sum::<u64>() as f64 / held_us.len() as f64 / 1000.0);
    for r in &records {
        *statuses.entry(r.status.to_string()).or_default() += 1;
        if let Some(at) = parse_fake_time(&r.at) {
            arrivals.push(at);
            done_ms = done_ms.max(at + r.duration_ms as i64);
        }
    }
    arrivals.sort_unstable();
    // Steady state: between the 10th and 90th percentile of arrivals (no ramp-up or tail).
    let steady = if arrivals.len() >= 20 {
        let (i10, i90) = (arrivals.len() / 10, arrivals.len() * 9 / 10);
        let span = (arrivals[i90] - arrivals[i10]) as f64 / 1000.0;
        (span > 0.0).then(|| (i90 - i10) as f64 / span)
    } else {
        None
    };
    let complete = received >= jobs;
    let drain_secs = (done_ms - spawn_ms) as f64 / 1000.0;
    let limit = WORKERS as f64 * 1000.0 / FAKE_LATENCY_MS as f64;
    // Delivered = Centercode answered (404 = user unknown, which the relay counts as done).
    let failed: u64 = statuses
        .iter()
        .filter(|(s, _)| !matches!(s.as_str(), "200" | "202" | "404"))
        .map(|(_, n)| n)
        .sum();
    let rate = steady.unwrap_or(f64::NAN);
    say(format!(
        "[{label}] end to end, {WORKERS} workers, fake at {FAKE_LATENCY_MS} ms (measured mean {:.2} ms): {} deliveries/s steady = {} of the Little's-law limit {}/s{}",
        fake_answer_ms.unwrap_or(f64::NAN),
        num(rate),
        fmt_ratio(ratio(rate, Some(limit))),
        num(limit),
        ledger_wait.map_or(String::new(), |(mean, n)| format!(
            ", mean ledger write wait {:.2} ms ({} writes)",
            mean * 1000.0,
            num(n as f64)
        )),
    ));
    say(format!(
        "[{label}] drain {} jobs (enqueued at {} notif/s): {} in {:.1} s from process start ({} received, {} failed statuses, startup {:.2} s, progress from {progress_from}, slowest copy of the fake's log {} ms, CPU relay {:.2} / bench+fake {:.2} cores)",
        num(jobs as f64),
        num(fill_load.nps()),
        if complete { "done" } else { "NOT DONE" },
        drain_secs,
        num(received as f64),
        failed,
        startup.as_secs_f64(),
        worst_poll.as_millis(),
        cpu.0.unwrap_or(f64::NAN),
        cpu.1.unwrap_or(f64::NAN),
    ));
    Ok(json!({
        "ledger": run_keeps_ledger(b, backend, ledger),
        "ledger_write_wait_mean_ms": ledger_wait.map(|(mean, _)| mean * 1000.0),
        "ledger_writes": ledger_wait.map(|(_, n)| n),
        "workers": WORKERS,
        "fake_latency_ms": FAKE_LATENCY_MS,
        "fake_measured_answer_ms": fake_answer_ms,
        "littles_law_limit_per_s": limit,
        "deliveries_per_s_steady": steady,
        "ratio_to_littles_law": ratio(rate, Some(limit)),
        "drain_jobs": jobs,
        "drain_complete": complete,
        "drain_secs": drain_secs,
        "drain_average_per_s": received as f64 / drain_secs.max(1e-9),
        "received": received,
        "statuses": statuses,
        "failed_statuses": failed,
        "relay_startup_secs": startup.as_secs_f64(),
        "enqueue_notifications_per_s": fill_load.nps(),
        "rss_at_end_kib": rss,
        "relay_cpu_cores": cpu.0,
        "bench_and_fake_cpu_cores": cpu.1,
        "slowest_fake_log_poll_ms": worst_poll.as_secs_f64() * 1000.0,
        "progress_from": progress_from,
    }))
}

async fn memory_backlog(b: &Bench, backend: Backend) -> Res<Value> {
    let run = RelayRun::new(b, backend)?;
    let fake = FakeCentercode::start(fake_config()).await?;
    let measured = async {
        let relay = run.start(b, false, NO_CENTERCODE).await?;
        let load = fill(b, &relay, b.plan.backlog_jobs).await?;
        tokio::time::sleep(b.plan.idle_wait).await;
        let filled = (relay.rss_kib(), relay.hwm_kib());
        relay.stop().await?;
        let store_bytes = dir_size(&run.store_dir());
        // Restarted on the backlog with workers on: what a relay holding a big backlog costs.
        let relay = run.start(b, true, &fake.base_url()).await?;
        tokio::time::sleep(b.plan.backlog_delivering).await;
        let backlog = (relay.rss_kib(), relay.hwm_kib());
        relay.stop().await?;
        Ok::<_, anyhow::Error>((load, filled, store_bytes, backlog))
    }
    .await;
    let delivered = fake.requests().len();
    fake.stop().await;
    // The store goes whatever happened: on RabbitMQ its queues and ledger schema are big.
    run.cleanup(b).await;
    let (load, (rss_filled, hwm_filled), store_bytes, (rss_backlog, hwm_backlog)) = measured?;
    say(format!(
        "[{}] RSS with a {}-job backlog: {} just after storing it ({} notif/s, peak {}), {} restarted and delivering ({} delivered in {:.0} s, peak {})",
        backend.name(),
        num(load.notifications as f64),
        mb(rss_filled),
        num(load.nps()),
        mb(hwm_filled),
        mb(rss_backlog),
        num(delivered as f64),
        b.plan.backlog_delivering.as_secs_f64(),
        mb(hwm_backlog),
    ));
    Ok(json!({
        "backlog_jobs": load.notifications,
        "enqueue": load.json(),
        "rss_after_enqueue_kib": rss_filled,
        "rss_peak_during_enqueue_kib": hwm_filled,
        "rss_restarted_delivering_kib": rss_backlog,
        "rss_peak_restarted_kib": hwm_backlog,
        "delivered_while_measuring": delivered,
        "embedded_store_bytes": (backend == Backend::Embedded).then_some(store_bytes),
    }))
}

// ---------------------------------------------------------------- the ledger's cost

/// The smallest and the largest value.
fn lo_hi(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

/// `mean`, and `(max - min) / mean`: how far the runs of one condition moved.
fn mean_spread(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (lo, hi) = lo_hi(v);
    (mean, (hi - lo) / mean)
}

/// The ingest cell [`LEDGER_CELL`] with the ledger off and on, in ABBA order (off on, on off,
/// …) so a machine that speeds up or slows down during the phase favours neither. "Within
/// noise": the runs with the ledger on and those with it off overlap (neither condition's
/// slowest run beats the other's fastest). With 3 runs each, a ledger that costs nothing still
/// separates them by chance 1 time in 10; one that costs more than the machine's run-to-run
/// spread separates them every time. The relay's CPU per request is reported beside it: it
/// moves far less than requests/s on a shared machine.
async fn ledger_ingest(b: &Bench, backend: Backend) -> Res<Value> {
    let (kind, senders) = LEDGER_CELL;
    let name = backend.name();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let (mut cpu_on, mut cpu_off) = (Vec::new(), Vec::new());
    let mut runs = Vec::new();
    for pair in 0..b.plan.ledger_pairs {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for ledger in order {
            let c = ingest_cell(b, backend, kind, senders, ledger).await?;
            if c.load.errors > 0 {
                bail!(
                    "{} errors with the ledger {}, e.g. {:?}",
                    c.load.errors,
                    if ledger { "on" } else { "off" },
                    c.load.error_samples
                );
            }
            let rps = c.load.rps();
            // Relay CPU per request (µs): what "within noise" in requests/s may hide.
            let cpu_us = c.cpu.0.map(|cores| cores / rps.max(1e-9) * 1e6);
            say(format!(
                "[{name}] ledger {}: ingest {} × {senders}: {}, relay CPU {:.0} µs/request",
                if ledger { "on " } else { "off" },
                kind.label(),
                c.load.brief(),
                cpu_us.unwrap_or(f64::NAN),
            ));
            if ledger {
                on.push(rps);
                cpu_on.extend(cpu_us);
            } else {
                off.push(rps);
                cpu_off.extend(cpu_us);
            }
            runs.push(json!({
                "ledger": ledger,
                "requests_per_s": rps,
                "ack_p50_ms": c.load.pct(0.5),
                "ack_p99_ms": c.load.pct(0.99),
                "relay_cpu_cores": c.cpu.0,
                "relay_cpu_us_per_request": cpu_us,
                "errors": c.load.errors,
            }));
        }
    }
    let (on_mean, on_spread) = mean_spread(&on);
    let (off_mean, off_spread) = mean_spread(&off);
    let r = on_mean / off_mean;
    let noise = on_spread.max(off_spread);
    let ((on_lo, on_hi), (off_lo, off_hi)) = (lo_hi(&on), lo_hi(&off));
    let within = on_lo <= off_hi && off_lo <= on_hi;
    let cpu = |v: &[f64]| (!v.is_empty()).then(|| mean_spread(v).0);
    say(format!(
        "[{name}] ledger on/off, ingest {} × {senders}: {} / {} req/s = {r:.3}× (on {}–{}, off {}–{}: runs moved {:.1} % on, {:.1} % off): {} noise; relay CPU {:.0} / {:.0} µs per request = {}",
        kind.label(),
        num(on_mean),
        num(off_mean),
        num(on_lo),
        num(on_hi),
        num(off_lo),
        num(off_hi),
        on_spread * 100.0,
        off_spread * 100.0,
        if within { "within" } else { "OUTSIDE" },
        cpu(&cpu_on).unwrap_or(f64::NAN),
        cpu(&cpu_off).unwrap_or(f64::NAN),
        fmt_ratio(cpu(&cpu_on).zip(cpu(&cpu_off)).map(|(a, b)| a / b)),
    ));
    Ok(json!({
        "kind": kind.label(),
        "senders": senders,
        "runs": runs,
        "on_requests_per_s": on,
        "off_requests_per_s": off,
        "on_mean_requests_per_s": on_mean,
        "off_mean_requests_per_s": off_mean,
        "ratio_on_off": r,
        "spread_on": on_spread,
        "spread_off": off_spread,
        "noise": noise,
        "within_noise": within,
        "relay_cpu_us_per_request_on": cpu(&cpu_on),
        "relay_cpu_us_per_request_off": cpu(&cpu_off),
        "relay_cpu_ratio_on_off": cpu(&cpu_on).zip(cpu(&cpu_off)).map(|(a, b)| a / b),
    }))
}

/// How far back the filled ledger's entries were stored: well inside `ledger.retention_days`
/// (400 by default), so the relay's retention keeps them all.
const LEDGER_SPAN_MS: i64 = 30 * 86_400_000;
/// Rows per PostgreSQL `INSERT … SELECT FROM unnest(…)` of the fill.
const PG_FILL_CHUNK: usize = 10_000;
const CENTERCODE_404: &str = r#"{"error":{"code":"user_not_found","message":"user not found"}}"#;

/// One ledger entry as the relay writes it for a job delivered once: the job's row (with its
/// latest outcome), one attempt and one outcome.
struct LedgerRow {
    job_id: String,
    notification_id: String,
    record_id: String,
    subject_key: String,
    received_at: i64,
    stored_at: i64,
    started_at: i64,
    duration_ms: i64,
    status: i32,
    attempt_outcome: &'static str,
    outcome: &'static str,
    outcome_at: i64,
    response: &'static str,
}

/// Entry `i` of `n`, stored over the 30 days before `now_ms`, oldest first. Sizes as in
/// production: a UUID job id, 18-character Salesforce ids, a 64-hex subject key. One record per
/// entry (a contact is erased once); one in ten was unknown to Centercode.
fn ledger_row(i: u64, n: u64, now_ms: i64) -> LedgerRow {
    let stored_at = now_ms - LEDGER_SPAN_MS
        + (i128::from(i) * i128::from(LEDGER_SPAN_MS) / i128::from(n.max(1))) as i64;
    let found = i % 10 != 3;
    let started_at = stored_at + 40;
    let duration_ms = 21;
    LedgerRow {
        job_id: uuid::Uuid::new_v4().to_string(),
        notification_id: format!("04l8d{i:013}"),
        record_id: record_id(i),
        subject_key: format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ),
        received_at: stored_at - 2,
        stored_at,
        started_at,
        duration_ms,
        status: if found { 200 } else { 404 },
        attempt_outcome: if found { "done" } else { "user_not_found" },
        outcome: if found { "delivered" } else { "user_not_found" },
        outcome_at: started_at + duration_ms + 1,
        response: if found { "{}" } else { CENTERCODE_404 },
    }
}

fn record_id(i: u64) -> String {
    format!("0038d{i:013}")
}

/// The entries traced: `m` spread evenly over the `n` of the ledger (sorted).
fn traced_entries(n: u64, m: u64) -> Vec<u64> {
    let m = m.clamp(1, n.max(1));
    let step = n / m;
    (0..m).map(|k| k * step + step / 2).collect()
}

/// Write entries `which` (of `n`) into the embedded queue file's ledger tables, in one
/// transaction. `bulk`: the relay is stopped, so the file may be written without its WAL (a
/// million rows through the WAL would be written twice) and with a large page cache; the
/// relay puts WAL back when it opens the file.
fn fill_sqlite(path: &Path, which: &[u64], n: u64, now: i64, bulk: bool) -> Res<()> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.execute_batch("PRAGMA busy_timeout = 10000;")?;
    if bulk {
        conn.execute_batch(
            "PRAGMA journal_mode = DELETE; PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;",
        )?;
    }
    let tx = conn.transaction()?;
    {
        let mut job = tx.prepare(
            "INSERT INTO ledger_jobs (job_id, route, action, org_id, notification_id, record_id, subject_key, received_at, stored_at, last_outcome, last_outcome_at, last_status)
             VALUES (?1, 'bench-om', 'remove_user', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut attempt = tx.prepare(
            "INSERT INTO ledger_attempts (job_id, attempt, started_at, duration_ms, status, error_class, outcome, response)
             VALUES (?1, 1, ?2, ?3, ?4, NULL, ?5, ?6)",
        )?;
        let mut outcome = tx.prepare(
            "INSERT INTO ledger_outcomes (job_id, outcome, reason, at) VALUES (?1, ?2, NULL, ?3)",
        )?;
        for &i in which {
            let r = ledger_row(i, n, now);
            job.execute(rusqlite::params![
                r.job_id,
                ORG_ID,
                r.notification_id,
                r.record_id,
                r.subject_key,
                r.received_at,
                r.stored_at,
                r.outcome,
                r.outcome_at,
                r.status
            ])?;
            attempt.execute(rusqlite::params![
                r.job_id,
                r.started_at,
                r.duration_ms,
                r.status,
                r.attempt_outcome,
                r.response
            ])?;
            outcome.execute(rusqlite::params![r.job_id, r.outcome, r.outcome_at])?;
        }
    }
    tx.commit()?;
    if bulk {
        conn.execute_batch("PRAGMA journal_mode = WAL;")?;
    }
    Ok(())
}

/// The same entries into the PostgreSQL ledger's schema, in one transaction of
/// `INSERT … SELECT FROM unnest(arrays)` of [`PG_FILL_CHUNK`] rows each. `bulk`: then
/// `VACUUM (ANALYZE)` and a `CHECKPOINT`, the work autovacuum and the checkpointer do in the
/// background within minutes of such a load, and many times over in the 30 days a real
/// ledger takes to grow this big: the trace is measured on a settled ledger, not in the
/// write-back of a load that took seconds.
async fn fill_pg(url: &str, schema: &str, which: &[u64], n: u64, now: i64, bulk: bool) -> Res<()> {
    let mut client = pg_connect(url).await?;
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await?;
    let tx = client.transaction().await?;
    for chunk in which.chunks(PG_FILL_CHUNK) {
        let rows: Vec<LedgerRow> = chunk.iter().map(|&i| ledger_row(i, n, now)).collect();
        let col = |f: fn(&LedgerRow) -> String| rows.iter().map(f).collect::<Vec<String>>();
        let int = |f: fn(&LedgerRow) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
        let job_ids = col(|r| r.job_id.clone());
        let statuses: Vec<i32> = rows.iter().map(|r| r.status).collect();
        let outcomes = col(|r| r.outcome.to_owned());
        tx.execute(
            "INSERT INTO ledger_jobs (job_id, route, action, org_id, notification_id, record_id, subject_key, received_at, stored_at, last_outcome, last_outcome_at, last_status)
             SELECT j, 'bench-om', 'remove_user', $1, n, r, k, ra, sa, lo, loa, ls
             FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::text[], $9::bigint[], $10::int[])
                  AS t(j, n, r, k, ra, sa, lo, loa, ls)",
            &[
                &ORG_ID,
                &job_ids,
                &col(|r| r.notification_id.clone()),
                &col(|r| r.record_id.clone()),
                &col(|r| r.subject_key.clone()),
                &int(|r| r.received_at),
                &int(|r| r.stored_at),
                &outcomes,
                &int(|r| r.outcome_at),
                &statuses,
            ],
        )
        .await?;
        tx.execute(
            "INSERT INTO ledger_attempts (job_id, attempt, started_at, duration_ms, status, error_class, outcome, response)
             SELECT j, 1, st, d, s, NULL, o, r
             FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[], $5::text[], $6::text[]) AS t(j, st, d, s, o, r)",
            &[
                &job_ids,
                &int(|r| r.started_at),
                &int(|r| r.duration_ms),
                &statuses,
                &col(|r| r.attempt_outcome.to_owned()),
                &col(|r| r.response.to_owned()),
            ],
        )
        .await?;
        tx.execute(
            "INSERT INTO ledger_outcomes (job_id, outcome, reason, at)
             SELECT j, o, NULL, a FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(j, o, a)",
            &[&job_ids, &outcomes, &int(|r| r.outcome_at)],
        )
        .await?;
    }
    tx.commit().await?;
    if bulk {
        client
            .batch_execute("VACUUM (ANALYZE) ledger_jobs, ledger_attempts, ledger_outcomes")
            .await?;
        // Needs superuser or pg_checkpoint; without it the checkpointer gets there on its own.
        if let Err(e) = client.batch_execute("CHECKPOINT").await {
            say(format!(
                "  note: CHECKPOINT refused ({e}); measuring without it"
            ));
        }
    }
    Ok(())
}

/// Write ledger entries `which` (of `n`) into this run's ledger, wherever the backend keeps it.
async fn fill_ledger(
    b: &Bench,
    run: &RelayRun,
    which: Vec<u64>,
    n: u64,
    now: i64,
    bulk: bool,
) -> Res<()> {
    match run.pg_ledger(b) {
        Some(url) => fill_pg(url, &run.schema, &which, n, now, bulk).await,
        None => {
            let path = run.db_path();
            tokio::task::spawn_blocking(move || fill_sqlite(&path, &which, n, now, bulk)).await?
        }
    }
}

/// Bytes the ledger takes: the embedded queue file (with its WAL), or the PostgreSQL schema's
/// tables with their indexes.
async fn ledger_bytes(b: &Bench, run: &RelayRun) -> Res<u64> {
    match run.pg_ledger(b) {
        Some(url) => {
            let client = pg_connect(url).await?;
            let row = client
                .query_one(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c
                     JOIN pg_namespace s ON s.oid = c.relnamespace WHERE s.nspname = $1 AND c.relkind = 'r'",
                    &[&run.schema],
                )
                .await?;
            Ok(row.get::<_, i64>(0) as u64)
        }
        None => Ok(dir_size(&run.store_dir())),
    }
}

/// Latencies (ms, sorted) of `GET /admin/jobs?record_id=…&history=true`, one request per
/// traced entry, one after another (as an operator's `relay trace` sends them). Every answer
/// must be that record's one job with its attempt; anything else counts as an error.
struct Traces {
    ms: Vec<f64>,
    errors: u64,
    error_samples: Vec<String>,
}

impl Traces {
    fn pct(&self, q: f64) -> f64 {
        if self.ms.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.ms.len() as f64).ceil() as usize).clamp(1, self.ms.len());
        self.ms[rank - 1]
    }

    fn brief(&self) -> String {
        format!(
            "p50 {:.2} / p99 {:.2} / max {:.2} ms over {} traces, errors {}",
            self.pct(0.5),
            self.pct(0.99),
            self.pct(1.0),
            self.ms.len(),
            self.errors
        )
    }

    fn json(&self) -> Value {
        json!({
            "traces": self.ms.len(),
            "p50_ms": self.pct(0.5),
            "p90_ms": self.pct(0.9),
            "p99_ms": self.pct(0.99),
            "max_ms": self.pct(1.0),
            "mean_ms": self.ms.iter().sum::<f64>() / self.ms.len().max(1) as f64,
            "errors": self.errors,
            "error_samples": self.error_samples,
        })
    }
}

async fn trace_once(b: &Bench, base: &str, record: &str) -> Result<(), String> {
    let resp = b
        .client
        .get(format!("{base}/admin/jobs"))
        .query(&[("record_id", record), ("history", "true")])
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .map_err(|e| format!("transport: {e}"))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .map_err(|e| format!("HTTP {status}: {e}"))?;
    let jobs = body["jobs"].as_array().map_or(&[][..], Vec::as_slice);
    match jobs {
        [job]
            if status.is_success()
                && job["record_id"] == record
                && job["attempts"].as_array().is_some_and(|a| a.len() == 1) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "HTTP {status}, {} jobs: {}",
            jobs.len(),
            body.to_string().chars().take(200).collect::<String>()
        )),
    }
}

async fn time_traces(b: &Bench, relay: &Relay, traced: &[u64]) -> Traces {
    let mut t = Traces {
        ms: Vec::with_capacity(traced.len()),
        errors: 0,
        error_samples: Vec::new(),
    };
    // Opens the connection; not timed.
    if let Some(&first) = traced.first() {
        let _ = trace_once(b, &relay.base, &record_id(first)).await;
    }
    for &i in traced {
        let started = Instant::now();
        let r = trace_once(b, &relay.base, &record_id(i)).await;
        t.ms.push(started.elapsed().as_secs_f64() * 1000.0);
        if let Err(e) = r {
            t.errors += 1;
            if t.error_samples.len() < 3 {
                t.error_samples.push(e);
            }
        }
    }
    t.ms.sort_by(f64::total_cmp);
    t
}

/// A trace by record id, and the relay's RSS, with a small ledger and with a backlog of
/// `ledger_entries`. The relay starts on an empty store (its RSS is the empty-ledger figure),
/// the traced entries are written beside it and traced (the small-ledger figures), then the
/// relay is stopped, the rest of the backlog written straight into the ledger's tables (much
/// faster than delivering that many jobs), and the relay started again on it.
async fn ledger_trace(b: &Bench, backend: Backend) -> Res<Value> {
    let run = RelayRun::with_ledger(b, backend, true)?;
    let result = ledger_trace_on(b, &run).await;
    run.cleanup(b).await;
    result
}

async fn ledger_trace_on(b: &Bench, run: &RelayRun) -> Res<Value> {
    let name = run.backend.name();
    let n = b.plan.ledger_entries;
    let traced = traced_entries(n, b.plan.trace_records);
    let now = epoch_ms();

    // Workers on, as deployed; the queue is empty, so they wait.
    let relay = run.start(b, true, NO_CENTERCODE).await?;
    tokio::time::sleep(b.plan.idle_wait).await;
    let rss_empty = relay.rss_kib();
    fill_ledger(b, run, traced.clone(), n, now, false).await?;
    let small = time_traces(b, &relay, &traced).await;
    let (rss_small, hwm_small) = (relay.rss_kib(), relay.hwm_kib());
    relay.stop().await?;
    say(format!(
        "[{name}] trace by record id, ledger of {} entries: {}; RSS {} empty, {} after tracing",
        num(traced.len() as f64),
        small.brief(),
        mb(rss_empty),
        mb(rss_small),
    ));

    let rest: Vec<u64> = (0..n)
        .filter(|i| traced.binary_search(i).is_err())
        .collect();
    let written = rest.len() as u64;
    let t = Instant::now();
    fill_ledger(b, run, rest, n, now, true).await?;
    let fill_secs = t.elapsed().as_secs_f64();
    let bytes = ledger_bytes(b, run).await.ok();
    let t = Instant::now();
    let relay = run.start(b, true, NO_CENTERCODE).await?;
    let startup = t.elapsed().as_secs_f64();
    tokio::time::sleep(b.plan.idle_wait).await;
    let rss_full = relay.rss_kib();
    let full = time_traces(b, &relay, &traced).await;
    let (rss_full_after, hwm_full) = (relay.rss_kib(), relay.hwm_kib());
    relay.stop().await?;
    let entries = written + traced.len() as u64;
    let rss_ratio = rss_full
        .zip(rss_empty)
        .map(|(f, e)| f as f64 / e.max(1) as f64);
    say(format!(
        "[{name}] ledger of {} entries written in {fill_secs:.1} s ({} entries/s, {:.0} MB), relay ready in {startup:.2} s",
        num(entries as f64),
        num(written as f64 / fill_secs.max(1e-9)),
        bytes.map_or(f64::NAN, |b| b as f64 / MB / MB),
    ));
    say(format!(
        "[{name}] trace by record id, ledger of {} entries: {} = {} of the small ledger's p50; RSS {} idle = {} of the empty ledger's, {} after tracing (peak {})",
        num(entries as f64),
        full.brief(),
        fmt_ratio(Some(full.pct(0.5) / small.pct(0.5))),
        mb(rss_full),
        fmt_ratio(rss_ratio),
        mb(rss_full_after),
        mb(hwm_full),
    ));
    Ok(json!({
        "entries": entries,
        "entries_stored_over_days": LEDGER_SPAN_MS / 86_400_000,
        "traced_records": traced.len(),
        "fill_secs": fill_secs,
        "fill_entries_per_s": written as f64 / fill_secs.max(1e-9),
        "ledger_bytes": bytes,
        "relay_startup_secs": startup,
        "small": small.json(),
        "full": full.json(),
        "p50_ratio_full_to_small": full.pct(0.5) / small.pct(0.5),
        "p99_ratio_full_to_small": full.pct(0.99) / small.pct(0.99),
        "rss_empty_kib": rss_empty,
        "rss_small_after_traces_kib": rss_small,
        "rss_peak_small_kib": hwm_small,
        "rss_full_kib": rss_full,
        "rss_full_after_traces_kib": rss_full_after,
        "rss_peak_full_kib": hwm_full,
        "rss_ratio_full_to_empty": rss_ratio,
    }))
}

// ---------------------------------------------------------------- Salesforce batching

/// The fake Salesforce holds every data API answer this long (the issue's figure).
const SF_LATENCY_MS: u64 = 50;
/// `worker.concurrency` of both Salesforce runs: one record per request can reach at most
/// 8 / 50 ms = 160 records/s.
const SF_CONCURRENCY: usize = 8;
/// The batched run's `salesforce.batch_size`: Salesforce's most per Collections call.
const SF_BATCH: usize = 200;
/// The issue's target: batched at least this many times one record per request.
const SF_TARGET: f64 = 5.0;
const SF_ROUTE: &str = "cc-feedback";
const SF_SOBJECT: &str = "Centercode_Feedback__c";
const SF_TOKEN_HEADER: &str = "X-Relay-Token";
const SF_WEBHOOK_TOKEN: &str = "relay-bench-webhook-token-0123456789";

/// The issue's `cc-feedback` route (as `webhook_route()` in tests/api/salesforce.rs) and a
/// `[salesforce]` org signing in to the fake at `login_url` with client credentials.
fn salesforce_toml(login_url: &str, batch_size: usize) -> String {
    let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
    format!(
        r#"
[[routes]]
name = "{SF_ROUTE}"
kind = "centercode_webhook"
action = "salesforce_upsert"
sobject = "{SF_SOBJECT}"
external_id_field = "Centercode_Id__c"
external_id = "/feedback/id"
dedupe = ["/feedback/id", "/feedback/modified"]
auth = {{ header = "{SF_TOKEN_HEADER}", token = "{SF_WEBHOOK_TOKEN}" }}

[routes.fields]
Title__c = {{ from = "/feedback/title", required = true, max_len = 255 }}
Status__c = {{ from = "/feedback/status", map = {{ "In Progress" = "Working" }}, default = "New" }}

[salesforce]
login_url = {login}
client_id = {id}
client_secret = {secret}
batch_size = {batch_size}
"#,
        login = s(login_url),
        id = s(fake_salesforce::test_keys::CLIENT_ID),
        secret = s(fake_salesforce::test_keys::CLIENT_SECRET),
    )
}

/// `relay_deliveries_total` by outcome, from the relay's `/metrics`.
async fn deliveries_by_outcome(
    client: &reqwest::Client,
    base: &str,
) -> Option<BTreeMap<String, u64>> {
    let resp = client.get(format!("{base}/metrics")).send().await.ok()?;
    let text = resp.error_for_status().ok()?.text().await.ok()?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(labels) = line.strip_prefix("relay_deliveries_total{") else {
            continue;
        };
        let outcome = labels
            .split_once("outcome=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("", |(o, _)| o);
        let n = line.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
        *out.entry(outcome.to_owned()).or_default() += n;
    }
    Some(out)
}

/// Jobs that need nothing more: written (`done`), refused (`parked`) or replaced by a newer
/// version (`superseded`).
fn settled(outcomes: &BTreeMap<String, u64>) -> u64 {
    ["done", "parked", "superseded"]
        .iter()
        .filter_map(|o| outcomes.get(*o))
        .sum()
}

/// Seconds at which the timeline of (seconds, jobs done) reached `n`, interpolated.
fn crossing(timeline: &[(f64, u64)], n: f64) -> Option<f64> {
    let i = timeline.iter().position(|&(_, d)| d as f64 >= n)?;
    let (t1, d1) = timeline[i];
    let Some(&(t0, d0)) = i.checked_sub(1).map(|p| &timeline[p]) else {
        return Some(t1);
    };
    let span = (d1 - d0) as f64;
    Some(t0 + (t1 - t0) * ((n - d0 as f64) / span).clamp(0.0, 1.0))
}

/// One Salesforce run: `jobs` webhooks stored through the gateway with the workers off, then
/// a relay with them on (`worker.concurrency = 8`, `salesforce.batch_size = batch_size`)
/// upserts them into a fresh fake answering in 50 ms; timed from starting that relay until
/// its `/metrics` counts every job settled.
async fn salesforce_drain(b: &Bench, backend: Backend, batch_size: usize, jobs: u64) -> Res<Value> {
    let fake = FakeSalesforce::start(FakeSalesforceConfig {
        latency_ms: SF_LATENCY_MS,
        ..FakeSalesforceConfig::demo()
    })
    .await?;
    let mut run = RelayRun::new(b, backend)?;
    run.concurrency = SF_CONCURRENCY;
    run.tail_extra = salesforce_toml(&fake.base_url(), batch_size);
    let measured = async {
        let gateway = run.start(b, false, NO_CENTERCODE).await?;
        let gen = LoadGen::new(b, &gateway.base);
        let stored = closed_loop(gen, Kind::Webhook, 32, Stop::Requests(jobs), false).await;
        gateway.stop().await?;
        if stored.errors > 0 {
            bail!(
                "{} webhooks were not stored, e.g. {:?}",
                stored.errors,
                stored.error_samples
            );
        }
        if fake.data_calls() > 0 {
            bail!("the fake Salesforce was called while workers were disabled");
        }
        let t0 = Instant::now();
        let relay = run.start(b, true, NO_CENTERCODE).await?;
        let startup = t0.elapsed().as_secs_f64();
        let meter = CpuMeter::start(relay.pid);
        let deadline = t0 + b.plan.drain_timeout;
        let mut timeline = vec![(0.0, 0)];
        let outcomes = loop {
            let outcomes = deliveries_by_outcome(&b.client, &relay.base)
                .await
                .context("no relay_deliveries_total on the relay's /metrics")?;
            timeline.push((t0.elapsed().as_secs_f64(), settled(&outcomes)));
            if settled(&outcomes) >= jobs || Instant::now() > deadline {
                break outcomes;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let cpu = meter.read();
        relay.stop().await?;
        Ok((stored, startup, timeline, outcomes, cpu))
    }
    .await;
    run.cleanup(b).await;
    let (records, writes) = (fake.records(SF_SOBJECT).len() as u64, fake.writes());
    fake.stop().await;
    let (stored, startup, timeline, outcomes, cpu) = measured?;

    let (secs, done) = timeline.last().copied().unwrap_or((f64::NAN, 0));
    let complete = done >= jobs;
    let rate = done as f64 / secs;
    // Steady: between 10 % and 90 % of the jobs settled (no start, no tail).
    let steady = crossing(&timeline, jobs as f64 * 0.1)
        .zip(crossing(&timeline, jobs as f64 * 0.9))
        .filter(|(a, z)| z > a)
        .map(|(a, z)| jobs as f64 * 0.8 / (z - a));
    // Records per Salesforce call: a Collections upsert carries `records`, a single one one.
    let per_call: Vec<usize> = writes
        .iter()
        .map(|w| w.body["records"].as_array().map_or(1, Vec::len))
        .collect();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for w in &writes {
        *statuses.entry(w.status.to_string()).or_default() += 1;
    }
    let mean_per_call = per_call.iter().sum::<usize>() as f64 / per_call.len().max(1) as f64;
    let max_per_call = per_call.iter().copied().max().unwrap_or(0);
    say(format!(
        "[{}] Salesforce, batch_size {batch_size}: {} webhooks stored at {}/s; {} {} in {secs:.1} s from process start = {} records/s ({} steady), {} calls of {mean_per_call:.1} records on average (max {max_per_call}), {} records in the fake, outcomes {outcomes:?}, CPU relay {:.2} / bench+fake {:.2} cores",
        backend.name(),
        num(jobs as f64),
        num(stored.rps()),
        num(done as f64),
        if complete { "settled" } else { "settled (NOT ALL)" },
        num(rate),
        num(steady.unwrap_or(f64::NAN)),
        num(per_call.len() as f64),
        num(records as f64),
        cpu.0.unwrap_or(f64::NAN),
        cpu.1.unwrap_or(f64::NAN),
    ));
    Ok(json!({
        "batch_size": batch_size,
        "jobs": jobs,
        "stored_per_s": stored.rps(),
        "settled": done,
        "complete": complete,
        "outcomes": outcomes,
        "records_in_fake": records,
        "secs_from_process_start": secs,
        "relay_startup_secs": startup,
        "records_per_s": rate,
        "records_per_s_steady": steady,
        "salesforce_calls": per_call.len(),
        "records_per_call_mean": mean_per_call,
        "records_per_call_max": max_per_call,
        "statuses": statuses,
        "relay_cpu_cores": cpu.0,
        "bench_and_fake_cpu_cores": cpu.1,
    }))
}

/// The issue's throughput figure: the same relay and concurrency upserting into a fake
/// Salesforce at 50 ms, one record per request and then batched (`batch_size = 200`); the
/// ratio of their records per second.
async fn salesforce_batching(b: &Bench, backend: Backend) -> Res<Value> {
    let single = salesforce_drain(b, backend, 1, b.plan.sf_single_jobs).await?;
    let batched = salesforce_drain(b, backend, SF_BATCH, b.plan.sf_batched_jobs).await?;
    let rate = |v: &Value, k: &str| v[k].as_f64();
    let r = ratio(
        rate(&batched, "records_per_s").unwrap_or(f64::NAN),
        rate(&single, "records_per_s"),
    );
    let r_steady = rate(&batched, "records_per_s_steady")
        .and_then(|x| ratio(x, rate(&single, "records_per_s_steady")));
    say(format!(
        "[{}] Salesforce batched / one record per request at concurrency {SF_CONCURRENCY}: {} / {} records/s = {} (steady {}; target ≥ {SF_TARGET:.0}×)",
        backend.name(),
        num(rate(&batched, "records_per_s").unwrap_or(f64::NAN)),
        num(rate(&single, "records_per_s").unwrap_or(f64::NAN)),
        fmt_ratio(r),
        fmt_ratio(r_steady),
    ));
    Ok(json!({
        "fake_latency_ms": SF_LATENCY_MS,
        "concurrency": SF_CONCURRENCY,
        "limit_single_per_s": SF_CONCURRENCY as f64 * 1000.0 / SF_LATENCY_MS as f64,
        "single": single,
        "batched": batched,
        "ratio": r,
        "ratio_steady": r_steady,
    }))
}

/// The Salesforce target of one backend's results.
fn salesforce_target(backend: &'static str, r: &Value) -> Target {
    let v = r["salesforce"]["ratio"].as_f64();
    let complete = ["single", "batched"]
        .iter()
        .all(|k| r["salesforce"][k]["complete"] == true);
    Target {
        name: "Salesforce records/s, batched / single".into(),
        backend,
        value: v,
        goal: format!("≥ {SF_TARGET:.2}×"),
        met: v.map(|v| v >= SF_TARGET && complete),
    }
}

/// The summary line of one backend's Salesforce figures, if measured.
fn salesforce_line(backend: &str, v: &Value) -> Option<String> {
    if v.get("error").is_some() || v.get("skipped").is_some() || v.is_null() {
        return None;
    }
    let run = |k: &str| {
        let r = &v[k];
        format!(
            "{} records/s ({} in {:.1} s, {:.1} per call)",
            num(r["records_per_s"].as_f64().unwrap_or(f64::NAN)),
            num(r["jobs"].as_f64().unwrap_or(f64::NAN)),
            r["secs_from_process_start"].as_f64().unwrap_or(f64::NAN),
            r["records_per_call_mean"].as_f64().unwrap_or(f64::NAN),
        )
    };
    Some(format!(
        "{backend:<9} Salesforce at {SF_LATENCY_MS} ms, concurrency {SF_CONCURRENCY}: one record per request {}, batched {}: {} (steady {})",
        run("single"),
        run("batched"),
        fmt_ratio(v["ratio"].as_f64()),
        fmt_ratio(v["ratio_steady"].as_f64()),
    ))
}

/// Run a phase; a failure is reported and recorded, and the run goes on.
async fn phase<F: std::future::Future<Output = Res<Value>>>(what: &str, f: F) -> Value {
    match f.await {
        Ok(v) => v,
        Err(e) => {
            say(format!("{what} FAILED: {e:#}"));
            json!({"error": format!("{e:#}")})
        }
    }
}

async fn run_backend(b: &Bench, backend: Backend) -> Value {
    let name = backend.name();
    say(format!("\n== backend {name} =="));
    let probe = match RelayRun::new(b, backend) {
        Ok(r) => r,
        Err(e) => return json!({"error": format!("{e:#}")}),
    };
    let checked = probe.check(b).await;
    probe.cleanup(b).await;
    if let Err(e) = checked {
        say(format!("[{name}] SKIPPED: {e}"));
        return json!({"skipped": e});
    }
    // The first start doubles as a probe: a backend that cannot even start is skipped whole.
    let idle = match idle_rss(b, backend).await {
        Ok(v) => v,
        Err(e) => {
            say(format!("[{name}] SKIPPED: the relay does not start: {e:#}"));
            return json!({"skipped": format!("the relay does not start: {e:#}")});
        }
    };

    let mut cells = Vec::new();
    let mut cell_values = Vec::new();
    let plan: Vec<(Kind, usize)> = match &b.args.cells {
        Some(Cells(only)) => only.clone(),
        None => [Kind::Om(1), Kind::Om(10), Kind::Om(100), Kind::Callout]
            .into_iter()
            .flat_map(|kind| SENDERS.map(|senders| (kind, senders)))
            .collect(),
    };
    for (kind, senders) in plan {
        match ingest_cell(b, backend, kind, senders, b.has_ledger(backend)).await {
            Ok(c) => {
                let mut line = format!(
                    "[{name}] ingest {} × {} senders: {}",
                    c.kind.label(),
                    c.senders,
                    c.load.brief()
                );
                if backend == Backend::Embedded {
                    let _ = write!(
                        line,
                        ", {} SQLite baseline",
                        fmt_ratio(ratio(c.load.nps(), b.sqlite_rate))
                    );
                }
                let _ = write!(
                    line,
                    ", {} lapin baseline, peak RSS {}, CPU relay {:.2} / bench {:.2} / {} of {} cores",
                    fmt_ratio(ratio(c.load.nps(), b.lapin_rate)),
                    mb(c.rss_peak_kib),
                    c.cpu.0.unwrap_or(f64::NAN),
                    c.cpu.1.unwrap_or(f64::NAN),
                    c.machine.brief(),
                    b.cores,
                );
                say(line);
                for s in &c.load.error_samples {
                    say(format!("    error: {s}"));
                }
                cell_values.push(cell_json(b, &c));
                cells.push(c);
            }
            Err(e) => {
                say(format!(
                    "[{name}] ingest {} × {senders} FAILED: {e:#}",
                    kind.label()
                ));
                cell_values.push(
                    json!({"kind": kind.label(), "senders": senders, "error": format!("{e:#}")}),
                );
            }
        }
    }
    let max_om10 = cells
        .iter()
        .filter(|c| c.kind == Kind::Om(10))
        .map(|c| c.load.rps())
        .fold(0.0, f64::max);
    let skipped = json!({"skipped": "--cells"});
    let latency = if b.args.cells.is_some() {
        skipped.clone()
    } else if max_om10 > 0.0 {
        phase(
            &format!("[{name}] latency under load"),
            latency_under_load(b, backend, max_om10),
        )
        .await
    } else {
        json!({"error": "no om10 maximum measured"})
    };
    let (e2e, memory, ledger, salesforce) = if b.args.cells.is_some() {
        (skipped.clone(), skipped.clone(), skipped.clone(), skipped)
    } else {
        let e2e = phase(
            &format!("[{name}] end to end"),
            end_to_end(b, backend, true),
        )
        .await;
        let memory = phase(
            &format!("[{name}] memory backlog"),
            memory_backlog(b, backend),
        )
        .await;
        let ledger = ledger_phases(b, backend, &e2e).await;
        let salesforce = phase(
            &format!("[{name}] Salesforce batching"),
            salesforce_batching(b, backend),
        )
        .await;
        (e2e, memory, ledger, salesforce)
    };
    let peak = cells.iter().filter_map(|c| c.rss_peak_kib).max();
    json!({
        "ledger_kept": b.ledger_name(backend),
        "rss_idle_kib": idle.get("rss_idle_kib").cloned().unwrap_or(Value::Null),
        "idle": idle,
        "rss_peak_ingest_kib": peak,
        "ingest": cell_values,
        "latency_under_load": latency,
        "end_to_end": e2e,
        "memory": memory,
        "ledger": ledger,
        "salesforce": salesforce,
    })
}

/// The ledger's cost: end to end with it off (the main end-to-end figure has it on), ingest
/// with it on and off, and a trace by record id on a large ledger.
async fn ledger_phases(b: &Bench, backend: Backend, e2e_on: &Value) -> Value {
    let name = backend.name();
    if !b.has_ledger(backend) {
        let why = b.pg_note.clone().unwrap_or_else(|| "no ledger".into());
        say(format!("[{name}] ledger figures SKIPPED: {why}"));
        return json!({"skipped": why});
    }
    let e2e_off = phase(
        &format!("[{name}] end to end, ledger off"),
        end_to_end(b, backend, false),
    )
    .await;
    let rate = |v: &Value| v["deliveries_per_s_steady"].as_f64();
    let e2e_ratio = rate(e2e_on).zip(rate(&e2e_off)).map(|(on, off)| on / off);
    say(format!(
        "[{name}] end to end, ledger on/off: {} / {} deliveries/s = {} (target ≥ 0.90×)",
        num(rate(e2e_on).unwrap_or(f64::NAN)),
        num(rate(&e2e_off).unwrap_or(f64::NAN)),
        fmt_ratio(e2e_ratio),
    ));
    let ingest = phase(
        &format!("[{name}] ingest, ledger on and off"),
        ledger_ingest(b, backend),
    )
    .await;
    let trace = phase(
        &format!("[{name}] trace on a large ledger"),
        ledger_trace(b, backend),
    )
    .await;
    json!({
        "end_to_end_off": e2e_off,
        "end_to_end_ratio_on_off": e2e_ratio,
        "ingest": ingest,
        "trace": trace,
    })
}

// ---------------------------------------------------------------- targets and summary

struct Target {
    name: String,
    backend: &'static str,
    value: Option<f64>,
    goal: String,
    met: Option<bool>,
}

fn find_cell<'a>(r: &'a Value, kind: &str, senders: u64) -> Option<&'a Value> {
    r["ingest"].as_array()?.iter().find(|c| {
        c["kind"] == kind && c["senders"].as_u64() == Some(senders) && c.get("error").is_none()
    })
}

fn targets(b: &Bench, results: &BTreeMap<&'static str, Value>) -> Vec<Target> {
    let mut out = Vec::new();
    let f = |v: &Value| v.as_f64();
    for (&backend, r) in results {
        if r.get("skipped").is_some() || r.get("error").is_some() {
            continue;
        }
        let om10 = find_cell(r, "om10", 32);
        let nps10 = om10.and_then(|c| f(&c["notifications_per_s"]));
        if backend == "rabbitmq" {
            let v = nps10.and_then(|n| ratio(n, b.lapin_rate));
            out.push(Target {
                name: "ingest om10 × 32 / lapin publish-confirm".into(),
                backend,
                value: v,
                goal: "≥ 0.75×".into(),
                met: v.map(|v| v >= 0.75),
            });
        } else {
            let v = nps10.and_then(|n| ratio(n, b.lapin_rate));
            out.push(Target {
                name: "ingest om10 × 32 / lapin publish-confirm".into(),
                backend,
                value: v,
                goal: "≥ 1.00×".into(),
                met: v.map(|v| v >= 1.0),
            });
        }
        let p99 = f(&r["latency_under_load"]["ack_p99_ms"]);
        let lat_errors = r["latency_under_load"]["errors"].as_u64().unwrap_or(1);
        out.push(Target {
            name: "ack p99 at half max (ms)".into(),
            backend,
            value: p99,
            goal: "≤ 20 ms".into(),
            met: p99.map(|p| p <= 20.0 && lat_errors == 0),
        });
        let e2e = f(&r["end_to_end"]["ratio_to_littles_law"]);
        out.push(Target {
            name: "end to end / Little's-law limit".into(),
            backend,
            value: e2e,
            goal: "≥ 0.90×".into(),
            met: e2e.map(|v| v >= 0.9),
        });
        let rps1 = find_cell(r, "om1", 32).and_then(|c| f(&c["requests_per_s"]));
        out.push(Target {
            name: "om1 × 32 requests/s".into(),
            backend,
            value: rps1,
            goal: "≥ 7,000".into(),
            met: rps1.map(|v| v >= 7000.0),
        });
        let idle = f(&r["rss_idle_kib"]).map(|k| k / MB);
        out.push(Target {
            name: "RSS idle (MB)".into(),
            backend,
            value: idle,
            goal: "< 20 MB".into(),
            met: idle.map(|v| v < 20.0),
        });
        let peak = f(&r["rss_peak_ingest_kib"]).map(|k| k / MB);
        out.push(Target {
            name: "RSS peak ingest (MB)".into(),
            backend,
            value: peak,
            goal: "< 150 MB".into(),
            met: peak.map(|v| v < 150.0),
        });
        // "Flat": a relay that just stored the backlog uses no more than the same load shape
        // (100-notification messages, 32 senders) needed in its few-second ingest cell, and a
        // relay restarted on the backlog, delivering with its 64 workers, no more than the same
        // relay delivering the end-to-end test's much smaller backlog: memory must not grow
        // with the backlog. (Against an idle relay the comparison would measure the workers'
        // connections and buffers, not the backlog.)
        let jobs = num(b.plan.backlog_jobs as f64);
        let stored = f(&r["memory"]["rss_after_enqueue_kib"]).map(|k| k / MB);
        let cell = find_cell(r, "om100", 32)
            .and_then(|c| f(&c["rss_peak_kib"]))
            .map(|k| k / MB);
        out.push(Target {
            name: format!("RSS after storing {jobs} jobs (MB)"),
            backend,
            value: stored,
            goal: "≤ om100×32 peak + 10 MB".into(),
            met: stored.zip(cell).map(|(v, c)| v <= c + 10.0),
        });
        let restarted = f(&r["memory"]["rss_restarted_delivering_kib"]).map(|k| k / MB);
        let drained = f(&r["end_to_end"]["rss_at_end_kib"]).map(|k| k / MB);
        out.push(Target {
            name: format!("RSS restarted on {jobs} jobs, delivering (MB)"),
            backend,
            value: restarted,
            goal: format!("≤ 1.1 × delivering {} jobs", num(b.plan.drain_jobs as f64)),
            met: restarted.zip(drained).map(|(v, d)| v <= d * 1.1),
        });
        let l = &r["ledger"];
        let v = f(&l["end_to_end_ratio_on_off"]);
        out.push(Target {
            name: "end to end, ledger on / off".into(),
            backend,
            value: v,
            goal: "≥ 0.90×".into(),
            met: v.map(|v| v >= 0.9),
        });
        let ingest = &l["ingest"];
        let v = f(&ingest["ratio_on_off"]);
        let noise = f(&ingest["noise"]);
        out.push(Target {
            name: format!(
                "ingest {} × {}, ledger on / off",
                LEDGER_CELL.0.label(),
                LEDGER_CELL.1
            ),
            backend,
            value: v,
            goal: noise.map_or("within noise".into(), |n| {
                format!("runs overlap (±{:.0} %)", n * 100.0)
            }),
            met: ingest["within_noise"].as_bool(),
        });
        let entries = num(b.plan.ledger_entries as f64);
        let v = f(&l["trace"]["full"]["p99_ms"]);
        let trace_errors = l["trace"]["full"]["errors"].as_u64().unwrap_or(1);
        out.push(Target {
            name: format!("trace p99, {entries}-entry ledger (ms)"),
            backend,
            value: v,
            goal: "< 50 ms".into(),
            met: v.map(|v| v < 50.0 && trace_errors == 0),
        });
        let v = f(&l["trace"]["rss_ratio_full_to_empty"]);
        out.push(Target {
            name: format!("RSS, {entries}-entry / empty ledger"),
            backend,
            value: v,
            goal: "≤ 1.10×".into(),
            met: v.map(|v| v <= 1.1),
        });
        let errors: u64 = r["ingest"]
            .as_array()
            .map(|cells| cells.iter().filter_map(|c| c["errors"].as_u64()).sum())
            .unwrap_or(0);
        out.push(salesforce_target(backend, r));
        out.push(Target {
            name: "ingest errors (all cells)".into(),
            backend,
            value: Some(errors as f64),
            goal: "0".into(),
            met: Some(errors == 0),
        });
    }
    out
}

fn summary(b: &Bench, results: &BTreeMap<&'static str, Value>, targets: &[Target]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n== summary ==");
    let _ = writeln!(
        s,
        "baselines (2 KiB messages): lapin publish-confirm ×{} {} msg/s | SQLite batched insert (best) {} rows/s",
        b.args.window,
        b.lapin_rate.map_or("-".into(), num),
        b.sqlite_rate.map_or("-".into(), num),
    );
    let _ = writeln!(
        s,
        "\n{:<9} {:<8} {:>7} {:>9} {:>10} {:>8} {:>8} {:>8} {:>6} {:>8} {:>8} {:>9} {:>6} {:>6}",
        "backend",
        "kind",
        "senders",
        "req/s",
        "notif/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "×sqlite",
        "×lapin",
        "peak RSS",
        "relay",
        "bench"
    );
    for (&backend, r) in results {
        let Some(cells) = r["ingest"].as_array() else {
            let why = r
                .get("skipped")
                .or_else(|| r.get("error"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let _ = writeln!(s, "{backend:<9} not measured: {why}");
            continue;
        };
        for c in cells {
            let g = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
            if c.get("error").is_some() {
                let _ = writeln!(
                    s,
                    "{backend:<9} {:<8} {:>7} FAILED",
                    c["kind"].as_str().unwrap_or(""),
                    c["senders"].as_u64().unwrap_or(0)
                );
                continue;
            }
            let _ = writeln!(
                s,
                "{backend:<9} {:<8} {:>7} {:>9} {:>10} {:>8.2} {:>8.2} {:>8.1} {:>6} {:>8} {:>8} {:>9} {:>6.2} {:>6.2}",
                c["kind"].as_str().unwrap_or(""),
                c["senders"].as_u64().unwrap_or(0),
                num(g("requests_per_s")),
                num(g("notifications_per_s")),
                g("ack_p50_ms"),
                g("ack_p99_ms"),
                g("ack_max_ms"),
                c["errors"].as_u64().unwrap_or(0),
                if backend == "embedded" {
                    fmt_ratio(c["ratio_to_sqlite_batched_insert"].as_f64())
                } else {
                    "-".into()
                },
                fmt_ratio(c["ratio_to_lapin_publish_confirm"].as_f64()),
                mb(c["rss_peak_kib"].as_u64()),
                g("relay_cpu_cores"),
                g("bench_cpu_cores"),
            );
        }
        // A phase that failed or that `--cells` skipped has no figures to print.
        let measured = |v: &Value| v.get("error").is_none() && v.get("skipped").is_none();
        let l = &r["latency_under_load"];
        if measured(l) {
            let _ = writeln!(
                s,
                "{backend:<9} latency at half max: offered {} req/s (om10, 32 senders, open loop), achieved {} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, errors {}",
                num(l["offered_requests_per_s"].as_f64().unwrap_or(f64::NAN)),
                num(l["requests_per_s"].as_f64().unwrap_or(f64::NAN)),
                l["ack_p50_ms"].as_f64().unwrap_or(f64::NAN),
                l["ack_p99_ms"].as_f64().unwrap_or(f64::NAN),
                l["ack_max_ms"].as_f64().unwrap_or(f64::NAN),
                l["errors"].as_u64().unwrap_or(0)
            );
        }
        let e = &r["end_to_end"];
        if measured(e) {
            let _ = writeln!(
                s,
                "{backend:<9} end to end: {} deliveries/s steady ({} of {}/s); drain of {} jobs {} in {:.1} s",
                num(e["deliveries_per_s_steady"].as_f64().unwrap_or(f64::NAN)),
                fmt_ratio(e["ratio_to_littles_law"].as_f64()),
                num(e["littles_law_limit_per_s"].as_f64().unwrap_or(f64::NAN)),
                num(e["drain_jobs"].as_f64().unwrap_or(f64::NAN)),
                if e["drain_complete"] == true { "done" } else { "NOT done" },
                e["drain_secs"].as_f64().unwrap_or(f64::NAN),
            );
        }
        let m = &r["memory"];
        let _ = write!(
            s,
            "{backend:<9} RSS: idle {}, peak ingest {}",
            mb(r["rss_idle_kib"].as_u64()),
            mb(r["rss_peak_ingest_kib"].as_u64()),
        );
        if measured(m) {
            let _ = write!(
                s,
                ", {}-job backlog: {} after storing, {} restarted and delivering",
                num(m["backlog_jobs"].as_f64().unwrap_or(f64::NAN)),
                mb(m["rss_after_enqueue_kib"].as_u64()),
                mb(m["rss_restarted_delivering_kib"].as_u64()),
            );
        }
        let _ = writeln!(s);
        let l = &r["ledger"];
        if measured(l) {
            let g = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
            let i = &l["ingest"];
            let t = &l["trace"];
            let _ = writeln!(
                s,
                "{backend:<9} ledger ({}): end to end on/off {}; ingest {} × {} on/off {} (noise ±{:.1} %); trace by record id p50 {:.2} / p99 {:.2} ms with {} entries ({:.2} / {:.2} ms with {}); RSS {} with them, {} empty ({})",
                r["ledger_kept"].as_str().unwrap_or(""),
                fmt_ratio(l["end_to_end_ratio_on_off"].as_f64()),
                LEDGER_CELL.0.label(),
                LEDGER_CELL.1,
                fmt_ratio(i["ratio_on_off"].as_f64()),
                g(&i["noise"]) * 100.0,
                g(&t["full"]["p50_ms"]),
                g(&t["full"]["p99_ms"]),
                num(g(&t["entries"])),
                g(&t["small"]["p50_ms"]),
                g(&t["small"]["p99_ms"]),
                num(g(&t["traced_records"])),
                mb(t["rss_full_kib"].as_u64()),
                mb(t["rss_empty_kib"].as_u64()),
                fmt_ratio(t["rss_ratio_full_to_empty"].as_f64()),
            );
        }
        if let Some(line) = salesforce_line(backend, &r["salesforce"]) {
            let _ = writeln!(s, "{line}");
        }
    }
    let _ = writeln!(
        s,
        "(relay, bench: CPU cores used by the relay process and by this process, load generator included)"
    );
    s + &target_lines(targets)
}

/// The targets as the results file records them.
fn targets_json(targets: &[Target]) -> Vec<Value> {
    targets
        .iter()
        .map(|t| json!({"backend": t.backend, "name": t.name, "value": t.value, "goal": t.goal, "met": t.met}))
        .collect()
}

/// The targets and their verdicts, one line each.
fn target_lines(targets: &[Target]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\ntargets");
    for t in targets {
        let value = t.value.map_or("-".into(), |v| {
            if v.abs() >= 100.0 {
                num(v)
            } else {
                format!("{v:.2}")
            }
        });
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "n/a",
        };
        let _ = writeln!(
            s,
            "  {:<9} {:<44} {:>10}  {:<25} {verdict}",
            t.backend, t.name, value, t.goal
        );
    }
    s
}

// ---------------------------------------------------------------- main

#[tokio::main]
async fn main() {
    match run(Args::parse()).await {
        Ok(()) => {}
        Err(e) => {
            eprintln!("relay-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Under `cargo run` (which sets `CARGO`), build the relay with the same profile first, so
/// `cargo run --release --bin relay-bench` never measures a stale or missing relay.
fn build_relay_under_cargo() -> Res<()> {
    let (Ok(cargo), Ok(dir)) = (std::env::var("CARGO"), std::env::var("CARGO_MANIFEST_DIR")) else {
        return Ok(());
    };
    let mut cmd = std::process::Command::new(cargo);
    // The relay is another package of the workspace (the repository root).
    cmd.args(["build", "-p", "sf-centercode-relay", "--bin", "relay"])
        .current_dir(dir);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build --bin relay")?;
    if !status.success() {
        bail!("cargo build --bin relay failed ({status})");
    }
    Ok(())
}

/// Both binaries link the crate's library: a library newer than the relay means the relay was
/// not rebuilt after a change (e.g. only `cargo build --bin relay-bench` was run).
fn warn_if_stale(relay: &Path) {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let lib = relay.with_file_name("libsf_centercode_relay.rlib");
    if let (Some(r), Some(l)) = (mtime(relay), mtime(&lib)) {
        if l > r + Duration::from_secs(1) {
            say(format!(
                "warning: {} is older than the library it is built from; run `cargo build --release --workspace --bins`",
                relay.display()
            ));
        }
    }
}

// ---------------------------------------------------------------- rate limit

/// The fake's WAF capacity, and the relay's limit 10 % below it.
const WAF_PER_S: f64 = 55.0;
const LIMIT_PER_S: f64 = 50.0;
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// `--rate-limit`: one gateway and two worker processes on RabbitMQ (Redis holding the
/// limit's state) drain a backlog under `[[limits]] rate = 50` against a fake Centercode
/// that answers 429 beyond 55 requests/s. The figure: calls per second the fake saw over a
/// minute of draining, and how many it refused.
async fn rate_limit_check(b: &Bench) -> Res<()> {
    let fake = FakeCentercode::start(FakeConfig {
        rate_limit: fake_centercode::RateLimitConfig {
            enabled: true,
            requests_per_second: Some(WAF_PER_S),
            burst: Some(5),
            ..fake_centercode::RateLimitConfig::default()
        },
        ..fake_config()
    })
    .await?;
    let host = fake.base_url().trim_start_matches("http://").to_owned();
    let mut run = RelayRun::with_ledger(b, Backend::Rabbitmq, false)?;
    // A short first retry tier: a job more than 0.5 s from its place waits there.
    run.worker_extra = "retry_schedule_secs = [0.25, 1, 5, 30]".into();
    run.tail_extra = format!("\n[[limits]]\nhost = \"{host}\"\nrate = {LIMIT_PER_S}\n");
    let jobs = (LIMIT_PER_S * (RATE_WINDOW.as_secs_f64() + 30.0)) as u64;
    say(format!(
        "rate limit: fake WAF {WAF_PER_S}/s, [[limits]] rate = {LIMIT_PER_S} for {host}; storing {jobs} jobs"
    ));
    let result = async {
        let gateway = run.start(b, false, &fake.base_url()).await?;
        fill(b, &gateway, jobs).await?;
        let mut workers = Vec::new();
        for _ in 0..2 {
            workers.push(
                run.start_as(b, true, &fake.base_url(), &["--role", "worker"])
                    .await?,
            );
        }
        // Skip the start (the second process starting, connections warming up).
        let begin = epoch_ms() + 5_000;
        let end = begin + RATE_WINDOW.as_millis() as i64;
        tokio::time::sleep(Duration::from_millis((end - epoch_ms()).max(0) as u64 + 500)).await;
        let requests = fake.requests();
        let in_window: Vec<&RecordedRequest> = Vec::from_iter(requests.iter().filter(|r| {
            parse_fake_time(&r.at).is_some_and(|t| (begin..end).contains(&t))
        }));
        let answered = in_window.iter().filter(|r| r.status != 429).count();
        let rate = answered as f64 / RATE_WINDOW.as_secs_f64();
        let throttled = fake.throttled();
        let mut busiest = 0usize;
        let times: Vec<i64> = in_window.iter().filter_map(|r| parse_fake_time(&r.at)).collect();
        for (i, t) in times.iter().enumerate() {
            busiest = busiest.max(times[i..].iter().take_while(|u| **u < t + 1000).count());
        }
        for w in workers {
            w.stop().await?;
        }
        gateway.stop().await?;
        let within = (rate - LIMIT_PER_S).abs() <= LIMIT_PER_S * 0.1;
        say(format!(
            "rate limit: {rate:.1} calls/s over {} s ({} ±10 % of {LIMIT_PER_S}), busiest second {busiest}, 429 answers from the fake: {throttled}",
            RATE_WINDOW.as_secs(),
            if within { "within" } else { "OUTSIDE" }
        ));
        Ok::<Value, anyhow::Error>(json!({
            "waf_per_s": WAF_PER_S, "limit_per_s": LIMIT_PER_S, "window_secs": RATE_WINDOW.as_secs(),
            "worker_processes": 2, "jobs": jobs, "achieved_per_s": rate, "within_10pct": within,
            "busiest_second": busiest, "fake_429s": throttled,
        }))
    }
    .await;
    run.cleanup(b).await;
    fake.stop().await;
    let result = result?;
    let (file_stamp, iso_stamp) = utc_stamps();
    let rev = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let report = json!({"schema": 1, "started_at": iso_stamp, "git_rev": rev, "cores": b.cores, "rate_limit": result});
    let path = write_report(b, &format!("{file_stamp}-{rev}-rate-limit"), &report)?;
    say(format!("results: {}", path.display()));
    Ok(())
}

/// Write `report` as `{name}.json` to `--out-dir` (default `bench/results/`).
fn write_report(b: &Bench, name: &str, report: &Value) -> Res<PathBuf> {
    let out_dir = b
        .args
        .out_dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results"));
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(report)? + "\n")?;
    Ok(path)
}

/// `--salesforce`: the Salesforce batching phase alone, on each chosen backend, with its
/// own summary and `{time}-{rev}-salesforce.json`.
async fn salesforce_check(b: &Bench, backends: &[Backend]) -> Res<()> {
    let started = Instant::now();
    let (file_stamp, iso_stamp) = utc_stamps();
    let rev = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    let load_start = loadavg();
    let mut results: BTreeMap<&'static str, Value> = BTreeMap::new();
    for &backend in backends {
        say(format!("\n== backend {} ==", backend.name()));
        let v = phase(
            &format!("[{}] Salesforce batching", backend.name()),
            salesforce_batching(b, backend),
        )
        .await;
        results.insert(backend.name(), json!({ "salesforce": v }));
    }
    let targets: Vec<Target> = results
        .iter()
        .map(|(&backend, r)| salesforce_target(backend, r))
        .collect();
    say("\n== summary ==");
    for (backend, r) in &results {
        if let Some(line) = salesforce_line(backend, &r["salesforce"]) {
            say(line);
        }
    }
    say(target_lines(&targets));
    let load_end = loadavg();
    let report = json!({
        "schema": 1,
        "started_at": iso_stamp,
        "git_rev": rev,
        "git_dirty": dirty,
        "cores": b.cores,
        "backends": results.keys().collect::<Vec<_>>(),
        "plan": b.plan.to_json(),
        "results": results,
        "targets": targets_json(&targets),
        "total_secs": started.elapsed().as_secs_f64(),
        "loadavg_1m_start": load_start,
        "loadavg_1m_end": load_end,
    });
    let path = write_report(b, &format!("{file_stamp}-{rev}-salesforce"), &report)?;
    say(format!(
        "results: {} (total {:.0} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

async fn run(args: Args) -> Res<()> {
    let relay_bin = match &args.relay {
        Some(p) => p.clone(),
        None => {
            let bin = std::env::current_exe()?.with_file_name("relay");
            build_relay_under_cargo()?;
            bin
        }
    };
    if !relay_bin.exists() {
        bail!(
            "{} not found: build both binaries first with `cargo build --release --workspace --bins`, then run target/release/relay-bench",
            relay_bin.display()
        );
    }
    warn_if_stale(&relay_bin);
    if cfg!(debug_assertions) {
        say("warning: relay-bench is a debug build; build with --release for meaningful figures");
    }
    let plan = Plan::new(&args);
    let tmp_root = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(70))
        .build()?;
    let backends: Vec<Backend> = match args.backend {
        BackendArg::Embedded => vec![Backend::Embedded],
        BackendArg::Rabbitmq => vec![Backend::Rabbitmq],
        BackendArg::Both => vec![Backend::Embedded, Backend::Rabbitmq],
    };
    let mut b = Bench {
        plan,
        relay_bin,
        tmp_root,
        client,
        templates: Arc::new(Templates::new()?),
        ids: Arc::new(Ids::new()),
        lapin_rate: None,
        sqlite_rate: None,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        pg_url: None,
        pg_note: None,
        args,
    };
    if b.args.rate_limit {
        return rate_limit_check(&b).await;
    }
    // The rabbitmq backend keeps its ledger in PostgreSQL, as production does; without one
    // here it runs without a ledger and its ledger figures are skipped.
    if backends.contains(&Backend::Rabbitmq) {
        if b.args.pg_url == "none" {
            b.pg_note = Some("--pg-url none".into());
        } else {
            match pg_connect(&b.args.pg_url).await {
                Ok(client) => match client.simple_query("SELECT 1").await {
                    Ok(_) => b.pg_url = Some(b.args.pg_url.clone()),
                    Err(e) => b.pg_note = Some(format!("PostgreSQL at --pg-url: {e}")),
                },
                Err(e) => b.pg_note = Some(format!("PostgreSQL at --pg-url: {e:#}")),
            }
            if let Some(note) = &b.pg_note {
                say(format!(
                    "warning: the rabbitmq backend runs without a ledger ({note})"
                ));
            }
        }
    }
    if b.args.salesforce {
        return salesforce_check(&b, &backends).await;
    }
    let started = Instant::now();
    let (file_stamp, iso_stamp) = utc_stamps();
    let rev = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    let cores = b.cores;
    let load_start = loadavg();
    if load_start.is_some_and(|l| l >= cores as f64 / 2.0) {
        say(format!(
            "warning: the machine is busy (load average {:.1} on {cores} cores); figures will be lower and noisier than on an idle machine",
            load_start.unwrap_or(0.0)
        ));
    }
    say(format!(
        "relay-bench: rev {rev}{}, {cores} cores, backends {}, {} mode, relay {}",
        if dirty == Some(true) {
            " (uncommitted changes)"
        } else {
            ""
        },
        backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join("+"),
        if b.args.quick { "quick" } else { "full" },
        b.relay_bin.display()
    ));

    say("\n== baselines ==");
    let lapin = phase(
        "baseline lapin (RabbitMQ at --amqp-url)",
        lapin_baselines(&b),
    )
    .await;
    b.lapin_rate = lapin["publish_confirm"]["msgs_per_s"].as_f64();
    let sqlite = {
        let b = &b;
        phase("baseline SQLite", async move {
            tokio::task::block_in_place(|| sqlite_baseline(b))
        })
        .await
    };
    b.sqlite_rate = sqlite["best_rows_per_s"].as_f64();

    let mut results: BTreeMap<&'static str, Value> = BTreeMap::new();
    for backend in backends {
        let r = run_backend(&b, backend).await;
        results.insert(backend.name(), r);
    }
    let targets = targets(&b, &results);
    say(summary(&b, &results, &targets));
    let load_end = loadavg();
    say(format!(
        "load average (1 min): {} at start, {} at end, on {cores} cores",
        load_start.map_or("-".into(), |l| format!("{l:.2}")),
        load_end.map_or("-".into(), |l| format!("{l:.2}")),
    ));

    let report = json!({
        "schema": 1,
        "started_at": iso_stamp,
        "git_rev": rev,
        "git_dirty": dirty,
        "cores": cores,
        "quick": b.args.quick,
        "backends": results.keys().collect::<Vec<_>>(),
        "message_bytes": MESSAGE_BYTES,
        "publish_window": b.args.window,
        "relay_log_level": b.args.log_level,
        "relay_http_threads": b.args.http_threads,
        "cells_only": b.args.cells.as_ref().map(|c| c.0.iter().map(|(k, s)| format!("{}x{s}", k.label())).collect::<Vec<_>>()),
        "plan": b.plan.to_json(),
        "baselines": {"lapin": lapin, "sqlite": sqlite},
        "results": results,
        "targets": targets_json(&targets),
        "total_secs": started.elapsed().as_secs_f64(),
        "loadavg_1m_start": load_start,
        "loadavg_1m_end": load_end,
    });
    let path = write_report(&b, &format!("{file_stamp}-{rev}"), &report)?;
    say(format!(
        "\nresults: {} (total {:.0} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
