//! Load: the bench's own event publisher (pipelined confirms, open or closed
//! loop), a broker-only consumer for the ceiling, and a tracking client
//! that records every update it receives.
//!
//! Events are numbered by one counter for the whole run (`seq`): event `s`
//! carries version `s + 1`, so every event's version is unique and each
//! delivered update names exactly one published event. Event `s` changes
//! the price (even `s`) or the stock (odd `s`) of product `(s / 2) % N + 1`:
//! any `N` consecutive events of one kind touch `N` different products, so
//! as long as `N` is above the consumer's batch size, apply (which keeps
//! only the newest version per product and kind within a batch) never
//! merges two of them, and every event must come out as its own update.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use product_gateway::broker::publisher::{Confirmed, Outgoing, confirm_channel};
use product_gateway::domain::{Change, Event, PriceCents, ProductId, Stock, now_us};
use product_gateway::wire::encode_event;
use tokio_util::sync::CancellationToken;

use crate::wire::{self, UpdateInfo};

/// Unconfirmed publishes at once.
const CONFIRM_WINDOW: usize = 2048;

pub fn version_of(seq: u64) -> i64 {
    seq as i64 + 1
}

/// (product id, is price) of event `seq`.
pub fn key_of(seq: u64, products: i64) -> (i64, bool) {
    (((seq / 2) as i64) % products + 1, seq.is_multiple_of(2))
}

/// Event `seq` as the generator would publish it (same body, same
/// properties), stamped now.
/// The topic exchange the Web-STOMP comparison reads: each event published
/// there as the update a client receives, routed by its topic.
pub const STOMP_EXCHANGE: &str = "bench.stomp.updates";

/// Event `seq` as the generator would make it, stamped now.
pub fn event(seq: u64, products: i64) -> Event {
    let (product, price) = key_of(seq, products);
    let version = version_of(seq);
    let change = if price {
        Change::Price(PriceCents::try_from(100 + version % 100_000).unwrap_or_else(|_| unreachable!()))
    } else {
        Change::Stock(Stock::try_from(version % 1000).unwrap_or_else(|_| unreachable!()))
    };
    Event {
        product_id: ProductId::new(product).unwrap_or_else(|| unreachable!()),
        change,
        version,
        occurred_at: chrono::Utc::now(),
        ts_us: now_us(),
    }
}

/// Event `seq` as the generator would publish it (same body, same
/// properties), stamped now.
pub fn event_message(seq: u64, products: i64, exchange: &str) -> Outgoing {
    let event = event(seq, products);
    Outgoing::json(
        exchange,
        event.topic(),
        encode_event(&event).expect("an event always serialises"),
        uuid::Uuid::new_v4().to_string(),
        None,
    )
}

#[derive(Clone)]
pub enum Pace {
    /// Open loop: this many events per second, whatever happens downstream.
    Rate(f64),
    /// Closed loop: at most `window` events published and not yet counted
    /// by `seen` (a consumer's or a client's count).
    Closed { window: u64, seen: Arc<AtomicU64> },
}

#[derive(Debug, Clone, Copy)]
pub struct PublishRun {
    pub first_seq: u64,
    pub end_seq: u64,
    /// From the first publish to the last: the rate published is
    /// `count() / secs`.
    pub secs: f64,
    /// From the first publish to the last confirm.
    pub confirmed_secs: f64,
    /// Mean time from a publish to its confirm: the pipeline's first hop.
    pub confirm_mean_ms: f64,
}

impl PublishRun {
    pub fn count(&self) -> u64 {
        self.end_seq - self.first_seq
    }
}

/// What a publish run is told.
pub struct PublishJob {
    pub url: String,
    pub exchange: String,
    pub seq: Arc<AtomicU64>,
    pub products: i64,
    pub pace: Pace,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub stop: CancellationToken,
    /// Events published so far in this run, for progress sampling.
    pub sent: Arc<AtomicU64>,
    /// Also publish each event, as the update clients receive, to this
    /// topic exchange (the Web-STOMP comparison's source).
    pub mirror: Option<String>,
}

