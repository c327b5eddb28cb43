//! One realtime connection, whatever its transport: subscribing with
//! patterns, resume from an offset (stream catch-up and the hub's memory),
//! snapshots, and the limits that protect the hub. `http::ws` and
//! `http::sse` only translate frames and events into calls on a [`Session`].

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::client::Ended;
use super::feed::{CatchUpFilter, Feed, FeedItem, StartCatchUp};
use super::history::Replay;
use super::pattern::Pattern;
use super::scope::Grant;
use super::{CatchUp, ConnectionSlot, HubHandle, Refused};
use crate::broker::stream::CatchUpReader;
use crate::domain::Kind;
use crate::metrics::Metrics;
use crate::settings::HubSettings;
use crate::store::{Db, catalog};
use crate::turns::{AddressTurn, PerAddress};
use crate::update::{CatchUpItem, ResetReason};

/// How a client is connected; also the `transport` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// What a client did wrong (or why it must retry); the `code` of its
/// error frame or event, and the `code` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientErrorCode {
    BadJson,
    BadFrame,
    UnknownOp,
    BadPattern,
    TooManySubscriptions,
    RateLimited,
    BinaryNotSupported,
    Busy,
    Unavailable,
    /// A pattern outside the connection's grant.
    Forbidden,
    /// A token that does not verify.
    Unauthorized,
    TokenExpired,
    /// The client fell too far behind and was cut off; it resumes from its
    /// last offset when it reconnects.
    SlowConsumer,
}

impl ClientErrorCode {
    /// Every code, as the protocol's schema lists them.
    pub const ALL: [ClientErrorCode; 13] = [
        ClientErrorCode::BadJson,
        ClientErrorCode::BadFrame,
        ClientErrorCode::UnknownOp,
        ClientErrorCode::BadPattern,
        ClientErrorCode::TooManySubscriptions,
        ClientErrorCode::RateLimited,
        ClientErrorCode::BinaryNotSupported,
        ClientErrorCode::Busy,
        ClientErrorCode::Unavailable,
        ClientErrorCode::Forbidden,
        ClientErrorCode::Unauthorized,
        ClientErrorCode::TokenExpired,
        ClientErrorCode::SlowConsumer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientErrorCode::BadJson => "bad_json",
            ClientErrorCode::BadFrame => "bad_frame",
            ClientErrorCode::UnknownOp => "unknown_op",
            ClientErrorCode::BadPattern => "bad_pattern",
            ClientErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ClientErrorCode::RateLimited => "rate_limited",
            ClientErrorCode::BinaryNotSupported => "binary_not_supported",
            ClientErrorCode::Busy => "busy",
            ClientErrorCode::Unavailable => "unavailable",
            ClientErrorCode::Forbidden => "forbidden",
            ClientErrorCode::Unauthorized => "unauthorized",
            ClientErrorCode::TokenExpired => "token_expired",
            ClientErrorCode::SlowConsumer => "slow_consumer",
        }
    }
}

/// An error a client caused; it gets a frame or event with this code.
#[derive(Debug, Clone)]
pub struct ClientError {
    pub code: ClientErrorCode,
    pub message: String,
    /// When to ask again, for a refusal that is only for now (`busy`,
    /// `unavailable`): the frame's `retry_ms`.
    pub retry: Option<Duration>,
}

impl ClientError {
    pub fn new(code: ClientErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry: None,
        }
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry = Some(after);
        self
    }

    pub fn to_json(&self) -> String {
        let mut v = json!({ "type": "error", "code": self.code.as_str(), "message": self.message });
        if let Some(retry) = self.retry {
            v["retry_ms"] = json!(retry.as_millis() as u64);
        }
        v.to_string()
    }
}

/// Why a connected client was cut off; the `reason` label of
/// `clients_refused`, beside the hub's [`Refused`] at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    FrameTooLarge,
    ProtocolError,
    TooManyErrors,
    HeartbeatTimeout,
}

