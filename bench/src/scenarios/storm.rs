//! Scenario 7, the resume storm: 10,000 SSE clients, each on one product's
//! two topics, drop together while the service restarts (it warm-starts from
//! the stream), then all resume at once with `Last-Event-ID` on the new
//! instance, under a steady 1,000 events/s. Judged against the update stream
//! itself: each client must hold every update of its topics exactly once,
//! across the restart, unless it was told otherwise with a `reset`.
//!
//! `bench storm-clients --addr A --first I --n N --products P` is one client
//! fleet (a child process; several share the 10,000 clients, as a process
//! may hold at most 20,000 open files). It prints `READY {json}` once its
//! clients are connected, then obeys lines on stdin: `DROP` (answers
//! `DROPPED {json}`), `RESUME <addr>` (answers `RESUMED {json}` once every
//! client has its response headers) and `REPORT` (answers `RESULT {json}`
//! and exits). It exits when stdin closes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use futures_util::future::try_join_all;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use product_gateway::broadcast::stream::{SeenOutboxRows, offset_of, outbox_seq_of, txid_of};
use product_gateway::update::{Update, stream_offset_of};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::Ctx;
use crate::fleet::{Args, Child, PubProc};
use crate::harness::{Instance, cpu_sample, cpu_shares, format_shares, mgmt, mgmt_json, raise_nofile, wait_quiet};
use crate::load::Pace;
use crate::report::{ms, thousands};
use crate::wire::{Sse, now_us};

const S: &str = "7. resume storm";
const CLIENTS: usize = 10_000;
/// Client processes: each holds its clients' sockets, well under its
/// open-files limit.
const FLEETS: usize = 2;
const RATE: f64 = 1000.0;
/// How long the clients receive before they drop.
const BEFORE_DROP: Duration = Duration::from_secs(4);
/// Publishing after the resume, before the publisher stops.
const AFTER_RESUME: Duration = Duration::from_secs(10);
/// No delivery for this long counts as quiet.
const QUIET: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(250);
/// The whole scenario, however it goes; about 40 s when all is well.
const LIMIT: Duration = Duration::from_secs(120);
/// Connection attempts in flight per fleet before the drop; the resume
/// itself is not paced.
const CONNECT_GATE: usize = 200;
/// Catch-up connections the gateway may hold at once.
const MAX_CATCH_UP_CONNS: usize = 4;
const P99_TARGET: Duration = Duration::from_secs(5);

pub const METHOD: &str = r#"- **7. Resume storm.** 10,000 SSE clients in two child processes (`bench storm-clients`),
  client *i* subscribed to `product.price.<p>,product.stock.<p>` with *p* = *i* mod 1,000 + 1, while the
  bench publishes 1,000 events/s throughout. After 4 s of updates every client closes its stream and
  keeps its last `id:`; the service is stopped and a new instance started on the same database and vhost
  (it warm-starts: it reads the stream's last `hub.history` updates into memory before serving); then
  all clients reconnect at once with `Last-Event-ID`. 10 s later the publisher stops; once no update has
  been delivered for 2 s the clients report every id they received. The bench then reads the update
  stream itself (`x-stream-offset`, from the message of the earliest id a client received), skipping a
  message whose outbox row it already read (the relay publishes a row again when its confirm was lost
  in the restart; the service skips the copy the same way, so no client is meant to get it): for each
  client, the ids of its two topics from its first received id to the stream's end must be exactly the
  ids it received, none missing (*gap*), none twice (*duplicate*); a client that got `event: reset` is
  judged from the reset's `offset` on. *Caught up*: the client received the last update of its topics
  published (`ts_us`) before its resume request, or it already had it (then: its response headers);
  times run from the resume request. *AMQP connections*: the gateway's connections in the vhost
  (management API, named `gateway-…/<stage>`), polled every 250 ms from the resume until the last
  client caught up; catch-ups share the `…/catch-up` ones. *Broker health* after: no alarm
  (`/api/health/checks/alarms`) and file descriptors in use below the node's limit.
"#;

// ------------------------------------------------------------ the fleet

/// What one SSE event is to the storm clients.
#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Update(u64),
    Reset(u64),
    Other,
}

fn parse_event(ev: &[u8]) -> Ev {
    let (mut id, mut name, mut data): (Option<u64>, &[u8], &[u8]) = (None, b"", b"");
    for line in ev.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"id:") {
            id = std::str::from_utf8(v).ok().and_then(|v| v.trim().parse().ok());
        } else if let Some(v) = line.strip_prefix(b"event:") {
            name = v.trim_ascii();
        } else if let Some(v) = line.strip_prefix(b"data:") {
            data = v;
        }
    }
    match (name, id) {
        (b"reset", _) => match crate::wire::num_after(data, b"\"offset\":") {
            Some(off) => Ev::Reset(off as u64),
            None => Ev::Other,
        },
        (_, Some(id)) => Ev::Update(id),
        _ => Ev::Other,
    }
}

