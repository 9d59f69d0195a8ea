//! Tracing subscriber setup: JSON lines in production, pretty output locally. Logs carry ids,
//! never payloads, e-mails, API keys or session ids (handlers log with `skip_all`).

use crate::settings::{LogFormat, TelemetrySettings};
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;
use tracing_subscriber::{fmt, EnvFilter};

/// How long the log thread lets lines gather before writing them out.
const LINGER: Duration = Duration::from_millis(2);
/// Lines waiting beyond this make loggers wait: memory stays bounded when stderr is slow.
const MAX_PENDING: usize = 1 << 20;

static STDERR_SINK: OnceLock<Arc<LogSink>> = OnceLock::new();

/// Install the global subscriber; `RUST_LOG` overrides `telemetry.level`. Logs go to stderr,
/// keeping stdout for the relay's own messages (listening address, demo account).
pub fn init(settings: &TelemetrySettings) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.level.clone());
    let filter = filter_for(&spec);
    let sink = STDERR_SINK
        .get_or_init(|| LogSink::start(std::io::stderr()))
        .clone();
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(move || SinkWriter(sink.clone()));
    let result = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        // Colour only for a person at a terminal: escape codes would litter a log file,
        // journald or a collector reading a pipe. NO_COLOR (no-color.org) turns it off too.
        LogFormat::Pretty => builder
            .compact()
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stderr())
                    && !std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
            )
            .try_init(),
    };
    // A second init (tests, demo) keeps the first subscriber.
    let _ = result;
}

/// Targets whose DEBUG/TRACE output carries message bodies (lapin logs AMQP frames, payloads
/// included). They are held at `info` or quieter, whatever `telemetry.level` or `RUST_LOG` say.
const BODY_LOGGING_TARGETS: [&str; 3] = ["lapin", "amq_protocol", "pinky_swear"];

