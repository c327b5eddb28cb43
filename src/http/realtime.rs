//! What WebSocket and SSE connections share: subscribing with patterns,
//! resume from an offset, snapshots, and the limits that protect the hub.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use super::error::ApiError;
use crate::broker::link::Connector;
use crate::broker::stream;
use crate::domain::Kind;
use crate::hub::feed::{CatchUpFilter, Feed, FeedItem};
use crate::hub::pattern::Pattern;
use crate::hub::{ConnectionSlot, HubHandle, Refused};
use crate::metrics::Metrics;
use crate::settings::HubSettings;
use crate::store::{Db, catalog};

/// An error a client caused; it gets a frame or event with this code.
#[derive(Debug, Clone)]
pub struct ClientError {
    pub code: &'static str,
    pub message: String,
}

impl ClientError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn to_json(&self) -> String {
        json!({ "type": "error", "code": self.code, "message": self.message }).to_string()
    }
}

/// An SSE subscribe answers with the status its code calls for.
impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match e.code {
            "unavailable" => ApiError::Unavailable(e.message),
            "busy" => ApiError::Busy(e.message),
            code => ApiError::BadRequest(format!("{code}: {}", e.message)),
        }
    }
}

/// Bounds the snapshots read and serialised at once: each holds a read
/// connection and a copy of the catalog, so a flood of them would otherwise
/// take every connection and much memory.
#[derive(Clone)]
pub struct SnapshotLimit {
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl SnapshotLimit {
    pub fn new(settings: &HubSettings) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(settings.max_concurrent_snapshots)),
            wait: settings.snapshot_wait,
        }
    }

    /// A turn, released when the permit drops; `busy` after the wait.
    async fn acquire(&self) -> Result<OwnedSemaphorePermit, ClientError> {
        match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ClientError::new("unavailable", "the service is shutting down")),
            Err(_) => Err(ClientError::new(
                "busy",
                "too many snapshots are being served; retry in a moment",
            )),
        }
    }
}

/// One client connection's subscription state.
pub struct Session {
    id: u64,
    hub: HubHandle,
    read_db: Db,
    snapshots: SnapshotLimit,
    connector: Connector,
    stream_name: String,
    feed: Feed,
    patterns: Vec<String>,
    /// Per pattern, the offset after which this connection gets all of its
    /// updates (None: from the first update the hub receives).
    covered: HashMap<String, (Pattern, Option<u64>)>,
    transport: &'static str,
    _slot: ConnectionSlot,
}

impl Session {
    /// The hub's id of this connection, for its log span.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Refused when this instance or this client address is at its limit
    /// (counted).
    pub fn open(state: &AppState, transport: &'static str, ip: Option<IpAddr>) -> Result<Session, Refused> {
        let slot = state.hub.connect(ip).inspect_err(|r| {
            state
                .metrics
                .clients_refused
                .get_or_create(&[("reason", r.reason())])
                .inc();
        })?;
        let (id, queue) = state.hub.new_client();
        state
            .metrics
            .clients_connected
            .get_or_create(&[("transport", transport)])
            .inc();
        Ok(Session {
            id,
            hub: state.hub.clone(),
            read_db: state.read_db.clone(),
            snapshots: state.snapshots.clone(),
            connector: state.connector.clone(),
            stream_name: state.settings.rabbit.topology.updates_stream.clone(),
            feed: Feed::new(queue),
            patterns: Vec::new(),
            covered: HashMap::new(),
            transport,
            _slot: slot,
        })
    }

    pub fn transport(&self) -> &'static str {
        self.transport
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    fn too_many(&self) -> ClientError {
        let max = self.hub.settings().max_subscriptions;
        ClientError::new(
            "too_many_subscriptions",
            format!("at most {max} patterns per connection"),
        )
    }

    /// The requested patterns, each once, and those of them that are new to
    /// this connection.
    fn parse(&self, topics: &[String]) -> Result<(Vec<Pattern>, Vec<Pattern>), ClientError> {
        let settings = self.hub.settings();
        if topics.is_empty() {
            return Err(ClientError::new("bad_pattern", "topics must name at least one pattern"));
        }
        // Counted before anything is parsed: no list this long can fit.
        if topics.len() > settings.max_subscriptions {
            return Err(self.too_many());
        }
        let mut seen = HashSet::with_capacity(topics.len());
        let (mut all, mut new) = (Vec::new(), Vec::new());
        for t in topics {
            if !seen.insert(t.as_str()) {
                continue;
            }
            let p = Pattern::parse(t, settings.max_pattern_words)
                .map_err(|e| ClientError::new("bad_pattern", format!("{:.80}: {e}", t)))?;
            if !self.covered.contains_key(t) {
                new.push(p.clone());
            }
            all.push(p);
        }
        if self.patterns.len() + new.len() > settings.max_subscriptions {
            return Err(self.too_many());
        }
        Ok((all, new))
    }

