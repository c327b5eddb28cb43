//! Scenario 9, slow consumers: a million-product catalog, 1,000 events/s and
//! 10,000 healthy selective clients, measured once alone (run A) and once
//! beside 1,036 connections that stop reading (run B): clients on both
//! wildcards whose queues fill at the whole rate, clients on one product
//! that only stop answering pings, whole-catalog snapshots and stream
//! resumes, all in one process frozen with SIGSTOP. What matters is that the
//! healthy clients do not notice (delivery, latency, snapshots and resumes
//! still served), that the service's memory does not follow the stalled
//! queues, that every stalled connection is closed within
//! `hub.client_timeout_ms` + `hub.ping_interval_ms`, and that no snapshot
//! keeps a PostgreSQL transaction open while its client sleeps.
//!
//! The client processes are in `slow_clients.rs`; the service's side is
//! read from its own gauges and counters, ten times a second.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::Ctx;
use super::slow_clients::GROUPS;
use crate::fleet::{Child, PubProc};
use crate::harness::{self, Instance, Isolation, cpu_sample, rss_kib};
use crate::load::{Pace, pct_ms};
use crate::report::{ms, thousands};
use crate::wire::{self, now_us};

const S: &str = "9. slow consumers";

pub const METHOD: &str = r#"- **9. Slow consumers.** A database and vhost of its own; the catalog is filled with 1,000,000
  products by `seed::seed` (SQL `generate_series`, timed). The service runs with `hub.client_timeout_ms`
  20,000 and `hub.ping_interval_ms` 5,000 (so a stalled client must be closed within 25 s) and
  `hub.history` 1,000 (about a second of updates, so every resume below is read back from the stream);
  everything else as shipped. *Healthy clients*: 10,000 in two child processes (`bench slow-healthy`,
  source addresses 127.0.0.2 and .3), even-numbered ones WebSocket and odd ones SSE, each on the price
  and stock topics of one product picked by a hash over the 90,000 products the window's events touch.
  *Load*: the bench's publisher at 1,000 events/s over the million products; event *s* changes product
  `(s/2) mod 1,000,000 + 1`, so a client's product gets exactly one price and one stock update per run,
  and *expected* is exact: per client, the events of its product among those published in the window.
  Run B publishes from 2,000,000 events further on, which touches the same products in the same order
  with higher versions. *Each run*: 3 s of warm-up, a 180 s window, 3 s of grace; *delivered* counts an
  event of the window received by then (duplicates once); latency is the client's clock at receipt minus
  the event's `ts_us`, over every delivery of the window. *Probes* (in the first healthy process, from
  127.0.0.4): every 5 s, a one-product snapshot (new connection, WebSocket and SSE in turn, until
  `snapshot_end`), then a resume on both wildcards from the offset the previous snapshot ended at (some
  5,000 updates back, so a stream catch-up) until its first update; a failed attempt (`busy`, 503,
  `reset`, `unavailable`, no answer within 20 s / 40 s) is tried once more after its `retry_ms` (at least a
  second). *Run B*: between
  the runs (no events flowing) a child process (`bench slow-stalled`) opens, from 127.0.0.5, 250 WebSocket
  clients on `product.price.*` + `product.stock.*`, 250 WebSocket clients on one product each and 500 SSE
  clients on both wildcards; then 4 SSE snapshots of both wildcards (the whole catalog; from 127.0.0.6 and
  .7, two each: the per-address limit) and 32 resumes on both wildcards from an offset of the first second
  of run A (from 127.0.0.8–.11, eight each; WebSocket and SSE in turn): these fill every snapshot and
  catch-up turn of the instance. Once every snapshot has its first part and every resume its first update,
  the process is stopped with SIGSTOP (its sockets stop being read; the kernel still acknowledges what
  fits in their buffers) and run B's publisher starts. *Cut off*: every 100 ms the service's
  `gateway_clients_refused_total` is read; its `slow_consumer` + `heartbeat_timeout` increase since
  SIGSTOP counts stalled connections only (a healthy client or probe is never refused), and the figure is
  the first reading at which it reached half, 99% and all of them (an upper bound: the target counts as
  met within one reading of it). *Still counted*: at the same readings,
  `gateway_clients_connected{transport}` less the healthy clients (read just before the stalled process
  started) and the probes' connections open at that moment (each probe connection's open and close times
  are reported); an SSE probe's server side lasts until its next keep-alive write, so the SSE figure is
  good to a couple of connections. After the window the process is resumed (SIGCONT) and each of its connections reads what waited in its
  socket to the end: the close code or error event it got, and whether the socket ended or was reset.
  *Gateway CPU and RSS*: the bench process (the service runs in it) every 10 s; RSS growth is the highest
  sample of run B less the RSS at SIGSTOP, and *no upward trend* means no sample after B's first minute
  above the highest of that first minute by more than 10 MB (the least-squares slope from then on is
  given too). *Oldest open transaction*: every 2 s, `max(now() - xact_start)` over the bench database's
  non-idle sessions in `pg_stat_activity`, from a connection to another database.
"#;

