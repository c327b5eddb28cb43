//! The hub: the registry of connected clients and the recent history,
//! split into shards, one task each, so fan-out runs on every core. A client
//! lives in one shard (by its id), so its updates keep their order. Every
//! shard sees every update, in stream order, and keeps its own history (of
//! shared updates), so a subscription is registered and its history read in
//! one step of one task, as with a single hub. Within a shard a
//! subscription index finds the clients an update matches at a cost that
//! grows with them, not with every connected client; the shared frame is
//! pushed to their buffers, which never waits on a socket.

pub(crate) mod client;
pub(crate) mod feed;
pub(crate) mod history;
pub(crate) mod index;
pub mod pattern;
pub(crate) mod scope;
pub mod session;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::client::{ClientQueue, QueueLimits};
use self::history::{History, Replay};
use self::index::SubscriptionIndex;
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
    /// The updates of one stream message, in offset order.
    Updates(Arc<[Arc<Update>]>),
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
    shards: Arc<[Shard]>,
    /// Since when `publish` has waited for a full shard, in milliseconds
    /// after `epoch` plus one; 0 while it is not waiting.
    blocked_since: Arc<AtomicU64>,
    epoch: std::time::Instant,
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

/// How the rest of the service reaches one shard's task.
struct Shard {
    tx: mpsc::Sender<Command>,
    /// Unbounded so that leaving never waits and works from any `Drop`.
    leave_tx: mpsc::UnboundedSender<u64>,
}

impl HubHandle {
    fn shard(&self, client: u64) -> &Shard {
        &self.shards[(client % self.shards.len() as u64) as usize]
    }

    /// Shards the clients are spread over.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

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
        let limits = QueueLimits {
            entries: self.settings.client_buffer,
            bytes: self.settings.client_buffer_bytes,
            stall: self.settings.client_timeout,
        };
        (id, ClientQueue::new(limits, self.metrics.clone()))
    }

    /// Hands the updates of one stream message to every shard (waits only
    /// if a shard itself is behind, which slows the stream reader, not
    /// clients).
    pub async fn publish(&self, updates: Vec<Update>) -> bool {
        if updates.is_empty() {
            return true;
        }
        let updates: Arc<[Arc<Update>]> = updates.into_iter().map(Arc::new).collect();
        let mut blocked = false;
        for shard in self.shards.iter() {
            let cmd = match shard.tx.try_send(Command::Updates(updates.clone())) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(cmd)) => cmd,
            };
            if !blocked {
                blocked = true;
                let since = self.epoch.elapsed().as_millis() as u64 + 1;
                let _ = self
                    .blocked_since
                    .compare_exchange(0, since, Ordering::SeqCst, Ordering::SeqCst);
            }
            if shard.tx.send(cmd).await.is_err() {
                return false;
            }
        }
        if blocked {
            self.blocked_since.store(0, Ordering::SeqCst);
        }
        true
    }

    /// Whether the hub keeps up: the stream reader has not waited on a
    /// full shard for `max_wait`, and no shard's backlog is nearly full.
    /// Readiness turns on it.
    pub fn keeps_up(&self, max_wait: std::time::Duration) -> bool {
        let since = self.blocked_since.load(Ordering::SeqCst);
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let waited = std::time::Duration::from_millis(now.saturating_sub(since));
        let blocked = since > 0 && waited >= max_wait;
        !blocked && self.shards.iter().all(|s| s.tx.capacity() >= SHARD_BACKLOG / 10)
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
        self.shard(id).tx.send(cmd).await.ok()?;
        rx.await.ok()
    }

    pub async fn unsubscribe(&self, id: u64, patterns: Vec<String>) {
        let _ = self.shard(id).tx.send(Command::Unsubscribe { id, patterns }).await;
    }

    /// Non-async so it can run from a `Drop`.
    pub fn leave(&self, id: u64) {
        let _ = self.shard(id).leave_tx.send(id);
    }
}

