//! The bench's client fleets, each run as a child process (the same binary
//! with a subcommand) so that their sockets, memory and CPU are not the
//! service's: the service runs in the parent, and the parent's resident
//! memory is the service's alone.
//!
//! Protocol with the parent: one line `READY {json}` on stdout once every
//! client is connected and subscribed, then `RESULT {json}` (fan-out) or
//! nothing until the parent writes `STOP` or closes stdin (idle).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::harness::raise_nofile;
use crate::wire::{self, Sse, Ws, now_us};

pub struct Args(Vec<String>);

impl Args {
    pub fn new(v: Vec<String>) -> Self {
        Args(v)
    }
    pub fn get(&self, name: &str) -> Result<String> {
        let flag = format!("--{name}");
        self.0
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| self.0.get(i + 1))
            .cloned()
            .ok_or_else(|| anyhow!("missing {flag}"))
    }
    pub fn num<T: std::str::FromStr>(&self, name: &str) -> Result<T> {
        self.get(name)?
            .parse()
            .map_err(|_| anyhow!("--{name} must be a number"))
    }
}

/// Runs the fleet on a runtime of its own; at the end, does not wait for
/// a blocking read of stdin that may still be pending.
pub fn run_fleet<F: Future<Output = Result<()>>>(fleet: F) -> Result<()> {
    // One thread by default: a thousand sockets each woken a hundred times a
    // second cost less CPU on one thread than with wake-ups across two.
    let threads: usize = std::env::var("BENCH_CLIENT_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("bench-client")
            .enable_all()
            .build()?
    };
    let result = rt.block_on(fleet);
    rt.shutdown_background();
    result
}

/// A fleet's connection phase, shared by its client tasks: each client
/// opens behind a gate of so many attempts at once (a burst of thousands of
/// handshakes would time out against a busy service) and within a minute;
/// the fleet then waits for all of them, and stops at the first failure.
pub struct Connecting {
    gate: Semaphore,
    ready: AtomicUsize,
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Connecting {
    pub fn new(at_once: usize) -> Arc<Self> {
        Arc::new(Connecting {
            gate: Semaphore::new(at_once),
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            first_error: Mutex::new(None),
        })
    }

    /// Opens one client through the gate: Some when it connected, None
    /// when it failed (counted, and its error kept if it was the first).
    pub async fn open<T>(&self, opening: impl Future<Output = Result<T>>) -> Option<T> {
        let permit = self.gate.acquire().await;
        let opened = tokio::time::timeout(Duration::from_secs(60), opening)
            .await
            .map_err(|_| anyhow!("connect timed out"))
            .and_then(|r| r);
        drop(permit);
        match opened {
            Ok(client) => {
                self.ready.fetch_add(1, Ordering::SeqCst);
                Some(client)
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                self.fail(format!("{e:#}"));
                None
            }
        }
    }

    /// Keeps `why` if it is the fleet's first error (a connected client
    /// that later fails reports here too).
    pub fn fail(&self, why: String) {
        lock(&self.first_error).get_or_insert(why);
    }

    pub fn first_error(&self) -> Option<String> {
        lock(&self.first_error).clone()
    }

    pub fn ready(&self) -> usize {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    /// Waits until all `n` clients are connected; an error at the first
    /// failure, or when `within` passes first.
    pub async fn all_up(&self, n: usize, what: &str, within: Duration) -> Result<()> {
        self.wait(n, what, within, false).await
    }

    /// Waits until each of `n` clients has connected or failed (a fleet
    /// that reports how many it could hold); an error when `within` passes.
    pub async fn all_tried(&self, n: usize, what: &str, within: Duration) -> Result<()> {
        self.wait(n, what, within, true).await
    }

    /// Waits until `n` clients are up, or, `failures_count`, have at least
    /// tried; without it the first failure ends the wait.
    async fn wait(&self, n: usize, what: &str, within: Duration, failures_count: bool) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let settled = self.ready() + if failures_count { self.failed() } else { 0 };
            if settled >= n {
                return Ok(());
            }
            if !failures_count && let Some(e) = self.first_error() {
                bail!("a {what} failed while connecting: {e}");
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} {what}s connected within {} s",
                    self.ready(),
                    within.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Locks a mutex whose data stays usable when a holder panicked (the
/// fleets only count and collect under their locks).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Ws,
    Sse,
    Stomp,
}

impl Proto {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ws" => Proto::Ws,
            "sse" => Proto::Sse,
            "stomp" => Proto::Stomp,
            other => bail!("unknown protocol {other}"),
        })
    }
}

