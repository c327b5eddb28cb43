//! Scenario 6, selective fan-out: many clients, each watching one product's
//! two topics, as shop pages do. What matters is that the cost per update
//! follows the clients it matches, not every connected client: delivered ÷
//! expected, latency and the service's CPU per delivered message, from 1k
//! to 19k clients at two event rates.
//!
//! Client side (`bench selective-clients`): a fleet in a child process
//! records every update it receives (its publish stamp and latency), and one
//! reference client on `product.#` records every update there is. For a
//! window the parent names (`REPORT start_us end_us`), the expected count
//! is, per client, the updates of its product stamped inside the window, and
//! a delivery counts when it arrived by the time of the report.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use super::{Ctx, Points, hops_text, wait_clients_gone};
use crate::fleet::{Args, Child, Connecting, lock, run_fleet};
use crate::harness::{Instance, cpu_sample, raise_nofile};
use crate::load::{Pace, pct_ms};
use crate::report::{ms, thousands};
use crate::wire::{self, Sse, Ws, now_us};

const S: &str = "6. selective fan-out";

pub const METHOD: &str = r#"- **6. Selective fan-out.** 1,000, 5,000 and 19,000 WebSocket clients (and 19,000 SSE), in child
  processes of at most 9,750 clients each (`bench selective-clients`); client *i* subscribes to the
  price and stock topics of one product picked by a hash of *i* over the catalog, as a product page
  does. The bench publishes 1,000 and then 2,000 events/s; after a 3 s warm-up, a 10 s window counts
  the updates *published* (`ts_us`) inside it: *expected* is, per client, the updates of its product in
  the window as a reference client on `product.#` in the same process received them; *delivered* is
  what the client received of them by 2 s after the window. Latency: `ts_us` → receipt, over every
  delivered update of the window (the worst child's percentile); the notes give the slowest update
  published in each second of the window (`–`: none of that second's updates arrived in time).
  *Inside the service*: the same window read from the service's own histograms, so as the upper bounds
  of the buckets the percentiles fall in: `gateway_e2e_latency_seconds` (publish → handed to the
  socket, per delivery) and `gateway_hub_latency_seconds` (publish → read back from the update stream
  for the hub, per update: broker, apply, stream). The profiler runs from a second before the window
  to a second after it. *Service CPU*: the bench process (which runs the service) over the window, per
  delivered message; *flat* compares 19k with 1k clients at the same rate.
"#;
/// Clients per child process: a process may hold 20,000 open files.
const PER_PROCESS: usize = 9_750;
const WARMUP: Duration = Duration::from_secs(3);
const WINDOW: Duration = Duration::from_secs(10);
/// After the window, how long late deliveries may still arrive.
const GRACE: Duration = Duration::from_secs(2);

/// The product client `i` watches: spread over the catalog, not in order.
fn product_of(i: usize, products: u64) -> u64 {
    let mut x = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 31)) % products + 1
}

/// One delivery: who got it, when it was stamped, how long it took.
struct Seen {
    client: u32,
    ts_us: i64,
    latency_us: u32,
}

/// `bench selective-clients --proto ws|sse --addr A --n N --first I
/// --products P`: clients `I..I+N`, each on its product's price and stock
/// topics, plus a reference client on everything. Prints `READY`, then a
/// `RESULT` for each `REPORT start_us end_us` line; ends with stdin.
pub fn selective_clients(args: Args) -> Result<()> {
    raise_nofile()?;
    let sse = match args.get("proto")?.as_str() {
        "ws" => false,
        "sse" => true,
        other => bail!("selective-clients speaks ws or sse, not {other}"),
    };
    let addr: SocketAddr = args.get("addr")?.parse()?;
    let n: usize = args.num("n")?;
    let first: usize = args.num("first")?;
    let products: u64 = args.num("products")?;
    run_fleet(async move {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
        let all: Arc<Mutex<Vec<(u64, i64)>>> = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let connecting = Connecting::new(200);
        let started = Instant::now();
        {
            let ws = wire::gateway_ws(addr, &["product.#"], None)
                .await
                .context("reference client")?;
            tokio::spawn(reference(ws, all.clone()));
        }
        for k in 0..n {
            let (seen, connecting) = (seen.clone(), connecting.clone());
            let product = product_of(first + k, products);
            tokio::spawn(async move {
                let topics = [format!("product.price.{product}"), format!("product.stock.{product}")];
                let opened = connecting.open(async {
                    if sse {
                        let path = format!("/events?topics={},{}", topics[0], topics[1]);
                        Sse::connect(addr, &path).await.map(Client::Sse)
                    } else {
                        wire::gateway_ws(addr, &[topics[0].as_str(), topics[1].as_str()], None)
                            .await
                            .map(Client::Ws)
                    }
                });
                if let Some(client) = opened.await {
                    let err = record(client, k as u32, seen).await;
                    connecting.fail(format!("{err:#}"));
                }
            });
        }
        connecting.all_up(n, "client", Duration::from_secs(150)).await?;
        println!("READY {}", json!({ "connect_secs": started.elapsed().as_secs_f64() }));
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut words = line.split_whitespace();
            if words.next() != Some("REPORT") {
                break;
            }
            let mut num = || words.next().and_then(|w| w.parse::<i64>().ok());
            let (Some(start), Some(end)) = (num(), num()) else {
                bail!("REPORT takes start_us end_us, got {line:?}");
            };
            let result = tally(&seen, &all, n, first, products, start, end, &connecting);
            println!("RESULT {result}");
        }
        Ok(())
    })
}

