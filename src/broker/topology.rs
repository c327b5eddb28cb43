//! The RabbitMQ topology (the README's picture), as data: declared by the
//! service at every (re)connection and kept identical to
//! `rabbit/definitions.json`.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use serde_json::{Value, json};

use crate::broker::publisher::confirm_channel;
use crate::settings::{ConsumerSettings, TopologySettings};
use crate::update::MAX_UPDATES_PER_MESSAGE;
use crate::wire::MAX_UPDATE_BYTES;

/// Refuses a `max_message_bytes` that is below what the service itself must
/// publish (a stream message of a whole batch) or accept (an event).
pub fn check_message_limit(t: &TopologySettings, c: &ConsumerSettings) -> Result<(), String> {
    let batch = c.batch_size.clamp(1, MAX_UPDATES_PER_MESSAGE) * MAX_UPDATE_BYTES + 2;
    let needed = batch.max(c.max_body_bytes);
    if t.max_message_bytes < needed {
        return Err(format!(
            "rabbit.topology.max_message_bytes = {} is below {needed}, the largest message the service \
             publishes or accepts (consumer.batch_size, consumer.max_body_bytes)",
            t.max_message_bytes
        ));
    }
    Ok(())
}

/// What the broker does with a body one byte over `max_message_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerLimit {
    /// Refused at publish: the broker's limit, as its refusal states it.
    Enforced(u64),
    /// Accepted: the broker's limit is above the setting.
    Above,
}

/// Routing key of the probe on the default exchange: `amq.` names are
/// reserved, so no queue can receive it.
const PROBE_KEY: &str = "amq.gateway.size-probe";

