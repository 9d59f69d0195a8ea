//! `relay`: parse the command line and run it.

use clap::Parser;
use sf_centercode_relay::cli::{self, Cli};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match cli::run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("relay: {e:#}");
            std::process::exit(1);
        }
    }
}
