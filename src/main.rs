//! `relay`: parse the command line and run it.

use clap::Parser;
use sf_centercode_relay::cli::{self, Cli};

/// mimalloc: less CPU per request than glibc's malloc at the gateway's allocation rate.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("relay: {e:#}");
            1
        }
    };
    // Log lines are written in batches; the last ones must not be lost at exit.
    sf_centercode_relay::telemetry::flush();
    std::process::exit(code);
}
