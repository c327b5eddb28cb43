//! The chaos run: two gateway processes with the generator on, clients on
//! both, and the faults of a [`Plan`] in sequence. Afterwards the verdicts
//! of [`crate::verdict`] prove that nothing was lost or applied twice and
//! that every client saw a gap-free, duplicate-free sequence. Used by the
//! single-node run (`tests/service_restarts`) and the cluster run
//! (`tests/cluster`).
//!
//! Every event the broker accepted is copied to an audit queue bound to the
//! events exchange: that is the set of confirmed events the final catalog
//! must account for.
//!
//! The run goes in phases: [`prepare`], [`Running::start`],
//! [`Running::apply_faults`], [`Running::drain`], then [`judge`] over the
//! [`Evidence`].

mod clients;
mod evidence;
mod plan;
mod processes;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use product_gateway::hub::pattern::Pattern;
use product_gateway::settings::Settings;
use product_gateway::store;
use tokio_util::sync::CancellationToken;

use self::clients::{
    Client, Observations, Progress, SnapshotRounds, spawn_client, spawn_poller, spawn_progress, spawn_snapshot_rounds,
};
use self::evidence::{Evidence, applied_sum, declare_audit, photos_served, recovery};
pub use self::plan::Plan;
use self::plan::Site;
use self::plan::{Action, Fault, Led};
use self::processes::{Instance, Place, admin, broker_urls, inject, netlab_can_slow, readyz};
pub use self::processes::{cluster, netlab};
use crate::Isolation;
use crate::verdict;

pub struct Report {
    pub lost: usize,
    pub confirmed: usize,
    /// Per fault (the first row: before any), how long each stage was
    /// unavailable.
    pub unavailable: Vec<Unavailable>,
    pub lines: Vec<String>,
}

/// The longest stretch of one fault's window without progress, per stage.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub fault: &'static str,
    /// Without a confirmed publish.
    pub publishing: Duration,
    /// Without an applied change.
    pub applying: Duration,
    /// Without a delivery, the longest of any client of instance a, of b.
    pub delivering: [Duration; 2],
}

impl Report {
    pub fn print(&self, title: &str) {
        println!("\n== {title} ==");
        for line in &self.lines {
            println!("{line}");
        }
    }
}

/// Runs `plan` and says what it found; panics on any verdict but loss,
/// which the caller asserts.
pub async fn run(plan: Plan) -> Report {
    let started = Instant::now();
    let setup = prepare(&plan).await;
    let mut running = Running::start(&plan, &setup).await;
    tokio::time::sleep(plan.settle).await;
    let faults = running.apply_faults().await;
    running.drain().await;
    // Any node of a cluster holds the evidence; the first may be one a
    // partition paused, restarting at its own pace.
    let urls = broker_urls(&setup.iso, &Place::of("a", &plan).await, &plan)
        .await
        .unwrap_or_else(|| vec![setup.iso.amqp_url()]);
    let evidence = Evidence::collect(&urls, &setup.settings, &setup.db).await;
    let (status, body) = readyz(&running.bases[0]).await.unwrap_or((0, serde_json::Value::Null));
    assert_eq!(status, 200, "a is ready at the end: {body}");
    let report = judge(&plan, &running, &faults, &evidence, started.elapsed());
    running.a.kill().await;
    running.b.kill().await;
    report
}

/// The run's own database (seeded) and vhost, with the audit queue.
struct Setup {
    iso: Isolation,
    settings: Settings,
    db: store::Db,
}

async fn prepare(plan: &Plan) -> Setup {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    if plan.site != Site::Local {
        settings.rabbit.topology.replicas = 3;
    }
    let db = store::pool(&settings.database).unwrap();
    store::migrate(&iso.database_url).await.unwrap();
    product_gateway::seed::seed(&db, plan.products).await.unwrap();
    declare_audit(&iso.amqp_url(), &settings).await;
    Setup { iso, settings, db }
}

/// One fault as it went: how long it took, and when the system recovered.
struct Applied {
    name: &'static str,
    /// When it began.
    at: Instant,
    took: Duration,
    recovered: Duration,
}

