//! The `relay parked` / `relay routes` commands against a running relay: cursor paging, times
//! as Unix seconds, RFC 3339 or ages, the token from `--token` or `RELAY_ADMIN_TOKEN`, exit
//! codes, and no progress bar where stderr is not a terminal.
//!
//! The CLI runs through tokio's `Command`: the relay under test runs on this test's runtime.

use crate::helpers::{spawn_app_with, TestApp};
use fake_centercode::Fault;
use serde_json::{json, Value};
use sf_centercode_relay::admin::rfc3339;
use sf_centercode_relay::queue::{Job, NewJob};
use sf_centercode_relay::settings::Action;
use sf_centercode_relay::worker::Outcome;
use std::collections::BTreeSet;

const TOKEN: &str = "admin-token-for-cli-tests-0123456789abcdef";

async fn spawn_admin_app() -> TestApp {
    spawn_app_with(|s| s.admin.token = Some(TOKEN.to_owned().into())).await
}

/// What one run of the CLI did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Run `program args…` with `RELAY_ADMIN_TOKEN` set to `token` (or unset).
async fn run(program: &str, args: &[String], token: Option<&str>) -> Run {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).env_remove("RELAY_ADMIN_TOKEN");
    if let Some(token) = token {
        cmd.env("RELAY_ADMIN_TOKEN", token);
    }
    let out = cmd.output().await.expect("run relay");
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// `relay <args> --url <app>` with the token in the environment.
async fn relay(app: &TestApp, args: &[&str]) -> Run {
    relay_with(app, args, Some(TOKEN)).await
}

async fn relay_with(app: &TestApp, args: &[&str], token: Option<&str>) -> Run {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(["--url".to_owned(), app.address.clone()]);
    run(env!("CARGO_BIN_EXE_relay"), &all, token).await
}

/// Park `n` gdpr jobs the way production does: Centercode answers 400.
async fn park(app: &TestApp, n: u32) {
    app.centercode.push_fault(Fault {
        status: 400,
        times: n,
        ..Fault::default()
    });
    for i in 0..n {
        let r = app.post_outbound("gdpr", crate::admin::with_id(i)).await;
        assert_eq!(r.status(), 200);
    }
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes.len(), n as usize, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Parked { .. })),
        "{outcomes:?}"
    );
}

/// Park `n` callout jobs straight through the queue (faster than delivering each).
async fn park_many(app: &TestApp, n: usize) {
    let jobs = (0..n)
        .map(|i| NewJob {
            received_at_ms: 0,
            id: uuid::Uuid::new_v4().to_string(),
            route: "apex-removal".into(),
            action: Action::RemoveUser,
            dedupe_key: None,
            body_hash: None,
            org_id: None,
            notification_id: None,
            record_id: Some(format!("record-{i}")),
            job: Job::CalloutV1 {
                idempotency_key: None,
                body: json!({"subject": {"email": format!("user{i}@example.org")}}),
            },
        })
        .collect();
    app.queue.enqueue(jobs).await.unwrap();
    let mut parked = 0;
    while parked < n {
        let leased = app.queue.lease(n, vec![]).await.unwrap();
        assert!(!leased.is_empty(), "only {parked} of {n} leased");
        for job in &leased {
            app.queue
                .park(job, "parked by the test", Some(400))
                .await
                .unwrap();
        }
        parked += leased.len();
    }
    assert_eq!(app.stats().await.parked, n as u64);
}

/// Job ids in a table printed by `relay parked list`.
fn table_ids(stdout: &str) -> Vec<String> {
    let mut lines = stdout.lines();
    assert!(
        lines.next().is_some_and(|l| l.starts_with("ID ")),
        "{stdout}"
    );
    lines
        .filter(|l| !l.starts_with("more parked jobs"))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

/// The command the table suggests for the next page, if any.
fn next_page_hint(stdout: &str) -> Option<Vec<String>> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("more parked jobs; next page: "))
        .map(|cmd| cmd.split_whitespace().map(str::to_owned).collect())
}