enum Client {
    Ws(Ws),
    Sse(Sse),
}

/// The whole stream, by product: what each client should get.
async fn reference(mut ws: Ws, all: Arc<Mutex<Vec<(u64, i64)>>>) -> Result<()> {
    loop {
        while let Some(f) = ws.frame() {
            if f.op == wire::OP_PING {
                ws.pong(&f).await?;
                continue;
            }
            let p = ws.payload(&f);
            if p.starts_with(b"{\"type\":\"update\"")
                && let (Some(product), Some(ts)) = (
                    wire::num_after_last(p, b"\"product_id\":"),
                    wire::num_after_last(p, b"\"ts_us\":"),
                )
            {
                lock(&all).push((product as u64, ts));
            }
            ws.consume(&f);
        }
        if ws.fill().await? == 0 {
            bail!("the reference client was closed");
        }
    }
}

/// Records every update a client receives until its connection fails;
/// returns why it did.
async fn record(client: Client, id: u32, seen: Arc<Mutex<Vec<Seen>>>) -> anyhow::Error {
    let see = |ts_us: i64| {
        let latency_us = (now_us() - ts_us).clamp(0, i64::from(u32::MAX)) as u32;
        lock(&seen).push(Seen {
            client: id,
            ts_us,
            latency_us,
        });
    };
    let run = async {
        match client {
            Client::Ws(mut ws) => {
                ws.data_frames("a client", |p| {
                    if p.starts_with(b"{\"type\":\"update\"")
                        && let Some(ts) = wire::num_after_last(p, b"\"ts_us\":")
                    {
                        see(ts);
                    }
                })
                .await
            }
            Client::Sse(mut sse) => loop {
                while let Some(len) = sse.event_len() {
                    if let Some(ts) = wire::num_after_last(&sse.body[..len], b"\"ts_us\":") {
                        see(ts);
                    }
                    sse.consume_event(len);
                }
                if !sse.fill().await? {
                    bail!("the server ended an event stream");
                }
            },
        }
    };
    match run.await {
        Ok(()) => anyhow!("a client stopped"),
        Err(e) => e,
    }
}

