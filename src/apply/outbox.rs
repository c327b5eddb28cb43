//! The update stream's transactional outbox: apply records each committed
//! batch's stream message in its own transaction; the relay reads the rows in
//! commit order, publishes them and deletes them once confirmed.

use diesel::sql_types::{Array, BigInt, Bool, Bytea, Integer, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::domain::Event;
use crate::store::prepared::prepared;
use crate::update::MAX_UPDATES_PER_MESSAGE;
use crate::wire::encode_update;

/// Advisory lock key held by the one relay publishing at a time, so two
/// instances never interleave their publishes and commit order holds.
const RELAY_LOCK: i64 = 0x0070_6f75_7462_6f78;

/// One stream message waiting to be published.
#[derive(Debug, diesel::QueryableByName)]
pub(crate) struct Unrelayed {
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
    #[diesel(sql_type = Text)]
    pub message_id: String,
    #[diesel(sql_type = Bytea)]
    pub body: Vec<u8>,
    /// Updates in the message, for the broadcast counter.
    #[diesel(sql_type = Integer)]
    pub updates: i32,
    /// The transaction that wrote it.
    #[diesel(sql_type = BigInt)]
    pub txid: i64,
    /// When its updates were published, on average (µs; 0 when unknown):
    /// the relay's latency metric, counted once per update, starts there.
    #[diesel(sql_type = BigInt)]
    pub ts_us: i64,
    /// The traceparent of the apply batch that wrote it (tracing on).
    #[diesel(sql_type = Nullable<Text>)]
    pub traceparent: Option<String>,
}

/// Records the applied updates, in commit order, as stream messages of at
/// most `MAX_UPDATES_PER_MESSAGE` updates, with the apply batch's
/// traceparent. Runs inside the apply transaction.
pub(crate) async fn record(
    conn: &mut AsyncPgConnection,
    applied: &[&Event],
    trace: Option<&str>,
) -> Result<(), diesel::result::Error> {
    for chunk in applied.chunks(MAX_UPDATES_PER_MESSAGE) {
        let mut body = Vec::with_capacity(chunk.len() * 160 + 2);
        body.push(b'[');
        for (i, e) in chunk.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            // Fails the apply transaction rather than relaying an empty update.
            let update = encode_update(e).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
            body.extend_from_slice(&update);
        }
        body.push(b']');
        let message_id = chunk
            .first()
            .map(|e| format!("{}:{}", e.topic(), e.version))
            .unwrap_or_default();
        prepared(
            "INSERT INTO update_outbox (message_id, body, updates, ts_us, traceparent) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind::<Text, _>(message_id)
        .bind::<Bytea, _>(body)
        .bind::<Integer, _>(chunk.len() as i32)
        .bind::<BigInt, _>(mean_ts_us(chunk))
        .bind::<Nullable<Text>, _>(trace)
        .execute(conn)
        .await?;
    }
    Ok(())
}

/// The mean publish time of the updates that have one (0 when none has).
fn mean_ts_us(chunk: &[&Event]) -> i64 {
    let stamped: Vec<i64> = chunk.iter().map(|e| e.ts_us).filter(|&t| t > 0).collect();
    if stamped.is_empty() {
        return 0;
    }
    // Summed in i128: no number of stamps can overflow it.
    (stamped.iter().map(|&t| i128::from(t)).sum::<i128>() / stamped.len() as i128) as i64
}

/// Takes the relay lock for the current transaction; false when another
/// relay holds it.
pub(crate) async fn try_lock(conn: &mut AsyncPgConnection) -> Result<bool, diesel::result::Error> {
    #[derive(diesel::QueryableByName)]
    struct Locked {
        #[diesel(sql_type = Bool)]
        locked: bool,
    }
    let l: Locked = prepared("SELECT pg_try_advisory_xact_lock($1) AS locked")
        .bind::<BigInt, _>(RELAY_LOCK)
        .get_result(conn)
        .await?;
    Ok(l.locked)
}

/// The oldest pending messages, in commit order.
pub(crate) async fn pending(conn: &mut AsyncPgConnection, limit: i64) -> Result<Vec<Unrelayed>, diesel::result::Error> {
    prepared("SELECT seq, message_id, body, updates, txid, ts_us, traceparent FROM update_outbox ORDER BY seq LIMIT $1")
        .bind::<BigInt, _>(limit)
        .load(conn)
        .await
}

/// Forgets messages the broker confirmed.
pub(crate) async fn delete(conn: &mut AsyncPgConnection, seqs: Vec<i64>) -> Result<(), diesel::result::Error> {
    prepared("DELETE FROM update_outbox WHERE seq = ANY($1)")
        .bind::<Array<BigInt>, _>(seqs)
        .execute(conn)
        .await?;
    Ok(())
}
