//! Routing by index: which clients want a topic, found at a cost that grows
//! with the clients it matches, not with all connected clients. Patterns
//! without wildcards sit in a hash map keyed by the whole topic; the others
//! in a trie over words whose `*` and `#` are edges, as the broker's own
//! topic exchange keeps them. A lookup walks the trie once, word by word,
//! carrying the set of nodes still alive, so each node is visited at most
//! once per word whatever the patterns. Pure data: one index per shard of
//! clients, no locks, no I/O.

use std::collections::HashMap;
use std::hash::Hash;

use super::pattern::{Pattern, WordRef};
use walk::{Seen, Walk};

/// Index of a trie node in the arena. Nodes, like client slots, are far
/// fewer than 2^32 (patterns are at most 255 bytes, clients a process's
/// file descriptors).
type NodeId = u32;
/// Dense number of a client while it has at least one pattern: cheaper to
/// store in every leaf than the key, and usable to index a seen-set.
type Slot = u32;

const ROOT: NodeId = 0;

/// Clients whose patterns end at one leaf (an exact topic or a trie node),
/// each with how many of its patterns end there: `#` and `#.#` are two
/// subscriptions (clients unsubscribe by text) that end at the same node.
type Members = HashMap<Slot, u32>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Edge {
    Root,
    Exact(Box<str>),
    One,
    Many,
}

#[derive(Debug)]
struct Node {
    /// Where the node hangs, so pruning climbs without searching.
    parent: NodeId,
    /// The word leading here from the parent; `Many` nodes also loop on
    /// every word (the `#` absorbing it).
    edge: Edge,
    exact: HashMap<Box<str>, NodeId>,
    one: Option<NodeId>,
    many: Option<NodeId>,
    members: Members,
}

impl Node {
    fn new(parent: NodeId, edge: Edge) -> Self {
        Node {
            parent,
            edge,
            exact: HashMap::new(),
            one: None,
            many: None,
            members: HashMap::new(),
        }
    }

    fn is_unused(&self) -> bool {
        self.members.is_empty() && self.exact.is_empty() && self.one.is_none() && self.many.is_none()
    }
}

#[derive(Debug)]
struct Subscription {
    text: Box<str>,
    /// Trie leaf; None when the pattern has no wildcard and lives in the
    /// exact map under its text.
    node: Option<NodeId>,
}

#[derive(Debug)]
struct ClientEntry {
    slot: Slot,
    /// A client's few patterns, so removing it costs only those.
    subscriptions: Vec<Subscription>,
}

/// Who is subscribed to what, indexed for lookup by topic. `K` names a
/// client (its id in the hub).
#[derive(Debug)]
pub(crate) struct SubscriptionIndex<K> {
    /// Patterns without wildcards, by their text (= the one topic they match).
    exact: HashMap<Box<str>, Members>,
    /// Trie arena; node 0 is the root. Freed nodes are reused, so churn
    /// does not grow it beyond the largest trie it held.
    nodes: Vec<Node>,
    free_nodes: Vec<NodeId>,
    clients: HashMap<K, ClientEntry>,
    /// Slot → client; None for a free slot.
    keys: Vec<Option<K>>,
    free_slots: Vec<Slot>,
    patterns: usize,
    walk: Walk,
    seen: Seen,
}

impl<K: Copy + Eq + Hash> Default for SubscriptionIndex<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Copy + Eq + Hash> SubscriptionIndex<K> {
    pub(crate) fn new() -> Self {
        SubscriptionIndex {
            exact: HashMap::new(),
            nodes: vec![Node::new(ROOT, Edge::Root)],
            free_nodes: Vec::new(),
            clients: HashMap::new(),
            keys: Vec::new(),
            free_slots: Vec::new(),
            patterns: 0,
            walk: Walk::default(),
            seen: Seen::default(),
        }
    }

