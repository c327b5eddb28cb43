//! Scenario 9's client processes: `bench slow-healthy` (selective clients
//! that read everything, plus the probes that take a snapshot and a resume
//! every few seconds) and `bench slow-stalled` (clients, snapshots and
//! resumes that the parent then freezes with SIGSTOP). Their sockets are
//! bound to a source address of the loopback network (127.0.0.x) before
//! connecting: the service limits snapshots and stream catch-ups per client
//! address, so the stalled requests must come from several addresses to take
//! every instance-wide turn, and the healthy probes from one of their own.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::time::Instant as Deadline;

use crate::fleet::{Args, Connecting, lock, run_fleet};
use crate::harness::raise_nofile;
use crate::load::key_of;
use crate::wire::{OP_CLOSE, OP_PING, Sse, SseOpen, UpdateInfo, Ws, WsEvent, close_code, find, now_us, num_after};

/// Both wildcard topics: every update there is, the way a stalled client
/// gets its queue filled at the publisher's whole rate.
const WILDCARD: [&str; 2] = ["product.price.*", "product.stock.*"];
const WILDCARD_QUERY: &str = "product.price.*,product.stock.*";
/// Connection attempts at once per process.
const CONNECTING: usize = 200;

/// The product healthy client `i` watches: spread over `lo..lo + span`
/// (the products the measured window's events touch), not in order.
pub fn healthy_product(i: usize, lo: u64, span: u64) -> u64 {
    let mut x = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    lo + (x ^ (x >> 31)) % span
}

/// Opens a WebSocket from `src` and subscribes with `subscribe` (the
/// frame's fields besides `op`), waiting for `subscribed`.
async fn subscribe(src: Ipv4Addr, addr: SocketAddr, mut subscribe: serde_json::Value) -> Result<Ws> {
    let mut ws = Ws::connect_from(Some(src), addr, "/ws", None).await?;
    subscribe["op"] = "subscribe".into();
    ws.send_json(&subscribe).await?;
    let deadline = Deadline::now() + Duration::from_secs(30);
    loop {
        match ws.next(deadline).await? {
            WsEvent::Text(m) if find(&m, b"\"type\":\"subscribed\"").is_some() => return Ok(ws),
            WsEvent::Text(m) if find(&m, b"\"type\":\"error\"").is_some() => {
                bail!("subscribe refused: {}", String::from_utf8_lossy(&m))
            }
            WsEvent::Text(_) => {}
            WsEvent::Closed(code) => bail!("closed ({code:?}) before subscribed"),
        }
    }
}

/// An event stream from `src`, a refusal being an error.
async fn sse_stream(src: Ipv4Addr, addr: SocketAddr, path: &str) -> Result<Sse> {
    match Sse::open(Some(src), addr, path, &[]).await? {
        SseOpen::Stream(s) => Ok(s),
        SseOpen::Refused(status) => bail!("event stream refused: HTTP {status}"),
    }
}

/// The event's name (`event: X`), looked for in its first lines only.
fn event_is(event: &[u8], name: &[u8]) -> bool {
    let head = &event[..event.len().min(48)];
    find(head, b"event: ").is_some_and(|i| head[i + 7..].starts_with(name))
}

/// The `code` of an error frame or event.
fn code_of(text: &[u8]) -> String {
    let key = b"\"code\":\"";
    find(text, key)
        .map(|i| {
            let rest = &text[i + key.len()..];
            let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// `reset <reason>` of a reset frame or event.
fn reset_why(text: &[u8]) -> String {
    let key = b"\"reason\":\"";
    let reason = find(text, key).map(|i| {
        let rest = &text[i + key.len()..];
        let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..end]).into_owned()
    });
    format!("reset {}", reason.as_deref().unwrap_or("?"))
}

/// When a `busy` or `unavailable` says to come back (`retry_ms`).
fn retry_of(text: &[u8]) -> Duration {
    Duration::from_millis(num_after(text, b"\"retry_ms\":").unwrap_or(0).max(0) as u64)
}

fn io_label(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => "reset (RST)".to_owned(),
        std::io::ErrorKind::BrokenPipe => "broken pipe".to_owned(),
        k => format!("socket error {k:?}"),
    }
}

fn wildcard_path(extra: &str) -> String {
    format!("/events?topics={WILDCARD_QUERY}{extra}")
}

// ------------------------------------------------------ healthy clients

/// One delivery to a healthy client: its event number and latency.
struct Seen {
    client: u32,
    seq: u64,
    ts_us: i64,
    latency_us: u32,
}

