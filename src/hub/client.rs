//! A client's bounded buffer between the hub and its socket. Pushing never
//! waits and costs O(1): past `entries` waiting updates the buffer conflates
//! to the newest update per product and kind (an index beside the queue
//! finds the one a push replaces), so a slow client still converges to the
//! true state. A client that cannot be kept within its bounds (more keys
//! waiting than `entries`, more bytes than `bytes`, or nothing taken for
//! `stall`) is cut off as a slow consumer: the buffer closes, and the
//! client resumes from its last offset when it reconnects.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::domain::Kind;
use crate::metrics::Metrics;
use crate::update::Update;

/// How much one client may have waiting.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Updates waiting; past it the buffer conflates, and a new key that
    /// does not fit cuts the client off.
    pub entries: usize,
    /// Frame bytes waiting.
    pub bytes: usize,
    /// Longest the oldest waiting update may wait while the reader takes
    /// nothing at all.
    pub stall: Duration,
}

/// Why a buffer closed: the transport says so to its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client left, or the hub stopped.
    Closed,
    /// The client could not be kept within its bounds.
    SlowConsumer,
}

pub struct ClientQueue {
    inner: Mutex<Inner>,
    notify: Notify,
    /// Signalled when the oldest waiting update changes, for a reader that
    /// waits on something else meanwhile (a catch-up) and must know. A
    /// `Notify` lives inline; a watch channel would cost every connection
    /// an allocation of its own.
    front_changed: Notify,
    limits: QueueLimits,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Inner {
    /// Waiting updates in offset order; `None` where a newer update of the
    /// same key took its place. The front is never `None`.
    slots: VecDeque<Option<Arc<Update>>>,
    /// Sequence number of `slots[0]`: a slot's place never has to be searched.
    head: u64,
    /// `Some` slots.
    live: usize,
    /// Frame bytes of the `Some` slots.
    bytes: usize,
    /// While conflating (from the first overflow until the reader empties
    /// the buffer): each waiting key's slot. Empty, and unallocated, for a
    /// client that keeps up.
    newest: HashMap<(i64, Kind), u64>,
    conflating: bool,
    /// Since when the reader has taken nothing while something waited.
    waiting_since: Option<Instant>,
    /// The reader is replaying a catch-up first: live updates wait on it,
    /// not on the client, so they do not count as stalled meanwhile.
    catching_up: bool,
    ended: Option<Ended>,
}

impl Inner {
    fn front_offset(&self) -> Option<u64> {
        self.slots.front().and_then(|s| s.as_ref()).map(|u| u.offset)
    }

    /// Indexes every waiting key and drops the older duplicates: once per
    /// overflow, after at least `entries` pushes, so O(1) per push.
    fn start_conflating(&mut self) -> usize {
        self.conflating = true;
        self.newest = HashMap::with_capacity(self.live);
        let mut replaced = 0;
        for i in 0..self.slots.len() {
            let Some(key) = self.slots[i].as_ref().map(|u| u.key()) else {
                continue;
            };
            if let Some(old) = self.newest.insert(key, self.head + i as u64) {
                replaced += self.take((old - self.head) as usize);
            }
        }
        self.trim_front();
        replaced
    }

    /// Empties slot `i`; 1 when it held an update.
    fn take(&mut self, i: usize) -> usize {
        match self.slots[i].take() {
            Some(u) => {
                self.live -= 1;
                self.bytes -= frame_bytes(&u);
                1
            }
            None => 0,
        }
    }

    fn trim_front(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.head += 1;
        }
    }

    /// Drops the empty slots once they outnumber the waiting updates, so
    /// the queue's length stays within twice its bound (amortised O(1)).
    fn compact(&mut self) {
        if self.slots.len() <= 2 * self.live.max(16) {
            return;
        }
        self.slots.retain(Option::is_some);
        self.newest.clear();
        for (i, u) in self.slots.iter().enumerate() {
            if let Some(u) = u {
                self.newest.insert(u.key(), self.head + i as u64);
            }
        }
    }
}

/// What an update costs a client's buffer: the larger of its two frames.
fn frame_bytes(u: &Update) -> usize {
    u.ws_frame.len().max(u.sse_event.len())
}

