//! `relay parked …` and `relay routes …`: the admin API from the command line, as tables for
//! people or JSON (`--json`) for scripts. The token comes from `--token` or
//! `RELAY_ADMIN_TOKEN`. Exit codes are in [`EXIT_CODES_HELP`].

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use std::io::IsTerminal;

/// The command finished.
pub const EXIT_DONE: i32 = 0;
/// The relay could not be reached, or failed (5xx).
pub const EXIT_FAILED: i32 = 1;
/// Bad usage or configuration: an invalid argument, no token, a token the relay refuses, or a
/// request the admin API refused (400).
pub const EXIT_USAGE: i32 = 2;
/// The filter (or id) matched no parked job.
pub const EXIT_MATCHED_NOTHING: i32 = 3;

/// The exit codes, as `relay parked --help` prints them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  done
  1  failed: the relay could not be reached or answered 5xx
  2  bad usage or configuration: invalid arguments, no admin token (--token or
     RELAY_ADMIN_TOKEN), a token the relay refuses, or a request it refused (400)
  3  the filter matched nothing: no parked job listed, replayed or purged
     (or `show` of an id that is not parked)";

/// The exit codes, as `relay routes --help` prints them.
pub const ROUTES_EXIT_CODES_HELP: &str = "\
Exit codes:
  0  done
  1  failed: the relay could not be reached or answered 5xx
  2  bad usage or configuration: invalid arguments, no admin token (--token or
     RELAY_ADMIN_TOKEN), a token the relay refuses, or a route it does not know";

/// Where the admin API is and how to print.
#[derive(Args)]
pub struct Connection {
    /// Base URL of the relay.
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true, value_parser = parse_url)]
    pub url: String,
    /// The relay's admin.token.
    #[arg(
        long,
        env = "RELAY_ADMIN_TOKEN",
        hide_env_values = true,
        global = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("json", &self.json)
            .finish()
    }
}

/// `--url`: an http(s) URL, or a usage error (exit code 2) from clap.
fn parse_url(s: &str) -> Result<String, String> {
    match reqwest::Url::parse(s) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(s.to_owned()),
        Ok(url) => Err(format!(
            "`{}` is not http or https; give the relay's base URL, e.g. http://127.0.0.1:8080",
            url.scheme()
        )),
        Err(e) => Err(format!(
            "{e}; give the relay's base URL, e.g. http://127.0.0.1:8080"
        )),
    }
}

/// Which parked jobs.
#[derive(Debug, Args, Default)]
pub struct Filter {
    #[arg(long)]
    pub route: Option<String>,
    #[arg(long)]
    pub action: Option<String>,
    #[arg(long)]
    pub org_id: Option<String>,
    #[arg(long)]
    pub record_id: Option<String>,
    /// Substring of the park reason.
    #[arg(long)]
    pub reason: Option<String>,
    /// Parked at or after: Unix seconds, RFC 3339 (2026-12-01T10:00:00Z) or an age before now
    /// (90s, 15m, 2h, 7d, 1w).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<i64>,
    /// Parked before: Unix seconds, RFC 3339 (2026-12-01T10:00:00Z) or an age before now
    /// (90s, 15m, 2h, 7d, 1w).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<i64>,
    /// Exactly these job ids (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub ids: Option<Vec<String>>,
    /// Every parked job (bulk actions refuse an empty filter otherwise).
    #[arg(long)]
    pub all: bool,
}

impl Filter {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "route": self.route, "action": self.action, "org_id": self.org_id, "record_id": self.record_id,
            "reason": self.reason, "since": self.since, "until": self.until, "ids": self.ids, "all": self.all,
        });
        if let Value::Object(map) = &mut v {
            map.retain(|_, v| !v.is_null());
        }
        v
    }

    fn to_query(&self) -> Vec<(String, String)> {
        let mut q = Vec::new();
        if let Value::Object(map) = self.to_json() {
            for (k, v) in map {
                match v {
                    Value::String(s) => q.push((k, s)),
                    // A query string has no arrays: the admin API reads `ids=a,b`.
                    Value::Array(items) => q.push((
                        k,
                        items
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(","),
                    )),
                    other => q.push((k, other.to_string())),
                }
            }
        }
        q
    }
}

/// What `--since`/`--until` accept, for the error message.
const TIME_FORMS: &str = "give Unix seconds (1796119200), RFC 3339 (2026-12-01T10:00:00Z, \
    2026-12-01T12:00:00+02:00) or an age before now (90s, 15m, 2h, 7d, 1w)";

