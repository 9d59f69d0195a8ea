//! Standalone fake Salesforce server:
//! `fake-salesforce [--config CONFIG.json] [--bind ADDR] [--latency-ms N]`.

use fake_salesforce::{FakeSalesforce, FakeSalesforceConfig};

const USAGE: &str =
    "usage: fake-salesforce [--config CONFIG.json] [--bind ADDR] [--latency-ms N]   \
                     (default bind 127.0.0.1:9191; without a config it trusts the test keys)";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut bind = "127.0.0.1:9191".to_string();
    let mut config_path: Option<String> = None;
    let mut latency_ms: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next());
        match name.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--bind" => bind = value().ok_or("--bind needs an address")?,
            "--config" => config_path = Some(value().ok_or("--config needs a file")?),
            "--latency-ms" => {
                let v = value().ok_or("--latency-ms needs a number")?;
                latency_ms = Some(v.parse().map_err(|e| format!("--latency-ms {v}: {e}"))?);
            }
            other => return Err(format!("unexpected argument {other:?}\n{USAGE}").into()),
        }
    }
    let mut config = match &config_path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?
        }
        None => FakeSalesforceConfig::demo(),
    };
    if let Some(ms) = latency_ms {
        config.latency_ms = ms;
    }
    let fake = FakeSalesforce::start_on(config, &bind).await?;
    println!("fake Salesforce listening on {}", fake.base_url());
    tokio::signal::ctrl_c().await?;
    fake.stop().await;
    Ok(())
}
