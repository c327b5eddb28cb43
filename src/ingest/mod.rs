//! Where changes enter the pipeline: a version issued from the product row,
//! an event on `product.events`, published with a confirm. The ingest API
//! (`http::ingest`) submits one change at a time and answers once the
//! broker has confirmed it; the built-in generator issues and builds its
//! events with the same functions and pipelines their confirms.

pub(crate) mod generator;

pub use generator::{Control, GeneratorHandle};

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Bool};
use diesel::{OptionalExtension, QueryableByName};
use diesel_async::RunQueryDsl;
use serde::Serialize;

use crate::broker::link::Link;
use crate::broker::publisher::{Confirmed, Outgoing, confirm_channel, publish_one};
use crate::domain::{Change, Event, Kind, MAX_VERSION, ProductId, now_us};
use crate::store::idempotency::{self, Claim, IssuedEvent};
use crate::store::{Db, StoreError};
use crate::wire::encode_event;

/// The state a change starts from, with freshly issued versions.
#[derive(Debug, QueryableByName)]
pub struct Issued {
    #[diesel(sql_type = BigInt)]
    pub price_cents: i64,
    #[diesel(sql_type = BigInt)]
    pub stock: i64,
    #[diesel(sql_type = BigInt)]
    pub price_issued: i64,
    #[diesel(sql_type = BigInt)]
    pub stock_issued: i64,
}

/// Issues the next version of the given kinds of one product. Versions come
/// from the row itself, so no two publishers (instances, the generator, the
/// ingest API) can hand out the same one. `None` when the product does not
/// exist, or when a requested kind is at [`MAX_VERSION`] (only a row written
/// before versions were bounded can be): a version above it would overflow
/// or be refused by every consumer.
pub async fn issue(db: &Db, id: ProductId, price: bool, stock: bool) -> Result<Option<Issued>, StoreError> {
    let mut conn = db.get().await?;
    let issued = diesel::sql_query(
        "UPDATE products SET \
           price_issued = GREATEST(price_issued, price_version) + CASE WHEN $2 THEN 1 ELSE 0 END, \
           stock_issued = GREATEST(stock_issued, stock_version) + CASE WHEN $3 THEN 1 ELSE 0 END \
         WHERE id = $1 \
           AND (NOT $2 OR GREATEST(price_issued, price_version) < $4) \
           AND (NOT $3 OR GREATEST(stock_issued, stock_version) < $4) \
         RETURNING price_cents, stock, price_issued, stock_issued",
    )
    .bind::<BigInt, _>(id.get())
    .bind::<Bool, _>(price)
    .bind::<Bool, _>(stock)
    .bind::<BigInt, _>(MAX_VERSION)
    .get_result::<Issued>(&mut conn)
    .await
    .optional()?;
    Ok(issued)
}

/// One product's freshly issued versions in a batch ([`issue_many`]).
#[derive(Debug, QueryableByName)]
pub struct IssuedFor {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(embed)]
    pub issued: Issued,
}

