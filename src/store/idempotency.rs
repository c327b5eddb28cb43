//! Idempotency keys of the ingest API: a key holds the event its request
//! issued (version, message id), stored in the transaction that issued the
//! version, before the event is published, and is forgotten after
//! [`KEEP`]. A retry under the key issues nothing: it finds that event and
//! publishes it again unless the product has applied it (apply drops a copy
//! it has), so however an attempt ended, the change is applied once. One
//! row written per key, once: no claim to update, no answer to store.

use diesel_async::RunQueryDsl;

use super::{Db, StoreError};

/// How long a key is kept for retries.
pub(crate) const KEEP: &str = "24 hours";

/// The event a key's request issued: what a retry publishes again.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IssuedEvent {
    pub(crate) version: i64,
    pub(crate) message_id: String,
}

/// Forgets keys older than [`KEEP`].
pub(crate) async fn purge_expired(db: &Db) -> Result<usize, StoreError> {
    let mut conn = db.get().await?;
    let n = diesel::sql_query(format!(
        "DELETE FROM ingest_keys WHERE created_at < now() - interval '{KEEP}'"
    ))
    .execute(&mut conn)
    .await?;
    Ok(n)
}
