//! The reusable state of one lookup: the trie walk's live nodes and the
//! set of clients already reported. Both are stamped with a generation
//! rather than cleared, so a lookup costs what it visits, not what the
//! index holds.

use super::{Members, Node, NodeId};

/// The trie walk's reusable state: the live nodes before and after the
/// current word, and a generation-stamped set so a node reached along
/// several paths (nested `#`s) is carried once.
#[derive(Debug, Default)]
pub(super) struct Walk {
    pub(super) current: Vec<NodeId>,
    next: Vec<NodeId>,
    stamps: Vec<u32>,
    generation: u32,
    /// Nodes entered by the last lookup, for tests of its cost.
    #[cfg(test)]
    pub(super) entered: usize,
}

impl Walk {
    pub(super) fn begin(&mut self, nodes: usize) {
        self.stamps.resize(nodes, 0);
        self.current.clear();
        self.next.clear();
        #[cfg(test)]
        {
            self.entered = 0;
        }
    }

    pub(super) fn new_step(&mut self) {
        if self.generation == u32::MAX {
            self.stamps.fill(0);
            self.generation = 0;
        }
        self.generation += 1;
    }

    /// Adds a node to the next step's set, with the `#` hanging under it
    /// (which may match zero words).
    pub(super) fn enter(&mut self, nodes: &[Node], mut at: NodeId) {
        loop {
            let stamp = &mut self.stamps[at as usize];
            if *stamp == self.generation {
                return;
            }
            *stamp = self.generation;
            self.next.push(at);
            #[cfg(test)]
            {
                self.entered += 1;
            }
            match nodes[at as usize].many {
                Some(hash) => at = hash,
                None => return,
            }
        }
    }

    /// Makes the nodes entered since the last step the live set.
    pub(super) fn advance(&mut self) {
        std::mem::swap(&mut self.current, &mut self.next);
        self.next.clear();
    }
}

/// Generation-stamped set of client slots already reported by a lookup: a
/// client matching through several patterns is reported once, at O(1) per
/// candidate and with nothing to clear between lookups.
#[derive(Debug, Default)]
pub(super) struct Seen {
    stamps: Vec<u32>,
    generation: u32,
    /// Leaf members looked at by the last lookup, for tests of its cost.
    #[cfg(test)]
    pub(super) candidates: usize,
}

impl Seen {
    pub(super) fn begin(&mut self, slots: usize) {
        self.stamps.resize(slots, 0);
        if self.generation == u32::MAX {
            self.stamps.fill(0);
            self.generation = 0;
        }
        self.generation += 1;
        #[cfg(test)]
        {
            self.candidates = 0;
        }
    }

    pub(super) fn report<K: Copy>(&mut self, members: &Members, keys: &[Option<K>], f: &mut impl FnMut(K)) {
        for &slot in members.keys() {
            #[cfg(test)]
            {
                self.candidates += 1;
            }
            let stamp = &mut self.stamps[slot as usize];
            if *stamp != self.generation {
                *stamp = self.generation;
                if let Some(Some(key)) = keys.get(slot as usize) {
                    f(*key);
                }
            }
        }
    }
}
