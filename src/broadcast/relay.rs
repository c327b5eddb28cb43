//! The outbox relay: publishes the stream messages that apply committed to
//! the update outbox, to `product.updates` with confirms and in commit order,
//! and deletes each only once the broker confirmed it. Woken after every
//! apply, and polls as well, so rows left by a failure or by another instance
//! go out too.

use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::apply::consumer::Committed;
use crate::apply::outbox;
use crate::apply::pulse::StreamPulse;
use crate::broker::link::Connector;
use crate::broker::publisher::{Outgoing, PublishError, confirm_channel, publish_all};
use crate::metrics::Metrics;
use crate::settings::TopologySettings;
use crate::store::{Db, StoreError};
use crate::wire::{BATCH_ROUTING_KEY, OUTBOX_SEQ_HEADER, TXID_HEADER};

const STAGE: &str = "outbox-relay";
/// A confirm this late means the node no longer reaches its cluster's
/// majority (a partition the connection itself does not notice until its
/// heartbeat): the relay then leaves that node for the next one. Every
/// client waits for the relay, so it must not wait out a partition.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often pending rows are looked for without a wake-up: rows of another
/// instance, or left by a failed attempt.
const POLL: Duration = Duration::from_millis(500);
/// Messages published per transaction.
const BATCH: i64 = 64;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("publish: {0}")]
    Publish(#[from] PublishError),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
}

impl RelayError {
    /// The broker, not the database, failed the attempt.
    fn is_broker(&self) -> bool {
        matches!(self, RelayError::Publish(_) | RelayError::Broker(_))
    }
}

struct Relay {
    db: Db,
    connector: Connector,
    exchange: String,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    /// Told of each confirmed publish: the live reader should see it.
    pulse: Arc<StreamPulse>,
    shutdown: CancellationToken,
}

/// Starts the relay, woken by `committed` after each apply batch.
pub(crate) fn spawn(
    topology: &TopologySettings,
    db: Db,
    connector: Connector,
    metrics: Arc<Metrics>,
    committed: &Committed,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let relay = Relay {
        db,
        connector,
        exchange: topology.updates_exchange.clone(),
        metrics,
        wake: committed.outbox.clone(),
        pulse: committed.pulse.clone(),
        shutdown,
    };
    tracker.spawn(run(relay));
}

async fn run(relay: Relay) {
    let mut conn: Option<Connection> = None;
    let mut delay = RETRY_MIN;
    loop {
        if !conn.as_ref().is_some_and(|c| c.status().connected()) {
            conn = relay.connector.connect_retry(STAGE, &relay.shutdown).await;
        }
        let Some(c) = conn.as_ref() else { return };
        let result = match confirm_channel(c).await {
            Ok(channel) => drain(&relay, &channel, &mut delay).await,
            Err(e) => Err(e.into()),
        };
        let Err(e) = result else { return };
        // The rows stay in the outbox: nothing is lost, only later.
        tracing::warn!(stage = STAGE, error = %e, retry_in = ?delay, "outbox relay failed; retrying");
        if e.is_broker() {
            // The next connection starts at the next node; the dropped one
            // closes in the background (or its heartbeat ends it).
            conn = None;
        }
        tokio::select! {
            _ = relay.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Publishes pending rows until shutdown (Ok) or a failure (Err).
async fn drain(relay: &Relay, channel: &Channel, delay: &mut Duration) -> Result<(), RelayError> {
    loop {
        let sent = publish_pending(relay, channel).await?;
        *delay = RETRY_MIN;
        if sent as i64 == BATCH {
            continue;
        }
        tokio::select! {
            _ = relay.shutdown.cancelled() => return Ok(()),
            _ = relay.wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// One transaction: take the relay lock, publish the oldest pending rows in
/// order, wait for every confirm, delete them. Returns how many were sent.
async fn publish_pending(relay: &Relay, channel: &Channel) -> Result<usize, RelayError> {
    let mut pooled = relay.db.get().await.map_err(StoreError::from)?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    let epoch = relay.pulse.epoch();
    let (sent, updates) = conn
        .transaction(async |conn| {
            // Another instance's relay is publishing: it keeps the order.
            if !outbox::try_lock(conn).await? {
                return Ok::<_, RelayError>((0, 0));
            }
            let rows = outbox::pending(conn, BATCH).await?;
            // A span per traced message, from its apply batch to its confirm.
            let spans: Vec<Option<tracing::Span>> = rows
                .iter()
                .map(|r| {
                    let parent = crate::trace::parse(r.traceparent.as_deref()?)?;
                    let span = tracing::info_span!(
                        "relay",
                        seq = r.seq,
                        updates = r.updates,
                        trace_id = tracing::field::Empty
                    );
                    crate::trace::follow(&span, &parent);
                    crate::trace::show_id(&span);
                    Some(span)
                })
                .collect();
            let messages: Vec<Outgoing> = rows
                .iter()
                .zip(&spans)
                .map(|(r, span)| {
                    let mut headers = FieldTable::default();
                    headers.insert(TXID_HEADER.into(), AMQPValue::LongLongInt(r.txid));
                    headers.insert(OUTBOX_SEQ_HEADER.into(), AMQPValue::LongLongInt(r.seq));
                    if let Some(span) = span {
                        crate::trace::add_to(&mut headers, span);
                    }
                    Outgoing::json(
                        &relay.exchange,
                        BATCH_ROUTING_KEY.to_owned(),
                        r.body.clone(),
                        r.message_id.clone(),
                        Some(headers),
                    )
                })
                .collect();
            publish_all(channel, &messages, CONFIRM_TIMEOUT).await?;
            drop(spans);
            // Confirmed now: the latency up to the stream ends here, not
            // after the delete's commit.
            // Once per update, from the mean of their publish times: the
            // same mean as a per-update observation, beside the hub's.
            for r in &rows {
                for _ in 0..r.updates {
                    crate::metrics::observe_since(&relay.metrics.relay_latency, r.ts_us);
                }
            }
            let updates: u64 = rows.iter().map(|r| r.updates as u64).sum();
            outbox::delete(conn, rows.iter().map(|r| r.seq).collect()).await?;
            Ok((rows.len(), updates))
        })
        .await?;
    relay.metrics.updates_broadcast.inc_by(updates);
    if sent > 0 {
        relay.pulse.committed(epoch);
    }
    Ok(sent)
}
