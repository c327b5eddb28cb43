//! Reads and writes of the catalog outside the event pipeline: REST listing,
//! snapshots for clients, and photos.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::Serialize;

use super::schema::{product_photos, products};
use super::{Db, DbConn, Replica, StoreError};
use crate::domain::ProductId;
use crate::update::{SnapshotHolds, Visibility};

/// A product as clients see it, with the version of each attribute so that
/// snapshot and updates can be merged without gaps or duplicates.
#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[diesel(table_name = products)]
pub struct Product {
    #[serde(rename = "product_id")]
    pub id: i64,
    pub name: String,
    pub price_cents: i64,
    pub stock: i64,
    pub price_version: i64,
    pub stock_version: i64,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Photo {
    pub content_type: String,
    pub etag: String,
    pub bytes: Vec<u8>,
}

pub async fn list(db: &Db, after: i64, limit: i64, ids: Option<&[i64]>) -> Result<Vec<Product>, StoreError> {
    let mut conn = db.get().await?;
    Ok(page(&mut conn, after, limit, ids).await?)
}

/// Up to `limit` products after id `after`, in id order; only those of
/// `ids` when given. The one keyset page of REST listings and snapshots.
async fn page(
    conn: &mut diesel_async::AsyncPgConnection,
    after: i64,
    limit: i64,
    ids: Option<&[i64]>,
) -> Result<Vec<Product>, diesel::result::Error> {
    let mut query = products::table
        .select(Product::as_select())
        .filter(products::id.gt(after))
        .order(products::id)
        .limit(limit)
        .into_boxed();
    if let Some(ids) = ids {
        query = query.filter(products::id.eq_any(ids.to_vec()));
    }
    query.load(conn).await
}

/// [`page`] with each row's writer: the 32-bit id of the transaction that
/// wrote the row version read (`xmin`).
async fn page_with_writers(
    conn: &mut diesel_async::AsyncPgConnection,
    after: i64,
    limit: i64,
    ids: Option<&[i64]>,
) -> Result<Vec<(Product, i64)>, diesel::result::Error> {
    let mut query = products::table
        .select((
            Product::as_select(),
            diesel::dsl::sql::<diesel::sql_types::BigInt>("products.xmin::text::bigint"),
        ))
        .filter(products::id.gt(after))
        .order(products::id)
        .limit(limit)
        .into_boxed();
    if let Some(ids) = ids {
        query = query.filter(products::id.eq_any(ids.to_vec()));
    }
    query.load(conn).await
}

#[derive(QueryableByName)]
struct Snapshot {
    #[diesel(sql_type = diesel::sql_types::Text)]
    snapshot: String,
}

#[derive(QueryableByName)]
struct Mark {
    #[diesel(sql_type = diesel::sql_types::Text)]
    snapshot: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    lsn: String,
}

#[derive(QueryableByName)]
struct Replayed {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    done: bool,
}

fn unreadable(snapshot: &str) -> StoreError {
    StoreError::Query(diesel::result::Error::DeserializationError(
        format!("unreadable snapshot {snapshot:?}").into(),
    ))
}

/// Which transactions the primary has committed, and a WAL position past
/// all of them. The snapshot is the statement's, taken before the position
/// is read, so the position is past every commit the snapshot sees.
async fn primary_mark(primary: &Db) -> Result<(Visibility, String), StoreError> {
    let mut conn = primary.get().await?;
    let m: Mark =
        diesel::sql_query("SELECT pg_current_snapshot()::text AS snapshot, pg_current_wal_insert_lsn()::text AS lsn")
            .get_result(&mut *conn)
            .await?;
    let visible = Visibility::parse(&m.snapshot).ok_or_else(|| unreadable(&m.snapshot))?;
    Ok((visible, m.lsn))
}

/// Waits until the server behind `conn` has replayed the WAL up to `lsn`
/// (at once when it is not a standby); false when it has not within `wait`.
async fn replayed(conn: &mut DbConn, lsn: &str, wait: std::time::Duration) -> Result<bool, StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        let r: Replayed = diesel::sql_query("SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, true) AS done")
            .bind::<diesel::sql_types::Text, _>(lsn)
            .get_result(&mut **conn)
            .await?;
        if r.done {
            return Ok(true);
        }
        if tokio::time::Instant::now() + pause > deadline {
            return Ok(false);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(16));
    }
}

