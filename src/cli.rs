//! The `relay` command line: serve (default), demo, check-config and preview.

use crate::inbound::{callout, salesforce, soap, webhook};
use crate::mapping;
use crate::queue::NewJob;
use crate::settings::{RouteKind, Settings};
use crate::startup::Application;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Salesforce → Centercode relay.
#[derive(Debug, Parser)]
#[command(name = "relay", version, about)]
pub struct Cli {
    /// A TOML file applied after config/default.toml and config/$RELAY_ENV.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway and the delivery workers (the default).
    Serve {
        /// `all`, `gateway` (receive and store only) or `worker` (deliver only).
        #[arg(long, value_enum, default_value_t = crate::startup::Role::All)]
        role: crate::startup::Role,
    },
    /// Run a self-contained demo: the relay on a temporary queue and a fake Centercode.
    #[cfg(feature = "demo")]
    Demo {
        /// Exit after the scripted part instead of serving on.
        #[arg(long)]
        no_serve: bool,
    },
    /// Load and validate the configuration, then print the routes it defines.
    CheckConfig,
    /// Parked jobs: list, show, replay, purge (through the admin API).
    #[command(after_help = crate::admin_cli::EXIT_CODES_HELP)]
    Parked {
        #[command(flatten)]
        conn: crate::admin_cli::Connection,
        #[command(subcommand)]
        command: crate::admin_cli::ParkedCommand,
    },
    /// Routes: list, pause, resume (through the admin API).
    #[command(after_help = crate::admin_cli::ROUTES_EXIT_CODES_HELP)]
    Routes {
        #[command(flatten)]
        conn: crate::admin_cli::Connection,
        #[command(subcommand)]
        command: crate::admin_cli::RoutesCommand,
    },
    /// What became of a record, notification, job or person: every attempt and outcome,
    /// newest job first (from the delivery ledger, through the admin API).
    #[command(after_help = crate::ledger_cli::LEDGER_EXIT_CODES_HELP)]
    Trace {
        #[command(flatten)]
        conn: crate::admin_cli::Connection,
        #[command(flatten)]
        args: crate::ledger_cli::TraceArgs,
    },
    /// The delivery ledger: what is undelivered, and erasure receipts to export.
    #[command(after_help = crate::ledger_cli::LEDGER_EXIT_CODES_HELP)]
    Ledger {
        #[command(flatten)]
        conn: crate::admin_cli::Connection,
        #[command(subcommand)]
        command: crate::ledger_cli::LedgerCommand,
    },
    /// Jobs in the ledger: resend a delivered one whose payload is kept.
    #[command(after_help = crate::ledger_cli::LEDGER_EXIT_CODES_HELP)]
    Jobs {
        #[command(flatten)]
        conn: crate::admin_cli::Connection,
        #[command(subcommand)]
        command: crate::ledger_cli::JobsCommand,
    },
    /// Show the exact Centercode request(s) a Salesforce message would produce.
    Preview {
        /// The route to preview with.
        #[arg(long)]
        route: String,
        /// An Outbound Message (XML) or a callout body (JSON).
        file: PathBuf,
    },
}

/// Run the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let default = Command::Serve {
        role: crate::startup::Role::All,
    };
    match cli.command.unwrap_or(default) {
        Command::Serve { role } => serve(Settings::load(cli.config.as_deref())?, role).await,
        #[cfg(feature = "demo")]
        Command::Demo { no_serve } => crate::demo::run(!no_serve).await,
        Command::Parked { conn, command } => crate::admin_cli::parked(&conn, command).await,
        Command::Routes { conn, command } => crate::admin_cli::routes(&conn, command).await,
        Command::Trace { conn, args } => {
            Ok(crate::ledger_cli::trace(&conn, args, cli.config.as_deref()).await)
        }
        Command::Ledger { conn, command } => Ok(crate::ledger_cli::ledger(&conn, command).await),
        Command::Jobs { conn, command } => Ok(crate::ledger_cli::jobs(&conn, command).await),
        Command::CheckConfig => match Settings::load(cli.config.as_deref()) {
            Ok(settings) => {
                print!("{}", describe(&settings));
                Ok(0)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(2)
            }
        },
        Command::Preview { route, file } => {
            let settings = Settings::load(cli.config.as_deref())?;
            let bytes = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
            match preview(&settings, &route, &bytes) {
                Ok(text) => {
                    print!("{text}");
                    Ok(0)
                }
                Err(text) => {
                    eprintln!("{text}");
                    Ok(1)
                }
            }
        }
    }
}

async fn serve(settings: Settings, role: crate::startup::Role) -> anyhow::Result<i32> {
    crate::telemetry::init(&settings.telemetry);
    let scheme = if settings.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let app = Application::build(settings).await?;
    // The signal handlers exist before anyone learns the address: a SIGTERM sent as soon as
    // the listening line is read drains cleanly instead of killing the process.
    let signals = ShutdownSignals::install();
    // Tests and scripts read this line to find the port when binding port 0.
    println!("relay listening on {scheme}://127.0.0.1:{}", app.port());
    if let Some(ops) = app.ops_port() {
        println!("relay ops listening on {scheme}://127.0.0.1:{ops}");
    } else if matches!(
        crate::settings::Environment::from_env(),
        Ok(crate::settings::Environment::Production)
    ) {
        tracing::warn!("server.ops_bind is unset: /metrics and /admin/* share the listener Salesforce calls; set server.ops_bind in production");
    }
    let stop = CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        signals.received().await;
        signal_stop.cancel();
    });
    app.run_as(stop, role).await?;
    Ok(0)
}