impl Dropped {
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::FrameTooLarge => "frame_too_large",
            Dropped::ProtocolError => "protocol_error",
            Dropped::TooManyErrors => "too_many_errors",
            Dropped::HeartbeatTimeout => "heartbeat_timeout",
        }
    }
}

/// What every session shares: the hub, the snapshot source and the
/// stream's catch-up reader.
#[derive(Clone)]
pub struct Realtime {
    pub hub: HubHandle,
    /// Pool of client reads, for snapshots.
    pub read_db: Db,
    pub snapshots: SnapshotLimit,
    /// Reads the stream back for resumes older than the hub's memory.
    pub catch_up: CatchUpReader,
}

/// Bounds the snapshots read and serialised at once: each holds a read
/// connection and a copy of the catalog, so a flood of them would otherwise
/// take every connection and much memory. One client address holds only a
/// few of them.
#[derive(Clone)]
pub struct SnapshotLimit {
    permits: Arc<Semaphore>,
    per_address: Arc<PerAddress>,
    wait: Duration,
}

/// A snapshot's turn: the instance's and its address's, given back together.
struct SnapshotTurn {
    _instance: OwnedSemaphorePermit,
    _address: Option<AddressTurn>,
}

impl SnapshotLimit {
    pub fn new(settings: &HubSettings) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(settings.max_concurrent_snapshots)),
            per_address: PerAddress::new(settings.max_snapshots_per_ip),
            wait: settings.snapshot_wait,
        }
    }

    /// A turn for a client at `ip`, released when dropped; `busy` after the
    /// wait, with when to come back.
    async fn acquire(&self, ip: Option<IpAddr>) -> Result<SnapshotTurn, ClientError> {
        let busy = || {
            ClientError::new(
                ClientErrorCode::Busy,
                "too many snapshots are being served; retry in a moment",
            )
            .retry_after(self.wait)
        };
        let deadline = tokio::time::Instant::now() + self.wait;
        let address = self.per_address.take(ip, deadline).await.ok_or_else(busy)?;
        match tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(SnapshotTurn {
                _instance: permit,
                _address: address,
            }),
            Ok(Err(_)) => Err(ClientError::new(
                ClientErrorCode::Unavailable,
                "the service is shutting down",
            )),
            Err(_) => Err(busy()),
        }
    }
}

/// Catch-ups one connection may have queued or running: each pins the
/// history it replays.
const MAX_CATCH_UPS_QUEUED: usize = 4;

/// One client connection's subscription state.
pub struct Session {
    id: u64,
    hub: HubHandle,
    read_db: Db,
    snapshots: SnapshotLimit,
    catch_up: CatchUpReader,
    feed: Feed,
    /// The connection's patterns in the order subscribed, each with the
    /// offset after which it gets all of their updates (None: from the
    /// first update the hub receives). A list: a connection has a few
    /// patterns, and every idle connection would carry a map's table.
    covered: Vec<(Pattern, Option<u64>)>,
    /// What this connection may subscribe to, and until when.
    grant: Grant,
    transport: Transport,
    /// The client's address (forwarded, behind trusted proxies): how many
    /// snapshot and catch-up turns it holds is capped.
    ip: Option<IpAddr>,
    _slot: ConnectionSlot,
}

