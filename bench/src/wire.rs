//! Minimal clients on a plain tokio `TcpStream`: WebSocket (RFC 6455 client
//! side, text frames), SSE over chunked HTTP/1.1, and STOMP over WebSocket.
//! Thousands of them run in one process, so they are frugal: one buffer per
//! connection, frames parsed in place, and only the few fields the bench
//! needs read from each message (no JSON parse on the hot path).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant as Deadline;

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    if hay.len() < needle.len() {
        return None;
    }
    let last_start = hay.len() - needle.len();
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// The integer that follows `key` (spaces allowed before it).
pub fn num_after(hay: &[u8], key: &[u8]) -> Option<i64> {
    let mut i = find(hay, key)? + key.len();
    while hay.get(i) == Some(&b' ') {
        i += 1;
    }
    let mut n: i64 = 0;
    let start = i;
    while let Some(&b) = hay.get(i) {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
        i += 1;
    }
    (i > start).then_some(n)
}

/// Like [`num_after`] for the last `key`, searched from the end: the field
/// the fan-out clients read (`ts_us`) closes each message.
pub fn num_after_last(hay: &[u8], key: &[u8]) -> Option<i64> {
    let i = hay.windows(key.len()).rposition(|w| w == key)?;
    num_after(&hay[i..], key)
}

/// The fields of an update the bench uses, read from its JSON text.
#[derive(Debug, Clone, Copy)]
pub struct UpdateInfo {
    pub product_id: i64,
    pub price: bool,
    pub version: i64,
    pub ts_us: i64,
}

impl UpdateInfo {
    /// From the update's `data` JSON (or any text that contains it once).
    pub fn parse(data: &[u8]) -> Option<Self> {
        Some(UpdateInfo {
            product_id: num_after(data, b"\"product_id\":")?,
            price: find(data, b"\"kind\":\"price\"").is_some(),
            version: num_after(data, b"\"version\":")?,
            ts_us: num_after(data, b"\"ts_us\":")?,
        })
    }
}

pub fn now_us() -> i64 {
    product_gateway::domain::now_us()
}

/// A TCP connection with its read buffer.
pub struct Conn {
    stream: TcpStream,
    pub buf: BytesMut,
}

impl Conn {
    /// Connects from the loopback address `src` when given: the service
    /// limits some requests per client address, so a scenario that must
    /// look like many clients binds several 127.0.0.x addresses.
    pub async fn connect_from(src: Option<Ipv4Addr>, addr: SocketAddr) -> Result<Conn> {
        let stream = match src {
            None => TcpStream::connect(addr)
                .await
                .with_context(|| format!("connect to {addr}"))?,
            Some(src) => {
                let socket = TcpSocket::new_v4()?;
                socket
                    .bind(SocketAddr::from((src, 0)))
                    .with_context(|| format!("bind {src}"))?;
                socket
                    .connect(addr)
                    .await
                    .with_context(|| format!("connect {src} → {addr}"))?
            }
        };
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::new(),
        })
    }

    /// Reads what is available; 0 at end of stream.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(8192);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends a request head and reads the response head; what follows it
    /// stays in the buffer.
    async fn exchange_head(&mut self, request: &str) -> Result<String> {
        self.write_all(request.as_bytes()).await?;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.advance(end + 4);
                return Ok(head);
            }
            if self.buf.len() > 64 * 1024 {
                bail!("response head over 64 KiB");
            }
            if self.fill().await? == 0 {
                bail!("connection closed before the response head");
            }
        }
    }
}

fn status_of(head: &str) -> u16 {
    head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// One WebSocket frame at the front of the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub op: u8,
    start: usize,
    end: usize,
}

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;

/// What the control conversation of a WebSocket sees next.
pub enum WsEvent {
    Text(Vec<u8>),
    /// A close frame, with its code if it has one.
    Closed(Option<u16>),
}

pub struct Ws {
    conn: Conn,
}

impl Ws {
    /// Opens `path` on `addr` and completes the upgrade.
    pub async fn connect(addr: SocketAddr, path: &str, protocol: Option<&str>) -> Result<Ws> {
        Self::connect_from(None, addr, path, protocol).await
    }