/// A connection to the replica once it has replayed `lsn`; None when it has
/// not within `wait`, or does not answer (within the pool's own wait).
async fn on_replica_when_replayed(db: &Db, lsn: &str, wait: std::time::Duration) -> Option<DbConn> {
    let mut conn = match db.get().await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(error = %e, "the read replica does not answer; snapshot read on the primary");
            return None;
        }
    };
    match replayed(&mut conn, lsn, wait).await {
        Ok(true) => Some(conn),
        Ok(false) => None,
        Err(e) => {
            tracing::warn!(error = %e, "the read replica failed; snapshot read on the primary");
            None
        }
    }
}

/// One snapshot's read of the catalog: every page comes from the same
/// database snapshot (one read-only repeatable-read transaction), and its
/// [`SnapshotHolds`] say which updates the pages already hold. Pages are
/// read one at a time, so memory stays bounded whatever the catalog's size.
///
/// On a replica the transactions a snapshot holds are taken from the
/// primary (after the client registered for live updates), and the read
/// waits until the replica has replayed them: a standby's own snapshot
/// does not list the transactions still running on the primary, and a
/// lagging one would miss updates already broadcast. Rows the replica
/// already holds in a newer state are recorded with their versions.
pub struct SnapshotRead {
    conn: DbConn,
    holds: std::sync::Arc<SnapshotHolds>,
    /// Read on the primary because the replica lagged too far behind.
    on_primary: bool,
    /// Read on the replica under the primary's visibility: rows may be
    /// newer than it.
    on_replica: bool,
    /// The products to read, sorted, when they are named; the catalog
    /// otherwise.
    ids: Option<Vec<i64>>,
    /// How many of `ids` were read.
    read: usize,
    /// Id of the last product read.
    after: i64,
    done: bool,
}

impl SnapshotRead {
    /// Opens the transaction and takes its snapshot, on `db` or, when it is
    /// a replica, as [`SnapshotRead`] says. A reader dropped before its end
    /// leaves its connection in a transaction: the pool discards such a
    /// connection rather than reuse it.
    pub async fn begin(db: &Db, replica: Option<&Replica>, ids: Option<Vec<i64>>) -> Result<Self, StoreError> {
        use diesel_async::AnsiTransactionManager;
        let (mut conn, primary_sees, on_primary) = match replica {
            None => (db.get().await?, None, false),
            Some(r) => {
                let (visible, lsn) = primary_mark(&r.primary).await?;
                match on_replica_when_replayed(db, &lsn, r.max_lag).await {
                    Some(conn) => (conn, Some(visible), false),
                    // Behind, or not answering: the primary serves it.
                    None => (r.primary.get().await?, None, true),
                }
            }
        };
        AnsiTransactionManager::begin_transaction_sql(
            &mut *conn,
            "BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY",
        )
        .await?;
        // The first statement fixes the transaction's snapshot: this one.
        let s: Snapshot = diesel::sql_query("SELECT pg_current_snapshot()::text AS snapshot")
            .get_result(&mut *conn)
            .await?;
        let own = Visibility::parse(&s.snapshot).ok_or_else(|| unreadable(&s.snapshot))?;
        let rows_before = own.xmax();
        let on_replica = primary_sees.is_some();
        let holds = SnapshotHolds::new(primary_sees.unwrap_or(own), rows_before);
        Ok(Self {
            conn,
            holds: std::sync::Arc::new(holds),
            on_primary,
            on_replica,
            ids,
            read: 0,
            after: 0,
            done: false,
        })
    }

    /// Which updates the pages hold; complete once the last page was read.
    pub fn holds(&self) -> &std::sync::Arc<SnapshotHolds> {
        &self.holds
    }

    /// Whether the replica lagged too far and the primary serves this read.
    pub fn on_primary(&self) -> bool {
        self.on_primary
    }

