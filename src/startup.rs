//! Wiring: open the queue, bind the listener, run the gateway and the workers until stopped.

use crate::control::{CircuitBreaker, RouteControl};
use crate::inbound::{self, AppState};
use crate::metrics::Metrics;
use crate::queue::rabbitmq::RabbitConfig;
use crate::queue::{Queue, RabbitQueue, SqliteQueue};
use crate::settings::{QueueBackend, Settings};
use crate::worker::Worker;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What one `relay serve` process does; many processes of different roles can share one
/// RabbitMQ broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Role {
    /// Gateway and workers.
    #[default]
    All,
    /// Receive and store only.
    Gateway,
    /// Deliver only (plus health, metrics and admin).
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Gateway => "gateway",
            Role::Worker => "worker",
        }
    }
}

/// A built relay: listener bound, queue open, nothing running yet.
pub struct Application {
    port: u16,
    listener: TcpListener,
    /// `server.ops_bind`: /metrics and /admin/* (and health) when set.
    ops_listener: Option<TcpListener>,
    ops_port: Option<u16>,
    /// The ops listener's TLS: the server certificate, without requiring client ones (the
    /// scraper and operators are not Salesforce).
    ops_tls: Option<rustls::ServerConfig>,
    settings: Arc<Settings>,
    queue: Queue,
    metrics: Arc<Metrics>,
    control: Arc<RouteControl>,
    tls: Option<rustls::ServerConfig>,
    /// The Salesforce client and its Collections batcher, shared by this process's workers.
    salesforce: Option<Arc<crate::salesforce::batch::Batcher>>,
}

