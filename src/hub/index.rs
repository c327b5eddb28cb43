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

/// The trie walk's reusable state: the live nodes before and after the
/// current word, and a generation-stamped set so a node reached along
/// several paths (nested `#`s) is carried once.
#[derive(Debug, Default)]
struct Walk {
    current: Vec<NodeId>,
    next: Vec<NodeId>,
    stamps: Vec<u32>,
    generation: u32,
    /// Nodes entered by the last lookup, for tests of its cost.
    #[cfg(test)]
    entered: usize,
}

impl Walk {
    fn begin(&mut self, nodes: usize) {
        self.stamps.resize(nodes, 0);
        self.current.clear();
        self.next.clear();
        #[cfg(test)]
        {
            self.entered = 0;
        }
    }

    fn new_step(&mut self) {
        if self.generation == u32::MAX {
            self.stamps.fill(0);
            self.generation = 0;
        }
        self.generation += 1;
    }

    /// Adds a node to the next step's set, with the `#` hanging under it
    /// (which may match zero words).
    fn enter(&mut self, nodes: &[Node], mut at: NodeId) {
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
    fn advance(&mut self) {
        std::mem::swap(&mut self.current, &mut self.next);
        self.next.clear();
    }
}

/// Generation-stamped set of client slots already reported by a lookup: a
/// client matching through several patterns is reported once, at O(1) per
/// candidate and with nothing to clear between lookups.
#[derive(Debug, Default)]
struct Seen {
    stamps: Vec<u32>,
    generation: u32,
    /// Leaf members looked at by the last lookup, for tests of its cost.
    #[cfg(test)]
    candidates: usize,
}

impl Seen {
    fn begin(&mut self, slots: usize) {
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

    fn report<K: Copy>(&mut self, members: &Members, keys: &[Option<K>], f: &mut impl FnMut(K)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> Pattern {
        Pattern::parse(text, 32).unwrap()
    }

    fn index(subscriptions: &[(u64, &str)]) -> SubscriptionIndex<u64> {
        let mut index = SubscriptionIndex::new();
        for &(client, text) in subscriptions {
            assert!(index.insert(client, &pattern(text)), "{client} {text}");
        }
        index
    }

    fn matches(index: &mut SubscriptionIndex<u64>, topic: &str) -> Vec<u64> {
        let mut found = Vec::new();
        index.for_each_match(topic, |c| found.push(c));
        found.sort_unstable();
        found
    }

    #[test]
    fn hash_alone_matches_every_topic() {
        let mut ix = index(&[(1, "#")]);
        for topic in ["a", "a.b", "product.price.42", "", "a..b"] {
            assert_eq!(matches(&mut ix, topic), [1], "{topic:?}");
        }
    }

    #[test]
    fn hash_in_the_middle_matches_zero_or_more_words() {
        let mut ix = index(&[(1, "a.#.b")]);
        for topic in ["a.b", "a.x.b", "a.x.y.b", "a.b.b"] {
            assert_eq!(matches(&mut ix, topic), [1], "{topic:?}");
        }
        for topic in ["a", "b", "a.x", "x.a.b", "a.b.x"] {
            assert!(matches(&mut ix, topic).is_empty(), "{topic:?}");
        }
    }

    #[test]
    fn leading_hash_matches_any_prefix() {
        let mut ix = index(&[(1, "#.a")]);
        for topic in ["a", "x.a", "x.y.a", "a.a"] {
            assert_eq!(matches(&mut ix, topic), [1], "{topic:?}");
        }
        for topic in ["a.x", "x", ""] {
            assert!(matches(&mut ix, topic).is_empty(), "{topic:?}");
        }
    }

    #[test]
    fn star_star_matches_exactly_two_words() {
        let mut ix = index(&[(1, "*.*")]);
        assert_eq!(matches(&mut ix, "a.b"), [1]);
        assert_eq!(matches(&mut ix, "a."), [1]);
        assert!(matches(&mut ix, "a").is_empty());
        assert!(matches(&mut ix, "a.b.c").is_empty());
    }

    #[test]
    fn one_word_topics_match_one_word_patterns() {
        let mut ix = index(&[
            (1, "a"),
            (2, "*"),
            (3, "#"),
            (4, "a.#"),
            (5, "*.#"),
            (6, "*.*"),
            (7, "b"),
        ]);
        assert_eq!(matches(&mut ix, "a"), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn exact_topic_reaches_only_its_own_subscribers() {
        let mut ix = index(&[(1, "product.price.42"), (2, "product.price.43"), (3, "product.*.42")]);
        assert_eq!(matches(&mut ix, "product.price.42"), [1, 3]);
        assert_eq!(matches(&mut ix, "product.price.43"), [2]);
        assert!(matches(&mut ix, "product.price").is_empty());
    }

    #[test]
    fn client_matching_through_several_patterns_is_reported_once() {
        let mut ix = index(&[
            (1, "product.price.42"),
            (1, "product.*.42"),
            (1, "#"),
            (1, "#.#"),
            (1, "product.#"),
            (2, "#.42"),
        ]);
        let mut found = Vec::new();
        ix.for_each_match("product.price.42", |c| found.push(c));
        found.sort_unstable();
        assert_eq!(found, [1, 2]);
    }

    #[test]
    fn equivalent_patterns_are_unsubscribed_by_their_own_text() {
        let mut ix = index(&[(1, "#"), (1, "#.#")]);
        assert_eq!(ix.pattern_count(), 2);
        assert!(ix.remove(1, "#.#"));
        assert_eq!(matches(&mut ix, "a.b"), [1], "`#` still holds");
        assert!(ix.remove(1, "#"));
        assert!(matches(&mut ix, "a.b").is_empty());
        assert!(ix.is_empty());
    }

    #[test]
    fn subscribing_twice_or_removing_what_is_absent_reports_false() {
        let mut ix = index(&[(1, "a.*")]);
        assert!(!ix.insert(1, &pattern("a.*")));
        assert!(ix.insert(2, &pattern("a.*")));
        assert!(!ix.remove(1, "a.b"));
        assert!(!ix.remove(3, "a.*"));
        assert_eq!(ix.remove_client(3), 0);
        assert_eq!((ix.len(), ix.pattern_count()), (2, 2));
        assert!(ix.contains(1, "a.*") && !ix.contains(1, "a.b"));
    }

    #[test]
    fn removing_a_client_leaves_the_others() {
        let mut ix = index(&[(1, "a.*"), (1, "a.b"), (1, "#"), (2, "a.*"), (2, "a.b")]);
        assert_eq!(ix.remove_client(1), 3);
        assert_eq!(matches(&mut ix, "a.b"), [2]);
        assert!(matches(&mut ix, "c").is_empty());
        assert_eq!((ix.len(), ix.pattern_count()), (1, 2));
        assert_eq!(ix.patterns_of(1).count(), 0);
        let mut left: Vec<&str> = ix.patterns_of(2).collect();
        left.sort_unstable();
        assert_eq!(left, ["a.*", "a.b"]);
    }

    #[test]
    fn removing_everything_prunes_every_node() {
        let texts = ["a.#.b", "#", "#.a", "*.*", "a.*.c", "a.b.c", "a.#", "x.y.z.#.*"];
        let mut ix = SubscriptionIndex::new();
        for round in 0..3u64 {
            for client in 0..20u64 {
                for text in texts {
                    ix.insert(client + round * 100, &pattern(text));
                }
            }
            assert!(ix.node_count() > 0);
            let peak_arena = ix.nodes.len();
            for client in 0..20u64 {
                if client % 2 == 0 {
                    ix.remove_client(client + round * 100);
                } else {
                    for text in texts {
                        assert!(ix.remove(client + round * 100, text));
                    }
                }
            }
            assert!(ix.is_empty());
            assert_eq!((ix.pattern_count(), ix.node_count()), (0, 0));
            assert!(ix.exact.is_empty() && ix.nodes[0].is_unused());
            assert_eq!(ix.nodes.len(), peak_arena, "churn reuses freed nodes");
            assert!(matches(&mut ix, "a.b").is_empty());
        }
    }

    /// Work done by the last lookup: trie nodes entered plus leaf members
    /// looked at.
    fn work(ix: &SubscriptionIndex<u64>) -> usize {
        ix.walk.entered + ix.seen.candidates
    }

    #[test]
    fn lookup_work_does_not_grow_with_clients_that_do_not_match() {
        let mut ix = index(&[(0, "product.*.42"), (1, "product.price.42"), (2, "#.42")]);
        let measure = |ix: &mut SubscriptionIndex<u64>| {
            assert_eq!(matches(ix, "product.price.42"), [0, 1, 2]);
            work(ix)
        };
        let alone = measure(&mut ix);
        let mut client = 10;
        for crowd in [1_000u64, 10_000] {
            // Each crowd of clients one product each, in every shape of
            // pattern the pages use, none of them product 42.
            while client < 10 + crowd {
                let id = 1000 + client;
                ix.insert(client, &pattern(&format!("product.*.{id}")));
                ix.insert(client, &pattern(&format!("product.price.{id}")));
                ix.insert(client, &pattern(&format!("product.{id}.#")));
                ix.insert(client, &pattern(&format!("#.{id}")));
                client += 1;
            }
            let crowded = measure(&mut ix);
            println!("lookup work: {alone} alone, {crowded} beside {crowd} clients that do not match");
            assert_eq!(crowded, alone, "with {crowd} clients that do not match");
        }
    }

    #[test]
    fn nested_hashes_enter_each_node_once_per_word() {
        let mut ix = SubscriptionIndex::new();
        for n in 1..=15 {
            ix.insert(n, &pattern(&["#", "a"].repeat(n as usize).join(".")));
        }
        let topic = vec!["a"; 60].join(".");
        assert_eq!(matches(&mut ix, &topic), (1..=15).collect::<Vec<_>>());
        let bound = (ix.node_count() + 1) * (60 + 1);
        assert!(ix.walk.entered <= bound, "{} > {bound}", ix.walk.entered);
        assert!(matches(&mut ix, &(topic + ".b")).is_empty());
    }
}

#[cfg(test)]
mod properties {
    //! The index agrees with the pattern matcher under any sequence of
    //! subscribes, unsubscribes and client removals.

    use super::*;
    use crate::hub::pattern::Pattern;
    use proptest::prelude::*;

    /// What a shard does to its index. Few clients and few words, so patterns
    /// and wildcards collide a lot.
    #[derive(Debug, Clone)]
    enum IndexOp {
        Subscribe(u64, String),
        Unsubscribe(u64, String),
        RemoveClient(u64),
    }

    fn index_pattern() -> impl Strategy<Value = String> {
        let word = prop_oneof![Just("a"), Just("b"), Just("c"), Just("*"), Just("#")];
        proptest::collection::vec(word, 1..5).prop_map(|w| w.join("."))
    }

    fn index_op() -> impl Strategy<Value = IndexOp> {
        prop_oneof![
            4 => (0..6u64, index_pattern()).prop_map(|(c, p)| IndexOp::Subscribe(c, p)),
            2 => (0..6u64, index_pattern()).prop_map(|(c, p)| IndexOp::Unsubscribe(c, p)),
            1 => (0..6u64).prop_map(IndexOp::RemoveClient),
        ]
    }

    fn index_topic() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..6).prop_map(|w| w.join(".")),
            // Empty topic, empty words, leading and trailing dots.
            1 => "[abc.]{0,6}",
        ]
    }

    proptest! {
        // Each case runs up to 40 operations and checks up to 4 topics after
        // each: fewer cases cover as much as the others' 3,000.
        #![proptest_config(ProptestConfig { cases: 1000, ..crate::testing::proptest_config() })]

        #[test]
        fn index_reports_each_matching_client_once_as_the_matcher_says(
            ops in proptest::collection::vec(index_op(), 1..40),
            topics in proptest::collection::vec(index_topic(), 1..5),
        ) {
            let mut index = SubscriptionIndex::new();
            let mut live: Vec<(u64, Pattern)> = Vec::new();
            for op in &ops {
                match op {
                    IndexOp::Subscribe(client, text) => {
                        let pattern = Pattern::parse(text, 32).unwrap();
                        let fresh = !live.iter().any(|(c, p)| c == client && p.as_str() == text);
                        prop_assert_eq!(index.insert(*client, &pattern), fresh, "{:?}", op);
                        if fresh {
                            live.push((*client, pattern));
                        }
                    }
                    IndexOp::Unsubscribe(client, text) => {
                        let before = live.len();
                        live.retain(|(c, p)| !(c == client && p.as_str() == text));
                        prop_assert_eq!(index.remove(*client, text), live.len() < before, "{:?}", op);
                    }
                    IndexOp::RemoveClient(client) => {
                        let before = live.len();
                        live.retain(|(c, _)| c != client);
                        prop_assert_eq!(index.remove_client(*client), before - live.len(), "{:?}", op);
                    }
                }
                let mut clients: Vec<u64> = live.iter().map(|(c, _)| *c).collect();
                clients.sort_unstable();
                clients.dedup();
                prop_assert_eq!((index.len(), index.pattern_count()), (clients.len(), live.len()));
                for topic in &topics {
                    let mut found = Vec::new();
                    index.for_each_match(topic, |c| found.push(c));
                    found.sort_unstable();
                    let reported = found.len();
                    found.dedup();
                    prop_assert_eq!(found.len(), reported, "a client reported twice for {:?}", topic);
                    let mut expected: Vec<u64> = live.iter().filter(|(_, p)| p.matches(topic)).map(|(c, _)| *c).collect();
                    expected.sort_unstable();
                    expected.dedup();
                    prop_assert_eq!(&found, &expected, "topic {:?} after {:?}", topic, op);
                }
            }
            // Draining by both paths leaves nothing behind.
            for (client, pattern) in live.iter().filter(|(c, _)| c % 2 == 0) {
                prop_assert!(index.remove(*client, pattern.as_str()));
            }
            for client in 0..6 {
                index.remove_client(client);
            }
            prop_assert!(index.is_empty());
            prop_assert_eq!((index.pattern_count(), index.node_count()), (0, 0));
        }
    }
}
