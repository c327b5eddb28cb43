//! The chaos run's verdicts as pure functions of what it collected: the
//! confirmed events (the audit copy), the update stream, the final catalog,
//! what each client saw and the samples taken while a fault healed. Kept
//! apart from the run so each rule can be tested on small hand-made cases.

use std::collections::HashMap;
use std::time::Duration;

/// A product and a kind of change (`"price"` or `"stock"`).
pub type Key = (i64, String);

/// `(value, version)` per key: the catalog, a client's view, or the newest
/// confirmed event of each key.
pub type State = HashMap<Key, (i64, i64)>;

/// One event the broker confirmed.
#[derive(Debug, Clone, PartialEq)]
pub struct Confirmed {
    pub key: Key,
    pub value: i64,
    pub version: i64,
}

/// One update as a client saw it, or as the stream holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub offset: u64,
    pub topic: String,
    pub product: i64,
    pub kind: String,
    pub version: i64,
    pub value: i64,
}

impl Seen {
    /// From an update's data (`product_id`, `kind`, `version` and the
    /// kind's value); None when a field is missing.
    pub fn from_data(offset: u64, topic: &str, d: &serde_json::Value) -> Option<Seen> {
        let kind = d["kind"].as_str()?.to_owned();
        let value = if kind == "price" {
            d["price_cents"].as_i64()?
        } else {
            d["stock"].as_i64()?
        };
        Some(Seen {
            offset,
            topic: topic.to_owned(),
            product: d["product_id"].as_i64()?,
            kind,
            version: d["version"].as_i64()?,
            value,
        })
    }

    pub fn key(&self) -> Key {
        (self.product, self.kind.clone())
    }
}

/// Confirmed events the catalog does not account for: their version is
/// newer than the one the catalog holds for their key.
pub fn lost(confirmed: &[Confirmed], catalog: &State) -> usize {
    confirmed
        .iter()
        .filter(|e| e.version > catalog.get(&e.key).map_or(0, |&(_, v)| v))
        .count()
}

/// The newest confirmed `(value, version)` of every key.
pub fn newest(confirmed: &[Confirmed]) -> State {
    let mut out = State::new();
    for e in confirmed {
        let n = out.entry(e.key.clone()).or_insert((0, 0));
        if e.version > n.1 {
            *n = (e.value, e.version);
        }
    }
    out
}

/// Keys of `view` whose `(value, version)` differs from the database's.
pub fn differing(view: &State, database: &State) -> usize {
    view.iter().filter(|(k, v)| database.get(*k) != Some(*v)).count()
}

/// How the stream orders versions of a key: an older version after a newer
/// one (a regression: a change applied twice, the second time over a newer
/// one) and the same version again (a harmless re-broadcast).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamOrder {
    pub regressions: usize,
    pub rebroadcasts: usize,
}

pub fn stream_order(stream: &[Seen]) -> StreamOrder {
    let mut last: HashMap<Key, i64> = HashMap::new();
    let mut order = StreamOrder::default();
    for s in stream {
        let v = last.entry(s.key()).or_insert(0);
        if s.version < *v {
            order.regressions += 1;
        } else if s.version == *v {
            order.rebroadcasts += 1;
        }
        *v = s.version;
    }
    order
}

/// What one client saw, judged against the stream and the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientVerdict {
    pub updates: usize,
    /// Offsets strictly increase: nothing twice, nothing out of order.
    pub duplicate_free: bool,
    /// Exactly the stream's matching updates over the span it covered.
    pub gap_free: bool,
    /// Its last value of every key is the catalog's.
    pub converged: bool,
}

impl ClientVerdict {
    pub fn ok(&self) -> bool {
        self.duplicate_free && self.gap_free && self.converged && self.updates > 0
    }
}

/// Judges a client's updates; `matches` says whether a topic is one the
/// client subscribed to.
pub fn client(seen: &[Seen], stream: &[Seen], matches: impl Fn(&str) -> bool, catalog: &State) -> ClientVerdict {
    let got: Vec<u64> = seen.iter().map(|s| s.offset).collect();
    let (first, last) = (got.first().copied().unwrap_or(0), got.last().copied().unwrap_or(0));
    let want: Vec<u64> = stream
        .iter()
        .filter(|s| s.offset >= first && s.offset <= last && matches(&s.topic))
        .map(|s| s.offset)
        .collect();
    let mut view = State::new();
    for s in seen {
        view.insert(s.key(), (s.value, s.version));
    }
    ClientVerdict {
        updates: got.len(),
        duplicate_free: got.windows(2).all(|w| w[0] < w[1]),
        gap_free: got == want,
        converged: differing(&view, catalog) == 0,
    }
}