/// Stream messages a shard may have waiting before the stream reader waits.
const SHARD_BACKLOG: usize = 8192;

/// `hub.shards`, with 0 meaning one per core.
fn shard_count(settings: &HubSettings) -> usize {
    match settings.shards {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

pub fn spawn(
    settings: &HubSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> HubHandle {
    let shards: Arc<[Shard]> = (0..shard_count(settings))
        .map(|n| {
            let (tx, rx) = mpsc::channel(SHARD_BACKLOG);
            let (leave_tx, leave_rx) = mpsc::unbounded_channel();
            let task = ShardTask {
                clients: HashMap::new(),
                index: SubscriptionIndex::new(),
                history: History::new(settings.history.max(1)),
                // One shard counts what every shard sees.
                counts_stream: n == 0,
                metrics: metrics.clone(),
            };
            tracker.spawn(task.run(rx, leave_rx, shutdown.clone()));
            Shard { tx, leave_tx }
        })
        .collect();
    HubHandle {
        shards,
        blocked_since: Arc::new(AtomicU64::new(0)),
        epoch: std::time::Instant::now(),
        next_id: Arc::new(AtomicU64::new(1)),
        connections: Arc::new(AtomicUsize::new(0)),
        per_ip: Arc::new(Mutex::new(HashMap::new())),
        settings: Arc::new(settings.clone()),
        metrics,
    }
}

/// One shard: its clients, their subscriptions, and the history.
struct ShardTask {
    clients: HashMap<u64, Arc<ClientQueue>>,
    index: SubscriptionIndex<u64>,
    history: History,
    counts_stream: bool,
    metrics: Arc<Metrics>,
}

impl ShardTask {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut leave_rx: mpsc::UnboundedReceiver<u64>,
        shutdown: CancellationToken,
    ) {
        loop {
            let cmd = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(id) = leave_rx.recv() => {
                    self.leave(id);
                    continue;
                }
                c = rx.recv() => match c { Some(c) => c, None => break },
            };
            match cmd {
                Command::Updates(updates) => self.fan_out(&updates),
                Command::Subscribe {
                    id,
                    queue,
                    patterns,
                    since,
                    reply,
                } => {
                    let subscribed = self.subscribe(id, queue, patterns, since);
                    let _ = reply.send(subscribed);
                }
                Command::Unsubscribe { id, patterns } => {
                    let removed = patterns.iter().filter(|p| self.index.remove(id, p)).count();
                    self.metrics.subscriptions.dec_by(removed as i64);
                }
            }
        }
        for queue in self.clients.values() {
            queue.close();
        }
    }

    fn fan_out(&mut self, updates: &[Arc<Update>]) {
        let Self {
            clients,
            index,
            history,
            ..
        } = self;
        for u in updates {
            index.for_each_match(&u.topic, |id| {
                if let Some(queue) = clients.get(&id) {
                    queue.push(u.clone());
                }
            });
            history.push(u.clone());
        }
        if self.counts_stream {
            self.metrics.stream_updates.inc_by(updates.len() as u64);
        }
    }

    fn leave(&mut self, id: u64) {
        if let Some(queue) = self.clients.remove(&id) {
            let removed = self.index.remove_client(id);
            self.metrics.subscriptions.dec_by(removed as i64);
            queue.close();
        }
    }

    fn subscribe(
        &mut self,
        id: u64,
        queue: Arc<ClientQueue>,
        patterns: Vec<Pattern>,
        since: Option<u64>,
    ) -> Subscribed {
        // A client that left while this was queued is not registered: its
        // `leave` may already have been handled.
        if !queue.is_closed() {
            self.clients.entry(id).or_insert(queue);
            let fresh = patterns.iter().filter(|p| self.index.insert(id, p)).count();
            self.metrics.subscriptions.inc_by(fresh as i64);
        }
        let history = &self.history;
        let mut catch_up = None;
        let mut replay = Replay::default();
        if let Some(since) = since {
            // Only the shared chunks are handed over: matching them against
            // the patterns is the client's work, not the hub's.
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
            self.metrics.resumes.get_or_create(&[("source", source)]).inc();
        }
        Subscribed {
            last_offset: history.back(),
            origin: history.origin(),
            catch_up,
            replay,
        }
    }
}

impl UpdateSink for HubHandle {
    async fn publish(&self, updates: Vec<Update>) -> bool {
        HubHandle::publish(self, updates).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(offset: u64, product: i64) -> Update {
        let body = format!(r#"{{"product_id":{product},"kind":"price","price_cents":1,"version":1,"ts_us":1}}"#);
        Update::from_stream(offset, &format!("product.price.{product}"), body.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn clients_on_every_shard_get_their_updates_once_in_order_with_their_history() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut settings = crate::settings::Settings::load(&dir).unwrap().hub;
        settings.shards = 3;
        let tracker = TaskTracker::new();
        let hub = spawn(&settings, Metrics::new(), CancellationToken::new(), &tracker);
        assert_eq!(hub.shard_count(), 3);
        // Updates 0..50 before anyone subscribes: the history.
        let early: Vec<Update> = (0..50).map(|o| update(o, (o % 5) as i64 + 1)).collect();
        assert!(hub.publish(early).await);
        let mut clients = Vec::new();
        for product in 1..=12i64 {
            let (id, queue) = hub.new_client();
            let pattern = Pattern::parse(&format!("product.*.{}", product % 5 + 1), 32).unwrap();
            let subscribed = hub.subscribe(id, &queue, vec![pattern], Some(9)).await.unwrap();
            let replayed: Vec<u64> = subscribed
                .replay
                .iter()
                .filter(|u| u.product_id == product % 5 + 1)
                .map(|u| u.offset)
                .collect();
            clients.push((product % 5 + 1, queue, replayed));
        }
        for chunk in (50..200u64).collect::<Vec<_>>().chunks(7) {
            assert!(
                hub.publish(chunk.iter().map(|&o| update(o, (o % 5) as i64 + 1)).collect())
                    .await
            );
        }
        for (product, queue, replayed) in clients {
            let mut live = Vec::new();
            while live.last().is_none_or(|&o| o < 195) {
                let mut out = Vec::new();
                queue.drain_into(&mut out).await;
                live.extend(out.iter().map(|u| u.offset));
            }
            let mut seen = replayed;
            seen.extend(live);
            let want: Vec<u64> = (10..200).filter(|o| (o % 5) as i64 + 1 == product).collect();
            assert_eq!(seen, want, "product {product}: history then live, each once, in order");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hub_whose_shard_cannot_keep_up_says_so_until_it_has_caught_up() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut settings = crate::settings::Settings::load(&dir).unwrap().hub;
        settings.shards = 1;
        let hub = spawn(&settings, Metrics::new(), CancellationToken::new(), &TaskTracker::new());
        let (id, queue) = hub.new_client();
        let every = Pattern::parse("#", 32).unwrap();
        hub.subscribe(id, &queue, vec![every], None).await.unwrap();
        let wait = std::time::Duration::from_millis(200);
        assert!(hub.keeps_up(wait));
        // The shard's one client stuck for two seconds: its backlog fills.
        let held = queue.clone();
        let holder =
            std::thread::spawn(move || held.while_held(|| std::thread::sleep(std::time::Duration::from_secs(2))));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                for o in 0..SHARD_BACKLOG as u64 + 100 {
                    assert!(hub.publish(vec![update(o, 1)]).await);
                }
            })
        };
        let started = std::time::Instant::now();
        while hub.keeps_up(wait) {
            assert!(
                started.elapsed() < std::time::Duration::from_millis(1500),
                "never said it was behind"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        holder.join().unwrap();
        publisher.await.unwrap();
        let started = std::time::Instant::now();
        while !hub.keeps_up(wait) {
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "never caught up");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
