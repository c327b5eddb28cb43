//! Plumbing the scenarios share: process limits and memory, a minimal HTTP
//! client, the run's isolation (its own database, RabbitMQ vhosts and Redis
//! key prefix, as the tests make theirs), the in-process service, CPU shares
//! per process and `perf` profiles.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use actix_web::web;
use anyhow::{Context, Result, anyhow, bail};
use product_gateway::http::AppState;
use product_gateway::settings::{Secret, Settings};
use product_gateway::startup::Application;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::wire::find;

// ---------------------------------------------------------------- process

/// Raises this process's open-files soft limit to its hard limit; returns
/// the limit now in force.
pub fn raise_nofile() -> Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            bail!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                bail!("setrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
            }
        }
    }
    // rlim_t is u64 here but not on every platform.
    #[allow(clippy::unnecessary_cast)]
    Ok(r.rlim_cur as u64)
}

/// Resident memory of a process in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Runs a future on a dedicated OS thread with its own single-threaded
/// runtime, as an external program would run: the publisher and the
/// bench's clients then do not share the service's runtime threads.
pub fn on_thread<T, F, Fut>(name: &str, f: F) -> impl Future<Output = Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(f()));
        let _ = tx.send(result);
    });
    let name = name.to_owned();
    async move {
        spawned.with_context(|| format!("spawn thread {name}"))?;
        rx.await.map_err(|_| anyhow!("thread {name} panicked"))?
    }
}

pub fn repo_root() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| ".".into());
    if cwd.join("scripts/bench-rabbit.sh").exists() {
        cwd
    } else {
        // The bench crate sits one folder below the repository root.
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    }
}

// ------------------------------------------------------------------- HTTP

pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<&[u8]>,
) -> Result<HttpResponse> {
    let run = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        if let Some(b) = body {
            stream.write_all(b).await?;
        }
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let end = find(&raw, b"\r\n\r\n").ok_or_else(|| anyhow!("no response head from {addr}{path}"))?;
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let rest = &raw[end + 4..];
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(rest)?
        } else {
            rest.to_vec()
        };
        Ok::<_, anyhow::Error>(HttpResponse { status, body })
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .map_err(|_| anyhow!("{method} http://{addr}{path} took over 30 s"))?
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let i = find(raw, b"\r\n").ok_or_else(|| anyhow!("truncated chunked body"))?;
        let line = std::str::from_utf8(&raw[..i])?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)?;
        raw = &raw[i + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or_default();
    }
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ------------------------------------------------------------- services

/// RabbitMQ's management API: `(host:port, "user:password")`.
pub fn rabbit_api() -> (String, String) {
    let url = testkit::env_or("GATEWAY_TEST_RABBIT_API", "http://127.0.0.1:15672");
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(&url);
    let (creds, host) = match rest.rsplit_once('@') {
        Some((c, h)) => (c.to_owned(), h),
        None => ("guest:guest".to_owned(), rest),
    };
    (host.trim_end_matches('/').to_owned(), creds)
}

pub async fn mgmt(method: &str, path: &str, body: Option<serde_json::Value>) -> Result<(u16, String)> {
    let (host, creds) = rabbit_api();
    let mut headers = vec![("Authorization", format!("Basic {}", base64(creds.as_bytes())))];
    let body = body.map(|b| b.to_string());
    if body.is_some() {
        headers.push(("Content-Type", "application/json".to_owned()));
    }
    let res = http(&host, method, path, &headers, body.as_deref().map(str::as_bytes))
        .await
        .context("RabbitMQ management API (is rabbitmq_management enabled?)")?;
    Ok((res.status, String::from_utf8_lossy(&res.body).into_owned()))
}