/// `--since`/`--until` as Unix seconds: Unix seconds as given, an RFC 3339 date-time
/// (fractional seconds dropped: the admin API counts whole seconds), or an age (`90s`, `15m`,
/// `2h`, `7d`, `1w`) meaning that long before now.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    parse_time_at(s, now)
}

/// [`parse_time`] with "now" given.
fn parse_time_at(s: &str, now: i64) -> Result<i64, String> {
    let s = s.trim();
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let unsigned = s.strip_prefix('-').unwrap_or(s);
    if digits(unsigned) {
        return s.parse().map_err(|_| format!("out of range; {TIME_FORMS}"));
    }
    if let Some(unit) = s.chars().last().filter(|c| "smhdw".contains(*c)) {
        let count = &s[..s.len() - 1];
        if digits(count) {
            let secs_per = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => 7 * 86_400,
            };
            return count
                .parse::<i64>()
                .ok()
                .and_then(|n| n.checked_mul(secs_per))
                .and_then(|age| now.checked_sub(age))
                .ok_or_else(|| format!("too long an age; {TIME_FORMS}"));
        }
    }
    match parse_rfc3339(s) {
        Ok(secs) => Ok(secs),
        Err(Some(why)) => Err(format!("{why}; {TIME_FORMS}")),
        Err(None) => Err(format!("not a time; {TIME_FORMS}")),
    }
}

/// Unix seconds of an RFC 3339 date-time (`2026-12-01T10:00:00Z`, `…T10:00:00.250+02:00`).
/// `Err(None)` when `s` does not have the shape; `Err(Some(why))` when a part is out of range.
fn parse_rfc3339(s: &str) -> Result<i64, Option<String>> {
    parse_rfc3339_ms(s).map(|ms| ms.div_euclid(1000))
}