/// One probe: a snapshot or a resume, tried at most twice.
struct ProbeRec {
    kind: &'static str,
    transport: &'static str,
    start_us: i64,
    tries: u8,
    ok: bool,
    /// Of the attempt that succeeded, or of the last one.
    ms: f64,
    /// Why the first attempt failed ("" when it did not).
    first_why: String,
}

#[derive(Default)]
struct ProbeLog {
    records: Vec<ProbeRec>,
    /// Every probe connection: (opened µs, closed µs, WebSocket?), so that
    /// the parent can tell them from stalled clients in the service's gauge.
    conns: Vec<(i64, i64, bool)>,
    /// Start of the probe in flight, if any.
    in_flight: Option<i64>,
}

/// `bench slow-healthy --addr A --src IP --n N --first I --lo-product L
/// --span S --catalog C [--probe-src IP --probe-every-ms M]`: clients
/// `I..I+N` (even: WebSocket, odd: SSE), each on one product's price and
/// stock topics; with `--probe-src`, a probe takes a one-product snapshot
/// and a stream resume every M ms from that address. Prints `READY`, then a
/// `RESULT` for each `REPORT lo hi start_us end_us conns_from_us` (the events
/// `lo..hi`, the probes started in `start_us..end_us`, the probe connections
/// open since `conns_from_us`); ends with
/// `STOP` or stdin.
pub fn healthy(args: Args) -> Result<()> {
    raise_nofile()?;
    let addr: SocketAddr = args.get("addr")?.parse()?;
    let src: Ipv4Addr = args.get("src")?.parse()?;
    let n: usize = args.num("n")?;
    let first: usize = args.num("first")?;
    let lo: u64 = args.num("lo-product")?;
    let span: u64 = args.num("span")?;
    let catalog: i64 = args.num("catalog")?;
    let probe: Option<Ipv4Addr> = match args.get("probe-src") {
        Ok(p) => Some(p.parse()?),
        Err(_) => None,
    };
    let every = Duration::from_millis(args.num("probe-every-ms").unwrap_or(5000));
    run_fleet(async move {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let closed = Arc::new(AtomicUsize::new(0));
        let connecting = Connecting::new(CONNECTING);
        let started = Instant::now();
        for k in 0..n {
            let (seen, closed, connecting) = (seen.clone(), closed.clone(), connecting.clone());
            let product = healthy_product(first + k, lo, span);
            let ws = (first + k).is_multiple_of(2);
            tokio::spawn(async move {
                let topics = [format!("product.price.{product}"), format!("product.stock.{product}")];
                let opened = connecting.open(async {
                    if ws {
                        subscribe(src, addr, json!({ "topics": topics })).await.map(Healthy::Ws)
                    } else {
                        let path = format!("/events?topics={},{}", topics[0], topics[1]);
                        sse_stream(src, addr, &path).await.map(Healthy::Sse)
                    }
                });
                if let Some(client) = opened.await {
                    let why = record(client, k as u32, &seen).await;
                    closed.fetch_add(1, Ordering::SeqCst);
                    connecting.fail(why);
                }
            });
        }
        connecting.all_up(n, "healthy client", Duration::from_secs(150)).await?;
        let log: Arc<Mutex<ProbeLog>> = Arc::default();
        if let Some(probe_src) = probe {
            tokio::spawn(probe_loop(probe_src, addr, every, catalog, log.clone()));
        }
        println!("READY {}", json!({ "connect_secs": started.elapsed().as_secs_f64() }));
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut words = line.split_whitespace();
            if words.next() != Some("REPORT") {
                break;
            }
            let nums: Vec<i64> = words.filter_map(|w| w.parse().ok()).collect();
            let [lo_seq, hi_seq, start_us, end_us, conns_from] = nums[..] else {
                bail!("REPORT takes lo hi start_us end_us conns_from_us, got {line:?}");
            };
            // Probes started inside the window are reported whole.
            let wait_until = Instant::now() + Duration::from_secs(90);
            while lock(&log).in_flight.is_some_and(|s| s < end_us) && Instant::now() < wait_until {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let tally = Tally {
                lo_seq: lo_seq as u64,
                hi_seq: hi_seq as u64,
                from_us: start_us,
                first,
                n,
                lo,
                span,
                catalog,
            };
            let mut result = tally.count(&seen);
            result["closed"] = closed.load(Ordering::SeqCst).into();
            result["first_error"] = connecting.first_error().into();
            let log = lock(&log);
            result["probes"] = log
                .records
                .iter()
                .filter(|r| (start_us..end_us).contains(&r.start_us))
                .map(|r| {
                    json!({ "kind": r.kind, "transport": r.transport, "tries": r.tries, "ok": r.ok,
                            "ms": r.ms, "first_why": r.first_why })
                })
                .collect();
            result["conns"] = log
                .conns
                .iter()
                .filter(|(_, closed, _)| *closed >= conns_from)
                .map(|(o, c, ws)| json!([o, c, ws]))
                .collect();
            drop(log);
            println!("RESULT {result}");
        }
        Ok(())
    })
}

