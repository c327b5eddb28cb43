//! Scenario 8, a catalog of a million products: how long seeding takes,
//! what a snapshot of one product costs when the catalog is large, what
//! whole-catalog snapshots cost in time and memory, and whether the apply
//! path keeps up while many of them are asked for at once.
//!
//! It has its own database and vhost (a second [`Isolation`]), so the other
//! scenarios keep their 1,000-product catalog.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::Mutex;

use super::Ctx;
use crate::fleet::{Args, Child, PubProc};
use crate::harness::{self, Instance, Isolation, mgmt_json, rss_kib};
use crate::load::{Pace, pct_ms};
use crate::report::thousands;
use crate::wire::{self, Sse, Ws, find, now_us};

const S: &str = "8. million-product catalog";

pub const METHOD: &str = r#"- **8. Million-product catalog.** A database and vhost of its own. *Seed*: `seed::seed` of
  1,000,000 products into the empty catalog, timed (the service is up; no photos are stored).
  *Whole-catalog snapshots*, in a process of its own (`bench catalog-whole`, so that memory freed by
  earlier scenarios cannot hide new allocations): the service on that catalog, allowing 10 snapshots
  at a time (`hub.max_concurrent_snapshots`) and 12 read connections, and 10 SSE clients asking
  `product.#` with `snapshot=true` at once; time to the first `snapshot` part and to `snapshot_end`,
  from the request; *RSS growth* is that process's highest RSS, sampled every 50 ms while they run
  (the clients keep one part at a time), minus its RSS just before. Then the service runs with the
  shipped settings. *One-product snapshot*: 300 times each, a new WebSocket connection subscribes to
  `product.*.<random id>` with a snapshot (timed from the subscribe frame to `snapshot_end`), and an
  SSE request asks the same (timed from the request, TCP connect included, to `snapshot_end`), one
  at a time. *Apply lag*: the bench publishes 500 events/s over the million products; 5 s in, 50 SSE
  clients ask `product.#` with a snapshot at once (each reads for at most 20 s, or takes its
  retry-later `busy` event); over the 25 s from then, a client on `product.#` without a snapshot measures
  publish → receipt of every update, and the two apply queues' depth is read every 250 ms.
"#;

const PRODUCTS: u32 = 1_000_000;
const WHOLE_CLIENTS: usize = 10;
const ONE_PRODUCT_SAMPLES: usize = 300;
const LAG_CLIENTS: usize = 50;
const LAG_RATE: f64 = 500.0;
/// Before the snapshots start, and the window measured from then.
const LAG_LEAD: Duration = Duration::from_secs(5);
const LAG_WINDOW: Duration = Duration::from_secs(25);
/// Longest a client of the lag run reads its snapshot.
const LAG_READ: Duration = Duration::from_secs(20);

pub async fn scenario(ctx: &mut Ctx) -> Result<()> {
    let mut iso = Isolation::new();
    iso.create().await?;
    let result = run(ctx, &iso).await;
    for e in iso.cleanup().await {
        ctx.report.note(format!("scenario 8 cleanup: {e}"));
    }
    result
}

async fn run(ctx: &mut Ctx, iso: &Isolation) -> Result<()> {
    let inst = Instance::start(harness::settings(iso, PRODUCTS)?, false).await?;
    ctx.quiet().await;
    let started = Instant::now();
    product_gateway::seed::seed(&inst.state.db, PRODUCTS)
        .await
        .context("seed a million products")?;
    let seed = started.elapsed();
    ctx.report.row(
        S,
        "seed of 1,000,000 products (`seed --products`; no photos stored)",
        format!("{:.1} s", seed.as_secs_f64()),
        "< 60 s",
        Some(seed < Duration::from_secs(60)),
    );

    inst.stop().await.context("stop the seeding instance")?;

    // In a process of its own: this one's allocator keeps what earlier
    // scenarios freed, and new allocations would reuse it unseen in RSS.
    ctx.quiet().await;
    let mut child = Child::spawn(&[
        "catalog-whole".into(),
        "--db".into(),
        iso.db_name.clone(),
        "--vhost".into(),
        iso.vhost.clone(),
        "--redis-prefix".into(),
        iso.redis_prefix.clone(),
    ])?;
    let whole = child.expect("RESULT", Duration::from_secs(300)).await?;
    child.stop().await?;
    report_whole(ctx, &whole)?;

    let inst = Instance::start(harness::settings(iso, PRODUCTS)?, false).await?;
    ctx.quiet().await;
    one_product(ctx, &inst).await?;
    ctx.quiet().await;
    apply_lag(ctx, &inst, iso).await?;
    inst.stop().await.context("stop the service")?;
    Ok(())
}

