//! Idempotency keys of the ingest API: a key holds the event its request
//! issued (version, message id), stored in the transaction that issued the
//! version, before the event is published, and is forgotten after
//! [`KEEP`]. A retry under the key issues nothing: it finds that event and
//! publishes it again unless the product has applied it (apply drops a copy
//! it has), so however an attempt ended, the change is applied once. One
//! row written per key, once: no claim to update, no answer to store.

use std::collections::{HashMap, HashSet};

use diesel::sql_types::{Array, BigInt, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::{Db, StoreError};

/// How long a key is kept for retries.
pub(crate) const KEEP: &str = "24 hours";

/// The event a key's request issued: what a retry publishes again.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IssuedEvent {
    pub(crate) version: i64,
    pub(crate) message_id: String,
}

/// What a key already held.
#[derive(Debug, PartialEq)]
pub(crate) enum Held {
    /// The event this same request issued under the key.
    Issued(IssuedEvent),
    /// The key was used for another request.
    Other,
}

/// One keyed request: its key and the canonical text of what it asks.
pub(crate) struct KeyAsk<'a> {
    pub(crate) key: &'a str,
    pub(crate) request: &'a str,
}

#[derive(diesel::QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = Text)]
    request: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Text)]
    message_id: String,
}

/// What each of the asks' keys (distinct) holds already, by key; keys not
/// in the answer are free.
pub(crate) async fn held_many(
    conn: &mut AsyncPgConnection,
    asks: &[KeyAsk<'_>],
) -> Result<HashMap<String, Held>, diesel::result::Error> {
    if asks.is_empty() {
        return Ok(HashMap::new());
    }
    let keys: Vec<String> = asks.iter().map(|a| a.key.to_owned()).collect();
    // Planned for each batch (not prepared): a generic plan for an array of
    // keys may scan the whole, ever larger, table.
    let rows: Vec<Row> =
        diesel::sql_query("SELECT key, request, version, message_id FROM ingest_keys WHERE key = ANY($1)")
            .bind::<Array<Text>, _>(keys)
            .load(conn)
            .await?;
    let requests: HashMap<&str, &str> = asks.iter().map(|a| (a.key, a.request)).collect();
    Ok(rows
        .into_iter()
        .map(|r| {
            let held = if requests.get(r.key.as_str()) == Some(&r.request.as_str()) {
                Held::Issued(IssuedEvent {
                    version: r.version,
                    message_id: r.message_id,
                })
            } else {
                Held::Other
            };
            (r.key, held)
        })
        .collect())
}

/// Stores issued events under their keys (key, request, event) in the
/// caller's transaction, so key and version commit together; answers the
/// keys stored. A key missing from the answer was taken by another
/// transaction since [`held_many`] looked (a retry racing its first
/// attempt): its request publishes nothing. Keys are inserted in order, so
/// two instances' batches wait for each other rather than deadlock.
pub(crate) async fn hold_many(
    conn: &mut AsyncPgConnection,
    events: &[(&str, &str, &IssuedEvent)],
) -> Result<HashSet<String>, diesel::result::Error> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    #[derive(diesel::QueryableByName)]
    struct Key {
        #[diesel(sql_type = Text)]
        key: String,
    }
    let stored: Vec<Key> = diesel::sql_query(
        "INSERT INTO ingest_keys (key, request, version, message_id) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[]) AS e(key, request, version, message_id) \
         ORDER BY key \
         ON CONFLICT (key) DO NOTHING RETURNING key",
    )
    .bind::<Array<Text>, _>(events.iter().map(|e| e.0.to_owned()).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(events.iter().map(|e| e.1.to_owned()).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(events.iter().map(|e| e.2.version).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(events.iter().map(|e| e.2.message_id.clone()).collect::<Vec<_>>())
    .load(conn)
    .await?;
    Ok(stored.into_iter().map(|k| k.key).collect())
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