enum Healthy {
    Ws(Ws),
    Sse(Sse),
}

/// Records every update a healthy client receives until its connection
/// ends; returns why it did.
async fn record(client: Healthy, id: u32, seen: &Mutex<Vec<Seen>>) -> String {
    let see = |u: UpdateInfo| {
        let latency_us = (now_us() - u.ts_us).clamp(0, i64::from(u32::MAX)) as u32;
        lock(seen).push(Seen {
            client: id,
            seq: (u.version - 1) as u64,
            ts_us: u.ts_us,
            latency_us,
        });
    };
    let run = async {
        match client {
            Healthy::Ws(mut ws) => loop {
                while let Some(f) = ws.frame() {
                    match f.op {
                        OP_PING => {
                            ws.pong(&f).await?;
                            continue;
                        }
                        OP_CLOSE => bail!("the server closed a healthy client ({:?})", close_code(ws.payload(&f))),
                        _ => {}
                    }
                    let p = ws.payload(&f);
                    if p.starts_with(b"{\"type\":\"update\"")
                        && let Some(u) = UpdateInfo::parse(p)
                    {
                        see(u);
                    }
                    ws.consume(&f);
                }
                if ws.fill().await? == 0 {
                    bail!("the server closed a healthy client");
                }
            },
            Healthy::Sse(mut sse) => loop {
                while let Some(len) = sse.event_len() {
                    let event = &sse.body[..len];
                    if event_is(event, b"error") {
                        bail!("a healthy SSE client got an error event: {}", code_of(event));
                    }
                    if let Some(u) = UpdateInfo::parse(event) {
                        see(u);
                    }
                    sse.consume_event(len);
                }
                if !sse.fill().await? {
                    bail!("the server ended a healthy event stream");
                }
            },
        }
    };
    match run.await {
        Ok(()) => "a healthy client stopped".to_owned(),
        Err(e) => format!("{e:#}"),
    }
}

/// What one fleet should have received of the events `lo_seq..hi_seq`.
struct Tally {
    lo_seq: u64,
    hi_seq: u64,
    /// Where the 10 s periods of the worst latencies start.
    from_us: i64,
    first: usize,
    n: usize,
    lo: u64,
    span: u64,
    catalog: i64,
}

impl Tally {
    /// Expected is exact: event `s` changes product `key_of(s)`, and every
    /// event of the window comes out as its own update (see `load`).
    fn count(&self, seen: &Mutex<Vec<Seen>>) -> serde_json::Value {
        let mut per_product: HashMap<u64, u64> = HashMap::new();
        for s in self.lo_seq..self.hi_seq {
            let product = key_of(s, self.catalog).0 as u64;
            if (self.lo..self.lo + self.span).contains(&product) {
                *per_product.entry(product).or_default() += 1;
            }
        }
        let mut got: Vec<(u32, u64, u32, i64)> = lock(seen)
            .iter()
            .filter(|s| (self.lo_seq..self.hi_seq).contains(&s.seq))
            .map(|s| (s.client, s.seq, s.latency_us, s.ts_us))
            .collect();
        got.sort_unstable();
        let before = got.len();
        got.dedup_by_key(|(c, s, _, _)| (*c, *s));
        let duplicates = before - got.len();
        let mut per_client = vec![0u64; self.n];
        let mut wrong = 0u64;
        for (c, s, _, _) in &got {
            let product = key_of(*s, self.catalog).0 as u64;
            if product == healthy_product(self.first + *c as usize, self.lo, self.span) {
                per_client[*c as usize] += 1;
            } else {
                wrong += 1;
            }
        }
        let (mut expected, mut delivered, mut short) = (0u64, 0u64, 0u64);
        for (k, d) in per_client.iter().enumerate() {
            let want = per_product
                .get(&healthy_product(self.first + k, self.lo, self.span))
                .copied()
                .unwrap_or(0);
            expected += want;
            delivered += d.min(&want);
            short += u64::from(*d < want);
        }
        let mut lat: Vec<u32> = got.iter().map(|(_, _, l, _)| *l).collect();
        lat.sort_unstable();
        // The slowest delivery of the updates published in each 10 s from
        // `from_us`: a stall shows as a few bad periods, a saturated
        // service as all of them.
        let mut worst: Vec<u32> = Vec::new();
        for (_, _, l, ts) in &got {
            let i = ((ts - self.from_us).max(0) / 10_000_000) as usize;
            if worst.len() <= i {
                worst.resize(i + 1, 0);
            }
            worst[i] = worst[i].max(*l);
        }
        json!({
            "expected": expected, "delivered": delivered, "clients_short": short,
            "duplicates": duplicates, "wrong_product": wrong, "lat_us": lat, "worst_us_by_10s": worst,
        })
    }
}