/// What one client saw. Times are µs after its resume request.
#[derive(Default)]
struct Log {
    index: usize,
    before: Vec<u64>,
    resume_us: i64,
    headers_us: u64,
    after: Vec<(u64, u64)>,
    reset: Option<(u64, u64)>,
    error: Option<String>,
}

impl Log {
    fn to_json(&self) -> Value {
        json!({
            "i": self.index,
            "b": self.before,
            "r": self.resume_us,
            "h": self.headers_us,
            "a": self.after.iter().map(|a| a.0).collect::<Vec<_>>(),
            "t": self.after.iter().map(|a| a.1).collect::<Vec<_>>(),
            "x": self.reset.map(|(off, us)| [off, us]),
            "e": self.error,
        })
    }

    fn from_json(v: &Value) -> Result<Log> {
        let bad = || anyhow!("bad client record from a storm fleet: {v}");
        let nums = |k: &str| -> Result<Vec<u64>> {
            v[k].as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|n| n.as_u64().ok_or_else(bad))
                .collect()
        };
        let (ids, times) = (nums("a")?, nums("t")?);
        if ids.len() != times.len() {
            return Err(bad());
        }
        Ok(Log {
            index: v["i"].as_u64().ok_or_else(bad)? as usize,
            before: nums("b")?,
            resume_us: v["r"].as_i64().unwrap_or(0),
            headers_us: v["h"].as_u64().unwrap_or(0),
            after: ids.into_iter().zip(times).collect(),
            reset: v["x"]
                .as_array()
                .and_then(|x| Some((x.first()?.as_u64()?, x.get(1)?.as_u64()?))),
            error: v["e"].as_str().map(str::to_owned),
        })
    }
}

struct Shared {
    connected: AtomicUsize,
    failed: AtomicUsize,
    dropped: AtomicUsize,
    resumed: AtomicUsize,
    resume_failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
    drop: CancellationToken,
    report: CancellationToken,
}

impl Shared {
    fn error(&self, e: &str) {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| e.to_owned());
    }

    fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Reads events into `on` until `stop`; false when the server ended the
/// stream first.
async fn read(sse: &mut Sse, stop: &CancellationToken, mut on: impl FnMut(Ev)) -> Result<bool> {
    loop {
        while let Some(len) = sse.event_len() {
            on(parse_event(&sse.body[..len]));
            sse.consume_event(len);
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(true),
            more = sse.fill() => if !more? { return Ok(false) },
        }
    }
}

async fn client(
    index: usize,
    addr: SocketAddr,
    products: usize,
    sh: Arc<Shared>,
    gate: Arc<Semaphore>,
    mut resume: watch::Receiver<Option<SocketAddr>>,
) -> Log {
    let mut log = Log {
        index,
        ..Log::default()
    };
    let product = index % products + 1;
    let path = format!("/events?topics=product.price.{product},product.stock.{product}");
    let permit = gate.acquire().await;
    let opened = tokio::time::timeout(Duration::from_secs(60), Sse::connect(addr, &path)).await;
    drop(permit);
    let mut sse = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            sh.error(&format!("{e:#}"));
            sh.failed.fetch_add(1, Ordering::SeqCst);
            return log;
        }
        Err(_) => {
            sh.error("connect timed out");
            sh.failed.fetch_add(1, Ordering::SeqCst);
            return log;
        }
    };
    sh.connected.fetch_add(1, Ordering::SeqCst);
    let before = read(&mut sse, &sh.drop, |ev| match ev {
        Ev::Update(id) => log.before.push(id),
        Ev::Reset(off) => log.error = Some(format!("reset at {off} before the drop")),
        Ev::Other => {}
    })
    .await;
    match before {
        Ok(true) => {}
        Ok(false) => log.error = Some("the server ended the stream before the drop".into()),
        Err(e) => log.error = Some(format!("before the drop: {e:#}")),
    }
    drop(sse);
    sh.dropped.fetch_add(1, Ordering::SeqCst);

    let addr = loop {
        if let Some(a) = *resume.borrow_and_update() {
            break a;
        }
        if resume.changed().await.is_err() {
            return log;
        }
    };
    let last = log.before.last().map(u64::to_string);
    let headers: Vec<(&str, &str)> = last.iter().map(|id| ("Last-Event-ID", id.as_str())).collect();
    log.resume_us = now_us();
    let t0 = Instant::now();
    let opened = tokio::time::timeout(Duration::from_secs(30), Sse::connect_with(addr, &path, &headers)).await;
    let mut sse = match opened {
        Ok(Ok(s)) => s,
        failed => {
            let e = match failed {
                Ok(Err(e)) => format!("resume: {e:#}"),
                _ => "resume: no response headers within 30 s".to_owned(),
            };
            sh.error(&e);
            log.error = Some(e);
            sh.resume_failed.fetch_add(1, Ordering::SeqCst);
            return log;
        }
    };
    log.headers_us = t0.elapsed().as_micros() as u64;
    sh.resumed.fetch_add(1, Ordering::SeqCst);
    let after = read(&mut sse, &sh.report, |ev| {
        let us = t0.elapsed().as_micros() as u64;
        match ev {
            Ev::Update(id) => log.after.push((id, us)),
            Ev::Reset(off) => {
                log.reset.get_or_insert((off, us));
            }
            Ev::Other => {}
        }
    })
    .await;
    match after {
        Ok(true) => {}
        Ok(false) => {
            log.error.get_or_insert("the server ended the resumed stream".into());
        }
        Err(e) => {
            log.error.get_or_insert(format!("after the resume: {e:#}"));
        }
    }
    log
}

