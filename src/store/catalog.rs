//! Reads and writes of the catalog outside the event pipeline: REST listing,
//! snapshots for clients, and photos.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::Serialize;

use super::schema::{product_photos, products};
use super::{Db, StoreError};
use crate::domain::ProductId;

/// A product as clients see it, with the version of each attribute so that
/// snapshot and updates can be merged without gaps or duplicates.
#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq, Eq)]
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
    let mut query = products::table
        .select(Product::as_select())
        .filter(products::id.gt(after))
        .order(products::id)
        .limit(limit)
        .into_boxed();
    if let Some(ids) = ids {
        query = query.filter(products::id.eq_any(ids.to_vec()));
    }
    Ok(query.load(&mut conn).await?)
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
