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

mod picks;
mod rate;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, OptionFuture};
use futures_util::stream::FuturesUnordered;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::confirms::{ConfirmChannel, ConfirmResult, PendingConfirm};
use crate::broker::link::Connector;
use crate::broker::publisher::Confirmed;
use crate::domain::{Event, ProductId};
use crate::ingest;
use crate::metrics::Metrics;
use crate::settings::{GeneratorSettings, Settings};
use crate::store::{Db, StoreError};
use picks::{Ids, changes};
use rate::{Held, Pace};

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
    /// The traceparent of the tick that made it (tracing on).
    trace: Option<Arc<str>>,
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
    // The versions of the next fresh events, being issued: the loop goes
    // on publishing and reading confirms meanwhile (the statement waits for
    // rows apply holds; waited for in turn it held the loop up to 70% of
    // the time at 10,000 events/s).
    let mut issuing: Option<BoxFuture<'static, Result<Vec<Outgoing>, StoreError>>> = None;
    let mut outage = Outage::default();
    'connection: loop {
        let Some(conn) = connector.connect_retry("generator", &shutdown).await else {
            break;
        };
        let channel = match ConfirmChannel::open(&conn).await {
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
                match publish(&channel, &exchange, &p) {
                    Ok(confirm) => in_flight.push(wait_confirm(p, confirm, confirm_timeout)),
                    Err(e) => {
                        tracing::warn!(error = %e, "generator publish failed; reconnecting");
                        retry.push_front(p);
                        break;
                    }
                }
            }
            if !channel.connected() {
                // Unconfirmed events come back through `in_flight` as errors.
                drain(&mut in_flight, &mut retry, &mut refused, &metrics, backoff).await;
                continue 'connection;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // The versions being issued are published too: dropped,
                    // they would be issued and never sent.
                    if let Some(issued) = issuing.take()
                        && let Ok(Ok(fresh)) = tokio::time::timeout(confirm_timeout, issued).await
                    {
                        for p in fresh {
                            match publish(&channel, &exchange, &p) {
                                Ok(confirm) => in_flight.push(wait_confirm(p, confirm, confirm_timeout)),
                                Err(_) => retry.push_back(p),
                            }
                        }
                    }
                    // Give what is in flight a chance to be confirmed.
                    let _ = tokio::time::timeout(confirm_timeout, drain(&mut in_flight, &mut retry, &mut refused, &metrics, backoff)).await;
                    if !retry.is_empty() {
                        tracing::warn!(unconfirmed = retry.len(), "generator stopped with unconfirmed events");
                    }
                    break 'connection;
                }
                Some((p, outcome)) = in_flight.next() => {
                    let timed_out = matches!(&outcome, Err(e) if e == CONFIRM_TIMED_OUT);
                    settle(p, outcome, &mut retry, &mut refused, &metrics, backoff);
                    if timed_out {
                        // The node no longer reaches its cluster's majority
                        // (or this host no longer reaches the node): the
                        // rest of what is in flight comes back within the
                        // same time-out, then the next node.
                        tracing::warn!(timeout = ?confirm_timeout, "a confirm did not come in time; moving the generator to another node");
                        drain(&mut in_flight, &mut retry, &mut refused, &metrics, backoff).await;
                        continue 'connection;
                    }
                }
                _ = control.changed() => pace.reset(),
                Some(made) = OptionFuture::from(issuing.as_mut()) => {
                    issuing = None;
                    match made {
                        Ok(fresh) => {
                            outage.ended();
                            for p in fresh {
                                schedule(&mut retry, p);
                            }
                        }
                        Err(e) => outage.failed(&e),
                    }
                }
                _ = tick.tick() => {
                    let c = *control.borrow();
                    let leads = *leader.borrow();
                    held.sample(metrics.events_published.get(), if leads && c.running { c.rate } else { 0.0 });
                    // While a batch is being issued, what falls due waits
                    // for the next tick after it (the pace counts time,
                    // not ticks).
                    if issuing.is_none() {
                        let may = leads && retry.is_empty() && refused == 0;
                        let n = pace.due(c, may, g.max_in_flight.saturating_sub(in_flight.len()));
                        if n > 0 {
                            ids.refresh(&db).await;
                            issuing = Some(Box::pin(make_fresh(db.clone(), ids.pick_changes(n))));
                        }
                    }
                }
            }
        }
    }
}