enum Client {
    Ws(Ws),
    Sse(Sse),
}

async fn open(proto: Proto, addr: SocketAddr, vhost: &str) -> Result<Client> {
    Ok(match proto {
        Proto::Ws => Client::Ws(wire::gateway_ws(addr, &["product.#"], None).await?),
        Proto::Sse => Client::Sse(Sse::connect(addr, "/events?topics=product.%23").await?),
        Proto::Stomp => Client::Ws(
            wire::stomp_subscribe(
                addr,
                vhost,
                &format!("/exchange/{}/product.#", crate::load::STOMP_EXCHANGE),
            )
            .await?,
        ),
    })
}

/// Measurement window, in wall-clock µs (the `ts_us` clock); i64::MAX
/// until the parent's publisher starts.
struct Window {
    start: AtomicI64,
    end: AtomicI64,
}

struct Tally {
    count: u64,
    lat: Vec<u32>,
}

impl Tally {
    #[inline]
    fn see(&mut self, ts_us: i64, w: &Window) {
        let now = now_us();
        if now >= w.start.load(Ordering::Relaxed) && now < w.end.load(Ordering::Relaxed) {
            self.count += 1;
            self.lat.push((now - ts_us).clamp(0, u32::MAX as i64) as u32);
        }
    }
}

/// Reads updates until `done`, counting those received inside the window.
async fn receive(proto: Proto, client: Client, w: Arc<Window>, done: CancellationToken) -> Result<Tally> {
    let mut t = Tally {
        count: 0,
        lat: Vec::with_capacity(2048),
    };
    match client {
        Client::Ws(mut ws) => {
            let see = |p: &[u8], t: &mut Tally| match proto {
                Proto::Stomp => {
                    // One or more STOMP frames, each ending in NUL.
                    // Every update in it counts (one per message here).
                    for frame in p.split(|&b| b == 0) {
                        if frame.starts_with(b"MESSAGE") {
                            let mut rest = frame;
                            while let Some(i) = wire::find(rest, b"\"ts_us\":") {
                                if let Some(ts) = wire::num_after(&rest[i..], b"\"ts_us\":") {
                                    t.see(ts, &w);
                                }
                                rest = &rest[i + 8..];
                            }
                        }
                    }
                }
                _ => {
                    if p.starts_with(b"{\"type\":\"update\"")
                        && let Some(ts) = wire::num_after_last(p, b"\"ts_us\":")
                    {
                        t.see(ts, &w);
                    }
                }
            };
            tokio::select! {
                r = ws.data_frames("a client", |p| see(p, &mut t)) => r.map(|()| t),
                _ = done.cancelled() => Ok(t),
            }
        }
        Client::Sse(mut sse) => loop {
            while let Some(len) = sse.event_len() {
                if let Some(ts) = wire::num_after_last(&sse.body[..len], b"\"ts_us\":") {
                    t.see(ts, &w);
                }
                sse.consume_event(len);
            }
            tokio::select! {
                more = sse.fill() => if !more? { bail!("the server ended an event stream") },
                _ = done.cancelled() => return Ok(t),
            }
        },
    }
}

