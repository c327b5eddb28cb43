//! The RabbitMQ topology of DESIGN.md, as data: declared by the service at
//! every (re)connection and kept identical to `rabbit/definitions.json`.

use lapin::Channel;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::{Value, json};

use crate::settings::TopologySettings;

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
                    arguments: vec![("x-queue-type", s("quorum"))],
                },
                Queue {
                    name: t.updates_stream.clone(),
                    arguments: vec![
                        ("x-queue-type", s("stream")),
                        ("x-max-age", s(&t.stream_max_age)),
                        ("x-max-length-bytes", Arg::Int(t.stream_max_length_bytes)),
                        (
                            "x-stream-max-segment-size-bytes",
                            Arg::Int(t.stream_max_segment_size_bytes),
                        ),
                    ],
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

    /// Declares everything; idempotent, so it runs on every connection.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
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
        for q in &self.queues {
            let options = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare(q.name.as_str().into(), options, field_table(&q.arguments))
                .await?;
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