const PRODUCTS: u32 = 1_000_000;
const RATE: f64 = 1000.0;
const WARMUP: Duration = Duration::from_secs(3);
const WINDOW: Duration = Duration::from_secs(180);
/// After the window, how long late deliveries may still arrive.
const GRACE: Duration = Duration::from_secs(3);
/// Event numbers of run A's first event (product 1; versions above the
/// seed's) and run B's (the same products again, with higher versions).
const FIRST_SEQ_A: u64 = 10_000_000;
const FIRST_SEQ_B: u64 = FIRST_SEQ_A + 2 * PRODUCTS as u64;
/// Products whose events fall inside the window (the warm-up's come
/// before): the healthy clients watch these.
const LO_PRODUCT: u64 = (RATE as u64 * 3) / 2 + 1;
const SPAN: u64 = (RATE as u64 * 180) / 2;

const HEALTHY: usize = 10_000;
const HEALTHY_PROCS: usize = 2;
const HEALTHY_SRC: [&str; HEALTHY_PROCS] = ["127.0.0.2", "127.0.0.3"];
const PROBE_SRC: &str = "127.0.0.4";
const PROBE_EVERY: Duration = Duration::from_secs(5);

const STALLED_SRC: &str = "127.0.0.5";
const STALLED_WS: usize = 500;
const STALLED_WS_WILD: usize = 250;
const STALLED_SSE: usize = 500;
const STALLED_SNAPSHOTS: usize = 4;
const SNAPSHOT_SRC: &str = "127.0.0.6,127.0.0.7";
const STALLED_RESUMES: usize = 32;
const RESUME_SRC: &str = "127.0.0.8,127.0.0.9,127.0.0.10,127.0.0.11";
const STALLED: usize = STALLED_WS + STALLED_SSE + STALLED_SNAPSHOTS + STALLED_RESUMES;
/// WebSocket connections among the stalled: the plain ones and every
/// other resume.
const STALLED_WS_ALL: usize = STALLED_WS + STALLED_RESUMES / 2;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
const PING_INTERVAL: Duration = Duration::from_secs(5);
const HISTORY: usize = 1000;

pub async fn scenario(ctx: &mut Ctx) -> Result<()> {
    let mut iso = Isolation::new();
    let result = match iso.create().await {
        Ok(()) => run(ctx, &iso).await,
        Err(e) => Err(e),
    };
    for e in iso.cleanup().await {
        ctx.report.note(format!("scenario 9 cleanup: {e}"));
    }
    result
}

async fn run(ctx: &mut Ctx, iso: &Isolation) -> Result<()> {
    let mut settings = harness::settings(iso, PRODUCTS)?;
    // The per-address caps as shipped: the stalled snapshots come from two
    // addresses of their own to take them.
    let shipped = harness::shipped_settings()?;
    settings.hub.max_snapshots_per_ip = shipped.hub.max_snapshots_per_ip;
    settings.hub.max_catch_ups_per_ip = shipped.hub.max_catch_ups_per_ip;
    settings.hub.client_timeout = CLIENT_TIMEOUT;
    settings.hub.ping_interval = PING_INTERVAL;
    settings.hub.history = HISTORY;
    let inst = Instance::start(settings, false).await?;
    // Stopped by the run's own error path if the time budget cuts this
    // scenario short.
    ctx.live = Some(inst.shutdown_token());
    // The client processes and the publisher are killed when `measure`
    // returns (kill_on_drop), before the service stops.
    let measured = measure(ctx, iso, &inst).await;
    ctx.live = None;
    let stopped = inst.stop().await;
    measured?;
    stopped.context("stop the service")
}