/// The two instances, the clients and the readiness poller, under load.
struct Running<'a> {
    plan: &'a Plan,
    setup: &'a Setup,
    a: Instance,
    b: Instance,
    /// Where b runs, to start it again there.
    place_b: Place,
    bases: [String; 2],
    clients: Vec<Client>,
    /// The phase the poller files its answers under.
    phase: Arc<Mutex<String>>,
    observed: Observations,
    progress: Arc<Mutex<Progress>>,
    /// When the load began, and when the drain began: the last fault's
    /// window ends there.
    started: Instant,
    drained_at: Option<Instant>,
    stop: CancellationToken,
    /// Photos served while Redis was down.
    photos_ok: usize,
    /// Clients that began with a snapshot while the read replica lagged.
    snapshots: Option<Arc<Mutex<SnapshotRounds>>>,
    lines: Vec<String>,
}

impl<'a> Running<'a> {
    async fn start(plan: &'a Plan, setup: &'a Setup) -> Running<'a> {
        let (place_a, place_b) = (Place::of("a", plan).await, Place::of("b", plan).await);
        let a = Instance::start(&setup.iso, &place_a, plan).await;
        let b = Instance::start(&setup.iso, &place_b, plan).await;
        let (pa, pb) = (place_a.base(), place_b.base());
        let stop = CancellationToken::new();
        let clients = vec![
            spawn_client(
                "ws@a product.#".into(),
                false,
                "product.#",
                [pa.clone(), pb.clone()],
                stop.clone(),
            ),
            spawn_client(
                "sse@a product.price.*".into(),
                true,
                "product.price.*",
                [pa.clone(), pb.clone()],
                stop.clone(),
            ),
            spawn_client(
                "ws@b product.stock.*".into(),
                false,
                "product.stock.*",
                [pb.clone(), pa.clone()],
                stop.clone(),
            ),
            spawn_client(
                "sse@b product.*.1".into(),
                true,
                "product.*.1",
                [pb.clone(), pa.clone()],
                stop.clone(),
            ),
            spawn_client("ws@b #".into(), false, "#", [pb.clone(), pa.clone()], stop.clone()),
        ];
        let phase = Arc::new(Mutex::new("warm-up".to_owned()));
        let observed: Observations = Arc::default();
        spawn_poller(
            vec![("a", pa.clone()), ("b", pb.clone())],
            phase.clone(),
            observed.clone(),
            stop.clone(),
        );
        let progress = spawn_progress(vec![pa.clone(), pb.clone()], setup.db.clone(), stop.clone());
        Running {
            plan,
            setup,
            a,
            b,
            place_b,
            bases: [pa, pb],
            clients,
            phase,
            observed,
            progress,
            started: Instant::now(),
            drained_at: None,
            stop,
            photos_ok: 0,
            snapshots: None,
            lines: Vec::new(),
        }
    }

    fn set_phase(&self, p: &str) {
        *self.phase.lock().unwrap() = p.to_owned();
    }

    /// Every fault of the plan in turn, each followed by its recovery and
    /// time under load.
    async fn apply_faults(&mut self) -> Vec<Applied> {
        let mut applied = Vec::new();
        for (i, fault) in self.plan.faults.iter().enumerate() {
            self.set_phase(fault.phase);
            let t = Instant::now();
            // For a cluster node: recovered while the node is still away.
            let while_away = self.apply(fault).await;
            let took = t.elapsed();
            if let Some(after) = fault.after {
                self.set_phase(after);
            }
            let recovered = match while_away {
                Some(d) => d,
                None => recovery(&self.bases, &self.setup.db, Instant::now()).await,
            };
            applied.push(Applied {
                name: fault.name,
                at: t,
                took,
                recovered,
            });
            // After the last fault only a short pause before the drain.
            let last = i + 1 == self.plan.faults.len();
            let settle = if last {
                self.plan.settle.min(Duration::from_secs(5))
            } else {
                self.plan.settle
            };
            tokio::time::sleep(settle).await;
        }
        applied
    }

    /// One fault; for a cluster node, the recovery while it is away.
    async fn apply(&mut self, fault: &Fault) -> Option<Duration> {
        let (iso, db, bases) = (&self.setup.iso, &self.setup.db, &self.bases);
        match fault.action {
            Action::CloseBrokerConnections => {
                let out = tokio::process::Command::new("rabbitmqctl")
                    .args(["close_all_connections", "-p", &iso.vhost, "--limit", "1000", "chaos"])
                    .output()
                    .await
                    .unwrap();
                assert!(out.status.success());
            }
            Action::RestartRabbitmq => inject("restart-rabbitmq").await,
            Action::KillGatewayB => {
                self.b.kill().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.b = Instance::start(iso, &self.place_b, self.plan).await;
            }
            Action::RestartPostgres => inject("restart-postgres").await,
            Action::StopRedis => {
                inject("stop-redis").await;
                self.photos_ok += photos_served(bases, self.plan.redis_down).await;
                inject("start-redis").await;
            }
            Action::KillLeaderOf(led) => {
                let topology = &self.setup.settings.rabbit.topology;
                let queue = match led {
                    Led::PriceQueue => &topology.price_queue,
                    Led::Stream => &topology.updates_stream,
                };
                let node = cluster(&["leader", &iso.vhost, queue]).await;
                self.lines.push(format!("{}: {queue} led by {node}", fault.phase));
                cluster(&["kill", &node]).await;
                let away = recovery(bases, db, Instant::now()).await;
                cluster(&["start", &node]).await;
                return Some(away);
            }
            Action::RestartNode(node) => {
                cluster(&["stop", node]).await;
                let away = recovery(bases, db, Instant::now()).await;
                cluster(&["start", node]).await;
                return Some(away);
            }
            Action::Net(commands) => return Some(self.hold_network_fault(commands, None).await),
            Action::Slow(commands) => {
                if !netlab_can_slow().await {
                    self.lines.push(format!(
                        "{}: skipped, this kernel has no netem (sch_netem): no delay or loss can be made",
                        fault.phase
                    ));
                    return Some(Duration::ZERO);
                }
                return Some(self.hold_network_fault(commands, None).await);
            }
            Action::NetThenKill(commands, node) => {
                return Some(self.hold_network_fault(commands, Some(node)).await);
            }
            Action::LaggingReplica(secs) => {
                netlab(&["lag", secs]).await;
                let stop = self.stop.child_token();
                let bases = [("a", self.bases[0].clone()), ("b", self.bases[1].clone())];
                let rounds = spawn_snapshot_rounds(bases, Duration::from_secs(6), Duration::from_secs(1), stop.clone());
                tokio::time::sleep(self.plan.hold).await;
                stop.cancel();
                // The clients still reading finish before the replica catches up.
                let deadline = Instant::now() + Duration::from_secs(60);
                while rounds.lock().unwrap().running > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                netlab(&["lag", "0"]).await;
                self.snapshots = Some(rounds);
            }
        }
        None
    }

    /// Applies the lab commands, optionally kills a broker node, and holds
    /// the fault for `Plan::hold`; returns how long until the system was
    /// ready and applying again while the fault held (the whole hold when
    /// it never was). The node is started again, then every link healed.
    async fn hold_network_fault(&mut self, commands: &[&[&str]], kill: Option<&str>) -> Duration {
        let started = Instant::now();
        for c in commands {
            netlab(c).await;
        }
        if let Some(node) = kill {
            netlab(&["kill", node]).await;
        }
        let away = tokio::select! {
            r = recovery(&self.bases, &self.setup.db, started) => r,
            _ = tokio::time::sleep(self.plan.hold) => self.plan.hold,
        };
        tokio::time::sleep(self.plan.hold.saturating_sub(started.elapsed())).await;
        if let Some(node) = kill {
            netlab(&["start", node]).await;
        }
        netlab(&["heal"]).await;
        away
    }

    /// Stops generating, waits until nothing more is applied, and stops
    /// the clients.
    async fn drain(&mut self) {
        self.set_phase("drain");
        self.drained_at = Some(Instant::now());
        for base in &self.bases {
            admin(base, serde_json::json!({"running": false})).await;
        }
        let mut last = -2;
        let mut stable = 0;
        while stable < 6 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = applied_sum(&self.setup.db).await;
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.stop.cancel();
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
}

