//! The built-in upstream: on a timer, picks a random product, changes its
//! price, its stock or both, and publishes one event per changed attribute
//! with pipelined publisher confirms. Nothing is dropped: a nack, a return,
//! a confirm time-out or a lost connection puts the event back to be retried,
//! after an exponential back-off with jitter (capped), so a broker that keeps
//! refusing is not hammered; no fresh events are made while any wait.
//!
//! With several instances on one database, only the holder of a PostgreSQL
//! advisory lock generates; when it dies, its session ends, the lock is
//! released and another instance takes over.

pub(crate) mod versions;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::link::Connector;
use crate::broker::publisher::{Confirmed, confirm_channel, publish_one};
use crate::domain::{Change, Event, PriceCents, ProductId, Stock};
use crate::ingest;
use crate::metrics::Metrics;
use crate::settings::{GeneratorSettings, Settings};
use crate::store::Db;

/// Advisory lock key of the active generator (per database).
const LEADER_LOCK: i64 = 0x0067_656e_6c65_6164;

/// What the admin API can change at run time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Control {
    pub running: bool,
    /// Events per second.
    pub rate: f64,
}

/// Handle the HTTP layer uses to read and change the generator.
#[derive(Clone)]
pub struct GeneratorHandle {
    control: watch::Sender<Control>,
    leader: watch::Receiver<bool>,
    /// Events per second it holds (f64 bits; see [`Held`]).
    achieved: Arc<AtomicU64>,
}

impl GeneratorHandle {
    pub fn control(&self) -> Control {
        *self.control.borrow()
    }
    /// Events confirmed per second over the last few seconds, here (0
    /// where the generator runs on another instance).
    pub fn achieved(&self) -> f64 {
        f64::from_bits(AtomicU64::load(&self.achieved, Ordering::Relaxed))
    }
    pub fn set(&self, control: Control) {
        self.control.send_replace(control);
    }
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }
}

/// One event on its way to a confirm.
struct Outgoing {
    event: Event,
    message_id: String,
    attempts: u32,
    /// Not published again before this: the back-off after a failed attempt.
    due: Instant,
}

/// Why an event is published again; the label of the retries metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetryReason {
    Unroutable,
    Nacked,
    Unconfirmed,
}

impl RetryReason {
    fn as_str(self) -> &'static str {
        match self {
            RetryReason::Unroutable => "unroutable",
            RetryReason::Nacked => "nacked",
            RetryReason::Unconfirmed => "unconfirmed",
        }
    }
}

/// Exponential back-off between attempts of one event, capped, with jitter
/// so events refused together do not come back together.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// The wait before attempt `attempts + 1`: between half and all of
    /// `min × 2^(attempts - 1)`, at most `max`.
    fn delay(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(20);
        let full = self.min.saturating_mul(1 << doublings).min(self.max);
        let half = full / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }
}

/// Queues `p` in order of `due`, so the front is always the next one due.
fn schedule(retry: &mut VecDeque<Outgoing>, p: Outgoing) {
    let at = retry.partition_point(|q| q.due <= p.due);
    retry.insert(at, p);
}