/// Publishes with pipelined confirms until the duration, the count or the
/// stop token; every publish must be confirmed (ack, not returned), or the
/// run fails.
pub async fn publish(job: PublishJob) -> Result<PublishRun> {
    let conn = lapin::Connection::connect(&job.url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| format!("publisher connects to {}", job.url))?;
    let channel = confirm_channel(&conn).await?;
    let first_seq = job.seq.load(Ordering::SeqCst);
    let seen0 = match &job.pace {
        Pace::Closed { seen, .. } => seen.load(Ordering::SeqCst),
        Pace::Rate(_) => 0,
    };
    let start = Instant::now();
    let mut sent = 0u64;
    let mut inflight = FuturesUnordered::new();
    let (mut confirm_total, mut confirms) = (Duration::ZERO, 0u32);
    let mut check = |(r, took): (lapin::Result<lapin::Confirmation>, Duration)| -> Result<()> {
        confirm_total += took;
        confirms += 1;
        let confirmation = r.context("publisher confirm")?;
        match Confirmed::of(&confirmation) {
            Confirmed::Ack => Ok(()),
            Confirmed::Returned => bail!("an event was returned as unroutable (topology missing?)"),
            Confirmed::Nacked => bail!("the broker did not confirm an event: {confirmation:?}"),
        }
    };
    loop {
        if job.stop.is_cancelled()
            || job.duration.is_some_and(|d| start.elapsed() >= d)
            || job.count.is_some_and(|c| sent >= c)
        {
            break;
        }
        let allowed = match &job.pace {
            Pace::Rate(r) => ((start.elapsed().as_secs_f64() * r) as u64 + 1).saturating_sub(sent),
            Pace::Closed { window, seen } => {
                let delivered = seen.load(Ordering::Relaxed).saturating_sub(seen0);
                window.saturating_sub(sent.saturating_sub(delivered))
            }
        };
        let mut n = allowed
            .min(CONFIRM_WINDOW.saturating_sub(inflight.len()) as u64)
            .min(256);
        if let Some(c) = job.count {
            n = n.min(c - sent);
        }
        for _ in 0..n {
            let s = job.seq.fetch_add(1, Ordering::SeqCst);
            let m = event_message(s, job.products, &job.exchange);
            if let Some(mirror) = &job.mirror {
                let e = event(s, job.products);
                let confirm = channel
                    .basic_publish(
                        mirror.as_str().into(),
                        e.topic().as_str().into(),
                        BasicPublishOptions::default(),
                        &product_gateway::wire::encode_update(&e).context("encode an update")?,
                        m.properties.clone(),
                    )
                    .await
                    .context("publish to the Web-STOMP exchange")?;
                inflight.push(timed(confirm, Instant::now()));
            }
            let published = Instant::now();
            let confirm = product_gateway::broker::publisher::publish_one(&channel, &m)
                .await
                .context("publish")?;
            inflight.push(timed(confirm, published));
            sent += 1;
        }
        job.sent.store(sent, Ordering::Relaxed);
        while let Some(Some(r)) = inflight.next().now_or_never() {
            check(r)?;
        }
        if n == 0 {
            tokio::select! {
                r = inflight.next(), if !inflight.is_empty() => {
                    if let Some(r) = r { check(r)?; }
                }
                _ = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        }
    }
    // The last confirms arrive after the last publish; counting the wait
    // for them as publishing time would read a publisher that kept the
    // rate as one that fell short.
    let secs = start.elapsed().as_secs_f64();
    let drain = async {
        while let Some(r) = inflight.next().await {
            check(r)?;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(60), drain)
        .await
        .map_err(|_| anyhow!("publisher confirms did not arrive within 60 s"))??;
    let confirmed_secs = start.elapsed().as_secs_f64();
    let _ = conn.close(200, "bench done".into()).await;
    let end_seq = job.seq.load(Ordering::SeqCst);
    Ok(PublishRun {
        first_seq,
        end_seq,
        secs,
        confirmed_secs,
        confirm_mean_ms: confirm_total.as_secs_f64() * 1e3 / f64::from(confirms.max(1)),
    })
}

/// A confirm with the time it took since `published`.
async fn timed(confirm: lapin::PublisherConfirm, published: Instant) -> (lapin::Result<lapin::Confirmation>, Duration) {
    let r = confirm.await;
    (r, published.elapsed())
}

/// Consumes `queues` with manual acks the way the gateway's consumer does
/// (QoS prefetch, batches of up to `batch` or `wait`, one multiple-ack per
/// batch), counting into `consumed`, without a database: the broker's own
/// ceiling for the pipeline's first hop.
pub async fn consume_acking(
    url: String,
    queues: Vec<String>,
    prefetch: u16,
    batch: usize,
    wait: Duration,
    consumed: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<()> {
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .context("ceiling consumer connects")?;
    let mut tasks = Vec::new();
    for q in queues {
        let channel = conn.create_channel().await?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumed = consumed.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    d = consumer.next() => d,
                    _ = stop.cancelled() => return Ok(()),
                };
                let Some(first) = first else {
                    bail!("consumer cancelled by the broker")
                };
                let mut last = first?.delivery_tag;
                let mut n = 1u64;
                let deadline = tokio::time::Instant::now() + wait;
                while (n as usize) < batch {
                    tokio::select! {
                        d = consumer.next() => match d {
                            Some(d) => { last = d?.delivery_tag; n += 1; }
                            None => bail!("consumer cancelled by the broker"),
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
                channel.basic_ack(last, BasicAckOptions { multiple: true }).await?;
                consumed.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| anyhow!("consumer task: {e}"))??;
    }
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}

/// What one subscribed client received, by event number.
pub struct Tracker {
    inner: Mutex<Track>,
    /// Distinct events received (duplicates, e.g. re-broadcasts, count once).
    pub distinct: Arc<AtomicU64>,
    pub last_offset: AtomicU64,
    pub frames: AtomicU64,
    pub alive: AtomicBool,
}

struct Track {
    base: u64,
    bits: Vec<u64>,
    /// (seq, latency µs) of each first receipt.
    lat: Vec<(u64, u32)>,
}

impl Tracker {
    /// Tracks events numbered from `base` on.
    pub fn new(base: u64) -> Arc<Self> {
        Arc::new(Tracker {
            inner: Mutex::new(Track {
                base,
                bits: Vec::new(),
                lat: Vec::new(),
            }),
            distinct: Arc::new(AtomicU64::new(0)),
            last_offset: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            alive: AtomicBool::new(true),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Track> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, u: &UpdateInfo, offset: u64, now: i64) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.last_offset.fetch_max(offset, Ordering::Relaxed);
        let seq = (u.version - 1) as u64;
        let mut t = self.lock();
        let Some(i) = seq.checked_sub(t.base) else { return };
        let (word, bit) = ((i / 64) as usize, i % 64);
        if t.bits.len() <= word {
            t.bits.resize(word + 1024, 0);
        }
        if t.bits[word] & (1 << bit) == 0 {
            t.bits[word] |= 1 << bit;
            t.lat.push((seq, (now - u.ts_us).clamp(0, u32::MAX as i64) as u32));
            drop(t);
            self.distinct.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many of the events `lo..hi` were received.
    pub fn received(&self, lo: u64, hi: u64) -> u64 {
        let t = self.lock();
        (lo.max(t.base)..hi)
            .filter(|s| {
                let i = s - t.base;
                t.bits.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
            })
            .count() as u64
    }

    /// Latencies (µs) of the events `lo..hi`, sorted.
    pub fn latencies(&self, lo: u64, hi: u64) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .lock()
            .lat
            .iter()
            .filter(|(s, _)| (lo..hi).contains(s))
            .map(|(_, l)| *l)
            .collect();
        v.sort_unstable();
        v
    }

    /// Waits until `received(lo, hi)` is complete or `within` passes;
    /// returns how long it took, None on time-out.
    pub async fn wait_all(&self, lo: u64, hi: u64, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        let want = hi - lo;
        let mut cheap = 0;
        loop {
            // The distinct counter is a cheap lower bound; count exactly
            // when it says the events may all be in.
            let d = self.distinct.load(Ordering::Relaxed);
            if d >= want && d != cheap {
                cheap = d;
                if self.received(lo, hi) == want {
                    return Some(start.elapsed());
                }
            }
            if start.elapsed() > within || !self.alive.load(Ordering::Relaxed) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A WebSocket client subscribed to `product.#` that records every update
/// into `tracker` until `stop`. `ready` fires once subscribed.
pub async fn track(
    addr: std::net::SocketAddr,
    tracker: Arc<Tracker>,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: CancellationToken,
) -> Result<()> {
    let result = async {
        let mut ws = wire::gateway_ws(addr, &["product.#"], None).await?;
        let _ = ready.send(());
        let frames = ws.data_frames("the tracking client", |p| {
            if p.starts_with(b"{\"type\":\"update\"")
                && let (Some(offset), Some(u)) = (wire::num_after(p, b"\"offset\":"), UpdateInfo::parse(p))
            {
                tracker.record(&u, offset as u64, now_us());
            }
        });
        tokio::select! {
            r = frames => r,
            _ = stop.cancelled() => Ok(()),
        }
    }
    .await;
    tracker.alive.store(false, Ordering::Relaxed);
    result
}

/// Percentile `p` (0..100) of sorted values, in milliseconds.
pub fn pct_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted_us.len() - 1) as f64).round() as usize;
    f64::from(sorted_us[i.min(sorted_us.len() - 1)]) / 1000.0
}