pub async fn mgmt_json(path: &str) -> Result<serde_json::Value> {
    let (status, body) = mgmt("GET", path, None).await?;
    if status != 200 {
        bail!("GET {path}: {status} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// The run's own resources, named after one random id.
pub struct Isolation {
    pub id: String,
    pub pg_server: String,
    pub db_name: String,
    pub amqp_server: String,
    /// The gateway's vhost.
    pub vhost: String,
    /// A scratch vhost for the broker-only ceiling.
    pub scratch_vhost: String,
    pub redis_url: String,
    pub redis_prefix: String,
    created_db: bool,
    created_vhosts: Vec<String>,
}

impl Isolation {
    pub fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        Isolation {
            pg_server: testkit::pg_server(),
            db_name: format!("gw_bench_{id}"),
            amqp_server: testkit::amqp_server(),
            vhost: format!("gw-bench-{id}"),
            scratch_vhost: format!("gw-bench-{id}-ceiling"),
            redis_url: testkit::redis_url(),
            redis_prefix: format!("gw-bench:{id}:"),
            id,
            created_db: false,
            created_vhosts: Vec::new(),
        }
    }

    pub fn db_url(&self) -> String {
        format!("{}/{}", self.pg_server, self.db_name)
    }

    pub fn amqp_url(&self, vhost: &str) -> String {
        format!("{}/{}", self.amqp_server, vhost)
    }

    pub async fn create(&mut self) -> Result<()> {
        product_gateway::store::create_database(&self.db_url())
            .await
            .context("create the bench database")?;
        self.created_db = true;
        for vhost in [self.vhost.clone(), self.scratch_vhost.clone()] {
            let (status, body) = mgmt("PUT", &format!("/api/vhosts/{vhost}"), None).await?;
            if status >= 300 {
                bail!("create vhost {vhost}: {status} {body}");
            }
            self.created_vhosts.push(vhost.clone());
            let perms = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
            let user = rabbit_api().1.split(':').next().unwrap_or("guest").to_owned();
            let (status, body) = mgmt("PUT", &format!("/api/permissions/{vhost}/{user}"), Some(perms)).await?;
            if status >= 300 {
                bail!("permissions on vhost {vhost}: {status} {body}");
            }
        }
        Ok(())
    }

    /// Removes what `create` made; returns what could not be removed.
    pub async fn cleanup(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for vhost in std::mem::take(&mut self.created_vhosts) {
            match mgmt("DELETE", &format!("/api/vhosts/{vhost}"), None).await {
                Ok((s, _)) if s < 300 || s == 404 => {}
                Ok((s, b)) => errors.push(format!("delete vhost {vhost}: {s} {b}")),
                Err(e) => errors.push(format!("delete vhost {vhost}: {e:#}")),
            }
        }
        if self.created_db {
            match drop_database(&self.pg_server, &self.db_name).await {
                Ok(()) => self.created_db = false,
                Err(e) => errors.push(format!("drop database {}: {e:#}", self.db_name)),
            }
        }
        if let Err(e) = redis_delete_prefix(&self.redis_url, &self.redis_prefix).await {
            errors.push(format!("delete Redis keys {}*: {e:#}", self.redis_prefix));
        }
        errors
    }
}

async fn drop_database(server: &str, name: &str) -> Result<()> {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    let mut conn = AsyncPgConnection::establish(&format!("{server}/postgres")).await?;
    diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    Ok(())
}

async fn redis_delete_prefix(url: &str, prefix: &str) -> Result<()> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut con)
        .await?;
    if !keys.is_empty() {
        redis::cmd("DEL").arg(keys).query_async::<()>(&mut con).await?;
    }
    Ok(())
}

pub async fn redis_version(url: &str) -> Result<String> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut con).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned())
}

pub async fn postgres_version(server: &str) -> Result<String> {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct V {
        #[diesel(sql_type = diesel::sql_types::Text)]
        server_version: String,
    }
    let mut conn = AsyncPgConnection::establish(&format!("{server}/postgres")).await?;
    let v: V = diesel::sql_query("SHOW server_version").get_result(&mut conn).await?;
    Ok(v.server_version)
}

// ---------------------------------------------------------------- service

pub const ADMIN_TOKEN_LEN: usize = 32;