pub(crate) fn spawn(
    settings: &Settings,
    db: Db,
    connector: Connector,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> GeneratorHandle {
    let g = settings.generator.clone();
    let (control_tx, control_rx) = watch::channel(Control {
        running: g.enabled,
        rate: g.rate,
    });
    let (leader_tx, leader_rx) = watch::channel(false);
    tracker.spawn(lead(
        settings.database.url.expose().to_owned(),
        leader_tx,
        shutdown.clone(),
    ));
    let exchange = settings.rabbit.topology.events_exchange.clone();
    let achieved = Arc::new(AtomicU64::new(0f64.to_bits()));
    let held = Held::new(achieved.clone(), metrics.clone());
    tracker.spawn(publish_loop(
        g,
        exchange,
        db,
        connector,
        metrics,
        control_rx,
        leader_rx.clone(),
        held,
        shutdown,
    ));
    GeneratorHandle {
        control: control_tx,
        leader: leader_rx,
        achieved,
    }
}

/// Holds the advisory lock on a dedicated session while it can.
async fn lead(url: String, leader: watch::Sender<bool>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let attempt = async {
            let mut conn = AsyncPgConnection::establish(&url).await.ok()?;
            #[derive(diesel::QueryableByName)]
            struct Locked {
                #[diesel(sql_type = diesel::sql_types::Bool)]
                locked: bool,
            }
            let got: Locked = diesel::sql_query(format!("SELECT pg_try_advisory_lock({LEADER_LOCK}) AS locked"))
                .get_result(&mut conn)
                .await
                .ok()?;
            got.locked.then_some(conn)
        };
        if let Some(mut conn) = attempt.await {
            tracing::info!("this instance now runs the generator");
            leader.send_replace(true);
            // Hold the session; check it is alive so a lost session (and so
            // a lost lock) stops generation here.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                let alive =
                    tokio::time::timeout(Duration::from_secs(2), diesel::sql_query("SELECT 1").execute(&mut conn))
                        .await;
                if !matches!(alive, Ok(Ok(_))) {
                    tracing::warn!("generator lock session lost");
                    break;
                }
            }
            leader.send_replace(false);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn publish_loop(
    g: GeneratorSettings,
    exchange: String,
    db: Db,
    connector: Connector,
    metrics: Arc<Metrics>,
    mut control: watch::Receiver<Control>,
    leader: watch::Receiver<bool>,
    mut held: Held,
    shutdown: CancellationToken,
) {
    let confirm_timeout = g.confirm_timeout;
    let backoff = Backoff {
        min: g.retry_min.max(Duration::from_millis(1)),
        max: g.retry_max.max(g.retry_min).max(Duration::from_millis(1)),
    };
    let mut retry: VecDeque<Outgoing> = VecDeque::new();
    // Events refused at least once and not yet confirmed, waiting or in
    // flight: while there are any, no fresh events are made.
    let mut refused = 0_usize;
    let mut pace = Pace::default();
    let mut ids = Ids::default();
    'connection: loop {
        let Some(conn) = connector.connect_retry("generator", &shutdown).await else {
            break;
        };
        let channel = match confirm_channel(&conn).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "generator channel failed");
                continue;
            }
        };
        let mut in_flight = FuturesUnordered::new();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pace.restart();
        loop {
            // Retries that are due first, then fresh events, within the
            // in-flight window.
            let now = Instant::now();
            while in_flight.len() < g.max_in_flight
                && retry.front().is_some_and(|p| p.due <= now)
                && let Some(p) = retry.pop_front()
            {
                match publish(&channel, &exchange, &p).await {
                    Ok(confirm) => in_flight.push(wait_confirm(p, confirm, confirm_timeout)),
                    Err(e) => {
                        tracing::warn!(error = %e, "generator publish failed; reconnecting");
                        retry.push_front(p);
                        break;
                    }
                }
            }
            if !channel.status().connected() {
                // Unconfirmed events come back through `in_flight` as errors.
                drain(&mut in_flight, &mut retry, &mut refused, &metrics, backoff).await;
                continue 'connection;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Give what is in flight a chance to be confirmed.
                    let _ = tokio::time::timeout(confirm_timeout, drain(&mut in_flight, &mut retry, &mut refused, &metrics, backoff)).await;
                    if !retry.is_empty() {
                        tracing::warn!(unconfirmed = retry.len(), "generator stopped with unconfirmed events");
                    }
                    break 'connection;
                }
                Some((p, outcome)) = in_flight.next() => settle(p, outcome, &mut retry, &mut refused, &metrics, backoff),
                _ = control.changed() => pace.reset(),
                _ = tick.tick() => {
                    let c = *control.borrow();
                    let leads = *leader.borrow();
                    held.sample(metrics.events_published.get(), if leads && c.running { c.rate } else { 0.0 });
                    let may = leads && retry.is_empty() && refused == 0;
                    let n = pace.due(c, may, g.max_in_flight.saturating_sub(in_flight.len()));
                    make_fresh(&db, &mut ids, n, &mut retry).await;
                }
            }
        }
    }
}

