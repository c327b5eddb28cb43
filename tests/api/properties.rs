//! Property tests (bounded, run in CI) of everything that decodes input
//! from outside: broker messages, topic patterns and client frames. None
//! may panic, whatever the bytes; the pattern matcher agrees with a plain
//! recursive definition of AMQP topic matching, and the subscription index
//! with the pattern matcher.

use product_gateway::http::ws::parse_frame;
use product_gateway::hub::index::SubscriptionIndex;
use product_gateway::hub::pattern::Pattern;
use product_gateway::wire::decode_event;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The documented version bound: 2^53 - 1, the largest integer a JavaScript
/// client holds exactly.
const JS_SAFE: i64 = (1 << 53) - 1;

/// AMQP topic matching, written the obvious (exponential) way.
fn reference(pattern: &[&str], topic: &[&str]) -> bool {
    match (pattern.first(), topic.first()) {
        (None, None) => true,
        (Some(&"#"), _) => reference(&pattern[1..], topic) || (!topic.is_empty() && reference(pattern, &topic[1..])),
        (Some(_), None) | (None, Some(_)) => false,
        (Some(&"*"), Some(_)) => reference(&pattern[1..], &topic[1..]),
        (Some(p), Some(t)) => p == t && reference(&pattern[1..], &topic[1..]),
    }
}

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("*".to_owned()),
        Just("#".to_owned())
    ]
}

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
    #![proptest_config(ProptestConfig { cases: 1000, ..config() })]

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

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decoder_never_panics_on_any_bytes(body in proptest::collection::vec(any::<u8>(), 0..600), rk in "[a-z.0-9]{0,30}") {
        let _ = decode_event(&body, Some("application/json"), &rk, 512);
        let _ = decode_event(&body, None, &rk, 512);
    }

    #[test]
    fn decoder_never_panics_on_json_like_text(
        id in any::<i64>(), v in any::<i64>(), price in any::<i64>(), kind in "(price|stock|x)", ts in any::<i64>(),
        extra in "[a-z\"{}:,0-9 ]{0,20}",
    ) {
        let body = format!(r#"{{"product_id":{id},"kind":"{kind}","price_cents":{price},"version":{v},"occurred_at":"2026-11-24T00:00:00Z","ts_us":{ts}{extra}}}"#);
        match decode_event(body.as_bytes(), None, &format!("product.{kind}.{id}"), 4096) {
            Ok(e) => {
                prop_assert!(e.version > 0 && e.product_id.get() > 0 && e.change.value() > 0);
            }
            Err(reason) => prop_assert!(!reason.code().is_empty()),
        }
    }

    #[test]
    fn decoder_accepts_exactly_the_versions_within_the_bound(
        v in prop_oneof![any::<i64>(), (JS_SAFE - 3)..=(JS_SAFE + 3), -3i64..=3, Just(i64::MAX), Just(i64::MIN)],
    ) {
        let body = format!(r#"{{"product_id":42,"kind":"price","price_cents":5,"version":{v},"occurred_at":"2026-11-24T00:00:00Z","ts_us":1}}"#);
        match decode_event(body.as_bytes(), None, "product.price.42", 4096) {
            Ok(e) => prop_assert!((1..=JS_SAFE).contains(&v) && e.version == v, "version {} accepted", v),
            Err(reason) => {
                prop_assert!(!(1..=JS_SAFE).contains(&v), "version {} refused: {:?}", v, reason);
                prop_assert_eq!(reason.code(), "invalid_value");
            }
        }
    }

    #[test]
    fn pattern_parser_never_panics(text in ".{0,300}") {
        if let Ok(p) = Pattern::parse(&text, 32) {
            let _ = p.matches("product.price.42");
        }
    }

    #[test]
    fn matcher_agrees_with_the_reference(
        pattern in proptest::collection::vec(word(), 1..7),
        topic in proptest::collection::vec(prop_oneof![Just("a"), Just("b")], 1..8),
    ) {
        let text = pattern.join(".");
        let p = Pattern::parse(&text, 32).unwrap();
        let pw: Vec<&str> = pattern.iter().map(String::as_str).collect();
        prop_assert_eq!(p.matches_words(&topic), reference(&pw, &topic), "{} vs {:?}", text, topic);
    }

    #[test]
    fn client_frame_decoder_never_panics(text in ".{0,300}") {
        if let Err(e) = parse_frame(&text) {
            prop_assert!(["bad_json", "unknown_op", "bad_frame"].contains(&e.code.as_str()));
        }
    }

    #[test]
    fn client_frames_of_the_right_shape_decode(topics in proptest::collection::vec("[a-z#*.]{1,20}", 1..5), since in any::<Option<u64>>()) {
        let frame = serde_json::json!({"op": "subscribe", "topics": topics, "since": since, "snapshot": true});
        prop_assert!(parse_frame(&frame.to_string()).is_ok());
    }
}
