//! The chaos run's evidence and what it must show: the audit copy of every
//! event the broker accepted, the update stream, the final catalog, and
//! how long each recovery took.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use product_gateway::settings::Settings;
use product_gateway::store;
use product_gateway::update::update_id;
use product_gateway::wire::decode_event;

use super::processes::readyz;
use crate::verdict::{self, Confirmed, Sample, Seen, State};

/// The audit queue: a copy of every event the broker accepted.
pub(super) const AUDIT: &str = "chaos.audit";

/// Binds the audit queue to the events exchange.
pub(super) async fn declare_audit(amqp_url: &str, settings: &Settings) {
    let conn = lapin::Connection::connect(amqp_url, Default::default()).await.unwrap();
    product_gateway::broker::topology::Topology::new(&settings.rabbit.topology)
        .declare(&conn)
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(AUDIT.into(), durable, args).await.unwrap();
    ch.queue_bind(
        AUDIT.into(),
        settings.rabbit.topology.events_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// What the run left behind, read once everything drained.
pub(super) struct Evidence {
    pub(super) audit: Vec<lapin::message::Delivery>,
    pub(super) stream: Vec<lapin::message::Delivery>,
    pub(super) dead: Vec<lapin::message::Delivery>,
    /// Value and version of every product and kind.
    pub(super) catalog: State,
}

impl Evidence {
    pub(super) async fn collect(urls: &[String], settings: &Settings, db: &store::Db) -> Evidence {
        let deadline = Instant::now() + Duration::from_secs(90);
        let conn = 'found: loop {
            let mut refused = None;
            for url in urls {
                match lapin::Connection::connect(url, Default::default()).await {
                    Ok(conn) => break 'found conn,
                    Err(e) => refused = Some(e),
                }
            }
            assert!(
                Instant::now() < deadline,
                "no broker node answered within 90 s: {refused:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let topology = &settings.rabbit.topology;
        let audit = read_all(&conn, AUDIT, false).await;
        let stream = read_all(&conn, &topology.updates_stream, true).await;
        let dead = read_all(&conn, &topology.dead_letter_queue, false).await;
        let products = store::catalog::all(db).await.unwrap();
        let catalog: State = products
            .iter()
            .flat_map(|p| {
                [
                    ((p.id, "price".to_owned()), (p.price_cents, p.price_version)),
                    ((p.id, "stock".to_owned()), (p.stock, p.stock_version)),
                ]
            })
            .collect();
        Evidence {
            audit,
            stream,
            dead,
            catalog,
        }
    }

    /// The confirmed events, and how many of the audit copy did not decode.
    pub(super) fn confirmed(&self) -> (Vec<Confirmed>, usize) {
        let mut confirmed = Vec::with_capacity(self.audit.len());
        let mut undecodable = 0;
        for d in &self.audit {
            let Ok(e) = decode_event(&d.data, Some("application/json"), d.routing_key.as_str(), 4096) else {
                undecodable += 1;
                continue;
            };
            confirmed.push(Confirmed {
                key: (e.product_id.get(), e.kind().as_str().to_owned()),
                value: e.change.value(),
                version: e.version,
            });
        }
        (confirmed, undecodable)
    }

    /// The stream's updates, in order, with the copies of republished rows
    /// dropped as the readers drop them.
    pub(super) fn stream_updates(&self) -> StreamUpdates {
        let mut out = StreamUpdates::default();
        // A version in two different outbox rows would be an event applied
        // twice.
        let mut rows_read = std::collections::HashSet::new();
        let mut row_of_version: std::collections::HashMap<(i64, String, i64), i64> = Default::default();
        for d in &self.stream {
            let seq = product_gateway::broadcast::stream::outbox_seq_of(d);
            if let Some(seq) = seq
                && !rows_read.insert(seq)
            {
                out.republished += 1;
                continue;
            }
            // A stream message is a committed batch: an array of updates.
            let data: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            let items = data.as_array().cloned().unwrap_or_else(|| vec![data.clone()]);
            for (i, item) in items.iter().enumerate() {
                let topic = format!("product.{}.{}", item["kind"].as_str().unwrap(), item["product_id"]);
                let seen = Seen::from_data(update_id(stream_offset(d), i), &topic, item).unwrap();
                if let Some(seq) = seq {
                    let key = (seen.product, seen.kind.clone(), seen.version);
                    if row_of_version.insert(key, seq).is_some_and(|other| other != seq) {
                        out.double_applied += 1;
                    }
                }
                out.seen.push(seen);
            }
        }
        out
    }
}

#[derive(Default)]
pub(super) struct StreamUpdates {
    pub(super) seen: Vec<Seen>,
    /// Stream messages the relay published again (a confirm lost).
    pub(super) republished: usize,
    /// Versions found in two different outbox rows.
    pub(super) double_applied: usize,
}

/// The sum of every product's versions: it grows while events are applied.
pub(super) async fn applied_sum(db: &store::Db) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct V {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        v: i64,
    }
    let Ok(mut conn) = db.get().await else { return -1 };
    let q = diesel::sql_query("SELECT COALESCE(SUM(price_version + stock_version), 0)::int8 AS v FROM products");
    match diesel_async::RunQueryDsl::get_result::<V>(q, &mut conn).await {
        Ok(v) => v.v,
        Err(_) => -1,
    }
}

/// Until every instance is ready again and events are being applied.
pub(super) async fn recovery(bases: &[String], db: &store::Db, since: Instant) -> Duration {
    let before = applied_sum(db).await;
    let mut samples = Vec::new();
    loop {
        let mut all_ready = true;
        for base in bases {
            all_ready &= matches!(readyz(base).await, Some((200, ref b)) if b["status"] == "ready");
        }
        let applied = applied_sum(db).await;
        samples.push(Sample {
            at: since.elapsed(),
            all_ready,
            applied,
        });
        if let Some(at) = verdict::recovered_at(before, &samples) {
            return at;
        }
        assert!(since.elapsed() < Duration::from_secs(120), "no recovery within 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Photo requests answered 200 by any instance during `window`, two a second.
pub(super) async fn photos_served(bases: &[String], window: Duration) -> usize {
    let client = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    let mut ok = 0;
    let until = Instant::now() + window;
    while Instant::now() < until {
        for base in bases {
            if let Ok(res) = client.get(format!("{base}/products/1/photo")).send().await
                && res.status().as_u16() == 200
            {
                ok += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ok
}

/// Reads a whole queue or stream (every message, in order) until it is idle.
pub(super) async fn read_all(conn: &lapin::Connection, queue: &str, stream: bool) -> Vec<lapin::message::Delivery> {
    let channel = conn.create_channel().await.unwrap();
    channel.basic_qos(2000, BasicQosOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    if stream {
        args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString(LongString::from("first")),
        );
    }
    let mut consumer = channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), args)
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await {
        channel
            .basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();
        out.push(d);
    }
    out
}

pub(super) fn stream_offset(d: &lapin::message::Delivery) -> u64 {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset").cloned())
    {
        Some(AMQPValue::LongLongInt(n)) => n as u64,
        other => panic!("stream message without offset: {other:?}"),
    }
}