/// What the generator holds: events confirmed per second over the last
/// [`HELD_WINDOW`], for the admin API, the console and a metric, with a
/// warning once it has stayed below [`HELD_SHORT`] of the rate asked for
/// [`HELD_WARN_AFTER`] (the broker or database is slower than asked, or
/// refuses events).
struct Held {
    /// (when, events confirmed so far), one every [`HELD_SAMPLE`].
    samples: VecDeque<(Instant, u64)>,
    achieved: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    short_since: Option<Instant>,
    warned: bool,
}

const HELD_WINDOW: Duration = Duration::from_secs(5);
const HELD_SAMPLE: Duration = Duration::from_millis(100);
const HELD_SHORT: f64 = 0.9;
const HELD_WARN_AFTER: Duration = Duration::from_secs(10);

impl Held {
    fn new(achieved: Arc<AtomicU64>, metrics: Arc<Metrics>) -> Self {
        Held {
            samples: VecDeque::new(),
            achieved,
            metrics,
            short_since: None,
            warned: false,
        }
    }

    /// Records the count of confirmed events now; `asked` is the rate
    /// this instance should hold (0 while stopped or not the leader).
    fn sample(&mut self, confirmed: u64, asked: f64) {
        self.sample_at(Instant::now(), confirmed, asked);
    }

    fn sample_at(&mut self, now: Instant, confirmed: u64, asked: f64) {
        if self
            .samples
            .back()
            .is_some_and(|(t, _)| now.duration_since(*t) < HELD_SAMPLE)
        {
            return;
        }
        self.samples.push_back((now, confirmed));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= HELD_WINDOW)
        {
            self.samples.pop_front();
        }
        let Some(&(since, before)) = self.samples.front() else {
            return;
        };
        let secs = now.duration_since(since).as_secs_f64();
        let rate = if secs > 0.0 {
            confirmed.saturating_sub(before) as f64 / secs
        } else {
            0.0
        };
        self.achieved.store(rate.to_bits(), Ordering::Relaxed);
        self.metrics.generator_asked_rate.set(asked);
        self.metrics.generator_achieved_rate.set(rate);
        // Judged only over a whole window: a start or a change of rate is
        // not a shortfall.
        let judged = secs >= HELD_WINDOW.as_secs_f64() * 0.9;
        if asked > 0.0 && judged && rate < HELD_SHORT * asked {
            let since = *self.short_since.get_or_insert(now);
            if !self.warned && now.duration_since(since) >= HELD_WARN_AFTER {
                self.warned = true;
                tracing::warn!(
                    asked,
                    achieved = rate.round(),
                    "the generator holds less than the rate asked"
                );
            }
        } else if asked == 0.0 || rate >= HELD_SHORT * asked {
            if self.warned {
                tracing::info!(
                    asked,
                    achieved = rate.round(),
                    "the generator holds the rate asked again"
                );
            }
            self.short_since = None;
            self.warned = false;
        }
    }

    #[cfg(test)]
    fn achieved(&self) -> f64 {
        f64::from_bits(AtomicU64::load(&self.achieved, Ordering::Relaxed))
    }
}

/// How many fresh events are due at each tick: the set rate, with at most
/// one second's worth made up after a pause, and none while the generator
/// is stopped or may not make any.
#[derive(Debug, Default)]
struct Pace {
    budget: f64,
    last: Option<tokio::time::Instant>,
}

impl Pace {
    /// On a new connection: the time before it is not made up for.
    fn restart(&mut self) {
        self.last = Some(tokio::time::Instant::now());
    }

    fn reset(&mut self) {
        self.budget = 0.0;
    }

