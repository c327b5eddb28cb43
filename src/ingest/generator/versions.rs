//! The generator's own query: which products it picks from. The versions it
//! issues come from `ingest::issue`, as the ingest API's do.

use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;

use crate::store::{Db, StoreError};

/// Every product id, in order: what the generator picks from. Ids may be
/// sparse (products removed or loaded with gaps); each is picked as often.
pub(crate) async fn product_ids(db: &Db) -> Result<Vec<i64>, StoreError> {
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