/// `bench fanout-clients --proto ws|sse|stomp --addr A --n N --vhost V
/// --warmup-ms W --window-ms M`
pub fn fanout_clients(args: Args) -> Result<()> {
    raise_nofile()?;
    let proto = Proto::parse(&args.get("proto")?)?;
    let addr: SocketAddr = args.get("addr")?.parse()?;
    let n: usize = args.num("n")?;
    let vhost = args.get("vhost")?;
    let warmup = Duration::from_millis(args.num("warmup-ms")?);
    let window = Duration::from_millis(args.num("window-ms")?);
    run_fleet(async move {
        let w = Arc::new(Window {
            start: AtomicI64::new(i64::MAX),
            end: AtomicI64::new(i64::MAX),
        });
        let done = CancellationToken::new();
        let connecting = Connecting::new(100);
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let (w, done, connecting, vhost) = (w.clone(), done.clone(), connecting.clone(), vhost.clone());
            tasks.push(tokio::spawn(async move {
                let Some(client) = connecting.open(open(proto, addr, &vhost)).await else {
                    bail!("not connected");
                };
                receive(proto, client, w, done).await
            }));
        }
        connecting.all_up(n, "client", Duration::from_secs(120)).await?;
        let connect_secs = started.elapsed().as_secs_f64();
        println!("READY {}", json!({ "connect_secs": connect_secs }));
        let start = now_us() + warmup.as_micros() as i64;
        w.start.store(start, Ordering::SeqCst);
        w.end.store(start + window.as_micros() as i64, Ordering::SeqCst);
        tokio::time::sleep(warmup + window + Duration::from_millis(200)).await;
        done.cancel();
        let mut total = 0u64;
        let mut lat: Vec<u32> = Vec::new();
        let (mut min_c, mut max_c) = (u64::MAX, 0u64);
        let mut errors = Vec::new();
        for t in tasks {
            match t.await {
                Ok(Ok(t)) => {
                    total += t.count;
                    min_c = min_c.min(t.count);
                    max_c = max_c.max(t.count);
                    lat.extend_from_slice(&t.lat);
                }
                Ok(Err(e)) => errors.push(format!("{e:#}")),
                Err(e) => errors.push(e.to_string()),
            }
        }
        lat.sort_unstable();
        let p = |q: f64| crate::load::pct_ms(&lat, q);
        let result = json!({
            "clients": n,
            "window_secs": window.as_secs_f64(),
            "delivered": total,
            "per_sec": total as f64 / window.as_secs_f64(),
            "min_client": if min_c == u64::MAX { 0 } else { min_c },
            "max_client": max_c,
            "p50_ms": p(50.0), "p99_ms": p(99.0), "p999_ms": p(99.9),
            "max_ms": lat.last().map(|l| f64::from(*l) / 1000.0).unwrap_or(f64::NAN),
            "errors": errors.len(),
            "first_error": errors.first(),
        });
        println!("RESULT {result}");
        Ok(())
    })
}

/// `bench idle-clients --addr A --ws N --sse M`: N WebSocket and M SSE
/// connections, each subscribed to one product's topic, idle (answering
/// pings) until the parent says STOP.
pub fn idle_clients(args: Args) -> Result<()> {
    let limit = raise_nofile()?;
    let addr: SocketAddr = args.get("addr")?.parse()?;
    let n_ws: usize = args.num("ws")?;
    let n_sse: usize = args.num("sse")?;
    run_fleet(async move {
        let done = CancellationToken::new();
        let connecting = Connecting::new(200);
        let started = Instant::now();
        let total = n_ws + n_sse;
        for i in 0..total {
            let (done, connecting) = (done.clone(), connecting.clone());
            tokio::spawn(async move {
                let product = i % 1000 + 1;
                let opened = connecting.open(async {
                    if i < n_ws {
                        let topic = format!("product.price.{product}");
                        wire::gateway_ws(addr, &[topic.as_str()], None).await.map(Client::Ws)
                    } else {
                        Sse::connect(addr, &format!("/events?topics=product.stock.{product}"))
                            .await
                            .map(Client::Sse)
                    }
                });
                if let Some(client) = opened.await {
                    idle(client, done).await;
                }
            });
        }
        connecting
            .all_tried(total, "idle client", Duration::from_secs(180))
            .await?;
        println!(
            "READY {}",
            json!({ "secs": started.elapsed().as_secs_f64(), "connected": connecting.ready(),
                    "failed": connecting.failed(), "first_error": connecting.first_error(), "nofile": limit })
        );
        // Idle until told to stop (or the parent goes away).
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let _ = tokio::time::timeout(Duration::from_secs(300), lines.next_line()).await;
        done.cancel();
        Ok(())
    })
}

