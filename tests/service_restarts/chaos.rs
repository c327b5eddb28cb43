//! The chaos run: two gateway processes with the generator on, clients on
//! both, and the faults of [`FAULTS`] in sequence. Afterwards the verdicts
//! of `testkit::verdict` prove that nothing was lost or applied twice and
//! that every client saw a gap-free, duplicate-free sequence.
//!
//! Every event the broker accepted is copied to an audit queue bound to the
//! events exchange: that is the set of confirmed events the final catalog
//! must account for.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use product_gateway::broker::topology::Topology;
use product_gateway::hub::pattern::Pattern;
use product_gateway::store;
use product_gateway::update::update_id;
use product_gateway::wire::decode_event;
use tokio_util::sync::CancellationToken;

use testkit::clients::{SseClient, WsClient, WsEvent};
use testkit::verdict::{self, Confirmed, Sample, Seen, State};
use testkit::{ADMIN_TOKEN, Isolation, redis_url, repo_root};

const AUDIT: &str = "chaos.audit";

pub struct Plan {
    /// Time under load between faults.
    pub settle: Duration,
    pub redis_down: Duration,
    pub rate: f64,
    pub products: u32,
    faults: &'static [Fault],
    /// Against the three-node cluster of `scripts/cluster.sh` rather than
    /// the machine's broker.
    cluster: bool,
}

impl Plan {
    /// About a minute: the variant inside `make test`.
    pub fn short() -> Self {
        Plan {
            settle: Duration::from_secs(5),
            redis_down: Duration::from_secs(8),
            rate: 500.0,
            products: 200,
            faults: &FAULTS,
            cluster: false,
        }
    }

    /// About five minutes: `make chaos`.
    pub fn full() -> Self {
        Plan {
            settle: Duration::from_secs(40),
            redis_down: Duration::from_secs(30),
            rate: 500.0,
            products: 1000,
            faults: &FAULTS,
            cluster: false,
        }
    }

    /// About a minute on the cluster: the node leading the apply queue is
    /// killed under load and started again (`make test-cluster`).
    pub fn cluster_short() -> Self {
        Plan {
            settle: Duration::from_secs(8),
            redis_down: Duration::ZERO,
            rate: 300.0,
            products: 200,
            faults: &CLUSTER_FAULTS[..1],
            cluster: true,
        }
    }

    /// About five minutes on the cluster: every cluster fault
    /// (`make cluster-chaos`).
    pub fn cluster_full() -> Self {
        Plan {
            settle: Duration::from_secs(45),
            redis_down: Duration::ZERO,
            rate: 300.0,
            products: 1000,
            faults: &CLUSTER_FAULTS,
            cluster: true,
        }
    }

    fn has(&self, action: Action) -> bool {
        self.faults
            .iter()
            .any(|f| std::mem::discriminant(&f.action) == std::mem::discriminant(&action))
    }
}

