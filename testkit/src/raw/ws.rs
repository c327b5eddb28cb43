//! A deliberately slow WebSocket client on a raw socket with a tiny receive
//! buffer: it subscribes, then stops reading, as a stalled browser tab would.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    pub async fn connect(port: u16) -> RawWs {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            buf.push(byte[0]);
        }
        assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
        RawWs {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends one masked text frame (mask key zero: the payload goes as is).
    pub async fn send_text(&mut self, text: &str) {
        let len = text.len();
        let mut frame = vec![0x81u8];
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(text.as_bytes());
        self.stream.write_all(&frame).await.unwrap();
    }

    /// Sends a masked pong with this payload (unasked, unless it echoes a ping).
    pub async fn send_pong(&mut self, payload: &[u8]) {
        let mut frame = vec![0x8A, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await.unwrap();
    }

    /// Next text frame's payload, answering pings; None on close or timeout.
    pub async fn next_text(&mut self, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((op, payload, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                match op {
                    0x1 => return Some(String::from_utf8(payload).unwrap()),
                    0x8 => return None,
                    0x9 => {
                        let mut pong = vec![0x8A, 0x80 | payload.len() as u8, 0, 0, 0, 0];
                        pong.extend_from_slice(&payload);
                        let _ = self.stream.write_all(&pong).await;
                    }
                    _ => {}
                }
                continue;
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One unmasked server frame from the front of `buf`: (opcode, payload, bytes used).
fn parse(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let op = buf[0] & 0x0f;
    let (len, start) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(start..start + len)?.to_vec();
    Some((op, payload, start + len))
}
