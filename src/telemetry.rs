//! Tracing subscriber setup: JSON lines in production, pretty output locally. Logs carry ids,
//! never payloads, e-mails, API keys or session ids (handlers log with `skip_all`).

use crate::settings::{LogFormat, TelemetrySettings};
use tracing_subscriber::{fmt, EnvFilter};

/// Install the global subscriber; `RUST_LOG` overrides `telemetry.level`. Logs go to stderr,
/// keeping stdout for the relay's own messages (listening address, demo account).
pub fn init(settings: &TelemetrySettings) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    // A second init (tests, demo) keeps the first subscriber.
    let _ = result;
}
