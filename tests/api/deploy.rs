//! deploy/Dockerfile, .dockerignore, docker-compose.yml and the Kubernetes manifests under
//! deploy/kubernetes/, proven as far as a machine without a Docker engine or a cluster allows
//! (docs/deployment.md lists what is left unproven):
//!
//! - the build context the .dockerignore leaves is copied to a temporary directory, where
//!   `cargo metadata --locked` and every include_str!/include_bytes! must still work, and the
//!   Dockerfile's stages, COPY sources and cargo flags are checked against `cargo metadata`;
//! - the image's HEALTHCHECK command (and compose's) runs against real relays: plain http, TLS,
//!   and mutual TLS probed on the ops listener;
//! - every relay container of compose and of both rendered overlays runs the real
//!   `relay check-config` with its environment and mounted routes file, and its ports, probes,
//!   Services, ServiceMonitor and KEDA triggers are compared with the settings it loads;
//! - the rendered objects are validated offline against the Kubernetes, KEDA and Prometheus
//!   Operator schemas, and compose against the Compose specification (Python packages that
//!   `.ci/run` installs);
//! - the PrometheusRule is generated from deploy/prometheus/alerts.yml and must match it, and
//!   every metric a manifest queries is exported by a running relay.

use crate::helpers::{fixture, spawn_app, test_settings};
use clap::Parser;
use serde::Deserialize;
use serde_json::{json, Value as Json};
use serde_yaml::Value;
use sf_centercode_relay::settings::{Settings, TlsSettings, DEFAULT_TOML};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const DOCKERFILE: &str = "deploy/Dockerfile";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const PROMETHEUS_RULE: &str = "deploy/kubernetes/base/prometheusrule.yaml";
const GUIDE: &str = "docs/deployment.md";
const OVERLAYS: &[&str] = &["embedded", "rabbitmq"];
const NAMESPACE: &str = "sf-centercode-relay";
/// The image compose builds once and runs in every relay service.
const COMPOSE_IMAGE: &str = "sf-centercode-relay:local";
/// The image name the manifests use (kustomize sets the registry and tag).
const IMAGE: &str = "sf-centercode-relay";
/// What the relay answers health probes on, on both listeners.
const HEALTH_PATHS: &[&str] = &["/health/live", "/health/ready"];
/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.30";
/// The Secret relay-secrets: the keys a manifest may name, each with a value of the right form
/// for `relay check-config` (docs/deployment.md creates the real one).
const SECRET: &str = "relay-secrets";
const SECRET_KEYS: &[(&str, &str)] = &[
    (
        "centercode-api-key",
        "community-api-key-for-the-deploy-test",
    ),
    ("admin-token", "admin-token-for-the-deploy-test-0123456789"),
    (
        "amqp-url",
        "amqps://relay:secret@rabbitmq.example.com:5671/%2f",
    ),
    ("redis-url", "redis://:secret@redis.example.com:6379"),
    (
        "ledger-subject-key",
        "ledger-subject-key-for-the-deploy-test-0123456789",
    ),
    (
        "ledger-url",
        "postgres://relay:secret@postgres.example.com:5432/relay",
    ),
    (
        "gdpr-removal-path-token",
        "path-token-for-the-deploy-test-1",
    ),
    (
        "beta-feedback-path-token",
        "path-token-for-the-deploy-test-2",
    ),
    ("apex-removal-bearer", "bearer-token-for-the-deploy-test"),
];
/// The per-route secrets the relay reads as RELAY_ROUTE__<ROUTE>__<KIND>.
const ROUTE_SECRET_KINDS: &[&str] = &["API_KEY", "PATH_TOKEN", "BEARER", "HMAC_SECRET"];
/// Variables the relay or its image read besides RELAY__SECTION__KEY and the route secrets.
const OTHER_VARIABLES: &[&str] = &[
    "RELAY_ENV",
    "RELAY_CONFIG_DIR",
    "RELAY_HEALTHCHECK_SCHEME",
    "RELAY_HEALTHCHECK_PORT",
    "RUST_LOG",
];

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The port of `host:port` (or of a URL's authority).
fn port_of(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address}"))
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// What a relay process loads from an environment.

/// The settings a `relay --config FILE` process loads with `vars` as its whole environment, as
/// `Settings::load` layers them (defaults, config/$RELAY_ENV.toml, the file, RELAY__ variables),
/// without validating (`relay check-config` does that). A variable that names no settings key
/// fails here: every section refuses unknown keys.
fn try_effective_settings(
    config_file: &str,
    vars: &BTreeMap<String, String>,
) -> Result<Settings, String> {
    let env = vars.get("RELAY_ENV").map_or("local", String::as_str);
    let relay_vars: std::collections::HashMap<String, String> = vars
        .iter()
        .filter(|(k, _)| k.starts_with("RELAY__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ::config::Config::builder()
        .add_source(::config::File::from_str(
            DEFAULT_TOML,
            ::config::FileFormat::Toml,
        ))
        .add_source(::config::File::from(repo(&format!("config/{env}.toml"))).required(false))
        .add_source(::config::File::from_str(
            config_file,
            ::config::FileFormat::Toml,
        ))
        .add_source(
            ::config::Environment::with_prefix("RELAY")
                .prefix_separator("__")
                .separator("__")
                .source(Some(relay_vars)),
        )
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| e.to_string())
}

fn effective_settings(
    where_: &str,
    config_file: &str,
    vars: &BTreeMap<String, String>,
) -> Settings {
    try_effective_settings(config_file, vars).unwrap_or_else(|e| panic!("{where_}: {e}"))
}

/// Every variable is one the relay reads: RELAY__ keys (checked by loading them), a route
/// secret of a route the configuration defines, or one of [`OTHER_VARIABLES`].
fn check_variable_names(where_: &str, vars: &BTreeMap<String, String>, settings: &Settings) {
    let route_vars: BTreeSet<String> = settings
        .routes
        .iter()
        .flat_map(|r| {
            ROUTE_SECRET_KINDS
                .iter()
                .map(move |kind| format!("{}{kind}", r.env_prefix()))
        })
        .collect();
    for name in vars.keys() {
        assert!(
            name.starts_with("RELAY__")
                || route_vars.contains(name)
                || OTHER_VARIABLES.contains(&name.as_str()),
            "{where_}: {name} is read by nothing (route secrets: {route_vars:?})"
        );
    }
    if let Some(env) = vars.get("RELAY_ENV") {
        assert!(
            ["local", "test", "production"].contains(&env.as_str()),
            "{where_}: RELAY_ENV={env}"
        );
    }
}

/// Run the real `relay --config FILE check-config` with exactly `vars` as its environment (the
/// image's RELAY_CONFIG_DIR mapped to the repository's config/); panics unless it accepts.
fn relay_check_config(where_: &str, config: &Path, vars: &BTreeMap<String, String>) -> String {
    let image = Dockerfile::load();
    let config_dir = image.relay_config_dir();
    let mut vars = vars.clone();
    if let Some(dir) = vars.get("RELAY_CONFIG_DIR") {
        assert_eq!(
            dir, &config_dir,
            "{where_}: RELAY_CONFIG_DIR is not where the image has config/"
        );
    }
    vars.insert(
        "RELAY_CONFIG_DIR".into(),
        repo("config").display().to_string(),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("--config")
        .arg(config)
        .arg("check-config")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(&vars)
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(
        out.status.success() && text.starts_with("configuration OK"),
        "{where_}: relay check-config refused its configuration:\n{text}"
    );
    text
}

/// The relay's command line as a container runs it parses (`relay` + its arguments), and the
/// role it serves.
fn parse_relay_args(where_: &str, args: &[String]) -> &'static str {
    let cli = sf_centercode_relay::cli::Cli::try_parse_from(
        std::iter::once("relay".to_owned()).chain(args.iter().cloned()),
    )
    .unwrap_or_else(|e| panic!("{where_}: {e}"));
    match cli.command {
        None => "all",
        Some(sf_centercode_relay::cli::Command::Serve { role }) => role.as_str(),
        Some(other) => panic!("{where_}: runs {other:?}, not serve"),
    }
}

/// The value after `flag` in `args`.
fn arg_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile.

/// One build stage: its name, base image (ARG defaults substituted) and instructions.
struct Stage {
    name: String,
    from: String,
    instructions: Vec<(String, String)>,
}

struct Dockerfile {
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn load() -> Self {
        let text = read(DOCKERFILE);
        // Logical lines: continuations joined, comments and blank lines dropped.
        let mut lines = Vec::new();
        let mut current = String::new();
        for line in text.lines().map(str::trim) {
            if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(body) => {
                    current.push_str(body.trim());
                    current.push(' ');
                }
                None => {
                    current.push_str(line);
                    lines.push(std::mem::take(&mut current));
                }
            }
        }
        let mut args = BTreeMap::new();
        let mut stages: Vec<Stage> = Vec::new();
        for line in lines {
            let (keyword, rest) = line.split_once(' ').unwrap_or((&line, ""));
            let keyword = keyword.to_ascii_uppercase();
            let rest = rest.trim().to_owned();
            if keyword == "ARG" && stages.is_empty() {
                if let Some((name, value)) = rest.split_once('=') {
                    args.insert(format!("${{{name}}}"), value.to_owned());
                }
            } else if keyword == "FROM" {
                let words: Vec<&str> = rest.split_whitespace().collect();
                assert!(
                    words.len() == 3 && words[1].eq_ignore_ascii_case("AS"),
                    "every stage is named: FROM {rest}"
                );
                let from = args
                    .iter()
                    .fold(words[0].to_owned(), |s, (k, v)| s.replace(k, v));
                stages.push(Stage {
                    name: words[2].to_owned(),
                    from,
                    instructions: Vec::new(),
                });
            } else {
                stages
                    .last_mut()
                    .unwrap_or_else(|| panic!("{keyword} before the first FROM"))
                    .instructions
                    .push((keyword, rest));
            }
        }
        Self { stages }
    }

    fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no stage {name} in {DOCKERFILE}"))
    }

    /// The stage and the stages it is built FROM, nearest first.
    fn chain(&self, name: &str) -> Vec<&Stage> {
        let mut chain = vec![self.stage(name)];
        while let Some(parent) = self
            .stages
            .iter()
            .find(|s| s.name == chain.last().unwrap().from)
        {
            chain.push(parent);
        }
        chain
    }

    /// The last value of `keyword` in a stage or inherited from the stages it is built on.
    fn inherited(&self, stage: &str, keyword: &str) -> Option<String> {
        self.chain(stage).into_iter().find_map(|s| {
            s.instructions
                .iter()
                .rev()
                .find(|(k, _)| k == keyword)
                .map(|(_, v)| v.clone())
        })
    }

    /// `ENV` of a stage (and those it is built on): name → value.
    fn env(&self, stage: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for s in self.chain(stage).into_iter().rev() {
            for (_, rest) in s.instructions.iter().filter(|(k, _)| k == "ENV") {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV NAME=VALUE");
                    env.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        env
    }

    fn relay_config_dir(&self) -> String {
        self.env("relay")["RELAY_CONFIG_DIR"].clone()
    }

    /// The shell command of a stage's HEALTHCHECK.
    fn healthcheck(&self, stage: &str) -> String {
        let (_, rest) = self
            .stage(stage)
            .instructions
            .iter()
            .find(|(k, _)| k == "HEALTHCHECK")
            .unwrap_or_else(|| panic!("stage {stage} has no HEALTHCHECK"));
        rest.split_once(" CMD ")
            .map(|(_, cmd)| cmd.trim().to_owned())
            .unwrap_or_else(|| panic!("HEALTHCHECK without CMD: {rest}"))
    }

    /// A JSON-array instruction (ENTRYPOINT, CMD) of a stage.
    fn exec_form(&self, stage: &str, keyword: &str) -> Vec<String> {
        let text = self
            .inherited(stage, keyword)
            .unwrap_or_else(|| panic!("stage {stage} has no {keyword}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{keyword} {text}: {e}"))
    }

    /// The numeric uid the relay image runs as.
    fn relay_uid(&self) -> u32 {
        let user = self.inherited("relay", "USER").expect("USER");
        user.split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("USER {user} is not numeric (runAsNonRoot needs a number)"))
    }
}

/// The words of a `RUN` that invokes cargo, from `cargo` on.
fn cargo_words(run: &str) -> Option<Vec<String>> {
    let words: Vec<String> = run.split_whitespace().map(str::to_owned).collect();
    let start = words.iter().position(|w| w == "cargo")?;
    assert!(
        !run.contains("&&") && !run.contains(';'),
        "one cargo command per RUN: {run}"
    );
    Some(words[start..].to_vec())
}

/// The flags of a cargo build (or cook) that decide what is compiled: profile, features,
/// package and binary. Cook must use the same as the build it prepares.
fn build_selection(words: &[String]) -> BTreeSet<String> {
    let mut selection = BTreeSet::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        match w.as_str() {
            "--release" | "--no-default-features" | "--all-features" => {
                selection.insert(w.clone());
            }
            "--package" | "-p" | "--bin" | "--features" | "--profile" => {
                let canonical = if w == "-p" { "--package" } else { w.as_str() };
                selection.insert(format!("{canonical} {}", words[i + 1]));
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    selection
}

// ---------------------------------------------------------------------------------------------
// The build context.

/// The .dockerignore, matched as Docker does: each pattern is relative to the context root,
/// `*` and `?` stay within a path segment, `**` spans any number of them, a pattern that
/// matches a directory excludes what is below it, and the last pattern that matches decides
/// (`!` re-includes).
struct DockerIgnore(Vec<(bool, Vec<String>)>);

impl DockerIgnore {
    fn load() -> Self {
        Self(
            read(".dockerignore")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|line| {
                    let (negated, pattern) = match line.strip_prefix('!') {
                        Some(p) => (true, p.trim()),
                        None => (false, line),
                    };
                    assert!(
                        !pattern.contains(['[', '\\']),
                        "this test does not match character classes or escapes: {line}"
                    );
                    let pattern = pattern.trim_start_matches('/').trim_end_matches('/');
                    (negated, pattern.split('/').map(str::to_owned).collect())
                })
                .collect(),
        )
    }

    fn excludes(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        let mut excluded = false;
        for (negated, pattern) in &self.0 {
            if (1..=parts.len()).any(|n| segments_match(pattern, &parts[..n])) {
                excluded = !negated;
            }
        }
        excluded
    }

    /// Whether a directory is left out whole (no exception could bring back a file below it).
    fn prunes(&self, dir: &str) -> bool {
        self.excludes(dir)
            && !self.0.iter().any(|(negated, pattern)| {
                *negated
                    && (pattern[0] == "**" || pattern.join("/").starts_with(&format!("{dir}/")))
            })
    }
}

fn segments_match(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| segments_match(rest, &path[skip..]))
        }
        Some((first, rest)) => {
            !path.is_empty()
                && wildcard(first.as_bytes(), path[0].as_bytes())
                && segments_match(rest, &path[1..])
        }
    }
}

fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| wildcard(rest, &text[i..])),
        Some((b'?', rest)) => !text.is_empty() && wildcard(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && wildcard(rest, &text[1..]),
    }
}

/// The files `docker build .` would send (relative paths), walking the checkout as Docker does.
fn build_context(ignore: &DockerIgnore) -> Vec<String> {
    let root = repo("");
    let mut files = Vec::new();
    let mut dirs = vec![String::new()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(root.join(&dir)).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let path = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            if entry.path().is_dir() {
                if !ignore.prunes(&path) {
                    dirs.push(path);
                }
            } else if !ignore.excludes(&path) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `cargo metadata --locked --offline` of the workspace at `manifest` (host platform only).
fn cargo_metadata(manifest: &Path) -> Json {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let host = String::from_utf8(
        Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc")
            .stdout,
    )
    .unwrap()
    .lines()
    .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
    .expect("rustc -vV names the host");
    let out = Command::new(cargo)
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", &host, "--manifest-path"])
        .arg(manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata --locked at {}:\n{}",
        manifest.display(),
        output_text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The workspace's packages by name.
fn workspace_packages(metadata: &Json) -> BTreeMap<String, Json> {
    let members: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| members.contains(p["id"].as_str().unwrap()))
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p.clone()))
        .collect()
}

fn has_bin(package: &Json, bin: &str) -> bool {
    package["targets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == bin && t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
}

/// The string literals `include_str!` and `include_bytes!` name in a Rust source file.
fn compile_time_includes(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for macro_name in ["include_str!(", "include_bytes!("] {
        for (i, _) in source.match_indices(macro_name) {
            let rest = source[i + macro_name.len()..].trim_start();
            let literal = rest
                .strip_prefix('"')
                .and_then(|r| r.split_once('"'))
                .map(|(path, _)| path.to_owned())
                .unwrap_or_else(|| {
                    panic!(
                        "{macro_name}…) without a plain string literal: this test cannot follow it"
                    )
                });
            found.push(literal);
        }
    }
    found
}

#[test]
fn dockerignore_keeps_build_output_history_and_local_secrets_out() {
    let ignore = DockerIgnore::load();
    for path in [
        "target/release/relay",
        "target",
        "crates/fake-centercode/target/debug/x",
        "fuzz/target/x",
        ".git/HEAD",
        ".git",
        "data/relay.db",
        "relay.db-wal",
        ".env",
        "deploy/certs/server.key",
        "README.md",
        "docs/deployment.md",
    ] {
        assert!(ignore.excludes(path), "{path} would be sent to the build");
    }
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "config/production.toml",
        "crates/fake-centercode/Cargo.toml",
        "docs/openapi.json",
        "examples/salesforce/om_contact_batch_4.xml",
    ] {
        assert!(
            !ignore.excludes(path),
            "{path} would be left out of the build"
        );
    }
    // The matcher follows Docker's rules.
    let rules = |p: &str| vec![(false, p.split('/').map(str::to_owned).collect::<Vec<_>>())];
    assert!(DockerIgnore(rules("**/*.md")).excludes("a/b/c.md"));
    assert!(DockerIgnore(rules("*.md")).excludes("c.md"));
    assert!(!DockerIgnore(rules("*.md")).excludes("a/c.md"));
    assert!(DockerIgnore(rules("a/?.rs")).excludes("a/b.rs"));
    assert!(!DockerIgnore(rules("a/?.rs")).excludes("a/bc.rs"));
}

#[test]
fn the_build_context_holds_all_that_a_locked_build_reads() {
    // Arrange: the context Docker would send, copied to a directory of its own.
    let ignore = DockerIgnore::load();
    let files = build_context(&ignore);
    let context = tempfile::tempdir().unwrap();
    let mut bytes = 0;
    for file in &files {
        assert!(
            !file.starts_with("target/")
                && !file.starts_with(".git/")
                && !file.contains("/target/"),
            "{file} is in the build context"
        );
        let to = context.path().join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        match std::fs::copy(repo(file), &to) {
            Ok(n) => bytes += n,
            // Removed since the walk (someone else is working in this checkout).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{file}: {e}"),
        }
    }
    assert!(
        bytes < 50 << 20,
        "the build context is {} MiB: .dockerignore lets something large through",
        bytes >> 20
    );
    // Act: what cargo sees there.
    let metadata = cargo_metadata(&context.path().join("Cargo.toml"));
    // Assert: every workspace member with its manifest and targets, the same binaries as the
    // checkout, and every file the code includes at compile time.
    let in_context = workspace_packages(&metadata);
    let in_checkout = workspace_packages(&cargo_metadata(&repo("Cargo.toml")));
    assert_eq!(
        in_context.keys().collect::<Vec<_>>(),
        in_checkout.keys().collect::<Vec<_>>()
    );
    for (name, package) in &in_context {
        for target in package["targets"].as_array().unwrap() {
            let src = Path::new(target["src_path"].as_str().unwrap());
            assert!(
                src.exists(),
                "{name}: {} is not in the build context",
                src.display()
            );
        }
        for target in in_checkout[name]["targets"].as_array().unwrap() {
            let kinds = target["kind"].as_array().unwrap();
            if kinds.iter().any(|k| k == "bin" || k == "lib") {
                assert!(
                    package["targets"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|t| t["name"] == target["name"]),
                    "{name}: target {} is missing from the build context",
                    target["name"]
                );
            }
        }
    }
    let mut includes = 0;
    for file in files.iter().filter(|f| f.ends_with(".rs")) {
        let Ok(source) = std::fs::read_to_string(context.path().join(file)) else {
            continue;
        };
        let dir = context.path().join(file).parent().unwrap().to_owned();
        for included in compile_time_includes(&source) {
            includes += 1;
            assert!(
                dir.join(&included).exists(),
                "{file} includes {included}, which .dockerignore leaves out"
            );
        }
    }
    assert!(includes > 0, "no include_str! found: the scan is broken");
}

#[test]
fn dockerfile_builds_the_relay_binary_alone_locked_on_cached_dependencies() {
    let docker = Dockerfile::load();
    let ignore = DockerIgnore::load();
    let metadata = cargo_metadata(&repo("Cargo.toml"));
    let packages = workspace_packages(&metadata);
    let names: Vec<&str> = docker.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names.last(),
        Some(&"relay"),
        "the relay is the default (last) target"
    );
    assert!(
        names.contains(&"fake-centercode"),
        "compose builds target fake-centercode"
    );

    // The toolchain is recent enough for every package, and the runtime is the builder's Debian.
    let rust = docker.stage("chef").from.clone();
    let (image_version, release) = rust
        .strip_prefix("rust:")
        .and_then(|v| v.split_once('-'))
        .unwrap_or_else(|| panic!("FROM {rust}"));
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    for (name, package) in &packages {
        if let Some(msrv) = package["rust_version"].as_str() {
            assert!(
                version(image_version) >= version(msrv),
                "{rust} is older than {name}'s rust-version {msrv}"
            );
        }
    }
    assert_eq!(
        docker.stage("runtime").from,
        format!("debian:{release}-slim"),
        "the runtime's glibc must be the builder's"
    );

    for stage in &docker.stages {
        let earlier: Vec<&str> = docker
            .stages
            .iter()
            .take_while(|s| s.name != stage.name)
            .map(|s| s.name.as_str())
            .collect();
        let mut cooked = None;
        for (keyword, rest) in &stage.instructions {
            match keyword.as_str() {
                "COPY" => {
                    let words: Vec<&str> = rest.split_whitespace().collect();
                    if let Some(from) = words[0].strip_prefix("--from=") {
                        assert!(
                            earlier.contains(&from),
                            "{}: COPY --from={from}",
                            stage.name
                        );
                    } else {
                        for source in &words[..words.len() - 1] {
                            let path = source.trim_end_matches('/');
                            assert!(
                                *source == "." || (repo(path).exists() && !ignore.excludes(path)),
                                "{}: COPY {source} is not in the build context",
                                stage.name
                            );
                        }
                    }
                }
                "RUN" => {
                    let Some(words) = cargo_words(rest) else {
                        continue;
                    };
                    let sub = words[1].as_str();
                    if sub == "install" || sub == "build" || (sub == "chef" && words[2] == "cook") {
                        assert!(
                            words.iter().any(|w| w == "--locked"),
                            "{}: {rest} without --locked",
                            stage.name
                        );
                    }
                    if sub == "install" {
                        assert!(words.iter().any(|w| w == "--version"), "pin it: {rest}");
                    }
                    if sub == "chef" && words[2] == "cook" {
                        cooked = Some(build_selection(&words));
                    }
                    if sub == "build" {
                        let selection = build_selection(&words);
                        assert_eq!(
                            cooked.as_ref(),
                            Some(&selection),
                            "{}: cook the dependencies with the build's flags first",
                            stage.name
                        );
                        let package = arg_after(&words, "--package").expect("--package");
                        let bin = arg_after(&words, "--bin").expect("--bin");
                        let p = packages
                            .get(package)
                            .unwrap_or_else(|| panic!("no workspace package {package}"));
                        assert!(has_bin(p, bin), "{package} has no binary {bin}");
                        for feature in selection
                            .iter()
                            .filter_map(|s| s.strip_prefix("--features "))
                        {
                            assert!(
                                p["features"].get(feature).is_some(),
                                "{package}: feature {feature}"
                            );
                        }
                    }
                }
                _ => {}
            }
        }
    }

    // Each runtime image copies one binary, built in its own stage, and runs it.
    for (stage, bin, package) in [
        ("relay", "relay", "sf-centercode-relay"),
        ("fake-centercode", "fake-centercode", "fake-centercode"),
    ] {
        let copies: Vec<Vec<&str>> = docker
            .stage(stage)
            .instructions
            .iter()
            .filter(|(k, rest)| k == "COPY" && rest.starts_with("--from="))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .collect();
        assert_eq!(
            copies.len(),
            1,
            "{stage}: one binary, nothing else built: {copies:?}"
        );
        let builder = copies[0][0].strip_prefix("--from=").unwrap();
        let workdir = docker.inherited(builder, "WORKDIR").expect("WORKDIR");
        assert_eq!(copies[0][1], format!("{workdir}/target/release/{bin}"));
        assert_eq!(copies[0][2], format!("/usr/local/bin/{bin}"));
        let build = docker
            .stage(builder)
            .instructions
            .iter()
            .filter_map(|(k, rest)| (k == "RUN").then(|| cargo_words(rest)).flatten())
            .find(|w| w[1] == "build")
            .unwrap_or_else(|| panic!("{builder} runs no cargo build"));
        assert_eq!(arg_after(&build, "--package"), Some(package));
        assert_eq!(arg_after(&build, "--bin"), Some(bin));
        assert!(build.iter().any(|w| w == "--release"));
        assert_eq!(docker.exec_form(stage, "ENTRYPOINT")[0], bin);
    }
    // The production relay leaves the demo (and the fake Centercode it embeds) out.
    let relay_build = docker
        .stage("build-relay")
        .instructions
        .iter()
        .find(|(k, rest)| k == "RUN" && rest.contains("cargo build"))
        .unwrap();
    assert!(relay_build.1.contains("--no-default-features"));
    // The relay image: production settings from its config directory, their ports exposed,
    // the queue file's directory a volume, a numeric unprivileged user.
    let env = docker.env("relay");
    assert_eq!(env["RELAY_ENV"], "production");
    let config_copy = docker
        .stage("relay")
        .instructions
        .iter()
        .find(|(k, rest)| k == "COPY" && rest.starts_with("config "))
        .expect("COPY config");
    assert_eq!(config_copy.1, format!("config {}", env["RELAY_CONFIG_DIR"]));
    let production = effective_settings(
        "image defaults",
        "",
        &BTreeMap::from([("RELAY_ENV".to_owned(), "production".to_owned())]),
    );
    let ops = production
        .server
        .ops_bind
        .as_deref()
        .expect("production sets ops_bind");
    let exposed: BTreeSet<u16> = docker
        .inherited("relay", "EXPOSE")
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([port_of(&production.server.bind), port_of(ops)])
    );
    assert_eq!(
        env["RELAY_HEALTHCHECK_PORT"].parse::<u16>().unwrap(),
        port_of(&production.server.bind),
        "the health check's default port is the main listener's"
    );
    let volume: Vec<String> =
        serde_json::from_str(&docker.inherited("relay", "VOLUME").unwrap()).unwrap();
    assert_eq!(
        volume,
        [production
            .queue
            .path
            .parent()
            .unwrap()
            .display()
            .to_string()]
    );
    assert_ne!(docker.relay_uid(), 0);
    let runtime_setup = &docker.stage("runtime").instructions;
    assert!(
        runtime_setup.iter().any(|(k, rest)| k == "RUN"
            && rest.contains(" curl")
            && rest.contains(&format!("--uid {}", docker.relay_uid()))),
        "the runtime installs curl (health checks) and creates the relay user"
    );
    assert_eq!(docker.exec_form("relay", "CMD"), ["serve"]);
}

