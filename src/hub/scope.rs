//! What a connection may subscribe to: the topic patterns its token grants
//! (or the anonymous ones). A requested pattern is allowed when every topic
//! it can match is matched by some granted pattern, so `product.*.42` is
//! allowed by `product.price.*` and `product.stock.*` together only if no
//! other word could stand in its `*`: it is not.
//!
//! Decided exactly, not by comparing texts: both sides are walked as
//! automata over the words they name, plus one word standing for every
//! word neither names. A word sequence the request matches and no grant
//! does is a refusal.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::pattern::{Pattern, WordRef};

/// Pairs of states one subscribe may explore, over all its patterns, before
/// the rest is refused as too costly to decide: a pattern of many `#`
/// against grants of many `#` can take millions, and the check runs on the
/// connection's worker. Ordinary patterns take a few dozen.
pub(crate) const CHECK_BUDGET: usize = 4096;

/// The patterns a connection holds a grant for. Shared: every anonymous
/// connection holds the one anonymous scope, not a copy.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    granted: Arc<[Pattern]>,
}

impl Scope {
    pub fn new(granted: Vec<Pattern>) -> Self {
        Self {
            granted: granted.into(),
        }
    }

    /// This scope and `more`.
    pub fn with(&self, more: impl IntoIterator<Item = Pattern>) -> Scope {
        let mut granted = self.granted.to_vec();
        granted.extend(more);
        Scope::new(granted)
    }

    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.granted.iter().map(Pattern::as_str)
    }

    /// Whether every topic `requested` matches is matched by a granted
    /// pattern.
    pub fn allows(&self, requested: &Pattern) -> bool {
        self.allows_within(requested, &mut { CHECK_BUDGET })
    }

    /// [`Scope::allows`], exploring at most `budget` pairs of states (taken
    /// from it); false once the budget is spent.
    pub fn allows_within(&self, requested: &Pattern, budget: &mut usize) -> bool {
        if self.granted.is_empty() {
            return false;
        }
        // The common grants need no search.
        if self.granted.iter().any(|g| g.words().all(|w| w == WordRef::Many)) {
            return true;
        }
        if !requested.has_wildcard() {
            return self.granted.iter().any(|g| g.matches(requested.as_str()));
        }
        Containment::new(requested, &self.granted).holds(budget)
    }
}

/// What a connection may do, and until when.
#[derive(Debug, Clone)]
pub struct Grant {
    pub scope: Scope,
    /// None for the anonymous grant, which does not expire.
    pub expires: Option<SystemTime>,
    /// The token's `sub`, for the connection's log lines.
    pub subject: Option<String>,
}

impl Grant {
    /// Time left before the grant expires (zero once it has); None: never.
    pub fn remaining(&self) -> Option<Duration> {
        self.expires
            .map(|at| at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
    }

    /// `expires` as seconds since the epoch, as the token's `exp` was.
    pub fn expires_unix(&self) -> Option<u64> {
        self.expires
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    }
}

/// A word of the finite alphabet the search runs over: a word some pattern
/// names, or `Other` for all the words none of them names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Symbol<'a> {
    Named(&'a str),
    Other,
}

/// One pattern as an automaton: state `i` has matched its first `i` words.
struct Automaton<'a> {
    words: Vec<WordRef<'a>>,
}

impl<'a> Automaton<'a> {
    fn new(p: &'a Pattern) -> Self {
        Self {
            words: p.words().collect(),
        }
    }

    /// `i` with every state reachable from it without reading a word (past
    /// a `#` that matches none).
    fn close(&self, mut i: usize, into: &mut dyn FnMut(usize)) {
        into(i);
        while self.words.get(i) == Some(&WordRef::Many) {
            i += 1;
            into(i);
        }
    }

    /// States reached from `i` by reading `s`, closed.
    fn step(&self, i: usize, s: Symbol<'_>, into: &mut dyn FnMut(usize)) {
        match (self.words.get(i), s) {
            (Some(WordRef::Many), _) => self.close(i, into),
            (Some(WordRef::One), _) => self.close(i + 1, into),
            (Some(WordRef::Exact(w)), Symbol::Named(n)) if *w == n => self.close(i + 1, into),
            _ => {}
        }
    }

