//! Reading the update stream. Every instance reads the whole stream live
//! into an [`UpdateSink`] (its hub), starting far enough back to fill the
//! hub's memory; a resuming client whose offset is older than that memory
//! is read back by the instance's [`CatchUpReader`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use tokio::sync::Semaphore;

use crate::turns::PerAddress;

use crate::apply::pulse::StreamPulse;
use crate::broker::link::{Connector, Link};
use crate::metrics::Metrics;
use crate::settings::HubSettings;
use crate::update::{CatchUpItem, ResetReason, Update, UpdateSink, stream_offset_of, update_id};
use crate::wire::{OUTBOX_SEQ_HEADER, TXID_HEADER};

/// Where to start reading.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    Next,
    /// The stream's last chunk.
    Last,
    Offset(u64),
}

/// The stream offset of a delivery from a stream queue.
pub fn offset_of(d: &lapin::message::Delivery) -> Option<u64> {
    match d.properties.headers().as_ref()?.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// The transaction that committed a stream message (the relay's `x-txid`).
pub fn txid_of(d: &lapin::message::Delivery) -> Option<u64> {
    match d.properties.headers().as_ref()?.inner().get(TXID_HEADER)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// The outbox row a stream message was published from (the relay's
/// `x-outbox-seq`).
pub fn outbox_seq_of(d: &lapin::message::Delivery) -> Option<i64> {
    match d.properties.headers().as_ref()?.inner().get(OUTBOX_SEQ_HEADER)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

/// Messages read before where a read starts, only to learn their outbox
/// rows and versions: a copy's original may lie just before the start, and
/// a copy follows its original within a few relay transactions (64 rows
/// each).
const COPY_MARGIN: u64 = 256;

/// Outbox rows remembered to recognise a copy published again: the relay
/// publishes at most 64 rows per transaction, and a copy follows its first
/// publication within a few of those.
const REMEMBERED: usize = 16_384;

/// The outbox rows of the stream messages read last. When a node dies with
/// a confirm in flight, the relay publishes the row again: the stream then
/// holds it twice, at two offsets, and the copy is dropped here rather than
/// broadcast twice.
#[derive(Default)]
pub struct SeenOutboxRows {
    seen: std::collections::HashSet<i64>,
    order: std::collections::VecDeque<i64>,
}

/// The newest version handed on per product and kind, for the keys of the
/// last [`REMEMBERED`] updates. A copy the relay published again can come
/// after a newer update of its key, and a reader that started between the
/// original and the copy has no record of the copy's row: without this it
/// would hand a client the older version after the newer one. A key's
/// versions only grow in the stream otherwise (apply commits a key's
/// changes in version order, each with its outbox row).
#[derive(Default)]
pub struct NewestVersions {
    newest: std::collections::HashMap<(i64, crate::domain::Kind), i64>,
    order: std::collections::VecDeque<(i64, crate::domain::Kind)>,
}

impl NewestVersions {
    /// False for an update no newer than one handed on before for its key.
    pub fn newer(&mut self, u: &Update) -> bool {
        let key = u.key();
        match self.newest.insert(key, u.version) {
            Some(v) if v >= u.version => {
                self.newest.insert(key, v);
                false
            }
            Some(_) => true,
            None => {
                self.order.push_back(key);
                if self.order.len() > REMEMBERED
                    && let Some(oldest) = self.order.pop_front()
                {
                    self.newest.remove(&oldest);
                }
                true
            }
        }
    }
}

impl SeenOutboxRows {
    /// True when the message from outbox row `seq` was read already.
    pub fn again(&mut self, seq: Option<i64>) -> bool {
        let Some(seq) = seq else { return false };
        if !self.seen.insert(seq) {
            return true;
        }
        self.order.push_back(seq);
        if self.order.len() > REMEMBERED
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        false
    }
}

async fn open(
    conn: &Connection,
    stream: &str,
    start: Start,
    prefetch: u16,
) -> lapin::Result<(Channel, lapin::Consumer)> {
    let channel = conn.create_channel().await?;
    // Streams need a prefetch and acks: the ack is what grants more credit.
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    let offset = match start {
        Start::Next => AMQPValue::LongString(LongString::from("next")),
        Start::Last => AMQPValue::LongString(LongString::from("last")),
        Start::Offset(n) => AMQPValue::LongLongInt(n as i64),
    };
    args.insert("x-stream-offset".into(), offset);
    let consumer = channel
        .basic_consume(stream.into(), "".into(), BasicConsumeOptions::default(), args)
        .await?;
    Ok((channel, consumer))
}

/// Acks in steps of a quarter of the prefetch, so credit never runs out
/// while acks stay few.
struct Acker {
    pending: u32,
    step: u32,
    last_tag: u64,
}

impl Acker {
    fn new(prefetch: u16) -> Self {
        Self {
            pending: 0,
            step: (u32::from(prefetch) / 4).max(1),
            last_tag: 0,
        }
    }

    async fn delivered(&mut self, channel: &Channel, tag: u64, idle: bool) -> lapin::Result<()> {
        self.pending += 1;
        self.last_tag = tag;
        if self.pending >= self.step || idle {
            self.flush(channel).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, channel: &Channel) -> lapin::Result<()> {
        if self.pending > 0 {
            channel
                .basic_ack(self.last_tag, BasicAckOptions { multiple: true })
                .await?;
            self.pending = 0;
        }
        Ok(())
    }
}

/// Where a warm start begins: about `history` updates before the stream's
/// end, estimated from the sizes of its newest messages (one update each
/// up to a whole batch). Also the offset of the newest message seen, which
/// the reader must pass before the hub's memory is complete. None when the
/// stream is empty.
async fn warm_start(conn: &Connection, stream: &str, history: usize) -> lapin::Result<Option<(u64, u64)>> {
    const LOOK: u16 = 256;
    let (channel, mut consumer) = open(conn, stream, Start::Last, LOOK).await?;
    let (mut newest, mut messages, mut updates) = (None, 0u64, 0u64);
    // The last chunk arrives at once; a quiet moment ends the look early.
    while messages < u64::from(LOOK) {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await else {
            break;
        };
        if let Some(offset) = offset_of(&d) {
            newest = Some(offset);
            messages += 1;
            updates += Update::from_message(offset, txid_of(&d), &d.data).len() as u64;
        }
    }
    let _ = channel.close(200, "looked at the end".into()).await;
    Ok(newest.map(|newest| {
        let per_message = (updates / messages).max(1);
        let back = (history as u64).div_ceil(per_message);
        (newest.saturating_sub(back), newest)
    }))
}

/// The live reader feeding this instance's hub (`sink`); resumes after the last
/// offset it saw when the connection drops, so the hub has no gap. With
/// `warm` (the hub's history size) it first reads that many updates back.
/// The returned receiver says when it is attached and, after a warm start,
/// caught up with the stream's end as it was at start: until then, updates
/// would pass this instance by, or a resume would not find them in memory.
/// When `pulse` says this instance's commits stopped coming back, it moves
/// to another node ([`StreamPulse`]).
#[allow(clippy::too_many_arguments)]
pub fn spawn_live(
    connector: Connector,
    stream: String,
    prefetch: u16,
    warm: Option<usize>,
    mut sink: impl UpdateSink,
    pulse: Arc<StreamPulse>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> tokio::sync::watch::Receiver<bool> {
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    tracker.spawn(async move {
        let mut reader = LiveReader {
            start: None,
            warming: None,
            learn_below: None,
            republished: SeenOutboxRows::default(),
            newest: NewestVersions::default(),
            metrics: connector.metrics().clone(),
            ready: ready_tx,
        };
        loop {
            let Some(conn) = connector.connect_retry("stream", &shutdown).await else {
                return;
            };
            let Some(from) = reader.start_at(&conn, &stream, warm).await else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            // A node whose stream member waits for a leader lost to a
            // partition may never answer the consume: the next node then.
            let (channel, mut consumer) = match tokio::time::timeout(STREAM_STALL, open(&conn, &stream, from, prefetch)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "stream consumer failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(stall = ?STREAM_STALL, "the stream consumer was not started in time; moving to another node");
                    continue;
                }
            };
            if reader.warming.is_none() {
                reader.ready.send_replace(true);
            }
            let mut acker = Acker::new(prefetch);
            let mut beat = tokio::time::interval(PULSE_CHECK);
            pulse.received();
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    d = consumer.next() => d,
                    _ = tokio::time::sleep(Duration::from_millis(100)), if acker.pending > 0 => {
                        if acker.flush(&channel).await.is_err() { break; }
                        continue;
                    }
                    _ = beat.tick() => {
                        if !pulse.stalled(STREAM_STALL) { continue; }
                        connector.metrics().stream_moves.inc();
                        tracing::warn!(
                            stall = ?STREAM_STALL,
                            "committed updates are not coming back from the stream; moving to another node"
                        );
                        break;
                    }
                };
                let Some(Ok(d)) = next else {
                    tracing::warn!("stream consumer interrupted; reconnecting");
                    break;
                };
                pulse.received();
                if !reader.take(&d, &mut sink).await {
                    return;
                }
                if acker.delivered(&channel, d.delivery_tag, false).await.is_err() {
                    break;
                }
            }
        }
    });
    ready
}

/// How long the live reader waits for any message after one of this
/// instance's commits before it leaves its node; well above the relay's
/// commit-to-stream time under load (milliseconds), below the time a client
/// notices (its ping, 15 s).
const STREAM_STALL: Duration = Duration::from_secs(5);
const PULSE_CHECK: Duration = Duration::from_secs(1);

/// The live reader's state across its connections.
struct LiveReader {
    /// Where the next connection starts: past the last message read.
    start: Option<Start>,
    /// Offset of the newest message at a warm start, until the reader
    /// passes it.
    warming: Option<u64>,
    /// Where a warm start's updates begin: the messages before it are read
    /// only to recognise copies ([`COPY_MARGIN`]).
    learn_below: Option<u64>,
    republished: SeenOutboxRows,
    newest: NewestVersions,
    metrics: Arc<Metrics>,
    /// True once live updates flow (a warm start read back first).
    ready: tokio::sync::watch::Sender<bool>,
}

impl LiveReader {
    /// Where this connection starts: past the last message read, or, the
    /// first time, the stream's recent updates (a warm start) or its next
    /// message. None when the stream could not be looked at (logged).
    async fn start_at(&mut self, conn: &Connection, stream: &str, warm: Option<usize>) -> Option<Start> {
        let from = match (self.start, warm) {
            (Some(s), _) => s,
            (None, None) => Start::Next,
            (None, Some(history)) => match warm_start(conn, stream, history).await {
                Ok(Some((from, newest))) => {
                    tracing::info!(
                        from,
                        newest,
                        "warm start: reading the stream's recent updates into memory"
                    );
                    self.warming = Some(newest);
                    self.learn_below = Some(from);
                    Start::Offset(from.saturating_sub(COPY_MARGIN))
                }
                Ok(None) => Start::Next,
                Err(e) => {
                    tracing::warn!(error = %e, "warm start could not look at the stream");
                    return None;
                }
            },
        };
        self.start = Some(from);
        Some(from)
    }

    /// Hands one stream message's updates to the sink, once: false when
    /// the sink has shut down.
    async fn take(&mut self, d: &lapin::message::Delivery, sink: &mut impl UpdateSink) -> bool {
        let Some(offset) = offset_of(d) else {
            return true;
        };
        self.start = Some(Start::Offset(offset + 1));
        if self.republished.again(outbox_seq_of(d)) {
            self.metrics.stream_republished.inc();
        } else {
            let mut updates = Update::from_message(offset, txid_of(d), &d.data);
            if updates.is_empty() {
                tracing::warn!(offset, "unreadable message in the update stream skipped");
            }
            let read = updates.len();
            updates.retain(|u| self.newest.newer(u));
            if updates.len() < read {
                // A copy whose original this reader did not see.
                self.metrics.stream_republished.inc();
            }
            if self.learn_below.is_some_and(|below| offset < below) {
                updates.clear();
            } else {
                self.learn_below = None;
            }
            // Live updates only: those a warm start reads back are as old
            // as the instance's downtime.
            if self.warming.is_none() {
                for u in &updates {
                    crate::metrics::observe_since(&self.metrics.hub_latency, u.ts_us);
                }
            }
            if !updates.is_empty() && !fan_out(d, updates, sink).await {
                return false;
            }
        }
        if self.warming.is_some_and(|newest| offset >= newest) {
            self.warming = None;
            tracing::info!(offset, "warm start done");
            self.ready.send_replace(true);
        }
        true
    }
}

/// Hands a stream message's updates to the sink; within a span that follows
/// the relay's when the message carries a trace, and whose context the
/// updates carry on to a socket when it is recorded.
async fn fan_out(d: &lapin::message::Delivery, mut updates: Vec<Update>, sink: &mut impl UpdateSink) -> bool {
    let Some(parent) = crate::trace::of_headers(d.properties.headers()) else {
        return sink.publish(updates).await;
    };
    let span = tracing::info_span!("fan_out", updates = updates.len(), trace_id = tracing::field::Empty);
    crate::trace::follow(&span, &parent);
    crate::trace::show_id(&span);
    if let Some(sc) = crate::trace::sampled(&span) {
        let traced = Arc::new(crate::trace::Traced::new(sc));
        for u in &mut updates {
            u.trace = Some(traced.clone());
        }
    }
    sink.publish(updates).instrument(span).await
}

/// How long a catch-up may wait for its next delivery before giving up.
const CATCH_UP_STALL: Duration = Duration::from_secs(10);

/// Reads the stream back for resuming clients whose offsets are older than
/// the hub's memory. Every catch-up of an instance shares one connection (a
/// channel each) and at most `hub.max_concurrent_catch_ups` read at once;
/// the others wait their turn in order. A resume storm after a restart thus
/// costs the broker one connection, never one per client.
#[derive(Clone)]
pub struct CatchUpReader {
    link: Arc<Link>,
    turns: Arc<Semaphore>,
    /// At most this many of the turns to one client address.
    per_address: Arc<PerAddress>,
    wait: Duration,
    /// How long a catch-up waits for its client to take an update before
    /// it gives its turn back.
    stall: Duration,
    stream: String,
    prefetch: u16,
    metrics: Arc<Metrics>,
}

/// Why a catch-up stopped before its end.
#[derive(Debug, thiserror::Error)]
enum Stalled {
    #[error("no turn within {0:?}")]
    NoTurn(Duration),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0} without a delivery")]
    Silent(&'static str),
    #[error("the client took nothing for {0:?}")]
    Client(Duration),
}

/// Hands `item` to a catch-up's client: false when it went away, an error
/// when it took nothing for `stall` (a turn is never held for a client that
/// does not read).
async fn hand(tx: &mpsc::Sender<CatchUpItem>, item: CatchUpItem, stall: Duration) -> Result<bool, Stalled> {
    match tokio::time::timeout(stall, tx.send(item)).await {
        Ok(sent) => Ok(sent.is_ok()),
        Err(_) => Err(Stalled::Client(stall)),
    }
}

impl CatchUpReader {
    pub fn new(connector: Connector, stream: String, settings: &HubSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            link: Arc::new(Link::new(connector, "catch-up")),
            turns: Arc::new(Semaphore::new(settings.max_concurrent_catch_ups)),
            per_address: PerAddress::new(settings.max_catch_ups_per_ip),
            wait: settings.catch_up_wait,
            stall: settings.catch_up_stall,
            stream,
            prefetch: settings.catch_up_prefetch,
            metrics,
        }
    }

    /// Sends the updates `wants` picks from update id `from` until `until`
    /// (exclusive; None: until the receiver goes away), with a reset first
    /// when retention removed what was asked for. A read that cannot finish
    /// ends in a reset at `until` (where the hub's memory takes over), never
    /// in a silent gap. False when the receiver went away, or took nothing
    /// for `catch_up_stall` (it then finds its catch-up cut short). `ip` is
    /// the client's address, which may hold only so many turns.
    pub async fn read_range(
        &self,
        (from, until): (u64, Option<u64>),
        ip: Option<IpAddr>,
        wants: &(dyn Fn(&Update) -> bool + Sync),
        tx: &mpsc::Sender<CatchUpItem>,
    ) -> bool {
        match self.read(from, until, ip, wants, tx).await {
            Ok(open) => open,
            Err(stalled @ Stalled::Client(_)) => {
                tracing::info!(from, error = %stalled, "catch-up given up; its turn goes back");
                self.metrics.catch_up_resets.inc();
                false
            }
            Err(stalled) => {
                tracing::warn!(from, error = %stalled, "catch-up given up; the client gets a reset");
                self.metrics.catch_up_resets.inc();
                let reset = CatchUpItem::Reset {
                    first_available: until.unwrap_or(from),
                    reason: ResetReason::CatchUpFailed,
                };
                hand(tx, reset, self.stall).await.unwrap_or(false)
            }
        }
    }

    async fn read(
        &self,
        from: u64,
        until: Option<u64>,
        ip: Option<IpAddr>,
        wants: &(dyn Fn(&Update) -> bool + Sync),
        tx: &mpsc::Sender<CatchUpItem>,
    ) -> Result<bool, Stalled> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let _address_turn = tokio::select! {
            turn = self.per_address.take(ip, deadline) => turn.ok_or(Stalled::NoTurn(self.wait))?,
            _ = tx.closed() => return Ok(false),
        };
        let _turn = tokio::select! {
            turn = tokio::time::timeout_at(deadline, self.turns.acquire()) => match turn {
                Ok(Ok(turn)) => turn,
                _ => return Err(Stalled::NoTurn(self.wait)),
            },
            _ = tx.closed() => return Ok(false),
        };
        let _running = Running::start(&self.metrics);
        let conn = tokio::time::timeout(CATCH_UP_STALL, self.link.get())
            .await
            .map_err(|_| Stalled::Silent("connecting"))??;
        let from_offset = stream_offset_of(from);
        let (channel, mut consumer) = tokio::time::timeout(
            CATCH_UP_STALL,
            open(
                &conn,
                &self.stream,
                Start::Offset(from_offset.saturating_sub(COPY_MARGIN)),
                self.prefetch,
            ),
        )
        .await
        .map_err(|_| Stalled::Silent("opening"))??;
        let outcome = async {
            let mut acker = Acker::new(self.prefetch);
            let mut first = true;
            let mut republished = SeenOutboxRows::default();
            let mut newest = NewestVersions::default();
            loop {
                let d = tokio::select! {
                    d = tokio::time::timeout(CATCH_UP_STALL, consumer.next()) => d,
                    _ = tx.closed() => return Ok(false),
                };
                let d = match d {
                    Ok(Some(Ok(d))) => d,
                    Ok(Some(Err(e))) => return Err(Stalled::Broker(e)),
                    Ok(None) => return Err(Stalled::Silent("the consumer ended")),
                    Err(_) => return Err(Stalled::Silent("reading")),
                };
                let Some(offset) = offset_of(&d) else { continue };
                let updates = match republished.again(outbox_seq_of(&d)) {
                    true => Vec::new(),
                    false => Update::from_message(offset, txid_of(&d), &d.data),
                };
                if first && offset > from_offset {
                    // Retention removed what was asked for: say so, never a silent gap.
                    let first_available = updates.first().map(|u| u.offset).unwrap_or(update_id(offset, 0));
                    let reset = CatchUpItem::Reset {
                        first_available,
                        reason: ResetReason::OffsetExpired,
                    };
                    if !hand(tx, reset, self.stall).await? {
                        return Ok(false);
                    }
                }
                first = false;
                for u in updates {
                    // Also what the client has: a copy of it must not follow.
                    let newer = newest.newer(&u);
                    if u.offset < from {
                        continue;
                    }
                    if until.is_some_and(|until| u.offset >= until) {
                        return Ok(true);
                    }
                    if newer && wants(&u) && !hand(tx, CatchUpItem::Update(Arc::new(u)), self.stall).await? {
                        return Ok(false);
                    }
                }
                acker.delivered(&channel, d.delivery_tag, false).await?;
            }
        }
        .await;
        // The channel goes; the shared connection stays for the next one.
        let _ = channel.close(200, "caught up".into()).await;
        outcome
    }
}

