//! An ingest request's first step, batched ([`Batches`](super::batches)):
//! the requests waiting meanwhile are admitted together by one statement
//! that looks up their idempotency keys, issues the versions of the new
//! requests and stores each keyed request's issued event under its key.
//! One statement for many requests, committed on its own, holds its
//! product rows' locks for that statement only: a transaction of a
//! statement per step held them across five round trips, and apply waited
//! for them (and they for apply). A product's versions are issued in the order its requests
//! joined the batch; version and key commit together, so a retry finds
//! either nothing or the event to send again.

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Nullable, Text};
use diesel_async::RunQueryDsl;

use crate::domain::{Kind, MAX_VERSION, ProductId};
use crate::store::idempotency::IssuedEvent;
use crate::store::prepared::prepared;
use crate::store::{Db, StoreError};

/// Requests admitted in one statement, at most.
pub(crate) const BATCH: usize = 256;

/// One request: the product and kind of its change, and, under an
/// idempotency key, the key and the canonical text of what it asks.
pub(crate) struct Ask {
    pub(crate) id: ProductId,
    pub(crate) kind: Kind,
    pub(crate) key: Option<(String, String)>,
}

/// What a request may do next.
#[derive(Debug, PartialEq)]
pub(crate) enum Admitted {
    /// Publish this event: issued now, or (`replayed`) issued under the key
    /// by an earlier attempt of the same request and not applied yet.
    Publish {
        event: IssuedEvent,
        replayed: bool,
    },
    /// The key holds this request's event and the product has applied it:
    /// nothing to publish.
    Applied(IssuedEvent),
    /// Another attempt of the same request is being admitted right now.
    InProgress,
    /// The key was used for another request.
    Mismatch,
    NoProduct,
    VersionBound,
}

/// The batch, one statement: `ask` holds the requests in order (`ord`);
/// `first`, each key's first ask (a key twice in one batch: the second
/// finds the first's request in progress, as it would a moment later);
/// `held`, what those keys hold already (an index probe per key,
/// whatever the cached plan: `ingest_keys_held`); `fresh`, the asks to issue a
/// version for, counted per product and kind in `counts`; `issued` takes
/// the versions (rows locked in id order, as apply locks them, so batches
/// and apply wait for each other instead of deadlocking; a product the
/// counts would take past the version bound is left out); `handed` gives each
/// fresh ask its version in ask order; `stored` keeps the keyed ones'
/// events under their keys, in key order so two instances' batches wait
/// rather than deadlock. A key missing from `stored` was taken by another
/// transaction since `held` looked (a retry racing its first attempt, on
/// another batch or instance): that ask publishes nothing and is told to
/// come back, when it finds that event; its version is left unused.
/// `products` in the last select is read as the statement began, and only
/// for the asks not handed a version (by key, never by a scan: the rows of
/// a busy catalog carry many dead versions): the versions applied, for the
/// replays, and whether a product refused is there at all.
const ADMIT: &str = "\
WITH ask AS (
    SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[])
        WITH ORDINALITY AS a(id, kind, key, request, message_id, ord)
), bound AS (
    SELECT $6::int8 AS max
), first AS (
    SELECT DISTINCT ON (key) key, ord FROM ask WHERE key IS NOT NULL ORDER BY key, ord
), held AS (
    SELECT * FROM ingest_keys_held(ARRAY(SELECT key FROM first))
), fresh AS (
    SELECT a.* FROM ask a
    WHERE a.key IS NULL OR (a.ord IN (SELECT ord FROM first) AND a.key NOT IN (SELECT key FROM held))
), counts AS (
    SELECT id, count(*) FILTER (WHERE kind = 'price') AS prices, count(*) FILTER (WHERE kind = 'stock') AS stocks
    FROM fresh GROUP BY id
), locked AS (
    SELECT p.id FROM products p JOIN counts USING (id) ORDER BY p.id FOR UPDATE OF p
), issued AS (
    UPDATE products p SET
        price_issued = GREATEST(p.price_issued, p.price_version) + c.prices,
        stock_issued = GREATEST(p.stock_issued, p.stock_version) + c.stocks
    FROM counts c JOIN locked USING (id), bound
    WHERE p.id = c.id
      AND (c.prices = 0 OR GREATEST(p.price_issued, p.price_version) <= bound.max - c.prices)
      AND (c.stocks = 0 OR GREATEST(p.stock_issued, p.stock_version) <= bound.max - c.stocks)
    RETURNING p.id, p.price_issued, p.stock_issued
), handed AS (
    SELECT f.ord, f.key, f.request, f.message_id,
        CASE f.kind WHEN 'price' THEN i.price_issued - c.prices ELSE i.stock_issued - c.stocks END
            + row_number() OVER (PARTITION BY f.id, f.kind ORDER BY f.ord) AS version
    FROM fresh f JOIN counts c USING (id) JOIN issued i USING (id)
), stored AS (
    INSERT INTO ingest_keys (key, request, version, message_id)
    SELECT key, request, version, message_id FROM handed WHERE key IS NOT NULL ORDER BY key
    ON CONFLICT (key) DO NOTHING
    RETURNING key
)
SELECT a.ord,
    CASE
        WHEN h.ord IS NOT NULL THEN CASE WHEN a.key IS NULL OR s.key IS NOT NULL THEN 'publish' ELSE 'busy' END
        WHEN a.key IS NOT NULL AND a.ord NOT IN (SELECT ord FROM first) THEN 'busy'
        WHEN k.key IS NOT NULL THEN CASE
            WHEN k.request <> a.request THEN 'mismatch'
            WHEN k.version <= CASE a.kind WHEN 'price' THEN p.price_version ELSE p.stock_version END THEN 'applied'
            ELSE 'replay' END
        WHEN p.id IS NOT NULL THEN 'bound'
        ELSE 'no_product'
    END AS outcome,
    COALESCE(h.version, k.version, 0) AS version,
    COALESCE(h.message_id, k.message_id, '') AS message_id
