//! The chaos run's clients: WebSocket and SSE subscribers that reconnect
//! and resume through every fault, and the readiness poller.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::evidence::applied_sum;
use super::processes::readyz;
use crate::clients::{SseClient, WsClient, WsEvent};
use crate::verdict::{Seen, State};
use product_gateway::store;

#[derive(Default)]
pub(super) struct ClientLog {
    pub(super) seen: Vec<Seen>,
    /// When each of `seen` arrived.
    pub(super) at: Vec<Instant>,
    pub(super) reconnects: u32,
}

impl ClientLog {
    fn push(&mut self, s: Seen) {
        self.seen.push(s);
        self.at.push(Instant::now());
    }
}

pub(super) struct Client {
    pub(super) name: String,
    pub(super) pattern: String,
    pub(super) log: Arc<Mutex<ClientLog>>,
}

/// A client that stays subscribed: on any disconnect it reconnects (to its
/// own instance, else the other) with the last offset it saw.
pub(super) fn spawn_client(
    name: String,
    sse: bool,
    pattern: &str,
    bases: [String; 2],
    stop: CancellationToken,
) -> Client {
    let log = Arc::new(Mutex::new(ClientLog::default()));
    let (l, p) = (log.clone(), pattern.to_owned());
    tokio::task::spawn_local(async move {
        let mut attempt = 0usize;
        while !stop.is_cancelled() {
            let base = &bases[attempt % 2];
            attempt += 1;
            let since = l.lock().unwrap().seen.last().map(|s| s.offset);
            if sse {
                let mut q = format!("topics={}", p.replace('#', "%23"));
                if let Some(s) = since {
                    q.push_str(&format!("&since={s}"));
                }
                let Ok(mut c) = SseClient::connect(base, &q, None).await else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                };
                attempt = 0;
                while !stop.is_cancelled() {
                    match c.next(Duration::from_millis(500)).await {
                        Some(e) if e.event == "price" || e.event == "stock" => {
                            let topic = format!("product.{}.{}", e.event, e.data["product_id"]);
                            if let Some(s) = Seen::from_data(e.id.unwrap_or(0), &topic, &e.data) {
                                l.lock().unwrap().push(s);
                            }
                        }
                        Some(_) => {}
                        None if c.ended => break,
                        None => {}
                    }
                }
            } else {
                let Some(mut c) = WsClient::try_connect(base).await else {
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
                                l.lock().unwrap().push(s);
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
    bases: Vec<(&'static str, String)>,
    phase: Arc<Mutex<String>>,
    seen: Observations,
    stop: CancellationToken,
) {
    tokio::task::spawn_local(async move {
        while !stop.is_cancelled() {
            for (name, base) in &bases {
                if let Some((status, body)) = readyz(base).await {
                    let p = phase.lock().unwrap().clone();
                    seen.lock().unwrap().push((format!("{p}/{name}"), status, body));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// When the events the instances published (confirmed by the broker), and
/// those applied, grew: read every 100 ms (the instances'
/// `gateway_events_confirmed_total`, the catalog's summed versions).
#[derive(Default)]
pub(super) struct Progress {
    pub(super) published: Vec<Instant>,
    pub(super) applied: Vec<Instant>,
}

pub(super) fn spawn_progress(bases: Vec<String>, db: store::Db, stop: CancellationToken) -> Arc<Mutex<Progress>> {
    let progress = Arc::new(Mutex::new(Progress::default()));
    let p = progress.clone();
    tokio::task::spawn_local(async move {
        let client = awc::Client::builder().timeout(Duration::from_secs(1)).finish();
        // Per instance: a restarted one counts from zero again.
        let (mut confirmed, mut applied) = (vec![0.0; bases.len()], 0);
        while !stop.is_cancelled() {
            let mut grew = false;
            for (base, last) in bases.iter().zip(confirmed.iter_mut()) {
                if let Ok(mut res) = client.get(format!("{base}/metrics")).send().await
                    && let Ok(body) = res.body().limit(8 << 20).await
                {
                    let now = crate::metric_value(&String::from_utf8_lossy(&body), "gateway_events_confirmed", "");
                    grew |= now > *last;
                    *last = now;
                }
            }
            let now_applied = applied_sum(&db).await;
            let at = Instant::now();
            {
                let mut p = p.lock().unwrap();
                if grew {
                    p.published.push(at);
                }
                if now_applied > applied {
                    p.applied.push(at);
                }
            }
            applied = applied.max(now_applied);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    progress
}

/// A client that began with a snapshot of every product: what it held,
/// where its updates resume, and the updates it saw after.
pub(super) struct SnapshotRun {
    pub(super) instance: &'static str,
    pub(super) snapshot: State,
    pub(super) from: u64,
    pub(super) seen: Vec<Seen>,
}

#[derive(Default)]
pub(super) struct SnapshotRounds {
    pub(super) runs: Vec<SnapshotRun>,
    /// Clients that got no snapshot, with why.
    pub(super) failed: Vec<String>,
    /// Instances still running a client.
    pub(super) running: usize,
}

/// Until `stop`: on each instance, one fresh WebSocket client at a time
/// subscribes to every product with a snapshot and reads its updates for
/// `watch`, then `pause`, then the next.
pub(super) fn spawn_snapshot_rounds(
    bases: [(&'static str, String); 2],
    watch: Duration,
    pause: Duration,
    stop: CancellationToken,
) -> Arc<Mutex<SnapshotRounds>> {
    let rounds = Arc::new(Mutex::new(SnapshotRounds {
        running: bases.len(),
        ..Default::default()
    }));
    for (instance, base) in bases {
        let (rounds, stop) = (rounds.clone(), stop.clone());
        tokio::task::spawn_local(async move {
            while !stop.is_cancelled() {
                let run = snapshot_run(instance, &base, watch).await;
                match run {
                    Ok(run) => rounds.lock().unwrap().runs.push(run),
                    Err(why) => rounds.lock().unwrap().failed.push(format!("{instance}: {why}")),
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            rounds.lock().unwrap().running -= 1;
        });
    }
    rounds
}

async fn snapshot_run(instance: &'static str, base: &str, watch: Duration) -> Result<SnapshotRun, String> {
    let mut c = WsClient::try_connect(base).await.ok_or("could not connect")?;
    c.send(serde_json::json!({"op": "subscribe", "topics": ["product.#"], "snapshot": true}))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut gathered = crate::clients::Snapshot::default();
    let whole = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next(left).await {
            Some(WsEvent::Json(v)) if v["type"] == "snapshot" || v["type"] == "snapshot_end" => {
                if let Some(done) = gathered.take(&v) {
                    break done;
                }
            }
            Some(WsEvent::Json(v)) if v["type"] == "error" || v["type"] == "reset" => return Err(v.to_string()),
            Some(WsEvent::Json(_)) => {}
            Some(WsEvent::Closed(code)) => return Err(format!("closed ({code:?}) before the snapshot's end")),
            None => return Err("no snapshot within 30 s".to_owned()),
        }
    };
    let mut snapshot = State::new();
    for p in whole["products"].as_array().into_iter().flatten() {
        let (id, g) = (p["product_id"].as_i64().unwrap_or(0), |k: &str| {
            p[k].as_i64().unwrap_or(0)
        });
        snapshot.insert((id, "price".to_owned()), (g("price_cents"), g("price_version")));
        snapshot.insert((id, "stock".to_owned()), (g("stock"), g("stock_version")));
    }
    let from = whole["offset"].as_u64().ok_or("a snapshot_end without an offset")?;
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + watch;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match c.next(left).await {
            Some(WsEvent::Json(v)) if v["type"] == "update" => {
                let offset = v["offset"].as_u64().unwrap_or(0);
                if let Some(s) = Seen::from_data(offset, v["topic"].as_str().unwrap_or(""), &v["data"]) {
                    seen.push(s);
                }
            }
            Some(WsEvent::Json(v)) if v["type"] == "reset" => return Err(format!("reset after the snapshot: {v}")),
            Some(WsEvent::Closed(code)) => return Err(format!("closed ({code:?}) after the snapshot")),
            _ => {}
        }
    }
    Ok(SnapshotRun {
        instance,
        snapshot,
        from,
        seen,
    })
}