/// One probe attempt's outcome.
struct Try {
    ok: bool,
    why: String,
    ms: f64,
    offset: Option<u64>,
    /// What a refusal said to wait before asking again.
    retry: Duration,
}

/// An attempt's outcome: (served, why not, offset, retry after).
type Outcome = (bool, String, Option<u64>, Duration);

fn refused(why: String) -> Outcome {
    (false, why, None, Duration::ZERO)
}

/// Every `every`: a one-product snapshot (WebSocket and SSE in turn), then
/// a resume from the offset the previous snapshot ended at (older than the
/// hub's history by then, so a stream catch-up). A failed attempt is tried
/// once more, after its `retry_ms` (at least a second).
async fn probe_loop(src: Ipv4Addr, addr: SocketAddr, every: Duration, catalog: i64, log: Arc<Mutex<ProbeLog>>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since: Option<u64> = None;
    let mut rng: u64 = 0x5EED_0009_510E_0001;
    for n in 0u64.. {
        tick.tick().await;
        let sse = n % 2 == 1;
        let transport = if sse { "sse" } else { "ws" };
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let product = rng % catalog as u64 + 1;
        let start_us = now_us();
        lock(&log).in_flight = Some(start_us);
        let mut rec = ProbeRec {
            kind: "snapshot",
            transport,
            start_us,
            tries: 0,
            ok: false,
            ms: 0.0,
            first_why: String::new(),
        };
        let mut offset = None;
        let mut wait = Duration::ZERO;
        while rec.tries < 2 && !rec.ok {
            tokio::time::sleep(wait).await;
            let t = snapshot_once(src, addr, product, sse, &log).await;
            rec.tries += 1;
            (rec.ok, rec.ms) = (t.ok, t.ms);
            if !t.ok && rec.first_why.is_empty() {
                rec.first_why = t.why;
            }
            offset = t.offset;
            // As a well-behaved client: not sooner than the refusal says.
            wait = t.retry.max(Duration::from_secs(1));
        }
        lock(&log).records.push(rec);
        if let Some(from) = since {
            let mut rec = ProbeRec {
                kind: "resume",
                transport,
                start_us: now_us(),
                tries: 0,
                ok: false,
                ms: 0.0,
                first_why: String::new(),
            };
            let mut wait = Duration::ZERO;
            while rec.tries < 2 && !rec.ok {
                tokio::time::sleep(wait).await;
                let t = resume_once(src, addr, from, sse, &log).await;
                rec.tries += 1;
                (rec.ok, rec.ms) = (t.ok, t.ms);
                if !t.ok && rec.first_why.is_empty() {
                    rec.first_why = t.why;
                }
                wait = t.retry.max(Duration::from_secs(1));
            }
            lock(&log).records.push(rec);
        }
        since = offset.or(since);
        lock(&log).in_flight = None;
    }
}

/// Runs one probe attempt, recording its connection's lifetime.
/// Timed until the outcome; a WebSocket the attempt hands back is then
/// closed politely, outside the time.
async fn attempt<F>(log: &Mutex<ProbeLog>, ws: bool, within: Duration, f: F) -> Try
where
    F: Future<Output = Result<(Outcome, Option<Ws>)>>,
{
    let opened = now_us();
    let started = Instant::now();
    let r = tokio::time::timeout(within, f).await;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let r = match r {
        Ok(Ok((outcome, socket))) => {
            if let Some(socket) = socket {
                socket.close().await;
            }
            Ok(Ok(outcome))
        }
        Ok(Err(e)) => Ok(Err(e)),
        Err(e) => Err(e),
    };
    lock(log).conns.push((opened, now_us(), ws));
    match r {
        Ok(Ok((ok, why, offset, retry))) => Try {
            ok,
            why,
            ms,
            offset,
            retry,
        },
        Ok(Err(e)) => Try {
            ok: false,
            why: format!("{e:#}"),
            ms,
            offset: None,
            retry: Duration::ZERO,
        },
        Err(_) => Try {
            ok: false,
            why: format!("no answer within {} s", within.as_secs()),
            ms,
            offset: None,
            retry: Duration::ZERO,
        },
    }
}

