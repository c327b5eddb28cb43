//! Tests that restart the shared services (RabbitMQ, PostgreSQL, Redis).
//! `make test` runs this file alone, after every other test; each fault
//! leaves the service running again.

use testkit::chaos::{Plan, run};

/// The gateway binary the run's instances are.
const GATEWAY: &str = env!("CARGO_BIN_EXE_product-gateway");

#[actix_rt::test]
async fn short_chaos_run_loses_nothing() {
    let report = run(Plan::short(GATEWAY)).await;
    report.print("chaos run");
    assert!(report.confirmed > 1000, "the run carried load: {}", report.confirmed);
    assert_eq!(report.lost, 0);
}

/// `make chaos`: the five-minute run.
#[actix_rt::test]
#[ignore = "five minutes; run by `make chaos`"]
async fn full_chaos_run_loses_nothing() {
    let report = run(Plan::full(GATEWAY)).await;
    report.print("chaos run");
    assert_eq!(report.lost, 0);
}
