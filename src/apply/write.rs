//! Applying events to the catalog: idempotent and monotonic per product and
//! kind, one transaction per batch, which also records the batch's stream
//! message in the outbox.

use std::collections::HashMap;

use diesel::sql_types::{Array, BigInt};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::outbox;
use crate::domain::{Event, Kind, ProductId};
use crate::store::AppliedVersions;
use crate::store::prepared::prepared;
use crate::store::{Db, StoreError};

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The event's value is now the product's.
    Applied,
    /// An equal or newer version was already there (or came later in the same
    /// batch); `current` is the version the product holds for this kind.
    Duplicate { current: i64 },
    /// No such product: the event can never apply.
    UnknownProduct,
}

/// Applies a batch in one transaction; the outcome of each event, in order.
/// The applied updates are written to the outbox in the same transaction.
/// Within a batch only the newest version per product and kind is written;
/// the older ones count as duplicates, as they would one by one. `trace`:
/// the batch span's traceparent, recorded with its stream messages.
pub(crate) async fn apply_batch(db: &Db, events: &[Event], trace: Option<&str>) -> Result<Vec<Outcome>, StoreError> {
    let mut newest: HashMap<(ProductId, Kind), usize> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        let slot = newest.entry((e.product_id, e.kind())).or_insert(i);
        if events[*slot].version < e.version {
            *slot = i;
        }
    }
    let mut by_kind: HashMap<Kind, Vec<usize>> = HashMap::new();
    for &i in newest.values() {
        by_kind.entry(events[i].kind()).or_default().push(i);
    }
    let mut pooled = db.get().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    let outcomes = conn
        .transaction(async |conn| {
            // Lock the rows in id order first: the price and stock consumers
            // (and generators) touch the same rows, and a common order keeps
            // their transactions from deadlocking.
            let mut ids: Vec<i64> = newest.keys().map(|(id, _)| id.get()).collect();
            ids.sort_unstable();
            ids.dedup();
            // The versions read under the lock are the ones the update
            // compares with, so they say which events apply.
            let locked: Vec<AppliedVersions> = prepared(
                "SELECT id, price_version, stock_version FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            )
            .bind::<Array<BigInt>, _>(ids)
            .load(conn)
            .await?;
            let locked: HashMap<i64, AppliedVersions> = locked.into_iter().map(|l| (l.id, l)).collect();
            for (kind, idx) in &by_kind {
                let newer: Vec<usize> = idx
                    .iter()
                    .copied()
                    .filter(|&i| {
                        let e = &events[i];
                        locked
                            .get(&e.product_id.get())
                            .is_some_and(|l| l.version(*kind) < e.version)
                    })
                    .collect();
                if newer.is_empty() {
                    continue;
                }
                let ids: Vec<i64> = newer.iter().map(|&i| events[i].product_id.get()).collect();
                let values: Vec<i64> = newer.iter().map(|&i| events[i].change.value()).collect();
                let versions: Vec<i64> = newer.iter().map(|&i| events[i].version).collect();
                prepared(update_sql(*kind))
                    .bind::<Array<BigInt>, _>(ids)
                    .bind::<Array<BigInt>, _>(values)
                    .bind::<Array<BigInt>, _>(versions)
                    .execute(conn)
                    .await?;
            }
            let outcomes = outcomes_of(events, &newest, &locked);
            // The stream message commits with the change it reports, so no
            // failure between commit and publish can lose it.
            let applied: Vec<&Event> = events
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| **o == Outcome::Applied)
                .map(|(e, _)| e)
                .collect();
            outbox::record(conn, &applied, trace).await?;
            Ok::<_, diesel::result::Error>(outcomes)
        })
        .await?;
    Ok(outcomes)
}

/// Each event's outcome, from the versions its product held under the lock:
/// the newest event of its product and kind applies when it is newer.
fn outcomes_of(
    events: &[Event],
    newest: &HashMap<(ProductId, Kind), usize>,
    locked: &HashMap<i64, AppliedVersions>,
) -> Vec<Outcome> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let Some(row) = locked.get(&e.product_id.get()) else {
                return Outcome::UnknownProduct;
            };
            let current = row.version(e.kind());
            let Some(&winner) = newest.get(&(e.product_id, e.kind())) else {
                return Outcome::Duplicate { current };
            };
            if events[winner].version <= current {
                Outcome::Duplicate { current }
            } else if winner == i {
                Outcome::Applied
            } else {
                // Superseded by a newer version in the same batch.
                Outcome::Duplicate { current: i64::MAX }
            }
        })
        .collect()
}

/// One statement per kind, for the events known to be newer: the version
/// check is kept so that the statement alone can never move a version back.
/// No join on the update's own output: a cached (generic) plan guesses ten
/// input rows, and a self-join planned for ten compares every pair of a
/// batch of hundreds.
fn update_sql(kind: Kind) -> &'static str {
    macro_rules! update {
        ($value:literal, $version:literal) => {
            concat!(
                "UPDATE products p SET ",
                $value,
                " = i.value, ",
                $version,
                " = i.version, updated_at = now() ",
                "FROM unnest($1::int8[], $2::int8[], $3::int8[]) AS i(id, value, version) ",
                "WHERE p.id = i.id AND p.",
                $version,
                " < i.version"
            )
        };
    }
    // Column names come from this fixed match, never from input.
    match kind {
        Kind::Price => update!("price_cents", "price_version"),
        Kind::Stock => update!("stock", "stock_version"),
    }
}