/// How one snapshot request went, timed from the request.
#[derive(Default)]
struct Taken {
    first_part: Option<Duration>,
    end: Option<Duration>,
    products: u64,
    /// Refused with a retry-later answer.
    busy: bool,
}

/// Asks `topics` with a snapshot over SSE and reads the parts as they come
/// (one at a time in memory) until `snapshot_end` or `read_for` has passed.
async fn sse_snapshot(addr: std::net::SocketAddr, topics: &str, read_for: Duration) -> Result<Taken> {
    let started = Instant::now();
    let path = format!("/events?topics={topics}&snapshot=true");
    let mut sse = match Sse::connect(addr, &path).await {
        Ok(sse) => sse,
        Err(e) if e.to_string().contains(" 503 ") => {
            return Ok(Taken {
                busy: true,
                ..Taken::default()
            });
        }
        Err(e) => return Err(e),
    };
    let mut taken = Taken::default();
    let deadline = tokio::time::Instant::now() + read_for;
    loop {
        while let Some(len) = sse.event_len() {
            let event = &sse.body[..len];
            if find(event, b"event: snapshot\n").is_some() {
                taken.first_part.get_or_insert(started.elapsed());
            } else if find(event, b"event: error\n").is_some()
                && (find(event, b"\"busy\"").is_some() || find(event, b"\"unavailable\"").is_some())
            {
                // A refusal: `retry:`, one error event saying when to come
                // back, then the end of the stream.
                taken.busy = true;
                return Ok(taken);
            } else if find(event, b"event: snapshot_end\n").is_some() {
                taken.end = Some(started.elapsed());
                taken.products = wire::num_after(event, b"\"products\":").unwrap_or(0).max(0) as u64;
                return Ok(taken);
            }
            sse.consume_event(len);
        }
        match tokio::time::timeout_at(deadline, sse.fill()).await {
            Err(_) => return Ok(taken),
            Ok(r) => {
                if !r? {
                    bail!("the event stream ended before snapshot_end");
                }
            }
        }
    }
}

/// `bench catalog-whole --db D --vhost V --redis-prefix P`: the service on
/// that seeded catalog, allowing ten snapshots at a time (and twelve read
/// connections), and ten SSE clients taking `product.#` at once. Prints
/// `RESULT {json}` with the times and this process's RSS before and at most.
pub fn catalog_whole(args: Args) -> Result<()> {
    let mut iso = Isolation::new();
    iso.db_name = args.get("db")?;
    iso.vhost = args.get("vhost")?;
    iso.redis_prefix = args.get("redis-prefix")?;
    let mut settings = harness::settings(&iso, PRODUCTS)?;
    settings.hub.max_concurrent_snapshots = WHOLE_CLIENTS;
    harness::raise_per_address_turns(&mut settings);
    settings.database.read_pool_size = WHOLE_CLIENTS + 2;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let inst = Instance::start(settings, false).await?;
        let result = whole_snapshots(&inst).await;
        inst.stop().await?;
        println!("RESULT {}", result?);
        Ok(())
    })
}

