//! Publishing with publisher confirms: a batch goes out pipelined (all
//! publishes first, then all confirms), and anything short of an ack for
//! every message is an error the caller retries.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use crate::wire::CONTENT_TYPE;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl Outgoing {
    /// A persistent JSON message with a unique id.
    pub fn json(
        exchange: &str,
        routing_key: String,
        body: Vec<u8>,
        message_id: String,
        headers: Option<FieldTable>,
    ) -> Self {
        let mut properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_message_id(message_id.into())
            .with_timestamp(chrono::Utc::now().timestamp() as u64);
        if let Some(h) = headers {
            properties = properties.with_headers(h);
        }
        Outgoing {
            exchange: exchange.to_owned(),
            routing_key,
            body,
            properties,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0} message(s) nacked by the broker")]
    Nacked(usize),
    #[error("{0} message(s) returned as unroutable")]
    Returned(usize),
    #[error("confirm not received within {0:?}")]
    Timeout(Duration),
}

/// What the broker's confirm says about one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// Routed and accepted.
    Ack,
    /// Acked but returned first: `mandatory` and no queue was bound.
    Returned,
    /// Refused by the broker (or a channel not in confirm mode).
    Nacked,
}

impl Confirmed {
    /// lapin's own reading, which pairs a return with whichever ack comes
    /// next: right for the count of a batch whose confirms are all awaited
    /// before the next is sent ([`publish_all`]: the batch's returns all
    /// land on the batch's acks), wrong for one message among many in
    /// flight ([`super::confirms`] tells those apart).
    pub fn of(confirmation: &lapin::Confirmation) -> Self {
        match confirmation {
            lapin::Confirmation::Ack(None) => Confirmed::Ack,
            lapin::Confirmation::Ack(Some(_)) => Confirmed::Returned,
            lapin::Confirmation::Nack(_) | lapin::Confirmation::NotRequested => Confirmed::Nacked,
        }
    }
}

/// A channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}

/// Publishes one message, mandatory so that an unroutable one comes back;
/// the returned future resolves to the broker's confirm.
pub async fn publish_one(channel: &Channel, m: &Outgoing) -> lapin::Result<lapin::PublisherConfirm> {
    channel
        .basic_publish(
            m.exchange.as_str().into(),
            m.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &m.body,
            m.properties.clone(),
        )
        .await
}

/// Publishes every message (mandatory) and waits for all confirms.
pub async fn publish_all(channel: &Channel, messages: &[Outgoing], timeout: Duration) -> Result<(), PublishError> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut confirms = Vec::with_capacity(messages.len());
    for m in messages {
        confirms.push(publish_one(channel, m).await?);
    }
    let all = futures_util::future::join_all(confirms);
    let results = tokio::time::timeout(timeout, all)
        .await
        .map_err(|_| PublishError::Timeout(timeout))?;
    let (mut nacked, mut returned) = (0, 0);
    for r in results {
        match Confirmed::of(&r?) {
            Confirmed::Ack => {}
            Confirmed::Returned => returned += 1,
            Confirmed::Nacked => nacked += 1,
        }
    }
    if nacked > 0 {
        return Err(PublishError::Nacked(nacked));
    }
    if returned > 0 {
        return Err(PublishError::Returned(returned));
    }
    Ok(())
}
