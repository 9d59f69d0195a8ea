//! The documentation against the repository: every relative link in README.md and `docs/`
//! resolves (anchors included), every `docs/…` path named in code, tests, examples, fixtures
//! and deploy files exists, `docs/configuration.md` documents exactly the keys the relay reads
//! (from `config/default.toml`, commented-out keys included, and the structs of
//! `src/settings.rs`), and the runbook lists exactly the alerts of
//! `deploy/prometheus/alerts.yml`. Every failure names the link, path, key or alert.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

/// Top-level entries whose paths, written in backticks in the docs, must exist.
const REPO_DIRS: [&str; 10] = [
    "docs", "src", "tests", "examples", "crates", "bench", "config", "deploy", "fuzz", ".ci",
];
const REPO_FILES: [&str; 4] = [
    "README.md",
    "Cargo.toml",
    "Cargo.lock",
    "docker-compose.yml",
];
/// Paths the docs name before they exist (the layout leaves room for them).
const PLANNED: [&str; 1] = ["crates/fake-salesforce/"];
/// Where code, tests, examples, fixtures and deploy files may name `docs/…` paths.
const SOURCE_ROOTS: [&str; 7] = [
    "src", "crates", "tests", "examples", "deploy", "bench", "fuzz",
];

/// The `src/settings.rs` structs that are configuration tables, and where their keys live.
const SETTINGS_TABLES: [(&str, &str); 15] = [
    ("ServerSettings", "server"),
    ("TlsSettings", "server.tls"),
    ("QueueSettings", "queue"),
    ("WorkerSettings", "worker"),
    ("CentercodeSettings", "centercode"),
    ("TelemetrySettings", "telemetry"),
    ("AdminSettings", "admin"),
    ("ControlSettings", "control"),
    ("LedgerSettings", "ledger"),
    ("RouteSettings", "routes"),
    ("CalloutAuth", "routes.auth"),
    ("FieldRule", "routes.fields.<key>"),
    ("LimitSettings", "limits"),
    ("SalesforceSettings", "salesforce"),
    ("StatusWriteback", "routes.status_writeback"),
];
/// Structs of `src/settings.rs` (and `src/ratelimit.rs`, which keeps `[[limits]]` beside
/// its logic) that are not a table of keys.
const NOT_TABLES: [&str; 6] = [
    "Settings",
    "SettingsError",
    "Limit",
    "Answer",
    "Gcra",
    "RateLimiter",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `path` relative to the repository, for messages.
fn shown(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// README.md and every Markdown file under `docs/`.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    files.extend(
        walk(&repo().join("docs"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    files
}

/// Every file below `dir`, skipping build output and VCS data.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name == ".git" || name == "corpus" || name == "artifacts" {
            continue;
        }
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// `(line number, line)` of the Markdown outside fenced code blocks.
fn prose(markdown: &str) -> Vec<(usize, &str)> {
    let mut fence: Option<&str> = None;
    let mut out = Vec::new();
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m));
        match (fence, marker) {
            (None, Some(m)) => fence = Some(m),
            (Some(open), Some(m)) if open == m => fence = None,
            (None, None) => out.push((i + 1, line)),
            _ => {}
        }
    }
    out
}

/// The text of the inline code spans of a line.
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// The line without its inline code spans (links are not looked for inside them).
fn outside_code(line: &str) -> String {
    line.split('`').step_by(2).collect::<Vec<_>>().join(" ")
}

