//! Applying events to the catalog: idempotent and monotonic per product and
//! kind, one transaction per batch, which also records the batch's stream
//! message in the outbox.

use std::collections::HashMap;

use diesel::sql_types::{Array, BigInt, Bool};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::prepared::prepared;
use super::{Db, StoreError, outbox};
use crate::domain::{Event, Kind, ProductId};

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event's value is now the product's.
    Applied,
    /// An equal or newer version was already there (or came later in the same
    /// batch); `current` is the version the product holds for this kind.
    Duplicate { current: i64 },
    /// No such product: the event can never apply.
    UnknownProduct,
}

#[derive(diesel::QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Bool)]
    applied: bool,
    #[diesel(sql_type = Bool)]
    known: bool,
    #[diesel(sql_type = BigInt)]
    current: i64,
}

/// Applies a batch in one transaction; the outcome of each event, in order.
/// The applied updates are written to the outbox in the same transaction.
/// Within a batch only the newest version per product and kind is written;
/// the older ones count as duplicates, as they would one by one.
pub async fn apply_batch(db: &Db, events: &[Event]) -> Result<Vec<Outcome>, StoreError> {
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
            prepared("SELECT id FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                .bind::<Array<BigInt>, _>(ids)
                .execute(conn)
                .await?;
            let mut rows = Vec::new();
            for (kind, idx) in &by_kind {
                let ids: Vec<i64> = idx.iter().map(|&i| events[i].product_id.get()).collect();
                let values: Vec<i64> = idx.iter().map(|&i| events[i].change.value()).collect();
                let versions: Vec<i64> = idx.iter().map(|&i| events[i].version).collect();
                let rs: Vec<Row> = prepared(apply_sql(*kind))
                    .bind::<Array<BigInt>, _>(ids)
                    .bind::<Array<BigInt>, _>(values)
                    .bind::<Array<BigInt>, _>(versions)
                    .load(conn)
                    .await?;
                rows.push((*kind, rs));
            }
            let outcomes = outcomes_of(events, &newest, &rows);
            // The stream message commits with the change it reports, so no
            // failure between commit and publish can lose it.
            let applied: Vec<&Event> = events
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| **o == Outcome::Applied)
                .map(|(e, _)| e)
                .collect();
            outbox::record(conn, &applied).await?;
            Ok::<_, diesel::result::Error>(outcomes)
        })
        .await?;
    Ok(outcomes)
}

/// Each event's outcome, from the rows the apply statements returned.
fn outcomes_of(
    events: &[Event],
    newest: &HashMap<(ProductId, Kind), usize>,
    rows: &[(Kind, Vec<Row>)],
) -> Vec<Outcome> {
    let mut outcomes = vec![Outcome::Duplicate { current: 0 }; events.len()];
    let mut by_key: HashMap<(i64, Kind), &Row> = HashMap::new();
    for (kind, rs) in rows {
        for r in rs {
            by_key.insert((r.id, *kind), r);
        }
    }
    for (i, e) in events.iter().enumerate() {
        let Some(row) = by_key.get(&(e.product_id.get(), e.kind())) else {
            continue;
        };
        outcomes[i] = if !row.known {
            Outcome::UnknownProduct
        } else if row.applied && newest.get(&(e.product_id, e.kind())) == Some(&i) {
            Outcome::Applied
        } else if row.applied {
            // Superseded by a newer version in the same batch.
            Outcome::Duplicate { current: i64::MAX }
        } else {
            Outcome::Duplicate { current: row.current }
        };
    }
    outcomes
}

/// One statement per kind: update the rows whose version is older, and
/// report for every input whether it applied and whether the product exists.
fn apply_sql(kind: Kind) -> &'static str {
    macro_rules! apply {
        ($value:literal, $version:literal) => {
            concat!(
                "WITH input(id, value, version) AS (SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[])), ",
                "upd AS (UPDATE products p SET ",
                $value,
                " = i.value, ",
                $version,
                " = i.version, updated_at = now() ",
                "FROM input i WHERE p.id = i.id AND p.",
                $version,
                " < i.version RETURNING p.id) ",
                "SELECT i.id, (u.id IS NOT NULL) AS applied, (p.id IS NOT NULL) AS known, ",
                "COALESCE(p.",
                $version,
                ", 0) AS current ",
                "FROM input i LEFT JOIN upd u ON u.id = i.id LEFT JOIN products p ON p.id = i.id"
            )
        };
    }
    // Column names come from this fixed match, never from input.
    match kind {
        Kind::Price => apply!("price_cents", "price_version"),
        Kind::Stock => apply!("stock", "stock_version"),
    }
}