/// Per fault, from its start to the next one's (or the drain): the longest
/// stretch without a confirmed publish, without an applied change, and,
/// per client, without a delivery (with the client it was).
fn unavailability(running: &Running<'_>, faults: &[Applied]) -> Vec<Unavailable> {
    let progress = running.progress.lock().unwrap();
    let end = running.drained_at.unwrap_or_else(Instant::now);
    // Before the first fault: what a pause is without one.
    let first = faults.first().map_or(end, |f| f.at);
    let windows = std::iter::once(("no fault (before the first)", running.started, first)).chain(
        faults
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name, f.at, faults.get(i + 1).map_or(end, |n| n.at))),
    );
    windows
        .map(|(fault, from, to)| {
            // Per instance its clients' longest pause; a client of one product
            // pauses between its product's changes anyway, so it is left out.
            let delivered = |instance: &str| {
                running
                    .clients
                    .iter()
                    .filter(|c| c.name.contains(instance) && !c.pattern.ends_with(|ch: char| ch.is_ascii_digit()))
                    .map(|c| verdict::longest_pause(&c.log.lock().unwrap().at, from, to))
                    .max()
                    .unwrap_or_default()
            };
            Unavailable {
                fault,
                publishing: verdict::longest_pause(&progress.published, from, to),
                applying: verdict::longest_pause(&progress.applied, from, to),
                delivering: [delivered("@a"), delivered("@b")],
            }
        })
        .collect()
}

