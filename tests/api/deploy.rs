//! docker-compose.yml and deploy/ cannot run here (no Docker engine): check that what they
//! name matches the relay's real configuration.

use clap::Parser;
use serde_yaml::Value;
use sf_centercode_relay::settings::{Settings, DEFAULT_TOML};

fn repo(path: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn compose_services_use_real_configuration_keys_commands_and_files() {
    let mut compose: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo("docker-compose.yml")).unwrap())
            .unwrap();
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().unwrap().clone();
    for name in [
        "relay-gateway",
        "relay-worker",
        "rabbitmq",
        "redis",
        "fake-centercode",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    let routes = std::fs::read_to_string(repo("deploy/routes.compose.toml")).unwrap();
    for (name, spec) in &services {
        let name = name.as_str().unwrap();
        // Files mounted from the repository exist.
        for volume in spec["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if let Some(path) = source.strip_prefix("./") {
                assert!(repo(path).exists(), "{name} mounts missing {path}");
            }
        }
        if !name.starts_with("relay-") {
            continue;
        }
        // The command is one the relay's CLI accepts.
        let command: Vec<String> = spec["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let args = std::iter::once("relay".to_owned()).chain(
            command
                .iter()
                .map(|a| a.replace("/etc/relay/routes.toml", "routes.toml")),
        );
        sf_centercode_relay::cli::Cli::try_parse_from(args)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // Every RELAY__ variable is a real key with a valid value: load them as the relay would.
        let env = spec["environment"].as_mapping().unwrap();
        let mut vars = std::collections::HashMap::new();
        for (key, value) in env {
            let key = key.as_str().unwrap();
            let value = match value {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
            };
            match key {
                "RELAY_ENV" => assert!(["local", "test", "production"].contains(&value.as_str())),
                k if k.starts_with("RELAY__") => {
                    vars.insert(k.to_owned(), value);
                }
                other => panic!("{name}: unknown variable {other}"),
            }
        }
        let raw = ::config::Config::builder()
            .add_source(::config::File::from_str(
                DEFAULT_TOML,
                ::config::FileFormat::Toml,
            ))
            .add_source(::config::File::from_str(
                &routes,
                ::config::FileFormat::Toml,
            ))
            .add_source(
                ::config::Environment::with_prefix("RELAY")
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(vars)),
            )
            .build()
            .unwrap();
        let settings: Settings = raw
            .try_deserialize()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        settings
            .validate()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // The published port is the one the relay binds to.
        let port = settings.server.bind.rsplit(':').next().unwrap().to_owned();
        if let Some(ports) = spec["ports"].as_sequence() {
            assert!(
                ports
                    .iter()
                    .any(|p| p.as_str().unwrap().ends_with(&format!(":{port}"))),
                "{name}"
            );
        }
    }
}

#[test]
fn shipped_configuration_files_are_valid() {
    for file in [
        "config/local.toml",
        "config/test.toml",
        "config/production.toml",
        "deploy/routes.compose.toml",
    ] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        Settings::from_toml(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let dockerfile = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains("RELAY_ENV=production") && dockerfile.contains("/health/ready"));
}