FROM ask a
LEFT JOIN handed h ON h.ord = a.ord
LEFT JOIN stored s ON s.key = a.key
LEFT JOIN held k ON k.key = a.key
LEFT JOIN LATERAL (
    -- OFFSET 0 keeps it a lookup per ask: joined flat, a small table is scanned.
    SELECT id, price_version, stock_version FROM products WHERE id = a.id AND h.ord IS NULL OFFSET 0
) p ON true
ORDER BY a.ord";

/// One ask's outcome, as [`ADMIT`] answers it.
#[derive(QueryableByName)]
struct Outcome {
    #[diesel(sql_type = Text)]
    outcome: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Text)]
    message_id: String,
}

impl Outcome {
    fn admitted(self) -> Admitted {
        let event = || IssuedEvent {
            version: self.version,
            message_id: self.message_id.clone(),
        };
        match self.outcome.as_str() {
            "publish" => Admitted::Publish {
                event: event(),
                replayed: false,
            },
            "replay" => Admitted::Publish {
                event: event(),
                replayed: true,
            },
            "applied" => Admitted::Applied(event()),
            "mismatch" => Admitted::Mismatch,
            "bound" => Admitted::VersionBound,
            "no_product" => Admitted::NoProduct,
            _ => Admitted::InProgress,
        }
    }
}

/// Admits a batch: one answer per ask, in order; a database failure fails
/// every ask of the batch alike.
pub(crate) async fn admit(db: &Db, asks: Vec<Ask>) -> Vec<Result<Admitted, StoreError>> {
    match admit_all(db, &asks).await {
        Ok(answers) if answers.len() == asks.len() => answers.into_iter().map(Ok).collect(),
        Ok(answers) => {
            let why = format!("admission answered {} of {} requests", answers.len(), asks.len());
            asks.iter().map(|_| Err(StoreError::Unavailable(why.clone()))).collect()
        }
        Err(e) => {
            let why = e.to_string();
            asks.iter().map(|_| Err(StoreError::Unavailable(why.clone()))).collect()
        }
    }
}

async fn admit_all(db: &Db, asks: &[Ask]) -> Result<Vec<Admitted>, StoreError> {
    let ids: Vec<i64> = asks.iter().map(|a| a.id.get()).collect();
    let kinds: Vec<&str> = asks.iter().map(|a| a.kind.as_str()).collect();
    let keys: Vec<Option<&str>> = asks.iter().map(|a| a.key.as_ref().map(|(k, _)| k.as_str())).collect();
    let requests: Vec<Option<&str>> = asks.iter().map(|a| a.key.as_ref().map(|(_, r)| r.as_str())).collect();
    // A message id for every ask: only the fresh ones' are used.
    let message_ids: Vec<String> = asks.iter().map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let mut conn = db.get().await?;
    // Prepared: planning this statement cost as much as running it. The
    // keys are looked up through `ingest_keys_held`, whose index probe no
    // plan made from a small table's statistics can turn into a scan.
    let rows: Vec<Outcome> = prepared(ADMIT)
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Text>, _>(kinds)
        .bind::<Array<Nullable<Text>>, _>(keys)
        .bind::<Array<Nullable<Text>>, _>(requests)
        .bind::<Array<Text>, _>(message_ids)
        .bind::<BigInt, _>(MAX_VERSION)
        .load(&mut conn)
        .await?;
    Ok(rows.into_iter().map(Outcome::admitted).collect())
}
