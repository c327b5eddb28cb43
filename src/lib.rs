//! product-gateway: a product catalog whose every price and stock change
//! flows through RabbitMQ into PostgreSQL and out to browsers in real time.
#![forbid(unsafe_code)]

pub mod broker;
pub mod domain;
pub mod generator;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod metrics;
pub mod photos;
pub mod seed;
pub mod settings;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod turns;
pub mod update;
