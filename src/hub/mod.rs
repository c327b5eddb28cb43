//! The hub: one task owns the registry of connected clients and the recent
//! history. Each update from the stream is matched against every client's
//! topic patterns and its shared frame pushed to their buffers, which never
//! waits on a socket.

pub mod client;
pub mod feed;
pub mod history;
pub mod index;
pub mod pattern;
pub mod session;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::client::ClientQueue;
use self::history::{History, Replay};
use self::pattern::Pattern;
use crate::metrics::Metrics;
use crate::settings::HubSettings;
use crate::update::{Update, UpdateSink};

/// Where a resuming client's missed updates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    /// First offset to read from the stream.
    pub from: u64,
    /// Offset from which the hub's own history (already queued) takes over;
    /// None when the hub has no history yet.
    pub until: Option<u64>,
}

#[derive(Debug)]
pub struct Subscribed {
    /// Offset of the newest update the hub had seen when subscribing.
    pub last_offset: Option<u64>,
    /// Offset of the first update the hub ever saw: live delivery covers
    /// everything from there on.
    pub origin: Option<u64>,
    pub catch_up: Option<CatchUp>,
    /// What the hub's memory holds after `since`, for the client to filter
    /// and replay (before its live updates, which start after `last_offset`).
    pub replay: Replay,
}

enum Command {
    Update(Arc<Update>),
    Subscribe {
        id: u64,
        queue: Arc<ClientQueue>,
        patterns: Vec<Pattern>,
        since: Option<u64>,
        reply: oneshot::Sender<Subscribed>,
    },
    Unsubscribe {
        id: u64,
        patterns: Vec<String>,
    },
}

/// Cheap to clone; the way every other part reaches the hub.
#[derive(Clone)]
pub struct HubHandle {
    tx: mpsc::Sender<Command>,
    /// Unbounded so that leaving never waits and works from any `Drop`.
    leave_tx: mpsc::UnboundedSender<u64>,
    next_id: Arc<AtomicU64>,
    connections: Arc<AtomicUsize>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    settings: Arc<HubSettings>,
    metrics: Arc<Metrics>,
}

/// Counts a connection for as long as it lives.
pub struct ConnectionSlot {
    connections: Arc<AtomicUsize>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.connections.fetch_sub(1, Ordering::SeqCst);
        if let Some(ip) = self.ip {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This instance is at `max_connections`.
    Instance,
    /// The client address is at `max_connections_per_ip`.
    PerIp,
}

impl Refused {
    /// The `reason` label of `clients_refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Instance => "connection_limit",
            Refused::PerIp => "per_ip_limit",
        }
    }
}

impl HubHandle {
    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A slot for one more connection from `ip`, unless a limit is reached.
    pub fn connect(&self, ip: Option<IpAddr>) -> Result<ConnectionSlot, Refused> {
        let max = self.settings.max_connections;
        self.connections
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .map_err(|_| Refused::Instance)?;
        let mut slot = ConnectionSlot {
            connections: self.connections.clone(),
            per_ip: self.per_ip.clone(),
            ip: None,
        };
        let Some(ip) = ip else { return Ok(slot) };
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.settings.max_connections_per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        slot.ip = Some(ip);
        Ok(slot)
    }

    pub fn new_client(&self) -> (u64, Arc<ClientQueue>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        (id, ClientQueue::new(self.settings.client_buffer, self.metrics.clone()))
    }

    /// Hands an update from the stream to the hub (waits only if the hub
    /// itself is behind, which slows the stream reader, not clients).
    pub async fn publish(&self, update: Update) -> bool {
        self.tx.send(Command::Update(Arc::new(update))).await.is_ok()
    }

    pub async fn subscribe(
        &self,
        id: u64,
        queue: &Arc<ClientQueue>,
        patterns: Vec<Pattern>,
        since: Option<u64>,
    ) -> Option<Subscribed> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Subscribe {
            id,
            queue: queue.clone(),
            patterns,
            since,
            reply,
        };
        self.tx.send(cmd).await.ok()?;
        rx.await.ok()
    }

    pub async fn unsubscribe(&self, id: u64, patterns: Vec<String>) {
        let _ = self.tx.send(Command::Unsubscribe { id, patterns }).await;
    }

    /// Non-async so it can run from a `Drop`.
    pub fn leave(&self, id: u64) {
        let _ = self.leave_tx.send(id);
    }
}