async fn snapshot_once(src: Ipv4Addr, addr: SocketAddr, product: u64, sse: bool, log: &Mutex<ProbeLog>) -> Try {
    let topics = [format!("product.price.{product}"), format!("product.stock.{product}")];
    let within = Duration::from_secs(20);
    if sse {
        let path = format!("/events?topics={},{}&snapshot=true", topics[0], topics[1]);
        return probe_sse(src, addr, &path, within, log, |e| {
            if event_is(e, b"snapshot_end") {
                let offset = num_after(e, b"\"offset\":").or_else(|| num_after(e, b"id:"));
                return Some((true, String::new(), offset.map(|o| o as u64), Duration::ZERO));
            }
            event_is(e, b"error").then(|| answered_error(e))
        })
        .await;
    }
    let subscribe = json!({ "op": "subscribe", "topics": topics, "snapshot": true });
    probe_ws(src, addr, subscribe, within, log, |m| {
        if find(m, b"\"type\":\"snapshot_end\"").is_some() {
            let offset = num_after(m, b"\"offset\":").map(|o| o as u64);
            return Some((true, String::new(), offset, Duration::ZERO));
        }
        find(m, b"\"type\":\"error\"").map(|_| answered_error(m))
    })
    .await
}

async fn resume_once(src: Ipv4Addr, addr: SocketAddr, since: u64, sse: bool, log: &Mutex<ProbeLog>) -> Try {
    let within = Duration::from_secs(40);
    if sse {
        let path = wildcard_path(&format!("&since={since}"));
        return probe_sse(src, addr, &path, within, log, |e| {
            if event_is(e, b"price") || event_is(e, b"stock") {
                Some((true, String::new(), None, Duration::ZERO))
            } else if event_is(e, b"reset") {
                Some(refused(reset_why(e)))
            } else {
                event_is(e, b"error").then(|| answered_error(e))
            }
        })
        .await;
    }
    let subscribe = json!({ "op": "subscribe", "topics": WILDCARD, "since": since });
    probe_ws(src, addr, subscribe, within, log, |m| {
        if m.starts_with(b"{\"type\":\"update\"") {
            Some((true, String::new(), None, Duration::ZERO))
        } else if find(m, b"\"type\":\"reset\"").is_some() {
            Some(refused(reset_why(m)))
        } else {
            find(m, b"\"type\":\"error\"").map(|_| answered_error(m))
        }
    })
    .await
}

/// An error frame or event's outcome: its code, and when to come back.
fn answered_error(text: &[u8]) -> Outcome {
    (false, code_of(text), None, retry_of(text))
}

/// How a probe reads each message or event: its outcome, or None to read on.
type Verdict = fn(&[u8]) -> Option<Outcome>;

/// A probe over WebSocket: sends `subscribe`, then reads until `verdict`
/// gives an outcome or the server closes.
async fn probe_ws(
    src: Ipv4Addr,
    addr: SocketAddr,
    subscribe: serde_json::Value,
    within: Duration,
    log: &Mutex<ProbeLog>,
    verdict: Verdict,
) -> Try {
    let far = Deadline::now() + Duration::from_secs(60);
    attempt(log, true, within, async {
        let mut ws = Ws::connect_from(Some(src), addr, "/ws", None).await?;
        ws.send_json(&subscribe).await?;
        loop {
            match ws.next(far).await? {
                WsEvent::Text(m) => {
                    if let Some(outcome) = verdict(&m) {
                        return Ok((outcome, Some(ws)));
                    }
                }
                WsEvent::Closed(code) => return Ok((refused(format!("closed {code:?}")), None)),
            }
        }
    })
    .await
}