// ---------------------------------------------------------------------------------------------
// Health checks, run against real processes.

/// Run a HEALTHCHECK shell command with `env`; whether it reported healthy.
async fn shell_healthcheck(command: &str, env: &[(&str, String)]) -> bool {
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap()
        .status
        .success()
}

/// Run a compose `CMD` health check (exec form) with its port moved to `port`.
async fn compose_healthcheck(test: &[String], from_port: u16, port: u16) -> bool {
    assert_eq!(test[0], "CMD", "{test:?}");
    let args: Vec<String> = test[2..]
        .iter()
        .map(|a| a.replace(&format!(":{from_port}/"), &format!(":{port}/")))
        .collect();
    tokio::process::Command::new(&test[1])
        .args(&args)
        .output()
        .await
        .unwrap()
        .status
        .success()
}

/// A relay (gateway and workers) with an ops listener and `tls`; returns (main port, ops port).
async fn spawn_relay_with(
    dir: &Path,
    tls: Option<TlsSettings>,
) -> (u16, u16, tokio_util::sync::CancellationToken) {
    let mut settings = test_settings(&dir.join("relay.db"), "http://127.0.0.1:9");
    settings.server.ops_bind = Some("127.0.0.1:0".into());
    settings.server.tls = tls;
    let app = sf_centercode_relay::startup::Application::build(settings)
        .await
        .unwrap();
    let ports = (app.port(), app.ops_port().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone(), true));
    (ports.0, ports.1, stop)
}

