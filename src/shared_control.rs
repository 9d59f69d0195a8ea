//! Pause state shared by every relay process. Each route's pause is a record in the queue's
//! own store (the SQLite file; Redis on RabbitMQ), written by whoever pauses or resumes (the
//! admin API, or a worker after Centercode answers 401/403). Every process reads the records
//! each `control.refresh_ms` and applies them, so a pause through one gateway stops the
//! workers of every process; each process also reports what it believes, for `/admin/routes`.

use crate::control::RouteControl;
use crate::queue::{now_ms, Queue, QueueError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The named map holding one [`PauseRecord`] per route.
const PAUSE_MAP: &str = "control-pause";
/// The named map holding one [`ProcessReport`] per live process.
const PROCESS_MAP: &str = "control-processes";
/// A process that has not reported for this many refreshes is no longer listed.
const LIVE_REFRESHES: i64 = 5;
/// Reports older than this are deleted (a process that stopped for good).
const FORGET_AFTER_MS: i64 = 3_600_000;
/// How often a worker process looks for held jobs of routes no longer paused (a resume whose
/// own move of the held jobs was interrupted).
const UNHOLD_SWEEP_REFRESHES: u32 = 30;

/// The shared, authoritative pause state of one route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRecord {
    pub paused: bool,
    pub changed_at_ms: i64,
    /// `admin`, or `auto` with the reason (Centercode refused the key).
    pub changed_by: String,
}

/// What one process believes about one route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Belief {
    pub paused: bool,
    pub since_ms: i64,
}

/// One live process and its beliefs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessReport {
    pub process_id: String,
    pub role: String,
    pub seen_at_ms: i64,
    pub beliefs: BTreeMap<String, Belief>,
}

/// This process's id: host name and process id (stable for the life of the process).
pub fn process_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .unwrap_or_else(|| "host".into());
        format!("{host}:{}", std::process::id())
    })
}

/// Pause or resume `route` for every process: the shared record first (an error means
/// nothing changed anywhere), then this process at once.
pub async fn set_paused(
    queue: &Queue,
    control: &RouteControl,
    route: &str,
    paused: bool,
    changed_by: &str,
) -> Result<(), QueueError> {
    let record = PauseRecord {
        paused,
        changed_at_ms: now_ms(),
        changed_by: changed_by.to_owned(),
    };
    let value = serde_json::to_string(&record).expect("a record serializes");
    queue.map_set(PAUSE_MAP, route, &value).await?;
    control.set_paused(route, paused);
    Ok(())
}

/// Every route's shared pause record (routes never paused have none).
pub async fn records(queue: &Queue) -> Result<BTreeMap<String, PauseRecord>, QueueError> {
    Ok(queue
        .map_get_all(PAUSE_MAP)
        .await?
        .into_iter()
        .filter_map(|(route, v)| Some((route, serde_json::from_str(&v).ok()?)))
        .collect())
}

/// Processes that reported within the last few refreshes, by process id.
pub async fn live_processes(
    queue: &Queue,
    refresh: Duration,
) -> Result<Vec<ProcessReport>, QueueError> {
    let now = now_ms();
    let live_ms = (refresh.as_millis() as i64 * LIVE_REFRESHES).max(3_000);
    let mut live = Vec::new();
    let mut forgotten = Vec::new();
    for (id, v) in queue.map_get_all(PROCESS_MAP).await? {
        match serde_json::from_str::<ProcessReport>(&v) {
            Ok(r) if now - r.seen_at_ms <= live_ms => live.push(r),
            Ok(r) if now - r.seen_at_ms > FORGET_AFTER_MS => forgotten.push(id),
            Ok(_) => {}
            Err(_) => forgotten.push(id),
        }
    }
    queue.map_remove(PROCESS_MAP, &forgotten).await?;
    Ok(live)
}

/// Keeps this process in step with the shared records.
pub struct SharedControl {
    queue: Queue,
    control: Arc<RouteControl>,
    routes: Vec<String>,
    role: &'static str,
    delivers: bool,
    refresh: Duration,
}

impl SharedControl {
    pub fn new(
        queue: Queue,
        control: Arc<RouteControl>,
        routes: Vec<String>,
        role: &'static str,
        delivers: bool,
        refresh: Duration,
    ) -> Self {
        Self {
            queue,
            control,
            routes,
            role,
            delivers,
            refresh,
        }
    }

    /// Before serving: move pause state kept by an older relay (one list) into records,
    /// then apply the records.
    pub async fn start(&self) -> Result<(), QueueError> {
        if records(&self.queue).await?.is_empty() {
            for route in self.queue.paused_routes().await.unwrap_or_default() {
                set_paused(
                    &self.queue,
                    &self.control,
                    &route,
                    true,
                    "admin (kept from an earlier version)",
                )
                .await?;
            }
        }
        self.sync_once().await.map(|_| ())
    }

    /// Read the records, apply them here, report what this process now believes. Returns
    /// the routes this process saw resumed.
    pub async fn sync_once(&self) -> Result<Vec<String>, QueueError> {
        let read_at = now_ms();
        let records = records(&self.queue).await?;
        let mut resumed = Vec::new();
        for route in &self.routes {
            // A change made here while the records were being read (an admin call, an
            // automatic pause) is newer than what was read: kept, not the stale record.
            let paused = records.get(route).is_some_and(|r| r.paused);
            if self.control.apply_shared(route, paused, read_at) {
                tracing::info!(route = %route, paused, "route pause state changed (shared)");
                if !paused {
                    resumed.push(route.clone());
                }
            }
        }
        let report = ProcessReport {
            process_id: process_id().to_owned(),
            role: self.role.to_owned(),
            seen_at_ms: now_ms(),
            beliefs: self.control.beliefs(&self.routes),
        };
        let value = serde_json::to_string(&report).expect("a report serializes");
        self.queue
            .map_set(PROCESS_MAP, process_id(), &value)
            .await?;
        Ok(resumed)
    }

    /// Refresh until `stop`. A worker process also moves the held jobs of routes it sees
    /// resumed back to work, and now and then sweeps for any left behind.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            ticks = ticks.wrapping_add(1);
            match self.sync_once().await {
                Ok(resumed) => {
                    if failing {
                        tracing::info!("shared route control state readable again");
                        failing = false;
                    }
                    if self.delivers {
                        self.unhold(resumed, ticks % UNHOLD_SWEEP_REFRESHES == 0)
                            .await;
                    }
                }
                Err(e) if !failing => {
                    // Keep what this process believes; say so once, not every second.
                    tracing::warn!(error = %e, "could not read the shared route control state; keeping the last known pause state");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }

    async fn unhold(&self, resumed: Vec<String>, sweep: bool) {
        for route in &resumed {
            match self.queue.unhold(Some(route), &[]).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(route = %route, moved = n, "held jobs of a resumed route moved back to work")
                }
                Err(e) => {
                    tracing::warn!(route = %route, error = %e, "could not move held jobs back; the periodic sweep will")
                }
            }
        }
        if sweep {
            if let Err(e) = self.queue.unhold(None, &self.control.paused()).await {
                tracing::warn!(error = %e, "could not sweep held jobs of resumed routes");
            }
        }
    }
}
