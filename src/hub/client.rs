//! A client's bounded buffer between the hub and its socket. Pushing never
//! waits: on overflow the buffer is conflated to the latest update per
//! product and kind, so a slow client still converges to the true state.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::update::Update;

pub struct ClientQueue {
    inner: Mutex<Inner>,
    notify: Notify,
    /// Signalled when the oldest waiting update changes, for a reader that
    /// waits on something else meanwhile (a catch-up) and must know. A
    /// `Notify` lives inline; a watch channel would cost every connection
    /// an allocation of its own.
    front_changed: Notify,
    capacity: usize,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Arc<Update>>,
    closed: bool,
}

impl ClientQueue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            front_changed: Notify::new(),
            capacity: capacity.max(1),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, update: Arc<Update>) {
        let (len, front_changed) = {
            let mut inner = self.lock();
            if inner.closed {
                return;
            }
            let front = inner.queue.front().map(|u| u.offset);
            if inner.queue.len() >= self.capacity {
                // Keep one update per product and kind, the newest, in offset
                // order; the buffer then grows only with the number of keys.
                let before = inner.queue.len();
                conflate(&mut inner.queue);
                let key = update.key();
                if let Some(i) = inner.queue.iter().position(|u| u.key() == key) {
                    inner.queue.remove(i);
                }
                self.metrics
                    .updates_conflated
                    .inc_by((before - inner.queue.len()) as u64);
            }
            inner.queue.push_back(update);
            (inner.queue.len(), inner.queue.front().map(|u| u.offset) != front)
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
                if !inner.queue.is_empty() || inner.closed {
                    out.extend(inner.queue.drain(..));
                    return !inner.closed;
                }
            }
            notified.await;
        }
    }

    /// Completes when the oldest waiting update has changed (see
    /// `front_offset`) since this last completed; for the queue's one reader.
    pub async fn front_changed(&self) {
        self.front_changed.notified().await
    }

    /// Offset of the oldest waiting update.
    pub fn front_offset(&self) -> Option<u64> {
        self.lock().queue.front().map(|u| u.offset)
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Wakes the reader for good; later pushes are dropped.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }
}

/// Keeps only the newest update per product and kind, in offset order.
fn conflate(queue: &mut VecDeque<Arc<Update>>) {
    let mut newest: HashMap<_, u64> = HashMap::with_capacity(queue.len());
    for u in queue.iter() {
        newest.insert(u.key(), u.offset);
    }
    queue.retain(|u| newest.get(&u.key()) == Some(&u.offset));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(offset: u64, product: i64, version: i64) -> Arc<Update> {
        let body =
            format!(r#"{{"product_id":{product},"kind":"price","price_cents":1,"version":{version},"ts_us":1}}"#);
        Arc::new(Update::from_stream(offset, &format!("product.price.{product}"), body.as_bytes()).unwrap())
    }

    #[tokio::test]
    async fn overflow_keeps_the_newest_update_per_key_in_offset_order() {
        let q = ClientQueue::new(4, Metrics::new());
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
}