    /// The next at most `limit` products in id order; None once all were
    /// read (the transaction is then ended).
    pub async fn next_page(&mut self, limit: usize) -> Result<Option<Vec<Product>>, StoreError> {
        use diesel_async::{AnsiTransactionManager, TransactionManager};
        if self.done {
            return Ok(None);
        }
        let chunk = self
            .ids
            .as_deref()
            .map(|ids| &ids[self.read..(self.read + limit).min(ids.len())]);
        let named = chunk.map_or(0, <[i64]>::len);
        let page: Vec<Product> = if self.on_replica {
            let rows = page_with_writers(&mut self.conn, self.after, limit as i64, chunk).await?;
            rows.into_iter()
                .map(|(p, xmin)| {
                    let xmin = u32::try_from(xmin).unwrap_or(0);
                    self.holds.read_row(p.id, xmin, p.price_version, p.stock_version);
                    p
                })
                .collect()
        } else {
            // Rows and visibility from one snapshot: no row is newer than
            // it, and a million-row read pays nothing for the check.
            page(&mut self.conn, self.after, limit as i64, chunk).await?
        };
        // Moved on only once the page is in hand.
        self.after = page.last().map_or(self.after, |p| p.id);
        self.read += named;
        let last = match &self.ids {
            Some(ids) => self.read == ids.len(),
            None => page.len() < limit,
        };
        if last {
            AnsiTransactionManager::commit_transaction(&mut *self.conn).await?;
            self.done = true;
            if page.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(page))
    }

    /// Ends a read given up before its last page: the transaction is rolled
    /// back now, so its snapshot holds back no vacuum and its connection
    /// goes back to the pool clean; a connection that does not answer
    /// within a second is closed instead.
    pub async fn abandon(mut self) {
        use diesel_async::{AnsiTransactionManager, TransactionManager};
        if self.done {
            return;
        }
        let rolled_back = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            AnsiTransactionManager::rollback_transaction(&mut *self.conn),
        )
        .await;
        if !matches!(rolled_back, Ok(Ok(()))) {
            drop(deadpool::managed::Object::take(self.conn));
        }
    }
}

pub async fn get(db: &Db, id: ProductId) -> Result<Option<Product>, StoreError> {
    let mut conn = db.get().await?;
    Ok(products::table
        .select(Product::as_select())
        .find(id.get())
        .first(&mut conn)
        .await
        .optional()?)
}

/// Every product, in id order: for checks over a whole (small) catalog.
/// Snapshots page with `list` instead.
pub async fn all(db: &Db) -> Result<Vec<Product>, StoreError> {
    let mut conn = db.get().await?;
    Ok(products::table
        .select(Product::as_select())
        .order(products::id)
        .load(&mut conn)
        .await?)
}

/// A product's stored photo: None when the product does not exist,
/// `Some(None)` when it has no photo of its own (the caller provides the
/// default).
pub async fn photo(db: &Db, id: ProductId) -> Result<Option<Option<Photo>>, StoreError> {
    let mut conn = db.get().await?;
    /// A product's id and, when it has one, its stored photo's columns.
    type Row = (i64, Option<String>, Option<String>, Option<Vec<u8>>);
    let row: Option<Row> = products::table
        .left_join(product_photos::table)
        .select((
            products::id,
            product_photos::content_type.nullable(),
            product_photos::etag.nullable(),
            product_photos::bytes.nullable(),
        ))
        .filter(products::id.eq(id.get()))
        .first(&mut conn)
        .await
        .optional()?;
    Ok(
        row.map(|(_, content_type, etag, bytes)| match (content_type, etag, bytes) {
            (Some(content_type), Some(etag), Some(bytes)) => Some(Photo {
                content_type,
                etag,
                bytes,
            }),
            _ => None,
        }),
    )
}

/// Stores a photo; returns false when the product does not exist.
pub async fn put_photo(db: &Db, id: ProductId, photo: &Photo) -> Result<bool, StoreError> {
    let mut conn = db.get().await?;
    let inserted = diesel::insert_into(product_photos::table)
        .values((
            product_photos::product_id.eq(id.get()),
            product_photos::content_type.eq(&photo.content_type),
            product_photos::etag.eq(&photo.etag),
            product_photos::bytes.eq(&photo.bytes),
        ))
        .on_conflict(product_photos::product_id)
        .do_update()
        .set((
            product_photos::content_type.eq(&photo.content_type),
            product_photos::etag.eq(&photo.etag),
            product_photos::bytes.eq(&photo.bytes),
            product_photos::updated_at.eq(diesel::dsl::now),
        ))
        .execute(&mut conn)
        .await;
    match inserted {
        Ok(_) => Ok(true),
        Err(diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::ForeignKeyViolation, _)) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn count(db: &Db) -> Result<i64, StoreError> {
    let mut conn = db.get().await?;
    Ok(products::table.count().get_result(&mut conn).await?)
}