/// [`issue`] for many products in one statement: `(id, price, stock)` each,
/// every id at most once. Products that do not exist, or whose requested
/// kind is at [`MAX_VERSION`], are left out of the answer. The rows are
/// locked in id order, as apply locks them, so concurrent batches and apply
/// transactions wait for each other instead of deadlocking.
pub async fn issue_many(db: &Db, picks: &[(ProductId, bool, bool)]) -> Result<Vec<IssuedFor>, StoreError> {
    if picks.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = picks.iter().map(|(id, _, _)| id.get()).collect();
    let prices: Vec<bool> = picks.iter().map(|(_, p, _)| *p).collect();
    let stocks: Vec<bool> = picks.iter().map(|(_, _, s)| *s).collect();
    let mut conn = db.get().await?;
    let issued = diesel::sql_query(
        "WITH pick AS (SELECT * FROM unnest($1::int8[], $2::bool[], $3::bool[]) AS t(id, price, stock)),               locked AS (SELECT p.id FROM products p JOIN pick USING (id) ORDER BY p.id FOR UPDATE OF p)          UPDATE products p SET            price_issued = GREATEST(p.price_issued, p.price_version) + CASE WHEN pick.price THEN 1 ELSE 0 END,            stock_issued = GREATEST(p.stock_issued, p.stock_version) + CASE WHEN pick.stock THEN 1 ELSE 0 END          FROM pick JOIN locked USING (id)          WHERE p.id = pick.id            AND (NOT pick.price OR GREATEST(p.price_issued, p.price_version) < $4)            AND (NOT pick.stock OR GREATEST(p.stock_issued, p.stock_version) < $4)          RETURNING p.id, p.price_cents, p.stock, p.price_issued, p.stock_issued",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Bool>, _>(prices)
    .bind::<Array<Bool>, _>(stocks)
    .bind::<BigInt, _>(MAX_VERSION)
    .load::<IssuedFor>(&mut conn)
    .await?;
    Ok(issued)
}

/// The event of `change` at `version`, stamped now.
pub fn event(id: ProductId, change: Change, version: i64) -> Event {
    Event {
        product_id: id,
        change,
        version,
        occurred_at: chrono::Utc::now(),
        ts_us: now_us(),
    }
}

/// The message of one publish attempt of `event`: `ts_us` is the publish
/// time, set at each attempt so latency is measured from the publish that
/// reached the broker.
pub fn message(exchange: &str, event: &Event, message_id: &str) -> Result<Outgoing, serde_json::Error> {
    let mut event = event.clone();
    event.ts_us = now_us();
    let body = encode_event(&event)?;
    Ok(Outgoing::json(
        exchange,
        event.topic(),
        body,
        message_id.to_owned(),
        None,
    ))
}

/// What a submitted change became: the answer of the ingest API.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Accepted {
    pub product_id: i64,
    pub kind: String,
    pub value: i64,
    pub topic: String,
    pub version: i64,
    pub message_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("product {0} does not exist")]
    NoProduct(i64),
    #[error("product {0} cannot take another version")]
    VersionBound(i64),
    #[error("this Idempotency-Key was used for another request")]
    KeyReused,
    #[error("a request with this Idempotency-Key is being published; retry in a moment")]
    KeyInProgress,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the broker did not confirm the event: {0}")]
    Broker(String),
}

/// Submits single changes: one confirm channel per instance, shared by
/// every request (lapin publishes on it concurrently, each with its own
/// confirm).
pub struct Ingest {
    db: Db,
    link: Arc<Link>,
    exchange: String,
    confirm_timeout: Duration,
    channel: tokio::sync::Mutex<Option<lapin::Channel>>,
    /// When expired keys were last purged (seconds since the epoch).
    purged: AtomicI64,
}

impl Ingest {
    pub fn new(db: Db, link: Arc<Link>, exchange: String, confirm_timeout: Duration) -> Self {
        Self {
            db,
            link,
            exchange,
            confirm_timeout,
            channel: tokio::sync::Mutex::new(None),
            purged: AtomicI64::new(0),
        }
    }

    /// Issues the change's version, publishes it and waits for the broker's
    /// confirm. Under an idempotency key, a retry of the same request gets
    /// the first answer (`replayed` true) and publishes nothing; a retry of
    /// one that issued its event but was not answered (the confirm lost or
    /// late, the answer not stored, the request gone) publishes that same
    /// event again, so the change is applied once.
    pub async fn submit(
        &self,
        id: ProductId,
        change: Change,
        key: Option<&str>,
    ) -> Result<(Accepted, bool), IngestError> {
        let Some(key) = key else {
            let issued = self.issue_event(id, change).await?;
            return Ok((self.send(id, change, &issued).await?, false));
        };
        self.purge_now_and_then().await;
        let request = format!("{}:{}:{}", change.kind().as_str(), id, change.value());
        let owner = uuid::Uuid::new_v4().to_string();
        let stored = match idempotency::claim(&self.db, key, &request, &owner).await? {
            Claim::Claimed(stored) => stored,
            Claim::Answered(answer) => {
                let accepted = serde_json::from_value(answer)
                    .map_err(|e| IngestError::Store(StoreError::Unavailable(format!("stored answer: {e}"))))?;
                return Ok((accepted, true));
            }
            Claim::InProgress => return Err(IngestError::KeyInProgress),
            Claim::Mismatch => return Err(IngestError::KeyReused),
        };
        let sent = async {
            let issued = match stored {
                Some(issued) => issued,
                None => {
                    let issued = self.issue_event(id, change).await?;
                    // Stored before it is published: whatever fails next, a
                    // retry sends this event, not a newer one.
                    if !idempotency::record(&self.db, key, &owner, &issued).await? {
                        // A retry took the claim over meanwhile; it answers.
                        return Err(IngestError::KeyInProgress);
                    }
                    issued
                }
            };
            self.send(id, change, &issued).await
        }
        .await;
        match sent {
            Ok(accepted) => {
                let answer = serde_json::to_value(&accepted).expect("plain fields serialise");
                idempotency::answer(&self.db, key, &answer).await?;
                Ok((accepted, false))
            }
            Err(e) => {
                // A retry must be able to run; if this fails too, the claim
                // is taken over once abandoned.
                if let Err(release) = idempotency::release(&self.db, key, &owner).await {
                    tracing::warn!(error = %release, "idempotency key not released");
                }
                Err(e)
            }
        }
    }