/// Targets of inline links and images, `[text](target)`.
fn link_targets(line: &str) -> Vec<String> {
    let text = outside_code(line);
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let end = after.find(')').unwrap_or(after.len());
        let target = after[..end].split_whitespace().next().unwrap_or("");
        out.push(target.trim_matches(['<', '>']).to_owned());
        rest = &after[end..];
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (a repeated heading gets `-1`, `-2`, …).
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose(markdown) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let base = slug(heading.trim_start_matches('#'));
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// `path` with `.` and `..` resolved, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// A backticked span that names a repository path, relative to the repository root.
fn repo_path(span: &str) -> Option<String> {
    if span.is_empty()
        || span.contains("://")
        || span
            .chars()
            .any(|c| c.is_whitespace() || "<>{}$*|()\"'".contains(c))
    {
        return None;
    }
    let mut path = span;
    while let Some(rest) = path.strip_prefix("../").or_else(|| path.strip_prefix("./")) {
        path = rest;
    }
    let in_repo_dir = path
        .split_once('/')
        .is_some_and(|(first, _)| REPO_DIRS.contains(&first));
    (in_repo_dir || REPO_FILES.contains(&path)).then(|| path.to_owned())
}

#[test]
fn every_relative_link_and_repository_path_in_the_readme_and_docs_resolves() {
    let root = repo();
    let mut broken = Vec::new();
    let mut anchor_cache: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    let mut anchors_of = |file: &Path| {
        anchor_cache
            .entry(file.to_path_buf())
            .or_insert_with(|| anchors(&read(file)))
            .clone()
    };
    for file in markdown_files() {
        let text = read(&file);
        let dir = file.parent().expect("a file has a directory").to_path_buf();
        for (line_no, line) in prose(&text) {
            let place = format!("{}:{line_no}", shown(&file));
            for target in link_targets(line) {
                if target.is_empty()
                    || ["http:", "https:", "mailto:"]
                        .iter()
                        .any(|s| target.starts_with(s))
                {
                    continue;
                }
                let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
                let resolved = if path.is_empty() {
                    file.clone()
                } else {
                    normalize(&dir.join(path))
                };
                if !resolved.starts_with(&root) || !resolved.exists() {
                    broken.push(format!("{place}: link `{target}`: no such file"));
                    continue;
                }
                let is_markdown = resolved.extension().is_some_and(|e| e == "md");
                if !anchor.is_empty() && is_markdown && !anchors_of(&resolved).contains(anchor) {
                    broken.push(format!(
                        "{place}: link `{target}`: {} has no heading #{anchor}",
                        shown(&resolved)
                    ));
                }
            }
            for span in code_spans(line) {
                let Some(path) = repo_path(span) else {
                    continue;
                };
                if !PLANNED.contains(&path.as_str()) && !root.join(&path).exists() {
                    broken.push(format!(
                        "{place}: `{span}` names {path}, which does not exist"
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "broken links or paths in the docs:\n{}",
        broken.join("\n")
    );
}

/// The `docs/…` paths a text names, with `../` prefixes dropped; paths inside URLs or other
/// directories (`…/docs/…`) are not the repository's.
fn docs_paths(text: &str) -> Vec<String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "_.-/".contains(c);
    let mut out = Vec::new();
    for (at, _) in text.match_indices("docs/") {
        let before = &text[..at];
        let start = before
            .char_indices()
            .rev()
            .take_while(|(_, c)| token(*c) || *c == ':')
            .last()
            .map_or(at, |(i, _)| i);
        let prefix = &text[start..at];
        if !prefix.split_inclusive('/').all(|p| p == "../" || p == "./") {
            continue;
        }
        let tail: String = text[at..].chars().take_while(|c| token(*c)).collect();
        out.push(tail.trim_end_matches('.').to_owned());
    }
    out
}

#[test]
fn every_docs_path_named_in_code_tests_examples_fixtures_and_deploy_files_exists() {
    let root = repo();
    let mut missing = Vec::new();
    for dir in SOURCE_ROOTS {
        for file in walk(&root.join(dir)) {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue; // not text
            };
            for path in docs_paths(&text) {
                if !root.join(&path).exists() {
                    missing.push(format!(
                        "{} names {path}, which does not exist",
                        shown(&file)
                    ));
                }
            }
        }
    }
    assert!(missing.is_empty(), "missing docs:\n{}", missing.join("\n"));
}

/// `key = value` of a TOML line, or of a commented-out one (`# key = value`).
fn toml_assignment(line: &str) -> Option<(&str, &str, bool)> {
    let trimmed = line.trim();
    let (body, commented) = match trimmed.strip_prefix('#') {
        Some(rest) => (rest.trim_start(), true),
        None => (trimmed, false),
    };
    let (key, value) = body.split_once('=')?;
    let key = key.trim();
    let valid = !key.is_empty()
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    valid.then_some((key, value.trim(), commented))
}

/// The value of a TOML line as the docs write it: a string without its quotes (`""` when
/// empty), anything else up to its comment.
fn toml_value(value: &str) -> String {
    match value.strip_prefix('"') {
        Some(rest) => {
            let inner = rest.split('"').next().unwrap_or("");
            if inner.is_empty() {
                "\"\"".into()
            } else {
                inner.into()
            }
        }
        None => value.split('#').next().unwrap_or("").trim().into(),
    }
}

/// Every key of `config/default.toml`, commented-out ones included, with the value of the
/// active ones.
fn default_toml_keys() -> BTreeMap<String, Option<String>> {
    let mut section = String::new();
    let mut keys = BTreeMap::new();
    for line in read(&repo().join("config/default.toml")).lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            section = trimmed.trim_matches(['[', ']']).trim().to_owned();
            continue;
        }
        if section.is_empty() {
            continue;
        }
        if let Some((key, value, commented)) = toml_assignment(line) {
            keys.insert(
                format!("{section}.{key}"),
                (!commented).then(|| toml_value(value)),
            );
        }
    }
    keys
}

/// The fields of each `pub struct` of `src/settings.rs`, by struct name (serde renames
/// applied).
fn settings_structs() -> BTreeMap<String, Vec<String>> {
    let source = read(&repo().join("src/settings.rs")) + &read(&repo().join("src/ratelimit.rs"));
    let mut structs = BTreeMap::new();
    let mut current: Option<(String, Vec<String>)> = None;
    let mut rename: Option<String> = None;
    for line in source.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("pub struct ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if trimmed.ends_with('{') {
                current = Some((name, Vec::new()));
            } else {
                structs.insert(name, Vec::new());
            }
            continue;
        }
        let Some((_, fields)) = current.as_mut() else {
            continue;
        };
        if trimmed == "}" {
            let (name, fields) = current.take().expect("inside a struct");
            structs.insert(name, fields);
            continue;
        }
        if let Some(attr) = trimmed.strip_prefix("#[serde(") {
            if let Some(value) = attr.split("rename = \"").nth(1) {
                rename = value.split('"').next().map(str::to_owned);
            }
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("pub ") {
            if let Some((field, _)) = rest.split_once(':') {
                fields.push(rename.take().unwrap_or_else(|| field.trim().to_owned()));
            }
        }
    }
    structs
}

/// Every key the relay's settings structs read, as documented: `section.key`,
/// `routes.auth.key`, `routes.fields.<key>.key`.
fn schema_keys() -> BTreeSet<String> {
    let structs = settings_structs();
    let tables: BTreeMap<&str, &str> = SETTINGS_TABLES.into_iter().collect();
    let unmapped: Vec<&String> = structs
        .keys()
        .filter(|name| !tables.contains_key(name.as_str()) && !NOT_TABLES.contains(&name.as_str()))
        .collect();
    assert!(
        unmapped.is_empty(),
        "src/settings.rs has structs this test does not place in the configuration: {unmapped:?}; \
         add them to SETTINGS_TABLES (with their key prefix) or NOT_TABLES in tests/api/docs.rs"
    );
    let mut keys = BTreeSet::new();
    for (name, prefix) in SETTINGS_TABLES {
        let fields = structs
            .get(name)
            .unwrap_or_else(|| panic!("src/settings.rs has no struct {name} any more"));
        keys.extend(fields.iter().map(|f| format!("{prefix}.{f}")));
    }
    keys
}

/// The rows of the tables of `docs/configuration.md` whose first column is "Key":
/// key → the Default column, without backticks.
fn documented_keys() -> BTreeMap<String, String> {
    let text = read(&repo().join("docs/configuration.md"));
    let mut keys = BTreeMap::new();
    let mut in_table = false;
    for (_, line) in prose(&text) {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if !line.trim_start().starts_with('|') {
            in_table = false;
            continue;
        }
        if cells.first() == Some(&"Key") {
            in_table = true;
            continue;
        }
        if !in_table || cells.first().is_some_and(|c| c.starts_with("---")) {
            continue;
        }
        let default = cells.get(1).copied().unwrap_or("").to_owned();
        for key in code_spans(cells[0]) {
            keys.insert(key.to_owned(), default.clone());
        }
    }
    keys
}

#[test]
fn the_configuration_reference_documents_exactly_the_keys_the_relay_reads() {
    let documented = documented_keys();
    assert!(
        !documented.is_empty(),
        "docs/configuration.md has no key table"
    );
    let toml = default_toml_keys();
    let schema = schema_keys();
    let known: BTreeSet<&String> = toml.keys().chain(&schema).collect();

    let unknown: Vec<&String> = documented.keys().filter(|k| !known.contains(k)).collect();
    assert!(
        unknown.is_empty(),
        "docs/configuration.md documents keys that are in neither config/default.toml nor \
         src/settings.rs: {unknown:?}"
    );
    let undocumented: Vec<&&String> = known
        .iter()
        .filter(|k| !documented.contains_key(k.as_str()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "keys of config/default.toml or src/settings.rs missing from docs/configuration.md: \
         {undocumented:?}"
    );
    // Whatever config/default.toml sets is the default the table gives.
    let mut wrong = Vec::new();
    for (key, value) in &toml {
        let Some(value) = value else { continue };
        let given = documented[key].trim_matches('`');
        if given != value {
            wrong.push(format!(
                "{key}: docs say `{given}`, config/default.toml says `{value}`"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "defaults in docs/configuration.md differ from config/default.toml:\n{}",
        wrong.join("\n")
    );
    // The commented-out keys are found too (the parser reads them).
    for key in ["server.ops_bind", "queue.redis_url", "worker.prefetch"] {
        assert_eq!(
            toml.get(key),
            Some(&None),
            "{key} is a commented-out key of config/default.toml"
        );
    }
}

#[test]
fn the_runbook_lists_exactly_the_alert_rules() {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&read(&repo().join("deploy/prometheus/alerts.yml")))
            .expect("deploy/prometheus/alerts.yml is YAML");
    let in_rules: BTreeSet<String> = rules["groups"]
        .as_sequence()
        .expect("alert groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect();
    assert!(!in_rules.is_empty(), "no alert rules found");
    let runbook = read(&repo().join("docs/operations.md"));
    let section = runbook
        .split("\n## Alerts\n")
        .nth(1)
        .expect("docs/operations.md has an `## Alerts` section")
        .split("\n## ")
        .next()
        .unwrap_or("");
    let in_runbook: BTreeSet<String> = section
        .split("**")
        .skip(1)
        .step_by(2)
        .filter(|name| name.starts_with("Relay"))
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = in_rules.difference(&in_runbook).collect();
    let extra: Vec<&String> = in_runbook.difference(&in_rules).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/operations.md ## Alerts: missing {missing:?}, not in deploy/prometheus/alerts.yml {extra:?}"
    );
}

#[test]
fn the_readme_stays_short_and_keeps_the_two_commands() {
    let readme = read(&repo().join("README.md"));
    let lines = readme.lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines; move detail into docs/"
    );
    // CI runs the test command the README gives (.ci/run): it must stay exactly this line.
    for command in ["cargo run -- demo", "cargo test --workspace --all-targets"] {
        assert!(
            readme.lines().any(|l| l == command),
            "README.md lost its command line `{command}`"
        );
    }
}