async fn idle(client: Client, done: CancellationToken) {
    match client {
        Client::Ws(mut ws) => loop {
            while let Some(f) = ws.frame() {
                if f.op == wire::OP_PING {
                    if ws.pong(&f).await.is_err() {
                        return;
                    }
                } else {
                    ws.consume(&f);
                }
            }
            tokio::select! {
                n = ws.fill() => if !matches!(n, Ok(k) if k > 0) { return },
                _ = done.cancelled() => return,
            }
        },
        Client::Sse(mut sse) => loop {
            while let Some(len) = sse.event_len() {
                sse.consume_event(len);
            }
            tokio::select! {
                more = sse.fill() => if !matches!(more, Ok(true)) { return },
                _ = done.cancelled() => return,
            }
        },
    }
}

/// Parent side: a running child and its stdout lines.
pub struct Child {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    pub fn spawn(args: &[String]) -> Result<Child> {
        let exe = std::env::current_exe().context("path of the bench binary")?;
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start a client process")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        Ok(Child {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        })
    }

    /// The JSON of the next line starting with `tag`.
    pub async fn expect(&mut self, tag: &str, within: Duration) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .map_err(|_| anyhow!("client process: no {tag} within {within:?}"))??;
            let Some(line) = line else {
                let status = self.child.wait().await?;
                bail!("client process exited ({status}) before {tag} (see its error above)");
            };
            if let Some(rest) = line.strip_prefix(tag) {
                return Ok(serde_json::from_str(rest.trim())?);
            }
        }
    }

    /// Writes one line to the child's stdin.
    pub async fn send(&mut self, line: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let stdin = self
            .child
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("client process: stdin closed"))?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    pub async fn stop(mut self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"STOP\n").await;
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(r) => {
                r?;
            }
            Err(_) => {
                let _ = self.child.kill().await;
            }
        }
        Ok(())
    }
}

/// `bench publish --url U --exchange E --products N --first-seq S
/// [--rate R | --window W] [--secs D] [--count C]`: the event publisher, in
/// a process of its own so that its CPU is not counted as the service's.
/// Closed loop: the parent writes `SEEN n` lines (events delivered so far);
/// `STOP` (or the end of stdin) ends the run. Prints `STARTED`, `SENT n`
/// every 100 ms, then `RESULT {json}`.
pub fn publish_proc(args: Args) -> Result<()> {
    use crate::load::{Pace, PublishJob, publish};
    let url = args.get("url")?;
    let exchange = args.get("exchange")?;
    let products: i64 = args.num("products")?;
    let first_seq: u64 = args.num("first-seq")?;
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pace = match (args.num::<f64>("rate"), args.num::<u64>("window")) {
        (Ok(r), _) => Pace::Rate(r),
        (_, Ok(window)) => Pace::Closed {
            window,
            seen: seen.clone(),
        },
        _ => bail!("--rate or --window is needed"),
    };
    let duration = args.num::<f64>("secs").ok().map(Duration::from_secs_f64);
    let mirror = args.get("mirror").ok();
    let count = args.num::<u64>("count").ok();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = rt.block_on(async move {
        let stop = CancellationToken::new();
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let job = PublishJob {
            url,
            exchange,
            seq: Arc::new(std::sync::atomic::AtomicU64::new(first_seq)),
            products,
            pace,
            duration,
            count,
            stop: stop.clone(),
            sent: sent.clone(),
            mirror,
        };
        {
            let (seen, stop) = (seen.clone(), stop.clone());
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(n) = line.strip_prefix("SEEN ").and_then(|n| n.trim().parse().ok()) {
                        seen.store(n, Ordering::Relaxed);
                    } else if line.trim() == "STOP" {
                        break;
                    }
                }
                stop.cancel();
            });
        }
        {
            let sent = sent.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    println!("SENT {}", sent.load(Ordering::Relaxed));
                }
            });
        }
        println!("STARTED");
        let run = publish(job).await?;
        println!(
            "RESULT {}",
            json!({ "first_seq": run.first_seq, "end_seq": run.end_seq, "secs": run.secs,
                "confirmed_secs": run.confirmed_secs, "confirm_mean_ms": run.confirm_mean_ms })
        );
        Ok(())
    });
    // A blocking read of stdin may still be pending: do not wait for it.
    rt.shutdown_background();
    result
}