/// One look at the service while a fault heals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Since the fault ended.
    pub at: Duration,
    /// Every instance answered ready.
    pub all_ready: bool,
    /// Sum of applied versions; negative when the database did not answer.
    pub applied: i64,
}

/// When the service recovered: the first sample at which every instance is
/// ready and more has been applied than `before` (the sum when the fault
/// ended). None while it has not.
pub fn recovered_at(before: i64, samples: &[Sample]) -> Option<Duration> {
    samples
        .iter()
        .find(|s| s.all_ready && s.applied > before.max(0))
        .map(|s| s.at)
}

/// The longest stretch of `[from, to)` in which nothing happened, given
/// when things happened (in order): how long publishing, applying or a
/// client's deliveries were unavailable during a fault.
pub fn longest_pause(events: &[std::time::Instant], from: std::time::Instant, to: std::time::Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for &t in events.iter().filter(|&&t| t >= from && t < to) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(to.saturating_duration_since(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: i64, kind: &str) -> Key {
        (id, kind.to_owned())
    }

    fn ev(id: i64, kind: &str, value: i64, version: i64) -> Confirmed {
        Confirmed {
            key: key(id, kind),
            value,
            version,
        }
    }

    fn seen(offset: u64, id: i64, kind: &str, value: i64, version: i64) -> Seen {
        Seen {
            offset,
            topic: format!("product.{kind}.{id}"),
            product: id,
            kind: kind.to_owned(),
            version,
            value,
        }
    }

    fn state(entries: &[(i64, &str, i64, i64)]) -> State {
        entries
            .iter()
            .map(|&(id, k, val, ver)| (key(id, k), (val, ver)))
            .collect()
    }

    #[test]
    fn nothing_is_lost_when_the_catalog_holds_every_newest_version() {
        let confirmed = [ev(1, "price", 10, 1), ev(1, "price", 11, 2), ev(2, "stock", 5, 1)];
        let catalog = state(&[(1, "price", 11, 2), (2, "stock", 5, 1)]);
        assert_eq!(lost(&confirmed, &catalog), 0);
    }

    #[test]
    fn a_confirmed_version_newer_than_the_catalog_counts_as_lost() {
        let confirmed = [ev(1, "price", 10, 1), ev(1, "price", 11, 2), ev(3, "stock", 1, 1)];
        let catalog = state(&[(1, "price", 10, 1)]);
        // Version 2 of product 1 and everything of product 3 never arrived.
        assert_eq!(lost(&confirmed, &catalog), 2);
    }

    #[test]
    fn newest_keeps_the_highest_version_whatever_the_order() {
        let confirmed = [ev(1, "price", 12, 3), ev(1, "price", 10, 1), ev(1, "stock", 4, 2)];
        assert_eq!(newest(&confirmed), state(&[(1, "price", 12, 3), (1, "stock", 4, 2)]));
    }

    #[test]
    fn a_view_equals_the_database_only_when_every_key_agrees() {
        let db = state(&[(1, "price", 10, 1), (2, "price", 20, 4)]);
        assert_eq!(differing(&state(&[(1, "price", 10, 1)]), &db), 0);
        assert_eq!(differing(&state(&[(2, "price", 20, 3)]), &db), 1);
        assert_eq!(differing(&state(&[(9, "stock", 1, 1)]), &db), 1);
    }

    #[test]
    fn an_older_version_after_a_newer_one_is_a_regression_and_a_repeat_is_a_rebroadcast() {
        let stream = [
            seen(1, 1, "price", 10, 1),
            seen(2, 1, "price", 11, 2),
            seen(3, 1, "price", 11, 2),
            seen(4, 1, "price", 10, 1),
            seen(5, 1, "stock", 3, 1),
        ];
        assert_eq!(
            stream_order(&stream),
            StreamOrder {
                regressions: 1,
                rebroadcasts: 1
            }
        );
    }

    #[test]
    fn a_client_that_saw_every_matching_update_once_passes() {
        let stream = [
            seen(1, 1, "price", 10, 1),
            seen(2, 2, "stock", 5, 1),
            seen(3, 1, "price", 11, 2),
        ];
        let catalog = state(&[(1, "price", 11, 2), (2, "stock", 5, 1)]);
        let prices = |t: &str| t.starts_with("product.price.");
        let v = client(&[stream[0].clone(), stream[2].clone()], &stream, prices, &catalog);
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.updates, 2);
    }

    #[test]
    fn a_client_missing_an_update_inside_its_span_has_a_gap() {
        let stream = [
            seen(1, 1, "price", 10, 1),
            seen(2, 1, "price", 11, 2),
            seen(3, 1, "price", 12, 3),
        ];
        let catalog = state(&[(1, "price", 12, 3)]);
        let v = client(&[stream[0].clone(), stream[2].clone()], &stream, |_| true, &catalog);
        assert!(!v.gap_free && v.duplicate_free && v.converged, "{v:?}");
        assert!(!v.ok());
    }

    #[test]
    fn a_client_seeing_an_offset_twice_is_not_duplicate_free() {
        let stream = [seen(1, 1, "price", 10, 1), seen(2, 1, "price", 11, 2)];
        let catalog = state(&[(1, "price", 11, 2)]);
        let got = [stream[0].clone(), stream[1].clone(), stream[1].clone()];
        let v = client(&got, &stream, |_| true, &catalog);
        assert!(!v.duplicate_free && !v.gap_free, "{v:?}");
    }

    #[test]
    fn a_client_whose_last_value_is_stale_has_not_converged() {
        let stream = [seen(1, 1, "price", 10, 1)];
        let catalog = state(&[(1, "price", 11, 2)]);
        let v = client(&stream, &stream, |_| true, &catalog);
        assert!(v.gap_free && v.duplicate_free && !v.converged, "{v:?}");
    }

    #[test]
    fn a_client_that_saw_nothing_fails() {
        let v = client(&[], &[], |_| true, &State::new());
        assert!(!v.ok());
    }

    #[test]
    fn recovery_needs_every_instance_ready_and_new_applies() {
        let ms = Duration::from_millis;
        let samples = [
            Sample {
                at: ms(100),
                all_ready: false,
                applied: 120,
            },
            Sample {
                at: ms(200),
                all_ready: true,
                applied: 100,
            },
            Sample {
                at: ms(300),
                all_ready: true,
                applied: 101,
            },
        ];
        assert_eq!(recovered_at(100, &samples), Some(ms(300)));
        assert_eq!(recovered_at(101, &samples), None);
    }

    #[test]
    fn a_database_that_did_not_answer_before_counts_as_zero_applied() {
        let samples = [
            Sample {
                at: Duration::from_millis(50),
                all_ready: true,
                applied: -1,
            },
            Sample {
                at: Duration::from_millis(90),
                all_ready: true,
                applied: 1,
            },
        ];
        assert_eq!(recovered_at(-1, &samples), Some(Duration::from_millis(90)));
    }

    #[test]
    fn seen_reads_the_value_of_its_kind() {
        let d = serde_json::json!({"product_id": 7, "kind": "stock", "stock": 3, "version": 2});
        assert_eq!(
            Seen::from_data(9, "product.stock.7", &d),
            Some(seen(9, 7, "stock", 3, 2))
        );
        let bad = serde_json::json!({"product_id": 7, "kind": "price", "version": 2});
        assert_eq!(Seen::from_data(9, "product.price.7", &bad), None);
    }

    #[test]
    fn the_longest_pause_counts_from_the_window_start_to_its_end() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let events = [at(50), at(100), at(900), at(1000), at(2500)];
        assert_eq!(longest_pause(&events, at(0), at(1200)), Duration::from_millis(800));
        assert_eq!(longest_pause(&events, at(950), at(1200)), Duration::from_millis(200));
        assert_eq!(
            longest_pause(&[], at(0), at(300)),
            Duration::from_millis(300),
            "nothing at all"
        );
    }
}