    /// [`Ws::connect`] from the loopback address `src` ([`Conn::connect_from`]).
    pub async fn connect_from(
        src: Option<Ipv4Addr>,
        addr: SocketAddr,
        path: &str,
        protocol: Option<&str>,
    ) -> Result<Ws> {
        let mut conn = Conn::connect_from(src, addr).await?;
        let proto = protocol
            .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{proto}\r\n"
        );
        let head = conn.exchange_head(&req).await?;
        if status_of(&head) != 101 {
            bail!("WebSocket upgrade refused: {}", head.lines().next().unwrap_or(""));
        }
        Ok(Ws { conn })
    }

    /// Sends a masked text frame. The mask key is zero, so the payload goes
    /// as it is (the server unmasks with XOR 0).
    pub async fn send_text(&mut self, text: &[u8]) -> std::io::Result<()> {
        self.send(0x81, text).await
    }

    pub async fn send_json(&mut self, v: &serde_json::Value) -> std::io::Result<()> {
        self.send_text(v.to_string().as_bytes()).await
    }

    async fn send(&mut self, first: u8, payload: &[u8]) -> std::io::Result<()> {
        let len = payload.len();
        let mut frame = Vec::with_capacity(len + 14);
        frame.push(first);
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        self.conn.write_all(&frame).await
    }

    /// The next complete frame in the buffer, if any.
    pub fn frame(&self) -> Option<Frame> {
        let b = &self.conn.buf[..];
        if b.len() < 2 {
            return None;
        }
        let op = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let (len, mut start): (usize, usize) = match b[1] & 0x7f {
            126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
            127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize, 10),
            n => (n as usize, 2),
        };
        if masked {
            start += 4;
        }
        let end = start.checked_add(len)?;
        (b.len() >= end).then_some(Frame { op, start, end })
    }

    pub fn payload(&self, f: &Frame) -> &[u8] {
        &self.conn.buf[f.start..f.end]
    }

    pub fn consume(&mut self, f: &Frame) {
        self.conn.buf.advance(f.end);
    }

    pub async fn fill(&mut self) -> std::io::Result<usize> {
        self.conn.fill().await
    }

    /// Answers a ping frame (and consumes it).
    pub async fn pong(&mut self, f: &Frame) -> std::io::Result<()> {
        let payload = self.payload(f).to_vec();
        self.consume(f);
        self.send(0x8A, &payload).await
    }

    /// The receive loop of every measuring client: each data frame's
    /// payload goes to `data` as it comes, pings are answered, and a close
    /// frame or the end of the connection is an error naming `who`. Runs
    /// until then: a caller that stops earlier drops it (in a `select!`).
    pub async fn data_frames(&mut self, who: &str, mut data: impl FnMut(&[u8])) -> Result<()> {
        loop {
            while let Some(f) = self.frame() {
                match f.op {
                    OP_PING => {
                        self.pong(&f).await?;
                        continue;
                    }
                    OP_CLOSE => bail!("the server closed {who}"),
                    _ => {}
                }
                data(self.payload(&f));
                self.consume(&f);
            }
            if self.fill().await? == 0 {
                bail!("the server closed {who}");
            }
        }
    }

    /// Next text or binary message, answering pings; None when the peer
    /// closes. Allocates: for the control conversation, not the hot path.
    pub async fn next_message(&mut self, within: Duration) -> Result<Option<Vec<u8>>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(f) = self.frame() {
                match f.op {
                    OP_PING => {
                        self.pong(&f).await?;
                    }
                    OP_CLOSE => return Ok(None),
                    OP_TEXT | OP_BINARY | 0 => {
                        let text = self.payload(&f).to_vec();
                        self.consume(&f);
                        return Ok(Some(text));
                    }
                    _ => self.consume(&f),
                }
            }
            let n = tokio::time::timeout_at(deadline, self.fill())
                .await
                .map_err(|_| anyhow!("no message within {within:?}"))??;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// The next text message or the close, answering pings; an error at
    /// the deadline or when the connection ends without a close frame.
    pub async fn next(&mut self, deadline: Deadline) -> Result<WsEvent> {
        loop {
            while let Some(f) = self.frame() {
                match f.op {
                    OP_PING => self.pong(&f).await?,
                    OP_CLOSE => {
                        let code = close_code(self.payload(&f));
                        self.consume(&f);
                        return Ok(WsEvent::Closed(code));
                    }
                    0x0..=0x2 => {
                        let text = self.payload(&f).to_vec();
                        self.consume(&f);
                        return Ok(WsEvent::Text(text));
                    }
                    _ => self.consume(&f),
                }
            }
            let n = tokio::time::timeout_at(deadline, self.fill())
                .await
                .map_err(|_| anyhow!("no frame in time"))??;
            if n == 0 {
                bail!("the connection ended without a close frame");
            }
        }
    }

    /// Closes with 1000 and reads up to the server's close frame (for at
    /// most a second): dropping a socket with unread data resets it, which
    /// the service counts as a protocol error.
    pub async fn close(mut self) {
        if self.send(0x88, &1000u16.to_be_bytes()).await.is_err() {
            return;
        }
        let deadline = Deadline::now() + Duration::from_secs(1);
        while let Ok(WsEvent::Text(_)) = self.next(deadline).await {}
    }

    /// Waits for a message containing `needle`, skipping others.
    pub async fn wait_for(&mut self, needle: &[u8], within: Duration) -> Result<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_message(left).await? {
                Some(m) if find(&m, needle).is_some() => return Ok(m),
                Some(_) => {}
                None => bail!(
                    "connection closed while waiting for {:?}",
                    String::from_utf8_lossy(needle)
                ),
            }
        }
    }
}