async fn all_parked_ids(app: &TestApp) -> BTreeSet<String> {
    let res = app
        .client
        .get(format!("{}/admin/parked?limit=1000", app.address))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn cursor_paging_visits_each_parked_job_exactly_once() {
    let app = spawn_admin_app().await;
    park(&app, 3).await;
    let expected = all_parked_ids(&app).await;
    assert_eq!(expected.len(), 3);

    // Follow the printed hint, exactly as printed, until there is none.
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut out = relay(&app, &["parked", "list", "--limit", "1"]).await;
    loop {
        assert_eq!(out.code, 0, "{out:?}");
        let ids = table_ids(&out.stdout);
        assert_eq!(ids.len(), 1, "{out:?}");
        seen.extend(ids);
        pages += 1;
        assert!(pages <= 3, "more pages than jobs: {seen:?}");
        match next_page_hint(&out.stdout) {
            Some(cmd) => {
                assert_eq!(cmd[cmd.len() - 2], "--cursor", "{cmd:?}");
                let cursor = cmd.last().unwrap();
                assert!(
                    cursor.ends_with(&format!("~{}", seen.last().unwrap())),
                    "the cursor is the position of the last job shown: {cursor}"
                );
                assert!(!cmd.iter().any(|a| a.contains(TOKEN)), "{cmd:?}");
                out = run(&cmd[0], &cmd[1..], Some(TOKEN)).await;
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a job was listed twice: {seen:?}");
    assert_eq!(unique, expected);

    // JSON keeps `next_cursor`: a string while jobs follow, null on the last page.
    let first = relay(&app, &["parked", "list", "--limit", "2", "--json"]).await;
    assert_eq!(first.code, 0, "{first:?}");
    let first: Value = serde_json::from_str(&first.stdout).unwrap();
    assert_eq!(first["jobs"].as_array().unwrap().len(), 2);
    let next = first["next_cursor"].as_str().expect("a cursor").to_owned();
    let last = first["jobs"][1]["id"].as_str().unwrap();
    assert!(next.ends_with(&format!("~{last}")), "{next}");
    let second = relay(
        &app,
        &[
            "parked", "list", "--limit", "2", "--json", "--cursor", &next,
        ],
    )
    .await;
    assert_eq!(second.code, 0, "{second:?}");
    let second: Value = serde_json::from_str(&second.stdout).unwrap();
    assert_eq!(second["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(second["next_cursor"], Value::Null);
    let both: BTreeSet<String> = first["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["jobs"].as_array().unwrap())
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(both, expected);
}

#[tokio::test]
async fn since_and_until_take_ages_and_rfc3339() {
    let app = spawn_admin_app().await;
    park(&app, 1).await;
    let listed = |args: &'static [&'static str]| {
        let app = &app;
        async move {
            let out = relay(app, args).await;
            (out.code, table_ids(&out.stdout).len(), out)
        }
    };
    // Parked just now: within the last hour, not before an hour ago.
    let (code, n, out) = listed(&["parked", "list", "--since", "1h"]).await;
    assert_eq!((code, n), (0, 1), "{out:?}");
    let (code, n, out) = listed(&["parked", "list", "--until", "1h"]).await;
    assert_eq!((code, n), (3, 0), "{out:?}");
    let (code, n, out) = listed(&["parked", "list", "--since", "2w", "--until", "1d"]).await;
    assert_eq!((code, n), (3, 0), "{out:?}");
    let (code, n, out) =
        listed(&["parked", "list", "--since", "1w", "--until", "4102444800"]).await;
    assert_eq!((code, n), (0, 1), "Unix seconds still work: {out:?}");

    // RFC 3339, in UTC with fractions, and with offsets.
    let now_ms = sf_centercode_relay::queue::now_ms();
    // `rfc3339` writes milliseconds: `…T09:21:07.123Z`.
    let hour_ago = rfc3339(now_ms - 3_600_000);
    let in_an_hour_east = rfc3339(now_ms + 3 * 3_600_000).replace('Z', "+02:00");
    let hour_ago_west = rfc3339(now_ms - 3 * 3_600_000 - 1_800_000).replace('Z', "-02:30");
    let run_list = |extra: Vec<String>| {
        let app = &app;
        async move {
            let mut args = vec!["parked".to_owned(), "list".to_owned()];
            args.extend(extra);
            args.extend(["--url".to_owned(), app.address.clone()]);
            let out = run(env!("CARGO_BIN_EXE_relay"), &args, Some(TOKEN)).await;
            (out.code, out)
        }
    };
    let (code, out) = run_list(vec!["--since".into(), hour_ago.clone()]).await;
    assert_eq!(code, 0, "{hour_ago}: {out:?}");
    assert_eq!(table_ids(&out.stdout).len(), 1);
    let (code, out) = run_list(vec!["--until".into(), hour_ago_west.clone()]).await;
    assert_eq!(code, 3, "{hour_ago_west}: {out:?}");
    let (code, out) = run_list(vec![
        "--since".into(),
        hour_ago_west.clone(),
        "--until".into(),
        in_an_hour_east.clone(),
    ])
    .await;
    assert_eq!(code, 0, "{hour_ago_west} .. {in_an_hour_east}: {out:?}");
    assert_eq!(table_ids(&out.stdout).len(), 1);
    // Unix seconds as before.
    let (code, out) = run_list(vec!["--since".into(), (now_ms / 1000 + 3600).to_string()]).await;
    assert_eq!(code, 3, "{out:?}");
}

#[tokio::test]
async fn a_bad_time_exits_2_naming_the_accepted_forms() {
    for (flag, value) in [
        ("--since", "yesterday"),
        ("--until", "2026-13-01T00:00:00Z"),
        ("--since", "2026-12-01T10:00:00"),
        ("--since", "3 days"),
    ] {
        let args: Vec<String> = ["parked", "list", flag, value, "--url", "http://127.0.0.1:9"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = run(env!("CARGO_BIN_EXE_relay"), &args, Some(TOKEN)).await;
        assert_eq!(out.code, 2, "{value}: {out:?}");
        for form in [
            "Unix seconds",
            "RFC 3339",
            "2026-12-01T10:00:00Z",
            "2h",
            "7d",
        ] {
            assert!(out.stderr.contains(form), "{value}: {out:?}");
        }
        assert!(out.stderr.contains(flag), "{out:?}");
    }
}

#[tokio::test]
async fn the_token_comes_from_the_flag_or_the_environment() {
    let app = spawn_admin_app().await;
    park(&app, 1).await;
    // --token alone, no environment variable.
    let out = relay_with(&app, &["parked", "list", "--token", TOKEN], None).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(table_ids(&out.stdout).len(), 1);
    let out = relay_with(&app, &["routes", "--token", TOKEN, "list"], None).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("gdpr"), "{out:?}");
    // The environment variable alone.
    let out = relay_with(&app, &["parked", "list"], Some(TOKEN)).await;
    assert_eq!(out.code, 0, "{out:?}");

    // No token: a usage error naming both ways to give it, before any request.
    for args in [&["parked", "list"][..], &["routes", "list"][..]] {
        let out = relay_with(&app, args, None).await;
        assert_eq!(out.code, 2, "{out:?}");
        assert!(
            out.stderr.contains("--token") && out.stderr.contains("RELAY_ADMIN_TOKEN"),
            "{out:?}"
        );
    }
    let out = relay_with(&app, &["parked", "list"], Some("")).await;
    assert_eq!(out.code, 2, "an empty token is no token: {out:?}");
    // A token the relay refuses is a configuration error too.
    let out = relay_with(&app, &["parked", "list", "--token", "wrong"], None).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("401"), "{out:?}");

    // --help names the variable, never its value, and documents the exit codes.
    for args in [&["parked", "--help"][..], &["routes", "--help"][..]] {
        let out = relay_with(&app, args, Some(TOKEN)).await;
        assert_eq!(out.code, 0, "{out:?}");
        assert!(out.stdout.contains("RELAY_ADMIN_TOKEN"), "{out:?}");
        assert!(!out.stdout.contains(TOKEN), "{out:?}");
        assert!(out.stdout.contains("Exit codes:"), "{out:?}");
        assert!(
            out.stdout.contains("2  bad usage or configuration"),
            "{out:?}"
        );
    }
    let out = relay_with(&app, &["parked", "--help"], None).await;
    assert!(
        out.stdout.contains("3  the filter matched nothing"),
        "{out:?}"
    );
}

#[tokio::test]
async fn exit_codes_say_done_failed_bad_usage_or_matched_nothing() {
    let app = spawn_admin_app().await;
    park(&app, 2).await;
    // 3: the filter matched nothing, for list, replay (dry or not), purge and show.
    for args in [
        &["parked", "list", "--route", "feedback"][..],
        &["parked", "list", "--route", "feedback", "--json"][..],
        &["parked", "replay", "--route", "feedback", "--dry-run"][..],
        &["parked", "replay", "--route", "feedback"][..],
        &["parked", "purge", "--route", "feedback", "--yes"][..],
        &["parked", "show", "no-such-job"][..],
    ] {
        let out = relay(&app, args).await;
        assert_eq!(out.code, 3, "{args:?}: {out:?}");
    }
    assert_eq!(app.stats().await.parked, 2, "nothing moved or purged");

    // 2: bad usage: the API refuses an empty filter (400), purge without --yes, a bad limit.
    for args in [
        &["parked", "replay"][..],
        &["parked", "purge", "--yes"][..],
        &["parked", "purge", "--route", "gdpr"][..],
        &["parked", "list", "--limit", "0"][..],
        &["routes", "pause", "no-such-route"][..],
    ] {
        let out = relay(&app, args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
    }
    assert_eq!(app.stats().await.parked, 2);

    // 1: the relay cannot be reached.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let args: Vec<String> = ["parked", "list", "--url", &url]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = run(env!("CARGO_BIN_EXE_relay"), &args, Some(TOKEN)).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("could not reach the relay"), "{out:?}");

    // 0: done.
    for args in [
        &["parked", "list", "--route", "gdpr"][..],
        &["parked", "replay", "--route", "gdpr", "--dry-run"][..],
        &["parked", "replay", "--route", "gdpr"][..],
    ] {
        let out = relay(&app, args).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
    }
    assert_eq!(app.stats().await.parked, 0);
}

#[tokio::test]
async fn no_progress_bar_where_stderr_is_not_a_terminal() {
    let app = spawn_admin_app().await;
    // More than a screenful, so a terminal would get a bar.
    park_many(&app, 320).await;
    let out = relay(&app, &["parked", "replay", "--route", "apex-removal"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("replayed 320 of 320"), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "a pipe gets no progress bar: {:?}",
        out.stderr
    );
    assert_eq!(app.stats().await.parked, 0);
    assert_eq!(app.stats().await.ready, 320);
}

#[tokio::test]
async fn a_terminal_gets_a_progress_bar_unless_json() {
    let app = spawn_admin_app().await;
    park_many(&app, 320).await;
    // `script` (util-linux) runs the command on a pseudo-terminal and copies what it printed.
    let on_a_terminal = |extra: &'static str| {
        let command = format!(
            "{} parked replay --route apex-removal --url {}{extra}",
            env!("CARGO_BIN_EXE_relay"),
            app.address
        );
        async move {
            let args = ["-qec".to_owned(), command, "/dev/null".to_owned()];
            run("script", &args, Some(TOKEN)).await
        }
    };
    let out = on_a_terminal(" --dry-run").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !out.stdout.contains("replayed ("),
        "no bar for a dry run: {out:?}"
    );
    let out = on_a_terminal(" --json").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !out.stdout.contains("replayed ("),
        "no bar with --json: {out:?}"
    );
    let json: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(json["moved"], 320);
    park_many(&app, 320).await;
    let out = on_a_terminal("").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("320/320 replayed ("), "{out:?}");
    assert!(out.stdout.contains("replayed 320 of 320"), "{out:?}");
}