/// SIGTERM and Ctrl-C, registered when created.
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
                int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn received(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What `check-config` prints: one block per route.
pub fn describe(settings: &Settings) -> String {
    let mut out = format!(
        "configuration OK: queue {:?} at {}, {} worker(s), {} route(s)\n",
        settings.queue.backend,
        settings.queue.path.display(),
        settings.worker.concurrency,
        settings.routes.len()
    );
    if let Some(sf) = &settings.salesforce {
        let flow = if sf.client_secret.is_some() {
            "client credentials"
        } else {
            "JWT bearer"
        };
        out.push_str(&format!(
            "salesforce: {} (API {}, {flow} as client {}), writes stop at {}% of the daily API allocation\n",
            sf.login_url,
            sf.api_version,
            sf.client_id,
            sf.max_api_share * 100.0
        ));
    }
    for r in &settings.routes {
        let inbound = match r.kind {
            RouteKind::OutboundMessage => format!(
                "POST /salesforce/outbound/{} (sObject {})",
                r.name,
                r.sobject.as_deref().unwrap_or("?")
            ),
            RouteKind::Callout => format!("POST /salesforce/callout/{}", r.name),
            RouteKind::CentercodeWebhook => format!("POST /centercode/webhook/{}", r.name),
        };
        let target = if r.action.to_salesforce() {
            format!(
                "{} by {} = {}",
                r.sobject.as_deref().unwrap_or("?"),
                r.external_id_field.as_deref().unwrap_or("?"),
                r.external_id.as_deref().unwrap_or("?")
            )
        } else {
            r.url.clone()
        };
        out.push_str(&format!(
            "- {}: {inbound} -> {} {target}\n",
            r.name,
            r.action.as_str(),
        ));
        if let Some(wb) = &r.status_writeback {
            out.push_str(&format!(
                "    status written back to Salesforce: {}.{}\n",
                wb.sobject
                    .as_deref()
                    .or(r.sobject.as_deref())
                    .unwrap_or("?"),
                wb.status_field
            ));
        }
        if !r.org_ids.is_empty() {
            out.push_str(&format!("    orgs: {}\n", r.org_ids.join(", ")));
        }
        if let Some(e) = &r.email_field {
            out.push_str(&format!("    email from: {e}\n"));
        }
        for (key, mapping) in &r.fields {
            let rule = mapping.rule();
            let from = match (&rule.from, &rule.value) {
                (_, Some(v)) => format!("constant {v}"),
                (Some(f), None) => f.clone(),
                _ => String::new(),
            };
            let mut notes = Vec::new();
            if rule.required {
                notes.push("required".to_owned());
            }
            if let Some(m) = rule.max_len {
                notes.push(format!("max_len {m}"));
            }
            if rule.map.is_some() {
                notes.push("mapped".to_owned());
            }
            if let Some(d) = &rule.default {
                notes.push(format!("default {d}"));
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join(", "))
            };
            out.push_str(&format!("    {key} <- {from}{notes}\n"));
        }
        if r.api_key.is_some() {
            out.push_str("    api_key: route-specific (set)\n");
        }
    }
    if secrecy::ExposeSecret::expose_secret(&settings.centercode.api_key).is_empty()
        && settings.routes.iter().any(|r| r.api_key.is_none())
    {
        out.push_str("warning: centercode.api_key is empty; set RELAY__CENTERCODE__API_KEY\n");
    }
    out
}

/// Render, for each notification of `input`, the request the worker would send now.
/// Errors describe why the gateway would refuse the message.
pub fn preview(settings: &Settings, route_name: &str, input: &[u8]) -> Result<String, String> {
    let route = settings
        .route(route_name)
        .ok_or_else(|| format!("no route named `{route_name}` in the configuration"))?;
    let jobs: Vec<NewJob> = match route.kind {
        RouteKind::OutboundMessage => {
            let message = soap::parse_outbound_message(input)
                .map_err(|e| format!("the gateway would answer 400: {e}"))?;
            salesforce::check_message(route, &message)
                .map_err(|e| format!("the gateway would refuse this message: {e}"))?;
            salesforce::jobs_from_message(route, &message)
        }
        RouteKind::Callout => {
            let body = callout::parse_body(input)
                .map_err(|e| format!("the gateway would answer 400: {e}"))?;
            vec![callout::job_from_callout(route, None, body, None)]
        }
        RouteKind::CentercodeWebhook => {
            let body = callout::parse_body(input)
                .map_err(|e| format!("the gateway would answer 400: {e}"))?;
            let job = webhook::job_from_webhook(route, body)
                .map_err(|e| format!("the gateway would answer 400: {e}"))?;
            vec![job]
        }
    };
    let mut out = String::new();
    for job in &jobs {
        let label = match route.kind {
            RouteKind::CentercodeWebhook => "webhook body",
            _ => job.notification_id.as_deref().unwrap_or("callout body"),
        };
        out.push_str(&format!(
            "# {label} (route {}, action {})\n",
            route.name,
            route.action.as_str()
        ));
        let rendered = if route.action.to_salesforce() {
            let api_version = settings.salesforce.as_ref().map(|s| s.api_version.as_str());
            mapping::to_salesforce(&job.job, route)
                .map(|upsert| upsert.render(api_version.unwrap_or_default()))
        } else {
            mapping::to_centercode(&job.job, route).map(|request| request.render_masked())
        };
        match rendered {
            Ok(text) => out.push_str(&text),
            Err(e) => out.push_str(&format!("would be parked: {e}\n")),
        }
        out.push('\n');
    }
    Ok(out)
}