    /// Events due now, at most `room`. `may` is false while this instance
    /// is not the leader or refused events wait.
    fn due(&mut self, c: Control, may: bool, room: usize) -> usize {
        self.due_at(tokio::time::Instant::now(), c, may, room)
    }

    fn due_at(&mut self, now: tokio::time::Instant, c: Control, may: bool, room: usize) -> usize {
        let elapsed = self.last.map_or(0.0, |l| now.duration_since(l).as_secs_f64());
        self.last = Some(now);
        if !c.running || c.rate <= 0.0 || !may {
            self.budget = 0.0;
            return 0;
        }
        self.budget = (self.budget + c.rate * elapsed).min(c.rate.max(1.0));
        let n = (self.budget.floor() as usize).min(room);
        self.budget -= n as f64;
        n
    }
}

/// The product ids to pick from, read again now and then: products come
/// and go.
#[derive(Default)]
struct Ids {
    ids: Vec<i64>,
    read: Option<Instant>,
}

impl Ids {
    async fn refresh(&mut self, db: &Db) {
        if self.ids.is_empty() || self.read.is_none_or(|r| r.elapsed() > IDS_REREAD) {
            if let Ok(fresh) = versions::product_ids(db).await {
                self.ids = fresh;
            }
            self.read = Some(Instant::now());
        }
    }

    /// Distinct random products and what changes in each (price, stock),
    /// `n` changes in all, or fewer when the catalog is small.
    fn pick_changes(&self, n: usize) -> Vec<(ProductId, bool, bool)> {
        let mut rng = rand::rng();
        let mut taken = std::collections::HashSet::new();
        let mut picks = Vec::new();
        let mut left = n;
        // Bounded: a catalog with fewer products than changes due runs
        // out of distinct ones.
        for _ in 0..n.saturating_mul(4) {
            if left == 0 || self.ids.is_empty() {
                break;
            }
            let id = self.ids[rng.random_range(0..self.ids.len())];
            let Some(id) = ProductId::new(id).filter(|_| taken.insert(id)) else {
                continue;
            };
            let (price, stock) = match rng.random_range(0..3u8) {
                0 => (true, false),
                1 => (false, true),
                _ if left >= 2 => (true, true),
                // One change left: either kind.
                _ => {
                    let price: bool = rng.random();
                    (price, !price)
                }
            };
            left -= usize::from(price) + usize::from(stock);
            picks.push((id, price, stock));
        }
        picks
    }
}

/// Makes `n` fresh events and schedules them now: one or two (its price,
/// its stock or both) for each of distinct random products, their versions
/// issued together in one statement, so the rate the generator holds is
/// the broker's, not one database round trip per event. Makes none while
/// the database is unavailable.
async fn make_fresh(db: &Db, ids: &mut Ids, n: usize, retry: &mut VecDeque<Outgoing>) {
    if n == 0 {
        return;
    }
    ids.refresh(db).await;
    let picks = ids.pick_changes(n);
    let counts: Vec<(ProductId, i64, i64)> = picks
        .iter()
        .map(|(id, price, stock)| (*id, i64::from(*price), i64::from(*stock)))
        .collect();
    let issued = async {
        let mut conn = db.get().await?;
        ingest::issue_many(&mut conn, &counts).await
    };
    let issued = match issued.await {
        Ok(issued) => issued,
        Err(e) => {
            tracing::warn!(error = %e, "generator paused: database unavailable");
            return;
        }
    };
    let wanted: std::collections::HashMap<i64, (bool, bool)> = picks
        .iter()
        .map(|(id, price, stock)| (id.get(), (*price, *stock)))
        .collect();
    let now = Instant::now();
    for row in issued {
        let (Some(id), Some(&(price, stock))) = (ProductId::new(row.id), wanted.get(&row.id)) else {
            continue;
        };
        for event in changes(id, price, stock, &row.issued) {
            let p = Outgoing {
                message_id: uuid::Uuid::new_v4().to_string(),
                event,
                attempts: 0,
                due: now,
            };
            schedule(retry, p);
        }
    }
}