impl Session {
    /// The hub's id of this connection, for its log span.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Refused when this instance or this client address is at its limit
    /// (counted).
    pub fn open(rt: Realtime, transport: Transport, ip: Option<IpAddr>, grant: Grant) -> Result<Session, Refused> {
        let metrics = rt.hub.metrics().clone();
        let slot = rt.hub.connect(ip).inspect_err(|r| {
            metrics.clients_refused.get_or_create(&[("reason", r.as_str())]).inc();
        })?;
        let (id, queue) = rt.hub.new_client();
        metrics
            .clients_connected
            .get_or_create(&[("transport", transport.as_str())])
            .inc();
        Ok(Session {
            id,
            hub: rt.hub,
            read_db: rt.read_db,
            snapshots: rt.snapshots,
            catch_up: rt.catch_up,
            feed: Feed::new(queue),
            covered: Vec::new(),
            grant,
            transport,
            ip,
            _slot: slot,
        })
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn patterns(&self) -> Vec<&str> {
        self.covered.iter().map(|(p, _)| p.as_str()).collect()
    }

    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// Replaces the grant (a refreshed token). Refused, the old one kept,
    /// when it does not cover every pattern already subscribed: the client
    /// unsubscribes those first.
    pub fn authorize(&mut self, grant: Grant) -> Result<(), ClientError> {
        let mut budget = super::scope::CHECK_BUDGET;
        if let Some((p, _)) = self
            .covered
            .iter()
            .find(|(p, _)| !grant.scope.allows_within(p, &mut budget))
        {
            return Err(forbidden(p, "the new token does not cover it; unsubscribe it first"));
        }
        self.grant = grant;
        Ok(())
    }

    fn too_many(&self) -> ClientError {
        let max = self.hub.settings().max_subscriptions;
        ClientError::new(
            ClientErrorCode::TooManySubscriptions,
            format!("at most {max} patterns per connection"),
        )
    }

    /// The requested patterns, each once, and those of them that are new to
    /// this connection.
    fn parse(&self, topics: &[String]) -> Result<(Vec<Pattern>, Vec<Pattern>), ClientError> {
        let settings = self.hub.settings();
        if topics.is_empty() {
            return Err(ClientError::new(
                ClientErrorCode::BadPattern,
                "topics must name at least one pattern",
            ));
        }
        // Counted before anything is parsed: no list this long can fit.
        if topics.len() > settings.max_subscriptions {
            return Err(self.too_many());
        }
        let mut seen = HashSet::with_capacity(topics.len());
        let subscribed: HashSet<&str> = self.covered.iter().map(|(p, _)| p.as_str()).collect();
        let (mut all, mut new) = (Vec::new(), Vec::new());
        let mut budget = super::scope::CHECK_BUDGET;
        for t in topics {
            if !seen.insert(t.as_str()) {
                continue;
            }
            let p = Pattern::parse(t, settings.max_pattern_words)
                .map_err(|e| ClientError::new(ClientErrorCode::BadPattern, format!("{:.80}: {e}", t)))?;
            // One budget for the whole frame: no list of patterns can make
            // the check expensive.
            if !self.grant.scope.allows_within(&p, &mut budget) {
                let why = match budget {
                    0 => "too costly to check against this connection's grant",
                    _ => "not granted to this connection",
                };
                return Err(forbidden(&p, why));
            }
            if !subscribed.contains(t.as_str()) {
                new.push(p.clone());
            }
            all.push(p);
        }
        if self.covered.len() + new.len() > settings.max_subscriptions {
            return Err(self.too_many());
        }
        Ok((all, new))
    }

    /// Subscribes; when a snapshot was asked for, returns its frames as
    /// they are read. A snapshot makes `since` unnecessary: it is the state,
    /// and only newer updates follow.
    pub async fn subscribe(
        &mut self,
        topics: &[String],
        since: Option<u64>,
        snapshot: bool,
    ) -> Result<Option<SnapshotFrames>, ClientError> {
        let (patterns, fresh) = self.parse(topics)?;
        let since = if snapshot { None } else { since };
        if since.is_some() && !fresh.is_empty() && self.feed.catch_ups() >= MAX_CATCH_UPS_QUEUED {
            return Err(ClientError::new(
                ClientErrorCode::Busy,
                "earlier resumes are still being replayed on this connection; ask again after them",
            )
            .retry_after(Duration::from_secs(1)));
        }
        // Taken before subscribing, so a client told to retry is left as it was.
        let turn = match snapshot {
            true => Some(self.snapshots.acquire(self.ip).await?),
            false => None,
        };
        let subscribed = self
            .hub
            .subscribe(self.id, self.feed.queue(), fresh.clone(), since)
            .await
            .ok_or_else(|| ClientError::new(ClientErrorCode::Unavailable, "the service is shutting down"))?;
        // What the earlier patterns deliver is not replayed again; those
        // subscribed before the hub had anything deliver from its first update.
        let origin = subscribed.origin.map(|o| o.saturating_sub(1));
        let covered: Vec<(Pattern, u64)> = self
            .covered
            .iter()
            .filter_map(|(p, after)| Some((p.clone(), after.or(origin)?)))
            .collect();
        let after = since.or(subscribed.last_offset);
        for p in &fresh {
            self.covered.push((p.clone(), after));
        }
        if since.is_some() && !fresh.is_empty() {
            let open_ended = subscribed.last_offset.is_none();
            let start = catch_up(
                self.catch_up.clone(),
                subscribed.catch_up,
                subscribed.replay,
                CatchUpFilter::new(&fresh, &covered),
                self.ip,
                self.hub.settings().catch_up_stall,
            );
            self.feed
                .start_catch_up(start, open_ended, subscribed.last_offset.map(|o| o + 1));
        }
        let Some(turn) = turn else { return Ok(None) };
        // Registered first, read second: an update committed after the
        // read's snapshot is queued, one the snapshot sees is skipped.
        let read = catalog::SnapshotRead::begin(&self.read_db, named_products(&patterns))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "snapshot read failed");
                snapshot_unavailable()
            })?;
        self.feed.snapshot_sees(&patterns, read.visibility().clone());
        Ok(Some(stream_snapshot(SnapshotStream {
            read,
            patterns,
            offset: subscribed.last_offset,
            part_size: self.hub.settings().snapshot_part_products,
            metrics: self.hub.metrics().clone(),
            stall: self.hub.settings().snapshot_stall,
            _turn: turn,
        })))
    }

    pub async fn unsubscribe(&mut self, topics: &[String]) -> Result<(), ClientError> {
        // A connection never has more patterns than this to take back.
        if topics.len() > self.hub.settings().max_subscriptions {
            return Err(self.too_many());
        }
        let gone: HashSet<&str> = topics.iter().map(String::as_str).collect();
        self.covered.retain(|(p, _)| !gone.contains(p.as_str()));
        self.feed.forget_snapshots(topics);
        self.hub.unsubscribe(self.id, topics.to_vec()).await;
        Ok(())
    }

    /// Next items to send; false when the hub has let go (shutdown, or the
    /// client cut off: see [`Session::ended`]).
    pub async fn next(&mut self, out: &mut Vec<FeedItem>) -> bool {
        self.feed.next(out).await
    }

    /// Why the hub let go of this connection, once `next` said it had.
    pub fn ended(&self) -> Ended {
        self.feed.queue().ended().unwrap_or(Ended::Closed)
    }

    /// Whether the hub has cut this client off as a slow consumer.
    pub fn is_cut_off(&self) -> bool {
        self.feed.queue().ended() == Some(Ended::SlowConsumer)
    }

    /// The transport wrote something to the client: it is not stalled.
    pub fn progressed(&self) {
        self.feed.queue().progressed();
    }

    /// Cuts the client off as a slow consumer (its frames made no
    /// progress); counted once, however it was found out.
    pub fn cut_off(&self) {
        self.feed.queue().cut_off();
    }

    /// Counts a hand-off and its end-to-end latency.
    pub fn delivered(&self, ts_us: i64) {
        count_delivery(self.hub.metrics(), self.transport, ts_us);
    }
}

