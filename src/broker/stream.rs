//! Reading the update stream. Every instance reads the whole stream live
//! into an [`UpdateSink`] (its hub); a resuming client whose offset is
//! older than the hub's memory gets a reader of its own from that offset.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::link::Connector;
use crate::update::{CatchUpItem, Update, UpdateSink, stream_offset_of, update_id};

/// Where to start reading.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    Next,
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

/// The live reader feeding this instance's hub (`sink`); resumes after the last
/// offset it saw when the connection drops, so the hub has no gap. The
/// returned receiver says when it is first attached: until then, updates
/// would pass this instance by.
pub fn spawn_live(
    connector: Connector,
    stream: String,
    prefetch: u16,
    sink: impl UpdateSink,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> tokio::sync::watch::Receiver<bool> {
    let (attached_tx, attached) = tokio::sync::watch::channel(false);
    tracker.spawn(async move {
        let mut start = Start::Next;
        loop {
            let Some(conn) = connector.connect_retry("stream", &shutdown).await else {
                return;
            };
            let (channel, mut consumer) = match open(&conn, &stream, start, prefetch).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "stream consumer failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            attached_tx.send_replace(true);
            let mut acker = Acker::new(prefetch);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    d = consumer.next() => d,
                    _ = tokio::time::sleep(Duration::from_millis(100)), if acker.pending > 0 => {
                        if acker.flush(&channel).await.is_err() { break; }
                        continue;
                    }
                };
                let Some(Ok(d)) = next else {
                    tracing::warn!("stream consumer interrupted; reconnecting");
                    break;
                };
                if let Some(offset) = offset_of(&d) {
                    start = Start::Offset(offset + 1);
                    let updates = Update::from_message(offset, &d.data);
                    if updates.is_empty() {
                        tracing::warn!(offset, "unreadable message in the update stream skipped");
                    }
                    for u in updates {
                        if !sink.publish(u).await {
                            return;
                        }
                    }
                }
                if acker.delivered(&channel, d.delivery_tag, false).await.is_err() {
                    break;
                }
            }
        }
    });
    attached
}

/// The stream part of a catch-up: sends the updates `wants` picks from
/// update id `from` until `until` (exclusive), and a reset first when
/// retention removed what was asked for. False when the receiver went away.
pub async fn read_range(
    connector: &Connector,
    stream: &str,
    prefetch: u16,
    (from, until): (u64, Option<u64>),
    wants: &(dyn Fn(&Update) -> bool + Sync),
    tx: &mpsc::Sender<CatchUpItem>,
) -> bool {
    let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(10), connector.connect("catch-up")).await else {
        tracing::warn!("catch-up reader could not connect");
        return true;
    };
    let conn = Arc::new(conn);
    let from_offset = stream_offset_of(from);
    let Ok((channel, mut consumer)) = open(&conn, stream, Start::Offset(from_offset), prefetch).await else {
        return true;
    };
    let mut acker = Acker::new(prefetch);
    let mut first = true;
    let mut open_receiver = true;
    loop {
        let d = tokio::select! {
            d = consumer.next() => d,
            _ = tx.closed() => { open_receiver = false; break }
        };
        let Some(Ok(d)) = d else { break };
        let Some(offset) = offset_of(&d) else { continue };
        let updates = Update::from_message(offset, &d.data);
        if first && offset > from_offset {
            // Retention removed what was asked for: say so, never a silent gap.
            let first_available = updates.first().map(|u| u.offset).unwrap_or(update_id(offset, 0));
            if tx.send(CatchUpItem::Reset { first_available }).await.is_err() {
                open_receiver = false;
                break;
            }
        }
        first = false;
        let mut done = false;
        for u in updates {
            if u.offset < from {
                continue;
            }
            if until.is_some_and(|until| u.offset >= until) {
                done = true;
                break;
            }
            if wants(&u) && tx.send(CatchUpItem::Update(Arc::new(u))).await.is_err() {
                open_receiver = false;
                done = true;
                break;
            }
        }
        if done {
            break;
        }
        if acker.delivered(&channel, d.delivery_tag, false).await.is_err() {
            break;
        }
    }
    let _ = channel.close(200, "caught up".into()).await;
    let _ = conn.close(200, "caught up".into()).await;
    open_receiver
}
