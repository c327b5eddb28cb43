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

/// What a client that began with a snapshot saw, judged against the
/// stream: the snapshot (`(value, version)` per key) and where updates
/// resume after it (`from`, the snapshot's offset), then its updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotVerdict {
    pub updates: usize,
    /// No update it already held (by the snapshot or an earlier update)
    /// came again or out of order.
    pub duplicate_free: bool,
    /// Every stream update after the snapshot and newer than what it held
    /// came, up to the last one it saw, and none the snapshot should have
    /// held is missing: at the end it holds, per key, at least the newest
    /// version the stream had broadcast by then.
    pub gap_free: bool,
}

pub fn snapshot_client(snapshot: &State, from: u64, seen: &[Seen], stream: &[Seen]) -> SnapshotVerdict {
    let mut view: HashMap<Key, i64> = snapshot.iter().map(|(k, &(_, v))| (k.clone(), v)).collect();
    let mut duplicate_free = true;
    for s in seen {
        let held = view.entry(s.key()).or_insert(0);
        duplicate_free &= s.version > *held && s.offset > from;
        *held = (*held).max(s.version);
    }
    let last = seen.last().map_or(from, |s| s.offset.max(from));
    let got: Vec<u64> = seen.iter().map(|s| s.offset).collect();
    let want: Vec<u64> = stream
        .iter()
        .filter(|s| s.offset > from && s.offset <= last)
        .filter(|s| s.version > snapshot.get(&s.key()).map_or(0, |&(_, v)| v))
        .map(|s| s.offset)
        .collect();
    let behind = stream
        .iter()
        .filter(|s| s.offset <= last)
        .any(|s| view.get(&s.key()).is_none_or(|&v| v < s.version));
    SnapshotVerdict {
        updates: seen.len(),
        duplicate_free,
        gap_free: got == want && !behind,
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

    #[test]
    fn a_snapshot_client_is_gap_free_with_every_newer_update_after_its_offset() {
        let stream = [
            seen(1, 1, "price", 10, 1),
            seen(2, 2, "price", 20, 1),
            seen(3, 1, "price", 11, 2),
            seen(4, 2, "price", 21, 2),
            seen(5, 1, "price", 12, 3),
        ];
        // Snapshot at offset 2 (held both first versions), then 3, 4, 5.
        let snap = state(&[(1, "price", 10, 1), (2, "price", 20, 1)]);
        let v = snapshot_client(&snap, 2, &stream[2..], &stream);
        assert!(v.gap_free && v.duplicate_free, "{v:?}");
        // Update 4 missing in between.
        let v = snapshot_client(&snap, 2, &[stream[2].clone(), stream[4].clone()], &stream);
        assert!(!v.gap_free && v.duplicate_free, "{v:?}");
        // A snapshot already holding product 2's version 2 (committed after
        // offset 2, broadcast at 4): update 4 is rightly not sent.
        let newer = state(&[(1, "price", 10, 1), (2, "price", 21, 2)]);
        let v = snapshot_client(&newer, 2, &[stream[2].clone(), stream[4].clone()], &stream);
        assert!(v.gap_free && v.duplicate_free, "{v:?}");
        // ... but sending it again is a duplicate.
        let v = snapshot_client(&newer, 2, &stream[2..], &stream);
        assert!(!v.duplicate_free, "{v:?}");
    }

    #[test]
    fn a_snapshot_missing_what_was_broadcast_before_its_offset_is_a_gap() {
        // A replica behind: the snapshot at offset 3 still has product 1 at
        // version 1, though version 2 went out at offset 3, before it.
        let stream = [
            seen(1, 1, "price", 10, 1),
            seen(3, 1, "price", 11, 2),
            seen(4, 2, "stock", 5, 1),
        ];
        let stale = state(&[(1, "price", 10, 1)]);
        let v = snapshot_client(&stale, 3, &stream[2..], &stream);
        assert!(!v.gap_free, "{v:?}");
        let fresh = state(&[(1, "price", 11, 2)]);
        let v = snapshot_client(&fresh, 3, &stream[2..], &stream);
        assert!(v.gap_free && v.duplicate_free, "{v:?}");
    }
}
