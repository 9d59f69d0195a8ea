//! `relay trace`, `relay ledger undelivered|export` and `relay jobs resend`: the delivery
//! ledger from the command line, through the admin API. `--email` is hashed here into its
//! subject key; the e-mail itself never leaves this process.

use crate::admin_cli::{
    exit_code, parse_time, Client, Connection, Failure, EXIT_DONE, EXIT_FAILED,
    EXIT_MATCHED_NOTHING, EXIT_USAGE,
};
use crate::settings::Action;
use clap::{Args, Subcommand};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The exit codes, as `relay trace --help` and `relay ledger --help` print them.
pub const LEDGER_EXIT_CODES_HELP: &str = "\
Exit codes:
  0  done
  1  failed: the relay could not be reached, answered 5xx, or keeps no ledger
  2  bad usage or configuration: invalid arguments, no admin token, no subject key
     to hash --email with, or a request the relay refused
  3  nothing recorded for what was asked";

/// What `relay trace` looks for: exactly one of these.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct TraceTarget {
    /// A Salesforce record id.
    #[arg(long)]
    pub record_id: Option<String>,
    /// An Outbound Message notification id (or a callout's idempotency key).
    #[arg(long)]
    pub notification_id: Option<String>,
    /// A job id.
    #[arg(long)]
    pub job: Option<String>,
    /// An e-mail address, hashed here into its subject key (only the key is sent). `-` reads
    /// it from standard input, which keeps it out of shell history.
    #[arg(long, value_name = "ADDRESS")]
    pub email: Option<String>,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub target: TraceTarget,
    /// The subject key to hash `--email` with (the file's text, trimmed): an older key after a
    /// rotation. Default: `ledger.subject_key` of the configuration (or the key a development
    /// relay generated beside its queue file).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Most jobs to show.
    #[arg(long, default_value_t = 20)]
    pub limit: u64,
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Every job that needs a look: parked, held (route paused), or with no outcome yet.
    #[command(after_help = LEDGER_EXIT_CODES_HELP)]
    Undelivered {
        /// Stored at or after: an age (24h, 7d), Unix seconds or RFC 3339.
        #[arg(long, value_parser = parse_time, default_value = "24h")]
        since: i64,
        #[arg(long)]
        route: Option<String>,
    },
    /// One row per job (erasure receipts with `--action remove_user`), streamed to stdout.
    #[command(after_help = LEDGER_EXIT_CODES_HELP)]
    Export {
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        route: Option<String>,
        /// Stored at or after: an age (30d), Unix seconds or RFC 3339.
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        /// Stored before.
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        #[arg(long, value_parser = ["csv", "json"], default_value = "csv")]
        format: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Store a delivered job again (as a new job) from the payload its route keeps
    /// (`keep_payload_days`).
    #[command(after_help = LEDGER_EXIT_CODES_HELP)]
    Resend { id: String },
}

/// `relay trace …`.
pub async fn trace(conn: &Connection, args: TraceArgs, config: Option<&Path>) -> i32 {
    exit_code(run_trace(conn, args, config).await)
}

async fn run_trace(
    conn: &Connection,
    args: TraceArgs,
    config: Option<&Path>,
) -> Result<i32, Failure> {
    let client = Client::new(conn)?;
    let t = args.target;
    let (what, mut query): (String, Vec<(String, String)>) = if let Some(id) = &t.job {
        let v = client
            .call(
                reqwest::Method::GET,
                &format!("/admin/jobs/{}", encode(id)),
                &[],
                None,
            )
            .await?;
        return Ok(show(conn, &[v]));
    } else if let Some(id) = t.record_id {
        (format!("record {id}"), vec![("record_id".into(), id)])
    } else if let Some(id) = t.notification_id {
        (
            format!("notification {id}"),
            vec![("notification_id".into(), id)],
        )
    } else {
        let email = read_email(t.email.as_deref().unwrap_or_default())?;
        let secret = subject_secret(args.key_file.as_deref(), config)?;
        let key = crate::ledger::subject_key(secret.as_bytes(), &email);
        (
            "this e-mail (by its subject key)".to_owned(),
            vec![("subject_key".into(), key)],
        )
    };
    query.push(("history".into(), "true".into()));
    query.push(("limit".into(), args.limit.to_string()));
    let v = client
        .call(reqwest::Method::GET, "/admin/jobs", &query, None)
        .await?;
    let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        let waiting = match v["not_yet_recorded"].as_u64() {
            Some(n) if n > 0 => format!(
                " ({n} job(s) wait in the queue; on RabbitMQ a job is recorded when a worker first takes it, unless ledger.record_on_store is on)"
            ),
            _ => String::new(),
        };
        return Err(Failure::new(
            EXIT_MATCHED_NOTHING,
            format!("nothing recorded for {what}{waiting}"),
        ));
    }
    Ok(show(conn, &jobs))
}