/// What the evidence shows, as report lines; panics on a failed verdict
/// (loss aside: the caller asserts `lost`, so the report prints first).
fn judge(plan: &Plan, running: &Running<'_>, faults: &[Applied], evidence: &Evidence, took: Duration) -> Report {
    let mut lines = running.lines.clone();
    let (confirmed, undecodable) = evidence.confirmed();
    let lost = verdict::lost(&confirmed, &evidence.catalog);
    let newest = verdict::newest(&confirmed);
    let wrong_final = verdict::differing(&newest, &evidence.catalog);
    // The stream: versions never go back for a product and kind.
    let stream = evidence.stream_updates();
    let verdict::StreamOrder {
        regressions,
        rebroadcasts,
    } = verdict::stream_order(&stream.seen);

    lines.push(format!(
        "run: {:.0} s, generator {} events/s, {} products, 2 gateway processes{}",
        took.as_secs_f64(),
        plan.rate,
        plan.products,
        match plan.site {
            Site::Local => "",
            Site::Cluster => ", three-node RabbitMQ cluster",
            Site::Lab => ", network lab (three broker hosts, PostgreSQL with a standby, a host per gateway)",
        }
    ));
    lines.push(format!("confirmed events (audit copy): {}", evidence.audit.len()));
    lines.push(format!("dead letters: {}", evidence.dead.len()));
    lines.push(format!("lost = {lost}"));
    lines.push(format!(
        "final catalog differs from newest confirmed version: {wrong_final} of {} keys",
        newest.len()
    ));
    lines.push(format!(
        "stream: {} updates in {} messages, version regressions {regressions}, same version re-broadcast {rebroadcasts}",
        stream.seen.len(),
        evidence.stream.len()
    ));
    if plan.has(Action::StopRedis) {
        lines.push(format!("photos served while Redis was down: {}", running.photos_ok));
    }
    lines.push(format!("double-applied = {}", stream.double_applied));
    let mut snapshot_failures = 0;
    lines.push(format!(
        "stream messages published again by the relay (confirm lost), dropped by every reader: {}",
        stream.republished
    ));
    lines.push(if plan.site != Site::Local {
        "fault | took (until the node is back) | recovered (ready + applying) after, the node still away".to_owned()
    } else {
        "fault | took | recovered (ready + applying) after".to_owned()
    });
    for f in faults {
        lines.push(format!(
            "{} | {:.1} s | {:.2} s",
            f.name,
            f.took.as_secs_f64(),
            f.recovered.as_secs_f64()
        ));
    }
    let unavailable = unavailability(running, faults);
    lines.push("fault | unavailable: publishing (confirmed) | applying | delivering, longest client pause".to_owned());
    for u in &unavailable {
        lines.push(format!(
            "{} | {:.1} s | {:.1} s | clients of a {:.1} s, of b {:.1} s",
            u.fault,
            u.publishing.as_secs_f64(),
            u.applying.as_secs_f64(),
            u.delivering[0].as_secs_f64(),
            u.delivering[1].as_secs_f64()
        ));
    }

    if let Some(rounds) = &running.snapshots {
        let rounds = rounds.lock().unwrap();
        for instance in ["a", "b"] {
            let runs: Vec<_> = rounds.runs.iter().filter(|r| r.instance == instance).collect();
            let verdicts: Vec<_> = runs
                .iter()
                .map(|r| verdict::snapshot_client(&r.snapshot, r.from, &r.seen, &stream.seen))
                .collect();
            let gaps = verdicts.iter().filter(|v| !v.gap_free).count();
            let duplicates = verdicts.iter().filter(|v| !v.duplicate_free).count();
            lines.push(format!(
                "snapshot clients of {instance} while the replica lagged: {}, {} updates after their snapshots, with a gap {gaps}, with a duplicate {duplicates}",
                runs.len(),
                verdicts.iter().map(|v| v.updates).sum::<usize>()
            ));
            snapshot_failures += gaps + duplicates;
        }
        lines.push(format!(
            "snapshot clients that got no snapshot: {}",
            rounds.failed.len()
        ));
    }

    // Clients: offsets strictly increase, equal the stream's matching
    // updates over the span they covered, and end on the catalog's state.
    let (mut client_failures, mut client_gaps) = (0, 0);
    for c in &running.clients {
        let log = c.log.lock().unwrap();
        let pattern = Pattern::parse(&c.pattern, 32).unwrap();
        let v = verdict::client(&log.seen, &stream.seen, |t| pattern.matches(t), &evidence.catalog);
        if !v.ok() {
            client_failures += 1;
        }
        if !v.gap_free {
            client_gaps += 1;
        }
        lines.push(format!(
            "client {}: {} updates, {} reconnects, gap-free {}, duplicate-free {}, final view = catalog {}",
            c.name, v.updates, log.reconnects, v.gap_free, v.duplicate_free, v.converged
        ));
    }
    lines.push(format!(
        "client gaps = {client_gaps} (clients with a gap, of {})",
        running.clients.len()
    ));

    // Readiness answers during the faults.
    let obs = running.observed.lock().unwrap().clone();
    let saw = |phase: &str, f: &dyn Fn(u16, &serde_json::Value) -> bool| {
        obs.iter().any(|(p, s, b)| p.starts_with(phase) && f(*s, b))
    };
    let rabbit_down_seen = saw("restart-rabbitmq", &|s, b| {
        s == 503 && b["checks"]["rabbitmq"] == "down"
    });
    let redis_degraded_seen = saw("redis-down", &|s, b| s == 200 && b["status"] == "degraded");
    let redis_wrongly_unready = saw("redis-down", &|s, b| {
        s == 503 && b["checks"]["postgres"] == "up" && b["checks"]["rabbitmq"] == "up"
    });
    let pg_down_seen = saw("restart-postgres", &|s, b| {
        s == 503 && b["checks"]["postgres"] == "down"
    });
    if plan.site == Site::Local {
        lines.push(format!(
        "readyz: 503 with rabbitmq down during its restart {rabbit_down_seen}; 503 with postgres down during its restart {pg_down_seen}; \
         degraded (200) while Redis was down {redis_degraded_seen}; 503 because of Redis {redis_wrongly_unready}"
        ));
    }

    assert_eq!(undecodable, 0, "the audit copy holds only valid events");
    assert_eq!(regressions, 0, "no older version broadcast after a newer one");
    assert_eq!(stream.double_applied, 0, "no version applied twice");
    assert_eq!(
        wrong_final, 0,
        "catalog = newest confirmed version of every product and kind"
    );
    assert_eq!(
        client_failures,
        0,
        "every client gap-free, duplicate-free and converged:\n{}",
        lines.join("\n")
    );
    assert_eq!(
        snapshot_failures,
        0,
        "every snapshot client gap-free and duplicate-free:\n{}",
        lines.join("\n")
    );
    if plan.has(Action::RestartRabbitmq) {
        assert!(rabbit_down_seen, "readiness reported RabbitMQ down during its restart");
    }
    if let Some(rounds) = &running.snapshots {
        let rounds = rounds.lock().unwrap();
        assert!(rounds.failed.is_empty(), "snapshot clients failed: {:?}", rounds.failed);
        for instance in ["a", "b"] {
            assert!(
                rounds.runs.iter().any(|r| r.instance == instance && !r.seen.is_empty()),
                "a snapshot client of {instance} saw updates while the replica lagged"
            );
        }
    }
    if plan.has(Action::StopRedis) {
        assert!(
            redis_degraded_seen && !redis_wrongly_unready,
            "Redis down is degraded, not unready"
        );
        assert!(running.photos_ok > 0, "photos were served without Redis");
    }
    Report {
        lost,
        confirmed: evidence.audit.len(),
        unavailable,
        lines,
    }
}
