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