    /// Subscribes; returns the snapshot frame's JSON when one was asked for.
    /// A snapshot makes `since` unnecessary: it is the state, and only newer
    /// updates follow.
    pub async fn subscribe(
        &mut self,
        topics: &[String],
        since: Option<u64>,
        snapshot: bool,
    ) -> Result<Option<serde_json::Value>, ClientError> {
        let (patterns, fresh) = self.parse(topics)?;
        // Taken before subscribing, so a client told to retry is left as it was.
        let _turn = match snapshot {
            true => Some(self.snapshots.acquire().await?),
            false => None,
        };
        let since = if snapshot { None } else { since };
        let subscribed = self
            .hub
            .subscribe(self.id, self.feed.queue(), fresh.clone(), since)
            .await
            .ok_or_else(|| ClientError::new("unavailable", "the service is shutting down"))?;
        // What the earlier patterns deliver is not replayed again; those
        // subscribed before the hub had anything deliver from its first update.
        let origin = subscribed.origin.map(|o| o.saturating_sub(1));
        let covered: Vec<(Pattern, u64)> = self
            .covered
            .values()
            .filter_map(|(p, after)| Some((p.clone(), after.or(origin)?)))
            .collect();
        let after = since.or(subscribed.last_offset);
        for p in &fresh {
            self.patterns.push(p.as_str().to_owned());
            self.covered.insert(p.as_str().to_owned(), (p.clone(), after));
        }
        if since.is_some() && !fresh.is_empty() {
            let open_ended = subscribed.last_offset.is_none();
            let rx = stream::catch_up(
                self.connector.clone(),
                self.stream_name.clone(),
                self.hub.settings().stream_prefetch,
                subscribed.catch_up,
                subscribed.replay,
                CatchUpFilter { fresh, covered },
            );
            self.feed.start_catch_up(rx, open_ended);
        }
        if !snapshot {
            return Ok(None);
        }
        // Registered first, read second: anything committed after the read
        // is queued, anything before it is in the snapshot and skipped.
        let products = catalog::all(&self.read_db).await.map_err(|e| {
            tracing::warn!(error = %e, "snapshot read failed");
            ClientError::new("unavailable", "snapshots are unavailable; retry in a moment")
        })?;
        let mut rows = Vec::new();
        for p in products {
            let mut matched = false;
            for kind in Kind::ALL {
                let topic = format!("product.{}.{}", kind.as_str(), p.id);
                if patterns.iter().any(|pat| pat.matches(&topic)) {
                    let version = match kind {
                        Kind::Price => p.price_version,
                        Kind::Stock => p.stock_version,
                    };
                    self.feed.snapshot_has(p.id, kind, version);
                    matched = true;
                }
            }
            if matched {
                rows.push(p);
            }
        }
        Ok(Some(
            json!({ "type": "snapshot", "products": rows, "offset": subscribed.last_offset }),
        ))
    }

    pub async fn unsubscribe(&mut self, topics: &[String]) -> Result<(), ClientError> {
        // A connection never has more patterns than this to take back.
        if topics.len() > self.hub.settings().max_subscriptions {
            return Err(self.too_many());
        }
        let gone: HashSet<&str> = topics.iter().map(String::as_str).collect();
        self.patterns.retain(|p| !gone.contains(p.as_str()));
        self.covered.retain(|p, _| !gone.contains(p.as_str()));
        self.hub.unsubscribe(self.id, topics.to_vec()).await;
        Ok(())
    }

    /// Next items to send; false when the hub has let go (shutdown).
    pub async fn next(&mut self, out: &mut Vec<FeedItem>) -> bool {
        self.feed.next(out).await
    }

    /// Counts a hand-off and its end-to-end latency.
    pub fn delivered(&self, ts_us: i64) {
        count_delivery(self.hub.metrics(), self.transport, ts_us);
    }
}

/// Counts a hand-off and its end-to-end latency.
pub fn count_delivery(m: &Metrics, transport: &'static str, ts_us: i64) {
    m.updates_delivered.get_or_create(&[("transport", transport)]).inc();
    if ts_us > 0 {
        let latency = (crate::domain::now_us() - ts_us).max(0) as f64 / 1e6;
        m.e2e_latency.observe(latency);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closed first: a subscribe of this client still queued in the hub
        // then registers nothing, whether or not `leave` overtakes it.
        self.feed.queue().close();
        self.hub.leave(self.id);
        self.hub
            .metrics()
            .clients_connected
            .get_or_create(&[("transport", self.transport)])
            .dec();
    }
}

pub fn reset_json(offset: u64) -> serde_json::Value {
    json!({ "type": "reset", "offset": offset, "reason": "offset_expired",
            "message": "the requested offset is older than the stream keeps; updates resume from `offset`" })
}
