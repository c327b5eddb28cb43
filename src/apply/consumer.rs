//! The apply consumer: reads a batch from a quorum queue (manual acks, QoS
//! prefetch), dead-letters what can never apply (with its reason), applies
//! the rest to PostgreSQL in one transaction (which also writes the applied
//! updates to the outbox the relay publishes to `product.updates`), and only
//! then acks the batch with one multiple-ack, which settles the dead-lettered
//! deliveries too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, Stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::apply::pulse::StreamPulse;
use crate::apply::write::{Outcome, apply_batch};
use crate::broker::link::{Connector, Link};
use crate::broker::publisher::{Outgoing, confirm_channel, publish_all};
use crate::domain::Event;
use crate::metrics::Metrics;
use crate::settings::{ConsumerSettings, TopologySettings};
use crate::store::Db;
use crate::wire::{DETAIL_HEADER, REASON_HEADER, Reject, decode_delivery};

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Ctx {
    settings: ConsumerSettings,
    topology: TopologySettings,
    db: Db,
    metrics: Arc<Metrics>,
    /// Wakes the outbox relay once a batch committed.
    outbox: Arc<Notify>,
    pulse: Arc<StreamPulse>,
    shutdown: CancellationToken,
}

/// Starts one consumer per apply queue. Returns what it signals after each
/// committed batch.
pub(crate) fn spawn(
    settings: &ConsumerSettings,
    topology: &TopologySettings,
    db: Db,
    connector: Connector,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Committed {
    let outbox = Arc::new(Notify::new());
    let pulse = Arc::new(StreamPulse::default());
    let ctx = Ctx {
        settings: settings.clone(),
        topology: topology.clone(),
        db,
        metrics,
        outbox: outbox.clone(),
        pulse: pulse.clone(),
        shutdown,
    };
    for (queue, stage) in [
        (&topology.price_queue, "apply-price"),
        (&topology.stock_queue, "apply-stock"),
    ] {
        tracker.spawn(run(ctx.clone(), connector.clone(), queue.clone(), stage));
    }
    Committed { outbox, pulse }
}

/// What apply tells the stages after it about each committed batch.
pub(crate) struct Committed {
    /// Notified after each batch: wakes the outbox relay.
    pub outbox: Arc<Notify>,
    /// Marked for each batch that wrote updates (and by the relay for each
    /// message it publishes): the live stream reader checks they come back.
    pub pulse: Arc<StreamPulse>,
}

async fn run(ctx: Ctx, connector: Connector, queue: String, stage: &'static str) {
    loop {
        let Some(conn) = connector.connect_retry(stage, &ctx.shutdown).await else {
            return;
        };
        match consume(&ctx, &conn, &queue).await {
            Ok(()) => return,
            Err(e) => {
                ctx.metrics.consumer_reconnects.inc();
                tracing::warn!(stage, error = %e, "consumer interrupted; reconnecting");
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Consumes until shutdown (Ok) or a broker failure (Err).
async fn consume(ctx: &Ctx, conn: &Connection, queue: &str) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(ctx.settings.prefetch, BasicQosOptions::default())
        .await?;
    let publisher = confirm_channel(conn).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let max_wait = ctx.settings.batch_max_wait;
    let mut arrivals = Arrivals::default();
    loop {
        let first = tokio::select! {
            d = consumer.next() => d,
            _ = ctx.shutdown.cancelled() => return Ok(()),
        };
        let first = next_delivery(first)?;
        let started = Instant::now();
        let busy = arrivals.faster_than(max_wait);
        let batch = gather(Ok(first), &mut consumer, ctx.settings.batch_size, max_wait, busy)
            .await
            .into_iter()
            .collect::<lapin::Result<Vec<Delivery>>>()?;
        arrivals.batch(started, batch.len());
        let span = tracing::info_span!(
            "apply_batch",
            queue,
            size = batch.len(),
            first_tag = batch.first().map(|d| d.delivery_tag),
            last_tag = batch.last().map(|d| d.delivery_tag),
        );
        process(ctx, &channel, &publisher, batch).instrument(span).await?;
    }
}

/// How fast deliveries come: the mean gap between them, smoothed over the
/// last batches (each batch's share of the time since the one before).
#[derive(Debug, Default)]
struct Arrivals {
    last: Option<Instant>,
    /// None until two batches were seen: a start is not a load.
    gap: Option<Duration>,
}

impl Arrivals {
    /// A batch of `n` deliveries began at `at`.
    fn batch(&mut self, at: Instant, n: usize) {
        if let Some(last) = self.last {
            let gap = at.saturating_duration_since(last) / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
            // A quarter of the new gap: a burst or a pause moves it within
            // a few batches, one odd gap does not.
            self.gap = Some(self.gap.map_or(gap, |g| (g * 3 + gap) / 4));
        }
        self.last = Some(at);
    }

    /// Whether another delivery is to be expected within `linger`.
    fn faster_than(&self, linger: Duration) -> bool {
        self.gap.is_some_and(|g| g < linger)
    }
}

/// A batch: `first`, whatever `deliveries` has already received, and, when
/// they come faster than one per `linger` (`busy`, from [`Arrivals`]), what
/// comes within it; at most `size`. A lone event at light load is applied
/// at once, with no fixed wait. Under load the linger gathers a few
/// milliseconds' worth: each batch is a transaction, an outbox row and a
/// stream message, so batches of one at a thousand events a second would
/// cost every later stage a message each. The end of the stream ends the
/// batch; the next read reports it.
async fn gather<S, T>(first: T, deliveries: &mut S, size: usize, linger: Duration, busy: bool) -> Vec<T>
where
    S: Stream<Item = T> + Unpin,
{
    let mut batch = vec![first];
    while batch.len() < size {
        match deliveries.next().now_or_never() {
            Some(Some(d)) => batch.push(d),
            Some(None) => return batch,
            None => break,
        }
    }
    if linger.is_zero() || (batch.len() == 1 && !busy) {
        return batch;
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < size {
        tokio::select! {
            d = deliveries.next() => match d {
                Some(d) => batch.push(d),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    batch
}

fn next_delivery(d: Option<lapin::Result<Delivery>>) -> anyhow::Result<Delivery> {
    match d {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(e.into()),
        None => Err(anyhow::anyhow!("consumer was cancelled by the broker")),
    }
}

async fn process(ctx: &Ctx, channel: &Channel, publisher: &Channel, batch: Vec<Delivery>) -> anyhow::Result<()> {
    let started = Instant::now();
    let last_tag = batch.last().map(|d| d.delivery_tag).unwrap_or_default();
    ctx.metrics.apply_batch_size.observe(batch.len() as f64);

    let mut valid: Vec<(Delivery, Event)> = Vec::with_capacity(batch.len());
    let mut rejected: Vec<(Delivery, Reject)> = Vec::new();
    for d in batch {
        let ct = d.properties.content_type().as_ref().map(|c| c.as_str());
        let enc = d.properties.content_encoding().as_ref().map(|c| c.as_str());
        match decode_delivery(&d.data, ct, enc, d.routing_key.as_str(), ctx.settings.max_body_bytes) {
            Ok(event) => valid.push((d, event)),
            Err(reason) => rejected.push((d, reason)),
        }
    }
    dead_letter(ctx, publisher, &rejected).await?;

    // One span per batch: the child of its first traced event's publish,
    // linked to the others'; its context goes to the outbox with the batch.
    let span = tracing::info_span!("apply", events = valid.len(), trace_id = tracing::field::Empty);
    crate::trace::follow_all(
        &span,
        valid
            .iter()
            .filter_map(|(d, _)| crate::trace::of_headers(d.properties.headers())),
    );
    crate::trace::show_id(&span);
    let events: Vec<Event> = valid.iter().map(|(_, e)| e.clone()).collect();
    let trace = crate::trace::traceparent(&span);
    let epoch = ctx.pulse.epoch();
    let applied = apply_with_retry(ctx, &events, trace.as_deref()).instrument(span).await;
    let Some(outcomes) = applied else {
        // Still failing: hand the valid events back to the broker, which
        // counts the delivery toward the limit and dead-letters it past that.
        // Each tag is settled once: a multiple-nack would also cover the
        // dead-lettered ones, and settling a tag twice closes the channel.
        for (d, _) in &rejected {
            channel.basic_ack(d.delivery_tag, BasicAckOptions::default()).await?;
        }
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        for (d, _) in &valid {
            channel.basic_nack(d.delivery_tag, requeue).await?;
        }
        return Ok(());
    };
    ctx.metrics.apply_latency.observe(started.elapsed().as_secs_f64());
    // The applied updates are in the outbox, committed with the batch.
    ctx.outbox.notify_one();

    if outcomes.iter().any(|o| matches!(o, Outcome::Applied)) {
        ctx.pulse.committed(epoch);
    }
    let mut unknown = Vec::new();
    for ((delivery, event), outcome) in valid.into_iter().zip(outcomes) {
        let kind = event.kind().as_str();
        match outcome {
            Outcome::Applied => {
                ctx.metrics.events_applied.get_or_create(&[("kind", kind)]).inc();
                crate::metrics::observe_since(&ctx.metrics.commit_latency, event.ts_us);
            }
            // Its broadcast, if it ever applied, went to the outbox with
            // the commit: nothing to send again.
            Outcome::Duplicate { .. } => {
                ctx.metrics.events_duplicate.get_or_create(&[("kind", kind)]).inc();
            }
            Outcome::UnknownProduct => unknown.push((delivery, Reject::UnknownProduct(event.product_id.get()))),
        }
    }
    dead_letter(ctx, publisher, &unknown).await?;
    // One multiple-ack settles the whole batch, dead-lettered deliveries
    // included: none of them was acked on its own.
    channel.basic_ack(last_tag, BasicAckOptions { multiple: true }).await?;
    Ok(())
}

/// Applies with in-process retries and back-off; None when every attempt
/// failed (or shutdown came first).
async fn apply_with_retry(ctx: &Ctx, events: &[Event], trace: Option<&str>) -> Option<Vec<Outcome>> {
    if events.is_empty() {
        return Some(vec![]);
    }
    let mut delay = ctx.settings.retry_min;
    for attempt in 0..=ctx.settings.transient_retries {
        match apply_batch(&ctx.db, events, trace).await {
            Ok(outcomes) => return Some(outcomes),
            Err(e) => {
                ctx.metrics.transient_failures.inc();
                tracing::warn!(error = %e, attempt, retry_in = ?delay, "apply failed; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ctx.shutdown.cancelled() => return None,
        }
        delay = (delay * 2).min(ctx.settings.retry_max);
    }
    None
}

/// Republishes each rejected message to the dead-letter exchange with its
/// reason and waits for the confirms. The originals are left unsettled: the
/// caller settles every tag of the batch exactly once.
async fn dead_letter(ctx: &Ctx, publisher: &Channel, rejected: &[(Delivery, Reject)]) -> anyhow::Result<()> {
    if rejected.is_empty() {
        return Ok(());
    }
    let messages: Vec<Outgoing> = rejected
        .iter()
        .map(|(d, reason)| {
            tracing::info!(reason = reason.code(), routing_key = %d.routing_key, "dead-lettering event");
            let mut headers = d.properties.headers().clone().unwrap_or_default();
            let s = |v: &str| AMQPValue::LongString(LongString::from(v));
            headers.insert(REASON_HEADER.into(), s(reason.code()));
            headers.insert(DETAIL_HEADER.into(), s(&reason.detail()));
            headers.insert("x-original-exchange".into(), s(d.exchange.as_str()));
            headers.insert("x-original-routing-key".into(), s(d.routing_key.as_str()));
            headers.insert("x-rejected-at".into(), s(&chrono::Utc::now().to_rfc3339()));
            Outgoing {
                exchange: ctx.topology.dlx.clone(),
                routing_key: d.routing_key.to_string(),
                body: d.data.clone(),
                properties: d.properties.clone().with_headers(headers).with_delivery_mode(2),
            }
        })
        .collect();
    publish_all(publisher, &messages, CONFIRM_TIMEOUT).await?;
    for (_, reason) in rejected {
        ctx.metrics
            .events_dead_lettered
            .get_or_create(&[("reason", reason.code())])
            .inc();
    }
    Ok(())
}

/// Publishes the number of ready messages of each apply queue as a gauge.
pub(crate) fn spawn_lag_monitor(
    link: Arc<Link>,
    topology: &TopologySettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let queues = [topology.price_queue.clone(), topology.stock_queue.clone()];
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            let Ok(conn) = link.get().await else { continue };
            let Ok(channel) = conn.create_channel().await else {
                continue;
            };
            for q in &queues {
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                if let Ok(info) = channel
                    .queue_declare(q.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    metrics
                        .consumer_lag
                        .get_or_create(&[("queue", q.clone())])
                        .set(info.message_count() as i64);
                }
            }
            let _ = channel.close(200, "lag sampled".into()).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::stream::{self, StreamExt};

    use super::{Arrivals, gather};

    const LONG: Duration = Duration::from_secs(10);

    /// Runs `gather` with a bound well below `LONG`: a batch that waits
    /// where it should not fails here instead of hanging.
    async fn within_a_second<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(1), f)
            .await
            .expect("the batch was gathered without waiting")
    }

    #[tokio::test]
    async fn a_batch_takes_everything_that_has_arrived_without_waiting() {
        let mut arrived = stream::iter(2..=10).chain(stream::pending());
        let batch = within_a_second(gather(1, &mut arrived, 200, Duration::ZERO, true)).await;
        assert_eq!(batch, (1..=10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_batch_stops_at_its_size_and_leaves_the_rest_for_the_next() {
        let mut arrived = stream::iter(2..=10).chain(stream::pending());
        let batch = within_a_second(gather(1, &mut arrived, 4, LONG, true)).await;
        assert_eq!(batch, [1, 2, 3, 4]);
        assert_eq!(arrived.next().await, Some(5));
    }

    #[tokio::test]
    async fn a_lone_delivery_at_light_load_is_a_batch_at_once_and_under_load_lingers() {
        let late = || {
            Box::pin(
                stream::once(async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    2
                })
                .chain(stream::pending()),
            )
        };
        // Alone, and the last batch alone too: no wait, even with a linger.
        let alone = within_a_second(gather(1, &mut late(), 200, LONG, false)).await;
        assert_eq!(alone, [1]);
        // Alone now, but the last batch had company: it lingers for more.
        let started = std::time::Instant::now();
        let lingered = gather(1, &mut late(), 2, LONG, true).await;
        assert_eq!(lingered, [1, 2]);
        assert!(started.elapsed() < LONG, "a full batch ends the linger");
        // Company already waiting: it lingers too.
        let mut company = Box::pin(stream::iter([2]).chain(late().map(|n| n + 1)));
        let lingered = gather(1, &mut company, 3, LONG, false).await;
        assert_eq!(lingered, [1, 2, 3]);
    }

    #[test]
    fn arrivals_are_busy_when_deliveries_come_faster_than_the_linger() {
        let linger = Duration::from_millis(5);
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut a = Arrivals::default();
        assert!(!a.faster_than(linger), "nothing seen yet");
        // 100 events/s over two queues: one every 20 ms, alone.
        for i in 0..10 {
            a.batch(at(i * 20), 1);
        }
        assert!(!a.faster_than(linger));
        // 1,000 events/s: batches of 3 every 6 ms.
        for i in 0..10 {
            a.batch(at(200 + i * 6), 3);
        }
        assert!(a.faster_than(linger));
        // Quiet again: within a few batches it stops lingering.
        for i in 0..6 {
            a.batch(at(300 + i * 50), 1);
        }
        assert!(!a.faster_than(linger));
    }

    #[tokio::test]
    async fn the_end_of_the_deliveries_ends_the_batch_and_its_linger() {
        let mut ended = stream::iter(2..=3);
        let batch = within_a_second(gather(1, &mut ended, 200, LONG, true)).await;
        assert_eq!(batch, [1, 2, 3]);
    }
}
