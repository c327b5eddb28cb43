//! A resume's catch-up: what the connection missed, read back from the
//! stream (older than the hub's memory) and then from the hub's memory,
//! started only when the connection's earlier catch-ups have ended, and
//! never holding a turn for a client that does not read.

use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::broadcast::stream::CatchUpReader;
use crate::hub::CatchUp;
use crate::hub::feed::{CatchUpFilter, StartCatchUp};
use crate::hub::history::Replay;
use crate::update::CatchUpItem;

/// Replays for one resuming client what its filter wants: first from the
/// stream, from update id `read.from` until `read.until` (exclusive; the
/// hub's memory starts there), then from the hub's memory; `Done` at the
/// end. Started when the connection's earlier catch-ups have ended. Ends
/// early when the receiver goes away or takes nothing for `stall` (the
/// reader then resets its client), never holding a turn for it.
pub(super) fn catch_up(
    reader: CatchUpReader,
    read: Option<CatchUp>,
    replay: Replay,
    filter: CatchUpFilter,
    ip: Option<IpAddr>,
    stall: Duration,
) -> StartCatchUp {
    Box::new(move || {
        // Little in flight: a client that stops reading pins no more.
        let (tx, rx) = mpsc::channel(CATCH_UP_CHANNEL);
        tokio::spawn(async move {
            let wants = |u: &crate::update::Update| filter.wants(u);
            if let Some(CatchUp { from, until }) = read
                && !reader.read_range((from, until), ip, &wants, &tx).await
            {
                return;
            }
            let hand = |item| async { matches!(tokio::time::timeout(stall, tx.send(item)).await, Ok(Ok(()))) };
            for (i, u) in replay.iter().enumerate() {
                if filter.wants(u) && !hand(CatchUpItem::Update(u.clone())).await {
                    return;
                }
                // A long replay of updates nobody wants must not hog the thread.
                if i % 1024 == 1023 {
                    tokio::task::yield_now().await;
                }
            }
            hand(CatchUpItem::Done).await;
        });
        rx
    })
}

/// Updates a catch-up hands over ahead of its client.
const CATCH_UP_CHANNEL: usize = 64;
