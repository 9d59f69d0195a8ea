//! Integration tests: the real gateway on port 0, the embedded queue in a temp dir, and the
//! fake Centercode over real HTTP.

mod admin;
mod admin_cli;
mod alerts;
mod amqps;
mod both_backends;
mod callout;
mod cli;
mod console;
mod crash;
mod delivery;
mod deploy;
mod disk_full;
mod docs;
mod helpers;
mod hostile;
mod inbound;
mod ledger;
mod ledger_conformance;
mod openapi;
mod ops;
mod ordering;
mod queue_conformance;
mod rabbitmq;
mod rate_limits;
mod salesforce;
mod scale_out;
mod secrets;
mod security;
mod services;
mod tls;
mod webhook;