/// Counts a catch-up as running until it ends, however it ends.
struct Running<'a>(&'a Metrics);

impl<'a> Running<'a> {
    fn start(metrics: &'a Metrics) -> Self {
        metrics.catch_ups_running.inc();
        Running(metrics)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.catch_ups_running.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_read_again_is_known_until_newer_rows_push_it_out() {
        let mut r = SeenOutboxRows::default();
        assert!(!r.again(Some(1)));
        assert!(r.again(Some(1)), "the same row twice");
        assert!(
            !r.again(None) && !r.again(None),
            "messages without a row are never copies"
        );
        for seq in 2..=(REMEMBERED as i64 + 1) {
            assert!(!r.again(Some(seq)));
        }
        assert!(!r.again(Some(1)), "forgotten after {REMEMBERED} newer rows");
        assert!(r.order.len() <= REMEMBERED && r.seen.len() == r.order.len());
    }

    #[test]
    fn a_version_no_newer_than_one_handed_on_for_its_key_is_held_back() {
        let update = |id: i64, kind: &str, version: i64| {
            let body =
                format!(r#"[{{"product_id":{id},"kind":"{kind}","version":{version},"price_cents":1,"stock":1}}]"#);
            Update::from_message(0, None, body.as_bytes()).remove(0)
        };
        let mut n = NewestVersions::default();
        assert!(n.newer(&update(1, "price", 5)));
        assert!(n.newer(&update(1, "price", 6)));
        assert!(!n.newer(&update(1, "price", 5)), "older");
        assert!(!n.newer(&update(1, "price", 6)), "the same again");
        assert!(n.newer(&update(1, "stock", 2)), "another kind is another key");
        assert!(n.newer(&update(1, "price", 7)));
        for id in 2..=(REMEMBERED as i64 + 1) {
            n.newer(&update(id, "price", 1));
        }
        assert!(n.newest.len() <= REMEMBERED && n.order.len() == n.newest.len());
    }
}