/// Makes fresh events of `picks` (one or two, its price, its stock or
/// both, for each of distinct random products), their versions issued
/// together in one statement, so the rate the generator holds is the
/// broker's, not one database round trip per event.
async fn make_fresh(db: Db, picks: Vec<(ProductId, bool, bool)>) -> Result<Vec<Outgoing>, StoreError> {
    // One span per batch, not per event: the batch's events share its trace.
    let span = tracing::info_span!("generate", events = picks.len(), trace_id = tracing::field::Empty);
    crate::trace::show_id(&span);
    let trace: Option<Arc<str>> = crate::trace::traceparent(&span).map(Into::into);
    let counts: Vec<(ProductId, i64, i64)> = picks
        .iter()
        .map(|(id, price, stock)| (*id, i64::from(*price), i64::from(*stock)))
        .collect();
    let issued = async {
        let mut conn = db.get().await?;
        ingest::issue_many(&mut conn, &counts).await
    };
    let issued = issued.instrument(span).await?;
    let wanted: std::collections::HashMap<i64, (bool, bool)> = picks
        .iter()
        .map(|(id, price, stock)| (id.get(), (*price, *stock)))
        .collect();
    let now = Instant::now();
    let mut fresh = Vec::with_capacity(picks.len() * 2);
    for row in issued {
        let (Some(id), Some(&(price, stock))) = (ProductId::new(row.id), wanted.get(&row.id)) else {
            continue;
        };
        fresh.extend(
            changes(id, price, stock, &row.issued)
                .into_iter()
                .map(|event| Outgoing {
                    message_id: uuid::Uuid::new_v4().to_string(),
                    trace: trace.clone(),
                    event,
                    attempts: 0,
                    due: now,
                }),
        );
    }
    Ok(fresh)
}

/// While the database is unavailable no versions are issued, so the
/// generator pauses: said once when it starts and once when it ends, not
/// at every tick in between.
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
}

impl Outage {
    fn failed(&mut self, e: &StoreError) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            tracing::warn!(error = %e, "generator paused: database unavailable");
        }
    }

    fn ended(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(paused = ?since.elapsed(), "generator resumed: database available again");
        }
    }
}

const CONFIRM_TIMED_OUT: &str = "confirm timed out";

fn publish(channel: &ConfirmChannel, exchange: &str, p: &Outgoing) -> lapin::Result<PendingConfirm> {
    // Never expected; an error is a failed publish, never an empty body.
    let out = ingest::message(exchange, &p.event, &p.message_id, p.trace.as_deref())
        .map_err(|e| lapin::Error::from(std::io::Error::other(e)))?;
    channel.publish(out)
}

async fn wait_confirm(p: Outgoing, confirm: PendingConfirm, timeout: Duration) -> (Outgoing, ConfirmResult) {
    let outcome = tokio::time::timeout(timeout, confirm)
        .await
        .unwrap_or_else(|_| Err(CONFIRM_TIMED_OUT.to_owned()));
    (p, outcome)
}

fn settle(
    mut p: Outgoing,
    outcome: ConfirmResult,
    retry: &mut VecDeque<Outgoing>,
    refused: &mut usize,
    metrics: &Metrics,
    backoff: Backoff,
) {
    let reason = match outcome {
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
    F: std::future::Future<Output = (Outgoing, ConfirmResult)>,
{
    while let Some((p, outcome)) = in_flight.next().await {
        settle(p, outcome, retry, refused, metrics, backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