fn encode(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The e-mail of `--email`: as given, or read from standard input for `-`.
fn read_email(given: &str) -> Result<String, Failure> {
    let email = if given == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| Failure::new(EXIT_USAGE, format!("reading the e-mail: {e}")))?;
        text
    } else {
        given.to_owned()
    };
    let email = email.trim().to_owned();
    if !email.contains('@') {
        return Err(Failure::new(
            EXIT_USAGE,
            "--email: expected an e-mail address (or - to read it from standard input)",
        ));
    }
    Ok(email)
}

/// The key to hash an e-mail with: `--key-file`, else the configuration's
/// `ledger.subject_key`, else the key a development relay generated beside its queue file.
fn subject_secret(key_file: Option<&Path>, config: Option<&Path>) -> Result<String, Failure> {
    use secrecy::ExposeSecret;
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| Failure::new(EXIT_USAGE, format!("reading {}: {e}", path.display())))
    };
    if let Some(path) = key_file {
        return read(path);
    }
    let settings = crate::settings::Settings::load(config).map_err(|e| {
        Failure::new(
            EXIT_USAGE,
            format!("--email needs the subject key: pass --key-file, or run where the relay's configuration loads ({e})"),
        )
    })?;
    let key = settings.ledger.subject_key.expose_secret();
    if !key.is_empty() {
        return Ok(key.to_owned());
    }
    let generated = crate::ledger::generated_key_file(&settings);
    if generated.is_file() {
        return read(&generated);
    }
    Err(Failure::new(
        EXIT_USAGE,
        "--email needs the subject key: set RELAY__LEDGER__SUBJECT_KEY or pass --key-file",
    ))
}