type ConfirmOutcome = Result<lapin::Confirmation, String>;

async fn publish(channel: &lapin::Channel, exchange: &str, p: &Outgoing) -> lapin::Result<lapin::PublisherConfirm> {
    // Never expected; an error is a failed publish, never an empty body.
    let out =
        ingest::message(exchange, &p.event, &p.message_id).map_err(|e| lapin::Error::from(std::io::Error::other(e)))?;
    publish_one(channel, &out).await
}

async fn wait_confirm(p: Outgoing, confirm: lapin::PublisherConfirm, timeout: Duration) -> (Outgoing, ConfirmOutcome) {
    let outcome = match tokio::time::timeout(timeout, confirm).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("confirm timed out".to_owned()),
    };
    (p, outcome)
}

fn settle(
    mut p: Outgoing,
    outcome: ConfirmOutcome,
    retry: &mut VecDeque<Outgoing>,
    refused: &mut usize,
    metrics: &Metrics,
    backoff: Backoff,
) {
    let reason = match outcome.as_ref().map(Confirmed::of) {
        Ok(Confirmed::Ack) => {
            if p.attempts > 0 {
                *refused = refused.saturating_sub(1);
            }
            metrics.events_published.inc();
            metrics.events_confirmed.inc();
            return;
        }
        Ok(Confirmed::Returned) => {
            metrics.events_returned.inc();
            RetryReason::Unroutable
        }
        Ok(Confirmed::Nacked) => {
            metrics.events_nacked.inc();
            RetryReason::Nacked
        }
        Err(e) => {
            tracing::debug!(error = %e, "event unconfirmed");
            RetryReason::Unconfirmed
        }
    };
    metrics.events_retried.inc();
    metrics
        .generator_retries
        .get_or_create(&[("reason", reason.as_str())])
        .inc();
    if p.attempts == 0 {
        *refused += 1;
    }
    p.attempts += 1;
    let wait = backoff.delay(p.attempts);
    // The first of a run of failures is worth a line; the rest are counted.
    if p.attempts == 1 && reason != RetryReason::Unconfirmed {
        tracing::warn!(topic = %p.event.topic(), reason = reason.as_str(), "event refused; retrying with back-off");
    }
    p.due = Instant::now() + wait;
    schedule(retry, p);
}

async fn drain<F>(
    in_flight: &mut FuturesUnordered<F>,
    retry: &mut VecDeque<Outgoing>,
    refused: &mut usize,
    metrics: &Metrics,
    backoff: Backoff,
) where
    F: std::future::Future<Output = (Outgoing, ConfirmOutcome)>,
{
    while let Some((p, outcome)) = in_flight.next().await {
        settle(p, outcome, retry, refused, metrics, backoff);
    }
}

/// How often the generator reads the catalog's ids again.
const IDS_REREAD: Duration = Duration::from_secs(60);