/// Open the configured queue backend: the SQLite file, or the RabbitMQ connection with its
/// topology (and Redis for dedupe when `queue.redis_url` is set).
pub async fn open_queue(settings: &Settings) -> anyhow::Result<Queue> {
    match settings.queue.backend {
        QueueBackend::Embedded => {
            let q = SqliteQueue::open(
                &settings.queue.path,
                Duration::from_secs(settings.queue.lease_secs),
                Duration::from_secs(settings.queue.dedupe_ttl_secs),
                Duration::from_micros(settings.queue.commit_delay_us),
            )
            .with_context(|| {
                format!(
                    "opening the embedded queue at {}",
                    settings.queue.path.display()
                )
            })?;
            q.set_ledger_enabled(settings.ledger.enabled);
            Ok(Queue::Embedded(q))
        }
        QueueBackend::Rabbitmq => {
            let config = RabbitConfig::from_settings(settings);
            let q = RabbitQueue::connect(config).await.with_context(|| {
                format!(
                    "opening the RabbitMQ queue (prefix `{}`; the URL is not shown)",
                    settings.queue.prefix
                )
            })?;
            match &settings.ledger.url {
                _ if !settings.ledger.enabled => {}
                Some(url) => {
                    use secrecy::ExposeSecret;
                    let ledger = crate::ledger::postgres::PgLedger::connect(
                        url.expose_secret(),
                        &settings.ledger.schema,
                    )
                    .await
                    .context("opening the ledger database (ledger.url; the URL is not shown)")?;
                    q.attach_ledger(ledger.with_store_notes(settings.ledger.record_on_store));
                }
                None => tracing::warn!("running without a delivery ledger: set ledger.url (PostgreSQL) to keep one on the RabbitMQ backend"),
            }
            Ok(Queue::Rabbit(q))
        }
    }
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let queue = open_queue(&settings).await?;
        Self::with_queue(settings, queue)
    }

    /// Build around an already open queue (the seam tests use).
    pub fn with_queue(mut settings: Settings, queue: Queue) -> anyhow::Result<Self> {
        if queue.keeps_ledger() {
            crate::ledger::ensure_subject_key(&mut settings)?;
        }
        let listener = TcpListener::bind(&settings.server.bind)
            .with_context(|| format!("binding {}", settings.server.bind))?;
        let port = listener.local_addr()?.port();
        // Built now so a bad certificate fails the start, not the first connection.
        let tls = settings
            .server
            .tls
            .as_ref()
            .map(crate::tls::server_config)
            .transpose()?;
        let ops_listener = settings
            .server
            .ops_bind
            .as_ref()
            .map(|bind| {
                TcpListener::bind(bind).with_context(|| format!("binding server.ops_bind {bind}"))
            })
            .transpose()?;
        let ops_port = ops_listener
            .as_ref()
            .map(|l| l.local_addr().map(|a| a.port()))
            .transpose()?;
        let ops_tls = match (&settings.server.tls, &ops_listener) {
            (Some(tls), Some(_)) => {
                Some(crate::tls::server_config(&crate::settings::TlsSettings {
                    client_ca: None,
                    ..tls.clone()
                })?)
            }
            _ => None,
        };
        for route in settings.routes.iter().filter(|r| r.insecure_open) {
            tracing::warn!(route = %route.name, "route is insecure_open: anyone who knows its URL can make the relay act on Centercode; set a path_token, allowed_ips or mutual TLS");
        }
        let metrics = Arc::new(Metrics::new());
        metrics.init_routes(&settings.routes);
        let control = Arc::new(RouteControl::new(CircuitBreaker::new(
            settings.worker.circuit_failure_threshold,
            Duration::from_secs_f64(settings.worker.circuit_cooldown_secs),
        )));
        // Built now so an unreadable private key fails the start, not the first delivery.
        let salesforce = crate::worker::salesforce_batcher(&settings, metrics.clone())
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(Self {
            salesforce,
            port,
            listener,
            ops_listener,
            ops_port,
            ops_tls,
            settings: Arc::new(settings),
            queue,
            metrics,
            control,
            tls,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The ops listener's port, when `server.ops_bind` is set.
    pub fn ops_port(&self) -> Option<u16> {
        self.ops_port
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn control(&self) -> Arc<RouteControl> {
        self.control.clone()
    }

    /// A worker over this application's queue, settings, metrics and controls (tests drive it by hand).
    pub fn worker(&self) -> Worker {
        Worker::with_observers(
            self.queue.clone(),
            self.settings.clone(),
            self.metrics.clone(),
            self.control.clone(),
        )
        .with_salesforce(self.salesforce.clone())
    }

    /// Serve and deliver until `stop` is cancelled, then drain: the gateway stops accepting,
    /// in-flight requests finish, workers finish or leave their jobs to be leased again.
    pub async fn run_until_stopped(
        self,
        stop: CancellationToken,
        run_workers: bool,
    ) -> anyhow::Result<()> {
        let role = if run_workers {
            Role::All
        } else {
            Role::Gateway
        };
        self.run_as(stop, role).await
    }

    /// Run one role: the gateway and workers (`all`), the gateway only, or workers only (which
    /// still serve health, metrics and the admin API on `server.bind`).
    pub async fn run_as(self, stop: CancellationToken, role: Role) -> anyhow::Result<()> {
        // Pause state is shared by every process and survives restarts: apply it before
        // serving, then keep in step with it.
        let shared = crate::shared_control::SharedControl::new(
            self.queue.clone(),
            self.control.clone(),
            self.settings
                .routes
                .iter()
                .map(|r| r.name.clone())
                .collect(),
            role.as_str(),
            role != Role::Gateway && self.settings.worker.enabled,
            Duration::from_millis(self.settings.control.refresh_ms),
        );
        if let Err(e) = shared.start().await {
            tracing::warn!(error = %e, "could not read the shared pause state at start; retrying every control.refresh_ms");
        }
        if !self.queue.shares_control_state() {
            tracing::warn!("pause state is kept in this process only (RabbitMQ without queue.redis_url): pausing through one process does not reach the others");
        }
        let control_task = tokio::spawn(shared.run(stop.clone()));
        let worker = self.worker();
        let state = web::Data::new(AppState {
            settings: self.settings.clone(),
            queue: self.queue.clone(),
            metrics: self.metrics.clone(),
            control: self.control.clone(),
            networks: Arc::new(inbound::Networks::from_settings(&self.settings)),
            request_slots: Arc::new(tokio::sync::Semaphore::new(
                self.settings.server.max_concurrent_requests,
            )),
            probes: Arc::new(inbound::health::ProbeCache::new(Duration::from_millis(
                self.settings.server.probe_cache_ms,
            ))),
            console: Arc::new(crate::console::Console::new()),
        });
        let server_settings = &self.settings.server;
        let workers = match server_settings.workers {
            0 => default_http_threads(),
            n => n,
        };
        // With an ops listener, /metrics and /admin/* are served only there; the main listener
        // keeps what Salesforce calls (nothing, for a worker) and health.
        let separate_ops = self.ops_listener.is_some();
        let main_routes: fn(&mut web::ServiceConfig) = match (role, separate_ops) {
            (Role::Worker, false) => inbound::configure_ops,
            (Role::Worker, true) => inbound::configure_health_only,
            (_, false) => inbound::configure,
            (_, true) => inbound::configure_inbound,
        };
        let main_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(main_state.clone())
                .wrap_fn(inbound::request_id_middleware)
                .configure(main_routes)
        })
        .workers(workers)
        .max_connections(server_settings.max_connections.div_ceil(workers))
        .client_request_timeout(Duration::from_millis(server_settings.header_timeout_ms))
        .shutdown_timeout(server_settings.shutdown_grace_secs)
        .disable_signals();
        let ops_tls = self.ops_tls.clone();
        let server = match self.tls {
            Some(config) => server.listen_rustls_0_23(self.listener, config)?,
            None => server.listen(self.listener)?,
        }
        .run();
        let handle = server.handle();
        let server_task = tokio::spawn(server);
        let ops = match self.ops_listener {
            Some(listener) => {
                let ops_state = state.clone();
                let ops = HttpServer::new(move || {
                    App::new()
                        .app_data(ops_state.clone())
                        .wrap_fn(inbound::request_id_middleware)
                        .configure(inbound::configure_ops)
                })
                .workers(1)
                .max_connections(256)
                .client_request_timeout(Duration::from_millis(server_settings.header_timeout_ms))
                .shutdown_timeout(server_settings.shutdown_grace_secs)
                .disable_signals();
                let ops = match ops_tls {
                    Some(config) => ops.listen_rustls_0_23(listener, config)?,
                    None => ops.listen(listener)?,
                }
                .run();
                Some((ops.handle(), tokio::spawn(ops)))
            }
            None => None,
        };
        let worker_task = if role != Role::Gateway && self.settings.worker.enabled {
            Some(tokio::spawn(worker.run_until_stopped(stop.clone())))
        } else {
            None
        };
        let monitor = tokio::spawn(watch_backlog(
            self.queue.clone(),
            self.settings.queue.depth_warning,
            stop.clone(),
        ));
        let console_sampler = tokio::spawn(crate::console::sample_until_stopped(
            state.get_ref().clone(),
            stop.clone(),
        ));
        // Every role, gateways included: the dedupe keys are written by gateways.
        let housekeeping = tokio::spawn(housekeeping(
            self.queue.clone(),
            self.settings.ledger.retention_days,
            self.metrics.clone(),
            stop.clone(),
        ));
        stop.cancelled().await;
        monitor.abort();
        console_sampler.abort();
        housekeeping.abort();
        control_task.abort();
        tracing::info!("stopping: no new requests; finishing in-flight work");
        handle.stop(true).await;
        let _ = server_task.await;
        if let Some((ops_handle, ops_task)) = ops {
            ops_handle.stop(true).await;
            let _ = ops_task.await;
        }
        if let Some(w) = worker_task {
            let _ = w.await;
        }
        self.queue.close();
        Ok(())
    }
}

/// Log when the backlog crosses `queue.depth_warning` (and when it recovers). The gateway keeps
/// accepting either way; the condition is also exported as `relay_queue_backlog_high`.
async fn watch_backlog(queue: Queue, threshold: u64, stop: CancellationToken) {
    let mut high = false;
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let Ok(stats) = queue.stats().await else {
            continue;
        };
        let waiting = stats.ready + stats.retrying;
        if waiting > threshold && !high {
            tracing::warn!(waiting, threshold, "queue backlog above queue.depth_warning; still accepting (Centercode slower than Salesforce?)");
        } else if waiting <= threshold && high {
            tracing::info!(
                waiting,
                threshold,
                "queue backlog back under queue.depth_warning"
            );
        }
        high = waiting > threshold;
    }
}

