//! The fault run on a three-node RabbitMQ cluster (`scripts/cluster.sh`):
//! two gateway processes given every node, the generator on, clients on
//! both, and cluster nodes killed under load. `make test-cluster` starts
//! the cluster, runs this file alone and takes the cluster down.

use testkit::chaos::{self, Plan, run};

/// The gateway binary the run's instances are.
const GATEWAY: &str = env!("CARGO_BIN_EXE_product-gateway");

/// The harness (isolation, audit copy) talks to node c1: `make
/// test-cluster` says so in `GATEWAY_TEST_AMQP` and `GATEWAY_TEST_RABBIT_API`.
async fn on_the_cluster() {
    let amqp = std::env::var("GATEWAY_TEST_AMQP").unwrap_or_default();
    assert!(
        amqp.ends_with(":5701"),
        "run by `make test-cluster`, which points GATEWAY_TEST_AMQP at node c1 (got {amqp:?})"
    );
    chaos::cluster(&["nodes"]).await;
}

#[actix_rt::test]
async fn a_cluster_node_killed_under_load_loses_nothing() {
    on_the_cluster().await;
    let report = run(Plan::cluster_short(GATEWAY)).await;
    report.print("cluster fault run");
    assert!(report.confirmed > 1000, "the run carried load: {}", report.confirmed);
    assert_eq!(report.lost, 0);
}

/// `make cluster-chaos`: every cluster fault, about five minutes.
#[actix_rt::test]
#[ignore = "five minutes; run by `make cluster-chaos`"]
async fn full_cluster_chaos_run_loses_nothing() {
    on_the_cluster().await;
    let report = run(Plan::cluster_full(GATEWAY)).await;
    report.print("cluster fault run");
    assert_eq!(report.lost, 0);
}
