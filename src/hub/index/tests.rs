//! The index's behaviour, one rule a test.

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