async fn until(what: &str, within: Duration, done: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `bench storm-clients --addr A --first I --n N --products P`
pub fn storm_clients(args: Args) -> Result<()> {
    let nofile = raise_nofile()?;
    let addr: SocketAddr = args.get("addr")?.parse()?;
    let first: usize = args.num("first")?;
    let n: usize = args.num("n")?;
    let products: usize = args.num("products")?;
    if products == 0 {
        bail!("--products must be above 0");
    }
    // One thread: the clients wait on their sockets most of the time.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = rt.block_on(fleet(addr, first, n, products, nofile));
    // A blocking read of stdin may still be pending: do not wait for it.
    rt.shutdown_background();
    result
}

async fn fleet(addr: SocketAddr, first: usize, n: usize, products: usize, nofile: u64) -> Result<()> {
    let sh = Arc::new(Shared {
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
        resumed: AtomicUsize::new(0),
        resume_failed: AtomicUsize::new(0),
        first_error: Mutex::new(None),
        drop: CancellationToken::new(),
        report: CancellationToken::new(),
    });
    let (resume_tx, resume_rx) = watch::channel(None);
    let gate = Arc::new(Semaphore::new(CONNECT_GATE));
    let started = Instant::now();
    let tasks: Vec<_> = (first..first + n)
        .map(|i| tokio::spawn(client(i, addr, products, sh.clone(), gate.clone(), resume_rx.clone())))
        .collect();
    let load = |a: &AtomicUsize| a.load(Ordering::SeqCst);
    until("storm clients connecting", Duration::from_secs(90), || {
        load(&sh.connected) + load(&sh.failed) >= n
    })
    .await?;
    println!(
        "READY {}",
        json!({ "connected": load(&sh.connected), "failed": load(&sh.failed),
                "secs": started.elapsed().as_secs_f64(), "first_error": sh.first_error(), "nofile": nofile })
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .map_err(|_| anyhow!("no word from the parent within 300 s"))??;
        // The parent went away, or is done: so are the clients.
        let Some(line) = line.filter(|l| l.trim() != "STOP") else {
            return Ok(());
        };
        let (cmd, arg) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        match cmd {
            "DROP" => {
                let t = Instant::now();
                sh.drop.cancel();
                until("storm clients dropping", Duration::from_secs(30), || {
                    load(&sh.dropped) >= load(&sh.connected)
                })
                .await?;
                println!(
                    "DROPPED {}",
                    json!({ "dropped": load(&sh.dropped), "secs": t.elapsed().as_secs_f64() })
                );
            }
            "RESUME" => {
                let to: SocketAddr = arg.parse().with_context(|| format!("RESUME {arg:?}"))?;
                let t = Instant::now();
                resume_tx.send_replace(Some(to));
                until("storm clients resuming", Duration::from_secs(60), || {
                    load(&sh.resumed) + load(&sh.resume_failed) >= load(&sh.dropped)
                })
                .await?;
                println!(
                    "RESUMED {}",
                    json!({ "resumed": load(&sh.resumed), "failed": load(&sh.resume_failed),
                            "secs": t.elapsed().as_secs_f64(), "first_error": sh.first_error() })
                );
            }
            "REPORT" => {
                sh.report.cancel();
                let mut logs = Vec::with_capacity(n);
                for t in tasks {
                    let log = tokio::time::timeout(Duration::from_secs(30), t)
                        .await
                        .map_err(|_| anyhow!("a storm client did not stop within 30 s"))?
                        .map_err(|e| anyhow!("a storm client task failed: {e}"))?;
                    logs.push(log.to_json());
                }
                println!("RESULT {}", Value::Array(logs));
                return Ok(());
            }
            other => bail!("unknown command {other:?}"),
        }
    }
}

async fn all(fleets: &mut [Child], command: Option<&str>, tag: &str, within: Duration) -> Result<Vec<Value>> {
    if let Some(c) = command {
        for f in fleets.iter_mut() {
            f.send(c).await?;
        }
    }
    try_join_all(fleets.iter_mut().map(|f| f.expect(tag, within))).await
}

fn sum(vs: &[Value], key: &str) -> u64 {
    vs.iter().map(|v| v[key].as_u64().unwrap_or(0)).sum()
}

fn max_secs(vs: &[Value]) -> f64 {
    vs.iter().filter_map(|v| v["secs"].as_f64()).fold(0.0, f64::max)
}

// ------------------------------------------------------------ the parent

/// Gateway connections in the vhost at one moment.
struct ConnSample {
    at_us: i64,
    total: usize,
    catch_up: usize,
}

/// Polls the management API until `stop`; failed polls are counted.
async fn poll_connections(vhost: String, stop: CancellationToken) -> (Vec<ConnSample>, usize) {
    let (mut samples, mut failed) = (Vec::new(), 0);
    let path = format!("/api/vhosts/{vhost}/connections");
    loop {
        let at_us = now_us();
        match mgmt_json(&path).await {
            Ok(Value::Array(conns)) => {
                let names: Vec<&str> = conns
                    .iter()
                    .filter_map(|c| c["client_properties"]["connection_name"].as_str())
                    .filter(|n| n.starts_with("gateway-"))
                    .collect();
                samples.push(ConnSample {
                    at_us,
                    total: names.len(),
                    catch_up: names.iter().filter(|n| n.ends_with("/catch-up")).count(),
                });
            }
            _ => failed += 1,
        }
        tokio::select! {
            _ = stop.cancelled() => return (samples, failed),
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Every update of the stream from message `from` on, by topic: (id,
/// ts_us) in id order, with the number of messages read and of copies
/// skipped. Reads until the stream has passed message `through` and then
/// stays quiet. A copy (an outbox row the relay published again after a
/// restart, at a second offset) is skipped as the service skips it: no
/// client is meant to receive it.
async fn read_stream(
    url: &str,
    stream: &str,
    from: u64,
    through: u64,
) -> Result<(HashMap<Box<str>, Vec<(u64, i64)>>, u64, u64)> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .context("connect to read the update stream")?;
    let channel = conn.create_channel().await?;
    // A stream consumer needs a prefetch; acks grant it more credit.
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), AMQPValue::LongLongInt(from as i64));
    let mut consumer = channel
        .basic_consume(stream.into(), "".into(), BasicConsumeOptions::default(), args)
        .await
        .context("consume the update stream")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut topics: HashMap<Box<str>, Vec<(u64, i64)>> = HashMap::new();
    let (mut messages, mut last, mut unacked) = (0u64, None::<u64>, 0u32);
    let (mut republished, mut copies) = (SeenOutboxRows::default(), 0u64);
    loop {
        let passed = last.is_some_and(|l| l >= through);
        let idle = if passed {
            Duration::from_millis(1500)
        } else {
            Duration::from_secs(10)
        };
        let d = match tokio::time::timeout(idle, consumer.next()).await {
            Err(_) if passed => break,
            Err(_) => bail!("the update stream gave nothing for 10 s before message {through} (last read: {last:?})"),
            Ok(None) => bail!("the broker ended the stream consumer"),
            Ok(Some(d)) => d?,
        };
        if Instant::now() > deadline {
            bail!("reading the update stream back took over 60 s");
        }
        if let Some(offset) = offset_of(&d)
            && offset >= from
        {
            if republished.again(outbox_seq_of(&d)) {
                copies += 1;
            } else {
                for u in Update::from_message(offset, txid_of(&d), &d.data) {
                    topics.entry(u.topic.clone()).or_default().push((u.offset, u.ts_us));
                }
            }
            messages += 1;
            last = Some(offset);
        }
        unacked += 1;
        if unacked >= 250 {
            channel
                .basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
            unacked = 0;
        }
    }
    let _ = conn.close(200, "read".into()).await;
    for ids in topics.values_mut() {
        ids.sort_unstable();
    }
    Ok((topics, messages, copies))
}

/// One client's verdict.
#[derive(Default)]
struct Verdict {
    gap: bool,
    duplicate: bool,
    reset: bool,
    foreign: bool,
    out_of_order: bool,
    failed: bool,
    /// From the resume request to caught up; None: never.
    caught_us: Option<u64>,
    /// Wall clock when caught up.
    caught_at_us: Option<i64>,
    /// Updates it missed while away and got after the resume.
    replayed: usize,
    /// Updates of its topics it never received: (id, ts_us).
    missed: Vec<(u64, i64)>,
}

fn judge(log: &Log, want: &[(u64, i64)]) -> Verdict {
    let mut v = Verdict {
        reset: log.reset.is_some(),
        failed: log.error.is_some(),
        ..Verdict::default()
    };
    let got: Vec<u64> = log
        .before
        .iter()
        .copied()
        .chain(log.after.iter().map(|a| a.0))
        .collect();
    let start = match (log.reset, got.first()) {
        (Some((off, _)), _) => off,
        (None, Some(&first)) => first,
        (None, None) => 0,
    };
    let judged: Vec<u64> = got.iter().copied().filter(|&id| id >= start).collect();
    let mut seen = HashSet::with_capacity(judged.len());
    let fresh = judged.iter().filter(|id| seen.insert(**id)).count();
    v.duplicate = fresh < judged.len();
    let wanted: HashSet<u64> = want.iter().map(|w| w.0).collect();
    v.foreign = judged.iter().any(|id| !wanted.contains(id));
    v.missed = want
        .iter()
        .filter(|(id, _)| *id >= start && !seen.contains(id))
        .copied()
        .collect();
    v.gap = got.is_empty() || !v.missed.is_empty();
    v.out_of_order = judged.windows(2).any(|w| w[0] >= w[1]);

    if log.resume_us > 0 && log.headers_us > 0 {
        let target = want.iter().rev().find(|(_, ts)| *ts < log.resume_us).map(|w| w.0);
        let had = log.before.last().copied();
        v.caught_us = match target {
            None => Some(log.headers_us),
            Some(t) if had.is_some_and(|h| h >= t) => Some(log.headers_us),
            Some(t) => log.after.iter().find(|a| a.0 == t).map(|a| a.1).or(match log.reset {
                Some((off, us)) if off > t => Some(us),
                _ => None,
            }),
        };
        v.caught_at_us = v.caught_us.map(|us| log.resume_us + us as i64);
        v.replayed = log
            .after
            .iter()
            .filter(|a| target.is_some_and(|t| a.0 <= t) && had.is_none_or(|h| a.0 > h))
            .count();
    }
    v
}

/// Where the missed updates lie, to tell a lost stream message (every
/// client of its products misses the same ids) from a client that stopped
/// reading (the ids it misses are its last ones).
fn describe_gaps(logs: &[Log], verdicts: &[Verdict]) -> String {
    let mut ids: HashMap<u64, (i64, usize)> = HashMap::new();
    let (mut inside, mut tail, mut empty) = (0usize, 0usize, 0usize);
    let mut resume_us = i64::MAX;
    for (log, v) in logs.iter().zip(verdicts).filter(|(_, v)| v.gap) {
        resume_us = resume_us.min(log.resume_us);
        let last = log.after.last().map(|a| a.0).or(log.before.last().copied());
        match last {
            None => empty += 1,
            Some(last) if v.missed.iter().any(|(id, _)| *id < last) => inside += 1,
            Some(_) => tail += 1,
        }
        for (id, ts) in &v.missed {
            ids.entry(*id).or_insert((*ts, 0)).1 += 1;
        }
    }
    let mut listed: Vec<(u64, (i64, usize))> = ids.into_iter().collect();
    listed.sort_unstable();
    let shown: Vec<String> = listed
        .iter()
        .take(8)
        .map(|(id, (ts, clients))| {
            format!(
                "{id} (offset {}, published {:+.0} ms from the first resume, missed by {clients})",
                stream_offset_of(*id),
                (*ts - resume_us) as f64 / 1000.0
            )
        })
        .collect();
    format!(
        "Resume storm, gaps: {} distinct updates missed; {inside} clients missed one before their last \
         received, {tail} only after it, {empty} received nothing. First missed: {}.",
        listed.len(),
        shown.join("; ")
    )
}

/// Percentile `p` of `us`, sorted, where None (never) sorts last.
fn pct(sorted: &[Option<u64>], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn show(us: Option<u64>) -> String {
    match us {
        Some(us) => ms(us as f64 / 1000.0),
        None => "never".into(),
    }
}

/// The kernel's TCP counters (`TcpExt` of /proc/net/netstat), machine-wide.
fn tcp_ext() -> HashMap<String, u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut rows = text.lines().filter(|l| l.starts_with("TcpExt:"));
    match (rows.next(), rows.next()) {
        (Some(keys), Some(values)) => keys
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect(),
        _ => HashMap::new(),
    }
}

async fn wait_delivered_quiet(inst: &Instance) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = inst.metric("gateway_updates_delivered", "");
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = inst.metric("gateway_updates_delivered", "");
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= QUIET {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("updates were still being delivered 30 s after the publisher stopped");
        }
    }
}