async fn measure(ctx: &mut Ctx, iso: &Isolation, inst: &Instance) -> Result<()> {
    ctx.quiet().await;
    let started = Instant::now();
    product_gateway::seed::seed(&inst.state.db, PRODUCTS)
        .await
        .context("fill the catalog with a million products")?;
    ctx.report.row(
        S,
        "catalog of 1,000,000 products filled by SQL (`seed::seed`, `generate_series`)",
        format!("{:.1} s", started.elapsed().as_secs_f64()),
        "",
        None,
    );

    let mut healthy = Vec::with_capacity(HEALTHY_PROCS);
    for (p, src) in HEALTHY_SRC.iter().enumerate() {
        let first = p * HEALTHY / HEALTHY_PROCS;
        let count = (p + 1) * HEALTHY / HEALTHY_PROCS - first;
        let mut args: Vec<String> = [
            "slow-healthy",
            "--addr",
            &inst.addr().to_string(),
            "--src",
            src,
            "--n",
            &count.to_string(),
            "--first",
            &first.to_string(),
            "--lo-product",
            &LO_PRODUCT.to_string(),
            "--span",
            &SPAN.to_string(),
            "--catalog",
            &PRODUCTS.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if p == 0 {
            args.extend(
                [
                    "--probe-src",
                    PROBE_SRC,
                    "--probe-every-ms",
                    &PROBE_EVERY.as_millis().to_string(),
                ]
                .map(str::to_owned),
            );
        }
        healthy.push(Child::spawn(&args)?);
    }
    let mut connect_secs: f64 = 0.0;
    for c in &mut healthy {
        let ready = c
            .expect("READY", Duration::from_secs(180))
            .await
            .context("healthy clients")?;
        connect_secs = connect_secs.max(ready["connect_secs"].as_f64().unwrap_or(f64::NAN));
    }
    eprintln!("bench: 9. {HEALTHY} healthy clients connected in {connect_secs:.1} s; run A (healthy only)");

    let monitor = Monitor::start(inst, iso);
    ctx.quiet().await;
    let a = window(ctx, iso, inst, &mut healthy, FIRST_SEQ_A, "A", None).await?;
    let since = a
        .early_offset
        .ok_or_else(|| anyhow!("no update offset was seen early in run A"))?;

    // Between the runs, with no events flowing: the stalled connections.
    ctx.quiet().await;
    let base_at = now_us();
    let base = Gauges::read(inst);
    eprintln!("bench: 9. run B: {STALLED} stalled connections, then SIGSTOP");
    let mut stalled = Stalled::spawn(&[
        "slow-stalled".into(),
        "--addr".into(),
        inst.addr().to_string(),
        "--src".into(),
        STALLED_SRC.into(),
        "--ws".into(),
        STALLED_WS.to_string(),
        "--wild-ws".into(),
        STALLED_WS_WILD.to_string(),
        "--sse".into(),
        STALLED_SSE.to_string(),
        "--exact-lo".into(),
        LO_PRODUCT.to_string(),
        "--span".into(),
        SPAN.to_string(),
        "--snap-src".into(),
        SNAPSHOT_SRC.into(),
        "--snapshots".into(),
        STALLED_SNAPSHOTS.to_string(),
        "--resume-src".into(),
        RESUME_SRC.into(),
        "--resumes".into(),
        STALLED_RESUMES.to_string(),
        "--since".into(),
        since.to_string(),
    ])?;
    let ready = stalled.expect("READY", Duration::from_secs(240)).await?;
    stalled
        .signal(libc::SIGSTOP)
        .context("stop the stalled client process")?;
    let t0 = now_us();
    let rss_t0 = rss_kib(&std::process::id().to_string())?;
    let at_t0 = Gauges::read(inst);
    eprintln!(
        "bench: 9. stalled connections ready in {:.1} s and stopped; run B",
        ready["secs"].as_f64().unwrap_or(f64::NAN)
    );
    let b = window(ctx, iso, inst, &mut healthy, FIRST_SEQ_B, "B", Some((base_at, t0))).await?;
    let at_end = Gauges::read(inst);

    // Client side: what each stalled connection finds in its socket.
    stalled.signal(libc::SIGCONT)?;
    stalled
        .send("CHECK")
        .await
        .context("the stalled client process is gone (it was stopped: killed by a signal?)")?;
    let fates = stalled.expect("RESULT", Duration::from_secs(90)).await?;
    stalled.kill().await;
    for c in healthy {
        c.stop().await?;
    }
    let mon = monitor.finish();

    report(
        ctx,
        &a,
        &b,
        &mon,
        Stall {
            t0,
            base_at,
            base,
            rss_t0,
            at_t0,
            at_end,
            fates,
        },
    );
    Ok(())
}

/// One run's figures, both healthy processes together.
struct RunFigures {
    expected: f64,
    delivered: f64,
    short: f64,
    duplicates: f64,
    /// Healthy clients the server closed, since the start.
    closed: f64,
    errors: Vec<String>,
    lat: Vec<u32>,
    /// The slowest delivery of each 10 s of publishing, from the probes'
    /// start (SIGSTOP in run B), ms.
    worst_by_10s: Vec<f64>,
    probes: Vec<serde_json::Value>,
    /// Probe connections: (opened µs, closed µs, WebSocket?).
    conns: Vec<(i64, i64, bool)>,
    /// The publisher's window: from its start to the end of the window.
    from_us: i64,
    win_start: i64,
    win_end: i64,
    published_rate: f64,
    /// An update offset from the first second of the run (run A).
    early_offset: Option<u64>,
}

/// Publishes for one run and collects the healthy clients' figures.
/// `stall`: (when the healthy baseline was read, SIGSTOP), for run B.
async fn window(
    ctx: &mut Ctx,
    iso: &Isolation,
    inst: &Instance,
    healthy: &mut [Child],
    first_seq: u64,
    label: &str,
    stall: Option<(i64, i64)>,
) -> Result<RunFigures> {
    let from_us = now_us();
    let seq = Arc::new(AtomicU64::new(first_seq));
    let publisher = PubProc::start(
        &iso.amqp_url(&iso.vhost),
        &inst.state.settings.rabbit.topology.events_exchange,
        i64::from(PRODUCTS),
        seq,
        Pace::Rate(RATE),
        Some(WARMUP + WINDOW + GRACE + Duration::from_secs(5)),
        None,
        None,
    )
    .await?;
    // An offset of the run's first second, for the stalled resumes: by
    // run B it is far older than the hub's history.
    let early = if stall.is_none() {
        let addr = inst.addr();
        Some(tokio::spawn(async move {
            let mut ws = wire::gateway_ws(addr, &["product.#"], None).await?;
            let m = ws.wait_for(b"\"type\":\"update\"", Duration::from_secs(10)).await?;
            wire::num_after(&m, b"\"offset\":")
                .map(|o| o as u64)
                .ok_or_else(|| anyhow!("an update without an offset"))
        }))
    } else {
        None
    };
    tokio::time::sleep(WARMUP).await;
    let lo = first_seq + publisher.sent.load(Ordering::Relaxed);
    let win_start = now_us();
    let cpu0 = cpu_sample();
    tokio::time::sleep(WINDOW).await;
    let hi = first_seq + publisher.sent.load(Ordering::Relaxed);
    let win_end = now_us();
    let cpu1 = cpu_sample();
    tokio::time::sleep(GRACE).await;
    // Run B's probes count from SIGSTOP: the stall starts there, not with
    // the publisher's warm-up.
    let probes_from = stall.map_or(win_start, |(_, t0)| t0);
    let conns_from = stall.map_or(win_start, |(base_at, _)| base_at - 1_000_000);
    let mut f = RunFigures {
        expected: 0.0,
        delivered: 0.0,
        short: 0.0,
        duplicates: 0.0,
        closed: 0.0,
        errors: Vec::new(),
        lat: Vec::new(),
        worst_by_10s: Vec::new(),
        probes: Vec::new(),
        conns: Vec::new(),
        from_us,
        win_start,
        win_end,
        published_rate: f64::NAN,
        early_offset: None,
    };
    for c in healthy.iter_mut() {
        c.send(&format!("REPORT {lo} {hi} {probes_from} {win_end} {conns_from}"))
            .await?;
        let r = c.expect("RESULT", Duration::from_secs(150)).await?;
        let num = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        f.expected += num("expected");
        f.delivered += num("delivered");
        f.short += num("clients_short");
        f.duplicates += num("duplicates") + num("wrong_product");
        f.closed += num("closed");
        if let Some(e) = r["first_error"].as_str() {
            f.errors.push(e.to_owned());
        }
        f.lat.extend(
            r["lat_us"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32),
        );
        for (i, w) in r["worst_us_by_10s"].as_array().into_iter().flatten().enumerate() {
            let w = w.as_f64().unwrap_or(0.0) / 1e3;
            match f.worst_by_10s.get_mut(i) {
                Some(v) => *v = v.max(w),
                None => f.worst_by_10s.push(w),
            }
        }
        f.probes.extend(r["probes"].as_array().into_iter().flatten().cloned());
        f.conns.extend(
            r["conns"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| Some((c[0].as_i64()?, c[1].as_i64()?, c[2].as_bool()?))),
        );
    }
    f.lat.sort_unstable();
    publisher.stop();
    let published = publisher.wait().await.context("slow consumers' publisher")?;
    f.published_rate = published.count() as f64 / published.secs.max(1e-3);
    if let Some(task) = early {
        f.early_offset = Some(task.await.map_err(|e| anyhow!("offset reader: {e}"))??);
    }
    let title = match stall {
        None => format!(
            "9. slow consumers, run A: {} healthy clients, 1,000 events/s",
            thousands(HEALTHY as f64)
        ),
        Some(_) => format!(
            "9. slow consumers, run B: {} healthy clients + {} stalled connections, 1,000 events/s",
            thousands(HEALTHY as f64),
            thousands(STALLED as f64)
        ),
    };
    ctx.profile(&title, &cpu0, &cpu1, None, false).await;
    eprintln!(
        "bench: 9. run {label}: {} of {} delivered, p99 {}",
        thousands(f.delivered),
        thousands(f.expected),
        ms(pct_ms(&f.lat, 99.0))
    );
    Ok(f)
}

// ------------------------------------------------------------- monitor

/// The service's client gauges and refusal counters at one moment.
#[derive(Clone, Default)]
struct Gauges {
    at_us: i64,
    ws: f64,
    sse: f64,
    refused: BTreeMap<String, f64>,
    /// `gateway_catch_up_resets_total` and `gateway_updates_conflated_total`.
    catch_up_resets: f64,
    conflated: f64,
}

impl Gauges {
    fn read(inst: &Instance) -> Gauges {
        Gauges::parse(&inst.metrics_text())
    }

    fn parse(text: &str) -> Gauges {
        let connected =
            |t: &str| testkit::metric_value(text, "gateway_clients_connected", &format!("transport=\"{t}\""));
        let mut refused = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("gateway_clients_refused_total{reason=\"")
                && let Some((reason, value)) = rest.split_once("\"} ")
                && let Ok(v) = value.trim().parse::<f64>()
            {
                refused.insert(reason.to_owned(), v);
            }
        }
        Gauges {
            at_us: now_us(),
            ws: connected("ws"),
            sse: connected("sse"),
            refused,
            catch_up_resets: testkit::metric_value(text, "gateway_catch_up_resets", ""),
            conflated: testkit::metric_value(text, "gateway_updates_conflated", ""),
        }
    }
}