    fn accepts(&self, i: usize) -> bool {
        i == self.words.len()
    }
}

/// Is L(requested) ⊆ ∪ L(granted)? A breadth-first search over pairs (one
/// state of the request, the set of states every grant is in after the
/// same words) for a pair where the request accepts and no grant does.
struct Containment<'a> {
    request: Automaton<'a>,
    grants: Vec<Automaton<'a>>,
    /// Index of each grant's state 0 in the flat state sets.
    offsets: Vec<usize>,
    alphabet: Vec<Symbol<'a>>,
}

impl<'a> Containment<'a> {
    fn new(requested: &'a Pattern, granted: &'a [Pattern]) -> Self {
        let request = Automaton::new(requested);
        let grants: Vec<Automaton> = granted.iter().map(Automaton::new).collect();
        let mut offsets = Vec::with_capacity(grants.len());
        let mut total = 0;
        for g in &grants {
            offsets.push(total);
            total += g.words.len() + 1;
        }
        let mut named = HashSet::new();
        for w in request.words.iter().chain(grants.iter().flat_map(|g| g.words.iter())) {
            if let WordRef::Exact(w) = w {
                named.insert(*w);
            }
        }
        let mut alphabet: Vec<Symbol> = named.into_iter().map(Symbol::Named).collect();
        alphabet.push(Symbol::Other);
        Self {
            request,
            grants,
            offsets,
            alphabet,
        }
    }

    fn holds(&self, budget: &mut usize) -> bool {
        // A topic has at least one word (`"".split('.')` is one empty word),
        // so the start, before any word, is never a counterexample: a
        // state is checked only once reached by reading a word.
        let start = self.grant_set(|_, g, into| g.close(0, into));
        let mut seen: HashSet<(usize, Vec<bool>, bool)> = HashSet::new();
        let mut queue = VecDeque::new();
        self.request.close(0, &mut |p| {
            if seen.insert((p, start.clone(), false)) {
                queue.push_back((p, start.clone(), false));
            }
        });
        while let Some((p, grants, read)) = queue.pop_front() {
            if read && self.request.accepts(p) && !self.any_accepts(&grants) {
                return false;
            }
            for &s in &self.alphabet {
                let next_grants = self.grant_set(|k, g, into| {
                    let base = self.offsets[k];
                    for i in (0..=g.words.len()).filter(|i| grants[base + i]) {
                        g.step(i, s, into);
                    }
                });
                let mut next = Vec::new();
                self.request.step(p, s, &mut |q| next.push(q));
                for q in next {
                    if *budget == 0 {
                        return false;
                    }
                    *budget -= 1;
                    if seen.insert((q, next_grants.clone(), true)) {
                        queue.push_back((q, next_grants.clone(), true));
                    }
                }
            }
        }
        true
    }