#[tokio::test]
async fn the_image_healthcheck_probes_http_https_and_the_ops_listener_of_real_relays() {
    let docker = Dockerfile::load();
    let check = docker.healthcheck("relay");
    let probe = |scheme: &str, port: u16| {
        let env = [
            ("RELAY_HEALTHCHECK_SCHEME", scheme.to_owned()),
            ("RELAY_HEALTHCHECK_PORT", port.to_string()),
        ];
        let check = check.clone();
        async move { shell_healthcheck(&check, &env).await }
    };
    let certs = tempfile::tempdir().unwrap();
    crate::helpers::make_certificates(certs.path());
    let tls = |client_ca: bool| TlsSettings {
        cert_file: certs.path().join("server.pem"),
        key_file: certs.path().join("server.key"),
        client_ca: client_ca.then(|| certs.path().join("ca.pem")),
    };
    // Per relay: its TLS, then each probe as (scheme, on the ops listener, must pass).
    let cases = [
        // Plain http, as docker-compose.yml and a TLS-terminating load balancer run it.
        (
            None,
            [
                ("http", false, true),
                ("http", true, true),
                ("https", false, false),
            ],
        ),
        // server.tls: https passes (the certificate is not checked), plain http does not.
        (
            Some(tls(false)),
            [
                ("https", false, true),
                ("https", true, true),
                ("http", false, false),
            ],
        ),
        // Mutual TLS: the main listener refuses a client without a certificate; the ops
        // listener (the same certificate, no client certificate asked) is the one to probe.
        (
            Some(tls(true)),
            [
                ("https", false, false),
                ("https", true, true),
                ("http", true, false),
            ],
        ),
    ];
    let dirs: Vec<_> = cases.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let mut stops = Vec::new();
    let mut plain_main = 0;
    for ((tls, probes), dir) in cases.into_iter().zip(&dirs) {
        let plain = tls.is_none();
        let described = format!("{:?}", tls.as_ref().map(|t| t.client_ca.is_some()));
        let (main, ops, stop) = spawn_relay_with(dir.path(), tls).await;
        stops.push(stop);
        if plain {
            plain_main = main;
        }
        for (scheme, on_ops, healthy) in probes {
            let port = if on_ops { ops } else { main };
            assert_eq!(
                probe(scheme, port).await,
                healthy,
                "{scheme} on the {} listener, TLS with client CA {described}: {check}",
                if on_ops { "ops" } else { "main" }
            );
        }
    }
    // Nothing listening: unhealthy.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(!probe("http", closed).await);

    // Compose's own relay health check (exec form, main listener) against a relay as compose
    // runs it (plain http, ops listener set).
    let compose = compose_file();
    for (name, service) in relay_services(&compose) {
        let test = strings(&service["healthcheck"]["test"]);
        let url = test.iter().find(|a| a.starts_with("http")).unwrap();
        assert!(
            compose_healthcheck(&test, port_of(url), plain_main).await,
            "{name}: {test:?}"
        );
    }
    for stop in stops {
        stop.cancel();
    }
}