#[allow(clippy::too_many_arguments)]
fn tally(
    seen: &Mutex<Vec<Seen>>,
    all: &Mutex<Vec<(u64, i64)>>,
    n: usize,
    first: usize,
    products: u64,
    start: i64,
    end: i64,
    connecting: &Connecting,
) -> serde_json::Value {
    let inside = |ts: i64| ts >= start && ts < end;
    let mut per_product: HashMap<u64, u64> = HashMap::new();
    for (product, ts) in lock(all).iter() {
        if inside(*ts) {
            *per_product.entry(*product).or_default() += 1;
        }
    }
    let mut per_client = vec![0u64; n];
    let mut lat: Vec<u32> = Vec::new();
    // The slowest update published in each second of the window: a stall
    // shows as one bad second, a saturated service as all of them.
    let mut worst: Vec<Option<u32>> = vec![None; ((end - start).max(0) as usize).div_ceil(1_000_000)];
    for s in lock(seen).iter() {
        if inside(s.ts_us) {
            per_client[s.client as usize] += 1;
            lat.push(s.latency_us);
            let second = ((s.ts_us - start) / 1_000_000) as usize;
            if let Some(w) = worst.get_mut(second) {
                *w = Some(w.unwrap_or(0).max(s.latency_us));
            }
        }
    }
    lat.sort_unstable();
    let (mut expected, mut delivered, mut short, mut extra) = (0u64, 0u64, 0u64, 0u64);
    for (k, got) in per_client.iter().enumerate() {
        let want = per_product.get(&product_of(first + k, products)).copied().unwrap_or(0);
        expected += want;
        delivered += got;
        short += u64::from(*got < want);
        extra += u64::from(*got > want);
    }
    json!({
        "expected": expected, "delivered": delivered,
        "clients_short": short, "clients_extra": extra,
        "p50_ms": pct_ms(&lat, 50.0), "p99_ms": pct_ms(&lat, 99.0), "p999_ms": pct_ms(&lat, 99.9),
        "max_ms": lat.last().map_or(f64::NAN, |l| f64::from(*l) / 1000.0),
        "worst_ms_by_second": worst.iter().map(|w| w.map(|w| f64::from(w) / 1000.0)).collect::<Vec<_>>(),
        "error": connecting.first_error(),
    })
}

/// One measured window's figures.
pub struct Figures {
    pub clients: usize,
    pub rate: f64,
    pub delivered: f64,
    pub expected: f64,
    /// Service CPU per delivered message, µs.
    pub cpu_us_per_msg: f64,
    /// The clients' p99 latency, ms.
    pub p99_ms: f64,
}

/// One measured window of a fleet: the offered rate, and the traces it
/// runs with (scenario 13; None: as they are, off).
pub struct Window {
    pub rate: f64,
    pub tracing: Option<Tracing>,
}

/// The traces of a window: off, or on recording this share of new traces.
#[derive(Clone, Copy)]
pub struct Tracing(pub Option<f64>);

impl Tracing {
    fn label(self) -> String {
        match self.0 {
            None => ", tracing off".to_owned(),
            Some(r) => format!(", tracing on at {}%", r * 100.0),
        }
    }
}

fn at_rates(rates: &[f64]) -> Vec<Window> {
    rates.iter().map(|&rate| Window { rate, tracing: None }).collect()
}

/// Runs the scenario: WebSocket at 1k, 5k and 19k clients, each at both
/// event rates, then SSE at 19k at the higher rate.
pub async fn selective(ctx: &mut Ctx, inst: &Instance) -> Result<()> {
    let mut figures = Vec::new();
    for (proto, n, rates) in [
        ("ws", 1_000, &[1000.0, 2000.0][..]),
        ("ws", 5_000, &[1000.0, 2000.0][..]),
        ("ws", 19_000, &[1000.0, 2000.0][..]),
        ("sse", 19_000, &[2000.0][..]),
    ] {
        figures.extend(fleet(ctx, inst, S, proto, n, &at_rates(rates)).await?);
    }
    // Flat means the biggest fleet costs no more per message than the
    // smallest at the same rate (fixed costs per update favour the biggest).
    for rate in [1000.0, 2000.0] {
        let at = |n: usize| figures.iter().find(|f| f.clients == n && f.rate == rate);
        if let (Some(small), Some(big)) = (at(1_000), at(19_000)) {
            let ratio = big.cpu_us_per_msg / small.cpu_us_per_msg;
            ctx.report.row(
                S,
                format!(
                    "WebSocket, {} events/s: CPU per delivered message, 19k ÷ 1k clients",
                    rate as u32
                ),
                format!(
                    "{ratio:.2} ({:.1} µs ÷ {:.1} µs)",
                    big.cpu_us_per_msg, small.cpu_us_per_msg
                ),
                "flat (≤ 1.2)",
                Some(ratio <= 1.2),
            );
        }
    }
    let lost: f64 = figures.iter().map(|f| f.expected - f.delivered).sum();
    ctx.report.note(format!(
        "Selective fan-out: {} updates expected over all windows, {} not delivered within {} s of the window's end.",
        thousands(figures.iter().map(|f| f.expected).sum()),
        thousands(lost.max(0.0)),
        GRACE.as_secs()
    ));
    Ok(())
}