/// Milliseconds since the epoch of an RFC 3339 date-time (fractions beyond milliseconds
/// dropped); errors as [`parse_rfc3339`]. Salesforce's `SystemModstamp` has this shape.
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, Option<String>> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Result<i64, Option<String>> {
        let part = b.get(range).ok_or(None)?;
        if part.iter().all(u8::is_ascii_digit) {
            Ok(part.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
        } else {
            Err(None)
        }
    };
    let at = |i: usize, allowed: &[u8]| -> Result<(), Option<String>> {
        match b.get(i) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(None),
        }
    };
    let year = num(0..4)?;
    at(4, b"-")?;
    let month = num(5..7)?;
    at(7, b"-")?;
    let day = num(8..10)?;
    at(10, b"Tt ")?;
    let hour = num(11..13)?;
    at(13, b":")?;
    let minute = num(14..16)?;
    at(16, b":")?;
    let second = num(17..19)?;
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        let fraction = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if fraction == 0 {
            return Err(None);
        }
        millis = (0..3).fold(0, |n, k| {
            n * 10
                + b.get(i + 1 + k)
                    .filter(|_| k < fraction)
                    .map_or(0, |d| i64::from(d - b'0'))
        });
        i += 1 + fraction;
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() => {
            let (hours, minutes) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            at(i + 3, b":")?;
            if hours > 23 || minutes > 59 {
                return Err(Some("the UTC offset is out of range".to_owned()));
            }
            let offset = hours * 3600 + minutes * 60;
            if *sign == b'-' {
                -offset
            } else {
                offset
            }
        }
        None => return Err(Some("no UTC offset (add Z or +HH:MM)".to_owned())),
        _ => return Err(None),
    };
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(Some("no such date".to_owned()));
    }
    // 60 is a leap second (RFC 3339 allows it): it counts as the next minute's first second.
    if hour > 23 || minute > 59 || second > 60 {
        return Err(Some("no such time of day".to_owned()));
    }
    Ok(
        (days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset)
            * 1000
            + millis,
    )
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[derive(Debug, Subcommand)]
pub enum ParkedCommand {
    /// List parked jobs, oldest parked first, a page at a time.
    #[command(after_help = EXIT_CODES_HELP)]
    List {
        #[command(flatten)]
        filter: Filter,
        /// Jobs per page (at most 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
        /// Start after this position: the `next_cursor` of the previous page (it stays valid
        /// when the jobs before it are replayed or purged).
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// One parked job, with the request a replay would send now.
    #[command(after_help = EXIT_CODES_HELP)]
    Show { id: String },
    /// Move parked jobs back to the work queue (attempts reset, current mapping).
    #[command(after_help = EXIT_CODES_HELP)]
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Only count what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete parked jobs for good.
    #[command(after_help = EXIT_CODES_HELP)]
    Purge {
        #[command(flatten)]
        filter: Filter,
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoutesCommand {
    /// Routes and whether they are paused.
    #[command(after_help = ROUTES_EXIT_CODES_HELP)]
    List,
    /// Stop delivering a route's jobs (they wait in the queue).
    #[command(after_help = ROUTES_EXIT_CODES_HELP)]
    Pause { route: String },
    /// Deliver a paused route's jobs again.
    #[command(after_help = ROUTES_EXIT_CODES_HELP)]
    Resume { route: String },
}

/// Why a command stopped, with its exit code.
pub(crate) struct Failure {
    pub(crate) code: i32,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Print a failure on stderr and turn it into the exit code.
pub(crate) fn exit_code(result: Result<i32, Failure>) -> i32 {
    result.unwrap_or_else(|f| {
        eprintln!("relay: {}", f.message);
        f.code
    })
}

pub(crate) struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) token: String,
}

impl Client {
    pub(crate) fn new(conn: &Connection) -> Result<Self, Failure> {
        let token = conn
            .token
            .clone()
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| {
                Failure::new(
                    EXIT_USAGE,
                    "no admin token: pass --token or set RELAY_ADMIN_TOKEN to the relay's admin.token",
                )
            })?;
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| Failure::new(EXIT_FAILED, format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: conn.url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(String, String)],
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .query(query);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.map_err(|e| {
            Failure::new(
                EXIT_FAILED,
                format!("could not reach the relay at {}: {e}", self.base),
            )
        })?;
        let status = res.status();
        let value: Option<Value> = res.json().await.ok();
        if status.is_success() {
            return value.ok_or_else(|| {
                Failure::new(
                    EXIT_FAILED,
                    format!("the relay at {} answered {status} without JSON", self.base),
                )
            });
        }
        let value = value.unwrap_or(Value::Null);
        let code = value["error"]["code"].as_str().unwrap_or("");
        let message = value["error"]["message"].as_str().unwrap_or("no details");
        let (exit, advice) = match status.as_u16() {
            404 if code == "not_found" => (EXIT_MATCHED_NOTHING, ""),
            401 | 403 => (
                EXIT_USAGE,
                " (the token from --token or RELAY_ADMIN_TOKEN is not the relay's admin.token)",
            ),
            400..=499 => (EXIT_USAGE, ""),
            _ => (EXIT_FAILED, ""),
        };
        Err(Failure::new(
            exit,
            format!("relay answered {status}: {message}{advice}"),
        ))
    }
}

fn print_jobs(jobs: &[Value]) {
    println!(
        "{:<36}  {:<16}  {:<18}  {:<18}  {:>3}  {:<24}  REASON",
        "ID", "ROUTE", "NOTIFICATION", "RECORD", "ATT", "PARKED AT"
    );
    for j in jobs {
        let s = |k: &str| j[k].as_str().unwrap_or("-").to_owned();
        println!(
            "{:<36}  {:<16}  {:<18}  {:<18}  {:>3}  {:<24}  {}",
            s("id"),
            s("route"),
            s("notification_id"),
            s("record_id"),
            j["attempts"],
            s("parked_at"),
            s("reason")
        );
    }
}

/// Parked jobs moved per replay request: a large replay shows progress and can be
/// interrupted between batches.
const REPLAY_BATCH: u64 = 500;

/// `relay parked …`; prints any failure and returns the exit code.
pub async fn parked(conn: &Connection, command: ParkedCommand) -> anyhow::Result<i32> {
    Ok(exit_code(run_parked(conn, command).await))
}

async fn run_parked(conn: &Connection, command: ParkedCommand) -> Result<i32, Failure> {
    if let ParkedCommand::Purge { yes: false, .. } = command {
        return Err(Failure::new(
            EXIT_USAGE,
            "purging deletes jobs for good; add --yes",
        ));
    }
    let client = Client::new(conn)?;
    match command {
        ParkedCommand::List {
            filter,
            limit,
            cursor,
        } => list(conn, &client, &filter, limit, cursor).await,
        ParkedCommand::Show { id } => {
            let v = client
                .call(
                    reqwest::Method::GET,
                    &format!("/admin/parked/{id}"),
                    &[],
                    None,
                )
                .await?;
            if conn.json {
                println!("{v}");
            } else {
                print_jobs(std::slice::from_ref(&v));
                println!("\nprevious reasons: {}", v["previous_reasons"]);
                match v["request_now"]["text"].as_str() {
                    Some(text) => println!("\na replay would send:\n{text}"),
                    None => println!("\na replay would park again: {}", v["request_now"]["error"]),
                }
            }
            Ok(EXIT_DONE)
        }
        ParkedCommand::Replay { filter, dry_run } => replay(conn, &client, &filter, dry_run).await,
        ParkedCommand::Purge { filter, .. } => {
            let mut query = filter.to_query();
            query.push(("confirm".into(), "true".into()));
            let v = client
                .call(reqwest::Method::DELETE, "/admin/parked", &query, None)
                .await?;
            warn_unmatched(&v);
            report(
                conn,
                v.clone(),
                &format!("purged {} parked job(s)", v["purged"]),
            );
            Ok(if v["purged"].as_u64() == Some(0) {
                EXIT_MATCHED_NOTHING
            } else {
                EXIT_DONE
            })
        }
    }
}

async fn list(
    conn: &Connection,
    client: &Client,
    filter: &Filter,
    limit: u64,
    cursor: Option<String>,
) -> Result<i32, Failure> {
    let page = |limit: u64, cursor: Option<String>| {
        let mut query = filter.to_query();
        query.push(("limit".into(), limit.to_string()));
        if let Some(cursor) = cursor {
            query.push(("cursor".into(), cursor));
        }
        async move {
            client
                .call(reqwest::Method::GET, "/admin/parked", &query, None)
                .await
        }
    };
    let mut v = page(limit, cursor).await?;
    // The API offers a cursor whenever a page is full; look one job ahead, so that the cursor
    // (and the hint) never leads to an empty page.
    if let Some(next) = v["next_cursor"].as_str().map(str::to_owned) {
        let ahead = page(1, Some(next)).await?;
        if ahead["jobs"].as_array().map_or(true, Vec::is_empty) {
            v["next_cursor"] = Value::Null;
        }
    }
    if conn.json {
        println!("{v}");
    } else {
        let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
        print_jobs(&jobs);
        if let Some(next) = v["next_cursor"].as_str() {
            println!(
                "more parked jobs; next page: {}",
                next_page_command(std::env::args(), next)
            );
        }
    }
    warn_unmatched(&v);
    Ok(if v["jobs"].as_array().map_or(true, Vec::is_empty) {
        EXIT_MATCHED_NOTHING
    } else {
        EXIT_DONE
    })
}

/// The command line that was run, with `--cursor <next>` in place of any cursor it had. A
/// `--token` given on the command line is left out, never echoed.
fn next_page_command(args: impl IntoIterator<Item = String>, next: &str) -> String {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--cursor" || arg == "--token" {
            args.next();
        } else if !(arg.starts_with("--cursor=") || arg.starts_with("--token=")) {
            out.push(shell_quote(&arg));
        }
    }
    out.push("--cursor".into());
    out.push(shell_quote(next));
    out.join(" ")
}