/// A probe over SSE: opens `path`, then reads until `verdict` gives an
/// outcome or the stream ends.
async fn probe_sse(
    src: Ipv4Addr,
    addr: SocketAddr,
    path: &str,
    within: Duration,
    log: &Mutex<ProbeLog>,
    verdict: Verdict,
) -> Try {
    let far = Deadline::now() + Duration::from_secs(60);
    attempt(log, false, within, async {
        let mut sse = match Sse::open(Some(src), addr, path, &[]).await? {
            SseOpen::Stream(s) => s,
            SseOpen::Refused(status) => return Ok((refused(format!("HTTP {status}")), None)),
        };
        loop {
            match sse.next(far).await? {
                None => return Ok((refused("stream ended".to_owned()), None)),
                Some(e) => {
                    if let Some(outcome) = verdict(&e) {
                        return Ok((outcome, None));
                    }
                }
            }
        }
    })
    .await
}

// ------------------------------------------------------ stalled clients

/// The kinds of stalled connection, in the order they are opened.
pub const GROUPS: [&str; 6] = [
    "WebSocket on both wildcards",
    "WebSocket on one product",
    "SSE on both wildcards",
    "SSE snapshot of both wildcards",
    "WebSocket resume from the stream",
    "SSE resume from the stream",
];

/// What became of one stalled connection, as its client saw it.
#[derive(Default, Clone)]
struct Fate {
    group: usize,
    ready: bool,
    /// The first close code or error event (`close 4002`, `error slow_consumer`).
    coded: Option<String>,
    /// How the socket ended (end of stream, reset, …); None: still open.
    end: Option<String>,
    /// A `reset` frame or event arrived.
    reset: bool,
}

#[derive(Default)]
struct Fates {
    all: Mutex<Vec<Fate>>,
    ready: AtomicUsize,
    /// Bumped at each read, code and ending, to see when things have
    /// settled after SIGCONT.
    changes: AtomicU64,
}

