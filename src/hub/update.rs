//! An applied update as read from the stream, with its client frames
//! serialised once: every client gets the same bytes.

use bytes::Bytes;
use bytestring::ByteString;
use serde::Deserialize;

use crate::broker::message::{MAX_UPDATES_PER_MESSAGE, update_id};
use crate::domain::Kind;

#[derive(Debug)]
pub struct Update {
    /// Stream offset: the update's global id.
    pub offset: u64,
    pub topic: Box<str>,
    pub product_id: i64,
    pub kind: Kind,
    pub version: i64,
    pub ts_us: i64,
    /// `{"type":"update",...}` WebSocket text frame.
    pub ws_frame: ByteString,
    /// `id:/event:/data:` SSE event.
    pub sse_event: Bytes,
}

#[derive(Deserialize)]
struct Head {
    product_id: i64,
    kind: Kind,
    version: i64,
    #[serde(default)]
    ts_us: i64,
}

impl Update {
    /// The updates of one stream message: a JSON array of updates (a
    /// committed batch) or a single update. Entries that are not updates are
    /// skipped (nothing else is published there, but never trust it).
    pub fn from_message(offset: u64, body: &[u8]) -> Vec<Self> {
        if body.first() == Some(&b'[') {
            let Ok(items) = serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(body) else {
                return Vec::new();
            };
            items
                .iter()
                .enumerate()
                .take(MAX_UPDATES_PER_MESSAGE)
                .filter_map(|(i, raw)| Self::from_stream(update_id(offset, i), "", raw.get().as_bytes()))
                .collect()
        } else {
            Self::from_stream(update_id(offset, 0), "", body).into_iter().collect()
        }
    }

    /// Builds one update with id `offset` from its JSON; None when the body
    /// is not an update.
    pub fn from_stream(offset: u64, routing_key: &str, body: &[u8]) -> Option<Self> {
        let head: Head = serde_json::from_slice(body).ok()?;
        let data = std::str::from_utf8(body).ok()?;
        let topic = if routing_key.is_empty() {
            head.kind.topic(crate::domain::ProductId::new(head.product_id)?)
        } else {
            routing_key.to_owned()
        };
        let topic_json = serde_json::to_string(&topic).ok()?;
        let ws = format!(r#"{{"type":"update","offset":{offset},"topic":{topic_json},"data":{data}}}"#);
        let sse = format!("id: {offset}\nevent: {}\ndata: {data}\n\n", head.kind.as_str());
        Some(Update {
            offset,
            topic: topic.into(),
            product_id: head.product_id,
            kind: head.kind,
            version: head.version,
            ts_us: head.ts_us,
            ws_frame: ByteString::from(ws),
            sse_event: Bytes::from(sse),
        })
    }

    pub fn key(&self) -> (i64, Kind) {
        (self.product_id, self.kind)
    }
}
