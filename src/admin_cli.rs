//! `relay parked …` and `relay routes …`: the admin API from the command line, as tables for
//! people or JSON (`--json`) for scripts. The token comes from `RELAY_ADMIN_TOKEN`.

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::io::Write;

/// Where the admin API is and how to print.
#[derive(Debug, Args)]
pub struct Connection {
    /// Base URL of the relay.
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
    pub url: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
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
    /// Parked at or after (Unix seconds).
    #[arg(long)]
    pub since: Option<i64>,
    /// Parked before (Unix seconds).
    #[arg(long)]
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

#[derive(Debug, Subcommand)]
pub enum ParkedCommand {
    /// List parked jobs.
    List {
        #[command(flatten)]
        filter: Filter,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One parked job, with the request a replay would send now.
    Show { id: String },
    /// Move parked jobs back to the work queue (attempts reset, current mapping).
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Only count what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete parked jobs for good.
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
    List,
    /// Stop delivering a route's jobs (they wait in the queue).
    Pause { route: String },
    /// Deliver a paused route's jobs again.
    Resume { route: String },
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(conn: &Connection) -> anyhow::Result<Self> {
        let token = std::env::var("RELAY_ADMIN_TOKEN")
            .map_err(|_| anyhow::anyhow!("set RELAY_ADMIN_TOKEN to the relay's admin.token"))?;
        Ok(Self {
            http: reqwest::Client::new(),
            base: conn.url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(String, String)],
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .query(query);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("could not reach the relay at {}: {e}", self.base))?;
        let status = res.status();
        let value: Value = res.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value["error"]["message"].as_str().unwrap_or("no details");
            anyhow::bail!("relay answered {status}: {message}");
        }
        Ok(value)
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

/// `relay parked …`.
pub async fn parked(conn: &Connection, command: ParkedCommand) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    match command {
        ParkedCommand::List { filter, limit } => {
            let mut query = filter.to_query();
            query.push(("limit".into(), limit.to_string()));
            let v = client
                .call(reqwest::Method::GET, "/admin/parked", &query, None)
                .await?;
            if conn.json {
                println!("{v}");
            } else {
                let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
                print_jobs(&jobs);
                if let Some(next) = v["next_cursor"].as_str() {
                    println!("(more: the API's cursor is {next})");
                }
            }
            warn_unmatched(&v);
            if v["jobs"].as_array().is_some_and(Vec::is_empty) {
                return Ok(EXIT_MATCHED_NOTHING);
            }
        }
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
        }
        ParkedCommand::Replay { filter, dry_run } => {
            let mut body = filter.to_json();
            body["dry_run"] = json!(true);
            let counted = client
                .call(
                    reqwest::Method::POST,
                    "/admin/parked/replay",
                    &[],
                    Some(body.clone()),
                )
                .await?;
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
                    0
                });
            }
            if matched == 0 {
                report(conn, counted, "no parked job matches; nothing moved");
                return Ok(EXIT_MATCHED_NOTHING);
            }
            // Replay in batches so a large replay shows progress and can be interrupted safely.
            body["dry_run"] = json!(false);
            body["limit"] = json!(500);
            let mut moved = 0u64;
            loop {
                let n = client
                    .call(
                        reqwest::Method::POST,
                        "/admin/parked/replay",
                        &[],
                        Some(body.clone()),
                    )
                    .await?["moved"]
                    .as_u64()
                    .unwrap_or(0);
                moved += n;
                if matched > 300 && !conn.json {
                    progress(moved, matched);
                }
                if n == 0 || moved >= matched {
                    break;
                }
            }
            if matched > 300 && !conn.json {
                eprintln!();
            }
            report(
                conn,
                json!({"matched": matched, "moved": moved, "dry_run": false}),
                &format!("replayed {moved} of {matched} parked job(s)"),
            );
        }
        ParkedCommand::Purge { filter, yes } => {
            if !yes {
                anyhow::bail!("purging deletes jobs for good; add --yes");
            }
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
            if v["purged"].as_u64() == Some(0) {
                return Ok(EXIT_MATCHED_NOTHING);
            }
        }
    }
    Ok(0)
}

/// Exit code when a filter matched no parked job (documented in `relay --help`).
pub const EXIT_MATCHED_NOTHING: i32 = 3;

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

fn progress(done: u64, total: u64) {
    let width = 40;
    let filled = (done.min(total) * width / total.max(1)) as usize;
    eprint!(
        "\r[{}{}] {done}/{total}",
        "#".repeat(filled),
        ".".repeat(width as usize - filled)
    );
    let _ = std::io::stderr().flush();
}

fn report(conn: &Connection, value: Value, text: &str) {
    if conn.json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

/// `relay routes …`.
pub async fn routes(conn: &Connection, command: RoutesCommand) -> anyhow::Result<i32> {
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
    Ok(0)
}