/// What a fault does to the running system.
#[derive(Clone, Copy, Debug)]
enum Action {
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
enum Led {
    PriceQueue,
    Stream,
}

/// One row of the run: what it is called in the report, the phase name the
/// readiness poller files its answers under during the fault and after it.
struct Fault {
    name: &'static str,
    phase: &'static str,
    after: Option<&'static str>,
    action: Action,
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

/// A script of `scripts/` with these arguments; its standard output.
async fn script(name: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new("bash")
        .arg(repo_root().join("scripts").join(name))
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("scripts/{name} runs: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `scripts/cluster.sh` with these arguments; its standard output.
pub async fn cluster(args: &[&str]) -> String {
    script("cluster.sh", args).await
}

async fn inject(cmd: &str) {
    script("faults.sh", &[cmd]).await;
}

/// One gateway process, killed when dropped.
struct Instance {
    child: Option<tokio::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Instance {
    async fn start(iso: &Isolation, name: &'static str, port: u16, plan: &Plan) -> Instance {
        let logs = repo_root().join("target/chaos-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{name}.log")))
            .unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_product-gateway"));
        if plan.cluster {
            // Every node, each with the isolation's vhost.
            let urls: Vec<String> = cluster(&["urls"])
                .await
                .split(',')
                .map(|u| format!("{}/{}", u.trim_end_matches("/%2f"), iso.vhost))
                .collect();
            command
                .env("GATEWAY__RABBIT__URLS", urls.join(","))
                .env("GATEWAY__RABBIT__TOPOLOGY__REPLICAS", "3")
                .env("GATEWAY__RABBIT__MANAGEMENT_URL", testkit::rabbit_api());
        }
        let child = command
            .arg("serve")
            .env("GATEWAY_CONFIG_DIR", repo_root().join("config"))
            .env("GATEWAY__SERVER__PORT", port.to_string())
            .env("GATEWAY__SERVER__STATIC_DIR", repo_root().join("static"))
            .env("GATEWAY__ADMIN__TOKEN", ADMIN_TOKEN)
            .env("GATEWAY__ADMIN__DEV_MODE", "false")
            // The run's clients are anonymous and watch `product.#` too.
            .env("GATEWAY__AUTH__ANONYMOUS_PATTERNS", "#")
            .env("GATEWAY__DATABASE__URL", &iso.database_url)
            .env("GATEWAY__DATABASE__ACQUIRE_TIMEOUT_MS", "1000")
            .env("GATEWAY__REDIS__URL", redis_url())
            .env("GATEWAY__REDIS__KEY_PREFIX", &iso.redis_prefix)
            .env("GATEWAY__RABBIT__URL", iso.amqp_url())
            .env("GATEWAY__GENERATOR__ENABLED", "true")
            .env("GATEWAY__GENERATOR__RATE", plan.rate.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("gateway process starts");
        let i = Instance { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while readyz(port).await.map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "{name} did not become ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        i
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill(); // SIGKILL
            let _ = c.wait().await;
        }
    }
}

/// Status and body of `/readyz`, None when nothing answers.
async fn readyz(port: u16) -> Option<(u16, serde_json::Value)> {
    let client = awc::Client::builder().timeout(Duration::from_secs(3)).finish();
    let mut res = client
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .ok()?;
    let body = res.json().await.unwrap_or(serde_json::Value::Null);
    Some((res.status().as_u16(), body))
}

async fn admin(port: u16, body: serde_json::Value) {
    let client = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    let _ = client
        .post(format!("http://127.0.0.1:{port}/admin/generator"))
        .insert_header(("Authorization", format!("Bearer {ADMIN_TOKEN}")))
        .send_json(&body)
        .await;
}

#[derive(Default)]
struct ClientLog {
    seen: Vec<Seen>,
    reconnects: u32,
}

struct Client {
    name: String,
    pattern: String,
    log: Arc<Mutex<ClientLog>>,
}

/// A client that stays subscribed: on any disconnect it reconnects (to its
/// own instance, else the other) with the last offset it saw.
fn spawn_client(name: String, sse: bool, pattern: &str, ports: [u16; 2], stop: CancellationToken) -> Client {
    let log = Arc::new(Mutex::new(ClientLog::default()));
    let (l, p) = (log.clone(), pattern.to_owned());
    tokio::task::spawn_local(async move {
        let mut attempt = 0usize;
        while !stop.is_cancelled() {
            let base = format!("http://127.0.0.1:{}", ports[attempt % 2]);
            attempt += 1;
            let since = l.lock().unwrap().seen.last().map(|s| s.offset);
            if sse {
                let mut q = format!("topics={}", p.replace('#', "%23"));
                if let Some(s) = since {
                    q.push_str(&format!("&since={s}"));
                }
                let Ok(mut c) = SseClient::connect(&base, &q, None).await else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                };
                attempt = 0;
                while !stop.is_cancelled() {
                    match c.next(Duration::from_millis(500)).await {
                        Some(e) if e.event == "price" || e.event == "stock" => {
                            let topic = format!("product.{}.{}", e.event, e.data["product_id"]);
                            if let Some(s) = Seen::from_data(e.id.unwrap_or(0), &topic, &e.data) {
                                l.lock().unwrap().seen.push(s);
                            }
                        }
                        Some(_) => {}
                        None if c.ended => break,
                        None => {}
                    }
                }
            } else {
                let Some(mut c) = WsClient::try_connect(&base).await else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                };
                let mut frame = serde_json::json!({"op": "subscribe", "topics": [p]});
                if let Some(s) = since {
                    frame["since"] = s.into();
                }
                c.send(frame).await;
                attempt = 0;
                while !stop.is_cancelled() {
                    match c.next(Duration::from_millis(500)).await {
                        Some(WsEvent::Json(v)) if v["type"] == "update" => {
                            let offset = v["offset"].as_u64().unwrap_or(0);
                            if let Some(s) = Seen::from_data(offset, v["topic"].as_str().unwrap_or(""), &v["data"]) {
                                l.lock().unwrap().seen.push(s);
                            }
                        }
                        Some(WsEvent::Closed(_)) => break,
                        _ => {}
                    }
                }
            }
            if !stop.is_cancelled() {
                l.lock().unwrap().reconnects += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    Client {
        name,
        pattern: pattern.to_owned(),
        log,
    }
}

/// `/readyz` answers seen during each phase, per instance.
type Observations = Arc<Mutex<Vec<(String, u16, serde_json::Value)>>>;

fn spawn_poller(
    ports: Vec<(&'static str, u16)>,
    phase: Arc<Mutex<String>>,
    seen: Observations,
    stop: CancellationToken,
) {
    tokio::task::spawn_local(async move {
        while !stop.is_cancelled() {
            for (name, port) in &ports {
                if let Some((status, body)) = readyz(*port).await {
                    let p = phase.lock().unwrap().clone();
                    seen.lock().unwrap().push((format!("{p}/{name}"), status, body));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

async fn applied_sum(db: &store::Db) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct V {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        v: i64,
    }
    let Ok(mut conn) = db.get().await else { return -1 };
    let q = diesel::sql_query("SELECT COALESCE(SUM(price_version + stock_version), 0)::int8 AS v FROM products");
    match diesel_async::RunQueryDsl::get_result::<V>(q, &mut conn).await {
        Ok(v) => v.v,
        Err(_) => -1,
    }
}

/// Until every instance is ready again and events are being applied.
async fn recovery(ports: &[u16], db: &store::Db, since: Instant) -> Duration {
    let before = applied_sum(db).await;
    let mut samples = Vec::new();
    loop {
        let mut all_ready = true;
        for p in ports {
            all_ready &= matches!(readyz(*p).await, Some((200, ref b)) if b["status"] == "ready");
        }
        let applied = applied_sum(db).await;
        samples.push(Sample {
            at: since.elapsed(),
            all_ready,
            applied,
        });
        if let Some(at) = verdict::recovered_at(before, &samples) {
            return at;
        }
        assert!(since.elapsed() < Duration::from_secs(120), "no recovery within 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Photo requests answered 200 by any instance during `window`, two a second.
async fn photos_served(ports: &[u16], window: Duration) -> usize {
    let client = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    let mut ok = 0;
    let until = Instant::now() + window;
    while Instant::now() < until {
        for port in ports {
            if let Ok(res) = client
                .get(format!("http://127.0.0.1:{port}/products/1/photo"))
                .send()
                .await
                && res.status().as_u16() == 200
            {
                ok += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ok
}

/// Reads a whole queue or stream (every message, in order) until it is idle.
async fn read_all(conn: &lapin::Connection, queue: &str, stream: bool) -> Vec<lapin::message::Delivery> {
    let channel = conn.create_channel().await.unwrap();
    channel.basic_qos(2000, BasicQosOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    if stream {
        args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString(LongString::from("first")),
        );
    }
    let mut consumer = channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), args)
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await {
        channel
            .basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();
        out.push(d);
    }
    out
}

fn stream_offset(d: &lapin::message::Delivery) -> u64 {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset").cloned())
    {
        Some(AMQPValue::LongLongInt(n)) => n as u64,
        other => panic!("stream message without offset: {other:?}"),
    }
}

pub struct Report {
    pub lost: usize,
    pub confirmed: usize,
    pub lines: Vec<String>,
}

impl Report {
    pub fn print(&self, title: &str) {
        println!("\n== {title} ==");
        for line in &self.lines {
            println!("{line}");
        }
    }
}

pub async fn run(plan: Plan) -> Report {
    let started = Instant::now();
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    if plan.cluster {
        settings.rabbit.topology.replicas = 3;
    }
    let db = store::pool(&settings.database).unwrap();
    store::migrate(&iso.database_url).await.unwrap();
    product_gateway::seed::seed(&db, plan.products).await.unwrap();

    // The topology, plus the audit copy of everything the broker accepts.
    let conn = lapin::Connection::connect(&iso.amqp_url(), Default::default())
        .await
        .unwrap();
    Topology::new(&settings.rabbit.topology).declare(&conn).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(AUDIT.into(), durable, args).await.unwrap();
    ch.queue_bind(
        AUDIT.into(),
        settings.rabbit.topology.events_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    drop(ch);
    drop(conn);

    let (pa, pb) = (free_port(), free_port());
    let mut a = Instance::start(&iso, "a", pa, &plan).await;
    let mut b = Instance::start(&iso, "b", pb, &plan).await;
    let stop = CancellationToken::new();
    let clients = vec![
        spawn_client("ws@a product.#".into(), false, "product.#", [pa, pb], stop.clone()),
        spawn_client(
            "sse@a product.price.*".into(),
            true,
            "product.price.*",
            [pa, pb],
            stop.clone(),
        ),
        spawn_client(
            "ws@b product.stock.*".into(),
            false,
            "product.stock.*",
            [pb, pa],
            stop.clone(),
        ),
        spawn_client("sse@b product.*.1".into(), true, "product.*.1", [pb, pa], stop.clone()),
        spawn_client("ws@b #".into(), false, "#", [pb, pa], stop.clone()),
    ];
    let phase = Arc::new(Mutex::new("warm-up".to_owned()));
    let observed: Observations = Arc::default();
    spawn_poller(
        vec![("a", pa), ("b", pb)],
        phase.clone(),
        observed.clone(),
        stop.clone(),
    );
    tokio::time::sleep(plan.settle).await;

    let mut lines = Vec::new();
    let mut faults: Vec<(&str, Duration, Duration)> = Vec::new();
    let set_phase = |p: &str| *phase.lock().unwrap() = p.to_owned();

    let mut photos_ok = 0;
    for (i, fault) in plan.faults.iter().enumerate() {
        set_phase(fault.phase);
        let t = Instant::now();
        // For a cluster node: recovered while the node is still away.
        let mut while_away = None;
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
                b.kill().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                b = Instance::start(&iso, "b", pb, &plan).await;
            }
            Action::RestartPostgres => inject("restart-postgres").await,
            Action::StopRedis => {
                inject("stop-redis").await;
                photos_ok += photos_served(&[pa, pb], plan.redis_down).await;
                inject("start-redis").await;
            }
            Action::KillLeaderOf(led) => {
                let queue = match led {
                    Led::PriceQueue => &settings.rabbit.topology.price_queue,
                    Led::Stream => &settings.rabbit.topology.updates_stream,
                };
                let node = cluster(&["leader", &iso.vhost, queue]).await;
                lines.push(format!("{}: {queue} led by {node}", fault.phase));
                cluster(&["kill", &node]).await;
                while_away = Some(recovery(&[pa, pb], &db, Instant::now()).await);
                cluster(&["start", &node]).await;
            }
            Action::RestartNode(node) => {
                cluster(&["stop", node]).await;
                while_away = Some(recovery(&[pa, pb], &db, Instant::now()).await);
                cluster(&["start", node]).await;
            }
        }
        let took = t.elapsed();
        if let Some(after) = fault.after {
            set_phase(after);
        }
        let recovered = match while_away {
            Some(d) => d,
            None => recovery(&[pa, pb], &db, Instant::now()).await,
        };
        faults.push((fault.name, took, recovered));
        // After the last fault only a short pause before the drain.
        let last = i + 1 == plan.faults.len();
        let settle = if last {
            plan.settle.min(Duration::from_secs(5))
        } else {
            plan.settle
        };
        tokio::time::sleep(settle).await;
    }

    // Stop generating and let everything drain.
    set_phase("drain");
    for port in [pa, pb] {
        admin(port, serde_json::json!({"running": false})).await;
    }
    let mut last = -2;
    let mut stable = 0;
    while stable < 6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = applied_sum(&db).await;
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(800)).await;

    // The evidence: the audit copy, the update stream, the catalog, the dead letters.
    let conn = lapin::Connection::connect(&iso.amqp_url(), Default::default())
        .await
        .unwrap();
    let audit = read_all(&conn, AUDIT, false).await;
    let topology = &settings.rabbit.topology;
    let stream = read_all(&conn, &topology.updates_stream, true).await;
    let dead = read_all(&conn, &topology.dead_letter_queue, false).await;
    let (status, body) = readyz(pa).await.unwrap_or((0, serde_json::Value::Null));
    assert_eq!(status, 200, "a is ready at the end: {body}");

    let products = store::catalog::all(&db).await.unwrap();
    let catalog: State = products
        .iter()
        .flat_map(|p| {
            [
                ((p.id, "price".to_owned()), (p.price_cents, p.price_version)),
                ((p.id, "stock".to_owned()), (p.stock, p.stock_version)),
            ]
        })
        .collect();
    let mut confirmed = Vec::with_capacity(audit.len());
    let mut undecodable = 0;
    for d in &audit {
        let Ok(e) = decode_event(&d.data, Some("application/json"), d.routing_key.as_str(), 4096) else {
            undecodable += 1;
            continue;
        };
        confirmed.push(Confirmed {
            key: (e.product_id.get(), e.kind().as_str().to_owned()),
            value: e.change.value(),
            version: e.version,
        });
    }
    let lost = verdict::lost(&confirmed, &catalog);
    let newest = verdict::newest(&confirmed);
    let wrong_final = verdict::differing(&newest, &catalog);

    // The stream: versions never go back for a product and kind.
    let mut stream_seen: Vec<Seen> = Vec::new();
    // A copy of an outbox row the relay published again is dropped by the
    // readers (and so by the clients); a version in two different rows
    // would be an event applied twice.
    let mut rows_read = std::collections::HashSet::new();
    let mut row_of_version: std::collections::HashMap<(i64, String, i64), i64> = Default::default();
    let (mut republished, mut double_applied) = (0, 0);
    for d in &stream {
        let seq = product_gateway::broadcast::stream::outbox_seq_of(d);
        if let Some(seq) = seq
            && !rows_read.insert(seq)
        {
            republished += 1;
            continue;
        }
        // A stream message is a committed batch: an array of updates.
        let data: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        let items = data.as_array().cloned().unwrap_or_else(|| vec![data.clone()]);
        for (i, item) in items.iter().enumerate() {
            let topic = format!("product.{}.{}", item["kind"].as_str().unwrap(), item["product_id"]);
            let seen = Seen::from_data(update_id(stream_offset(d), i), &topic, item).unwrap();
            if let Some(seq) = seq {
                let key = (seen.product, seen.kind.clone(), seen.version);
                if row_of_version.insert(key, seq).is_some_and(|other| other != seq) {
                    double_applied += 1;
                }
            }
            stream_seen.push(seen);
        }
    }
    let verdict::StreamOrder {
        regressions,
        rebroadcasts,
    } = verdict::stream_order(&stream_seen);

    lines.push(format!(
        "run: {:.0} s, generator {} events/s, {} products, 2 gateway processes{}",
        started.elapsed().as_secs_f64(),
        plan.rate,
        plan.products,
        if plan.cluster {
            ", three-node RabbitMQ cluster"
        } else {
            ""
        }
    ));
    lines.push(format!("confirmed events (audit copy): {}", audit.len()));
    lines.push(format!("dead letters: {}", dead.len()));
    lines.push(format!("lost = {lost}"));
    lines.push(format!(
        "final catalog differs from newest confirmed version: {wrong_final} of {} keys",
        newest.len()
    ));
    lines.push(format!(
        "stream: {} updates in {} messages, version regressions {regressions}, same version re-broadcast {rebroadcasts}",
        stream_seen.len(),
        stream.len()
    ));
    if plan.has(Action::StopRedis) {
        lines.push(format!("photos served while Redis was down: {photos_ok}"));
    }
    lines.push(format!("double-applied = {double_applied}"));
    lines.push(format!(
        "stream messages published again by the relay (confirm lost), dropped by every reader: {republished}"
    ));
    lines.push(if plan.cluster {
        "fault | took (until the node is back) | recovered (ready + applying) after, the node still away".to_owned()
    } else {
        "fault | took | recovered (ready + applying) after".to_owned()
    });
    for (name, took, rec) in &faults {
        lines.push(format!(
            "{name} | {:.1} s | {:.2} s",
            took.as_secs_f64(),
            rec.as_secs_f64()
        ));
    }

    // Clients: offsets strictly increase, equal the stream's matching
    // updates over the span they covered, and end on the catalog's state.
    let (mut client_failures, mut client_gaps) = (0, 0);
    for c in &clients {
        let log = c.log.lock().unwrap();
        let pattern = Pattern::parse(&c.pattern, 32).unwrap();
        let v = verdict::client(&log.seen, &stream_seen, |t| pattern.matches(t), &catalog);
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
        clients.len()
    ));

    // Readiness answers during the faults.
    let obs = observed.lock().unwrap().clone();
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
    if !plan.cluster {
        lines.push(format!(
        "readyz: 503 with rabbitmq down during its restart {rabbit_down_seen}; 503 with postgres down during its restart {pg_down_seen}; \
         degraded (200) while Redis was down {redis_degraded_seen}; 503 because of Redis {redis_wrongly_unready}"
        ));
    }

    a.kill().await;
    b.kill().await;
    assert_eq!(undecodable, 0, "the audit copy holds only valid events");
    assert_eq!(regressions, 0, "no older version broadcast after a newer one");
    assert_eq!(double_applied, 0, "no version applied twice");
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
    if plan.has(Action::RestartRabbitmq) {
        assert!(rabbit_down_seen, "readiness reported RabbitMQ down during its restart");
    }
    if plan.has(Action::StopRedis) {
        assert!(
            redis_degraded_seen && !redis_wrongly_unready,
            "Redis down is degraded, not unready"
        );
        assert!(photos_ok > 0, "photos were served without Redis");
    }
    Report {
        lost,
        confirmed: audit.len(),
        lines,
    }
}