async fn whole_snapshots(inst: &Instance) -> Result<serde_json::Value> {
    let pid = std::process::id().to_string();
    let before = rss_kib(&pid)?;
    let addr = inst.addr();
    let clients: Vec<_> = (0..WHOLE_CLIENTS)
        .map(|_| tokio::spawn(sse_snapshot(addr, "product.%23", Duration::from_secs(300))))
        .collect();
    let mut peak = before;
    let all = futures_util::future::join_all(clients);
    tokio::pin!(all);
    let results = loop {
        tokio::select! {
            r = &mut all => break r,
            _ = tokio::time::sleep(Duration::from_millis(50)) => peak = peak.max(rss_kib(&pid)?),
        }
    };
    let mut taken = Vec::new();
    for r in results {
        taken.push(r.map_err(|e| anyhow!("snapshot client: {e}"))??);
    }
    if let Some(t) = taken
        .iter()
        .find(|t| t.end.is_none() || t.products != u64::from(PRODUCTS))
    {
        bail!(
            "a whole-catalog snapshot ended with {} products (busy: {}, ended: {})",
            t.products,
            t.busy,
            t.end.is_some()
        );
    }
    let secs = |f: fn(&Taken) -> Option<Duration>| -> Vec<f64> {
        let mut v: Vec<f64> = taken.iter().filter_map(|t| f(t).map(|d| d.as_secs_f64())).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    Ok(serde_json::json!({
        "first": secs(|t| t.first_part),
        "end": secs(|t| t.end),
        "rss_before_kib": before,
        "rss_peak_kib": peak,
    }))
}

fn report_whole(ctx: &mut Ctx, whole: &serde_json::Value) -> Result<()> {
    let list = |k: &str| -> Result<Vec<f64>> {
        let v: Vec<f64> = whole[k]
            .as_array()
            .ok_or_else(|| anyhow!("catalog-whole: no {k} in {whole}"))?
            .iter()
            .filter_map(|x| x.as_f64())
            .collect();
        if v.is_empty() {
            bail!("catalog-whole: empty {k}");
        }
        Ok(v)
    };
    let (first, end) = (list("first")?, list("end")?);
    let med_max = |v: &[f64]| (v[v.len() / 2], v[v.len() - 1]);
    let ((first_med, first_max), (end_med, end_max)) = (med_max(&first), med_max(&end));
    ctx.report.row(
        S,
        format!("`product.#` snapshot, {WHOLE_CLIENTS} SSE clients at once: time to first part (median / slowest)"),
        format!("{:.0} ms / {:.0} ms", first_med * 1e3, first_max * 1e3),
        "",
        None,
    );
    ctx.report.row(
        S,
        format!("`product.#` snapshot, {WHOLE_CLIENTS} SSE clients at once: time to `snapshot_end` (median / slowest)"),
        format!("{end_med:.1} s / {end_max:.1} s"),
        "",
        None,
    );
    let before = whole["rss_before_kib"].as_u64().unwrap_or(0);
    let peak = whole["rss_peak_kib"].as_u64().unwrap_or(0);
    let growth_mb = peak.saturating_sub(before) as f64 / 1024.0;
    ctx.report.row(
        S,
        format!(
            "gateway RSS growth while {WHOLE_CLIENTS} clients take the whole catalog ({} products each; a process of its own)",
            thousands(f64::from(PRODUCTS))
        ),
        format!("{growth_mb:.0} MB (from {:.0} MB)", before as f64 / 1024.0),
        "< 100 MB in total",
        Some(growth_mb < 100.0),
    );
    Ok(())
}

/// Random product ids over the catalog (splitmix64).
fn product_ids(n: usize) -> Vec<u64> {
    let mut x: u64 = 0x5EED_CA7A_1060_0001;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % u64::from(PRODUCTS) + 1
        })
        .collect()
}

