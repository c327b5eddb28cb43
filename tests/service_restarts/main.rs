//! Tests that restart the shared services (RabbitMQ, PostgreSQL, Redis).
//! `make test` runs this file alone, after every other test; each fault
//! leaves the service running again.

// Shared with tests/cluster, whose plans and faults go unused here.
#[allow(dead_code)]
mod chaos;

use chaos::{Plan, run};

#[actix_rt::test]
async fn short_chaos_run_loses_nothing() {
    let report = run(Plan::short()).await;
    report.print("chaos run");
    assert!(report.confirmed > 1000, "the run carried load: {}", report.confirmed);
    assert_eq!(report.lost, 0);
}

/// `make chaos`: the five-minute run.
#[actix_rt::test]
#[ignore = "five minutes; run by `make chaos`"]
async fn full_chaos_run_loses_nothing() {
    let report = run(Plan::full()).await;
    report.print("chaos run");
    assert_eq!(report.lost, 0);
}
