//! docker-compose.yml and deploy/ cannot run here (no Docker engine): check that what they
//! name matches the relay's real configuration.

use serde_yaml::Value;
use sf_centercode_relay::settings::{Settings, DEFAULT_TOML};

fn repo(path: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn compose_environment_names_real_configuration_keys() {
    let compose: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo("docker-compose.yml")).unwrap())
            .unwrap();
    let defaults: toml::Value = toml::from_str(DEFAULT_TOML).unwrap();
    let services = compose["services"].as_mapping().unwrap();
    for name in ["relay", "fake-centercode", "rabbitmq"] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    let mut checked = 0;
    for (service, spec) in services {
        let service = service.as_str().unwrap_or_default();
        let Some(env) = spec["environment"].as_mapping() else {
            continue;
        };
        for (key, value) in env {
            let key = key.as_str().unwrap();
            if key == "RELAY_ENV" {
                assert!(["local", "test", "production"].contains(&value.as_str().unwrap()));
                continue;
            }
            let path = key
                .strip_prefix("RELAY__")
                .unwrap_or_else(|| panic!("{service}: unknown variable {key}"));
            let mut node = &defaults;
            for part in path.split("__") {
                node = node
                    .get(part.to_ascii_lowercase())
                    .unwrap_or_else(|| panic!("{service}: {key} names no configuration key"));
            }
            checked += 1;
        }
    }
    assert!(checked >= 4);
    // The published port is the one the relay binds to.
    let relay = &compose["services"]["relay"];
    let bind = relay["environment"]["RELAY__SERVER__BIND"]
        .as_str()
        .unwrap();
    let port = bind.rsplit(':').next().unwrap();
    assert!(relay["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p.as_str().unwrap().ends_with(&format!(":{port}"))));
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