impl Fates {
    fn add(&self, group: usize) -> usize {
        let mut all = lock(&self.all);
        all.push(Fate {
            group,
            ..Fate::default()
        });
        all.len() - 1
    }
    fn ready(&self, k: usize) {
        let mut all = lock(&self.all);
        if !all[k].ready {
            all[k].ready = true;
            self.ready.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn coded(&self, k: usize, code: String) {
        lock(&self.all)[k].coded.get_or_insert(code);
        self.changes.fetch_add(1, Ordering::SeqCst);
    }
    fn reset(&self, k: usize) {
        lock(&self.all)[k].reset = true;
        self.changes.fetch_add(1, Ordering::SeqCst);
    }
    fn end(&self, k: usize, how: String) {
        lock(&self.all)[k].end.get_or_insert(how);
        self.changes.fetch_add(1, Ordering::SeqCst);
    }
}

/// `bench slow-stalled --addr A --src IP --ws N --wild-ws K --sse M
/// --exact-lo L --span S --snap-src IP,… --snapshots P --resume-src IP,…
/// --resumes R --since OFFSET`: N WebSocket clients (K of them on both
/// wildcards, the others on one product each) and M SSE clients on both
/// wildcards from `--src`; then P SSE snapshots of both wildcards and R
/// resumes from OFFSET (WebSocket and SSE in turn), spread evenly over their
/// addresses. Every connection reads (and answers pings) until the process
/// is stopped. Prints `READY` once all are subscribed, each snapshot has its
/// first part and each resume its first update; on `CHECK` (after SIGCONT)
/// prints `RESULT` with what became of each connection.
pub fn stalled(args: Args) -> Result<()> {
    raise_nofile()?;
    let addr: SocketAddr = args.get("addr")?.parse()?;
    let src: Ipv4Addr = args.get("src")?.parse()?;
    let n_ws: usize = args.num("ws")?;
    let wild_ws: usize = args.num("wild-ws")?;
    let n_sse: usize = args.num("sse")?;
    let exact_lo: u64 = args.num("exact-lo")?;
    let span: u64 = args.num("span")?;
    let addrs = |name: &str| -> Result<Vec<Ipv4Addr>> {
        args.get(name)?
            .split(',')
            .map(|a| a.parse().map_err(|_| anyhow!("--{name}: bad address {a}")))
            .collect()
    };
    let snap_src = addrs("snap-src")?;
    let resume_src = addrs("resume-src")?;
    let snapshots: usize = args.num("snapshots")?;
    let resumes: usize = args.num("resumes")?;
    let since: u64 = args.num("since")?;
    run_fleet(async move {
        let fates = Arc::new(Fates::default());
        let connecting = Connecting::new(CONNECTING);
        let started = Instant::now();
        for i in 0..n_ws + n_sse {
            let group = if i < wild_ws {
                0
            } else if i < n_ws {
                1
            } else {
                2
            };
            let k = fates.add(group);
            let (fates, connecting) = (fates.clone(), connecting.clone());
            let product = exact_lo + (i as u64 * 7919) % span;
            tokio::spawn(async move {
                let opened = connecting.open(async {
                    match group {
                        0 => subscribe(src, addr, json!({ "topics": WILDCARD }))
                            .await
                            .map(Stalled::Ws),
                        1 => {
                            let topics = [format!("product.price.{product}"), format!("product.stock.{product}")];
                            subscribe(src, addr, json!({ "topics": topics })).await.map(Stalled::Ws)
                        }
                        _ => sse_stream(src, addr, &wildcard_path("")).await.map(Stalled::Sse),
                    }
                });
                if let Some(c) = opened.await {
                    fates.ready(k);
                    read_stalled(c, k, false, &fates).await;
                }
            });
        }
        let regular = n_ws + n_sse;
        wait_ready(
            &fates,
            &connecting,
            regular,
            Duration::from_secs(120),
            "stalled clients",
        )
        .await?;
        // Then the snapshots and resumes, so that they have just started
        // (and still have most of their work ahead) when the process stops.
        for j in 0..snapshots {
            let k = fates.add(3);
            let from = snap_src[j * snap_src.len() / snapshots.max(1)];
            let (fates, connecting) = (fates.clone(), connecting.clone());
            tokio::spawn(async move {
                match open_retrying(from, addr, &wildcard_path("&snapshot=true")).await {
                    Ok(sse) => read_stalled(Stalled::Sse(sse), k, true, &fates).await,
                    Err(e) => connecting.fail(format!("stalled snapshot: {e:#}")),
                }
            });
        }
        for j in 0..resumes {
            let ws = j % 2 == 0;
            let k = fates.add(if ws { 4 } else { 5 });
            let from = resume_src[j * resume_src.len() / resumes.max(1)];
            let (fates, connecting) = (fates.clone(), connecting.clone());
            tokio::spawn(async move {
                let opened = if ws {
                    subscribe(from, addr, json!({ "topics": WILDCARD, "since": since }))
                        .await
                        .map(Stalled::Ws)
                } else {
                    open_retrying(from, addr, &wildcard_path(&format!("&since={since}")))
                        .await
                        .map(Stalled::Sse)
                };
                match opened {
                    Ok(c) => read_stalled(c, k, true, &fates).await,
                    Err(e) => connecting.fail(format!("stalled resume: {e:#}")),
                }
            });
        }
        let total = regular + snapshots + resumes;
        wait_ready(
            &fates,
            &connecting,
            total,
            Duration::from_secs(90),
            "stalled snapshots and resumes",
        )
        .await?;
        println!(
            "READY {}",
            json!({ "secs": started.elapsed().as_secs_f64(), "connections": total })
        );
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() != "CHECK" {
                break;
            }
            // Running again: each connection reads what waited in its
            // socket, up to its end. Settled when nothing was read for 3 s.
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut last = (fates.changes.load(Ordering::SeqCst), Instant::now());
            while Instant::now() < deadline && last.1.elapsed() < Duration::from_secs(3) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = fates.changes.load(Ordering::SeqCst);
                if now != last.0 {
                    last = (now, Instant::now());
                }
            }
            println!("RESULT {}", fate_summary(&lock(&fates.all)));
        }
        Ok(())
    })
}