/// The bench process (the service) every 10 s.
struct Resources {
    at_us: i64,
    rss_mb: f64,
    /// % of one core since the previous sample.
    cpu_pct: f64,
}

#[derive(Default)]
struct Samples {
    gauges: Vec<Gauges>,
    resources: Vec<Resources>,
    /// (when, age in s of the oldest open transaction).
    pg: Vec<(i64, f64)>,
    pg_error: Option<String>,
}

/// How often the service's gauges and counters are read: finer than the
/// second the close-time target is stated to.
const SAMPLE: Duration = Duration::from_millis(100);

/// Samples the service while the runs go: its client gauges and refusals
/// every [`SAMPLE`], its CPU and RSS every 10 s, PostgreSQL every 2 s.
struct Monitor {
    samples: Arc<Mutex<Samples>>,
    _stop: DropGuard,
}

impl Monitor {
    fn start(inst: &Instance, iso: &Isolation) -> Monitor {
        let samples: Arc<Mutex<Samples>> = Arc::default();
        let stop = CancellationToken::new();
        {
            let (samples, stop, state) = (samples.clone(), stop.clone(), inst.state.clone());
            tokio::spawn(async move {
                let pid = std::process::id();
                let mut tick = tokio::time::interval(SAMPLE);
                let every_10s = (10_000 / SAMPLE.as_millis()) as u64;
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut cpu = cpu_sample();
                for k in 0u64.. {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let g = Gauges::parse(&state.metrics.render());
                    let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
                    s.gauges.push(g);
                    if k % every_10s == 0 {
                        let now = cpu_sample();
                        let rss = rss_kib(&pid.to_string()).unwrap_or(0);
                        s.resources.push(Resources {
                            at_us: now_us(),
                            rss_mb: rss as f64 / 1024.0,
                            cpu_pct: if k == 0 { f64::NAN } else { now.pct_of(&cpu, pid) },
                        });
                        cpu = now;
                    }
                }
            });
        }
        {
            let (samples, stop) = (samples.clone(), stop.clone());
            let (server, db) = (iso.pg_server.clone(), iso.db_name.clone());
            tokio::spawn(async move {
                let r = oldest_transactions(&server, &db, &samples, &stop).await;
                if let Err(e) = r {
                    samples.lock().unwrap_or_else(|p| p.into_inner()).pg_error = Some(format!("{e:#}"));
                }
            });
        }
        Monitor {
            samples,
            _stop: stop.drop_guard(),
        }
    }

