//! An ingest request's first step, batched ([`Batches`](super::batches)):
//! the requests waiting meanwhile are admitted together in one transaction
//! that claims their idempotency keys, issues their versions and stores the
//! issued events under their keys. One transaction for many requests, not
//! three or four round trips each, is what lets the ingest API take changes
//! at the broker's speed. A product's versions are issued in the order its
//! requests joined the batch; claim, version and stored event commit
//! together, so a retry finds either nothing or the event to send again.

use std::collections::{BTreeMap, HashMap, HashSet};

use diesel::sql_types::{Array, BigInt};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::issue_many;
use crate::domain::{Kind, ProductId};
use crate::store::idempotency::{self, Claim, IssuedEvent, KeyAsk};
use crate::store::{Db, StoreError};

/// Requests admitted in one transaction, at most.
pub(crate) const BATCH: usize = 256;

/// One request: the product and kind of its change, and, under an
/// idempotency key, the key and the canonical text of what it asks.
pub(crate) struct Ask {
    pub(crate) id: ProductId,
    pub(crate) kind: Kind,
    pub(crate) key: Option<(String, String)>,
    /// Who claims the key for this request.
    pub(crate) owner: String,
}

/// What a request may do next.
#[derive(Debug, PartialEq)]
pub(crate) enum Admitted {
    /// Publish this event: issued now, or stored under the key by an
    /// earlier attempt of the same request.
    Publish(IssuedEvent),
    /// The key holds the answer of the same request.
    Answered(serde_json::Value),
    /// The same request is being published under the key right now.
    InProgress,
    /// The key was used for another request.
    Mismatch,
    NoProduct,
    VersionBound,
}

/// Admits a batch: one answer per ask, in order; a database failure fails
/// every ask of the batch alike.
pub(crate) async fn admit(db: &Db, asks: Vec<Ask>) -> Vec<Result<Admitted, StoreError>> {
    let admitted = async {
        let mut conn = db.get().await?;
        conn.transaction(async |conn| admit_in(conn, &asks).await).await
    };
    match admitted.await {
        Ok(answers) => answers.into_iter().map(Ok).collect(),
        Err(e) => {
            let why = e.to_string();
            asks.iter().map(|_| Err(StoreError::Unavailable(why.clone()))).collect()
        }
    }
}

/// The batch's answers so far, one slot per ask; None: not yet decided.
type Slots = Vec<Option<Admitted>>;

async fn admit_in(conn: &mut AsyncPgConnection, asks: &[Ask]) -> Result<Vec<Admitted>, StoreError> {
    let mut out: Slots = asks.iter().map(|_| None).collect();
    claim_keys(conn, asks, &mut out).await?;
    let (recorded, forgotten) = issue_versions(conn, asks, &mut out).await?;
    // The events under their keys; claims that issued nothing forgotten.
    let key_of = |i: usize| asks[i].key.as_ref().map_or("", |(k, _)| k.as_str());
    let events: Vec<(&str, &str, &IssuedEvent)> = recorded
        .iter()
        .map(|(i, e)| (key_of(*i), asks[*i].owner.as_str(), e))
        .collect();
    idempotency::record_many(conn, &events).await?;
    let claims: Vec<(&str, &str)> = forgotten.iter().map(|&i| (key_of(i), asks[i].owner.as_str())).collect();
    idempotency::forget_many(conn, &claims).await?;
    Ok(out.into_iter().map(|a| a.unwrap_or(Admitted::InProgress)).collect())
}

