//! Dead-letter administration: list (without consuming), replay to
//! `product.events` (each removed only after its confirm), purge.

use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::broker::link::Link;
use crate::broker::publisher::{Outgoing, confirm_channel, publish_all};
use crate::settings::TopologySettings;
use crate::wire::{DETAIL_HEADER, REASON_HEADER};

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
pub(crate) struct DeadLetter {
    pub reason: String,
    pub detail: Option<String>,
    pub routing_key: String,
    pub message_id: Option<String>,
    /// The body as text when it is UTF-8, else lossy.
    pub body: String,
    pub body_bytes: usize,
}

fn header_str(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The broker's own reason (`x-death[0].reason`) for messages it
/// dead-lettered itself, such as `delivery_limit`.
fn death_reason(headers: &FieldTable) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    header_str(first, "reason")
}

fn describe(d: &lapin::message::Delivery) -> DeadLetter {
    let headers = d.properties.headers().clone().unwrap_or_default();
    DeadLetter {
        reason: header_str(&headers, REASON_HEADER)
            .or_else(|| death_reason(&headers))
            .unwrap_or_else(|| "unknown".into()),
        detail: header_str(&headers, DETAIL_HEADER),
        routing_key: original_routing_key(d),
        message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
        body: String::from_utf8_lossy(&d.data[..d.data.len().min(4096)]).into_owned(),
        body_bytes: d.data.len(),
    }
}

fn original_routing_key(d: &lapin::message::Delivery) -> String {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| header_str(h, "x-original-routing-key"))
        .unwrap_or_else(|| d.routing_key.to_string())
}

/// Up to `limit` dead letters, left in the queue.
pub(crate) async fn list(link: &Link, t: &TopologySettings, limit: usize) -> lapin::Result<Vec<DeadLetter>> {
    let conn = link.get().await?;
    let channel = conn.create_channel().await?;
    let mut out = Vec::new();
    while out.len() < limit {
        match channel
            .basic_get(t.dead_letter_queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        {
            Some(m) => out.push(describe(&m.delivery)),
            None => break,
        }
    }
    // Closing the channel returns every message we fetched to the queue.
    let _ = channel.close(200, "listed".into()).await;
    Ok(out)
}

#[derive(Debug, Serialize)]
pub(crate) struct ReplayReport {
    pub replayed: usize,
    pub remaining: u32,
}

/// Republishes up to `limit` dead letters to the events exchange; each is
/// acked (removed) only after the broker confirmed its republication.
pub(crate) async fn replay(link: &Link, t: &TopologySettings, limit: usize) -> anyhow::Result<ReplayReport> {
    let conn = link.get().await?;
    let getter = conn.create_channel().await?;
    let publisher = confirm_channel(&conn).await?;
    let mut replayed = 0;
    let mut remaining = 0;
    // Only the letters there when the replay began: one that fails again is
    // dead-lettered to the tail of the same queue and must not come round
    // a second time in this replay.
    let mut there = limit;
    while replayed < there {
        let Some(m) = getter
            .basic_get(t.dead_letter_queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        remaining = m.message_count;
        if replayed == 0 {
            there = limit.min(m.message_count as usize + 1);
        }
        let d = &m.delivery;
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        let cleaned: std::collections::BTreeMap<_, _> = headers
            .inner()
            .iter()
            .filter(|(k, _)| !k.as_str().starts_with("x-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        headers = FieldTable::from(cleaned);
        let out = Outgoing {
            exchange: t.events_exchange.clone(),
            routing_key: original_routing_key(d),
            body: d.data.clone(),
            properties: d.properties.clone().with_headers(headers),
        };
        if let Err(e) = publish_all(&publisher, std::slice::from_ref(&out), CONFIRM_TIMEOUT).await {
            getter
                .basic_nack(
                    d.delivery_tag,
                    BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    },
                )
                .await?;
            return Err(anyhow::anyhow!("replay stopped after {replayed}: {e}"));
        }
        getter.basic_ack(d.delivery_tag, BasicAckOptions::default()).await?;
        replayed += 1;
    }
    let _ = getter.close(200, "replayed".into()).await;
    let _ = publisher.close(200, "replayed".into()).await;
    Ok(ReplayReport { replayed, remaining })
}

/// Drops every dead letter; returns how many.
pub(crate) async fn purge(link: &Link, t: &TopologySettings) -> lapin::Result<u32> {
    let conn = link.get().await?;
    let channel = conn.create_channel().await?;
    let n = channel
        .queue_purge(t.dead_letter_queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let _ = channel.close(200, "purged".into()).await;
    Ok(n)
}
