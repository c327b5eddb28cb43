//! The integration tests: one binary, one module per area. Each test starts
//! its own isolated instance of the service (see the `testkit` crate).

mod auth;
mod bad_input;
mod catalog;
mod contracts;
mod delivery_limits;
mod docs;
mod echo_page;
mod edge;
mod health;
mod hostile_http;
mod ingest;
mod outbox;
mod photos;
mod pipeline;
mod reads;
mod realtime;
mod recovery;
mod replica;
mod resume;
mod shared_turns;
mod slow_clients;
mod topology;