struct Client {
    queue: Arc<ClientQueue>,
    patterns: Vec<Pattern>,
}

pub fn spawn(
    settings: &HubSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> HubHandle {
    let (tx, rx) = mpsc::channel(8192);
    let (leave_tx, leave_rx) = mpsc::unbounded_channel();
    tracker.spawn(run(rx, leave_rx, settings.history.max(1), metrics.clone(), shutdown));
    HubHandle {
        tx,
        leave_tx,
        next_id: Arc::new(AtomicU64::new(1)),
        connections: Arc::new(AtomicUsize::new(0)),
        per_ip: Arc::new(Mutex::new(HashMap::new())),
        settings: Arc::new(settings.clone()),
        metrics,
    }
}

async fn run(
    mut rx: mpsc::Receiver<Command>,
    mut leave_rx: mpsc::UnboundedReceiver<u64>,
    history_cap: usize,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut clients: HashMap<u64, Client> = HashMap::new();
    let mut history = History::new(history_cap);
    loop {
        let cmd = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(id) = leave_rx.recv() => {
                if let Some(client) = clients.remove(&id) {
                    metrics.subscriptions.dec_by(client.patterns.len() as i64);
                    client.queue.close();
                }
                continue;
            }
            c = rx.recv() => match c { Some(c) => c, None => break },
        };
        match cmd {
            Command::Update(u) => {
                metrics.stream_updates.inc();
                // The topic is split once; each pattern matches the words.
                let words: Vec<&str> = u.topic.split('.').collect();
                for client in clients.values() {
                    if client.patterns.iter().any(|p| p.matches_words(&words)) {
                        client.queue.push(u.clone());
                    }
                }
                history.push(u);
            }
            Command::Subscribe {
                id,
                queue,
                patterns,
                since,
                reply,
            } => {
                // A client that left while this was queued is not registered:
                // its `leave` may already have been handled.
                if !queue.is_closed() {
                    let client = clients.entry(id).or_insert_with(|| Client {
                        queue,
                        patterns: Vec::new(),
                    });
                    let mut seen: HashSet<String> = client.patterns.iter().map(|p| p.as_str().to_owned()).collect();
                    let fresh: Vec<Pattern> = patterns
                        .into_iter()
                        .filter(|p| seen.insert(p.as_str().to_owned()))
                        .collect();
                    metrics.subscriptions.inc_by(fresh.len() as i64);
                    client.patterns.extend(fresh);
                }
                let mut catch_up = None;
                let mut replay = Replay::default();
                if let Some(since) = since {
                    // Only the shared chunks are handed over: matching them
                    // against the patterns is the client's work, not the hub's.
                    let front = history.front();
                    replay = history.after(since);
                    let from = since.saturating_add(1);
                    let source = match front {
                        Some(f) if from >= f => "memory",
                        _ => {
                            catch_up = Some(CatchUp { from, until: front });
                            "stream"
                        }
                    };
                    metrics.resumes.get_or_create(&[("source", source)]).inc();
                }
                let _ = reply.send(Subscribed {
                    last_offset: history.back(),
                    origin: history.origin(),
                    catch_up,
                    replay,
                });
            }
            Command::Unsubscribe { id, patterns } => {
                if let Some(client) = clients.get_mut(&id) {
                    let before = client.patterns.len();
                    let gone: HashSet<&str> = patterns.iter().map(String::as_str).collect();
                    client.patterns.retain(|p| !gone.contains(p.as_str()));
                    metrics.subscriptions.dec_by((before - client.patterns.len()) as i64);
                }
            }
        }
    }
    for client in clients.values() {
        client.queue.close();
    }
}

impl UpdateSink for HubHandle {
    async fn publish(&self, update: Update) -> bool {
        HubHandle::publish(self, update).await
    }
}
