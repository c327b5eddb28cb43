//! A stalled event-stream client on a raw socket with a tiny receive
//! buffer: it sends its request, reads the response head, then reads
//! nothing more (a zero receive window), as a frozen browser tab would.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub struct RawSse {
    stream: TcpStream,
}

/// How a stalled client finds its connection when it reads again.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Everything was read, then the server ended the stream, closed or
    /// reset the connection; the bytes read.
    Closed(Vec<u8>),
    /// Still open after the wait.
    Open,
}

impl RawSse {
    /// Connects and sends `GET <path_and_query>`; returns the status line
    /// and the client, which reads nothing further until told to.
    pub async fn connect(port: u16, path_and_query: &str) -> (String, RawSse) {
        Self::connect_as(port, path_and_query, None).await
    }

    /// [`RawSse::connect`] through a proxy that forwards for `forwarded_for`.
    pub async fn connect_as(port: u16, path_and_query: &str, forwarded_for: Option<&str>) -> (String, RawSse) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(2048).unwrap();
        let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let forwarded = forwarded_for.map_or(String::new(), |ip| format!("X-Forwarded-For: {ip}\r\n"));
        let req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n{forwarded}\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        let status = head.lines().next().unwrap_or("").to_owned();
        (status, RawSse { stream })
    }

    /// Reads what is there until the server ends the connection, or until
    /// `within` passes with it still open.
    pub async fn drain(mut self, within: Duration) -> Drained {
        let deadline = tokio::time::Instant::now() + within;
        let mut got = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Drained::Open,
                Ok(Ok(0)) | Ok(Err(_)) => return Drained::Closed(got),
                Ok(Ok(n)) => {
                    got.extend_from_slice(&chunk[..n]);
                    // The stream's last chunk: the connection may stay open
                    // for another request, but the stream has ended.
                    if got.ends_with(b"\r\n0\r\n\r\n") {
                        return Drained::Closed(got);
                    }
                }
            }
        }
    }
}