/// Parent side of `bench publish`.
pub struct PubProc {
    pub sent: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
    result: tokio::sync::oneshot::Receiver<Result<crate::load::PublishRun>>,
    seq: Arc<std::sync::atomic::AtomicU64>,
    _child: tokio::process::Child,
}

impl PubProc {
    /// Starts a publisher process; `seq` is the run's event counter, moved
    /// past the events this one publishes when it is done.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        url: &str,
        exchange: &str,
        products: i64,
        seq: Arc<std::sync::atomic::AtomicU64>,
        pace: crate::load::Pace,
        duration: Option<Duration>,
        count: Option<u64>,
        mirror: Option<&str>,
    ) -> Result<PubProc> {
        use crate::load::Pace;
        use tokio::io::AsyncWriteExt;
        let mut args: Vec<String> = vec![
            "publish".into(),
            "--url".into(),
            url.into(),
            "--exchange".into(),
            exchange.into(),
            "--products".into(),
            products.to_string(),
            "--first-seq".into(),
            seq.load(Ordering::SeqCst).to_string(),
        ];
        let seen = match &pace {
            Pace::Rate(r) => {
                args.extend(["--rate".into(), r.to_string()]);
                None
            }
            Pace::Closed { window, seen } => {
                args.extend(["--window".into(), window.to_string()]);
                Some(seen.clone())
            }
        };
        if let Some(d) = duration {
            args.extend(["--secs".into(), d.as_secs_f64().to_string()]);
        }
        if let Some(c) = count {
            args.extend(["--count".into(), c.to_string()]);
        }
        if let Some(m) = mirror {
            args.extend(["--mirror".into(), m.to_owned()]);
        }
        let exe = std::env::current_exe().context("path of the bench binary")?;
        let mut child = tokio::process::Command::new(exe)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start the publisher process")?;
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(l))) if l == "STARTED" => {}
            Ok(Ok(Some(l))) => bail!("publisher process: unexpected {l:?}"),
            _ => bail!("publisher process did not start (see its error above)"),
        }
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut result = Err(anyhow!(
                    "the publisher process ended without a result (see its error above)"
                ));
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(n) = line.strip_prefix("SENT ").and_then(|n| n.trim().parse().ok()) {
                        sent.store(n, Ordering::Relaxed);
                    } else if let Some(json) = line.strip_prefix("RESULT ") {
                        result = serde_json::from_str::<serde_json::Value>(json)
                            .map_err(anyhow::Error::from)
                            .and_then(|v| {
                                let g = |k: &str| v[k].as_u64().ok_or_else(|| anyhow!("bad publisher result {v}"));
                                Ok(crate::load::PublishRun {
                                    first_seq: g("first_seq")?,
                                    end_seq: g("end_seq")?,
                                    secs: v["secs"].as_f64().unwrap_or(f64::NAN),
                                    confirmed_secs: v["confirmed_secs"].as_f64().unwrap_or(f64::NAN),
                                    confirm_mean_ms: v["confirm_mean_ms"].as_f64().unwrap_or(f64::NAN),
                                })
                            });
                        break;
                    }
                }
                let _ = tx.send(result);
            });
        }
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                let base = seen.as_ref().map(|s| s.load(Ordering::SeqCst)).unwrap_or(0);
                let mut last = 0;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            let _ = stdin.write_all(b"STOP\n").await;
                            // Keep stdin open until the child is done.
                            tokio::time::sleep(Duration::from_secs(120)).await;
                            return;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                    }
                    if let Some(s) = &seen {
                        let n = s.load(Ordering::Relaxed).saturating_sub(base);
                        if n != last {
                            last = n;
                            if stdin.write_all(format!("SEEN {n}\n").as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
        Ok(PubProc {
            sent,
            stop,
            result: rx,
            seq,
            _child: child,
        })
    }

    /// Asks the publisher to finish now.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits for the end of the run (its duration, count or `stop`).
    pub async fn wait(self) -> Result<crate::load::PublishRun> {
        let run = tokio::time::timeout(Duration::from_secs(180), self.result)
            .await
            .map_err(|_| anyhow!("the publisher process did not finish"))?
            .map_err(|_| anyhow!("publisher process reader ended"))??;
        self.stop.cancel();
        self.seq.fetch_max(run.end_seq, Ordering::SeqCst);
        Ok(run)
    }
}