    /// Subscribes a client to a pattern; false if it already had a pattern
    /// of the same text (equivalent texts such as `#` and `#.#` are
    /// distinct subscriptions, as unsubscribing names the text).
    pub(crate) fn insert(&mut self, client: K, pattern: &Pattern) -> bool {
        let text = pattern.as_str();
        if let Some(entry) = self.clients.get(&client)
            && entry.subscriptions.iter().any(|s| &*s.text == text)
        {
            return false;
        }
        let slot = match self.clients.get(&client) {
            Some(entry) => entry.slot,
            None => self.allocate_slot(client),
        };
        let node = if pattern.has_wildcard() {
            let leaf = self.leaf_for(pattern);
            *self.nodes[leaf as usize].members.entry(slot).or_insert(0) += 1;
            Some(leaf)
        } else {
            *self.exact.entry(text.into()).or_default().entry(slot).or_insert(0) += 1;
            None
        };
        self.clients
            .entry(client)
            .or_insert_with(|| ClientEntry {
                slot,
                subscriptions: Vec::new(),
            })
            .subscriptions
            .push(Subscription {
                text: text.into(),
                node,
            });
        self.patterns += 1;
        true
    }

    /// Unsubscribes a client from the pattern of that text; false if it
    /// had none.
    pub(crate) fn remove(&mut self, client: K, pattern: &str) -> bool {
        let Some(entry) = self.clients.get_mut(&client) else {
            return false;
        };
        let Some(at) = entry.subscriptions.iter().position(|s| &*s.text == pattern) else {
            return false;
        };
        let subscription = entry.subscriptions.swap_remove(at);
        let (slot, now_empty) = (entry.slot, entry.subscriptions.is_empty());
        self.patterns -= 1;
        self.detach(slot, subscription);
        if now_empty {
            self.clients.remove(&client);
            self.free_slot(slot);
        }
        true
    }

    /// Removes a client and all its patterns, at a cost proportional to
    /// them; returns how many there were.
    pub(crate) fn remove_client(&mut self, client: K) -> usize {
        let Some(entry) = self.clients.remove(&client) else {
            return 0;
        };
        let removed = entry.subscriptions.len();
        self.patterns -= removed;
        for subscription in entry.subscriptions {
            self.detach(entry.slot, subscription);
        }
        self.free_slot(entry.slot);
        removed
    }

    /// Calls `f` once for each client with at least one pattern matching
    /// the topic, however many of its patterns match, in no set order.
    /// Costs one hash lookup plus, per word, the trie nodes still alive,
    /// plus the matching subscriptions: clients that do not match are
    /// never looked at.
    pub(crate) fn for_each_match(&mut self, topic: &str, mut f: impl FnMut(K)) {
        let Self {
            exact,
            nodes,
            keys,
            walk,
            seen,
            ..
        } = self;
        seen.begin(keys.len());
        walk.begin(nodes.len());
        if let Some(members) = exact.get(topic) {
            seen.report(members, keys, &mut f);
        }
        if nodes[ROOT as usize].is_unused() {
            return;
        }
        walk.new_step();
        walk.enter(nodes, ROOT);
        walk.advance();
        // Split as `Pattern::matches` does: "" is one empty word, which
        // only `*` and `#` match.
        for word in topic.split('.') {
            walk.new_step();
            let current = std::mem::take(&mut walk.current);
            for &at in &current {
                let node = &nodes[at as usize];
                if let Some(&child) = node.exact.get(word) {
                    walk.enter(nodes, child);
                }
                if let Some(child) = node.one {
                    walk.enter(nodes, child);
                }
                if node.edge == Edge::Many {
                    walk.enter(nodes, at);
                }
            }
            walk.current = current;
            walk.advance();
            if walk.current.is_empty() {
                return;
            }
        }
        for &at in &walk.current {
            seen.report(&nodes[at as usize].members, keys, &mut f);
        }
    }

    /// Whether the client is subscribed to the pattern of that text.
    #[cfg(test)]
    pub(crate) fn contains(&self, client: K, pattern: &str) -> bool {
        self.clients
            .get(&client)
            .is_some_and(|e| e.subscriptions.iter().any(|s| &*s.text == pattern))
    }

    /// The texts of a client's patterns, in no set order.
    #[cfg(test)]
    pub(crate) fn patterns_of(&self, client: K) -> impl Iterator<Item = &str> {
        self.clients
            .get(&client)
            .into_iter()
            .flat_map(|e| e.subscriptions.iter().map(|s| &*s.text))
    }