/// The service's settings for this run: `config/default.toml` (and any
/// `GATEWAY__*` overrides) with the run's isolation, the built-in generator
/// off (the bench publishes its own events) and a random admin token.
pub fn settings(iso: &Isolation, products: u32) -> Result<Settings> {
    let root = repo_root();
    let mut s = shipped_settings()?;
    s.server.host = "127.0.0.1".into();
    s.server.static_dir = root.join("static").display().to_string();
    let token: String = uuid::Uuid::new_v4().simple().to_string();
    debug_assert_eq!(token.len(), ADMIN_TOKEN_LEN);
    s.admin.token = Secret::new(token);
    s.admin.dev_mode = false;
    // The ingest scenario posts changes with it.
    s.ingest.token = Secret::new(uuid::Uuid::new_v4().simple().to_string());
    s.database.url = Secret::new(iso.db_url());
    s.redis.url = Secret::new(iso.redis_url.clone());
    s.redis.key_prefix = iso.redis_prefix.clone();
    s.rabbit.url = Secret::new(iso.amqp_url(&iso.vhost));
    s.rabbit.management_url = format!("http://{}", rabbit_api().0);
    s.generator.enabled = false;
    s.seed.products = products;
    // Bench clients are anonymous and some watch `product.#`.
    s.auth.anonymous_patterns = vec!["#".into()];
    // 19,000 clients at once in the selective fan-out scenario.
    s.hub.max_connections = s.hub.max_connections.max(19_500);
    // Every bench client comes from 127.0.0.1 and stands for a different
    // browser: the per-address limit would otherwise cap them all at once.
    s.hub.max_connections_per_ip = s.hub.max_connections_per_ip.max(s.hub.max_connections);
    raise_per_address_turns(&mut s);
    Ok(s)
}

/// `config/default.toml` with any `GATEWAY__*` overrides, as the service
/// would load it.
pub fn shipped_settings() -> Result<Settings> {
    let dir = std::env::var("GATEWAY_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("config"));
    Settings::load(&dir).with_context(|| format!("load settings from {}", dir.display()))
}

/// Every bench client comes from 127.0.0.1: the per-address caps on
/// snapshots and catch-ups would otherwise hold a scenario's many
/// "browsers" to one address's share. Scenario 9, which measures those
/// caps, keeps the shipped ones.
pub fn raise_per_address_turns(s: &mut Settings) {
    s.hub.max_snapshots_per_ip = s.hub.max_snapshots_per_ip.max(s.hub.max_concurrent_snapshots);
    s.hub.max_catch_ups_per_ip = s.hub.max_catch_ups_per_ip.max(s.hub.max_concurrent_catch_ups);
}

/// One instance of the service running in this process.
pub struct Instance {
    pub port: u16,
    pub state: web::Data<AppState>,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Instance {
    pub async fn start(settings: Settings, seed: bool) -> Result<Instance> {
        let listener = product_gateway::startup::bind("127.0.0.1", 0, settings.server.listen_backlog)?;
        let products = settings.seed.products;
        let app = Application::build(settings, listener)
            .await
            .context("start the service (Application::build)")?;
        let state = app.state();
        if seed {
            product_gateway::seed::seed(&state.db, products)
                .await
                .context("seed the catalog")?;
        }
        let port = app.port();
        let token = app.shutdown_token();
        let handle = tokio::spawn(app.run_until_stopped());
        let inst = Instance {
            port,
            state,
            token,
            handle,
        };
        // Ready: the broker answers and the pipeline's consumers are up.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = http(&inst.host(), "GET", "/readyz", &[], None).await;
            if matches!(&r, Ok(r) if r.status == 200) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the service did not become ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(inst)
    }

    /// Cancelling it stops the instance (used when a scenario fails).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.token.clone()
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Sum of a metric's samples whose line contains `label`.
    pub fn metric(&self, name: &str, label: &str) -> f64 {
        testkit::metric_value(&self.metrics_text(), name, label)
    }

    /// The service's metrics, as `/metrics` serves them.
    pub fn metrics_text(&self) -> String {
        self.state.metrics.render()
    }

    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        match tokio::time::timeout(Duration::from_secs(30), self.handle).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(anyhow!("service task failed: {e}")),
            Err(_) => Err(anyhow!("the service did not stop within 30 s")),
        }
    }
}

