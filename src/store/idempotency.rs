//! Idempotency keys of the ingest API: a key is claimed before its request
//! issues a version, holds the issued event before it is published and the
//! answer once the broker confirmed, and is forgotten after [`KEEP`]. A
//! retry under the key publishes the stored event again, never a new one.

use std::collections::HashMap;

use diesel::sql_types::{Array, BigInt, Jsonb, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

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

/// One keyed request of a batch: its key, the canonical text of what it
/// asks, and the request (`owner`) that claims the key.
pub(crate) struct KeyAsk<'a> {
    pub(crate) key: &'a str,
    pub(crate) request: &'a str,
    pub(crate) owner: &'a str,
}

#[derive(diesel::QueryableByName)]
struct Taken {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    version: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    message_id: Option<String>,
}

#[derive(diesel::QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = Text)]
    request: String,
    #[diesel(sql_type = Nullable<Jsonb>)]
    answer: Option<serde_json::Value>,
}

/// Claims each key of a batch (keys distinct) for its request on behalf of
/// its owner, or says what the key already holds; in the caller's
/// transaction, so a claim, its event and the version behind it commit
/// together. Keys are inserted in order, so two instances' batches wait
/// for each other rather than deadlock.
pub(crate) async fn claim_many(
    conn: &mut AsyncPgConnection,
    asks: &[KeyAsk<'_>],
) -> Result<Vec<Claim>, diesel::result::Error> {
    if asks.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = asks.iter().map(|a| a.key.to_owned()).collect();
    let requests: Vec<String> = asks.iter().map(|a| a.request.to_owned()).collect();
    let owners: Vec<String> = asks.iter().map(|a| a.owner.to_owned()).collect();
    // Planned for each batch (not prepared): a generic plan for a join with
    // an array of keys may scan the whole, ever larger, table.
    let taken: Vec<Taken> = diesel::sql_query(format!(
        "INSERT INTO ingest_keys (key, request, owner) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS a(key, request, owner) ORDER BY key \
         ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, created_at = now() \
           WHERE ingest_keys.answer IS NULL AND ingest_keys.created_at < now() - interval '{ABANDONED}' \
             AND ingest_keys.request = EXCLUDED.request \
         RETURNING key, version, message_id"
    ))
    .bind::<Array<Text>, _>(keys)
    .bind::<Array<Text>, _>(requests)
    .bind::<Array<Text>, _>(owners)
    .load(conn)
    .await?;
    let mut taken: HashMap<String, Option<IssuedEvent>> = taken
        .into_iter()
        .map(|t| {
            let issued = t
                .version
                .zip(t.message_id)
                .map(|(version, message_id)| IssuedEvent { version, message_id });
            (t.key, issued)
        })
        .collect();
    let others: Vec<String> = asks
        .iter()
        .filter(|a| !taken.contains_key(a.key))
        .map(|a| a.key.to_owned())
        .collect();
    let mut held: HashMap<String, Row> = if others.is_empty() {
        HashMap::new()
    } else {
        diesel::sql_query("SELECT key, request, answer FROM ingest_keys WHERE key = ANY($1)")
            .bind::<Array<Text>, _>(others)
            .load::<Row>(conn)
            .await?
            .into_iter()
            .map(|r| (r.key.clone(), r))
            .collect()
    };
    Ok(asks
        .iter()
        .map(|a| match (taken.remove(a.key), held.remove(a.key)) {
            (Some(issued), _) => Claim::Claimed(issued),
            // Forgotten since: claimed again on the next try.
            (None, None) => Claim::InProgress,
            (None, Some(r)) if r.request != a.request => Claim::Mismatch,
            (
                None,
                Some(Row {
                    answer: Some(answer), ..
                }),
            ) => Claim::Answered(answer),
            (None, Some(_)) => Claim::InProgress,
        })
        .collect())
}

/// Stores the events issued under claims of this transaction (key, owner,
/// event), before any is published: whatever fails next, a retry sends
/// that event, not a newer one.
pub(crate) async fn record_many(
    conn: &mut AsyncPgConnection,
    events: &[(&str, &str, &IssuedEvent)],
) -> Result<(), diesel::result::Error> {
    if events.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "UPDATE ingest_keys k SET version = e.version, message_id = e.message_id \
         FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[]) AS e(key, owner, version, message_id) \
         WHERE k.key = e.key AND k.owner = e.owner AND k.answer IS NULL AND k.version IS NULL",
    )
    .bind::<Array<Text>, _>(events.iter().map(|e| e.0.to_owned()).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(events.iter().map(|e| e.1.to_owned()).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(events.iter().map(|e| e.2.version).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(events.iter().map(|e| e.2.message_id.clone()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Forgets the claims of this transaction whose requests issued nothing
/// (key, owner): a retry then starts afresh.
pub(crate) async fn forget_many(
    conn: &mut AsyncPgConnection,
    claims: &[(&str, &str)],
) -> Result<(), diesel::result::Error> {
    if claims.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "DELETE FROM ingest_keys k USING unnest($1::text[], $2::text[]) AS c(key, owner) \
         WHERE k.key = c.key AND k.owner = c.owner AND k.answer IS NULL AND k.version IS NULL",
    )
    .bind::<Array<Text>, _>(claims.iter().map(|c| c.0.to_owned()).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(claims.iter().map(|c| c.1.to_owned()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Stores the answers of confirmed requests (key, answer), many at once.
pub(crate) async fn answer_many(db: &Db, answers: &[(String, serde_json::Value)]) -> Result<(), StoreError> {
    if answers.is_empty() {
        return Ok(());
    }
    let mut conn = db.get().await?;
    diesel::sql_query(
        "UPDATE ingest_keys k SET answer = a.answer \
         FROM unnest($1::text[], $2::jsonb[]) AS a(key, answer) WHERE k.key = a.key",
    )
    .bind::<Array<Text>, _>(answers.iter().map(|a| a.0.clone()).collect::<Vec<_>>())
    .bind::<Array<Jsonb>, _>(answers.iter().map(|a| a.1.clone()).collect::<Vec<_>>())
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
