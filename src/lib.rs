//! product-gateway: a product catalog whose every price and stock change
//! flows through RabbitMQ into PostgreSQL and out to browsers in real time.
//!
//! # Layout
//!
//! The stages, in pipeline order; a module uses only those above it
//! (`make lint` checks it):
//!
//! - neutral ground: `domain` (products, events, versions), `wire` (the
//!   broker's message formats), `update` (an applied update and its client
//!   frames), `settings`, `metrics`, `trace` (trace context between hops),
//!   `turns` (per-address limits)
//! - infrastructure: `store` (PostgreSQL pools, schema, catalog reads),
//!   `broker` (RabbitMQ connections, topology, publishing with confirms)
//! - `ingest`: where changes enter (version issuing, the generator)
//! - `apply`: events into PostgreSQL, dead letters
//! - `broadcast`: outbox, relay, update stream readers
//! - `hub`: subscriptions, fan-out, sessions (snapshots, resumes)
//! - `photos`: the photo cache
//! - `http`: the edge (REST, WebSocket, SSE, admin, ingest API)
//! - `telemetry` (logs, the trace exporter), `seed`, `startup`: wiring it all
#![forbid(unsafe_code)]
// Public only what the binary, the tests and the bench use: everything
// else is the crate's own, and an item marked `pub` that nothing outside
// can reach is a warning.
#![warn(unreachable_pub)]

pub mod domain;
pub mod metrics;
pub mod settings;
pub mod telemetry;
pub mod trace;
pub(crate) mod turns;
pub mod update;
pub mod wire;

pub mod broker;
pub mod store;

pub(crate) mod apply;
pub mod broadcast;
pub mod hub;
pub mod ingest;
pub mod photos;

pub mod http;
pub mod seed;
pub mod startup;

/// What the unit tests share.
#[cfg(test)]
mod testing {
    /// Property tests: bounded, so they run in CI; no regression files
    /// (a failure prints its minimal case, which becomes a unit test).
    pub(crate) fn proptest_config() -> proptest::test_runner::Config {
        proptest::test_runner::Config {
            cases: 3000,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        }
    }
}
