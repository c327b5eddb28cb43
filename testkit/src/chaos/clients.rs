//! The chaos run's clients: WebSocket and SSE subscribers that reconnect
//! and resume through every fault, and the readiness poller.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::processes::readyz;
use crate::clients::{SseClient, WsClient, WsEvent};
use crate::verdict::Seen;

#[derive(Default)]
pub(super) struct ClientLog {
    pub(super) seen: Vec<Seen>,
    pub(super) reconnects: u32,
}

pub(super) struct Client {
    pub(super) name: String,
    pub(super) pattern: String,
    pub(super) log: Arc<Mutex<ClientLog>>,
}

/// A client that stays subscribed: on any disconnect it reconnects (to its
/// own instance, else the other) with the last offset it saw.
pub(super) fn spawn_client(name: String, sse: bool, pattern: &str, ports: [u16; 2], stop: CancellationToken) -> Client {
    let log = Arc::new(Mutex::new(ClientLog::default()));
    let (l, p) = (log.clone(), pattern.to_owned());
    tokio::task::spawn_local(async move {
        let mut attempt = 0usize;
        while !stop.is_cancelled() {
            let base = format!("http://127.0.0.1:{}", ports[attempt % 2]);
            attempt += 1;
            let since = l.lock().unwrap().seen.last().map(|s| s.offset);
            if sse {
                let mut q = format!("topics={}", p.replace('#', "%23"));
                if let Some(s) = since {
                    q.push_str(&format!("&since={s}"));
                }
                let Ok(mut c) = SseClient::connect(&base, &q, None).await else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                };
                attempt = 0;
                while !stop.is_cancelled() {
                    match c.next(Duration::from_millis(500)).await {
                        Some(e) if e.event == "price" || e.event == "stock" => {
                            let topic = format!("product.{}.{}", e.event, e.data["product_id"]);
                            if let Some(s) = Seen::from_data(e.id.unwrap_or(0), &topic, &e.data) {
                                l.lock().unwrap().seen.push(s);
                            }
                        }
                        Some(_) => {}
                        None if c.ended => break,
                        None => {}
                    }
                }
            } else {
                let Some(mut c) = WsClient::try_connect(&base).await else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                };
                let mut frame = serde_json::json!({"op": "subscribe", "topics": [p]});
                if let Some(s) = since {
                    frame["since"] = s.into();
                }
                c.send(frame).await;
                attempt = 0;
                while !stop.is_cancelled() {
                    match c.next(Duration::from_millis(500)).await {
                        Some(WsEvent::Json(v)) if v["type"] == "update" => {
                            let offset = v["offset"].as_u64().unwrap_or(0);
                            if let Some(s) = Seen::from_data(offset, v["topic"].as_str().unwrap_or(""), &v["data"]) {
                                l.lock().unwrap().seen.push(s);
                            }
                        }
                        Some(WsEvent::Closed(_)) => break,
                        _ => {}
                    }
                }
            }
            if !stop.is_cancelled() {
                l.lock().unwrap().reconnects += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    Client {
        name,
        pattern: pattern.to_owned(),
        log,
    }
}

/// `/readyz` answers seen during each phase, per instance.
pub(super) type Observations = Arc<Mutex<Vec<(String, u16, serde_json::Value)>>>;

pub(super) fn spawn_poller(
    ports: Vec<(&'static str, u16)>,
    phase: Arc<Mutex<String>>,
    seen: Observations,
    stop: CancellationToken,
) {
    tokio::task::spawn_local(async move {
        while !stop.is_cancelled() {
            for (name, port) in &ports {
                if let Some((status, body)) = readyz(*port).await {
                    let p = phase.lock().unwrap().clone();
                    seen.lock().unwrap().push((format!("{p}/{name}"), status, body));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}