#[tokio::test]
async fn the_fake_centercode_image_listens_where_compose_and_the_routes_expect_it() {
    let docker = Dockerfile::load();
    let entrypoint = docker.exec_form("fake-centercode", "ENTRYPOINT");
    let bind = arg_after(&entrypoint, "--bind").expect("--bind");
    assert!(
        bind.starts_with("0.0.0.0:"),
        "reachable from other containers: {bind}"
    );
    let port = port_of(bind);
    let exposed = docker.inherited("fake-centercode", "EXPOSE").unwrap();
    assert_eq!(exposed, port.to_string());
    // The routes compose mounts call the fake at that port, by its service name.
    let compose = compose_file();
    let routes = Settings::from_toml(&read("deploy/routes.compose.toml"))
        .unwrap()
        .routes;
    assert!(!routes.is_empty());
    for route in &routes {
        let url = reqwest::Url::parse(&route.url).unwrap();
        assert_eq!(url.host_str(), Some("fake-centercode"));
        assert_eq!(url.port(), Some(port));
    }
    let service = &compose["services"]["fake-centercode"];
    assert_eq!(service["build"]["target"], "fake-centercode");
    assert!(
        strings(&service["ports"])
            .iter()
            .all(|p| port_of(p) == port),
        "fake-centercode publishes another port"
    );
    // Its health checks (the image's and compose's) pass against a running fake.
    let fake = fake_centercode::FakeCentercode::start(fake_centercode::FakeConfig::demo())
        .await
        .unwrap();
    let real = port_of(&fake.base_url());
    let check = docker
        .healthcheck("fake-centercode")
        .replace(&format!(":{port}/"), &format!(":{real}/"));
    assert!(shell_healthcheck(&check, &[]).await, "{check}");
    let test = strings(&service["healthcheck"]["test"]);
    assert!(compose_healthcheck(&test, port, real).await, "{test:?}");
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml.

fn compose_file() -> Value {
    let mut compose: Value = serde_yaml::from_str(&read("docker-compose.yml")).unwrap();
    compose.apply_merge().unwrap();
    compose
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| s.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// The compose services that run the relay image.
fn relay_services(compose: &Value) -> Vec<(String, Value)> {
    compose["services"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, s)| s["image"].as_str() == Some(COMPOSE_IMAGE))
        .map(|(n, s)| (n.as_str().unwrap().to_owned(), s.clone()))
        .collect()
}

/// A compose service's environment as the container sees it: the image's ENV, then its own.
fn compose_env(docker: &Dockerfile, service: &Value) -> BTreeMap<String, String> {
    let mut vars = docker.env("relay");
    for (key, value) in service["environment"].as_mapping().into_iter().flatten() {
        let value = match value {
            Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
        };
        vars.insert(key.as_str().unwrap().to_owned(), value);
    }
    vars
}

#[test]
fn compose_services_use_real_configuration_keys_commands_ports_and_files() {
    let compose = compose_file();
    let docker = Dockerfile::load();
    let services = compose["services"].as_mapping().unwrap().clone();
    let volumes: BTreeSet<String> = compose["volumes"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    for name in [
        "relay-gateway",
        "relay-worker",
        "relay-embedded",
        "rabbitmq",
        "redis",
        "fake-centercode",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    let stages: Vec<&str> = docker.stages.iter().map(|s| s.name.as_str()).collect();
    let mut builds_relay = Vec::new();
    for (name, spec) in &services {
        let name = name.as_str().unwrap();
        assert_eq!(spec["restart"], "unless-stopped", "{name}: restart policy");
        assert!(
            !strings(&spec["healthcheck"]["test"]).is_empty(),
            "{name}: no health check"
        );
        for port in strings(&spec["ports"]) {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name}: {port} is open to the network"
            );
        }
        // Files mounted from the repository exist; named volumes are declared.
        for volume in strings(&spec["volumes"]) {
            let source = volume.split(':').next().unwrap();
            match source.strip_prefix("./") {
                Some(path) => assert!(repo(path).exists(), "{name} mounts missing {path}"),
                None => assert!(
                    volumes.contains(source),
                    "{name}: volume {source} undeclared"
                ),
            }
        }
        if !spec["build"].is_null() {
            assert_eq!(spec["build"]["dockerfile"], DOCKERFILE, "{name}");
            assert_eq!(spec["build"]["context"], ".", "{name}");
            let target = spec["build"]["target"].as_str().expect("build target");
            assert!(stages.contains(&target), "{name}: no stage {target}");
            if target == "relay" {
                builds_relay.push(name.to_owned());
            }
        }
    }
    // One image, built by one service, run by every relay service.
    assert_eq!(builds_relay, ["relay-gateway"]);
    assert_eq!(compose["services"]["relay-gateway"]["image"], COMPOSE_IMAGE);
    let relays = relay_services(&compose);
    assert_eq!(relays.len(), 3, "{relays:?}");
    for (name, spec) in &relays {
        if name != "relay-gateway" {
            assert!(spec["build"].is_null(), "{name} builds the image again");
            assert_eq!(
                spec["pull_policy"], "never",
                "{name} would look for the image in a registry"
            );
        }
    }
    // The broker keeps its queues across down/up; Redis keeps its keys on disk.
    let rabbitmq = &compose["services"]["rabbitmq"];
    assert_eq!(rabbitmq["hostname"], "rabbitmq");
    assert!(strings(&rabbitmq["volumes"])
        .iter()
        .any(|v| v.ends_with(":/var/lib/rabbitmq")));
    let redis = &compose["services"]["redis"];
    assert!(strings(&redis["command"])
        .windows(2)
        .any(|w| w == ["--appendonly", "yes"]));
    assert!(strings(&redis["volumes"])
        .iter()
        .any(|v| v.ends_with(":/data")));
    assert!(strings(&redis["ports"])
        .iter()
        .any(|p| p.ends_with(":6379")));
    assert!(strings(&rabbitmq["ports"])
        .iter()
        .any(|p| p.ends_with(":5672")));
    // The embedded shape runs only with its profile.
    assert_eq!(
        strings(&compose["services"]["relay-embedded"]["profiles"]),
        ["embedded"]
    );

    let mut ops_ports = BTreeMap::new();
    for (name, spec) in &relays {
        let command = strings(&spec["command"]);
        let role = parse_relay_args(name, &command);
        // The routes file the command names is one of the service's mounts.
        let config_path = arg_after(&command, "--config").expect("--config");
        let source = strings(&spec["volumes"])
            .into_iter()
            .find_map(|v| {
                let parts: Vec<&str> = v.split(':').collect();
                (parts[1] == config_path).then(|| parts[0].trim_start_matches("./").to_owned())
            })
            .unwrap_or_else(|| panic!("{name}: {config_path} is not mounted"));
        let vars = compose_env(&docker, spec);
        let settings = effective_settings(name, &read(&source), &vars);
        check_variable_names(name, &vars, &settings);
        relay_check_config(name, &repo(&source), &vars);
        // Ports: the published container ports are the listeners; the health check probes
        // the main one over http (no server.tls here).
        let bind = port_of(&settings.server.bind);
        let ops = port_of(settings.server.ops_bind.as_deref().expect("ops listener"));
        ops_ports.insert(name.clone(), ops);
        for published in strings(&spec["ports"]) {
            let port = port_of(&published);
            assert!(port == bind || port == ops, "{name}: publishes {port}");
        }
        if role != "worker" {
            assert!(
                strings(&spec["ports"]).iter().any(|p| port_of(p) == bind),
                "{name}"
            );
        }
        let test = strings(&spec["healthcheck"]["test"]);
        let url =
            reqwest::Url::parse(test.iter().find(|a| a.starts_with("http")).unwrap()).unwrap();
        assert!(settings.server.tls.is_none());
        assert_eq!((url.scheme(), url.port()), ("http", Some(bind)), "{name}");
        assert!(HEALTH_PATHS.contains(&url.path()), "{name}: {url}");
        assert_eq!(test[1], "curl", "{name}: the runtime image has curl");
        // The queue: RabbitMQ and Redis by their service names, or the embedded file on a volume.
        match settings.queue.backend {
            sf_centercode_relay::settings::QueueBackend::Rabbitmq => {
                assert_ne!(role, "all", "{name}");
                for (url, service, port) in [
                    (
                        secrecy::ExposeSecret::expose_secret(&settings.queue.url).to_owned(),
                        "rabbitmq",
                        5672,
                    ),
                    (
                        secrecy::ExposeSecret::expose_secret(
                            settings.queue.redis_url.as_ref().expect("redis_url"),
                        )
                        .to_owned(),
                        "redis",
                        6379,
                    ),
                ] {
                    let url = reqwest::Url::parse(&url).unwrap();
                    assert_eq!(
                        (url.host_str(), url.port()),
                        (Some(service), Some(port)),
                        "{name}"
                    );
                    assert!(services.contains_key(service));
                }
            }
            sf_centercode_relay::settings::QueueBackend::Embedded => {
                assert_eq!(role, "all", "{name}");
                let dir = settings.queue.path.parent().unwrap().display().to_string();
                let volume = strings(&spec["volumes"])
                    .into_iter()
                    .find(|v| v.ends_with(&format!(":{dir}")))
                    .unwrap_or_else(|| panic!("{name}: {dir} is not a volume"));
                assert!(
                    volumes.contains(volume.split(':').next().unwrap()),
                    "{name}: {volume}"
                );
            }
        }
    }
    // Prometheus scrapes the RabbitMQ shape's relays at their ops port.
    let prometheus: Value =
        serde_yaml::from_str(&read("deploy/prometheus/prometheus.yml")).unwrap();
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["job_name"], "relay");
    assert_eq!(job["metrics_path"], "/metrics");
    for sd in job["dns_sd_configs"].as_sequence().unwrap() {
        for target in strings(&sd["names"]) {
            assert_eq!(
                ops_ports.get(&target).copied(),
                sd["port"].as_u64().map(|p| p as u16),
                "prometheus.yml scrapes {target}"
            );
        }
    }
}

#[test]
fn a_variable_that_names_no_setting_is_caught() {
    let vars = |k: &str| BTreeMap::from([(k.to_owned(), "x".to_owned())]);
    assert!(try_effective_settings("", &vars("RELAY__QUEUE__REDIS_ULR")).is_err());
    assert!(try_effective_settings("", &vars("RELAY__SERVERS__BIND")).is_err());
    assert!(try_effective_settings("", &vars("RELAY__QUEUE__PREFIX")).is_ok());
    let settings = effective_settings(
        "routes",
        &read("deploy/routes.compose.toml"),
        &BTreeMap::new(),
    );
    let names = |k: &str| BTreeMap::from([(k.to_owned(), "x".to_owned())]);
    check_variable_names("ok", &names("RELAY_ROUTE__APEX_REMOVAL__BEARER"), &settings);
    for bad in [
        "RELAY_ROUTE__NO_SUCH_ROUTE__BEARER",
        "RELAY_ROUTE__APEX_REMOVAL__TOKEN",
        "RELAY_ENVIRONMENT",
    ] {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_variable_names("bad", &names(bad), &settings)
        }));
        assert!(caught.is_err(), "{bad} passed");
    }
}

/// Run `script` with python3 and `input` on stdin; its stdout.
fn python(script: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 failed (the packages .ci/run installs: kubernetes-validate, cloudcoil-models-keda, \
         cloudcoil-models-prometheus-operator, compose-spec):\n{}",
        output_text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Compose files through the `compose_spec` crate's strict model (every key of the
/// specification, typed; unknown keys refused): one line per file, `OK` or `ERROR <why>`.
const COMPOSE_VALIDATOR: &str = r#"
import json, sys
from compose_spec import PyCompose
for doc in json.load(sys.stdin):
    try:
        PyCompose.from_json(json.dumps(doc)).validate()
        print("OK")
    except Exception as e:
        print("ERROR", str(e).replace("\n", " "))
"#;

#[test]
fn compose_file_follows_the_compose_specification() {
    let compose = serde_json::to_value(compose_file()).unwrap();
    // A misspelt key and a value of the wrong type must be caught, or the check proves
    // nothing. (Named volumes being declared is checked above: this model does not.)
    let mut misspelt = compose.clone();
    let redis = misspelt["services"]["redis"].as_object_mut().unwrap();
    let check = redis.remove("healthcheck").unwrap();
    redis.insert("healthchek".into(), check);
    let mut mistyped = compose.clone();
    mistyped["services"]["relay-worker"]["healthcheck"]["retries"] = json!("five");
    let input = serde_json::to_string(&[compose, misspelt, mistyped]).unwrap();
    let out = python(COMPOSE_VALIDATOR, &[], &input);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "OK", "docker-compose.yml: {}", lines[0]);
    assert!(
        lines[1].starts_with("ERROR"),
        "a misspelt key passed: {out}"
    );
    assert!(
        lines[2].starts_with("ERROR"),
        "a mistyped value passed: {out}"
    );
}

