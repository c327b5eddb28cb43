//! An applied update as read from the update stream, with its client
//! frames serialised once (every client gets the same bytes), and the id
//! scheme that numbers updates. Neutral ground: the broker's stream reader
//! produces these and the hub fans them out, so neither names the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use bytestring::ByteString;
use serde::Deserialize;

use crate::domain::Kind;
use crate::trace::Traced;

/// Updates in one stream message at most; an update's id is
/// `stream offset × MAX_UPDATES_PER_MESSAGE + index`, so ids grow with the
/// stream and a client can resume from any of them.
pub const MAX_UPDATES_PER_MESSAGE: usize = 1024;

/// The id of the update at `index` in the stream message at `offset`.
pub fn update_id(offset: u64, index: usize) -> u64 {
    offset * MAX_UPDATES_PER_MESSAGE as u64 + index as u64
}

/// The stream offset of the message holding update `id`.
pub fn stream_offset_of(id: u64) -> u64 {
    id / MAX_UPDATES_PER_MESSAGE as u64
}

#[derive(Debug)]
pub struct Update {
    /// Stream offset: the update's global id.
    pub offset: u64,
    pub topic: Box<str>,
    pub product_id: i64,
    pub kind: Kind,
    pub version: i64,
    pub ts_us: i64,
    /// The database transaction that committed it (the stream message's
    /// `x-txid` header); None for messages written before it was recorded.
    pub txid: Option<u64>,
    /// `{"type":"update",...}` WebSocket text frame.
    pub ws_frame: ByteString,
    /// `id:/event:/data:` SSE event.
    pub sse_event: Bytes,
    /// The trace it carries to a socket, when its stream message's is
    /// recorded.
    pub trace: Option<Arc<Traced>>,
}

#[derive(Deserialize)]
struct Head {
    product_id: i64,
    kind: Kind,
    version: i64,
    #[serde(default)]
    ts_us: i64,
}

impl Update {
    /// The updates of one stream message: a JSON array of updates (a
    /// committed batch) or a single update. Entries that are not updates are
    /// skipped (nothing else is published there, but never trust it).
    pub fn from_message(offset: u64, txid: Option<u64>, body: &[u8]) -> Vec<Self> {
        let mut updates = Self::decode_message(offset, body);
        for u in &mut updates {
            u.txid = txid;
        }
        updates
    }

    fn decode_message(offset: u64, body: &[u8]) -> Vec<Self> {
        if body.first() == Some(&b'[') {
            let Ok(items) = serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(body) else {
                return Vec::new();
            };
            items
                .iter()
                .enumerate()
                .take(MAX_UPDATES_PER_MESSAGE)
                .filter_map(|(i, raw)| Self::from_stream(update_id(offset, i), "", raw.get().as_bytes()))
                .collect()
        } else {
            Self::from_stream(update_id(offset, 0), "", body).into_iter().collect()
        }
    }

    /// Builds one update with id `offset` from its JSON; None when the body
    /// is not an update.
    pub fn from_stream(offset: u64, routing_key: &str, body: &[u8]) -> Option<Self> {
        let head: Head = serde_json::from_slice(body).ok()?;
        let data = std::str::from_utf8(body).ok()?;
        let topic = if routing_key.is_empty() {
            head.kind.topic(crate::domain::ProductId::new(head.product_id)?)
        } else {
            routing_key.to_owned()
        };
        let topic_json = serde_json::to_string(&topic).ok()?;
        let ws = format!(r#"{{"type":"update","offset":{offset},"topic":{topic_json},"data":{data}}}"#);
        let sse = format!("id: {offset}\nevent: {}\ndata: {data}\n\n", head.kind.as_str());
        Some(Update {
            offset,
            topic: topic.into(),
            product_id: head.product_id,
            kind: head.kind,
            version: head.version,
            ts_us: head.ts_us,
            txid: None,
            ws_frame: ByteString::from(ws),
            sse_event: Bytes::from(sse),
            trace: None,
        })
    }

    pub fn key(&self) -> (i64, Kind) {
        (self.product_id, self.kind)
    }
}

/// Which committed transactions a database snapshot sees (PostgreSQL's
/// `pg_snapshot`): a snapshot read under it holds exactly the effects of
/// those, so an update is already in it when its transaction is visible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visibility {
    /// Every transaction below this had ended when the snapshot was taken.
    xmin: u64,
    /// No transaction from this one on had ended.
    xmax: u64,
    /// Transactions between the two that were still running, sorted.
    running: Box<[u64]>,
}