    /// The flat set of grant states `visit` puts each grant (by index) in.
    fn grant_set(&self, visit: impl Fn(usize, &Automaton<'a>, &mut dyn FnMut(usize))) -> Vec<bool> {
        let total = self
            .offsets
            .last()
            .zip(self.grants.last())
            .map_or(0, |(o, g)| o + g.words.len() + 1);
        let mut set = vec![false; total];
        for (k, (g, base)) in self.grants.iter().zip(&self.offsets).enumerate() {
            visit(k, g, &mut |i| set[base + i] = true);
        }
        set
    }

    fn any_accepts(&self, set: &[bool]) -> bool {
        self.grants
            .iter()
            .zip(&self.offsets)
            .any(|(g, base)| set[base + g.words.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(granted: &[&str]) -> Scope {
        Scope::new(granted.iter().map(|g| Pattern::parse(g, 32).unwrap()).collect())
    }

    fn allows(granted: &[&str], requested: &str) -> bool {
        scope(granted).allows(&Pattern::parse(requested, 32).unwrap())
    }

    #[test]
    fn a_grant_allows_what_it_covers_and_nothing_wider() {
        let public = ["product.price.*", "product.stock.*"];
        assert!(allows(&public, "product.price.42"));
        assert!(allows(&public, "product.price.*"));
        assert!(allows(&public, "product.stock.*"));
        assert!(!allows(&public, "product.*.42"), "a * kind could be any word");
        assert!(!allows(&public, "product.#"));
        assert!(!allows(&public, "#"));
        assert!(!allows(&public, "product.price.#"), "# also matches product.price");
        assert!(allows(&["product.#"], "product.*.42"));
        assert!(allows(&["product.#"], "product.price.#"));
        assert!(allows(&["product.#"], "product"));
        assert!(!allows(&["product.#"], "#"));
        assert!(allows(&["#"], "#"));
        assert!(allows(&["#.42"], "product.*.42"));
        assert!(!allows(&["#.42"], "product.*.*"));
        assert!(allows(&["product.*.42"], "product.price.42"));
        assert!(!allows(&["product.*.42"], "product.price.43"));
        assert!(!allows(&[], "product.price.42"));
    }

    #[test]
    fn grants_together_can_cover_what_none_covers_alone() {
        // `product.*` splits into `product` and longer topics.
        assert!(allows(&["product", "product.*.#"], "product.#"));
        assert!(!allows(&["product", "product.*.*.#"], "product.#"));
        // No topic is empty: `#` matches nothing `*.#` does not.
        assert!(allows(&["*.#"], "#"));
        assert!(allows(&["a.b.#", "a.*.c", "a.*.c.#"], "a.*.c.#"));
    }

    /// Every topic of up to `len` words over `alphabet`.
    fn topics(alphabet: &[&str], len: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut layer = vec![String::new()];
        for _ in 0..len {
            layer = layer
                .iter()
                .flat_map(|t| {
                    alphabet.iter().map(move |w| {
                        if t.is_empty() {
                            w.to_string()
                        } else {
                            format!("{t}.{w}")
                        }
                    })
                })
                .collect();
            all.extend(layer.iter().cloned());
        }
        all.retain(|t| !t.is_empty());
        all
    }

    fn pattern() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        proptest::collection::vec(prop_oneof!["a", "b", Just("*".to_owned()), Just("#".to_owned())], 1..4)
            .prop_map(|w| w.join("."))
    }

    proptest::proptest! {
        /// Against the matcher on every topic of up to five words over the
        /// patterns' words and one they do not name: allowed exactly when no
        /// topic matches the request and no grant.
        #[test]
        fn allowed_exactly_when_no_topic_escapes_the_grants(
            granted in proptest::collection::vec(pattern(), 0..4),
            requested in pattern(),
        ) {
            let granted: Vec<&str> = granted.iter().map(String::as_str).collect();
            let scope = scope(&granted);
            let req = Pattern::parse(&requested, 32).unwrap();
            let escaping = topics(&["a", "b", "zz"], 5)
                .into_iter()
                .find(|t| req.matches(t) && !scope.granted.iter().any(|g| g.matches(t)));
            proptest::prop_assert_eq!(scope.allows(&req), escaping.is_none(), "escaping topic: {:?}", escaping);
        }
    }

    #[test]
    fn a_pattern_too_costly_to_check_is_refused_within_the_budget() {
        let words: Vec<String> = (0..32)
            .map(|i| if i % 2 == 0 { "#".into() } else { format!("w{i}") })
            .collect();
        let hostile = Pattern::parse(&words.join("."), 32).unwrap();
        let grants: Vec<String> = (0..8).map(|i| format!("#.g{i}.#.*.#")).collect();
        let grants: Vec<&str> = grants.iter().map(String::as_str).collect();
        let mut budget = CHECK_BUDGET;
        assert!(!scope(&grants).allows_within(&hostile, &mut budget));
        assert_eq!(budget, 0, "refused because the budget ran out");
        // An ordinary check costs a few dozen pairs.
        let mut budget = CHECK_BUDGET;
        assert!(scope(&["product.#"]).allows_within(&Pattern::parse("product.*.42", 32).unwrap(), &mut budget));
        assert!(CHECK_BUDGET - budget < 64, "{} pairs", CHECK_BUDGET - budget);
    }
}
