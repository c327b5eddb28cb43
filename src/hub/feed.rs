//! What one connection reads: its hub buffer, preceded while resuming by
//! the updates read back (from the stream and the hub's memory), and
//! filtered against its snapshot, so the client sees every change once and
//! in order. Each resume on a connection is its own catch-up; they run one
//! after the other, so none replaces another.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::client::ClientQueue;
use super::index::SubscriptionIndex;
use super::pattern::Pattern;
use crate::update::{CatchUpItem, ResetReason, SnapshotHolds, Update};

#[derive(Debug)]
pub enum FeedItem {
    Update(Arc<Update>),
    Reset { offset: u64, reason: ResetReason },
}

/// Which updates one resume replays: those of its new patterns that the
/// connection's earlier patterns do not already deliver. Patterns are
/// indexed, so a replay costs the updates it reads, not updates × patterns.
pub(crate) struct CatchUpFilter {
    /// The resume's new patterns, all under one key.
    fresh: Mutex<SubscriptionIndex<usize>>,
    /// Earlier patterns, keyed by their place in `after`.
    covered: Mutex<SubscriptionIndex<usize>>,
    /// Offset after which each earlier pattern delivers everything.
    after: Vec<u64>,
}

impl CatchUpFilter {
    pub(crate) fn new(fresh: &[Pattern], covered: &[(Pattern, u64)]) -> Self {
        let mut fresh_index = SubscriptionIndex::new();
        for p in fresh {
            fresh_index.insert(0, p);
        }
        let mut covered_index = SubscriptionIndex::new();
        for (i, (p, _)) in covered.iter().enumerate() {
            covered_index.insert(i, p);
        }
        Self {
            fresh: Mutex::new(fresh_index),
            covered: Mutex::new(covered_index),
            after: covered.iter().map(|(_, after)| *after).collect(),
        }
    }

    pub(crate) fn wants(&self, u: &Update) -> bool {
        // Only the replaying task uses the filter: the locks are never contended.
        let mut fresh = false;
        self.fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .for_each_match(&u.topic, |_| fresh = true);
        if !fresh {
            return false;
        }
        let mut covered = false;
        self.covered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .for_each_match(&u.topic, |i| covered |= u.offset > self.after[i]);
        !covered
    }
}

/// Starts a catch-up's replay and returns what it hands over.
pub(crate) type StartCatchUp = Box<dyn FnOnce() -> mpsc::Receiver<CatchUpItem> + Send>;

struct CatchUp {
    /// Started only when the catch-ups before it have ended: one replay
    /// runs per connection at a time, and one queued behind another cannot
    /// time out waiting for its client to read the first.
    start: Option<StartCatchUp>,
    rx: Option<mpsc::Receiver<CatchUpItem>>,
    /// Ends where the live buffer begins (the hub had nothing yet when it
    /// started), rather than at a known offset.
    open_ended: bool,
    /// Where live delivery takes over (the hub's newest offset at the
    /// resume, plus one): a catch-up cut short resets its client there.
    live_from: Option<u64>,
}

impl CatchUp {
    fn rx(&mut self) -> &mut mpsc::Receiver<CatchUpItem> {
        if let Some(start) = self.start.take() {
            self.rx = Some(start());
        }
        self.rx.get_or_insert_with(|| mpsc::channel(1).1)
    }
}

pub(crate) struct Feed {
    queue: Arc<ClientQueue>,
    catch_ups: VecDeque<CatchUp>,
    /// Offset of the last update handed out from an open-ended catch-up.
    last_caught_up: Option<u64>,
    /// Per pattern, what its latest snapshot holds: an update it already
    /// has is skipped. A later snapshot of a pattern holds all an earlier
    /// one did, so only the latest is kept, and this never holds more than
    /// the connection's patterns.
    snapshots: HashMap<Box<str>, (Pattern, Arc<SnapshotHolds>)>,
    buf: Vec<Arc<Update>>,
    /// Told the queue that live updates wait on a catch-up.
    catching_up: bool,
    /// A catch-up was cut short with no known place where live delivery
    /// takes over: the first live update comes after a reset.
    owed_reset: bool,
}

impl Feed {
    pub(crate) fn new(queue: Arc<ClientQueue>) -> Self {
        Self {
            queue,
            catch_ups: VecDeque::new(),
            last_caught_up: None,
            snapshots: HashMap::new(),
            buf: Vec::new(),
            catching_up: false,
            owed_reset: false,
        }
    }

    pub(crate) fn queue(&self) -> &Arc<ClientQueue> {
        &self.queue
    }

    /// Queues a catch-up behind those already running. `open_ended` when
    /// it ends at the first live update rather than at `live_from`.
    pub(crate) fn start_catch_up(&mut self, start: StartCatchUp, open_ended: bool, live_from: Option<u64>) {
        self.catch_ups.push_back(CatchUp {
            start: Some(start),
            rx: None,
            open_ended,
            live_from,
        });
        if !self.catching_up {
            self.catching_up = true;
            self.queue.catching_up(true);
        }
    }

    /// Catch-ups queued or running on this connection.
    pub(crate) fn catch_ups(&self) -> usize {
        self.catch_ups.len()
    }