/// Counts a hand-off and its end-to-end latency.
pub fn count_delivery(m: &Metrics, transport: Transport, ts_us: i64) {
    m.updates_delivered
        .get_or_create(&[("transport", transport.as_str())])
        .inc();
    crate::metrics::observe_since(&m.e2e_latency, ts_us);
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
            .get_or_create(&[("transport", self.transport.as_str())])
            .dec();
    }
}

/// Whether any pattern covers the topic of `kind` for product `id`.
fn covers(patterns: &[Pattern], kind: Kind, id: i64) -> bool {
    let topic = format!("product.{}.{id}", kind.as_str());
    patterns.iter().any(|p| p.matches(&topic))
}

/// The products named by patterns of the form `product.<kind or *>.<id>`,
/// or None when any pattern leaves its product open.
fn named_products(patterns: &[Pattern]) -> Option<Vec<i64>> {
    let mut ids = Vec::with_capacity(patterns.len());
    for p in patterns {
        let mut words = p.as_str().split('.');
        let (Some("product"), Some("price" | "stock" | "*"), Some(id), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return None;
        };
        ids.push(id.parse::<i64>().ok().filter(|id| *id > 0)?);
    }
    ids.sort_unstable();
    ids.dedup();
    Some(ids)
}

fn forbidden(p: &Pattern, why: &str) -> ClientError {
    ClientError::new(ClientErrorCode::Forbidden, format!("{:.80}: {why}", p.as_str()))
}

