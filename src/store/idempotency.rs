//! Idempotency keys of the ingest API: a key is claimed before its request
//! issues a version, holds the answer once the broker confirmed, and is
//! forgotten after [`KEEP`].

use diesel::OptionalExtension;
use diesel::sql_types::{Jsonb, Nullable, Text};
use diesel_async::RunQueryDsl;

use super::{Db, StoreError};

/// How long an answer is kept for retries.
pub(crate) const KEEP: &str = "24 hours";
/// A claim without an answer this old belongs to a request that died
/// before answering: another request with the key may take it over.
const ABANDONED: &str = "1 minute";

/// What a claim found.
#[derive(Debug, PartialEq)]
pub(crate) enum Claim {
    /// The key is this request's to answer.
    Claimed,
    /// The key was used before for this same request; its answer.
    Answered(serde_json::Value),
    /// The same request is being published under the key right now.
    InProgress,
    /// The key was used for another request.
    Mismatch,
}

#[derive(diesel::QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    request: String,
    #[diesel(sql_type = Nullable<Jsonb>)]
    answer: Option<serde_json::Value>,
}

/// Claims `key` for `request` (a canonical text of what is asked), or
/// says what the key already holds.
pub(crate) async fn claim(db: &Db, key: &str, request: &str) -> Result<Claim, StoreError> {
    let mut conn = db.get().await?;
    let taken = diesel::sql_query(format!(
        "INSERT INTO ingest_keys (key, request) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET request = EXCLUDED.request, created_at = now() \
           WHERE ingest_keys.answer IS NULL AND ingest_keys.created_at < now() - interval '{ABANDONED}' \
             AND ingest_keys.request = EXCLUDED.request"
    ))
    .bind::<Text, _>(key)
    .bind::<Text, _>(request)
    .execute(&mut conn)
    .await?;
    if taken == 1 {
        return Ok(Claim::Claimed);
    }
    let row: Option<Row> = diesel::sql_query("SELECT request, answer FROM ingest_keys WHERE key = $1")
        .bind::<Text, _>(key)
        .get_result(&mut conn)
        .await
        .optional()?;
    Ok(match row {
        // Forgotten between the two statements: claim it again next time.
        None => Claim::InProgress,
        Some(r) if r.request != request => Claim::Mismatch,
        Some(Row { answer: Some(a), .. }) => Claim::Answered(a),
        Some(_) => Claim::InProgress,
    })
}

/// Stores the answer of a claimed key.
pub(crate) async fn answer(db: &Db, key: &str, answer: &serde_json::Value) -> Result<(), StoreError> {
    let mut conn = db.get().await?;
    diesel::sql_query("UPDATE ingest_keys SET answer = $2 WHERE key = $1")
        .bind::<Text, _>(key)
        .bind::<Jsonb, _>(answer)
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// Gives a claimed key back when its request failed, so a retry can run.
pub(crate) async fn release(db: &Db, key: &str) -> Result<(), StoreError> {
    let mut conn = db.get().await?;
    diesel::sql_query("DELETE FROM ingest_keys WHERE key = $1 AND answer IS NULL")
        .bind::<Text, _>(key)
        .execute(&mut conn)
        .await?;
    Ok(())
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
