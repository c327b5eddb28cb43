//! The hub's recent updates, kept for clients resuming from an offset. It
//! is stored in sealed, shared chunks so that a resume costs the hub a
//! binary search and a few reference counts: the replay itself (matching
//! every kept update against the client's patterns) runs on the client's
//! side, never on the hub's update path.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::update::Update;

/// Updates per sealed chunk: bounds what the hub copies per resume.
const CHUNK: usize = 512;

type Chunk = Arc<[Arc<Update>]>;

pub(crate) struct History {
    /// Full chunks, oldest first; offsets increase throughout.
    sealed: VecDeque<Chunk>,
    /// The newest updates, sealed once `chunk` of them are in.
    open: Vec<Arc<Update>>,
    len: usize,
    cap: usize,
    chunk: usize,
    /// Offset of the first update ever kept: every update the hub has seen
    /// is at or after it.
    origin: Option<u64>,
}

impl History {
    pub(crate) fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        let chunk = cap.min(CHUNK);
        Self {
            sealed: VecDeque::new(),
            open: Vec::with_capacity(chunk),
            len: 0,
            cap,
            chunk,
            origin: None,
        }
    }

    pub(crate) fn push(&mut self, u: Arc<Update>) {
        self.origin.get_or_insert(u.offset);
        self.open.push(u);
        self.len += 1;
        if self.open.len() >= self.chunk {
            let full = std::mem::replace(&mut self.open, Vec::with_capacity(self.chunk));
            self.sealed.push_back(full.into());
        }
        // Whole chunks go: between `cap - chunk` and `cap` updates stay.
        while self.len > self.cap {
            match self.sealed.pop_front() {
                Some(c) => self.len -= c.len(),
                None => break,
            }
        }
    }

    /// Offset of the oldest update kept.
    pub(crate) fn front(&self) -> Option<u64> {
        self.sealed
            .front()
            .and_then(|c| c.first())
            .or_else(|| self.open.first())
            .map(|u| u.offset)
    }

    /// Offset of the newest update kept.
    pub(crate) fn back(&self) -> Option<u64> {
        self.open
            .last()
            .or_else(|| self.sealed.back().and_then(|c| c.last()))
            .map(|u| u.offset)
    }

    pub(crate) fn origin(&self) -> Option<u64> {
        self.origin
    }

    /// The kept updates with an offset above `since`, shared, not copied.
    pub(crate) fn after(&self, since: u64) -> Replay {
        let first = self
            .sealed
            .partition_point(|c| c.last().is_some_and(|u| u.offset <= since));
        let mut parts = Vec::new();
        for c in self.sealed.range(first..) {
            let skip = c.partition_point(|u| u.offset <= since);
            parts.push((c.clone(), skip));
        }
        let skip = self.open.partition_point(|u| u.offset <= since);
        if skip < self.open.len() {
            parts.push((Chunk::from(&self.open[skip..]), 0));
        }
        Replay { parts }
    }
}

/// Updates to replay for one resume, in offset order.
#[derive(Default)]
pub struct Replay {
    parts: Vec<(Chunk, usize)>,
}

impl Replay {
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Update>> {
        self.parts.iter().flat_map(|(c, skip)| c[*skip..].iter())
    }
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replay({} parts)", self.parts.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(offset: u64) -> Arc<Update> {
        let body = format!(r#"{{"product_id":1,"kind":"price","price_cents":1,"version":{offset},"ts_us":1}}"#);
        Arc::new(Update::from_stream(offset, "product.price.1", body.as_bytes()).unwrap())
    }

    #[test]
    fn replay_after_an_offset_is_exactly_the_newer_kept_updates() {
        let mut h = History::new(2000);
        for o in 1..=3000u64 {
            h.push(update(o * 2));
        }
        let front = h.front().unwrap();
        assert!(h.len <= 2000 && h.len > 2000 - CHUNK, "{}", h.len);
        assert_eq!(h.back(), Some(6000));
        assert_eq!(h.origin(), Some(2));
        for since in [0, front - 1, front, 4001, 4002, 5998, 5999, 6000, 7000] {
            let got: Vec<u64> = h.after(since).iter().map(|u| u.offset).collect();
            let want: Vec<u64> = (front..=6000).step_by(2).filter(|o| *o > since).collect();
            assert_eq!(got, want, "since {since}");
        }
    }

    #[test]
    fn a_tiny_history_keeps_its_newest_update() {
        let mut h = History::new(1);
        for o in 1..=5u64 {
            h.push(update(o));
        }
        assert_eq!((h.front(), h.back()), (Some(5), Some(5)));
        assert_eq!(h.after(0).iter().count(), 1);
    }
}
