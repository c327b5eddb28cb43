//! Snapshots: the turns that bound how many are read at once (and how many
//! one address holds), and a snapshot streamed in parts from its own read
//! transaction, a page ahead of the socket. A client that stops taking
//! parts gives its turn, connection and transaction back.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::codes::{ClientError, ClientErrorCode};
use crate::domain::Kind;
use crate::hub::pattern::Pattern;
use crate::metrics::Metrics;
use crate::settings::HubSettings;
use crate::store::catalog;
use crate::turns::{AddressTurn, PerAddress};

/// Bounds the snapshots read and serialised at once: each holds a read
/// connection and a copy of the catalog, so a flood of them would otherwise
/// take every connection and much memory. One client address holds only a
/// few of them.
#[derive(Clone)]
pub struct SnapshotLimit {
    permits: Arc<Semaphore>,
    per_address: Arc<PerAddress>,
    wait: Duration,
}

/// A snapshot's turn: the instance's and its address's, given back together.
pub(super) struct SnapshotTurn {
    _instance: OwnedSemaphorePermit,
    _address: Option<AddressTurn>,
}

impl SnapshotLimit {
    pub fn new(settings: &HubSettings) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(settings.max_concurrent_snapshots)),
            per_address: PerAddress::new(settings.max_snapshots_per_ip),
            wait: settings.snapshot_wait,
        }
    }

    /// A turn for a client at `ip`, released when dropped; `busy` after the
    /// wait, with when to come back.
    pub(super) async fn acquire(&self, ip: Option<IpAddr>) -> Result<SnapshotTurn, ClientError> {
        let busy = || {
            ClientError::new(
                ClientErrorCode::Busy,
                "too many snapshots are being served; retry in a moment",
            )
            .retry_after(self.wait)
        };
        let deadline = tokio::time::Instant::now() + self.wait;
        let address = self.per_address.take(ip, deadline).await.ok_or_else(busy)?;
        match tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(SnapshotTurn {
                _instance: permit,
                _address: address,
            }),
            Ok(Err(_)) => Err(ClientError::new(
                ClientErrorCode::Unavailable,
                "the service is shutting down",
            )),
            Err(_) => Err(busy()),
        }
    }
}

/// Whether any pattern covers the topic of `kind` for product `id`.
fn covers(patterns: &[Pattern], kind: Kind, id: i64) -> bool {
    let topic = format!("product.{}.{id}", kind.as_str());
    patterns.iter().any(|p| p.matches(&topic))
}

/// The products named by patterns of the form `product.<kind or *>.<id>`,
/// or None when any pattern leaves its product open.
pub(super) fn named_products(patterns: &[Pattern]) -> Option<Vec<i64>> {
    let mut ids = Vec::with_capacity(patterns.len());
    for p in patterns {
        let mut words = p.as_str().split('.');
        let (Some("product"), Some("price" | "stock" | "*"), Some(id), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return None;
        };
        ids.push(id.parse::<i64>().ok().filter(|id| *id > 0)?);
    }
    ids.sort_unstable();
    ids.dedup();
    Some(ids)
}

pub(super) fn snapshot_unavailable() -> ClientError {
    ClientError::new(
        ClientErrorCode::Unavailable,
        "snapshots are unavailable; retry in a moment",
    )
    .retry_after(SNAPSHOT_RETRY)
}

/// When a client whose snapshot was cut short may ask again.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(1);

/// One frame of a snapshot, serialised: a `snapshot` part, or the
/// `snapshot_end` that closes them with the stream offset updates follow.
#[derive(Debug)]
pub struct SnapshotFrame {
    pub json: String,
    /// On `snapshot_end` only: where updates resume (SSE's event id).
    pub end_offset: Option<Option<u64>>,
}

/// A snapshot's frames in order, read a page ahead of the socket. An error
/// ends them: the client is told the snapshot was cut short, also when the
/// reader gave up on a client that took no part for `snapshot_stall`.
pub struct SnapshotFrames {
    rx: mpsc::Receiver<Result<SnapshotFrame, ClientError>>,
    /// The last frame (`snapshot_end` or an error) was taken.
    ended: bool,
}

impl SnapshotFrames {
    /// The next frame; an `unavailable` error when the reader stopped
    /// before the end; None after the last.
    pub async fn next(&mut self) -> Option<Result<SnapshotFrame, ClientError>> {
        if self.ended {
            return None;
        }
        let frame = self.rx.recv().await.unwrap_or_else(|| Err(snapshot_unavailable()));
        self.ended = frame.as_ref().map_or(true, |f| f.end_offset.is_some());
        Some(frame)
    }
}

/// The next frame of the snapshot being sent; never, when none is (a
/// transport's select branch). None once the snapshot has ended.
pub async fn next_snapshot_frame(snapshot: &mut Option<SnapshotFrames>) -> Option<Result<SnapshotFrame, ClientError>> {
    match snapshot {
        Some(frames) => frames.next().await,
        None => std::future::pending().await,
    }
}

/// A snapshot being read: its transaction, its patterns, and its turn among
/// the snapshots that run at once (held until the last frame is taken).
pub(super) struct SnapshotStream {
    pub(super) read: catalog::SnapshotRead,
    pub(super) patterns: Vec<Pattern>,
    pub(super) offset: Option<u64>,
    pub(super) part_size: usize,
    pub(super) metrics: Arc<Metrics>,
    /// How long the client may leave a part untaken.
    pub(super) stall: Duration,
    pub(super) _turn: SnapshotTurn,
}

