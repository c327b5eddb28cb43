//! Real WebSocket and SSE clients over loopback, as a browser would use them.

use std::time::Duration;

use actix_codec::Framed;
use awc::BoxedSocket;
use awc::ws::{Codec, Frame, Message};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;

pub struct WsClient {
    framed: Framed<BoxedSocket, Codec>,
}

/// What a read from the socket gave.
#[derive(Debug)]
pub enum WsEvent {
    Json(Value),
    Closed(Option<u16>),
}

impl WsClient {
    pub async fn connect(base: &str) -> WsClient {
        Self::try_connect(base).await.expect("websocket connects")
    }

    pub async fn try_connect(base: &str) -> Option<WsClient> {
        Self::connect_to(base, "/ws").await.ok()
    }

    /// Connects to `path` (with its query); Err with the HTTP status of a
    /// refused upgrade (0: no answer).
    pub async fn connect_to(base: &str, path: &str) -> Result<WsClient, u16> {
        let url = format!("{}{path}", base.replace("http://", "ws://"));
        let connect = awc::Client::new().ws(url).max_frame_size(16 << 20).connect();
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok((_, framed))) => Ok(WsClient { framed }),
            Ok(Err(awc::error::WsClientError::InvalidResponseStatus(status))) => Err(status.as_u16()),
            _ => Err(0),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.framed
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send");
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.framed
            .send(Message::Binary(bytes.into()))
            .await
            .expect("send binary");
    }

    /// Next JSON frame or close; None on timeout.
    pub async fn next(&mut self, within: Duration) -> Option<WsEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.framed.next()).await.ok()?;
            match frame {
                None | Some(Err(_)) => return Some(WsEvent::Closed(None)),
                Some(Ok(Frame::Text(b))) => {
                    return Some(WsEvent::Json(serde_json::from_slice(&b).expect("JSON frame")));
                }
                Some(Ok(Frame::Close(reason))) => return Some(WsEvent::Closed(reason.map(|r| u16::from(r.code)))),
                Some(Ok(Frame::Ping(p))) => {
                    let _ = self.framed.send(Message::Pong(p)).await;
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Next frame that is JSON, panicking on close or timeout.
    pub async fn json(&mut self, within: Duration) -> Value {
        match self.next(within).await {
            Some(WsEvent::Json(v)) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// Next frame of the given type, skipping others.
    pub async fn next_of(&mut self, ty: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.json(left).await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// The snapshot that comes next: its parts (checked to be numbered in
    /// order, each skipping nothing else) gathered into one value with
    /// `products`, `parts` and the `offset` of its `snapshot_end`.
    pub async fn snapshot(&mut self, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        let mut gathered = Snapshot::default();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.next_of_any(&["snapshot", "snapshot_end"], left).await;
            if let Some(done) = gathered.take(&v) {
                return done;
            }
        }
    }

    /// Next frame of one of the given types, skipping others.
    pub async fn next_of_any(&mut self, types: &[&str], within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.json(left).await;
            if types.iter().any(|t| v["type"] == *t) {
                return v;
            }
        }
    }

    pub async fn subscribe(&mut self, topics: &[&str], since: Option<u64>, snapshot: bool) -> Value {
        let mut frame = serde_json::json!({"op": "subscribe", "topics": topics, "snapshot": snapshot});
        if let Some(s) = since {
            frame["since"] = s.into();
        }
        self.send(frame).await;
        self.next_of("subscribed", Duration::from_secs(10)).await
    }

    /// Collects `n` update frames.
    pub async fn updates(&mut self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(WsEvent::Json(v)) if v["type"] == "update" => out.push(v),
                Some(WsEvent::Json(_)) => {}
                other => panic!("after {} of {n} updates: {other:?}", out.len()),
            }
        }
        out
    }
}

/// A snapshot's parts as they arrive, gathered until its end.
#[derive(Default)]
pub struct Snapshot {
    products: Vec<Value>,
    parts: u64,
}