/// `s` as one POSIX shell word.
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c);
    // `~` expands only at the start of a word; inside one (cursors are `{ms}~{id}`) it is plain.
    if !s.is_empty() && !s.starts_with('~') && s.chars().all(|c| plain(c) || c == '~') {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

async fn replay(
    conn: &Connection,
    client: &Client,
    filter: &Filter,
    dry_run: bool,
) -> Result<i32, Failure> {
    let post = |body: Value| {
        client.call(
            reqwest::Method::POST,
            "/admin/parked/replay",
            &[],
            Some(body),
        )
    };
    let mut body = filter.to_json();
    body["dry_run"] = json!(true);
    let counted = post(body.clone()).await?;
    warn_unmatched(&counted);
    let matched = counted["matched"].as_u64().unwrap_or(0);
    if dry_run {
        report(
            conn,
            counted.clone(),
            &format!("{matched} parked job(s) match; nothing moved (dry run)"),
        );
        return Ok(if matched == 0 {
            EXIT_MATCHED_NOTHING
        } else {
            EXIT_DONE
        });
    }
    if matched == 0 {
        report(conn, counted, "no parked job matches; nothing moved");
        return Ok(EXIT_MATCHED_NOTHING);
    }
    body["dry_run"] = json!(false);
    body["limit"] = json!(REPLAY_BATCH);
    let bar = progress_bar(conn, matched);
    let mut moved = 0u64;
    loop {
        let n = match post(body.clone()).await {
            Ok(v) => v["moved"].as_u64().unwrap_or(0),
            Err(f) => {
                bar.abandon();
                return Err(Failure::new(
                    f.code,
                    format!("{} (after {moved} of {matched} replayed)", f.message),
                ));
            }
        };
        moved += n;
        bar.set_position(moved.min(matched));
        if n == 0 || moved >= matched {
            break;
        }
    }
    bar.finish_and_clear();
    report(
        conn,
        json!({"matched": matched, "moved": moved, "dry_run": false}),
        &format!("replayed {moved} of {matched} parked job(s)"),
    );
    Ok(EXIT_DONE)
}

/// A progress bar on stderr when it is a terminal (and not with `--json`); hidden otherwise,
/// so pipes and logs get no control characters.
fn progress_bar(conn: &Connection, total: u64) -> ProgressBar {
    if conn.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("[{bar:40}] {pos}/{len} replayed ({elapsed})") {
        bar.set_style(style.progress_chars("#>."));
    }
    // Shown at 0 while the first batch is replayed.
    bar.tick();
    bar
}

/// Ids given with `--ids` that matched nothing are said on stderr, never silently dropped.
fn warn_unmatched(v: &Value) {
    if let Some(ids) = v["unmatched_ids"].as_array().filter(|ids| !ids.is_empty()) {
        let ids: Vec<&str> = ids.iter().filter_map(Value::as_str).collect();
        eprintln!(
            "no parked job matches these id(s) with the other filters: {}",
            ids.join(", ")
        );
    }
}

fn report(conn: &Connection, value: Value, text: &str) {
    if conn.json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

/// `relay routes …`; prints any failure and returns the exit code.
pub async fn routes(conn: &Connection, command: RoutesCommand) -> anyhow::Result<i32> {
    Ok(exit_code(run_routes(conn, command).await))
}

async fn run_routes(conn: &Connection, command: RoutesCommand) -> Result<i32, Failure> {
    let client = Client::new(conn)?;
    let v = match command {
        RoutesCommand::List => {
            client
                .call(reqwest::Method::GET, "/admin/routes", &[], None)
                .await?
        }
        RoutesCommand::Pause { route } => {
            client
                .call(
                    reqwest::Method::POST,
                    &format!("/admin/routes/{route}/pause"),
                    &[],
                    None,
                )
                .await?
        }
        RoutesCommand::Resume { route } => {
            client
                .call(
                    reqwest::Method::POST,
                    &format!("/admin/routes/{route}/resume"),
                    &[],
                    None,
                )
                .await?
        }
    };
    if conn.json {
        println!("{v}");
    } else if let Some(routes) = v["routes"].as_array() {
        println!("{:<24}  {:<16}  STATE", "ROUTE", "ACTION");
        for r in routes {
            let state = if r["paused"].as_bool() == Some(true) {
                "paused"
            } else {
                "running"
            };
            println!(
                "{:<24}  {:<16}  {state}",
                r["name"].as_str().unwrap_or("?"),
                r["action"].as_str().unwrap_or("?")
            );
        }
    } else {
        let state = if v["paused"].as_bool() == Some(true) {
            "paused"
        } else {
            "running"
        };
        println!("route {} is {state}", v["route"].as_str().unwrap_or("?"));
    }
    Ok(EXIT_DONE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn unix_seconds_pass_through() {
        assert_eq!(parse_time_at("1733047200", NOW), Ok(1_733_047_200));
        assert_eq!(parse_time_at("0", NOW), Ok(0));
        assert_eq!(parse_time_at(" 42 ", NOW), Ok(42));
        assert_eq!(parse_time_at("-5", NOW), Ok(-5));
        assert!(parse_time_at("99999999999999999999", NOW).is_err());
    }

    #[test]
    fn ages_count_back_from_now() {
        for (age, secs) in [
            ("90s", 90),
            ("15m", 900),
            ("2h", 7200),
            ("7d", 604_800),
            ("1w", 604_800),
            ("0s", 0),
        ] {
            assert_eq!(parse_time_at(age, NOW), Ok(NOW - secs), "{age}");
        }
        assert!(parse_time_at("99999999999999999w", NOW).is_err());
        for bad in ["h", "-2h", "2H", "2 h", "1.5h", "2y", "2hours", "1h30m"] {
            assert!(parse_time_at(bad, NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn rfc3339_in_utc_with_offsets_and_fractions() {
        for (text, secs) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2024-05-14T09:21:07Z", 1_715_678_467),
            ("2024-05-14T09:21:07.123Z", 1_715_678_467),
            ("2024-05-14T09:21:07.999999999Z", 1_715_678_467),
            ("2024-05-14t09:21:07z", 1_715_678_467),
            ("2024-05-14 09:21:07Z", 1_715_678_467),
            ("2024-05-14T11:21:07+02:00", 1_715_678_467),
            ("2024-05-14T03:51:07.5-05:30", 1_715_678_467),
            ("2024-05-14T09:21:07+00:00", 1_715_678_467),
            ("2026-12-01T10:00:00Z", 1_796_119_200),
            ("2024-02-29T00:00:00Z", 1_709_164_800),
            ("2000-02-29T00:00:00Z", 951_782_400),
            ("1969-12-31T23:59:59Z", -1),
            // A leap second is the next minute's first second.
            ("2016-12-31T23:59:60Z", 1_483_228_800),
        ] {
            assert_eq!(parse_time_at(text, NOW), Ok(secs), "{text}");
        }
    }

    #[test]
    fn rfc3339_round_trips_with_the_admin_api_format() {
        let mut ms: i64 = -86_400_000 * 800;
        while ms < 4_102_444_800_000 {
            let text = crate::admin::rfc3339(ms);
            assert_eq!(parse_time_at(&text, NOW), Ok(ms.div_euclid(1000)), "{text}");
            assert_eq!(parse_rfc3339_ms(&text), Ok(ms), "{text}");
            ms += 3_600_000 * 37 + 123_457;
        }
    }

    #[test]
    fn anything_else_is_refused_naming_the_accepted_forms() {
        for bad in [
            "",
            "yesterday",
            "2026-12-01",
            "2026-12-01T10:00:00",
            "2026-12-01T10:00Z",
            "2026-12-01T10:00:00.Z",
            "2026-12-01T10:00:00+0200",
            "2026-12-01T10:00:00+02",
            "2026-12-01T10:00:00Zjunk",
            "2026-13-01T10:00:00Z",
            "2026-02-29T10:00:00Z",
            "1900-02-29T10:00:00Z",
            "2026-04-31T10:00:00Z",
            "2026-12-00T10:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T10:60:00Z",
            "2026-12-01T10:00:61Z",
            "2026-12-01T10:00:00+24:00",
            "2026-12-01T10:00:00+02:60",
            "２０２６-12-01T10:00:00Z",
            "2026-12-01T10:00:00Zé",
        ] {
            let err = parse_time_at(bad, NOW).unwrap_err();
            assert!(
                err.contains("Unix seconds")
                    && err.contains("RFC 3339")
                    && err.contains("2h")
                    && err.contains("7d"),
                "{bad}: {err}"
            );
        }
        assert!(parse_time_at("2026-12-01T10:00:00", NOW)
            .unwrap_err()
            .contains("no UTC offset"));
        assert!(parse_time_at("2026-02-30T10:00:00Z", NOW)
            .unwrap_err()
            .contains("no such date"));
    }

    #[test]
    fn the_next_page_command_replaces_the_cursor_and_drops_the_token() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            next_page_command(
                args(&[
                    "relay",
                    "parked",
                    "list",
                    "--limit",
                    "1",
                    "--reason",
                    "bad value"
                ]),
                "abc"
            ),
            "relay parked list --limit 1 --reason 'bad value' --cursor abc"
        );
        assert_eq!(
            next_page_command(
                args(&[
                    "/usr/bin/relay",
                    "parked",
                    "--token",
                    "s3cret",
                    "list",
                    "--cursor",
                    "old",
                    "--token=s3cret",
                    "--cursor=older",
                    "--reason",
                    "it's",
                ]),
                "new"
            ),
            r"/usr/bin/relay parked list --reason 'it'\''s' --cursor new"
        );
    }

    #[test]
    fn urls_must_be_http() {
        assert!(parse_url("http://127.0.0.1:8080").is_ok());
        assert!(parse_url("https://relay.example.org/").is_ok());
        assert!(parse_url("ftp://relay").is_err());
        assert!(parse_url("relay:8080").is_err());
        assert!(parse_url("not a url").is_err());
    }
}