#[test]
fn shipped_configuration_files_are_valid() {
    for file in [
        "config/local.toml",
        "config/test.toml",
        "config/production.toml",
        "deploy/routes.compose.toml",
    ] {
        let text = read(file);
        Settings::from_toml(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let dockerfile = read(DOCKERFILE);
    assert!(dockerfile.contains("RELAY_ENV=production") && dockerfile.contains("/health/ready"));
}

// ---------------------------------------------------------------------------------------------
// The PrometheusRule, generated from alerts.yml.

/// The PrometheusRule the Prometheus Operator loads: alerts.yml's groups, as they are.
fn generated_prometheus_rule() -> String {
    let alerts: Value = serde_yaml::from_str(&read(ALERTS)).unwrap();
    let mut labels = serde_yaml::Mapping::new();
    labels.insert(
        "app.kubernetes.io/name".into(),
        "sf-centercode-relay".into(),
    );
    let mut metadata = serde_yaml::Mapping::new();
    metadata.insert("name".into(), "relay".into());
    metadata.insert("labels".into(), labels.into());
    let mut spec = serde_yaml::Mapping::new();
    spec.insert("groups".into(), alerts["groups"].clone());
    let mut rule = serde_yaml::Mapping::new();
    rule.insert("apiVersion".into(), "monitoring.coreos.com/v1".into());
    rule.insert("kind".into(), "PrometheusRule".into());
    rule.insert("metadata".into(), metadata.into());
    rule.insert("spec".into(), spec.into());
    format!(
        "# Generated from {ALERTS} by tests/api/deploy.rs: do not edit. After changing the alerts,\n\
         # run `RELAY_UPDATE_GENERATED=1 cargo test --test api deploy`; the test fails while this\n\
         # file and the alerts differ. The Prometheus Operator loads it when its ruleSelector\n\
         # matches these labels (add yours in the overlay, e.g. `release: <helm release>`).\n{}",
        serde_yaml::to_string(&Value::from(rule)).unwrap()
    )
}

#[test]
fn the_prometheus_rule_is_generated_from_the_alerts() {
    let want = generated_prometheus_rule();
    if std::env::var_os("RELAY_UPDATE_GENERATED").is_some() {
        std::fs::write(repo(PROMETHEUS_RULE), &want).unwrap();
    }
    let have = std::fs::read_to_string(repo(PROMETHEUS_RULE)).unwrap_or_default();
    assert!(
        have == want,
        "{PROMETHEUS_RULE} is not what {ALERTS} generates; run \
         `RELAY_UPDATE_GENERATED=1 cargo test --test api deploy` and commit it"
    );
    // The rendered rule holds the same groups, and promtool accepts them as a rule file.
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let rule = objects_of(&objects, "PrometheusRule")
            .into_iter()
            .next()
            .expect("a PrometheusRule");
        let alerts: Json = serde_yaml::from_str(&read(ALERTS)).unwrap();
        assert_eq!(rule["spec"]["groups"], alerts["groups"], "{overlay}");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), serde_json::to_string(&rule["spec"]).unwrap()).unwrap();
        let out = Command::new("promtool")
            .args(["check", "rules"])
            .arg(file.path())
            .output()
            .expect("promtool (apt-get install prometheus)");
        assert!(out.status.success(), "{overlay}: {}", output_text(&out));
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes.

/// `kubectl kustomize` of an overlay: its objects.
fn render(overlay: &str) -> Vec<Json> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo(&format!("deploy/kubernetes/overlays/{overlay}")))
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl ({e}); install it"));
    assert!(out.status.success(), "{overlay}: {}", output_text(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Json::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn objects_of<'a>(objects: &'a [Json], kind: &str) -> Vec<&'a Json> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn object<'a>(objects: &'a [Json], kind: &str, name: &str) -> &'a Json {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn json_strings(value: &Json) -> Vec<String> {
    value
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Each rendered object through its schema, offline: built-in kinds with kubernetes-validate's
/// strict schemas (unknown fields refused), KEDA's and the Prometheus Operator's with the
/// models cloudcoil generates from their CRDs (a field the CRD does not know, or a value the
/// model had to convert, is an error). An object of no known schema is an error too.
const KUBERNETES_VALIDATOR: &str = r#"
import json, sys
import kubernetes_validate
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring

CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
}

def lost(given, kept, path):
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [f"{path}: not an object in the schema"]
        out = []
        for key, value in given.items():
            if key not in kept:
                out.append(f"{path}.{key}: not in the schema")
            else:
                out += lost(value, kept[key], f"{path}.{key}")
        return out
    if isinstance(given, list):
        if not isinstance(kept, list) or len(kept) != len(given):
            return [f"{path}: not a list in the schema"]
        return [e for i, (g, k) in enumerate(zip(given, kept)) for e in lost(g, k, f"{path}[{i}]")]
    if given != kept or type(given) != type(kept):
        return [f"{path}: {given!r} read as {kept!r}"]
    return []

for obj in json.load(sys.stdin):
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        model = CRDS.get((obj.get("apiVersion"), obj.get("kind")))
        if model is not None:
            kept = model.model_validate(obj).model_dump(by_alias=True, exclude_unset=True, mode="json")
            problems = lost(obj, kept, "")
            if problems:
                raise ValueError("; ".join(problems))
        else:
            kubernetes_validate.validate(obj, sys.argv[1], strict=True)
        print("OK", name)
    except Exception as e:
        message = getattr(e, "message", None) or str(e)
        print("ERROR", name, type(e).__name__, message.replace("\n", " "))
"#;

#[test]
fn both_overlays_render_and_every_object_passes_its_schema() {
    for overlay in OVERLAYS {
        let objects = render(overlay);
        // Objects broken on purpose must fail, or the validation proves nothing.
        let mut broken = Vec::new();
        for (kind, pointer, value) in [
            ("ScaledObject", "/spec/pollingIntervall", json!(15)),
            ("ServiceMonitor", "/spec/endpoints/0/portt", json!("ops")),
            (
                "PrometheusRule",
                "/spec/groups/0/rules",
                json!("not a list"),
            ),
            ("Service", "/spec/ports/0/port", json!("eighty")),
            ("ConfigMap", "/immutablee", json!(true)),
        ] {
            if let Some(original) = objects.iter().find(|o| o["kind"] == kind) {
                let mut copy = original.clone();
                set_pointer(&mut copy, pointer, value);
                broken.push(copy);
            }
        }
        let mut unknown = objects[0].clone();
        unknown["kind"] = json!("NoSuchKind");
        broken.push(unknown);
        let input = serde_json::to_string(&[objects.clone(), broken.clone()].concat()).unwrap();
        let out = python(KUBERNETES_VALIDATOR, &[KUBERNETES_VERSION], &input);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), objects.len() + broken.len(), "{out}");
        for line in &lines[..objects.len()] {
            assert!(line.starts_with("OK "), "{overlay}: {line}");
        }
        for line in &lines[objects.len()..] {
            assert!(
                line.starts_with("ERROR "),
                "{overlay}: a broken object passed: {line}"
            );
        }
        // Both shapes are complete.
        let kinds: BTreeSet<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        for kind in [
            "Namespace",
            "ConfigMap",
            "Service",
            "ServiceMonitor",
            "PrometheusRule",
        ] {
            assert!(kinds.contains(kind), "{overlay}: no {kind}");
        }
        let expected: &[&str] = match *overlay {
            "embedded" => &["StatefulSet"],
            _ => &[
                "Deployment",
                "PodDisruptionBudget",
                "ScaledObject",
                "TriggerAuthentication",
            ],
        };
        for kind in expected {
            assert!(kinds.contains(kind), "{overlay}: no {kind}");
        }
        for o in &objects {
            if o["kind"] != "Namespace" {
                assert_eq!(
                    o["metadata"]["namespace"], NAMESPACE,
                    "{overlay}: {}",
                    o["metadata"]["name"]
                );
            }
        }
    }
}

fn set_pointer(value: &mut Json, pointer: &str, new: Json) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = value
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("{pointer}"));
    match target {
        Json::Object(map) => {
            map.insert(key.to_owned(), new);
        }
        Json::Array(list) => list[key.parse::<usize>().unwrap()] = new,
        _ => panic!("{pointer}"),
    }
}

/// A relay container of a rendered workload, with what it loads.
struct RelayPod {
    workload: String,
    labels: serde_json::Map<String, Json>,
    pod: Json,
    role: &'static str,
    settings: Settings,
    /// Container port name → number.
    ports: BTreeMap<String, u16>,
}

