//! What a chaos run does: its load, how long it runs, and its faults in
//! order, for one node or the three-node cluster.

use std::time::Duration;

pub struct Plan {
    /// Time under load between faults.
    pub settle: Duration,
    pub redis_down: Duration,
    pub rate: f64,
    pub products: u32,
    pub(super) faults: &'static [Fault],
    /// Against the three-node cluster of `scripts/cluster.sh` rather than
    /// the machine's broker.
    pub(super) cluster: bool,
    /// The gateway binary the instances run.
    pub(super) gateway: &'static str,
}

impl Plan {
    /// About a minute: the variant inside `make test`.
    pub fn short(gateway: &'static str) -> Self {
        Plan {
            settle: Duration::from_secs(5),
            redis_down: Duration::from_secs(8),
            rate: 500.0,
            products: 200,
            faults: &FAULTS,
            cluster: false,
            gateway,
        }
    }

    /// About five minutes: `make chaos`.
    pub fn full(gateway: &'static str) -> Self {
        Plan {
            settle: Duration::from_secs(40),
            redis_down: Duration::from_secs(30),
            rate: 500.0,
            products: 1000,
            faults: &FAULTS,
            cluster: false,
            gateway,
        }
    }

    /// About a minute on the cluster: the node leading the apply queue is
    /// killed under load and started again (`make test-cluster`).
    pub fn cluster_short(gateway: &'static str) -> Self {
        Plan {
            settle: Duration::from_secs(8),
            redis_down: Duration::ZERO,
            rate: 300.0,
            products: 200,
            faults: &CLUSTER_FAULTS[..1],
            cluster: true,
            gateway,
        }
    }

    /// About five minutes on the cluster: every cluster fault
    /// (`make cluster-chaos`).
    pub fn cluster_full(gateway: &'static str) -> Self {
        Plan {
            settle: Duration::from_secs(45),
            redis_down: Duration::ZERO,
            rate: 300.0,
            products: 1000,
            faults: &CLUSTER_FAULTS,
            cluster: true,
            gateway,
        }
    }

    pub(super) fn has(&self, action: Action) -> bool {
        self.faults
            .iter()
            .any(|f| std::mem::discriminant(&f.action) == std::mem::discriminant(&action))
    }
}

/// What a fault does to the running system.
#[derive(Clone, Copy, Debug)]
pub(super) enum Action {
    /// The broker closes every connection of the service's vhost.
    CloseBrokerConnections,
    RestartRabbitmq,
    /// Gateway b dies without warning (SIGKILL) and is started again.
    KillGatewayB,
    RestartPostgres,
    /// Redis is away for `Plan::redis_down`; photos must still be served.
    StopRedis,
    /// The cluster node leading this queue dies (SIGKILL) and is started again.
    KillLeaderOf(Led),
    /// One cluster node is stopped and started again, as in a rolling restart.
    RestartNode(&'static str),
}

/// Which queue's leader a cluster fault kills.
#[derive(Clone, Copy, Debug)]
pub(super) enum Led {
    PriceQueue,
    Stream,
}

/// One row of the run: what it is called in the report, the phase name the
/// readiness poller files its answers under during the fault and after it.
pub(super) struct Fault {
    pub(super) name: &'static str,
    pub(super) phase: &'static str,
    pub(super) after: Option<&'static str>,
    pub(super) action: Action,
}

/// The faults, in the order the run applies them.
const FAULTS: [Fault; 5] = [
    Fault {
        name: "close broker connections",
        phase: "close-connections",
        after: None,
        action: Action::CloseBrokerConnections,
    },
    Fault {
        name: "restart RabbitMQ",
        phase: "restart-rabbitmq",
        after: Some("after-rabbitmq"),
        action: Action::RestartRabbitmq,
    },
    Fault {
        name: "SIGKILL gateway b, restart",
        phase: "kill-b",
        after: None,
        action: Action::KillGatewayB,
    },
    Fault {
        name: "restart PostgreSQL",
        phase: "restart-postgres",
        after: Some("after-postgres"),
        action: Action::RestartPostgres,
    },
    Fault {
        name: "stop Redis",
        phase: "redis-down",
        after: Some("after-redis"),
        action: Action::StopRedis,
    },
];

/// The faults of a cluster run (`scripts/cluster.sh`), in order.
const CLUSTER_FAULTS: [Fault; 4] = [
    Fault {
        name: "SIGKILL the apply queue's leader node, restart it",
        phase: "kill-apply-leader",
        after: None,
        action: Action::KillLeaderOf(Led::PriceQueue),
    },
    Fault {
        name: "SIGKILL the update stream's leader node, restart it",
        phase: "kill-stream-leader",
        after: None,
        action: Action::KillLeaderOf(Led::Stream),
    },
    Fault {
        name: "SIGKILL gateway b, restart",
        phase: "kill-b",
        after: None,
        action: Action::KillGatewayB,
    },
    Fault {
        name: "rolling restart: stop node c2, start it",
        phase: "restart-c2",
        after: None,
        action: Action::RestartNode("c2"),
    },
];
