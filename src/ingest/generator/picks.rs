//! What the generator changes: distinct random products of the catalog
//! (its ids read again now and then: products come and go), a price move,
//! a stock move or both for each, built from the versions issued for them.

use std::time::Duration;

use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;
use rand::Rng;
use tokio::time::Instant;

use crate::domain::{Change, Event, PriceCents, ProductId, Stock};
use crate::ingest;
use crate::store::{Db, StoreError};

/// Every product id, in order: what the generator picks from. Ids may be
/// sparse (products removed or loaded with gaps); each is picked as often.
async fn product_ids(db: &Db) -> Result<Vec<i64>, StoreError> {
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let mut conn = db.get().await?;
    let rows: Vec<Id> = diesel::sql_query("SELECT id FROM products ORDER BY id")
        .load(&mut conn)
        .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// The product ids to pick from, read again now and then: products come
/// and go.
#[derive(Default)]
pub(super) struct Ids {
    ids: Vec<i64>,
    read: Option<Instant>,
}

impl Ids {
    pub(super) async fn refresh(&mut self, db: &Db) {
        if self.ids.is_empty() || self.read.is_none_or(|r| r.elapsed() > IDS_REREAD) {
            if let Ok(fresh) = product_ids(db).await {
                self.ids = fresh;
            }
            self.read = Some(Instant::now());
        }
    }

    /// Distinct random products and what changes in each (price, stock),
    /// `n` changes in all, or fewer when the catalog is small.
    pub(super) fn pick_changes(&self, n: usize) -> Vec<(ProductId, bool, bool)> {
        let mut rng = rand::rng();
        let mut taken = std::collections::HashSet::new();
        let mut picks = Vec::new();
        let mut left = n;
        // Bounded: a catalog with fewer products than changes due runs
        // out of distinct ones.
        for _ in 0..n.saturating_mul(4) {
            if left == 0 || self.ids.is_empty() {
                break;
            }
            let id = self.ids[rng.random_range(0..self.ids.len())];
            let Some(id) = ProductId::new(id).filter(|_| taken.insert(id)) else {
                continue;
            };
            let (price, stock) = match rng.random_range(0..3u8) {
                0 => (true, false),
                1 => (false, true),
                _ if left >= 2 => (true, true),
                // One change left: either kind.
                _ => {
                    let price: bool = rng.random();
                    (price, !price)
                }
            };
            left -= usize::from(price) + usize::from(stock);
            picks.push((id, price, stock));
        }
        picks
    }
}

/// How often the generator reads the catalog's ids again.
const IDS_REREAD: Duration = Duration::from_secs(60);

/// The events of one product's change from its issued state: a price move
/// of up to ±5 % and a stock move of a few units, each within sane bounds.
pub(super) fn changes(id: ProductId, price: bool, stock: bool, issued: &ingest::Issued) -> Vec<Event> {
    let mut rng = rand::rng();
    let mut events = Vec::with_capacity(2);
    if price {
        let factor = 1.0 + rng.random_range(-0.05..=0.05);
        let cents = ((issued.price_cents as f64 * factor).round() as i64).clamp(99, 10_000_000);
        if let Ok(p) = PriceCents::try_from(cents) {
            events.push(ingest::event(id, Change::Price(p), issued.price_issued));
        }
    }
    if stock {
        let delta = rng.random_range(-20..=25);
        if let Ok(s) = Stock::try_from((issued.stock + delta).clamp(0, 100_000)) {
            events.push(ingest::event(id, Change::Stock(s), issued.stock_issued));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_changes_due_fall_on_distinct_products_and_add_up() {
        let ids = Ids {
            ids: (1..=1000).collect(),
            read: None,
        };
        for due in [1, 2, 7, 100] {
            let picks = ids.pick_changes(due);
            let changes: usize = picks.iter().map(|(_, p, s)| usize::from(*p) + usize::from(*s)).sum();
            assert_eq!(changes, due);
            let distinct: std::collections::HashSet<_> = picks.iter().map(|(id, _, _)| id.get()).collect();
            assert_eq!(distinct.len(), picks.len(), "one pick per product");
            assert!(picks.iter().all(|(_, p, s)| *p || *s), "every pick changes something");
        }
        let few = Ids {
            ids: (1..=10).collect(),
            read: None,
        };
        let picks = few.pick_changes(100);
        assert!(picks.len() <= 10, "no more products than the catalog has");
    }
}