/// Every relay container of an overlay: its command parsed, its environment (secrets given
/// test values) and mounted routes file run through `relay check-config`, and its settings.
fn relay_pods(overlay: &str, objects: &[Json]) -> Vec<RelayPod> {
    let docker = Dockerfile::load();
    let mut pods = Vec::new();
    for workload in objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet")
    {
        let name = format!(
            "{overlay}/{}",
            workload["metadata"]["name"].as_str().unwrap()
        );
        let pod = &workload["spec"]["template"];
        let containers = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{name}");
        let container = &containers[0];
        let image = container["image"].as_str().unwrap();
        assert_eq!(
            image,
            format!("{IMAGE}:{}", env!("CARGO_PKG_VERSION")),
            "{name}: the image tag is the package version"
        );
        let args = json_strings(&container["args"]);
        assert!(
            container["command"].is_null(),
            "{name}: the image's ENTRYPOINT runs relay"
        );
        let role = parse_relay_args(&name, &args);
        // The environment, secrets as test values.
        let mut vars = docker.env("relay");
        for var in container["env"].as_array().unwrap() {
            let key = var["name"].as_str().unwrap().to_owned();
            let value = if let Some(v) = var["value"].as_str() {
                v.to_owned()
            } else {
                let secret = &var["valueFrom"]["secretKeyRef"];
                assert_eq!(secret["name"], SECRET, "{name}: {key}");
                secret_value(&name, secret["key"].as_str().unwrap())
            };
            vars.insert(key, value);
        }
        // The routes file: the --config path is a ConfigMap key mounted in the container.
        let config_path = arg_after(&args, "--config").expect("--config");
        let (dir, file) = config_path.rsplit_once('/').unwrap();
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{name}: nothing mounted at {dir}"));
        let volume = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let config_map = object(
            objects,
            "ConfigMap",
            volume["configMap"]["name"].as_str().unwrap(),
        );
        let routes = config_map["data"][file]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no {file}"));
        // The relay reads the file's format from its extension.
        let routes_file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(routes_file.path(), routes).unwrap();
        let settings = effective_settings(&name, routes, &vars);
        check_variable_names(&name, &vars, &settings);
        relay_check_config(&name, routes_file.path(), &vars);
        let ports = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["containerPort"].as_u64().unwrap() as u16,
                )
            })
            .collect();
        pods.push(RelayPod {
            workload: name,
            labels: pod["metadata"]["labels"].as_object().unwrap().clone(),
            pod: pod.clone(),
            role,
            settings,
            ports,
        });
    }
    assert!(!pods.is_empty(), "{overlay}: no relay workload");
    pods
}

fn secret_value(where_: &str, key: &str) -> String {
    SECRET_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| {
            panic!("{where_}: Secret key {key} is not one docs/deployment.md creates")
        })
        .1
        .to_owned()
}