pub fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// Server-Sent Events over HTTP/1.1 (chunked or not).
pub struct Sse {
    conn: Conn,
    chunked: bool,
    state: Dechunk,
    /// De-chunked body not yet cut into events.
    pub body: BytesMut,
    pub ended: bool,
}

#[derive(Clone, Copy)]
enum Chunk {
    Size,
    Data(usize),
    DataEnd,
}

/// Incremental HTTP/1.1 chunked transfer decoding, for the bench's
/// hand-written event-stream clients.
pub struct Dechunk {
    state: Chunk,
}

impl Default for Dechunk {
    fn default() -> Self {
        Self { state: Chunk::Size }
    }
}

impl Dechunk {
    /// Moves the data of the chunks in `buf` into `body`, leaving a
    /// partial chunk header in `buf`; true once the last chunk came.
    pub fn feed(&mut self, buf: &mut BytesMut, body: &mut BytesMut) -> Result<bool> {
        loop {
            match self.state {
                Chunk::Size => {
                    let Some(i) = find(buf, b"\r\n") else { return Ok(false) };
                    let line = std::str::from_utf8(&buf[..i]).unwrap_or("");
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16).map_err(|_| anyhow!("bad chunk size {line:?}"))?;
                    buf.advance(i + 2);
                    if size == 0 {
                        return Ok(true);
                    }
                    self.state = Chunk::Data(size);
                }
                Chunk::Data(n) => {
                    if buf.is_empty() {
                        return Ok(false);
                    }
                    let k = n.min(buf.len());
                    body.extend_from_slice(&buf[..k]);
                    buf.advance(k);
                    self.state = if n == k { Chunk::DataEnd } else { Chunk::Data(n - k) };
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(false);
                    }
                    buf.advance(2);
                    self.state = Chunk::Size;
                }
            }
        }
    }
}

impl Sse {
    /// Opens an event stream; fails unless the answer is 200.
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> Result<Sse> {
        Self::connect_with(addr, path_and_query, &[]).await
    }