/// Sends one `snapshot` part; false when it cannot go (the receiver left,
/// took nothing for `stall`, or the part does not serialise, which the
/// receiver is then told).
async fn send_part(
    tx: &mpsc::Sender<Result<SnapshotFrame, ClientError>>,
    part: u64,
    products: &[catalog::Product],
    stall: Duration,
) -> bool {
    let part = Part {
        kind: "snapshot",
        part,
        products,
    };
    let frame = serde_json::to_string(&part)
        .map(|json| SnapshotFrame { json, end_offset: None })
        .map_err(|e| {
            tracing::error!(error = %e, "snapshot part not serialisable");
            snapshot_unavailable()
        });
    let ok = frame.is_ok();
    hand(tx, frame, stall).await && ok
}

/// Hands a frame to the snapshot's client: false when it left or took
/// nothing for `stall`.
async fn hand(
    tx: &mpsc::Sender<Result<SnapshotFrame, ClientError>>,
    frame: Result<SnapshotFrame, ClientError>,
    stall: Duration,
) -> bool {
    matches!(tokio::time::timeout(stall, tx.send(frame)).await, Ok(Ok(())))
}

#[derive(serde::Serialize)]
struct Part<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    part: u64,
    products: &'a [catalog::Product],
}

/// Reads the snapshot page by page in a task of its own, each page's rows
/// that the patterns cover becoming a `snapshot` part; at least one part,
/// then `snapshot_end`. One part waits at a time: memory per snapshot stays
/// a page, and a client that stops reading stops the read. A receiver that
/// leaves, or takes no part for `stall`, ends the task: its transaction is
/// rolled back and its turn given back at once.
pub(super) fn stream_snapshot(s: SnapshotStream) -> SnapshotFrames {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        // The whole of it, turn included: the block would otherwise capture
        // only the fields it uses and give the turn back at once.
        let mut s = s;
        if !send_snapshot(&mut s, &tx).await {
            s.read.abandon().await;
        }
    });
    SnapshotFrames { rx, ended: false }
}

/// Sends every part then the end; false when it stopped before the end.
async fn send_snapshot(s: &mut SnapshotStream, tx: &mpsc::Sender<Result<SnapshotFrame, ClientError>>) -> bool {
    let (mut parts, mut products) = (0u64, 0u64);
    loop {
        let page = match s.read.next_page(s.part_size).await {
            Ok(Some(page)) => page,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, part = parts, "snapshot read failed");
                hand(tx, Err(snapshot_unavailable()), s.stall).await;
                return false;
            }
        };
        s.metrics.snapshot_rows.inc_by(page.len() as u64);
        let rows: Vec<catalog::Product> = page
            .into_iter()
            .filter(|p| Kind::ALL.iter().any(|k| covers(&s.patterns, *k, p.id)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        if !send_part(tx, parts, &rows, s.stall).await {
            return false;
        }
        parts += 1;
        products += rows.len() as u64;
    }
    // Every snapshot has a first part, if empty, so a client can await it.
    if parts == 0 {
        if !send_part(tx, 0, &[], s.stall).await {
            return false;
        }
        parts = 1;
    }
    let end = json!({ "type": "snapshot_end", "parts": parts, "products": products, "offset": s.offset });
    let end = SnapshotFrame {
        json: end.to_string(),
        end_offset: Some(s.offset),
    };
    hand(tx, Ok(end), s.stall).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(ps: &[&str]) -> Vec<Pattern> {
        ps.iter().map(|p| Pattern::parse(p, 32).unwrap()).collect()
    }

    #[test]
    fn patterns_that_name_their_products_are_read_by_id_and_others_page() {
        assert_eq!(
            named_products(&patterns(&["product.price.42", "product.*.7", "product.stock.42"])),
            Some(vec![7, 42])
        );
        assert_eq!(named_products(&patterns(&["product.price.*"])), None);
        assert_eq!(named_products(&patterns(&["product.price.42", "#"])), None);
        assert_eq!(named_products(&patterns(&["product.price.0"])), None, "no such id");
        assert_eq!(named_products(&patterns(&["product.price.42.x"])), None);
    }

    #[tokio::test]
    async fn a_snapshot_whose_reader_stopped_before_its_end_is_unavailable() {
        let (tx, rx) = mpsc::channel(2);
        let mut frames = SnapshotFrames { rx, ended: false };
        let part = SnapshotFrame {
            json: "{}".into(),
            end_offset: None,
        };
        tx.send(Ok(part)).await.unwrap();
        drop(tx);
        assert!(matches!(frames.next().await, Some(Ok(f)) if f.end_offset.is_none()));
        let cut = frames.next().await.unwrap().unwrap_err();
        assert_eq!(cut.code, ClientErrorCode::Unavailable);
        assert!(cut.retry.is_some(), "says when to ask again");
        assert!(frames.next().await.is_none(), "said once");
    }

    #[tokio::test]
    async fn a_whole_snapshot_ends_with_its_end_frame() {
        let (tx, rx) = mpsc::channel(2);
        let mut frames = SnapshotFrames { rx, ended: false };
        let end = SnapshotFrame {
            json: "{}".into(),
            end_offset: Some(Some(9)),
        };
        tx.send(Ok(end)).await.unwrap();
        drop(tx);
        assert!(matches!(frames.next().await, Some(Ok(f)) if f.end_offset == Some(Some(9))));
        assert!(frames.next().await.is_none());
    }
}
