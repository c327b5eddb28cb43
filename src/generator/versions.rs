//! The generator's own queries: the versions it issues come from the
//! product row itself, so no two generators can hand out the same one.

use diesel::sql_types::{BigInt, Bool};
use diesel_async::RunQueryDsl;

use crate::domain::{MAX_VERSION, ProductId};
use crate::store::{Db, StoreError};

/// The state a generator starts a change from, with freshly issued versions.
#[derive(Debug, diesel::QueryableByName)]
pub struct Issued {
    #[diesel(sql_type = BigInt)]
    pub price_cents: i64,
    #[diesel(sql_type = BigInt)]
    pub stock: i64,
    #[diesel(sql_type = BigInt)]
    pub price_issued: i64,
    #[diesel(sql_type = BigInt)]
    pub stock_issued: i64,
}

/// Issues the next version of the given kinds of one product. Versions come
/// from the row itself, so no two generators can hand out the same one.
/// `None` when the product does not exist, or when a requested kind is at
/// [`MAX_VERSION`] (only a row written before versions were bounded can be):
/// a version above it would overflow or be refused by every consumer.
pub async fn issue(db: &Db, id: ProductId, price: bool, stock: bool) -> Result<Option<Issued>, StoreError> {
    let mut conn = db.get().await?;
    let issued = diesel::sql_query(
        "UPDATE products SET \
           price_issued = GREATEST(price_issued, price_version) + CASE WHEN $2 THEN 1 ELSE 0 END, \
           stock_issued = GREATEST(stock_issued, stock_version) + CASE WHEN $3 THEN 1 ELSE 0 END \
         WHERE id = $1 \
           AND (NOT $2 OR GREATEST(price_issued, price_version) < $4) \
           AND (NOT $3 OR GREATEST(stock_issued, stock_version) < $4) \
         RETURNING price_cents, stock, price_issued, stock_issued",
    )
    .bind::<BigInt, _>(id.get())
    .bind::<Bool, _>(price)
    .bind::<Bool, _>(stock)
    .bind::<BigInt, _>(MAX_VERSION)
    .get_result::<Issued>(&mut conn)
    .await
    .map(Some)
    .or_else(|e| match e {
        diesel::result::Error::NotFound => Ok(None),
        e => Err(e),
    })?;
    Ok(issued)
}

/// Every product id, in order: what the generator picks from. Ids may be
/// sparse (products removed or loaded with gaps); each is picked as often.
pub async fn product_ids(db: &Db) -> Result<Vec<i64>, StoreError> {
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
