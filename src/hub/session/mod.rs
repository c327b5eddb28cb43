//! One realtime connection, whatever its transport: subscribing with
//! patterns, resume from an offset (stream catch-up and the hub's memory),
//! snapshots, and the limits that protect the hub. `http::ws` and
//! `http::sse` only translate frames and events into calls on a [`Session`].

mod catch_up;
mod codes;
mod snapshot;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::client::Ended;
use super::feed::{CatchUpFilter, Feed, FeedItem};
use super::pattern::Pattern;
use super::scope::Grant;
use super::{ConnectionSlot, HubHandle, Refused};
use crate::broadcast::stream::CatchUpReader;
use crate::metrics::Metrics;
use crate::store::{Db, Replica, catalog};

pub use self::codes::{ClientError, ClientErrorCode, Dropped, Transport, reset_json};
pub use self::snapshot::{SnapshotFrame, SnapshotFrames, SnapshotLimit, next_snapshot_frame};
use self::snapshot::{SnapshotStream, named_products, snapshot_unavailable, stream_snapshot};

/// What every session shares: the hub, the snapshot source and the
/// stream's catch-up reader.
#[derive(Clone)]
pub struct SessionContext {
    pub hub: HubHandle,
    /// Pool of client reads, for snapshots.
    pub read_db: Db,
    /// The primary behind `read_db` when that is a replica.
    pub replica: Option<Replica>,
    pub snapshots: SnapshotLimit,
    /// Reads the stream back for resumes older than the hub's memory.
    pub catch_up: CatchUpReader,
}

/// Catch-ups one connection may have queued or running: each pins the
/// history it replays.
const MAX_CATCH_UPS_QUEUED: usize = 4;

/// One client connection's subscription state.
pub struct Session {
    id: u64,
    /// Shared by every session: one pointer each, where copies of its
    /// handles would cost every idle connection some 200 bytes.
    ctx: Arc<SessionContext>,
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
    pub fn open(
        rt: Arc<SessionContext>,
        transport: Transport,
        ip: Option<IpAddr>,
        grant: Grant,
    ) -> Result<Session, Refused> {
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
            ctx: rt,
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
        let max = self.ctx.hub.settings().max_subscriptions;
        ClientError::new(
            ClientErrorCode::TooManySubscriptions,
            format!("at most {max} patterns per connection"),
        )
    }

    /// The requested patterns, each once, and those of them that are new to
    /// this connection.
    fn parse(&self, topics: &[String]) -> Result<(Vec<Pattern>, Vec<Pattern>), ClientError> {
        let settings = self.ctx.hub.settings();
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
            true => Some(self.ctx.snapshots.acquire(self.ip).await?),
            false => None,
        };
        let subscribed = self
            .ctx
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
            let start = catch_up::catch_up(
                self.ctx.catch_up.clone(),
                subscribed.catch_up,
                subscribed.replay,
                CatchUpFilter::new(&fresh, &covered),
                self.ip,
                self.ctx.hub.settings().catch_up_stall,
            );
            self.feed
                .start_catch_up(start, open_ended, subscribed.last_offset.map(|o| o + 1));
        }
        let Some(turn) = turn else { return Ok(None) };
        // Registered first, read second: an update committed after the
        // read's snapshot is queued, one the snapshot sees is skipped.
        let read =
            catalog::SnapshotRead::begin(&self.ctx.read_db, self.ctx.replica.as_ref(), named_products(&patterns))
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "snapshot read failed");
                    snapshot_unavailable()
                })?;
        if read.on_primary() {
            self.ctx.hub.metrics().snapshots_off_replica.inc();
        }
        self.feed.snapshot_holds(&patterns, read.holds().clone());
        Ok(Some(stream_snapshot(SnapshotStream {
            read,
            patterns,
            offset: subscribed.last_offset,
            part_size: self.ctx.hub.settings().snapshot_part_products,
            metrics: self.ctx.hub.metrics().clone(),
            stall: self.ctx.hub.settings().snapshot_stall,
            _turn: turn,
        })))
    }

    pub async fn unsubscribe(&mut self, topics: &[String]) -> Result<(), ClientError> {
        // A connection never has more patterns than this to take back.
        if topics.len() > self.ctx.hub.settings().max_subscriptions {
            return Err(self.too_many());
        }
        let gone: HashSet<&str> = topics.iter().map(String::as_str).collect();
        self.covered.retain(|(p, _)| !gone.contains(p.as_str()));
        self.feed.forget_snapshots(topics);
        self.ctx.hub.unsubscribe(self.id, topics.to_vec()).await;
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
        count_delivery(self.ctx.hub.metrics(), self.transport, ts_us);
    }

    /// Observes a traced delivery's latency, its trace id the exemplar.
    pub fn traced(&self, ts_us: i64, trace_id: String) {
        self.ctx.hub.metrics().observe_traced(ts_us, trace_id);
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
        self.ctx.hub.leave(self.id);
        self.ctx
            .hub
            .metrics()
            .clients_connected
            .get_or_create(&[("transport", self.transport.as_str())])
            .dec();
    }
}

fn forbidden(p: &Pattern, why: &str) -> ClientError {
    ClientError::new(ClientErrorCode::Forbidden, format!("{:.80}: {why}", p.as_str()))
}