fn snapshot_unavailable() -> ClientError {
    ClientError::new(
        ClientErrorCode::Unavailable,
        "snapshots are unavailable; retry in a moment",
    )
    .retry_after(SNAPSHOT_RETRY)
}

/// When a client whose snapshot was cut short may ask again.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(1);

/// One frame of a snapshot, serialised: a `snapshot` part, or the
/// `snapshot_end` that closes them with the stream offset updates follow.
#[derive(Debug)]
pub struct SnapshotFrame {
    pub json: String,
    /// On `snapshot_end` only: where updates resume (SSE's event id).
    pub end_offset: Option<Option<u64>>,
}

/// A snapshot's frames in order, read a page ahead of the socket. An error
/// ends them: the client is told the snapshot was cut short, also when the
/// reader gave up on a client that took no part for `snapshot_stall`.
pub struct SnapshotFrames {
    rx: mpsc::Receiver<Result<SnapshotFrame, ClientError>>,
    /// The last frame (`snapshot_end` or an error) was taken.
    ended: bool,
}

impl SnapshotFrames {
    /// The next frame; an `unavailable` error when the reader stopped
    /// before the end; None after the last.
    pub async fn next(&mut self) -> Option<Result<SnapshotFrame, ClientError>> {
        if self.ended {
            return None;
        }
        let frame = self.rx.recv().await.unwrap_or_else(|| Err(snapshot_unavailable()));
        self.ended = frame.as_ref().map_or(true, |f| f.end_offset.is_some());
        Some(frame)
    }
}

/// The next frame of the snapshot being sent; never, when none is (a
/// transport's select branch). None once the snapshot has ended.
pub async fn next_snapshot_frame(snapshot: &mut Option<SnapshotFrames>) -> Option<Result<SnapshotFrame, ClientError>> {
    match snapshot {
        Some(frames) => frames.next().await,
        None => std::future::pending().await,
    }
}

/// A snapshot being read: its transaction, its patterns, and its turn among
/// the snapshots that run at once (held until the last frame is taken).
struct SnapshotStream {
    read: catalog::SnapshotRead,
    patterns: Vec<Pattern>,
    offset: Option<u64>,
    part_size: usize,
    metrics: Arc<Metrics>,
    /// How long the client may leave a part untaken.
    stall: Duration,
    _turn: SnapshotTurn,
}

/// Sends one `snapshot` part; false when it cannot go (the receiver left,
/// took nothing for `stall`, or the part does not serialise, which the
/// receiver is then told).
async fn send_part(
    tx: &mpsc::Sender<Result<SnapshotFrame, ClientError>>,
    part: u64,
    products: &[catalog::Product],
    stall: Duration,
) -> bool {
    let part = Part {
        kind: "snapshot",
        part,
        products,
    };
    let frame = serde_json::to_string(&part)
        .map(|json| SnapshotFrame { json, end_offset: None })
        .map_err(|e| {
            tracing::error!(error = %e, "snapshot part not serialisable");
            snapshot_unavailable()
        });
    let ok = frame.is_ok();
    hand(tx, frame, stall).await && ok
}

/// Hands a frame to the snapshot's client: false when it left or took
/// nothing for `stall`.
async fn hand(
    tx: &mpsc::Sender<Result<SnapshotFrame, ClientError>>,
    frame: Result<SnapshotFrame, ClientError>,
    stall: Duration,
) -> bool {
    matches!(tokio::time::timeout(stall, tx.send(frame)).await, Ok(Ok(())))
}

