//! A client's bounded buffer between the hub and its socket. Pushing never
//! waits: on overflow the buffer is conflated to the latest update per
//! product and kind, so a slow client still converges to the true state.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::update::Update;
use crate::metrics::Metrics;

pub struct ClientQueue {
    inner: Mutex<Inner>,
    notify: Notify,
    capacity: usize,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Arc<Update>>,
    /// Set once conflated: from then on a newer update for a key already
    /// waiting replaces it in place instead of growing the buffer.
    conflating: bool,
    closed: bool,
}

impl ClientQueue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            capacity: capacity.max(1),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, update: Arc<Update>) {
        let len = {
            let mut inner = self.lock();
            if inner.closed {
                return;
            }
            if inner.queue.len() >= self.capacity {
                if !inner.conflating {
                    conflate(&mut inner.queue);
                    inner.conflating = true;
                    self.metrics.updates_conflated.inc();
                }
                let key = update.key();
                if let Some(slot) = inner.queue.iter_mut().find(|u| u.key() == key) {
                    *slot = update;
                    self.metrics.updates_conflated.inc();
                } else {
                    inner.queue.push_back(update);
                }
            } else {
                inner.queue.push_back(update);
            }
            inner.queue.len()
        };
        self.metrics.observe_buffer(len);
        self.notify.notify_one();
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
                    inner.conflating = false;
                    return !inner.closed;
                }
            }
            notified.await;
        }
    }

    /// Offset of the oldest waiting update.
    pub fn front_offset(&self) -> Option<u64> {
        self.lock().queue.front().map(|u| u.offset)
    }

    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