// ---------------------------------------------------------- CPU and perf

/// CPU time of every process, by pid: (name, clock ticks).
pub struct CpuSample {
    at: Instant,
    ticks: HashMap<u32, (String, u64)>,
}

impl CpuSample {
    /// CPU of process `pid` since `earlier`, in % of one core.
    pub fn pct_of(&self, earlier: &CpuSample, pid: u32) -> f64 {
        let ticks = |s: &CpuSample| s.ticks.get(&pid).map_or(0, |(_, t)| *t);
        let secs = self.at.duration_since(earlier.at).as_secs_f64().max(1e-3);
        // /proc counts in clock ticks of 1/100 s on Linux.
        (ticks(self).saturating_sub(ticks(earlier))) as f64 / 100.0 / secs * 100.0
    }
}

pub fn cpu_sample() -> CpuSample {
    let mut ticks = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat[open + 1..close].to_owned();
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let t = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            // Fields 14 and 15 of stat (utime, stime), counted after the comm.
            ticks.insert(pid, (comm, t(11) + t(12)));
        }
    }
    CpuSample {
        at: Instant::now(),
        ticks,
    }
}

/// CPU used between two samples by one program, in % of one core.
pub struct Share {
    pub name: String,
    pub pct: f64,
    /// Part of the benchmark (the service, its services, the load);
    /// false for anything else running on the machine at the time.
    pub ours: bool,
}

/// CPU used between two samples, by program, largest first. The bench's
/// own process (the service and the in-process publisher and tracking
/// client) is "gateway (bench process)"; its children are "bench clients".
pub fn cpu_shares(a: &CpuSample, b: &CpuSample) -> Vec<Share> {
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let me = std::process::id();
    let mut by: HashMap<String, (f64, bool)> = HashMap::new();
    for (pid, (comm, t1)) in &b.ticks {
        let t0 = a.ticks.get(pid).map(|(_, t)| *t).unwrap_or(0);
        let used = t1.saturating_sub(t0) as f64 / hz / secs * 100.0;
        if used <= 0.0 {
            continue;
        }
        let (name, ours) = match comm.as_str() {
            _ if *pid == me => ("gateway (bench process)".to_owned(), true),
            "bench" => ("bench clients".to_owned(), true),
            "beam.smp" | "erl_child_setup" | "inet_gethost" | "epmd" => ("rabbitmq (beam.smp)".to_owned(), true),
            "postgres" => ("postgresql".to_owned(), true),
            c if c.starts_with("redis") => ("redis".to_owned(), true),
            c if c.starts_with("nginx") => ("nginx".to_owned(), true),
            "wrk" | "perf" => (comm.clone(), true),
            c => (c.to_owned(), false),
        };
        let e = by.entry(name).or_insert((0.0, ours));
        e.0 += used;
    }
    let mut v: Vec<Share> = by
        .into_iter()
        .filter(|(_, (u, _))| *u >= 1.0)
        .map(|(name, (pct, ours))| Share { name, pct, ours })
        .collect();
    v.sort_by(|x, y| y.pct.total_cmp(&x.pct));
    v
}

/// CPU of programs that are not part of the benchmark.
pub fn foreign_pct(v: &[Share]) -> f64 {
    v.iter().filter(|s| !s.ours).map(|s| s.pct).sum()
}