    /// The change's version, issued from the product row, and the message
    /// id it goes out under.
    async fn issue_event(&self, id: ProductId, change: Change) -> Result<IssuedEvent, IngestError> {
        let kind = change.kind();
        let issued = issue(&self.db, id, kind == Kind::Price, kind == Kind::Stock).await?;
        let Some(issued) = issued else {
            return Err(match crate::store::catalog::get(&self.db, id).await? {
                None => IngestError::NoProduct(id.get()),
                Some(_) => IngestError::VersionBound(id.get()),
            });
        };
        let version = match kind {
            Kind::Price => issued.price_issued,
            Kind::Stock => issued.stock_issued,
        };
        Ok(IssuedEvent {
            version,
            message_id: uuid::Uuid::new_v4().to_string(),
        })
    }

    /// Publishes the event and waits for the broker's confirm.
    async fn send(&self, id: ProductId, change: Change, issued: &IssuedEvent) -> Result<Accepted, IngestError> {
        let event = event(id, change, issued.version);
        let out =
            message(&self.exchange, &event, &issued.message_id).map_err(|e| IngestError::Broker(e.to_string()))?;
        let channel = self.channel().await?;
        let confirm = publish_one(&channel, &out)
            .await
            .map_err(|e| IngestError::Broker(e.to_string()))?;
        let confirmation = tokio::time::timeout(self.confirm_timeout, confirm)
            .await
            .map_err(|_| IngestError::Broker(format!("no confirm within {:?}", self.confirm_timeout)))?
            .map_err(|e| IngestError::Broker(e.to_string()))?;
        match Confirmed::of(&confirmation) {
            Confirmed::Ack => Ok(Accepted {
                product_id: id.get(),
                kind: change.kind().as_str().to_owned(),
                value: change.value(),
                topic: event.topic(),
                version: issued.version,
                message_id: issued.message_id.clone(),
            }),
            Confirmed::Returned => Err(IngestError::Broker("unroutable: no queue is bound for it".into())),
            Confirmed::Nacked => Err(IngestError::Broker("refused by the broker".into())),
        }
    }

    /// The shared confirm channel, opened again when it has closed.
    async fn channel(&self) -> Result<lapin::Channel, IngestError> {
        let mut current = self.channel.lock().await;
        if let Some(c) = current.as_ref()
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        let conn = self.link.get().await.map_err(|e| IngestError::Broker(e.to_string()))?;
        let channel = confirm_channel(&conn)
            .await
            .map_err(|e| IngestError::Broker(e.to_string()))?;
        *current = Some(channel.clone());
        Ok(channel)
    }

    /// Forgets expired idempotency keys, at most once a minute per instance.
    async fn purge_now_and_then(&self) {
        let now = chrono::Utc::now().timestamp();
        let last = AtomicI64::load(&self.purged, Ordering::Relaxed);
        if now - last < 60
            || self
                .purged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Err(e) = idempotency::purge_expired(&self.db).await {
            tracing::warn!(error = %e, "expired idempotency keys not purged");
        }
    }
}