    fn finish(self) -> Samples {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Every 2 s, the age of the oldest transaction open on the bench's
/// database (its own connection is to another database, so not counted).
async fn oldest_transactions(server: &str, db: &str, samples: &Mutex<Samples>, stop: &CancellationToken) -> Result<()> {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct Oldest {
        #[diesel(sql_type = diesel::sql_types::Double)]
        secs: f64,
    }
    let mut conn = AsyncPgConnection::establish(&format!("{server}/postgres"))
        .await
        .context("connect to PostgreSQL for pg_stat_activity")?;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let query = diesel::sql_query(
            "SELECT COALESCE(EXTRACT(EPOCH FROM max(now() - xact_start)), 0)::float8 AS secs \
             FROM pg_stat_activity WHERE datname = $1 AND state <> 'idle'",
        )
        .bind::<diesel::sql_types::Text, _>(db);
        let row: Oldest = tokio::time::timeout(Duration::from_secs(5), query.get_result(&mut conn))
            .await
            .map_err(|_| anyhow!("pg_stat_activity did not answer within 5 s"))??;
        samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pg
            .push((now_us(), row.secs));
    }
}

// ----------------------------------------------------- stalled process

/// The stalled client process: like [`Child`], and also stopped, resumed
/// and killed by its pid.
struct Stalled {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Stalled {
    fn spawn(args: &[String]) -> Result<Stalled> {
        let exe = std::env::current_exe().context("path of the bench binary")?;
        // A process group of its own: signals meant for the bench's group
        // (a terminal's, or the SIGHUP the kernel sends to a group that
        // is orphaned while one of its members is stopped) do not reach
        // it; and should the bench die, its group is the one orphaned with
        // a stopped member, so the kernel's SIGHUP ends it.
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .process_group(0)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start the stalled client process")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        Ok(Stalled {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        })
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow!("the stalled client process has exited"))?;
        // SAFETY: kill only sends a signal, to the child this struct owns.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    async fn expect(&mut self, tag: &str, within: Duration) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .map_err(|_| anyhow!("stalled client process: no {tag} within {within:?}"))??;
            let Some(line) = line else {
                let status = self.child.wait().await?;
                bail!("stalled client process exited ({status}) before {tag} (see its error above)");
            };
            if let Some(rest) = line.strip_prefix(tag) {
                return Ok(serde_json::from_str(rest.trim())?);
            }
        }
    }

