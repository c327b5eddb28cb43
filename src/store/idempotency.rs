//! Idempotency keys of the ingest API: a key is claimed before its request
//! issues a version, holds the issued event before it is published and the
//! answer once the broker confirmed, and is forgotten after [`KEEP`]. A
//! retry under the key publishes the stored event again, never a new one.

use diesel::OptionalExtension;
use diesel::sql_types::{BigInt, Jsonb, Nullable, Text};
use diesel_async::RunQueryDsl;

use super::{Db, StoreError};

/// How long an answer is kept for retries.
pub(crate) const KEEP: &str = "24 hours";
/// A claim without an answer this old belongs to a request that died
/// before answering: another request with the key may take it over.
const ABANDONED: &str = "1 minute";

/// The event a claim issued: what a retry publishes again.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IssuedEvent {
    pub(crate) version: i64,
    pub(crate) message_id: String,
}

/// What a claim found.
#[derive(Debug, PartialEq)]
pub(crate) enum Claim {
    /// The key is this request's (`owner`'s) to answer; with the event an
    /// earlier attempt issued, when one did.
    Claimed(Option<IssuedEvent>),
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

#[derive(diesel::QueryableByName)]
struct Taken {
    #[diesel(sql_type = Nullable<BigInt>)]
    version: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    message_id: Option<String>,
}

/// Claims `key` for `request` (a canonical text of what is asked) on
/// behalf of `owner`, or says what the key already holds.
pub(crate) async fn claim(db: &Db, key: &str, request: &str, owner: &str) -> Result<Claim, StoreError> {
    let mut conn = db.get().await?;
    let taken: Option<Taken> = diesel::sql_query(format!(
        "INSERT INTO ingest_keys (key, request, owner) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, created_at = now() \
           WHERE ingest_keys.answer IS NULL AND ingest_keys.created_at < now() - interval '{ABANDONED}' \
             AND ingest_keys.request = EXCLUDED.request \
         RETURNING version, message_id"
    ))
    .bind::<Text, _>(key)
    .bind::<Text, _>(request)
    .bind::<Text, _>(owner)
    .get_result(&mut conn)
    .await
    .optional()?;
    if let Some(t) = taken {
        let issued = t
            .version
            .zip(t.message_id)
            .map(|(version, message_id)| IssuedEvent { version, message_id });
        return Ok(Claim::Claimed(issued));
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

/// Stores the event `owner` issued under its claim, before publishing it;
/// false when the claim is no longer `owner`'s (a retry took it over), and
/// the event must not be published.
pub(crate) async fn record(db: &Db, key: &str, owner: &str, issued: &IssuedEvent) -> Result<bool, StoreError> {
    let mut conn = db.get().await?;
    let n = diesel::sql_query(
        "UPDATE ingest_keys SET version = $3, message_id = $4 \
         WHERE key = $1 AND owner = $2 AND answer IS NULL AND version IS NULL",
    )
    .bind::<Text, _>(key)
    .bind::<Text, _>(owner)
    .bind::<BigInt, _>(issued.version)
    .bind::<Text, _>(&issued.message_id)
    .execute(&mut conn)
    .await?;
    Ok(n == 1)
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

/// Gives `owner`'s claim back when its request failed, so a retry can run
/// at once: a claim that issued nothing is forgotten; one that stored its
/// event keeps it, for the retry to publish again.
pub(crate) async fn release(db: &Db, key: &str, owner: &str) -> Result<(), StoreError> {
    let mut conn = db.get().await?;
    diesel::sql_query("DELETE FROM ingest_keys WHERE key = $1 AND owner = $2 AND answer IS NULL AND version IS NULL")
        .bind::<Text, _>(key)
        .bind::<Text, _>(owner)
        .execute(&mut conn)
        .await?;
    // Aged past the take-over time: the next claim of the same request
    // takes it, with its event.
    diesel::sql_query(format!(
        "UPDATE ingest_keys SET created_at = now() - interval '{ABANDONED}' - interval '1 second' \
         WHERE key = $1 AND owner = $2 AND answer IS NULL"
    ))
    .bind::<Text, _>(key)
    .bind::<Text, _>(owner)
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