async fn one_product(ctx: &mut Ctx, inst: &Instance) -> Result<()> {
    let addr = inst.addr();
    let ids = product_ids(ONE_PRODUCT_SAMPLES);
    let mut ws_us = Vec::with_capacity(ids.len());
    for id in &ids {
        let mut ws = Ws::connect(addr, "/ws", None).await?;
        let frame = format!(r#"{{"op":"subscribe","topics":["product.*.{id}"],"snapshot":true}}"#);
        let started = Instant::now();
        ws.send_text(frame.as_bytes()).await?;
        let end = ws
            .wait_for(b"\"type\":\"snapshot_end\"", Duration::from_secs(10))
            .await?;
        ws_us.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        if wire::num_after(&end, b"\"products\":") != Some(1) {
            bail!("one-product snapshot of {id}: {}", String::from_utf8_lossy(&end));
        }
    }
    let mut sse_us = Vec::with_capacity(ids.len());
    for id in &ids {
        let t = sse_snapshot(addr, &format!("product.*.{id}"), Duration::from_secs(10)).await?;
        match (t.end, t.products) {
            (Some(end), 1) => sse_us.push(end.as_micros().min(u128::from(u32::MAX)) as u32),
            _ => bail!(
                "one-product SSE snapshot of {id}: {} products, busy {}",
                t.products,
                t.busy
            ),
        }
    }
    for (label, v) in [("WebSocket", &mut ws_us), ("SSE", &mut sse_us)] {
        v.sort_unstable();
        let p99 = pct_ms(v, 99.0);
        ctx.report.row(
            S,
            format!("one-product snapshot over {label}, {ONE_PRODUCT_SAMPLES} asks: p50 / p99"),
            format!("{:.2} ms / {p99:.2} ms", pct_ms(v, 50.0)),
            "p99 < 5 ms",
            Some(p99 < 5.0),
        );
    }
    Ok(())
}

async fn apply_lag(ctx: &mut Ctx, inst: &Instance, iso: &Isolation) -> Result<()> {
    let addr = inst.addr();
    let topology = &inst.state.settings.rabbit.topology;
    let queues = [topology.price_queue.clone(), topology.stock_queue.clone()];
    // Receipts on a client without a snapshot: (publish stamp, latency).
    let seen: Arc<Mutex<Vec<(i64, u32)>>> = Arc::default();
    let mut tracker = wire::gateway_ws(addr, &["product.#"], None).await?;
    let tracking = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = tracker.next_message(Duration::from_secs(60)).await {
                if let Some(ts) = wire::num_after(&m, b"\"ts_us\":") {
                    let latency = (now_us() - ts).max(0).min(i64::from(u32::MAX)) as u32;
                    seen.lock().await.push((ts, latency));
                }
            }
        })
    };
    // Versions above anything the seed wrote.
    let seq = Arc::new(AtomicU64::new(10_000_000));
    let publisher = PubProc::start(
        &iso.amqp_url(&iso.vhost),
        &topology.events_exchange,
        i64::from(PRODUCTS),
        seq,
        Pace::Rate(LAG_RATE),
        Some(LAG_LEAD + LAG_WINDOW + Duration::from_secs(2)),
        None,
        None,
    )
    .await?;
    tokio::time::sleep(LAG_LEAD).await;
    let window_start = now_us();
    let clients: Vec<_> = (0..LAG_CLIENTS)
        .map(|_| tokio::spawn(sse_snapshot(addr, "product.%23", LAG_READ)))
        .collect();
    let mut depth_max = 0u64;
    let window_end = Instant::now() + LAG_WINDOW;
    while Instant::now() < window_end {
        let mut depth = 0;
        for q in &queues {
            let v = mgmt_json(&format!("/api/queues/{}/{}", iso.vhost, q)).await?;
            depth += v["messages"].as_u64().unwrap_or(0);
        }
        depth_max = depth_max.max(depth);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let window_end_us = now_us();
    let (mut finished, mut busy, mut cut) = (0, 0, 0);
    for c in clients {
        let t = c.await.map_err(|e| anyhow!("snapshot client: {e}"))??;
        match (t.end, t.busy) {
            (Some(_), _) => finished += 1,
            (None, true) => busy += 1,
            (None, false) => cut += 1,
        }
    }
    publisher.stop();
    publisher.wait().await?;
    tracking.abort();
    let mut lat: Vec<u32> = seen
        .lock()
        .await
        .iter()
        .filter(|(ts, _)| (window_start..window_end_us).contains(ts))
        .map(|(_, l)| *l)
        .collect();
    if lat.is_empty() {
        bail!("no update was received during the snapshots");
    }
    lat.sort_unstable();
    let max_ms = f64::from(lat[lat.len() - 1]) / 1e3;
    ctx.report.row(
        S,
        format!(
            "apply lag while {LAG_CLIENTS} clients ask `product.#` snapshots at once, {LAG_RATE} events/s: \
             publish → client p50 / p99 / max ({} updates; snapshots finished {finished}, read for 20 s {cut}, \
             told to retry {busy}); apply queues' depth at most",
            thousands(lat.len() as f64)
        ),
        format!(
            "{:.0} / {:.0} / {max_ms:.0} ms; depth ≤ {depth_max}",
            pct_ms(&lat, 50.0),
            pct_ms(&lat, 99.0)
        ),
        "< 1 s",
        Some(max_ms < 1000.0),
    );
    Ok(())
}