/// Publishes one body of `limit + 1` bytes on a channel of its own and
/// reports whether the broker refused it. The broker's `max_message_size` is
/// node configuration that neither AMQP nor the management API shows; its
/// refusal (`PRECONDITION_FAILED - message size N is larger than configured
/// max size M`) is the one answer every broker gives.
pub async fn probe_message_limit(conn: &Connection, limit: usize) -> lapin::Result<BrokerLimit> {
    let channel = confirm_channel(conn).await?;
    let body = vec![b' '; limit.saturating_add(1)];
    let outcome = async {
        channel
            .basic_publish(
                "".into(),
                PROBE_KEY.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await?
            .await
    };
    match tokio::time::timeout(Duration::from_secs(60), outcome).await {
        Ok(Ok(confirmation)) if confirmation.is_ack() => {
            let _ = channel.close(200, "size probe done".into()).await;
            Ok(BrokerLimit::Above)
        }
        Ok(Ok(_)) => Err(lapin::Error::from(std::io::Error::other("size probe nacked"))),
        Ok(Err(e)) => refused_limit(&e.to_string()).map(BrokerLimit::Enforced).ok_or(e),
        Err(_) => Err(lapin::Error::from(std::io::Error::other("size probe unconfirmed"))),
    }
}

/// Probes the broker at start and says what it found: a broker that accepts
/// bodies above the setting leaves oversize events to the decoder, after
/// they were prefetched, so that is a warning. Never fatal.
pub async fn report_message_limit(conn: &Connection, limit: usize, metrics: &crate::metrics::Metrics) {
    match probe_message_limit(conn, limit).await {
        Ok(BrokerLimit::Enforced(n)) => {
            metrics
                .broker_max_message_bytes
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            if n < limit as u64 {
                tracing::warn!(
                    broker = n,
                    setting = limit,
                    "the broker refuses messages smaller than rabbit.topology.max_message_bytes"
                );
            } else {
                tracing::info!(bytes = n, "the broker refuses larger messages at publish");
            }
        }
        Ok(BrokerLimit::Above) => {
            metrics.broker_max_message_bytes.set(0);
            tracing::warn!(
                setting = limit,
                "the broker accepts messages above rabbit.topology.max_message_bytes; oversize events are refused \
                 only after delivery. Set max_message_size = {limit} in its rabbitmq.conf (docker/rabbitmq.conf)"
            );
        }
        Err(e) => tracing::warn!(error = %e, "could not probe the broker's message size limit"),
    }
}

/// The configured maximum named in RabbitMQ's refusal of a large message.
fn refused_limit(text: &str) -> Option<u64> {
    let at = text.find("max size ")? + "max size ".len();
    text[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Members of a quorum queue, and of a stream, when it is created.
const QUORUM_MEMBERS: &str = "x-quorum-initial-group-size";
const STREAM_MEMBERS: &str = "x-initial-cluster-size";
/// Arguments that only count when a queue is created; the broker still
/// refuses a declare that differs in them from the existing queue.
const MEMBERS_AT_CREATION: [&str; 2] = [QUORUM_MEMBERS, STREAM_MEMBERS];

/// Whether a refused declare names a member count as the difference.
pub fn is_other_members(refusal: &str) -> bool {
    refusal.contains("inequivalent arg") && MEMBERS_AT_CREATION.iter().any(|k| refusal.contains(&format!("'{k}'")))
}

#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Str(String),
    Int(i64),
    Bool(bool),
}

#[derive(Debug, Clone)]
pub struct Exchange {
    pub name: String,
    pub kind: &'static str,
}

#[derive(Debug, Clone)]
pub struct Queue {
    pub name: String,
    pub arguments: Vec<(&'static str, Arg)>,
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
}

#[derive(Debug, Clone)]
pub struct Topology {
    pub exchanges: Vec<Exchange>,
    pub queues: Vec<Queue>,
    pub bindings: Vec<Binding>,
}

impl Topology {
    pub fn new(t: &TopologySettings) -> Self {
        let s = |v: &str| Arg::Str(v.to_owned());
        let apply_args = vec![
            ("x-queue-type", s("quorum")),
            ("x-delivery-limit", Arg::Int(t.delivery_limit)),
            ("x-dead-letter-exchange", s(&t.dlx)),
            // At-least-once dead-lettering needs reject-publish overflow.
            ("x-dead-letter-strategy", s("at-least-once")),
            ("x-overflow", s("reject-publish")),
            // One consumer at a time keeps apply, and so the update stream, in
            // commit order per product even with several instances.
            ("x-single-active-consumer", Arg::Bool(true)),
        ];
        // Members fixed at creation; 0 leaves the count to the broker.
        let replicas = |key: &'static str| match t.replicas {
            0 => Vec::new(),
            n => vec![(key, Arg::Int(i64::from(n)))],
        };
        let mut apply_args = apply_args;
        apply_args.extend(replicas(QUORUM_MEMBERS));
        let mut dead_letter_args = vec![("x-queue-type", s("quorum"))];
        dead_letter_args.extend(replicas(QUORUM_MEMBERS));
        let mut stream_args = vec![
            ("x-queue-type", s("stream")),
            ("x-max-age", s(&t.stream_max_age)),
            ("x-max-length-bytes", Arg::Int(t.stream_max_length_bytes)),
            (
                "x-stream-max-segment-size-bytes",
                Arg::Int(t.stream_max_segment_size_bytes),
            ),
        ];
        stream_args.extend(replicas(STREAM_MEMBERS));
        let topic = |name: &str| Exchange {
            name: name.to_owned(),
            kind: "topic",
        };
        let bind = |exchange: &str, queue: &str, key: &str| Binding {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
            routing_key: key.to_owned(),
        };
        Topology {
            exchanges: vec![topic(&t.events_exchange), topic(&t.dlx), topic(&t.updates_exchange)],
            queues: vec![
                Queue {
                    name: t.price_queue.clone(),
                    arguments: apply_args.clone(),
                },
                Queue {
                    name: t.stock_queue.clone(),
                    arguments: apply_args,
                },
                Queue {
                    name: t.dead_letter_queue.clone(),
                    arguments: dead_letter_args,
                },
                Queue {
                    name: t.updates_stream.clone(),
                    arguments: stream_args,
                },
            ],
            bindings: vec![
                bind(&t.events_exchange, &t.price_queue, "product.price.*"),
                bind(&t.events_exchange, &t.stock_queue, "product.stock.*"),
                bind(&t.dlx, &t.dead_letter_queue, "#"),
                bind(&t.updates_exchange, &t.updates_stream, "#"),
            ],
        }
    }

    /// Declares everything; idempotent, so it runs on every connection. A
    /// queue that exists with other members than `replicas` asks for keeps
    /// them, with a warning: they are fixed when a queue is created, and
    /// changed with `rabbitmq-queues grow` / `shrink`, not by a declare.
    pub async fn declare(&self, conn: &Connection) -> lapin::Result<()> {
        let mut channel = conn.create_channel().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for e in &self.exchanges {
            channel
                .exchange_declare(
                    e.name.as_str().into(),
                    lapin::ExchangeKind::Topic,
                    durable,
                    FieldTable::default(),
                )
                .await?;
        }
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for q in &self.queues {
            let declared = channel
                .queue_declare(q.name.as_str().into(), options, field_table(&q.arguments))
                .await;
            match declared {
                Ok(_) => {}
                Err(e) if is_other_members(&e.to_string()) => {
                    tracing::warn!(
                        queue = %q.name,
                        "the queue exists with other members than rabbit.topology.replicas asks for; it keeps them"
                    );
                    // The refusal closed the channel. Its member count is
                    // unknown here, so the queue is only checked to exist.
                    channel = conn.create_channel().await?;
                    let passive = QueueDeclareOptions {
                        passive: true,
                        ..options
                    };
                    channel
                        .queue_declare(q.name.as_str().into(), passive, FieldTable::default())
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
        for b in &self.bindings {
            channel
                .queue_bind(
                    b.queue.as_str().into(),
                    b.exchange.as_str().into(),
                    b.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// The topology in RabbitMQ's definitions format (the parts it declares).
    pub fn definitions(&self, vhost: &str) -> Value {
        let args = |a: &[(&str, Arg)]| {
            let map: serde_json::Map<String, Value> = a
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Arg::Str(s) => json!(s),
                        Arg::Int(i) => json!(i),
                        Arg::Bool(b) => json!(b),
                    };
                    ((*k).to_owned(), v)
                })
                .collect();
            Value::Object(map)
        };
        json!({
            "exchanges": self.exchanges.iter().map(|e| json!({
                "name": e.name, "vhost": vhost, "type": e.kind, "durable": true,
                "auto_delete": false, "internal": false, "arguments": {}
            })).collect::<Vec<_>>(),
            "queues": self.queues.iter().map(|q| json!({
                "name": q.name, "vhost": vhost, "durable": true, "auto_delete": false,
                "arguments": args(&q.arguments)
            })).collect::<Vec<_>>(),
            "bindings": self.bindings.iter().map(|b| json!({
                "source": b.exchange, "vhost": vhost, "destination": b.queue,
                "destination_type": "queue", "routing_key": b.routing_key, "arguments": {}
            })).collect::<Vec<_>>(),
        })
    }
}

pub fn field_table(args: &[(&'static str, Arg)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in args {
        let value = match v {
            Arg::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            Arg::Int(i) => AMQPValue::LongLongInt(*i),
            Arg::Bool(b) => AMQPValue::Boolean(*b),
        };
        table.insert((*k).into(), value);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_refusal_names_its_limit() {
        let text = "protocol error: AMQP soft error: PRECONDITION_FAILED - message size 262145 is larger than configured max size 262144";
        assert_eq!(refused_limit(text), Some(262_144));
        assert_eq!(refused_limit("connection reset"), None);
    }
}