impl Snapshot {
    /// Takes one `snapshot` part or the `snapshot_end`; returns the whole
    /// snapshot at its end. Panics on a part out of order or an end whose
    /// counts disagree with the parts.
    pub fn take(&mut self, frame: &Value) -> Option<Value> {
        match frame["type"].as_str() {
            Some("snapshot") => {
                assert_eq!(frame["part"], self.parts, "snapshot parts in order: {frame:.200}");
                self.products
                    .extend(frame["products"].as_array().expect("a part's products").iter().cloned());
                self.parts += 1;
                None
            }
            Some("snapshot_end") => {
                assert!(self.parts >= 1, "a snapshot has a first part");
                assert_eq!(frame["parts"], self.parts, "{frame}");
                assert_eq!(frame["products"], self.products.len(), "{frame}");
                Some(serde_json::json!({
                    "products": std::mem::take(&mut self.products),
                    "parts": self.parts,
                    "offset": frame["offset"],
                }))
            }
            other => panic!("not a snapshot frame: {other:?}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub event: String,
    pub data: Value,
}

pub struct SseClient {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>>>>,
    buf: String,
    /// Set once the server ended the stream (as opposed to a read timing out).
    pub ended: bool,
}

impl SseClient {
    pub async fn connect(base: &str, query: &str, last_event_id: Option<u64>) -> Result<SseClient, (u16, Value)> {
        Self::connect_with(base, query, last_event_id, None).await
    }

    /// [`SseClient::connect`] with `Authorization: Bearer <token>`.
    pub async fn connect_with(
        base: &str,
        query: &str,
        last_event_id: Option<u64>,
        bearer: Option<&str>,
    ) -> Result<SseClient, (u16, Value)> {
        let mut req = awc::Client::builder()
            .timeout(Duration::from_secs(3600))
            .finish()
            .get(format!("{base}/events?{query}"));
        if let Some(token) = bearer {
            req = req.insert_header(("Authorization", format!("Bearer {token}")));
        }
        if let Some(id) = last_event_id {
            req = req.insert_header(("Last-Event-ID", id.to_string()));
        }
        let Ok(Ok(mut res)) = tokio::time::timeout(Duration::from_secs(5), req.send()).await else {
            return Err((0, Value::Null));
        };
        if res.status().as_u16() != 200 {
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            return Err((status, body));
        }
        assert_eq!(res.headers().get("content-type").unwrap(), "text/event-stream");
        Ok(SseClient {
            body: Box::pin(res),
            buf: String::new(),
            ended: false,
        })
    }

    /// The refusal of a stream that is refused only for now (`busy`,
    /// `unavailable`): answered 200 with one `error` event, then ended, so
    /// an EventSource comes back by itself. None when the stream was served.
    pub async fn retry_later(base: &str, query: &str) -> Option<Value> {
        let Ok(mut sse) = Self::connect(base, query, None).await else {
            panic!("a refusal for now is not an HTTP error")
        };
        let first = sse.next(Duration::from_secs(2)).await?;
        if first.event != "error" {
            return None;
        }
        assert!(
            sse.next(Duration::from_secs(5)).await.is_none() && sse.ended,
            "the refusal ends its stream"
        );
        Some(first.data)
    }

    /// Next event (comments and `retry:` skipped); None on timeout or end.
    pub async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::from("message"), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some(SseEvent {
                    id,
                    event,
                    data: serde_json::from_str(&data).expect("JSON data"),
                });
            }
            let chunk = match tokio::time::timeout_at(deadline, self.body.next()).await.ok()? {
                Some(Ok(chunk)) => chunk,
                _ => {
                    self.ended = true;
                    return None;
                }
            };
            self.buf.push_str(std::str::from_utf8(&chunk).expect("UTF-8 SSE"));
        }
    }

    /// The snapshot that comes next, gathered as [`WsClient::snapshot`]
    /// does; its `id` is that of the `snapshot_end` event.
    pub async fn snapshot(&mut self, within: Duration) -> (Option<u64>, Value) {
        let deadline = tokio::time::Instant::now() + within;
        let mut gathered = Snapshot::default();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let e = self.next(left).await.expect("a snapshot event before the deadline");
            if e.event != "snapshot" && e.event != "snapshot_end" {
                continue;
            }
            assert_eq!(e.data["type"], e.event.as_str(), "{:?}", e);
            if let Some(done) = gathered.take(&e.data) {
                return (e.id, done);
            }
        }
    }

    /// Collects `n` update events (kind events: price or stock).
    pub async fn updates(&mut self, n: usize, within: Duration) -> Vec<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(e) if e.event == "price" || e.event == "stock" => out.push(e),
                Some(_) => {}
                None => panic!("SSE ended or timed out after {} of {n} updates", out.len()),
            }
        }
        out
    }
}
