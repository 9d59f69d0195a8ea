//! The fake Salesforce over real HTTP: one test binary, one module per surface.

mod control;
mod data;
mod helpers;
mod oauth;