async fn wait_ready(fates: &Fates, connecting: &Connecting, n: usize, within: Duration, what: &str) -> Result<()> {
    let deadline = Instant::now() + within;
    while fates.ready.load(Ordering::SeqCst) < n {
        if let Some(e) = connecting.first_error() {
            bail!("{what}: {e}");
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: only {} of {n} ready within {} s",
                fates.ready.load(Ordering::SeqCst),
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// An SSE snapshot or resume that may find every turn taken for a moment
/// (a healthy probe holds one): refused for now, it is a stream of one
/// `error` event with `retry_ms`, then its end; asked again up to three
/// times. Returns once the first snapshot part or update is in (left in
/// the buffer, for [`read_stalled`] to see).
async fn open_retrying(src: Ipv4Addr, addr: SocketAddr, path: &str) -> Result<Sse> {
    let mut last = String::new();
    for _ in 0..4 {
        let mut wait = Duration::from_millis(500);
        match Sse::open(Some(src), addr, path, &[]).await? {
            SseOpen::Refused(status) => last = format!("HTTP {status}"),
            SseOpen::Stream(mut sse) => {
                let deadline = Deadline::now() + Duration::from_secs(60);
                loop {
                    if let Some(len) = sse.event_len() {
                        let event = &sse.body[..len];
                        if event_is(event, b"snapshot") || event_is(event, b"price") || event_is(event, b"stock") {
                            return Ok(sse);
                        }
                        if event_is(event, b"error") {
                            last = format!("error {}", code_of(event));
                            wait = wait.max(retry_of(event));
                            break;
                        }
                        sse.consume_event(len);
                        continue;
                    }
                    match tokio::time::timeout_at(deadline, sse.fill()).await {
                        Err(_) => bail!("no snapshot part or update within 60 s"),
                        Ok(more) => {
                            if !more? {
                                last = "the stream ended".to_owned();
                                break;
                            }
                        }
                    }
                }
            }
        }
        tokio::time::sleep(wait).await;
    }
    bail!("refused four times (last: {last})")
}

enum Stalled {
    Ws(Ws),
    Sse(Sse),
}

/// Reads a stalled connection (until SIGSTOP, and again after SIGCONT) to
/// its end, noting codes, resets and how it ended. `first_data`: ready on
/// the first snapshot part or update, not on subscribing.
async fn read_stalled(client: Stalled, k: usize, first_data: bool, fates: &Fates) {
    match client {
        Stalled::Ws(mut ws) => loop {
            while let Some(f) = ws.frame() {
                match f.op {
                    OP_PING => {
                        // After SIGCONT the server may be gone: what is
                        // still buffered (a close frame) tells more than
                        // the failed pong, so reading goes on.
                        let _ = ws.pong(&f).await;
                        continue;
                    }
                    OP_CLOSE => {
                        let code = close_code(ws.payload(&f));
                        fates.coded(
                            k,
                            format!("close {}", code.map_or("(none)".to_owned(), |c| c.to_string())),
                        );
                    }
                    _ => {
                        let p = ws.payload(&f);
                        if p.starts_with(b"{\"type\":\"update\"") {
                            if first_data {
                                fates.ready(k);
                            }
                        } else if find(p, b"\"type\":\"reset\"").is_some() {
                            fates.reset(k);
                        } else if find(p, b"\"type\":\"error\"").is_some() {
                            fates.coded(k, format!("error {}", code_of(p)));
                        }
                    }
                }
                ws.consume(&f);
            }
            match ws.fill().await {
                Ok(0) => {
                    fates.end(k, "end of stream".to_owned());
                    return;
                }
                Ok(_) => {
                    fates.changes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    fates.end(k, io_label(&e));
                    return;
                }
            }
        },
        Stalled::Sse(mut sse) => loop {
            while let Some(len) = sse.event_len() {
                let event = &sse.body[..len];
                if event_is(event, b"price") || event_is(event, b"stock") || event_is(event, b"snapshot") {
                    if first_data {
                        fates.ready(k);
                    }
                } else if event_is(event, b"error") {
                    let code = code_of(event);
                    fates.coded(k, format!("error {code}"));
                } else if event_is(event, b"reset") {
                    fates.reset(k);
                }
                sse.consume_event(len);
            }
            match sse.fill().await {
                Ok(true) => {
                    fates.changes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {
                    fates.end(k, "end of stream".to_owned());
                    return;
                }
                Err(e) => {
                    fates.end(k, io_label(&e));
                    return;
                }
            }
        },
    }
}

/// Per group: how many, and how each ended (close code or error event,
/// else how the socket ended, else `open`), and how many saw a `reset`.
fn fate_summary(all: &[Fate]) -> serde_json::Value {
    let mut groups = serde_json::Map::new();
    for (g, name) in GROUPS.iter().enumerate() {
        let mine: Vec<&Fate> = all.iter().filter(|f| f.group == g).collect();
        if mine.is_empty() {
            continue;
        }
        let mut endings: BTreeMap<String, u64> = BTreeMap::new();
        for f in &mine {
            let label = match (&f.coded, &f.end) {
                (Some(c), Some(e)) => format!("{c}, then {e}"),
                (Some(c), None) => format!("{c}, socket still open"),
                (None, Some(e)) => e.clone(),
                (None, None) => "open".to_owned(),
            };
            *endings.entry(label).or_default() += 1;
        }
        groups.insert(
            (*name).to_owned(),
            json!({
                "n": mine.len(),
                "endings": endings,
                "resets": mine.iter().filter(|f| f.reset).count(),
                // Neither told nor ended: a close frame or error event
                // counts as closed even while the socket lingers.
                "open": mine.iter().filter(|f| f.coded.is_none() && f.end.is_none()).count(),
            }),
        );
    }
    serde_json::Value::Object(groups)
}
