//! RabbitMQ plumbing every stage uses: connections to one node or a
//! cluster (`link`), the topology declared at every connection, and
//! publishing with confirms (`publisher` for one batch at a time,
//! `confirms` for many messages in flight on one channel). What flows
//! through it belongs to the stages: `ingest` publishes events, `apply`
//! consumes them, `broadcast` relays and reads the update stream.

pub mod confirms;
pub(crate) mod link;
pub mod publisher;
pub mod topology;