/// The filter for `spec` (a `tracing` filter), with [`BODY_LOGGING_TARGETS`] capped at `info`
/// (or at the global level when that is quieter). A spec that does not parse falls back to
/// `info` rather than to no logging.
pub fn filter_for(spec: &str) -> EnvFilter {
    let mut global = "info";
    let kept: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| {
            let target = d.split(['=', '[']).next().unwrap_or_default();
            if !d.contains('=') && !d.contains('[') {
                global = match target.to_ascii_lowercase().as_str() {
                    "error" => "error",
                    "warn" => "warn",
                    "off" => "off",
                    _ => "info",
                };
                return true;
            }
            !BODY_LOGGING_TARGETS
                .iter()
                .any(|t| target == *t || target.starts_with(&format!("{t}::")))
        })
        .collect();
    let mut filter = EnvFilter::try_new(kept.join(",")).unwrap_or_else(|_| EnvFilter::new("info"));
    for target in BODY_LOGGING_TARGETS {
        if let Ok(directive) = format!("{target}={global}").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Write out every log line still waiting; call before the process exits.
pub fn flush() {
    if let Some(sink) = STDERR_SINK.get() {
        sink.flush();
    }
}

/// Log lines gathered in memory and written by one thread, many lines per `write`. At load
/// the relay logs a line or two per request; one `write(2)` per line (and a wake-up of
/// whatever reads the pipe) was a visible share of a request's CPU. A line reaches the
/// output at most [`LINGER`] late; a crash can lose that much.
pub struct LogSink {
    state: Mutex<Pending>,
    /// The log thread waits here for a first line.
    lines: Condvar,
    /// Loggers wait here while [`MAX_PENDING`] bytes are pending.
    room: Condvar,
    out: Mutex<Box<dyn Write + Send>>,
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// The log thread is asleep on `lines` (so a new line must wake it).
    asleep: bool,
    full: bool,
}

impl LogSink {
    /// A sink writing to `out` from its own thread.
    pub fn start(out: impl Write + Send + 'static) -> Arc<Self> {
        let sink = Arc::new(LogSink {
            state: Mutex::new(Pending::default()),
            lines: Condvar::new(),
            room: Condvar::new(),
            out: Mutex::new(Box::new(out)),
        });
        let weak = Arc::downgrade(&sink);
        std::thread::Builder::new()
            .name("relay-log".into())
            .spawn(move || {
                while let Some(sink) = weak.upgrade() {
                    if !sink.wait_for_lines() {
                        break;
                    }
                    drop(sink);
                    std::thread::sleep(LINGER);
                    match weak.upgrade() {
                        Some(sink) => sink.flush(),
                        None => break,
                    }
                }
            })
            .expect("spawning the log thread");
        sink
    }

    /// Sleep until a line is pending; false once the sink is dropped (never, in practice,
    /// as the subscriber holds it; the check keeps a test's sink from leaking a thread).
    fn wait_for_lines(self: &Arc<Self>) -> bool {
        let mut state = self.state.lock().expect("log lock");
        while state.buf.is_empty() {
            state.asleep = true;
            let (s, timeout) = self
                .lines
                .wait_timeout(state, Duration::from_secs(1))
                .expect("log lock");
            state = s;
            state.asleep = false;
            // Wake now and then to notice a dropped sink.
            if timeout.timed_out() && Arc::strong_count(self) == 1 {
                return false;
            }
        }
        true
    }

    fn push(&self, line: &[u8]) {
        let mut state = self.state.lock().expect("log lock");
        while state.buf.len() >= MAX_PENDING {
            state.full = true;
            state = self.room.wait(state).expect("log lock");
        }
        state.buf.extend_from_slice(line);
        if state.asleep {
            state.asleep = false;
            self.lines.notify_one();
        }
    }

    /// Write out everything pending now, in order.
    pub fn flush(&self) {
        // Holding `out` across the swap keeps two flushes from reordering their batches.
        let mut out = self.out.lock().expect("log output lock");
        let batch = {
            let mut state = self.state.lock().expect("log lock");
            if state.full {
                state.full = false;
                self.room.notify_all();
            }
            std::mem::take(&mut state.buf)
        };
        if !batch.is_empty() {
            // Nowhere to report a failed log write; the lines are dropped.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
        }
    }
}

/// What the subscriber writes one event through.
pub struct SinkWriter(Arc<LogSink>);

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>, Arc<Mutex<usize>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            *self.1.lock().unwrap() += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_from_many_threads_come_out_whole_in_order_and_batched() {
        let out = Shared::default();
        let sink = LogSink::start(out.clone());
        std::thread::scope(|s| {
            for t in 0..4 {
                let sink = sink.clone();
                s.spawn(move || {
                    for i in 0..2_000 {
                        SinkWriter(sink.clone())
                            .write_all(format!("thread {t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                });
            }
        });
        sink.flush();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8_000);
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..2_000).collect::<Vec<_>>(), "thread {t}");
        }
        let writes = *out.1.lock().unwrap();
        assert!(writes < 8_000 / 10, "{writes} writes for 8,000 lines");
    }

    #[test]
    fn the_log_thread_writes_a_lone_line_without_a_flush() {
        let out = Shared::default();
        let sink = LogSink::start(out.clone());
        SinkWriter(sink.clone()).write_all(b"hello\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.0.lock().unwrap().as_slice() != b"hello\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "the line never came out"
            );
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod filter_tests {
    use super::filter_for;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(spec: &str) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter_for(spec))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "lapin::channel", "frame body PAYLOAD-TRACE");
            tracing::debug!(target: "amq_protocol::frame", "frame PAYLOAD-DEBUG");
            tracing::info!(target: "lapin::connection", "connection INFO-LINE");
            tracing::trace!(target: "sf_centercode_relay::worker", "relay TRACE-LINE");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn lapin_never_logs_below_info_whatever_the_level_says() {
        for spec in [
            "trace",
            "lapin=trace,trace",
            "trace,lapin::channel=trace,amq_protocol=debug",
        ] {
            let text = logged(spec);
            assert!(!text.contains("PAYLOAD"), "{spec}: {text}");
            assert!(text.contains("INFO-LINE"), "{spec}: {text}");
            assert!(
                text.contains("TRACE-LINE"),
                "{spec}: the relay's own trace stays on"
            );
        }
        // A quieter global level stays quieter for lapin too.
        assert!(!logged("warn").contains("INFO-LINE"));
    }
}