    /// Clients with at least one pattern.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.clients.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// (client, pattern) pairs.
    #[cfg(test)]
    pub(crate) fn pattern_count(&self) -> usize {
        self.patterns
    }

    /// Trie nodes in use besides the root; zero once no wildcard pattern
    /// is left.
    #[cfg(test)]
    pub(crate) fn node_count(&self) -> usize {
        self.nodes.len() - 1 - self.free_nodes.len()
    }

    fn allocate_slot(&mut self, client: K) -> Slot {
        match self.free_slots.pop() {
            Some(slot) => {
                self.keys[slot as usize] = Some(client);
                slot
            }
            None => {
                self.keys.push(Some(client));
                (self.keys.len() - 1) as Slot
            }
        }
    }

    fn free_slot(&mut self, slot: Slot) {
        self.keys[slot as usize] = None;
        self.free_slots.push(slot);
    }

    /// The trie node where the pattern ends, created as needed.
    fn leaf_for(&mut self, pattern: &Pattern) -> NodeId {
        let mut at = ROOT;
        for word in pattern.words() {
            let node = &self.nodes[at as usize];
            let existing = match word {
                WordRef::Exact(w) => node.exact.get(w).copied(),
                WordRef::One => node.one,
                WordRef::Many => node.many,
            };
            at = match existing {
                Some(child) => child,
                None => {
                    let edge = match word {
                        WordRef::Exact(w) => Edge::Exact(w.into()),
                        WordRef::One => Edge::One,
                        WordRef::Many => Edge::Many,
                    };
                    let child = self.allocate_node(at, edge.clone());
                    let parent = &mut self.nodes[at as usize];
                    match edge {
                        Edge::Exact(w) => {
                            parent.exact.insert(w, child);
                        }
                        Edge::One => parent.one = Some(child),
                        Edge::Many | Edge::Root => parent.many = Some(child),
                    }
                    child
                }
            };
        }
        at
    }

    fn allocate_node(&mut self, parent: NodeId, edge: Edge) -> NodeId {
        match self.free_nodes.pop() {
            Some(id) => {
                self.nodes[id as usize] = Node::new(parent, edge);
                id
            }
            None => {
                self.nodes.push(Node::new(parent, edge));
                (self.nodes.len() - 1) as NodeId
            }
        }
    }

    fn detach(&mut self, slot: Slot, subscription: Subscription) {
        match subscription.node {
            None => {
                if let Some(members) = self.exact.get_mut(&*subscription.text)
                    && release(members, slot)
                {
                    self.exact.remove(&*subscription.text);
                    settle(&mut self.exact);
                }
            }
            Some(leaf) => {
                release(&mut self.nodes[leaf as usize].members, slot);
                self.prune(leaf);
            }
        }
    }

    /// Frees the node and its ancestors while they hold nothing, so the
    /// trie only ever holds live patterns' paths.
    fn prune(&mut self, mut at: NodeId) {
        while at != ROOT && self.nodes[at as usize].is_unused() {
            let vacant = std::mem::replace(&mut self.nodes[at as usize], Node::new(ROOT, Edge::Root));
            let parent = &mut self.nodes[vacant.parent as usize];
            match vacant.edge {
                Edge::Exact(w) => {
                    parent.exact.remove(&w);
                    settle(&mut parent.exact);
                }
                Edge::One => parent.one = None,
                Edge::Many => parent.many = None,
                Edge::Root => {}
            }
            self.free_nodes.push(at);
            at = vacant.parent;
        }
    }
}

/// Drops one of a client's subscriptions from a leaf; true if the leaf is
/// left empty.
fn release(members: &mut Members, slot: Slot) -> bool {
    match members.get_mut(&slot) {
        Some(count) if *count > 1 => *count -= 1,
        _ => {
            members.remove(&slot);
            settle(members);
        }
    }
    members.is_empty()
}

/// Gives memory back once a map has shrunk to a quarter of its capacity,
/// so a burst of subscriptions does not pin its peak forever (amortised:
/// halving the slack needs as many removals again).
fn settle<Q: Eq + Hash, V>(map: &mut HashMap<Q, V>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

mod walk;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod properties;