    /// Records what a snapshot of `patterns` holds, so the updates it
    /// already has are skipped.
    pub(crate) fn snapshot_holds(&mut self, patterns: &[Pattern], holds: Arc<SnapshotHolds>) {
        for p in patterns {
            self.snapshots.insert(p.as_str().into(), (p.clone(), holds.clone()));
        }
    }

    /// Forgets the snapshots of patterns the connection dropped.
    pub(crate) fn forget_snapshots(&mut self, patterns: &[String]) {
        for p in patterns {
            self.snapshots.remove(p.as_str());
        }
    }

    /// Waits for the next items and appends them to `out`, in order.
    /// False once the hub has let go of this client (shutdown).
    pub(crate) async fn next(&mut self, out: &mut Vec<FeedItem>) -> bool {
        loop {
            let gave = match self.catch_ups.front().map(|c| c.open_ended) {
                Some(false) => self.replay_bounded(out).await,
                Some(true) => self.replay_open_ended(out).await,
                None => match self.live(out).await {
                    Some(open) => return open,
                    None => false,
                },
            };
            if gave {
                return true;
            }
        }
    }

    /// One step of a catch-up that ends by itself, at the last update the
    /// hub had when the resume started (the live buffer holds only newer
    /// ones of its patterns). True when it put something in `out`.
    async fn replay_bounded(&mut self, out: &mut Vec<FeedItem>) -> bool {
        let Some(c) = self.catch_ups.front_mut() else {
            return false;
        };
        match c.rx().recv().await {
            Some(CatchUpItem::Update(u)) => {
                if self.wanted(&u) {
                    out.push(FeedItem::Update(u));
                    return true;
                }
            }
            Some(CatchUpItem::Reset {
                first_available,
                reason,
            }) => {
                out.push(FeedItem::Reset {
                    offset: first_available,
                    reason,
                });
                return true;
            }
            Some(CatchUpItem::Done) => {
                self.catch_ups.pop_front();
            }
            None => {
                // Cut short: what it had not replayed is missing.
                let live_from = c.live_from;
                self.catch_ups.pop_front();
                match live_from {
                    Some(offset) => {
                        out.push(FeedItem::Reset {
                            offset,
                            reason: ResetReason::CatchUpFailed,
                        });
                        return true;
                    }
                    None => self.owed_reset = true,
                }
            }
        }
        false
    }

    /// One step of an open-ended catch-up: live updates queued from the hub
    /// take over once the stream reader reaches the first of them. True
    /// when it put something in `out`.
    async fn replay_open_ended(&mut self, out: &mut Vec<FeedItem>) -> bool {
        let front = self.queue.front_offset();
        let Some(c) = self.catch_ups.front_mut() else {
            return false;
        };
        let item = tokio::select! {
            item = c.rx().recv() => item,
            // A live update became the queue's front: it may be where the
            // catch-up ends, so check again.
            () = self.queue.front_changed() => return false,
        };
        match item {
            Some(CatchUpItem::Update(u)) => {
                if front.is_some_and(|f| u.offset >= f) {
                    self.catch_ups.pop_front();
                    return false;
                }
                if self.last_caught_up.is_some_and(|l| u.offset <= l) {
                    return false;
                }
                self.last_caught_up = Some(u.offset);
                if self.wanted(&u) {
                    out.push(FeedItem::Update(u));
                    return true;
                }
                false
            }
            Some(CatchUpItem::Reset {
                first_available,
                reason,
            }) => {
                // A failed open-ended read ends here: live delivery takes
                // over at the buffer's front.
                let offset = match (reason, front) {
                    (ResetReason::CatchUpFailed, Some(f)) => f.max(first_available),
                    _ => first_available,
                };
                out.push(FeedItem::Reset { offset, reason });
                true
            }
            Some(CatchUpItem::Done) => {
                self.catch_ups.pop_front();
                false
            }
            None => {
                // Cut short: live delivery takes over, after a reset at its
                // first update.
                self.catch_ups.pop_front();
                self.owed_reset = true;
                false
            }
        }
    }

    /// Live updates from the client's buffer, once no catch-up runs:
    /// `Some(open)` when it put something in `out` or the buffer closed,
    /// `None` when what it drained was all skipped.
    async fn live(&mut self, out: &mut Vec<FeedItem>) -> Option<bool> {
        if std::mem::take(&mut self.catching_up) {
            self.queue.catching_up(false);
        }
        self.buf.clear();
        let open = self.queue.drain_into(&mut self.buf).await;
        let before = out.len();
        let mut buf = std::mem::take(&mut self.buf);
        if let Some(first) = buf.first()
            && std::mem::take(&mut self.owed_reset)
        {
            out.push(FeedItem::Reset {
                offset: first.offset,
                reason: ResetReason::CatchUpFailed,
            });
        }
        for u in buf.drain(..) {
            let old = self.last_caught_up.is_some_and(|l| u.offset <= l);
            if !old && self.wanted(&u) {
                out.push(FeedItem::Update(u));
            }
        }
        self.buf = buf;
        if out.len() > before {
            return Some(true);
        }
        (!open).then_some(false)
    }

    /// False for an update some snapshot of its topic already holds.
    fn wanted(&self, u: &Update) -> bool {
        !self
            .snapshots
            .values()
            .any(|(p, holds)| holds.holds(u) && p.matches(&u.topic))
    }
}