impl Visibility {
    /// Parses `pg_current_snapshot()::text`: `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let mut running = parts
            .next()?
            .split(',')
            .filter(|x| !x.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<u64>, _>>()
            .ok()?;
        if parts.next().is_some() || xmin > xmax {
            return None;
        }
        running.sort_unstable();
        Some(Self {
            xmin,
            xmax,
            running: running.into(),
        })
    }

    /// The first transaction that had not ended when the snapshot was taken.
    pub fn xmax(&self) -> u64 {
        self.xmax
    }

    /// Whether the committed transaction `txid` is in the snapshot.
    pub fn sees(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && self.running.binary_search(&txid).is_err())
    }
}

/// What one snapshot holds, so the live updates already in it are skipped:
/// those of the transactions its [`Visibility`] sees, and, for each product
/// it read in a newer state than that (a read on a replica that had replayed
/// past the primary's visibility), every version up to the one it read.
#[derive(Debug)]
pub struct SnapshotHolds {
    visible: Visibility,
    /// Where the snapshot's rows were read: every row was written by a
    /// transaction before this one (the read's own xmax), which gives a
    /// row's 32-bit transaction id its epoch.
    rows_before: u64,
    /// Versions read in rows written by transactions `visible` does not
    /// see; empty when rows and visibility come from the same snapshot.
    ahead: Mutex<HashMap<(i64, Kind), i64>>,
}

impl SnapshotHolds {
    pub fn new(visible: Visibility, rows_before: u64) -> Self {
        Self {
            visible,
            rows_before,
            ahead: Mutex::new(HashMap::new()),
        }
    }

    pub fn visibility(&self) -> &Visibility {
        &self.visible
    }

    /// A product row was read as written by transaction `xmin` (its 32-bit
    /// id) with these versions.
    pub fn read_row(&self, id: i64, xmin: u32, price_version: i64, stock_version: i64) {
        // The latest id with these low bits before the read's horizon. An
        // old (frozen) id may land wrong: then a row the visibility already
        // covers is recorded too, which skips only what the client has.
        let low = (self.rows_before & !0xffff_ffff) | u64::from(xmin);
        let full = if low < self.rows_before {
            Some(low)
        } else {
            low.checked_sub(1 << 32)
        };
        if full.is_none_or(|x| self.visible.sees(x)) {
            return;
        }
        let mut ahead = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
        ahead.insert((id, Kind::Price), price_version);
        ahead.insert((id, Kind::Stock), stock_version);
    }

    /// Whether the snapshot already holds `u`.
    pub fn holds(&self, u: &Update) -> bool {
        if u.txid.is_some_and(|t| self.visible.sees(t)) {
            return true;
        }
        let ahead = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
        ahead.get(&u.key()).is_some_and(|v| u.version <= *v)
    }
}

/// What a catch-up reader hands to the connection it serves.
#[derive(Debug)]
pub enum CatchUpItem {
    Update(Arc<Update>),
    /// Updates before `first_available` that the client asked for cannot be
    /// replayed, for `reason`; delivery goes on from `first_available`.
    Reset {
        first_available: u64,
        reason: ResetReason,
    },
    /// Everything asked for was handed over. A catch-up whose channel closes
    /// without this was cut short (its client took nothing for too long),
    /// and the reader resets its client past it.
    Done,
}

/// Why a resume could not replay everything; the `reason` of a `reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// Retention removed the requested offset from the stream.
    OffsetExpired,
    /// The stream could not be read back in time (broker unreachable, slow
    /// or gone mid-way).
    CatchUpFailed,
}