    /// [`Sse::connect`] with more request headers (`Last-Event-ID`).
    pub async fn connect_with(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> Result<Sse> {
        match Self::open(None, addr, path_and_query, headers).await? {
            SseOpen::Stream(sse) => Ok(sse),
            SseOpen::Refused(status) => bail!("event stream refused: HTTP {status}"),
        }
    }

    /// Opens an event stream from the loopback address `src` when given
    /// ([`Conn::connect_from`]); a refusal is an answer, not an error.
    pub async fn open(
        src: Option<Ipv4Addr>,
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseOpen> {
        let mut conn = Conn::connect_from(src, addr).await?;
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let req = format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{extra}\r\n");
        let head = conn.exchange_head(&req).await?;
        let status = status_of(&head);
        if status != 200 {
            return Ok(SseOpen::Refused(status));
        }
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        let mut sse = Sse {
            conn,
            chunked,
            state: Dechunk::default(),
            body: BytesMut::new(),
            ended: false,
        };
        sse.dechunk()?;
        Ok(SseOpen::Stream(sse))
    }

    fn dechunk(&mut self) -> Result<()> {
        if !self.chunked {
            let all = self.conn.buf.split();
            self.body.extend_from_slice(&all);
            return Ok(());
        }
        self.ended |= self.state.feed(&mut self.conn.buf, &mut self.body)?;
        Ok(())
    }

    /// Length of the next complete event at the front of `body` (without
    /// its blank line), if any.
    pub fn event_len(&self) -> Option<usize> {
        find(&self.body, b"\n\n")
    }

    pub fn consume_event(&mut self, len: usize) {
        self.body.advance(len + 2);
    }

    /// Reads more; false at end of stream, once what came before it is in
    /// `body` (the last chunk often arrives with the last events). A
    /// malformed chunk is an `InvalidData` error, so that every failure
    /// reads as a socket's.
    pub async fn fill(&mut self) -> std::io::Result<bool> {
        if self.ended {
            return Ok(false);
        }
        let n = self.conn.fill().await?;
        if n == 0 {
            return Ok(false);
        }
        self.dechunk()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok(true)
    }

    /// The next event (comments included); None at the end of the stream.
    pub async fn next(&mut self, deadline: Deadline) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(len) = self.event_len() {
                let event = self.body[..len].to_vec();
                self.consume_event(len);
                return Ok(Some(event));
            }
            let more = tokio::time::timeout_at(deadline, self.fill())
                .await
                .map_err(|_| anyhow!("no event in time"))??;
            if !more {
                return Ok(None);
            }
        }
    }
}

/// What opening an event stream got.
pub enum SseOpen {
    Stream(Sse),
    /// Refused with this HTTP status (503: busy or at a limit).
    Refused(u16),
}

/// STOMP over WebSocket (RabbitMQ Web-STOMP): connects to `vhost` and
/// subscribes to `destination`, waiting for the broker's receipt.
pub async fn stomp_subscribe(addr: SocketAddr, vhost: &str, destination: &str) -> Result<Ws> {
    let mut ws = Ws::connect(addr, "/ws", Some("v12.stomp")).await?;
    let connect =
        format!("CONNECT\naccept-version:1.2\nhost:{vhost}\nlogin:guest\npasscode:guest\nheart-beat:0,0\n\n\0");
    ws.send_text(connect.as_bytes()).await?;
    let first = ws
        .next_message(Duration::from_secs(30))
        .await?
        .ok_or_else(|| anyhow!("Web-STOMP closed the connection after CONNECT"))?;
    if !first.starts_with(b"CONNECTED") {
        bail!("STOMP CONNECT refused: {}", String::from_utf8_lossy(&first));
    }
    let sub = format!("SUBSCRIBE\nid:0\ndestination:{destination}\nack:auto\nreceipt:subscribed\n\n\0");
    ws.send_text(sub.as_bytes()).await?;
    let receipt = ws.wait_for(b"RECEIPT", Duration::from_secs(30)).await?;
    if find(&receipt, b"receipt-id:subscribed").is_none() {
        bail!("unexpected STOMP answer: {}", String::from_utf8_lossy(&receipt));
    }
    Ok(ws)
}

/// Subscribes a gateway WebSocket to `topics`, optionally from `since`.
pub async fn gateway_ws(addr: SocketAddr, topics: &[&str], since: Option<u64>) -> Result<Ws> {
    let mut ws = Ws::connect(addr, "/ws", None).await?;
    let mut sub = serde_json::json!({ "op": "subscribe", "topics": topics });
    if let Some(s) = since {
        sub["since"] = s.into();
    }
    ws.send_text(sub.to_string().as_bytes()).await?;
    ws.wait_for(b"\"type\":\"subscribed\"", Duration::from_secs(30)).await?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields() {
        let t = br#"{"type":"update","offset":12,"topic":"product.price.3","data":{"product_id":3,"kind":"price","price_cents":5,"version":77,"occurred_at":"x","ts_us":1234}}"#;
        assert_eq!(num_after(t, b"\"offset\":"), Some(12));
        let u = UpdateInfo::parse(t).unwrap();
        assert_eq!((u.product_id, u.price, u.version, u.ts_us), (3, true, 77, 1234));
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
    }
}
