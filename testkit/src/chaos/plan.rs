//! What a chaos run does: its load, how long it runs, and its faults in
//! order, for one node, the three-node cluster on loopback, or the network
//! lab's hosts (`scripts/netlab.sh`).

use std::time::Duration;

pub struct Plan {
    /// Time under load between faults.
    pub settle: Duration,
    pub redis_down: Duration,
    pub rate: f64,
    pub products: u32,
    pub(super) faults: &'static [Fault],
    /// How long a network fault holds before it is healed.
    pub hold: Duration,
    pub(super) site: Site,
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
            hold: Duration::ZERO,
            site: Site::Local,
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
            hold: Duration::ZERO,
            site: Site::Local,
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
            hold: Duration::ZERO,
            site: Site::Cluster,
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
            hold: Duration::ZERO,
            site: Site::Cluster,
            gateway,
        }
    }

    /// A few minutes in the network lab: gateway a cut from two broker
    /// nodes, then one broker node cut off from the other two, under load
    /// (CI).
    pub fn partition_short(gateway: &'static str) -> Self {
        Plan {
            settle: Duration::from_secs(8),
            redis_down: Duration::ZERO,
            rate: 300.0,
            products: 200,
            // Gateway a cut from two of its nodes (only it must move), then
            // a broker node cut from the others (the cluster must move).
            faults: &LAB_FAULTS[..2],
            // Long enough for the cluster to give the cut node up (the lab's
            // net_ticktime, 10 s) and move the stream's leader, so delivery
            // can be seen resuming before the heal.
            hold: Duration::from_secs(30),
            site: Site::Lab,
            gateway,
        }
    }

    /// Every network fault of the lab in turn (`make partitions`).
    pub fn partitions(gateway: &'static str) -> Self {
        Plan {
            settle: Duration::from_secs(20),
            redis_down: Duration::ZERO,
            rate: 300.0,
            products: 500,
            faults: &LAB_FAULTS,
            hold: Duration::from_secs(30),
            site: Site::Lab,
            gateway,
        }
    }

    pub(super) fn has(&self, action: Action) -> bool {
        self.faults
            .iter()
            .any(|f| std::mem::discriminant(&f.action) == std::mem::discriminant(&action))
    }
}

/// Where the run's brokers (and, in the lab, every service) are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Site {
    /// The machine's own services.
    Local,
    /// Three RabbitMQ nodes on loopback (`scripts/cluster.sh`).
    Cluster,
    /// Hosts with addresses of their own (`scripts/netlab.sh`): three broker
    /// nodes, PostgreSQL with a standby, Redis, a gateway host per instance.
    Lab,
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
    /// Network faults in the lab (`scripts/netlab.sh` commands), held for
    /// `Plan::hold`, then healed.
    Net(&'static [&'static [&'static str]]),
    /// Slow or lossy links (netem), held like `Net`; skipped, and said so,
    /// where the kernel has no netem.
    Slow(&'static [&'static [&'static str]]),
    /// A network fault held, and this broker node killed during it and
    /// started again before the heal.
    NetThenKill(&'static [&'static [&'static str]], &'static str),
    /// The read replica applies commits this many seconds late, held like
    /// `Net`, while fresh clients on both instances take snapshots (a
    /// waits for the replica, b reads on the primary past 1 s).
    LaggingReplica(&'static str),
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

/// The network faults of the lab (`scripts/netlab.sh`), in order: gateway
/// a prefers node r1, gateway b node r2.
const LAB_FAULTS: [Fault; 7] = [
    // First, from a whole cluster: every stage of a that sits on r2 or r3
    // must find r1.
    Fault {
        name: "gateway a cut from broker nodes r2 and r3, its clients still connected",
        phase: "cut-g1-r2-r3",
        after: Some("after-cut-g1"),
        action: Action::Net(&[&["cut", "g1", "r2,r3"]]),
    },
    Fault {
        name: "partition: broker r1 cut from r2 and r3",
        phase: "cut-r1",
        after: Some("after-cut-r1"),
        action: Action::Net(&[&["cut", "r1", "r2,r3"]]),
    },
    Fault {
        name: "asymmetric: r2's packets to r3 lost, r3's to r2 delivered",
        phase: "one-way-r2-r3",
        after: Some("after-one-way"),
        action: Action::Net(&[&["cut-from", "r3", "r2"]]),
    },
    Fault {
        name: "bridge: r1 and r3 cut from each other, r2 sees both",
        phase: "bridge",
        after: Some("after-bridge"),
        action: Action::Net(&[&["cut", "r1", "r3"]]),
    },
    Fault {
        name: "slow links: 200 ms ± 50 ms and 5 % loss on every broker node",
        phase: "slow-brokers",
        after: Some("after-slow"),
        action: Action::Slow(&[
            &["slow", "r1", "delay 200ms 50ms loss 5%"],
            &["slow", "r2", "delay 200ms 50ms loss 5%"],
            &["slow", "r3", "delay 200ms 50ms loss 5%"],
        ]),
    },
    Fault {
        name: "read replica 10 s behind while snapshots are served from it",
        phase: "replica-lag",
        after: Some("after-replica-lag"),
        action: Action::LaggingReplica("10"),
    },
    Fault {
        name: "r3 cut from r1 and r2, and r1 killed during it",
        phase: "cut-r3-kill-r1",
        after: Some("after-cut-kill"),
        action: Action::NetThenKill(&[&["cut", "r3", "r1,r2"]], "r1"),
    },
];