/// Runs `n` one-product clients (`proto`) through the windows, reporting
/// each under `section`.
pub async fn fleet(
    ctx: &mut Ctx,
    inst: &Instance,
    section: &'static str,
    proto: &str,
    n: usize,
    windows: &[Window],
) -> Result<Vec<Figures>> {
    let transport = if proto == "sse" { "SSE" } else { "WebSocket" };
    let procs = n.div_ceil(PER_PROCESS);
    let mut children = Vec::with_capacity(procs);
    for p in 0..procs {
        let first = p * n / procs;
        let count = (p + 1) * n / procs - first;
        children.push(Child::spawn(&[
            "selective-clients".into(),
            "--proto".into(),
            proto.into(),
            "--addr".into(),
            inst.addr().to_string(),
            "--n".into(),
            count.to_string(),
            "--first".into(),
            first.to_string(),
            "--products".into(),
            ctx.products.to_string(),
        ])?);
    }
    let mut connect_secs: f64 = 0.0;
    for c in &mut children {
        let ready = c
            .expect("READY", Duration::from_secs(180))
            .await
            .with_context(|| format!("{n} {transport} clients"))?;
        connect_secs = connect_secs.max(ready["connect_secs"].as_f64().unwrap_or(f64::NAN));
    }
    let mut out = Vec::new();
    for window in windows {
        let rate = window.rate;
        let tracing = window.tracing.map(Tracing::label).unwrap_or_default();
        let label = format!("{transport}{tracing}");
        if let Some(Tracing(ratio)) = window.tracing {
            super::tracing::set(ratio);
        }
        ctx.quiet().await;
        let publish = ctx
            .publish(
                Pace::Rate(rate),
                Some(WARMUP + WINDOW + GRACE + Duration::from_secs(2)),
                None,
                None,
            )
            .await?;
        let start = now_us() + WARMUP.as_micros() as i64;
        let end = start + WINDOW.as_micros() as i64;
        // The profiler runs from a second before the window to a second
        // after it: starting or stopping it costs the machine a moment,
        // which would show as that second's latency.
        tokio::time::sleep(WARMUP - Duration::from_secs(1)).await;
        let perf_secs = (WINDOW + Duration::from_secs(2)).as_secs();
        let perf = ctx.perf(&format!("selective-{proto}-{n}-{rate}"), perf_secs);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cpu0 = cpu_sample();
        let (inside0, pipeline0) = (inside_latency(inst, "e2e"), inside_latency(inst, "hub"));
        let points0 = Points::read(inst);
        tokio::time::sleep(WINDOW).await;
        let cpu1 = cpu_sample();
        let points = Points::read(inst).means_since(&points0);
        let inside = bucket_quantiles(&inside0, &inside_latency(inst, "e2e"));
        let pipeline = bucket_quantiles(&pipeline0, &inside_latency(inst, "hub"));
        tokio::time::sleep(GRACE).await;
        let (mut expected, mut delivered, mut short) = (0.0, 0.0, 0.0);
        let (mut p50, mut p99, mut p999) = (0.0f64, 0.0f64, 0.0f64);
        let mut errors = Vec::new();
        // None: no child received an update of that second in time.
        let mut worst: Vec<Option<f64>> = Vec::new();
        for c in &mut children {
            c.send(&format!("REPORT {start} {end}")).await?;
            let r = c.expect("RESULT", Duration::from_secs(60)).await?;
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            expected += f("expected");
            delivered += f("delivered");
            short += f("clients_short");
            // The children split the clients evenly: the worst child's
            // percentile bounds the whole fleet's.
            p50 = p50.max(f("p50_ms"));
            p99 = p99.max(f("p99_ms"));
            p999 = p999.max(f("p999_ms"));
            for (i, w) in r["worst_ms_by_second"].as_array().into_iter().flatten().enumerate() {
                let w = w.as_f64();
                match worst.get_mut(i) {
                    Some(v) => {
                        *v = match (*v, w) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            (a, b) => a.or(b),
                        }
                    }
                    None => worst.push(w),
                }
            }
            if let Some(e) = r["error"].as_str() {
                errors.push(e.to_owned());
            }
        }
        publish.stop();
        let published = publish.wait().await.context("selective fan-out publisher")?;
        let secs = WINDOW.as_secs_f64();
        let own = std::process::id();
        let cpu_pct = cpu1.pct_of(&cpu0, own);
        let cpu_us_per_msg = cpu_pct / 100.0 * 1e6 / (delivered / secs).max(1.0);
        let title = format!("{section}, {n} {transport} clients{tracing}, {} events/s", rate as u32);
        ctx.profile(&title, &cpu0, &cpu1, perf, false).await;
        let share = delivered / expected.max(1.0);
        // The targets are scenario 6's (tracing windows only compare).
        let targets = window.tracing.is_none();
        let big = targets && n >= 19_000 && rate >= 2000.0;
        // The latency target under load: 19k one-product clients at 1,000 events/s.
        let floor = targets && n >= 19_000 && rate == 1000.0;
        ctx.report.row(
            section,
            format!(
                "{label}, {} clients × 1 product, {} events/s: delivered ÷ expected",
                thousands(n as f64),
                thousands(rate)
            ),
            format!(
                "{:.2}% ({} of {} msg/s; {} clients short; connected in {connect_secs:.1} s)",
                share * 100.0,
                thousands(delivered / secs),
                thousands(expected / secs),
                short
            ),
            if big { "100%" } else { "" },
            big.then_some(share >= 0.9999),
        );
        ctx.report.row(
            section,
            format!(
                "{label}, {} clients, {} events/s: latency p50 / p99 / p999",
                thousands(n as f64),
                thousands(rate)
            ),
            format!("{} / {} / {}", ms(p50), ms(p99), ms(p999)),
            if big {
                "p99 < 100 ms"
            } else if floor {
                "p50 < 15 ms, p99 < 100 ms"
            } else {
                ""
            },
            if big {
                Some(p99 < 100.0)
            } else {
                floor.then_some(p50 < 15.0 && p99 < 100.0)
            },
        );
        ctx.report.row(
            section,
            format!(
                "{label}, {} clients, {} events/s: where the time goes (means)",
                thousands(n as f64),
                thousands(rate)
            ),
            hops_text(published.confirm_mean_ms, points),
            "",
            None,
        );
        ctx.report.row(
            section,
            format!(
                "{label}, {} clients, {} events/s: inside the service (the service's histograms, so bucket bounds) p50 / p99",
                thousands(n as f64),
                thousands(rate)
            ),
            match (inside, pipeline) {
                (Some((b50, b99)), Some((p50, p99))) => format!(
                    "publish → handed to the socket (per delivery) ≤ {} / ≤ {}; publish → read back for the hub (per update: the pipeline) ≤ {} / ≤ {}",
                    ms(b50),
                    ms(b99),
                    ms(p50),
                    ms(p99)
                ),
                _ => "no deliveries counted".to_owned(),
            },
            "",
            None,
        );
        ctx.report.row(
            section,
            format!(
                "{label}, {} clients, {} events/s: service CPU",
                thousands(n as f64),
                thousands(rate)
            ),
            format!("{cpu_pct:.0}% of a core, {cpu_us_per_msg:.1} µs per delivered message"),
            "",
            None,
        );
        ctx.report.note(format!(
            "{section}, {} {transport} clients{tracing}, {} events/s: the slowest update published in each second \
             of the window, ms: {}.",
            thousands(n as f64),
            thousands(rate),
            worst
                .iter()
                .map(|w| w.map_or_else(|| "–".to_owned(), |w| format!("{w:.0}")))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if !errors.is_empty() {
            ctx.report
                .note(format!("{section}, {n} {label}: {}", errors.join("; ")));
        }
        out.push(Figures {
            clients: n,
            rate,
            delivered,
            expected,
            cpu_us_per_msg,
            p99_ms: p99,
        });
    }
    for c in children {
        c.stop().await?;
    }
    wait_clients_gone(inst).await?;
    Ok(out)
}

/// One of the service's latency histograms (`e2e`: publish → hand-off;
/// `hub`: publish → the hub): (upper bound in ms, cumulative count) per
/// bucket.
fn inside_latency(inst: &Instance, name: &str) -> Vec<(f64, f64)> {
    let text = inst.metrics_text();
    let prefix = format!("gateway_{name}_latency_seconds_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse::<f64>().ok()? * 1000.0
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// p50 and p99 of what was counted between two histogram readings, as the
/// upper bounds of the buckets they fall in; None when nothing was.
fn bucket_quantiles(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<(f64, f64)> {
    let delta: Vec<(f64, f64)> = after.iter().zip(before).map(|((le, a), (_, b))| (*le, a - b)).collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let at = |q: f64| delta.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| *le);
    Some((at(0.5)?, at(0.99)?))
}