/// Whether a label selector (matchLabels or a Service's selector) selects these labels.
fn selects(selector: &Json, labels: &serde_json::Map<String, Json>) -> bool {
    let selector = selector.get("matchLabels").unwrap_or(selector);
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// A Service's target port (a name or a number) on a pod.
fn target_port(pod: &RelayPod, target: &Json) -> u16 {
    match target {
        Json::String(name) => *pod
            .ports
            .get(name)
            .unwrap_or_else(|| panic!("{}: no port named {name}", pod.workload)),
        Json::Number(n) => n.as_u64().unwrap() as u16,
        other => panic!("targetPort {other}"),
    }
}

#[test]
fn kubernetes_workloads_name_real_keys_ports_probes_services_and_secrets() {
    let docker = Dockerfile::load();
    let guide = read(GUIDE);
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let pods = relay_pods(overlay, &objects);
        let mut secret_keys = BTreeSet::new();
        for pod in &pods {
            let name = &pod.workload;
            let settings = &pod.settings;
            let spec = &pod.pod["spec"];
            let container = &spec["containers"][0];
            // Listeners: the named ports are the ones the relay binds.
            let bind = port_of(&settings.server.bind);
            let ops = port_of(
                settings
                    .server
                    .ops_bind
                    .as_deref()
                    .expect("production sets ops_bind"),
            );
            assert_eq!(pod.ports.get("http"), Some(&bind), "{name}");
            assert_eq!(pod.ports.get("ops"), Some(&ops), "{name}");
            // Probes: health paths, on a listener that serves them, in its scheme.
            let scheme = if settings.server.tls.is_some() {
                "HTTPS"
            } else {
                "HTTP"
            };
            for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                let get = &container[probe]["httpGet"];
                let path = get["path"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: no {probe}"));
                assert!(HEALTH_PATHS.contains(&path), "{name}: {probe} {path}");
                let port = target_port(pod, &get["port"]);
                assert!(port == bind || port == ops, "{name}: {probe} on {port}");
                assert_eq!(
                    get["scheme"].as_str().unwrap_or("HTTP"),
                    scheme,
                    "{name}: {probe}"
                );
            }
            assert_eq!(
                container["readinessProbe"]["httpGet"]["path"], "/health/ready",
                "{name}"
            );
            // The user is the image's; the relay drains before Kubernetes kills it.
            assert_eq!(
                spec["securityContext"]["runAsUser"],
                docker.relay_uid(),
                "{name}"
            );
            assert!(
                spec["terminationGracePeriodSeconds"].as_u64().unwrap()
                    > settings.server.shutdown_grace_secs,
                "{name}: terminationGracePeriodSeconds"
            );
            for var in container["env"].as_array().unwrap() {
                if let Some(key) = var["valueFrom"]["secretKeyRef"]["key"].as_str() {
                    secret_keys.insert(key.to_owned());
                }
            }
            // The component label says the role the command runs.
            let component = pod.labels["app.kubernetes.io/component"].as_str().unwrap();
            assert_eq!(
                component,
                if pod.role == "all" { "relay" } else { pod.role },
                "{name}"
            );
            match *overlay {
                "embedded" => {
                    assert_eq!(pod.role, "all");
                    assert_eq!(
                        settings.queue.backend,
                        sf_centercode_relay::settings::QueueBackend::Embedded
                    );
                    let workload = object(&objects, "StatefulSet", name.split('/').nth(1).unwrap());
                    assert_eq!(
                        workload["spec"]["replicas"], 1,
                        "one process owns the queue file"
                    );
                    // The queue file is on the pod's PersistentVolumeClaim.
                    let claims: Vec<&str> = workload["spec"]["volumeClaimTemplates"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c["metadata"]["name"].as_str().unwrap())
                        .collect();
                    let dir = settings.queue.path.parent().unwrap().display().to_string();
                    let mount = container["volumeMounts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|m| m["mountPath"] == dir.as_str())
                        .unwrap_or_else(|| panic!("{name}: {dir} is not mounted"));
                    assert!(
                        claims.contains(&mount["name"].as_str().unwrap()),
                        "{name}: {dir} is not on a claim"
                    );
                    assert_eq!(
                        spec["securityContext"]["fsGroup"],
                        docker.relay_uid(),
                        "{name}: the volume is writable"
                    );
                    let governing = workload["spec"]["serviceName"].as_str().unwrap();
                    object(&objects, "Service", governing);
                }
                _ => {
                    assert_ne!(pod.role, "all", "{name}");
                    assert_eq!(
                        settings.queue.backend,
                        sf_centercode_relay::settings::QueueBackend::Rabbitmq
                    );
                    assert!(
                        settings.queue.redis_url.is_some(),
                        "{name}: dedupe shared by gateways"
                    );
                }
            }
        }
        if *overlay == "rabbitmq" {
            let roles: BTreeSet<&str> = pods.iter().map(|p| p.role).collect();
            assert_eq!(roles, BTreeSet::from(["gateway", "worker"]));
        }

        // Services: each selects relay pods and targets ports they have; Salesforce's
        // reaches only pods that receive, the ops Service every pod's ops listener.
        for service in objects_of(&objects, "Service") {
            let sname = service["metadata"]["name"].as_str().unwrap();
            let selected: Vec<&RelayPod> = pods
                .iter()
                .filter(|p| selects(&service["spec"]["selector"], &p.labels))
                .collect();
            assert!(
                !selected.is_empty(),
                "{overlay}: Service {sname} selects no pod"
            );
            for port in service["spec"]["ports"].as_array().unwrap() {
                for pod in &selected {
                    let target = target_port(pod, &port["targetPort"]);
                    match sname {
                        "relay-ingest" => {
                            assert_ne!(
                                pod.role, "worker",
                                "{overlay}: Salesforce reaches a worker"
                            );
                            assert_eq!(target, port_of(&pod.settings.server.bind));
                        }
                        "relay-ops" => assert_eq!(
                            Some(target),
                            pod.settings.server.ops_bind.as_deref().map(port_of)
                        ),
                        other => panic!("{overlay}: unexpected Service {other}"),
                    }
                }
            }
            if sname == "relay-ops" {
                assert_eq!(
                    selected.len(),
                    pods.len(),
                    "{overlay}: relay-ops misses a pod"
                );
            }
        }

        // ServiceMonitor: scrapes /metrics on the ops listener of every pod, as job "relay",
        // the job the alerts' `up` rule watches.
        for monitor in objects_of(&objects, "ServiceMonitor") {
            let services: Vec<&Json> = objects_of(&objects, "Service")
                .into_iter()
                .filter(|s| {
                    selects(
                        &monitor["spec"]["selector"],
                        s["metadata"]["labels"].as_object().unwrap(),
                    )
                })
                .collect();
            assert_eq!(
                services.len(),
                1,
                "{overlay}: the ServiceMonitor selects {}",
                services.len()
            );
            let service = services[0];
            let job_label = monitor["spec"]["jobLabel"].as_str().unwrap();
            let job = service["metadata"]["labels"][job_label].as_str().unwrap();
            assert!(
                read(ALERTS).contains(&format!("up{{job=\"{job}\"}}")),
                "{overlay}: the alerts do not watch job {job}"
            );
            for endpoint in monitor["spec"]["endpoints"].as_array().unwrap() {
                assert_eq!(endpoint["path"], "/metrics");
                let port = service["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == endpoint["port"])
                    .unwrap_or_else(|| panic!("{overlay}: no Service port {}", endpoint["port"]));
                for pod in pods
                    .iter()
                    .filter(|p| selects(&service["spec"]["selector"], &p.labels))
                {
                    assert_eq!(
                        Some(target_port(pod, &port["targetPort"])),
                        pod.settings.server.ops_bind.as_deref().map(port_of),
                        "{overlay}: /metrics is served only on the ops listener"
                    );
                }
            }
        }

        // KEDA: scales the workers, reads the queue the workers consume, with the broker URL
        // the relay reads.
        for scaled in objects_of(&objects, "ScaledObject") {
            let target = scaled["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
            object(&objects, "Deployment", target);
            let workers: Vec<&RelayPod> = pods
                .iter()
                .filter(|p| p.workload.ends_with(&format!("/{target}")))
                .collect();
            assert_eq!(workers.len(), 1);
            let worker = workers[0];
            assert_eq!(worker.role, "worker", "{overlay}: KEDA scales {target}");
            assert!(
                object(&objects, "Deployment", target)["spec"]["replicas"].is_null(),
                "{overlay}: KEDA owns the worker count"
            );
            assert!(
                scaled["spec"]["minReplicaCount"].as_u64().unwrap() >= 1,
                "never scale workers to zero"
            );
            let triggers = scaled["spec"]["triggers"].as_array().unwrap();
            let rabbit = triggers
                .iter()
                .find(|t| t["type"] == "rabbitmq")
                .expect("rabbitmq trigger");
            assert_eq!(
                rabbit["metadata"]["queueName"],
                format!("{}.work", worker.settings.queue.prefix),
                "{overlay}: the work queue"
            );
            let auth = object(
                &objects,
                "TriggerAuthentication",
                rabbit["authenticationRef"]["name"].as_str().unwrap(),
            );
            let url_key = worker.pod["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "RELAY__QUEUE__URL")
                .map(|v| v["valueFrom"]["secretKeyRef"]["key"].clone())
                .unwrap();
            let refs = auth["spec"]["secretTargetRef"].as_array().unwrap();
            assert!(
                refs.iter().any(|r| r["parameter"] == "host"
                    && r["name"] == SECRET
                    && r["key"] == url_key),
                "{overlay}: KEDA reads another broker URL than the workers"
            );
            for r in refs {
                secret_value(overlay, r["key"].as_str().unwrap());
                secret_keys.insert(r["key"].as_str().unwrap().to_owned());
            }
            assert!(
                triggers.iter().any(|t| t["type"] == "prometheus"),
                "{overlay}"
            );
        }

        // docs/deployment.md creates every Secret key the overlay reads.
        for key in &secret_keys {
            assert!(
                guide.contains(&format!("--from-literal={key}=")),
                "{GUIDE} does not create Secret key {key}"
            );
        }
    }
}

/// A PromQL selector: its metric, the (label, value) of its `=` matchers, and the labels of
/// its other matchers (`!=`, `=~`, `!~`).
#[derive(Debug, PartialEq)]
struct Selector {
    metric: String,
    equal: Vec<(String, String)>,
    other: Vec<String>,
}

/// Each selector of a PromQL expression whose metric is the relay's (`relay_*`) or `up`.
fn promql_selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '[' {
            let close = if c == '"' { '"' } else { ']' };
            i += 1;
            while i < chars.len() && chars[i] != close {
                i += 1;
            }
            i += 1;
        } else if word(c) && !c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && word(chars[i]) {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            let rest: String = chars[i..].iter().collect();
            let rest = rest.trim_start();
            if ["by", "without", "on", "ignoring"].contains(&name.as_str()) && rest.starts_with('(')
            {
                // A list of label names.
                i += chars[i..].iter().position(|&c| c == ')').unwrap() + 1;
            } else if name.starts_with("relay_") || name == "up" {
                let mut equal = Vec::new();
                let mut other = Vec::new();
                if let Some(body) = rest.strip_prefix('{') {
                    let body = &body[..body.find('}').expect("closing brace")];
                    for matcher in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                        let op = matcher.find(['=', '!']).unwrap();
                        let label = matcher[..op].trim().to_owned();
                        match matcher[op..].strip_prefix('=') {
                            Some(v) if !v.starts_with('~') => {
                                equal.push((label, v.trim().trim_matches('"').to_owned()))
                            }
                            _ => other.push(label),
                        }
                    }
                    i += chars[i..].iter().position(|&c| c == '}').unwrap() + 1;
                }
                found.push(Selector {
                    metric: name,
                    equal,
                    other,
                });
            }
        } else {
            i += 1;
            while i < chars.len() && c.is_ascii_digit() && word(chars[i]) {
                i += 1;
            }
        }
    }
    found
}

#[tokio::test]
async fn kubernetes_queries_only_metrics_and_series_the_relay_exports() {
    // Arrange: a relay that has acked and delivered, so its histograms have series.
    let app = spawn_app().await;
    let acked = app
        .post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    assert_eq!(acked.status(), 200);
    assert!(!app.deliver_until_settled().await.is_empty());
    // Act
    let scrape = app.metrics().await;
    // Assert: each series a query selects exists, labels and values included.
    let series: Vec<(String, BTreeMap<String, String>)> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let end = line.find(['{', ' ']).unwrap();
            let mut labels = BTreeMap::new();
            if let Some(body) = line[end..].strip_prefix('{') {
                for pair in body[..body.find('}').unwrap()].split(',') {
                    if let Some((k, v)) = pair.split_once('=') {
                        labels.insert(k.to_owned(), v.trim_matches('"').to_owned());
                    }
                }
            }
            (line[..end].to_owned(), labels)
        })
        .collect();
    let exported = |metric: &str| -> Vec<&BTreeMap<String, String>> {
        series
            .iter()
            .filter(|(name, _)| {
                name == metric
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(metric))
            })
            .map(|(_, labels)| labels)
            .collect()
    };
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let mut queries = Vec::new();
        for rule in objects_of(&objects, "PrometheusRule") {
            for group in rule["spec"]["groups"].as_array().unwrap() {
                for r in group["rules"].as_array().unwrap() {
                    queries.push((
                        format!("alert {}", r["alert"]),
                        r["expr"].as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
        for scaled in objects_of(&objects, "ScaledObject") {
            for trigger in scaled["spec"]["triggers"].as_array().unwrap() {
                if trigger["type"] == "prometheus" {
                    queries.push((
                        "KEDA".into(),
                        trigger["metadata"]["query"].as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
        assert!(queries.len() >= 8, "{overlay}: {queries:?}");
        for (where_, expr) in &queries {
            let selectors = promql_selectors(expr);
            assert!(
                !selectors.is_empty(),
                "{overlay}: {where_}: no relay metric in {expr}"
            );
            for Selector {
                metric,
                equal,
                other,
            } in selectors
            {
                if metric == "up" {
                    // Prometheus' own series; the job is the ServiceMonitor's (checked above).
                    assert_eq!(
                        equal.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
                        ["job"]
                    );
                    continue;
                }
                let candidates = exported(&metric);
                assert!(
                    !candidates.is_empty(),
                    "{overlay}: {where_} queries {metric}, which the relay does not export"
                );
                assert!(
                    candidates.iter().any(|labels| {
                        equal.iter().all(|(k, v)| labels.get(k) == Some(v))
                            && other.iter().all(|k| labels.contains_key(k))
                    }),
                    "{overlay}: {where_}: no {metric} series with {equal:?} {other:?}"
                );
            }
        }
    }
    assert_eq!(
        promql_selectors(
            r#"sum by (route) (increase(relay_x_total{outcome="a", route=~"b"}[10m])) > 0"#
        ),
        [Selector {
            metric: "relay_x_total".to_owned(),
            equal: vec![("outcome".to_owned(), "a".to_owned())],
            other: vec!["route".to_owned()],
        }]
    );
}

// ---------------------------------------------------------------------------------------------
// The guide.

#[test]
fn the_deployment_guide_names_files_that_exist() {
    let guide = read(GUIDE);
    let mut named = 0;
    let mut fenced = false;
    for line in guide.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        // Inline code only: the odd pieces between backticks.
        for text in line.split('`').skip(1).step_by(2).filter(|_| !fenced) {
            let prefixes = [
                "deploy/",
                "config/",
                "docs/",
                ".dockerignore",
                "docker-compose.yml",
            ];
            if prefixes.iter().any(|p| text.starts_with(p)) && !text.contains([' ', '<', '*']) {
                named += 1;
                assert!(
                    repo(text.trim_end_matches('/')).exists(),
                    "{GUIDE} names {text}"
                );
            }
        }
    }
    assert!(named > 5, "{GUIDE} names almost no file");
}