pub fn format_shares(v: &[Share]) -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) * 100;
    let ours: Vec<String> = v
        .iter()
        .filter(|s| s.ours)
        .take(7)
        .map(|s| format!("{} {:.0}%", s.name, s.pct))
        .collect();
    let total: f64 = v.iter().map(|s| s.pct).sum();
    let mut text = format!("{} (all programs {total:.0}% of {cores}%)", ours.join(", "));
    let foreign: Vec<String> = v
        .iter()
        .filter(|s| !s.ours)
        .take(4)
        .map(|s| format!("{} {:.0}%", s.name, s.pct))
        .collect();
    if !foreign.is_empty() {
        text.push_str(&format!("; **not part of the bench**: {}", foreign.join(", ")));
    }
    text
}

/// Waits (at most what is left of `budget`) until programs that are not
/// part of the benchmark use under 15% of a core, so they do not skew a
/// measurement; returns their share at the end.
pub async fn wait_quiet(budget: &mut Duration) -> f64 {
    let mut said = false;
    loop {
        let a = cpu_sample();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let shares = cpu_shares(&a, &cpu_sample());
        let foreign = foreign_pct(&shares);
        if foreign < 15.0 || budget.is_zero() {
            return foreign;
        }
        if !said {
            let who: Vec<String> = shares
                .iter()
                .filter(|s| !s.ours)
                .take(3)
                .map(|s| format!("{} {:.0}%", s.name, s.pct))
                .collect();
            eprintln!(
                "bench: waiting (up to {} s in all) for other programs to go quiet: {}",
                budget.as_secs(),
                who.join(", ")
            );
            said = true;
        }
        *budget = budget.saturating_sub(Duration::from_secs(1));
    }
}

/// System-wide `perf record` for a while; None when perf does not work here.
pub struct Perf {
    child: tokio::process::Child,
    file: PathBuf,
}

pub fn perf_works() -> bool {
    let file = std::env::temp_dir().join(format!("bench-perf-probe-{}.data", std::process::id()));
    let ok = std::process::Command::new("perf")
        .args(["record", "-q", "-a", "-F", "99", "-o"])
        .arg(&file)
        .args(["--", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&file);
    ok
}

impl Perf {
    pub fn start(label: &str, secs: u64) -> Option<Perf> {
        let file = std::env::temp_dir().join(format!("bench-perf-{}-{label}.data", std::process::id()));
        let child = tokio::process::Command::new("perf")
            .args(["record", "-q", "-a", "-F", "199", "-o"])
            .arg(&file)
            .args(["--", "sleep", &secs.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        Some(Perf { child, file })
    }

    /// Waits for the recording; returns where the machine's CPU went (by
    /// thread name and object), and inside the bench process (the service)
    /// by thread and by symbol.
    pub async fn report(mut self, top: usize) -> Option<String> {
        let _ = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        let me = std::process::id().to_string();
        let mut sections = Vec::new();
        for (title, args, n) in [
            (
                "machine-wide, by thread name and object",
                vec!["--sort", "comm,dso"],
                top,
            ),
            (
                "the bench process (the service, and the bench's tracking client thread), by thread",
                vec!["--pid", me.as_str(), "--sort", "comm"],
                8,
            ),
            (
                "the bench process, by object and symbol",
                vec!["--pid", me.as_str(), "--sort", "dso,sym"],
                top,
            ),
        ] {
            let out = tokio::process::Command::new("perf")
                .args(["report", "--stdio", "--no-children"])
                .args(&args)
                .arg("-i")
                .arg(&self.file)
                .output()
                .await
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<String> = text
                .lines()
                .filter(|l| l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit()))
                .take(n)
                .map(|l| {
                    let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
                    if l.chars().count() > 140 {
                        format!("{}…", l.chars().take(140).collect::<String>())
                    } else {
                        l
                    }
                })
                .collect();
            if !lines.is_empty() {
                sections.push(format!("{title}:\n{}", lines.join("\n")));
            }
        }
        let _ = std::fs::remove_file(&self.file);
        (!sections.is_empty()).then(|| sections.join("\n\n"))
    }
}

// ---------------------------------------------------------------- machine

pub fn mem_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0)
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

pub fn command_version(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_else(|| "not installed".into())
}
