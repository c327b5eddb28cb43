//! An ingest request's first step, batched ([`Batches`](super::batches)):
//! the requests waiting meanwhile are admitted together in one transaction
//! that looks up their idempotency keys, issues the versions of the new
//! requests and stores each keyed request's issued event under its key.
//! One transaction for many requests, not three or four round trips each,
//! is what lets the ingest API take changes at the broker's speed. A
//! product's versions are issued in the order its requests joined the
//! batch; version and key commit together, so a retry finds either nothing
//! or the event to send again.

use std::collections::{BTreeMap, HashMap, HashSet};

use diesel::sql_types::{Array, BigInt};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::issue_many;
use crate::domain::{Kind, ProductId};
use crate::store::idempotency::{self, Held, IssuedEvent, KeyAsk};
use crate::store::{AppliedVersions, Db, StoreError};

/// Requests admitted in one transaction, at most.
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
    let replays = look_up_keys(conn, asks, &mut out).await?;
    let fresh = issue_versions(conn, asks, &mut out).await?;
    hold_keys(conn, asks, &fresh, &mut out).await?;
    settle_replays(conn, asks, replays, &mut out).await?;
    Ok(out.into_iter().map(|a| a.unwrap_or(Admitted::InProgress)).collect())
}

fn key_of(ask: &Ask) -> Option<KeyAsk<'_>> {
    ask.key.as_ref().map(|(key, request)| KeyAsk { key, request })
}

/// Looks up the asks' keys; decides every ask whose key was used for
/// another request, and returns those whose key holds their event (the
/// replays). A key twice in one batch: the second finds the first's
/// request in progress, as it would a moment later.
async fn look_up_keys(
    conn: &mut AsyncPgConnection,
    asks: &[Ask],
    out: &mut Slots,
) -> Result<Vec<(usize, IssuedEvent)>, StoreError> {
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
    let key_asks: Vec<KeyAsk<'_>> = keyed.iter().filter_map(|&i| key_of(&asks[i])).collect();
    let mut held = idempotency::held_many(conn, &key_asks).await?;
    let mut replays = Vec::new();
    for (i, ask) in keyed.into_iter().zip(key_asks) {
        match held.remove(ask.key) {
            None => {}
            Some(Held::Other) => out[i] = Some(Admitted::Mismatch),
            Some(Held::Issued(event)) => {
                // Decided once the product's applied version is known.
                out[i] = Some(Admitted::InProgress);
                replays.push((i, event));
            }
        }
    }
    Ok(replays)
}

/// Issues versions for the undecided asks, counted per product and kind
/// and handed out in ask order. Returns the keyed asks' new events, to
/// store under their keys.
async fn issue_versions(
    conn: &mut AsyncPgConnection,
    asks: &[Ask],
    out: &mut Slots,
) -> Result<Vec<(usize, IssuedEvent)>, StoreError> {
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
    let mut fresh = Vec::new();
    for &i in &pending {
        let id = asks[i].id.get();
        let Some(n) = next.get_mut(&id) else {
            out[i] = Some(if existing.contains(&id) {
                Admitted::VersionBound
            } else {
                Admitted::NoProduct
            });
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
            fresh.push((i, event.clone()));
        }
        out[i] = Some(Admitted::Publish { event, replayed: false });
    }
    Ok(fresh)
}

/// Stores the keyed asks' new events under their keys. A key another
/// transaction stored meanwhile (a retry racing its first attempt, on
/// another batch or instance) keeps that one's event: this ask publishes
/// nothing and is told to come back, when it will find that event; the
/// version it was issued is left unused.
async fn hold_keys(
    conn: &mut AsyncPgConnection,
    asks: &[Ask],
    fresh: &[(usize, IssuedEvent)],
    out: &mut Slots,
) -> Result<(), StoreError> {
    let events: Vec<(&str, &str, &IssuedEvent)> = fresh
        .iter()
        .filter_map(|(i, e)| asks[*i].key.as_ref().map(|(k, r)| (k.as_str(), r.as_str(), e)))
        .collect();
    let stored = idempotency::hold_many(conn, &events).await?;
    for (i, _) in fresh {
        if asks[*i].key.as_ref().is_some_and(|(k, _)| !stored.contains(k)) {
            out[*i] = Some(Admitted::InProgress);
        }
    }
    Ok(())
}

/// Decides the replays: an event the product has applied is answered
/// without publishing; one it has not (its attempt failed, or is still on
/// its way) is published again.
async fn settle_replays(
    conn: &mut AsyncPgConnection,
    asks: &[Ask],
    replays: Vec<(usize, IssuedEvent)>,
    out: &mut Slots,
) -> Result<(), StoreError> {
    if replays.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = replays.iter().map(|(i, _)| asks[*i].id.get()).collect();
    let applied: HashMap<i64, AppliedVersions> =
        diesel::sql_query("SELECT id, price_version, stock_version FROM products WHERE id = ANY($1)")
            .bind::<Array<BigInt>, _>(ids)
            .load::<AppliedVersions>(conn)
            .await?
            .into_iter()
            .map(|a| (a.id, a))
            .collect();
    for (i, event) in replays {
        let done = applied
            .get(&asks[i].id.get())
            .is_some_and(|a| event.version <= a.version(asks[i].kind));
        out[i] = Some(if done {
            Admitted::Applied(event)
        } else {
            Admitted::Publish { event, replayed: true }
        });
    }
    Ok(())
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