impl ClientQueue {
    pub fn new(limits: QueueLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            front_changed: Notify::new(),
            limits: QueueLimits {
                entries: limits.entries.max(1),
                ..limits
            },
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with the buffer locked: a push meanwhile waits, as a shard
    /// stuck on one client would.
    #[cfg(test)]
    pub(crate) fn while_held<R>(&self, f: impl FnOnce() -> R) -> R {
        let _held = self.lock();
        f()
    }

    pub fn push(&self, update: Arc<Update>) {
        let (len, front_changed) = {
            let mut inner = self.lock();
            if inner.ended.is_some() {
                return;
            }
            let now = Instant::now();
            if !inner.catching_up
                && inner
                    .waiting_since
                    .is_some_and(|t| now.duration_since(t) > self.limits.stall)
            {
                drop(inner);
                self.end(Ended::SlowConsumer);
                return;
            }
            let front = inner.front_offset();
            let mut replaced = 0;
            if !inner.conflating && inner.live >= self.limits.entries {
                replaced += inner.start_conflating();
            }
            let key = update.key();
            if inner.conflating
                && let Some(seq) = inner.newest.get(&key).copied()
            {
                let i = (seq - inner.head) as usize;
                replaced += inner.take(i);
                inner.trim_front();
            }
            if replaced > 0 {
                self.metrics.updates_conflated.inc_by(replaced as u64);
            }
            let size = frame_bytes(&update);
            if inner.live >= self.limits.entries || inner.bytes + size > self.limits.bytes {
                drop(inner);
                self.end(Ended::SlowConsumer);
                return;
            }
            if inner.conflating {
                let seq = inner.head + inner.slots.len() as u64;
                inner.newest.insert(key, seq);
            }
            inner.slots.push_back(Some(update));
            inner.live += 1;
            inner.bytes += size;
            inner.waiting_since.get_or_insert(now);
            inner.compact();
            (inner.live, inner.front_offset() != front)
        };
        self.metrics.observe_buffer(len);
        self.notify.notify_one();
        if front_changed {
            // One permit is kept when nobody waits: a change between the
            // reader's `front_offset` and its wait is not missed.
            self.front_changed.notify_one();
        }
    }

    /// Moves everything waiting into `out`; waits when nothing is. False
    /// once the queue is closed.
    pub async fn drain_into(&self, out: &mut Vec<Arc<Update>>) -> bool {
        loop {
            let notified = self.notify.notified();
            {
                let mut inner = self.lock();
                if !inner.slots.is_empty() || inner.ended.is_some() {
                    inner.head += inner.slots.len() as u64;
                    out.extend(inner.slots.drain(..).flatten());
                    inner.live = 0;
                    inner.bytes = 0;
                    inner.waiting_since = None;
                    if inner.conflating {
                        // The index goes with the backlog: a client that
                        // keeps up again carries none.
                        inner.conflating = false;
                        inner.newest = HashMap::new();
                    }
                    return inner.ended.is_none();
                }
            }
            notified.await;
        }
    }

    /// The reader took something (a catch-up's update, a snapshot part, a
    /// frame written): what waits has not stalled.
    pub fn progressed(&self) {
        let mut inner = self.lock();
        if inner.waiting_since.is_some() {
            inner.waiting_since = Some(Instant::now());
        }
    }

    /// Whether the reader is replaying a catch-up before these updates.
    pub fn catching_up(&self, yes: bool) {
        let mut inner = self.lock();
        if inner.catching_up != yes {
            inner.catching_up = yes;
            if inner.waiting_since.is_some() {
                inner.waiting_since = Some(Instant::now());
            }
        }
    }

    /// Completes when the oldest waiting update has changed (see
    /// `front_offset`) since this last completed; for the queue's one reader.
    pub async fn front_changed(&self) {
        self.front_changed.notified().await
    }

    /// Offset of the oldest waiting update.
    pub fn front_offset(&self) -> Option<u64> {
        self.lock().front_offset()
    }

    pub fn is_closed(&self) -> bool {
        self.lock().ended.is_some()
    }

    /// Why the queue closed, once it has.
    pub fn ended(&self) -> Option<Ended> {
        self.lock().ended
    }

    /// Cuts the client off as a slow consumer (counted once).
    pub fn cut_off(&self) {
        self.end(Ended::SlowConsumer);
    }

    /// Wakes the reader for good; later pushes are dropped.
    pub fn close(&self) {
        self.end(Ended::Closed);
    }

    fn end(&self, why: Ended) {
        {
            let mut inner = self.lock();
            if inner.ended.is_some() {
                return;
            }
            inner.ended = Some(why);
            if why == Ended::SlowConsumer {
                // Nothing waiting is sent: the client resumes from the last
                // update it was given, and its backlog is freed now.
                inner.slots = VecDeque::new();
                inner.newest = HashMap::new();
                inner.live = 0;
                inner.bytes = 0;
            }
        }
        if why == Ended::SlowConsumer {
            self.metrics
                .clients_refused
                .get_or_create(&[("reason", "slow_consumer")])
                .inc();
        }
        self.notify.notify_one();
        self.front_changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(offset: u64, product: i64, version: i64) -> Arc<Update> {
        let body =
            format!(r#"{{"product_id":{product},"kind":"price","price_cents":1,"version":{version},"ts_us":1}}"#);
        Arc::new(Update::from_stream(offset, &format!("product.price.{product}"), body.as_bytes()).unwrap())
    }

    fn limits(entries: usize) -> QueueLimits {
        QueueLimits {
            entries,
            bytes: usize::MAX,
            stall: Duration::from_secs(3600),
        }
    }

    #[tokio::test]
    async fn overflow_keeps_the_newest_update_per_key_in_offset_order() {
        let q = ClientQueue::new(limits(4), Metrics::new());
        for i in 0..30u64 {
            q.push(update(i, (i % 3) as i64 + 1, i as i64));
        }
        let mut out = Vec::new();
        assert!(q.drain_into(&mut out).await);
        let offsets: Vec<u64> = out.iter().map(|u| u.offset).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        let mut newest = std::collections::HashMap::new();
        for u in &out {
            newest.insert(u.product_id, u.version);
        }
        assert_eq!(newest, [(1, 27), (2, 28), (3, 29)].into_iter().collect());
        assert!(out.len() <= 4);
    }

    #[tokio::test]
    async fn a_conflating_buffer_keeps_every_key_once_and_its_length_bounded() {
        let q = ClientQueue::new(limits(100), Metrics::new());
        // 100 keys, each updated 1,000 times while nothing is read.
        for i in 0..100_000u64 {
            q.push(update(i, (i % 100) as i64 + 1, i as i64));
            let len = q.lock().slots.len();
            assert!(len <= 2 * 100 + 1, "slots {len} after {i} pushes");
        }
        let mut out = Vec::new();
        assert!(q.drain_into(&mut out).await);
        assert_eq!(out.len(), 100);
        assert!(out.iter().all(|u| u.offset >= 99_900), "only the newest of each key");
        // Empty again: the index is gone, and a reader that keeps up gets everything.
        assert!(q.lock().newest.capacity() == 0 && !q.lock().conflating);
        for i in 0..10u64 {
            q.push(update(200_000 + i, 1, i as i64));
        }
        out.clear();
        q.drain_into(&mut out).await;
        assert_eq!(out.len(), 10, "below the bound nothing is conflated");
    }

    #[tokio::test]
    async fn more_keys_waiting_than_the_bound_cut_the_client_off_as_a_slow_consumer() {
        let metrics = Metrics::new();
        let q = ClientQueue::new(limits(64), metrics.clone());
        // Every push a new product: conflation cannot help.
        for i in 0..65u64 {
            q.push(update(i, i as i64 + 1, 1));
        }
        assert_eq!(q.ended(), Some(Ended::SlowConsumer));
        let mut out = Vec::new();
        assert!(!q.drain_into(&mut out).await, "closed");
        assert!(out.is_empty(), "the backlog is freed, not sent");
        q.push(update(1000, 1, 2));
        assert_eq!(q.lock().live, 0, "nothing is queued once cut off");
        let refused = metrics
            .clients_refused
            .get_or_create(&[("reason", "slow_consumer")])
            .get();
        assert_eq!(refused, 1);
    }

    #[tokio::test]
    async fn waiting_bytes_are_bounded_too() {
        let ten: usize = (0..10u64).map(|i| frame_bytes(&update(i, i as i64 + 1, 1))).sum();
        let q = ClientQueue::new(
            QueueLimits {
                entries: 1000,
                bytes: ten,
                stall: Duration::from_secs(3600),
            },
            Metrics::new(),
        );
        for i in 0..10u64 {
            q.push(update(i, i as i64 + 1, 1));
        }
        assert_eq!(q.ended(), None);
        q.push(update(10, 11, 1));
        assert_eq!(q.ended(), Some(Ended::SlowConsumer));
    }

    #[tokio::test]
    async fn a_reader_that_takes_nothing_for_the_stall_time_is_cut_off() {
        let q = ClientQueue::new(
            QueueLimits {
                entries: 1000,
                bytes: usize::MAX,
                stall: Duration::from_millis(50),
            },
            Metrics::new(),
        );
        q.push(update(0, 1, 1));
        tokio::time::sleep(Duration::from_millis(30)).await;
        q.progressed();
        tokio::time::sleep(Duration::from_millis(30)).await;
        q.push(update(1, 1, 2));
        assert_eq!(q.ended(), None, "progress 30 ms ago");
        tokio::time::sleep(Duration::from_millis(60)).await;
        q.push(update(2, 1, 3));
        assert_eq!(q.ended(), Some(Ended::SlowConsumer));
    }
}
