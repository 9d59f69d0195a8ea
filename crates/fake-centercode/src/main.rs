//! Standalone fake Centercode server: `fake-centercode [CONFIG.json] [--bind ADDR]`.

use fake_centercode::{FakeCentercode, FakeConfig, LatencyConfig};

const USAGE: &str =
    "usage: fake-centercode [CONFIG.json] [--bind ADDR]   (default bind 127.0.0.1:9090)";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut bind = "127.0.0.1:9090".to_string();
    let mut config_path: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--bind" => bind = args.next().ok_or("--bind needs an address")?,
            other if other.starts_with("--bind=") => bind = other["--bind=".len()..].to_string(),
            other if other.starts_with('-') || config_path.is_some() => {
                return Err(format!("unexpected argument {other:?}\n{USAGE}").into())
            }
            other => config_path = Some(other.to_string()),
        }
    }
    let config = match &config_path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?
        }
        // Without a file: the demo data with the doc's realistic latency (25 ms + jitter, sync +200 ms).
        None => FakeConfig {
            latency: LatencyConfig::default(),
            ..FakeConfig::demo()
        },
    };
    let fake = FakeCentercode::start_on(config, &bind).await?;
    println!("fake Centercode listening on {}", fake.base_url());
    tokio::signal::ctrl_c().await?;
    fake.stop().await;
    Ok(())
}