/// The events of one product's change from its issued state: a price move
/// of up to ±5 % and a stock move of a few units, each within sane bounds.
fn changes(id: ProductId, price: bool, stock: bool, issued: &ingest::Issued) -> Vec<Event> {
    let mut rng = rand::rng();
    let mut events = Vec::with_capacity(2);
    if price {
        let factor = 1.0 + rng.random_range(-0.05..=0.05);
        let cents = ((issued.price_cents as f64 * factor).round() as i64).clamp(99, 10_000_000);
        if let Ok(p) = PriceCents::try_from(cents) {
            events.push(ingest::event(id, Change::Price(p), issued.price_issued));
        }
    }
    if stock {
        let delta = rng.random_range(-20..=25);
        if let Ok(s) = Stock::try_from((issued.stock + delta).clamp(0, 100_000)) {
            events.push(ingest::event(id, Change::Stock(s), issued.stock_issued));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_keeps_the_rate_makes_up_at_most_a_second_and_nothing_while_it_may_not() {
        let on = Control {
            running: true,
            rate: 100.0,
        };
        let t0 = tokio::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut pace = Pace {
            last: Some(t0),
            ..Pace::default()
        };
        // 10 ms ticks at 100/s: one a tick, 100 a second.
        let made: usize = (1..=100).map(|i| pace.due_at(at(i * 10), on, true, 1000)).sum();
        assert_eq!(made, 100);
        // Five seconds without a tick: one second's worth, within the room.
        assert_eq!(pace.due_at(at(6000), on, true, 1000), 100);
        assert_eq!(pace.due_at(at(7000), on, true, 40), 40, "at most the room");
        // Not the leader (or refused events waiting): none, and none saved up.
        assert_eq!(pace.due_at(at(8000), on, false, 1000), 0);
        assert_eq!(pace.due_at(at(8010), on, true, 1000), 1);
        let off = Control { running: false, ..on };
        assert_eq!(pace.due_at(at(9000), off, true, 1000), 0);
    }

    #[test]
    fn held_is_the_confirmed_rate_and_warns_only_after_a_sustained_shortfall() {
        let metrics = Metrics::new();
        let mut held = Held::new(Arc::new(AtomicU64::new(0)), metrics.clone());
        let t0 = Instant::now();
        let mut confirmed = 0;
        // 500 events/s confirmed, 100 ms apart; `asked` for `secs` from `from`.
        let mut run = |held: &mut Held, from: u64, secs: u64, asked: f64| {
            for step in 0..secs * 10 {
                confirmed += 50;
                held.sample_at(t0 + Duration::from_millis((from * 10 + step) * 100), confirmed, asked);
            }
        };
        run(&mut held, 0, 10, 500.0);
        assert!((held.achieved() - 500.0).abs() < 1.0, "{}", held.achieved());
        assert_eq!(metrics.generator_achieved_rate.get(), held.achieved());
        assert!(!held.warned, "holds what is asked");
        // Asked twice as much: short, but warned only after 10 s of it.
        run(&mut held, 10, 9, 1000.0);
        assert!(!held.warned, "not yet: a shortfall of 9 s");
        run(&mut held, 19, 3, 1000.0);
        assert!(held.warned, "a shortfall of 12 s");
        assert_eq!(metrics.generator_asked_rate.get(), 1000.0);
        // Stopped (or running elsewhere): nothing is asked, nothing short.
        run(&mut held, 22, 1, 0.0);
        assert!(!held.warned && held.short_since.is_none());
    }

    #[test]
    fn the_changes_due_fall_on_distinct_products_and_add_up() {
        let ids = Ids {
            ids: (1..=1000).collect(),
            read: None,
        };
        for due in [1, 2, 7, 100] {
            let picks = ids.pick_changes(due);
            let changes: usize = picks.iter().map(|(_, p, s)| usize::from(*p) + usize::from(*s)).sum();
            assert_eq!(changes, due);
            let distinct: std::collections::HashSet<_> = picks.iter().map(|(id, _, _)| id.get()).collect();
            assert_eq!(distinct.len(), picks.len(), "one pick per product");
            assert!(picks.iter().all(|(_, p, s)| *p || *s), "every pick changes something");
        }
        let few = Ids {
            ids: (1..=10).collect(),
            read: None,
        };
        let picks = few.pick_changes(100);
        assert!(picks.len() <= 10, "no more products than the catalog has");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        for _ in 0..200 {
            let d1 = b.delay(1);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d4 = b.delay(4);
            assert!(
                d4 >= Duration::from_millis(400) && d4 <= Duration::from_millis(800),
                "{d4:?}"
            );
            let d_many = b.delay(u32::MAX);
            assert!(
                d_many >= Duration::from_millis(2500) && d_many <= Duration::from_secs(5),
                "{d_many:?}"
            );
        }
    }
}