/// Claims the asks' keys; decides every ask whose key was answered, is in
/// progress, was used for another request, or holds a stored event. A key
/// twice in one batch: the second finds the first's request in progress,
/// as it would a moment later.
async fn claim_keys(conn: &mut AsyncPgConnection, asks: &[Ask], out: &mut Slots) -> Result<(), StoreError> {
    let mut keys_seen = HashSet::new();
    let mut keyed: Vec<usize> = Vec::new();
    for (i, a) in asks.iter().enumerate() {
        if let Some((key, _)) = &a.key {
            if keys_seen.insert(key.as_str()) {
                keyed.push(i);
            } else {
                out[i] = Some(Admitted::InProgress);
            }
        }
    }
    let key_asks: Vec<KeyAsk<'_>> = keyed
        .iter()
        .filter_map(|&i| {
            let (key, request) = asks[i].key.as_ref()?;
            Some(KeyAsk {
                key,
                request,
                owner: &asks[i].owner,
            })
        })
        .collect();
    let claims = idempotency::claim_many(conn, &key_asks).await?;
    for (&i, claim) in keyed.iter().zip(claims) {
        out[i] = match claim {
            Claim::Claimed(None) => None,
            Claim::Claimed(Some(stored)) => Some(Admitted::Publish(stored)),
            Claim::Answered(answer) => Some(Admitted::Answered(answer)),
            Claim::InProgress => Some(Admitted::InProgress),
            Claim::Mismatch => Some(Admitted::Mismatch),
        };
    }
    Ok(())
}

/// Issues versions for the undecided asks, counted per product and kind
/// and handed out in ask order. Returns the keyed asks' new events (to
/// store under their keys) and the keyed asks that got none (claims to
/// forget).
async fn issue_versions(
    conn: &mut AsyncPgConnection,
    asks: &[Ask],
    out: &mut Slots,
) -> Result<(Vec<(usize, IssuedEvent)>, Vec<usize>), StoreError> {
    let pending: Vec<usize> = (0..asks.len()).filter(|&i| out[i].is_none()).collect();
    let mut counts: BTreeMap<i64, (ProductId, i64, i64)> = BTreeMap::new();
    for &i in &pending {
        let c = counts.entry(asks[i].id.get()).or_insert((asks[i].id, 0, 0));
        match asks[i].kind {
            Kind::Price => c.1 += 1,
            Kind::Stock => c.2 += 1,
        }
    }
    let picks: Vec<(ProductId, i64, i64)> = counts.values().copied().collect();
    let issued = issue_many(conn, &picks).await?;
    // The next version to hand out, per product: the first of those issued.
    let mut next: HashMap<i64, (i64, i64)> = issued
        .iter()
        .filter_map(|r| {
            let (_, prices, stocks) = counts.get(&r.id)?;
            Some((
                r.id,
                (r.issued.price_issued - prices + 1, r.issued.stock_issued - stocks + 1),
            ))
        })
        .collect();
    let missing: Vec<i64> = counts.keys().filter(|id| !next.contains_key(id)).copied().collect();
    let existing = existing_of(conn, missing).await?;
    let (mut recorded, mut forgotten) = (Vec::new(), Vec::new());
    for &i in &pending {
        let id = asks[i].id.get();
        let Some(n) = next.get_mut(&id) else {
            out[i] = Some(if existing.contains(&id) {
                Admitted::VersionBound
            } else {
                Admitted::NoProduct
            });
            if asks[i].key.is_some() {
                forgotten.push(i);
            }
            continue;
        };
        let slot = match asks[i].kind {
            Kind::Price => &mut n.0,
            Kind::Stock => &mut n.1,
        };
        let event = IssuedEvent {
            version: *slot,
            message_id: uuid::Uuid::new_v4().to_string(),
        };
        *slot += 1;
        if asks[i].key.is_some() {
            recorded.push((i, event.clone()));
        }
        out[i] = Some(Admitted::Publish(event));
    }
    Ok((recorded, forgotten))
}

/// Which of `ids` are products (those not issued a version either do not
/// exist or are at the version bound).
async fn existing_of(conn: &mut AsyncPgConnection, ids: Vec<i64>) -> Result<HashSet<i64>, StoreError> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let rows: Vec<Id> = diesel::sql_query("SELECT id FROM products WHERE id = ANY($1)")
        .bind::<Array<BigInt>, _>(ids)
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}