/// Print jobs as timelines (received → stored → attempts → outcomes), or as JSON.
fn show(conn: &Connection, jobs: &[Value]) -> i32 {
    if conn.json {
        println!("{}", Value::Array(jobs.to_vec()));
        return EXIT_DONE;
    }
    for j in jobs {
        let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
        println!(
            "job {}  {}  {}  record {}  notification {}  now: {}",
            s(&j["id"]),
            s(&j["route"]),
            s(&j["action"]),
            s(&j["record_id"]),
            s(&j["notification_id"]),
            s(&j["state"])
        );
        let mut events: Vec<(String, String)> = vec![
            (s(&j["received_at"]), "received".into()),
            (s(&j["stored_at"]), "stored".into()),
        ];
        // Whose status an attempt carries: Salesforce's for the jobs that write into it.
        let destination = Action::parse(&s(&j["action"])).map_or("Centercode", |a| a.destination());
        for a in j["attempts"].as_array().into_iter().flatten() {
            let answer = match (a["status"].as_u64(), a["error_class"].as_str()) {
                (Some(status), _) => format!("{destination} {status}"),
                (None, Some(class)) => format!("no answer ({class})"),
                _ => "no call".into(),
            };
            events.push((
                s(&a["started_at"]),
                format!(
                    "attempt {}: {answer} -> {} ({} ms)",
                    a["attempt"],
                    s(&a["outcome"]),
                    a["duration_ms"]
                ),
            ));
        }
        for o in j["outcomes"].as_array().into_iter().flatten() {
            let reason = o["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            events.push((s(&o["at"]), format!("{}{reason}", s(&o["outcome"]))));
        }
        // RFC 3339 in UTC with fixed width sorts as text; stable, so received precedes stored.
        events.sort_by(|a, b| a.0.cmp(&b.0));
        for (at, what) in events {
            println!("  {at}  {what}");
        }
    }
    EXIT_DONE
}

/// `relay ledger …`.
pub async fn ledger(conn: &Connection, command: LedgerCommand) -> i32 {
    exit_code(run_ledger(conn, command).await)
}

async fn run_ledger(conn: &Connection, command: LedgerCommand) -> Result<i32, Failure> {
    let client = Client::new(conn)?;
    match command {
        LedgerCommand::Undelivered { since, route } => {
            let mut query = vec![
                ("undelivered".to_owned(), "true".to_owned()),
                ("since".into(), since.to_string()),
                ("limit".into(), crate::ledger::MAX_PAGE.to_string()),
            ];
            if let Some(r) = route {
                query.push(("route".into(), r));
            }
            let mut all = Vec::new();
            loop {
                let v = client
                    .call(reqwest::Method::GET, "/admin/jobs", &query, None)
                    .await?;
                all.extend(v["jobs"].as_array().cloned().unwrap_or_default());
                match v["next_cursor"].as_str() {
                    Some(c) => {
                        query.retain(|(k, _)| k != "cursor");
                        query.push(("cursor".into(), c.to_owned()));
                    }
                    None => break,
                }
            }
            if conn.json {
                println!("{}", Value::Array(all));
            } else if all.is_empty() {
                println!("nothing undelivered: every job stored since then completed");
            } else {
                println!(
                    "{:<36}  {:<8}  {:<16}  {:<18}  {:<18}  {:<24}  LAST STATUS",
                    "ID", "STATE", "ROUTE", "RECORD", "NOTIFICATION", "STORED AT"
                );
                for j in &all {
                    let s = |k: &str| j[k].as_str().unwrap_or("-").to_owned();
                    println!(
                        "{:<36}  {:<8}  {:<16}  {:<18}  {:<18}  {:<24}  {}",
                        s("id"),
                        s("state"),
                        s("route"),
                        s("record_id"),
                        s("notification_id"),
                        s("stored_at"),
                        j["centercode_status"]
                    );
                }
            }
            Ok(EXIT_DONE)
        }
        LedgerCommand::Export {
            action,
            route,
            since,
            until,
            format,
        } => {
            let query: Vec<(&str, String)> = [
                ("action", action),
                ("route", route),
                ("since", since.map(|s| s.to_string())),
                ("until", until.map(|s| s.to_string())),
                ("format", Some(format)),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            stream_to_stdout(&client, "/admin/jobs/export", &query).await
        }
    }
}

/// Copy a streamed admin answer to standard output chunk by chunk (no whole body in memory).
async fn stream_to_stdout(
    client: &Client,
    path: &str,
    query: &[(&str, String)],
) -> Result<i32, Failure> {
    use std::io::Write;
    let res = client
        .http
        .get(format!("{}{path}", client.base))
        .bearer_auth(&client.token)
        .query(query)
        .send()
        .await
        .map_err(|e| {
            Failure::new(
                EXIT_FAILED,
                format!("could not reach the relay at {}: {e}", client.base),
            )
        })?;
    if !res.status().is_success() {
        let status = res.status();
        let v: Value = res.json().await.unwrap_or(Value::Null);
        let message = v["error"]["message"].as_str().unwrap_or("no details");
        let code = if status.is_client_error() {
            EXIT_USAGE
        } else {
            EXIT_FAILED
        };
        return Err(Failure::new(
            code,
            format!("relay answered {status}: {message}"),
        ));
    }
    let mut res = res;
    let written = |r: std::io::Result<()>| {
        r.map_err(|e| Failure::new(EXIT_FAILED, format!("writing the export: {e}")))
    };
    while let Some(chunk) = res
        .chunk()
        .await
        .map_err(|e| Failure::new(EXIT_FAILED, format!("the export stopped part way: {e}")))?
    {
        written(std::io::stdout().write_all(&chunk))?;
    }
    written(std::io::stdout().flush())?;
    Ok(EXIT_DONE)
}

/// `relay jobs …`.
pub async fn jobs(conn: &Connection, command: JobsCommand) -> i32 {
    exit_code(run_jobs(conn, command).await)
}

async fn run_jobs(conn: &Connection, command: JobsCommand) -> Result<i32, Failure> {
    let client = Client::new(conn)?;
    match command {
        JobsCommand::Resend { id } => {
            let v = client
                .call(
                    reqwest::Method::POST,
                    &format!("/admin/jobs/{}/resend", encode(&id)),
                    &[],
                    None,
                )
                .await?;
            if conn.json {
                println!("{v}");
            } else {
                println!(
                    "job {id} resent as job {}",
                    v["job_id"].as_str().unwrap_or("?")
                );
            }
            Ok(EXIT_DONE)
        }
    }
}