/// Every minute, in every process: apply the ledger's retention (and report its oldest
/// entry's age), then forget expired dedupe keys in proportion to what expired: a full batch
/// is followed at once by the next, so a burst of keys (a busy day of Salesforce traffic) is
/// gone within seconds of expiring instead of outgrowing a fixed rate.
async fn housekeeping(
    queue: Queue,
    ledger_retention_days: u64,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(DEDUPE_PURGE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        // Ledger retention, then the WAL folded back and truncated: rows deleted since (the
        // payloads of delivered jobs) do not stay readable in it.
        let before = crate::queue::now_ms() - (ledger_retention_days * 86_400_000) as i64;
        if let Err(e) = queue.order_forget_old().await {
            tracing::warn!(error = %e, "could not forget old per-record order state");
        }
        if queue.keeps_ledger() {
            if let Err(e) = queue.ledger_purge_before(before).await {
                tracing::warn!(error = %e, "could not apply the ledger retention");
            }
            match queue.ledger_oldest_ms().await {
                Ok(oldest) => {
                    let age =
                        oldest.map_or(0.0, |t| (crate::queue::now_ms() - t).max(0) as f64 / 1000.0);
                    metrics.set("relay_ledger_oldest_entry_age_seconds", &[], age);
                }
                Err(e) => tracing::warn!(error = %e, "could not read the ledger's oldest entry"),
            }
        }
        loop {
            match queue.purge_expired_dedupe().await {
                Ok(n) if n >= crate::queue::DEDUPE_PURGE_BATCH => tokio::task::yield_now().await,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "could not purge expired dedupe keys");
                    break;
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }
}

/// How often each process looks for expired dedupe keys (the first look is at start).
const DEDUPE_PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// HTTP threads when `server.workers = 0`: one per two cores, at least one. A request spends
/// most of its time waiting on other threads (the SQLite writer, lapin's I/O thread, Redis,
/// the log thread) and on the broker or the disk, which need the other cores. On a 2-core
/// machine, in interleaved bench cells, one HTTP thread took more than two for every message
/// size on the embedded backend (om1 x 32: 12,318-12,812 against 10,443-10,748 req/s) and for
/// single notifications on RabbitMQ (6,625-6,926 against 6,004-6,479); 10-notification
/// messages on RabbitMQ went the other way (13.5-17.2k against 15.3-18.7k notifications/s).
/// `server.workers` sets it explicitly.
pub fn default_http_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}
