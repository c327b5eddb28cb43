//! RabbitMQ: connections, topology, the event wire format, publishing with
//! confirms, the apply consumer, dead letters and the update stream.

pub mod consumer;
pub mod dead_letters;
pub mod link;
pub mod message;
pub mod outbox;
pub mod publisher;
pub mod stream;
pub mod topology;
