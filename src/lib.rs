//! Salesforce-to-Centercode relay.
//!
//! Salesforce sends Outbound Messages (SOAP) or Apex/Flow callouts (JSON); the gateway checks
//! them, stores them durably, and only then acknowledges. Workers translate each stored job
//! with the route's current mapping, call Centercode, retry transient failures with backoff,
//! and park what cannot be delivered where operators can replay it.
//!
//! # Workspace
//!
//! This package (library + the `relay` binary) is only what runs in production, plus
//! `relay demo` behind the default `demo` feature (a production build uses
//! `--no-default-features`). Beside it: `crates/fake-centercode` (the fake Centercode, a
//! library and a binary, used by the tests, the demo and the benchmark), room in `crates/`
//! for a fake Salesforce, `bench/` (the benchmark), and `examples/salesforce/` (sample
//! Salesforce messages, read by the demo and the tests).
//!
//! # Layout
//!
//! - [`settings`]: configuration layers, secrets, validation.
//! - [`domain`]: Salesforce ids and the parsed notification.
//! - [`inbound`]: the actix-web gateway (SOAP parser, callouts, health).
//! - [`queue`]: jobs; the embedded SQLite queue (group commit, leases, parking) and the
//!   RabbitMQ backend (confirms, TTL retry tiers, Redis dedupe).
//! - [`mapping`]: Salesforce fields → Centercode request.
//! - [`centercode`]: the reqwest client.
//! - [`retry`]: retry schedule, jitter and `Retry-After`.
//! - [`worker`]: lease, deliver, ack / retry / park; [`ordering`]: never an older version
//!   of a record after a newer one; [`ratelimit`]: a rate limit per destination shared by
//!   every worker.
//! - [`startup`]: wiring and shutdown. [`telemetry`]: logging. [`metrics`]: Prometheus.
//! - [`admin`]: the admin API (parked jobs, replay, pause, the ledger's jobs); [`console`]:
//!   the same in the browser at `/console`; [`control`]:
//!   this process's paused routes and circuit breakers; [`shared_control`]: pause state
//!   shared by every process.
//! - [`ledger`]: the delivery ledger (SQLite or PostgreSQL): every job's attempts and
//!   outcome, erasure receipts by subject key.
//! - [`cli`]: the `relay` subcommands ([`admin_cli`], [`ledger_cli`]); [`demo`]: `relay demo`.

pub mod admin;
pub mod admin_cli;
pub mod centercode;
pub mod cli;
pub mod console;
pub mod control;
#[cfg(feature = "demo")]
pub mod demo;
pub mod domain;
pub mod inbound;
pub mod ledger;
pub mod ledger_cli;
pub mod mapping;
pub mod metrics;
pub mod netaddr;
pub mod ordering;
pub mod queue;
pub mod ratelimit;
pub mod retry;
pub mod salesforce;
pub mod settings;
pub mod shared_control;
pub mod startup;
pub mod telemetry;
pub mod tls;
pub mod worker;
pub mod writeback;