impl ResetReason {
    pub const ALL: [ResetReason; 2] = [ResetReason::OffsetExpired, ResetReason::CatchUpFailed];

    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::OffsetExpired => "offset_expired",
            ResetReason::CatchUpFailed => "catch_up_failed",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            ResetReason::OffsetExpired => {
                "the requested offset is older than the stream keeps; updates resume from `offset`"
            }
            ResetReason::CatchUpFailed => {
                "the missed updates could not be read back; take a snapshot, updates resume from `offset`"
            }
        }
    }
}

/// Whoever takes the live stream's updates (the hub), so the stream reader
/// hands them on without knowing who listens.
pub trait UpdateSink: Send + 'static {
    /// The updates of one stream message, in offset order. False once the
    /// sink has shut down: the reader then stops.
    fn publish(&self, updates: Vec<Update>) -> impl Future<Output = bool> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_sees_transactions_that_ended_before_it_and_no_others() {
        let v = Visibility::parse("100:110:103,105").unwrap();
        assert!(v.sees(1) && v.sees(99), "ended before xmin");
        assert!(v.sees(100) && v.sees(104) && v.sees(109), "ended between, not running");
        assert!(!v.sees(103) && !v.sees(105), "running when taken");
        assert!(!v.sees(110) && !v.sees(5000), "started after");
        let empty = Visibility::parse("7:7:").unwrap();
        assert!(empty.sees(6) && !empty.sees(7));
        for bad in ["", "1:2", "3:2:", "a:b:", "1:2:x", "1:2:3:4"] {
            assert_eq!(Visibility::parse(bad), None, "{bad:?}");
        }
    }

    fn price(id: i64, version: i64, txid: Option<u64>) -> Update {
        let body = format!(r#"[{{"product_id":{id},"kind":"price","version":{version},"price_cents":5}}]"#);
        Update::from_message(1, txid, body.as_bytes()).remove(0)
    }

    #[test]
    fn a_snapshot_holds_the_transactions_it_sees_and_the_versions_of_rows_newer_than_them() {
        // The primary saw up to 100 (103 running); the replica's read went
        // on to 120, and product 7's row was written by 103, product 8's by 50.
        let holds = SnapshotHolds::new(Visibility::parse("100:110:103").unwrap(), 120);
        holds.read_row(7, 103, 12, 4);
        holds.read_row(8, 50, 3, 3);
        assert!(holds.holds(&price(9, 1, Some(104))), "seen by the visibility");
        assert!(holds.holds(&price(7, 12, Some(103))), "in the newer row");
        assert!(!holds.holds(&price(7, 13, Some(115))), "after the row read");
        assert!(
            !holds.holds(&price(8, 4, Some(111))),
            "row 8 was not newer: only the visibility counts"
        );
        assert!(
            !holds.holds(&price(9, 1, Some(103))),
            "running when the primary was asked"
        );
    }

    #[test]
    fn a_rows_32_bit_writer_takes_the_epoch_of_the_read() {
        let epoch = 5u64 << 32;
        // Just past a wraparound: a row written at the end of the last epoch
        // is old; one written in this epoch after the visibility is newer.
        let holds = SnapshotHolds::new(Visibility::parse(&format!("{0}:{0}:", epoch + 10)).unwrap(), epoch + 20);
        holds.read_row(1, u32::MAX, 2, 2);
        holds.read_row(2, 15, 2, 2);
        assert!(!holds.holds(&price(1, 2, None)), "the previous epoch's writer is seen");
        assert!(holds.holds(&price(2, 2, None)), "this epoch's writer is not");
        // In the first epoch an id above the read's horizon has no earlier epoch.
        let first = SnapshotHolds::new(Visibility::parse("10:10:").unwrap(), 20);
        first.read_row(3, 4_000_000, 2, 2);
        assert!(!first.holds(&price(3, 2, None)));
    }

    #[test]
    fn every_update_of_a_message_carries_its_transaction() {
        let body = br#"[{"product_id":1,"kind":"price","version":2,"price_cents":5},{"product_id":2,"kind":"stock","version":3,"stock":1}]"#;
        let updates = Update::from_message(4, Some(77), body);
        assert_eq!(updates.len(), 2);
        assert!(updates.iter().all(|u| u.txid == Some(77)));
        assert_eq!(Update::from_message(4, None, body)[1].txid, None);
    }
}