async fn wait_gone(inst: &Instance) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while inst.metric("gateway_clients_connected", "") > 0.0 {
        if Instant::now() > deadline {
            bail!("the service still counts connected clients 30 s after the storm clients left");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Runs the storm; returns the instance to go on with (a restarted one).
pub async fn scenario(ctx: &mut Ctx, inst: Instance) -> Result<Instance> {
    tokio::time::timeout(LIMIT, storm(ctx, inst))
        .await
        .map_err(|_| anyhow!("7. resume storm did not finish within {} s", LIMIT.as_secs()))?
}

async fn storm(ctx: &mut Ctx, inst: Instance) -> Result<Instance> {
    wait_quiet(&mut ctx.quiet_budget).await;
    let products = ctx.products;
    let publisher = PubProc::start(
        &ctx.iso.amqp_url(&ctx.iso.vhost),
        &ctx.settings.rabbit.topology.events_exchange,
        products,
        ctx.seq.clone(),
        Pace::Rate(RATE),
        Some(LIMIT),
        None,
        None,
    )
    .await?;

    let per = CLIENTS / FLEETS;
    let mut fleets = (0..FLEETS)
        .map(|k| {
            Child::spawn(&[
                "storm-clients".into(),
                "--addr".into(),
                inst.addr().to_string(),
                "--first".into(),
                (k * per).to_string(),
                "--n".into(),
                per.to_string(),
                "--products".into(),
                products.to_string(),
            ])
        })
        .collect::<Result<Vec<_>>>()?;
    let ready = all(&mut fleets, None, "READY", Duration::from_secs(120)).await?;
    let connected = sum(&ready, "connected");
    if connected < CLIENTS as u64 {
        let err = ready.iter().find_map(|r| r["first_error"].as_str()).unwrap_or("?");
        bail!(
            "{} of {CLIENTS} storm clients could not connect (client open-files limit {}): {err}",
            CLIENTS as u64 - connected,
            ready[0]["nofile"]
        );
    }
    let connect_secs = max_secs(&ready);
    tokio::time::sleep(BEFORE_DROP).await;

    // All drop; the service restarts.
    let dropped = all(&mut fleets, Some("DROP"), "DROPPED", Duration::from_secs(40)).await?;
    let restart = Instant::now();
    ctx.live = None;
    inst.stop().await.context("stop the service before the storm")?;
    let inst = Instance::start(ctx.settings.clone(), false)
        .await
        .context("restart the service for the storm")?;
    ctx.live = Some(inst.shutdown_token());
    let restart_secs = restart.elapsed().as_secs_f64();
    let (m0, s0) = (
        inst.metric("gateway_resumes", "memory"),
        inst.metric("gateway_resumes", "stream"),
    );
    let resets0 = inst.metric("gateway_catch_up_resets", "");

    // All resume at once.
    let poll_stop = CancellationToken::new();
    let poller = tokio::spawn(poll_connections(ctx.iso.vhost.clone(), poll_stop.clone()));
    let cpu0 = cpu_sample();
    let tcp0 = tcp_ext();
    let resume_at = Instant::now();
    let resumed = all(
        &mut fleets,
        Some(&format!("RESUME {}", inst.addr())),
        "RESUMED",
        Duration::from_secs(90),
    )
    .await?;
    let resume_secs = resume_at.elapsed().as_secs_f64();
    let tcp1 = tcp_ext();
    let tcp = |k: &str| match (tcp0.get(k), tcp1.get(k)) {
        (Some(a), Some(b)) => thousands(b.saturating_sub(*a) as f64),
        _ => "?".to_owned(),
    };
    tokio::time::sleep(AFTER_RESUME.saturating_sub(resume_at.elapsed())).await;
    let cpu1 = cpu_sample();
    publisher.stop();
    let run = publisher.wait().await.context("storm publisher")?;
    wait_delivered_quiet(&inst).await?;
    poll_stop.cancel();
    let (samples, failed_polls) = poller.await.map_err(|e| anyhow!("connection poller: {e}"))?;
    let from_memory = inst.metric("gateway_resumes", "memory") - m0;
    let from_stream = inst.metric("gateway_resumes", "stream") - s0;
    let catch_up_resets = inst.metric("gateway_catch_up_resets", "") - resets0;
    // Copies the restarted service's stream reader skipped (its count
    // starts with it).
    let skipped_by_service = inst.metric("gateway_stream_republished", "");

    let results = all(&mut fleets, Some("REPORT"), "RESULT", Duration::from_secs(60)).await?;
    for f in fleets {
        f.stop().await?;
    }
    let logs = results
        .iter()
        .flat_map(|r| r.as_array().cloned().unwrap_or_default())
        .map(|v| Log::from_json(&v))
        .collect::<Result<Vec<_>>>()?;
    if logs.len() != CLIENTS {
        bail!("the storm fleets reported {} clients of {CLIENTS}", logs.len());
    }

    // The stream itself, from the earliest update any client received.
    let ids = logs.iter().flat_map(|l| {
        l.before
            .iter()
            .chain(l.after.iter().map(|a| &a.0))
            .chain(l.reset.iter().map(|r| &r.0))
    });
    let (lo, hi) = ids.fold((u64::MAX, 0), |(lo, hi), &id| (lo.min(id), hi.max(id)));
    if lo == u64::MAX {
        bail!("no storm client received any update");
    }
    let (topics, messages, copies) = read_stream(
        &ctx.iso.amqp_url(&ctx.iso.vhost),
        &ctx.settings.rabbit.topology.updates_stream,
        stream_offset_of(lo),
        stream_offset_of(hi),
    )
    .await?;
    let stream_updates: usize = topics.values().map(Vec::len).sum();

    let mut verdicts = Vec::with_capacity(logs.len());
    for log in &logs {
        let p = log.index % products as usize + 1;
        let mut want: Vec<(u64, i64)> = [format!("product.price.{p}"), format!("product.stock.{p}")]
            .iter()
            .flat_map(|t| topics.get(t.as_str()).cloned().unwrap_or_default())
            .collect();
        want.sort_unstable();
        verdicts.push(judge(log, &want));
    }
    let count = |f: fn(&Verdict) -> bool| verdicts.iter().filter(|v| f(v)).count();
    let gaps = count(|v| v.gap);
    if gaps > 0 {
        ctx.report.note(describe_gaps(&logs, &verdicts));
    }
    let dups = count(|v| v.duplicate);
    let resets = count(|v| v.reset);
    let failed = count(|v| v.failed);
    let foreign = count(|v| v.foreign);
    let out_of_order = count(|v| v.out_of_order);
    let mut caught: Vec<Option<u64>> = verdicts.iter().map(|v| v.caught_us).collect();
    caught.sort_unstable_by_key(|c| c.unwrap_or(u64::MAX));
    let never = caught.iter().filter(|c| c.is_none()).count();
    let (p50, p99) = (pct(&caught, 50.0), pct(&caught, 99.0));
    let last_caught = verdicts.iter().filter_map(|v| v.caught_at_us).max();
    let replayed: usize = verdicts.iter().map(|v| v.replayed).sum();
    let mut headers: Vec<Option<u64>> = logs
        .iter()
        .map(|l| (l.headers_us > 0).then_some(l.headers_us))
        .collect();
    headers.sort_unstable_by_key(|h| h.unwrap_or(u64::MAX));
    // The storm lasts until the last client caught up (or all of the
    // polling when some never did).
    let end = if never == 0 { last_caught } else { None };
    let storm: Vec<&ConnSample> = samples
        .iter()
        .enumerate()
        .filter(|(i, s)| *i == 0 || end.is_none_or(|e| s.at_us <= e + POLL.as_micros() as i64))
        .map(|(_, s)| s)
        .collect();
    let max_conns = storm.iter().map(|s| s.total).max();
    let max_catch_up = storm.iter().map(|s| s.catch_up).max();

    let (alarms, _) = mgmt("GET", "/api/health/checks/alarms", None).await?;
    let nodes = mgmt_json("/api/nodes").await?;
    let (fd_used, fd_total) = (nodes[0]["fd_used"].as_u64(), nodes[0]["fd_total"].as_u64());
    let healthy = alarms == 200 && matches!((fd_used, fd_total), (Some(u), Some(t)) if u < t);
    let fd = |v: Option<u64>| v.map_or("?".to_owned(), |v| thousands(v as f64));

    let n = thousands(CLIENTS as f64);
    ctx.report.row(
        S,
        format!(
            "{n} SSE clients dropped together, service restarted (warm start), all resumed with Last-Event-ID \
             at {} events/s: clients with a gap",
            thousands(RATE)
        ),
        format!("{gaps} of {n}"),
        "0",
        Some(gaps == 0),
    );
    ctx.report.row(
        S,
        "clients with a duplicate update",
        format!("{dups} of {n}"),
        "0",
        Some(dups == 0),
    );
    ctx.report.row(
        S,
        "clients that got a reset",
        format!(
            "{resets} ({} catch-ups given up, counted by the service)",
            catch_up_resets
        ),
        "",
        None,
    );
    ctx.report.row(
        S,
        "resume request → caught up, p50 / p99",
        format!(
            "{} / {} (max {}; {never} never caught up)",
            show(p50),
            show(p99),
            show(caught.last().copied().flatten())
        ),
        "p99 < 5 s",
        Some(p99.is_some_and(|us| us < P99_TARGET.as_micros() as u64)),
    );
    let show_n = |v: Option<usize>| v.map_or("n/a (no sample)".to_owned(), |v| v.to_string());
    ctx.report.row(
        S,
        "AMQP connections the gateway held during the storm (max)",
        show_n(max_conns),
        "",
        None,
    );
    ctx.report.row(
        S,
        "of them for stream catch-ups (…/catch-up, max)",
        show_n(max_catch_up),
        "≤ 4",
        Some(max_catch_up.is_some_and(|c| c <= MAX_CATCH_UP_CONNS)),
    );
    ctx.report.row(
        S,
        "resumes by source (gateway_resumes)",
        format!("memory {}, stream {}", thousands(from_memory), thousands(from_stream)),
        "",
        None,
    );
    ctx.report.row(
        S,
        "broker after the storm",
        format!(
            "{}, file descriptors {} of {}",
            if alarms == 200 {
                "no alarm".to_owned()
            } else {
                format!("alarms check {alarms}")
            },
            fd(fd_used),
            fd(fd_total)
        ),
        "healthy",
        Some(healthy),
    );
    ctx.report.note(format!(
        "Resume storm: {n} clients connected in {connect_secs:.1} s and dropped after {} s of updates (closed in \
         {:.1} s); stop and restart of the service (warm start included) {restart_secs:.1} s; every client had its \
         response headers {resume_secs:.1} s after the resume began (p50 {}, p99 {}; meanwhile the kernel counted \
         {} accept-queue overflows and {} SYN retransmissions, machine-wide); {} updates missed while away were \
         replayed; {} clients failed ({}).",
        BEFORE_DROP.as_secs(),
        max_secs(&dropped),
        show(pct(&headers, 50.0)),
        show(pct(&headers, 99.0)),
        tcp("ListenOverflows"),
        tcp("TCPSynRetrans"),
        thousands(replayed as f64),
        sum(&resumed, "failed"),
        resumed
            .iter()
            .find_map(|r| r["first_error"].as_str())
            .or_else(|| logs.iter().find_map(|l| l.error.as_deref()))
            .unwrap_or("no error"),
    ));
    ctx.report.note(format!(
        "Resume storm: the publisher sent {} events in {:.1} s; the stream held {} updates in {} messages from the \
         earliest id a client received on ({copies} of them copies of a message published again across the \
         restart, skipped as the service skips them; the restarted service skipped {skipped_by_service}); \
         {foreign} clients received an update of another topic, {out_of_order} received ids out of order, {failed} ended with an error; {} connection polls ({} failed) until {}.",
        thousands(run.count() as f64),
        run.secs,
        thousands(stream_updates as f64),
        thousands(messages as f64),
        storm.len(),
        failed_polls,
        if never == 0 {
            "the last client caught up"
        } else {
            "the publisher stopped (some clients never caught up)"
        },
    ));
    ctx.report.note(format!(
        "Resume storm, CPU during the 10 s after the resume: {}.",
        format_shares(&cpu_shares(&cpu0, &cpu1))
    ));
    wait_gone(&inst).await?;
    Ok(inst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_events() {
        assert_eq!(
            parse_event(b"id: 2049\nevent: price\ndata: {\"product_id\":1}"),
            Ev::Update(2049)
        );
        assert_eq!(
            parse_event(b"event: reset\ndata: {\"type\":\"reset\",\"offset\":4096,\"reason\":\"x\"}"),
            Ev::Reset(4096)
        );
        assert_eq!(parse_event(b": keep-alive"), Ev::Other);
        assert_eq!(parse_event(b": product-gateway\nretry: 2000"), Ev::Other);
    }

    fn log(before: &[u64], after: &[(u64, u64)], reset: Option<(u64, u64)>) -> Log {
        Log {
            before: before.to_vec(),
            resume_us: 1000,
            headers_us: 5,
            after: after.to_vec(),
            reset,
            ..Log::default()
        }
    }

    #[test]
    fn judges_clients() {
        let want = [(10, 100), (20, 200), (30, 900), (40, 2000)];
        let ok = judge(&log(&[20], &[(30, 50), (40, 60)], None), &want);
        assert!(!ok.gap && !ok.duplicate && !ok.foreign);
        assert_eq!(ok.caught_us, Some(50));
        assert_eq!(ok.replayed, 1);
        let gap = judge(&log(&[20], &[(40, 60)], None), &want);
        assert!(gap.gap && gap.caught_us.is_none());
        assert_eq!(gap.missed, [(30, 900)]);
        let gaps = describe_gaps(&[log(&[20], &[(40, 60)], None)], &[gap]);
        assert!(
            gaps.contains("1 distinct updates missed; 1 clients missed one before their last received"),
            "{gaps}"
        );
        let dup = judge(&log(&[20, 30], &[(30, 7), (40, 60)], None), &want);
        assert!(dup.duplicate && !dup.gap);
        assert_eq!(dup.caught_us, Some(5));
        let reset = judge(&log(&[10], &[(40, 60)], Some((35, 3))), &want);
        assert!(reset.reset && !reset.gap);
        assert_eq!(reset.caught_us, Some(3));
    }
}