    async fn send(&mut self, line: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let stdin = self
            .child
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("stalled client process: stdin closed"))?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

// -------------------------------------------------------------- report

struct Stall {
    t0: i64,
    base_at: i64,
    base: Gauges,
    rss_t0: u64,
    /// The service's counters at SIGSTOP and at the end of run B.
    at_t0: Gauges,
    at_end: Gauges,
    fates: serde_json::Value,
}

fn secs_since(t0: i64, at: i64) -> f64 {
    (at - t0) as f64 / 1e6
}

/// Probe connections open at `at`, by transport (WebSocket, SSE).
fn probes_open(conns: &[(i64, i64, bool)], at: i64) -> (f64, f64) {
    conns.iter().filter(|(o, c, _)| *o <= at && at < *c).fold(
        (0.0, 0.0),
        |(w, s), (_, _, ws)| if *ws { (w + 1.0, s) } else { (w, s + 1.0) },
    )
}

fn report(ctx: &mut Ctx, a: &RunFigures, b: &RunFigures, mon: &Samples, st: Stall) {
    let r = &mut ctx.report;
    let share = |f: &RunFigures| f.delivered / f.expected.max(1.0);
    let all_in = |f: &RunFigures| f.expected > 0.0 && f.delivered >= f.expected && f.closed == 0.0;
    r.row(
        S,
        format!(
            "healthy clients ({} WebSocket + {} SSE, one product each), {} events/s over 1,000,000 products, \
             {} s window: delivered ÷ expected, A (healthy only) → B (with {} stalled)",
            thousands((HEALTHY / 2) as f64),
            thousands((HEALTHY / 2) as f64),
            thousands(RATE),
            WINDOW.as_secs(),
            thousands(STALLED as f64)
        ),
        format!(
            "A {:.2}% ({} of {}; {} clients short) → B {:.2}% ({} of {}; {} clients short)",
            share(a) * 100.0,
            thousands(a.delivered),
            thousands(a.expected),
            a.short,
            share(b) * 100.0,
            thousands(b.delivered),
            thousands(b.expected),
            b.short
        ),
        "100% in both",
        Some(all_in(a) && all_in(b)),
    );
    let (p99a, p99b) = (pct_ms(&a.lat, 99.0), pct_ms(&b.lat, 99.0));
    let ratio = p99b / p99a;
    r.row(
        S,
        "healthy clients: publish → client latency p50 / p99 / max, A → B",
        format!(
            "A {} / {} / {} → B {} / {} / {} (p99 B ÷ A {ratio:.2})",
            ms(pct_ms(&a.lat, 50.0)),
            ms(p99a),
            ms(a.lat.last().map_or(f64::NAN, |l| f64::from(*l) / 1e3)),
            ms(pct_ms(&b.lat, 50.0)),
            ms(p99b),
            ms(b.lat.last().map_or(f64::NAN, |l| f64::from(*l) / 1e3)),
        ),
        "p99 B ≤ 1.2 × A",
        Some(ratio <= 1.2),
    );

    // Gateway CPU and RSS.
    let res_in = |from: i64, to: i64| mon.resources.iter().filter(move |s| s.at_us > from && s.at_us <= to);
    let mean_cpu = |from: i64, to: i64| {
        let v: Vec<f64> = res_in(from, to).map(|s| s.cpu_pct).filter(|c| c.is_finite()).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    r.row(
        S,
        "gateway (bench process) CPU, mean of the 10 s samples over each window, A → B",
        format!(
            "A {:.0}% → B {:.0}% of a core",
            mean_cpu(a.win_start, a.win_end),
            mean_cpu(b.win_start, b.win_end)
        ),
        "",
        None,
    );
    let rss_t0 = st.rss_t0 as f64 / 1024.0;
    let b_rss: Vec<(f64, f64)> = res_in(st.t0, b.win_end)
        .map(|s| (secs_since(st.t0, s.at_us), s.rss_mb))
        .collect();
    let b_max = b_rss.iter().map(|(_, m)| *m).fold(rss_t0, f64::max);
    let growth = b_max - rss_t0;
    let first_min = b_rss
        .iter()
        .filter(|(t, _)| *t <= 60.0)
        .map(|(_, m)| *m)
        .fold(rss_t0, f64::max);
    let later: Vec<(f64, f64)> = b_rss.iter().copied().filter(|(t, _)| *t > 60.0).collect();
    let later_max = later.iter().map(|(_, m)| *m).fold(f64::NAN, f64::max);
    let slope = slope_per_min(&later);
    let a_rss: Vec<f64> = res_in(a.from_us, a.win_end).map(|s| s.rss_mb).collect();
    r.row(
        S,
        format!(
            "gateway RSS during B: highest sample − RSS at SIGSTOP (RSS over A: {:.0} → {:.0} MB)",
            a_rss.first().copied().unwrap_or(f64::NAN),
            a_rss.last().copied().unwrap_or(f64::NAN)
        ),
        format!("{growth:.0} MB ({rss_t0:.0} → at most {b_max:.0} MB)"),
        "< 100 MB",
        Some(growth < 100.0 && !b_rss.is_empty()),
    );
    r.row(
        S,
        "gateway RSS after B's first minute: highest sample ÷ highest of the first minute; least-squares slope",
        format!("{later_max:.0} MB vs {first_min:.0} MB; {slope:+.1} MB/min"),
        "no upward trend (≤ first minute + 10 MB)",
        Some(later_max.is_finite() && later_max <= first_min + 10.0),
    );

    // Stalled connections: when the service cut them off, from its
    // refusal counters (probes are never refused, so these count stalled
    // connections only), and what its connection gauge still counts.
    let cut_reasons = ["slow_consumer", "heartbeat_timeout"];
    let cut_sum = |g: &Gauges| -> f64 { cut_reasons.iter().filter_map(|k| g.refused.get(*k)).sum() };
    let in_b: Vec<&Gauges> = mon
        .gauges
        .iter()
        .filter(|g| g.at_us >= st.t0 && g.at_us <= b.win_end)
        .collect();
    let n = STALLED as f64;
    // The first reading that counts them, and the one before it: the
    // moment lies between the two.
    let cut_at = |share: f64| -> Option<(f64, f64)> {
        let i = in_b
            .iter()
            .position(|g| cut_sum(g) - cut_sum(&st.at_t0) >= (n * share).ceil())?;
        let before = if i == 0 { st.t0 } else { in_b[i - 1].at_us };
        Some((secs_since(st.t0, before), secs_since(st.t0, in_b[i].at_us)))
    };
    let (half, p99, all) = (cut_at(0.5).map(|t| t.1), cut_at(0.99).map(|t| t.1), cut_at(1.0));
    let limit = (CLIENT_TIMEOUT + PING_INTERVAL).as_secs_f64();
    let slack = SAMPLE.as_secs_f64();
    let fmt = |t: Option<f64>| t.map_or_else(|| "not within the window".to_owned(), |t| format!("{t:.2} s"));
    let cut_end = cut_sum(&st.at_end) - cut_sum(&st.at_t0);
    r.row(
        S,
        format!(
            "stalled connections cut off, from SIGSTOP (`gateway_clients_refused_total` slow_consumer + \
             heartbeat_timeout, read every {} ms; each time is the first reading that counts them): half / 99% / \
             all {}",
            SAMPLE.as_millis(),
            thousands(n)
        ),
        format!(
            "{} / {} / {}",
            fmt(half),
            fmt(p99),
            match all {
                Some((before, at)) => format!("{at:.2} s (after the reading at {before:.2} s)"),
                None => format!("not within the window ({} cut by its end)", thousands(cut_end)),
            }
        ),
        "all ≤ 25 s (client_timeout 20 s + ping 5 s), to one reading",
        Some(all.is_some_and(|(_, at)| at <= limit + slack)),
    );
    // The gauge, less the healthy clients counted just before and the
    // probes' connections open at each reading. An SSE probe's server side
    // lingers until its next keep-alive write finds the socket gone, so
    // the SSE count is only good to a couple of connections.
    let base_probes = probes_open(&b.conns, st.base_at);
    let base_ws = st.base.ws - base_probes.0;
    let base_sse = st.base.sse - base_probes.1;
    let open_series: Vec<(f64, f64, f64)> = in_b
        .iter()
        .map(|g| {
            let (pw, ps) = probes_open(&b.conns, g.at_us);
            (secs_since(st.t0, g.at_us), g.ws - pw - base_ws, g.sse - ps - base_sse)
        })
        .collect();
    // From the first reading after which at most `slack` stay open.
    let gone = |pick: &dyn Fn(f64, f64) -> f64, slack: f64| -> Option<f64> {
        match open_series.iter().rposition(|(_, w, s)| pick(*w, *s) > slack + 0.5) {
            None => open_series.first().map(|(t, _, _)| *t),
            Some(i) => open_series.get(i + 1).map(|(t, _, _)| *t),
        }
    };
    let (ws_gone, sse_gone) = (gone(&|w, _| w, 0.0), gone(&|_, s| s, 2.0));
    // Below zero is a probe's connection counted a moment early or late.
    let (ws_end, sse_end) = open_series
        .last()
        .map_or((f64::NAN, f64::NAN), |(_, w, s)| (w.max(0.0), s.max(0.0)));
    r.row(
        S,
        format!(
            "stalled connections still counted by `gateway_clients_connected` (less the healthy and the probes): \
             {} WebSocket all gone / {} SSE down to ≤ 2; left at the end of B",
            STALLED_WS_ALL,
            STALLED - STALLED_WS_ALL
        ),
        format!("{} / {}; {ws_end:.0} + {sse_end:.0}", fmt(ws_gone), fmt(sse_gone)),
        "",
        None,
    );
    let delta: Vec<String> = st
        .at_end
        .refused
        .iter()
        .filter_map(|(k, v)| {
            let d = v - st.at_t0.refused.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| format!("{k} {}", thousands(d)))
        })
        .collect();
    r.row(
        S,
        "during B: `gateway_clients_refused_total` by reason; `gateway_catch_up_resets_total`; \
         `gateway_updates_conflated_total`",
        format!(
            "{}; {}; {}",
            if delta.is_empty() {
                "none refused".to_owned()
            } else {
                delta.join(", ")
            },
            thousands(st.at_end.catch_up_resets - st.at_t0.catch_up_resets),
            thousands(st.at_end.conflated - st.at_t0.conflated)
        ),
        "",
        None,
    );
    let mut fates = Vec::new();
    let mut open_after = 0u64;
    if let Some(groups) = st.fates.as_object() {
        for name in GROUPS {
            let Some(g) = groups.get(name) else { continue };
            open_after += g["open"].as_u64().unwrap_or(0);
            let endings: Vec<String> = g["endings"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k} {}", v.as_u64().unwrap_or(0)))
                .collect();
            let resets = g["resets"].as_u64().unwrap_or(0);
            fates.push(format!(
                "{name} ({}): {}{}",
                g["n"].as_u64().unwrap_or(0),
                endings.join(", "),
                if resets > 0 {
                    format!("; `reset` seen by {resets}")
                } else {
                    String::new()
                }
            ));
        }
    }
    r.row(
        S,
        "stalled connections after SIGCONT, as their clients found them: still open",
        format!("{open_after} of {STALLED}"),
        "0",
        Some(open_after == 0 && !fates.is_empty()),
    );
    r.note(format!(
        "Slow consumers, the stalled connections after SIGCONT (close code or error event, then how the socket ended): {}.",
        fates.join("; ")
    ));

    // Probes: snapshots and resumes for healthy clients.
    for (run, f) in [("A", a), ("B", b)] {
        let mut parts = Vec::new();
        let mut refused_total = 0;
        for kind in ["snapshot", "resume"] {
            let mine: Vec<&serde_json::Value> = f.probes.iter().filter(|p| p["kind"] == kind).collect();
            let first = mine.iter().filter(|p| p["ok"] == true && p["tries"] == 1).count();
            let retried = mine.iter().filter(|p| p["ok"] == true && p["tries"] == 2).count();
            let refused = mine.iter().filter(|p| p["ok"] != true).count();
            refused_total += refused;
            let mut t: Vec<u32> = mine
                .iter()
                .filter(|p| p["ok"] == true)
                .filter_map(|p| p["ms"].as_f64())
                .map(|m| (m * 1e3) as u32)
                .collect();
            t.sort_unstable();
            let whys: BTreeMap<String, usize> = mine
                .iter()
                .filter_map(|p| p["first_why"].as_str().filter(|w| !w.is_empty()))
                .fold(BTreeMap::new(), |mut m, w| {
                    *m.entry(w.to_owned()).or_default() += 1;
                    m
                });
            parts.push(format!(
                "{kind}s {} first try, {} after one retry, {} refused (p50 {} / max {}){}",
                first,
                retried,
                refused,
                ms(pct_ms(&t, 50.0)),
                ms(t.last().map_or(f64::NAN, |v| f64::from(*v) / 1e3)),
                if whys.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; first tries failed: {}",
                        whys.iter()
                            .map(|(w, n)| format!("{w} ×{n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ));
        }
        let b_run = run == "B";
        r.row(
            S,
            format!(
                "run {run}: healthy one-product snapshots and stream resumes, one of each every {} s{}",
                PROBE_EVERY.as_secs(),
                if b_run {
                    " while every turn is held by stalled ones"
                } else {
                    ""
                }
            ),
            parts.join("; "),
            if b_run { "0 refused beyond one retry" } else { "" },
            b_run.then_some(refused_total == 0 && !f.probes.is_empty()),
        );
    }

    // PostgreSQL.
    let pg_max = |from: i64, to: i64| {
        mon.pg
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, s)| *s)
            .fold(f64::NAN, f64::max)
    };
    let (pg_a, pg_b) = (pg_max(a.from_us, a.win_end), pg_max(st.base_at, b.win_end));
    r.row(
        S,
        "oldest open PostgreSQL transaction on the bench database (every 2 s), A → B",
        match &mon.pg_error {
            Some(e) => format!("A {pg_a:.1} s → B {pg_b:.1} s (sampling stopped: {e})"),
            None => format!("A {pg_a:.1} s → B {pg_b:.1} s"),
        },
        "< 30 s",
        Some(pg_b.is_finite() && pg_b < 30.0 && pg_a.is_finite() && pg_a < 30.0),
    );

    // Series and context.
    let series = |from: i64, to: i64| {
        res_in(from, to)
            .map(|s| {
                if s.cpu_pct.is_finite() {
                    format!("{:.0} MB/{:.0}%", s.rss_mb, s.cpu_pct)
                } else {
                    format!("{:.0} MB", s.rss_mb)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    r.note(format!(
        "Slow consumers, gateway RSS / CPU (% of a core) every 10 s: run A {}; run B (from SIGSTOP, RSS then \
         {rss_t0:.0} MB) {}.",
        series(a.from_us, a.win_end),
        series(st.t0, b.win_end)
    ));
    r.note(format!(
        "Slow consumers, stalled connections still open after SIGSTOP (s: WebSocket + SSE): {}.",
        open_series
            .iter()
            .take_while(|(t, _, _)| *t <= limit + 10.0)
            // Whole seconds only.
            .filter(|(t, _, _)| (t - t.round()).abs() < SAMPLE.as_secs_f64() / 2.0)
            // Below zero is a probe's connection counted a moment early or late.
            .map(|(t, w, s)| format!("{t:.0}: {:.0}+{:.0}", w.max(0.0), s.max(0.0)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let by_10s = |f: &RunFigures| {
        f.worst_by_10s
            .iter()
            .map(|w| format!("{w:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    r.note(format!(
        "Slow consumers, healthy clients' slowest delivery in each 10 s of the window, ms: run A {}; run B (from \
         SIGSTOP) {}.",
        by_10s(a),
        by_10s(b)
    ));
    r.note(format!(
        "Slow consumers: the publisher held {:.0} and {:.0} events/s in runs A and B; duplicates A {} B {}; healthy \
         clients the service closed: {}{}.",
        a.published_rate,
        b.published_rate,
        a.duplicates,
        b.duplicates,
        b.closed,
        if b.errors.is_empty() {
            String::new()
        } else {
            format!(" (first: {})", b.errors.join("; "))
        }
    ));
}

/// Least-squares slope of (seconds, MB) points, in MB per minute.
fn slope_per_min(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return f64::NAN;
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let cov: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    cov / var.max(1e-9) * 60.0
}