#[derive(serde::Serialize)]
struct Part<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    part: u64,
    products: &'a [catalog::Product],
}

/// Reads the snapshot page by page in a task of its own, each page's rows
/// that the patterns cover becoming a `snapshot` part; at least one part,
/// then `snapshot_end`. One part waits at a time: memory per snapshot stays
/// a page, and a client that stops reading stops the read. A receiver that
/// leaves, or takes no part for `stall`, ends the task: its transaction is
/// rolled back and its turn given back at once.
fn stream_snapshot(s: SnapshotStream) -> SnapshotFrames {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        // The whole of it, turn included: the block would otherwise capture
        // only the fields it uses and give the turn back at once.
        let mut s = s;
        if !send_snapshot(&mut s, &tx).await {
            s.read.abandon().await;
        }
    });
    SnapshotFrames { rx, ended: false }
}

/// Sends every part then the end; false when it stopped before the end.
async fn send_snapshot(s: &mut SnapshotStream, tx: &mpsc::Sender<Result<SnapshotFrame, ClientError>>) -> bool {
    let (mut parts, mut products) = (0u64, 0u64);
    loop {
        let page = match s.read.next_page(s.part_size).await {
            Ok(Some(page)) => page,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, part = parts, "snapshot read failed");
                hand(tx, Err(snapshot_unavailable()), s.stall).await;
                return false;
            }
        };
        s.metrics.snapshot_rows.inc_by(page.len() as u64);
        let rows: Vec<catalog::Product> = page
            .into_iter()
            .filter(|p| Kind::ALL.iter().any(|k| covers(&s.patterns, *k, p.id)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        if !send_part(tx, parts, &rows, s.stall).await {
            return false;
        }
        parts += 1;
        products += rows.len() as u64;
    }
    // Every snapshot has a first part, if empty, so a client can await it.
    if parts == 0 {
        if !send_part(tx, 0, &[], s.stall).await {
            return false;
        }
        parts = 1;
    }
    let end = json!({ "type": "snapshot_end", "parts": parts, "products": products, "offset": s.offset });
    let end = SnapshotFrame {
        json: end.to_string(),
        end_offset: Some(s.offset),
    };
    hand(tx, Ok(end), s.stall).await
}

pub fn reset_json(offset: u64, reason: ResetReason) -> serde_json::Value {
    json!({ "type": "reset", "offset": offset, "reason": reason.as_str(), "message": reason.message() })
}

/// Replays for one resuming client what its filter wants: first from the
/// stream, from update id `read.from` until `read.until` (exclusive; the
/// hub's memory starts there), then from the hub's memory; `Done` at the
/// end. Started when the connection's earlier catch-ups have ended. Ends
/// early when the receiver goes away or takes nothing for `stall` (the
/// reader then resets its client), never holding a turn for it.
fn catch_up(
    reader: CatchUpReader,
    read: Option<CatchUp>,
    replay: Replay,
    filter: CatchUpFilter,
    ip: Option<IpAddr>,
    stall: Duration,
) -> StartCatchUp {
    Box::new(move || {
        // Little in flight: a client that stops reading pins no more.
        let (tx, rx) = mpsc::channel(CATCH_UP_CHANNEL);
        tokio::spawn(async move {
            let wants = |u: &crate::update::Update| filter.wants(u);
            if let Some(CatchUp { from, until }) = read
                && !reader.read_range((from, until), ip, &wants, &tx).await
            {
                return;
            }
            let hand = |item| async { matches!(tokio::time::timeout(stall, tx.send(item)).await, Ok(Ok(()))) };
            for (i, u) in replay.iter().enumerate() {
                if filter.wants(u) && !hand(CatchUpItem::Update(u.clone())).await {
                    return;
                }
                // A long replay of updates nobody wants must not hog the thread.
                if i % 1024 == 1023 {
                    tokio::task::yield_now().await;
                }
            }
            hand(CatchUpItem::Done).await;
        });
        rx
    })
}

/// Updates a catch-up hands over ahead of its client.
const CATCH_UP_CHANNEL: usize = 64;
