//! `relay`: parse the command line and run it.

use clap::Parser;
use sf_centercode_relay::cli::{self, Cli};

/// mimalloc: less CPU per request than glibc's malloc at the gateway's allocation rate.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// One thread for the main runtime: the HTTP threads are actix's own, and what runs here (the
// delivery workers, lapin's futures and socket, supervisors) waits on I/O. A second runtime
// thread only added hand-offs on a 2-core machine: om1 x 32 on RabbitMQ went from a mean of
// 5,864 to 6,477 req/s in interleaved cells, deliveries/s unchanged.
#[tokio::main(flavor = "current_thread")]
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
