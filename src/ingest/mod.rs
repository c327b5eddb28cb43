//! Where changes enter the pipeline: a version issued from the product row,
//! an event on `product.events`, published with a confirm. The ingest API
//! (`http::ingest`) answers each change once the broker has confirmed it,
//! its version issued in a batch with the other requests waiting
//! (`admission`, which also looks up and stores idempotency keys); the
//! built-in generator issues its versions in batches ([`issue_many`], the
//! same rule: a product's rows locked in id order, versions above both the
//! issued and the applied ones) and pipelines its confirms.

mod admission;
mod batches;
pub(crate) mod generator;

pub use generator::{Control, GeneratorHandle};

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use lapin::types::FieldTable;
use serde::Serialize;
use tracing::Instrument;

use crate::broker::confirms::ConfirmChannel;
use crate::broker::link::Link;
use crate::broker::publisher::{Confirmed, Outgoing};
use crate::domain::{Change, Event, MAX_VERSION, ProductId, now_us};
use crate::metrics::Metrics;
use crate::store::idempotency::{self, IssuedEvent};
use crate::store::prepared::prepared;
use crate::store::{Db, StoreError};
use crate::wire::encode_event;
use admission::{Admitted, Ask};
use batches::Batches;

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

/// One product's freshly issued versions in a batch ([`issue_many`]).
#[derive(Debug, QueryableByName)]
pub struct IssuedFor {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(embed)]
    pub issued: Issued,
}

/// Issues the next versions of many products in one statement: `(id, prices, stocks)`,
/// how many versions of each kind to issue for the product (every id at
/// most once); the answer holds each product's newest issued versions, so
/// the `n` versions issued for a kind are the `n` up to it. Products that do
/// not exist, or that a requested kind would take past [`MAX_VERSION`], are
/// left out. The rows are locked in id order, as apply locks them, so
/// concurrent batches and apply transactions wait for each other instead of
/// deadlocking.
pub async fn issue_many(
    conn: &mut AsyncPgConnection,
    picks: &[(ProductId, i64, i64)],
) -> Result<Vec<IssuedFor>, StoreError> {
    if picks.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = picks.iter().map(|(id, _, _)| id.get()).collect();
    let prices: Vec<i64> = picks.iter().map(|(_, p, _)| *p).collect();
    let stocks: Vec<i64> = picks.iter().map(|(_, _, s)| *s).collect();
    let issued = prepared(
        "WITH pick AS (SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[]) AS t(id, prices, stocks)), \
              bound AS (SELECT $4::int8 AS max), \
              locked AS (SELECT p.id FROM products p JOIN pick USING (id) ORDER BY p.id FOR UPDATE OF p) \
         UPDATE products p SET \
           price_issued = GREATEST(p.price_issued, p.price_version) + pick.prices, \
           stock_issued = GREATEST(p.stock_issued, p.stock_version) + pick.stocks \
         FROM pick JOIN locked USING (id), bound \
         WHERE p.id = pick.id \
           AND (pick.prices = 0 OR GREATEST(p.price_issued, p.price_version) <= bound.max - pick.prices) \
           AND (pick.stocks = 0 OR GREATEST(p.stock_issued, p.stock_version) <= bound.max - pick.stocks) \
         RETURNING p.id, p.price_cents, p.stock, p.price_issued, p.stock_issued",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<BigInt>, _>(prices)
    .bind::<Array<BigInt>, _>(stocks)
    .bind::<BigInt, _>(MAX_VERSION)
    .load::<IssuedFor>(conn)
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
/// reached the broker; `trace`, the traceparent of the span publishing it.
pub fn message(
    exchange: &str,
    event: &Event,
    message_id: &str,
    trace: Option<&str>,
) -> Result<Outgoing, serde_json::Error> {
    let mut event = event.clone();
    event.ts_us = now_us();
    let body = encode_event(&event)?;
    let headers = trace.map(|tp| {
        let mut h = FieldTable::default();
        crate::trace::insert(&mut h, tp);
        h
    });
    Ok(Outgoing::json(
        exchange,
        event.topic(),
        body,
        message_id.to_owned(),
        headers,
    ))
}

/// The answer for `change` issued as `issued`.
fn accepted(id: ProductId, change: Change, issued: &IssuedEvent) -> Accepted {
    Accepted {
        product_id: id.get(),
        kind: change.kind().as_str().to_owned(),
        value: change.value(),
        topic: change.kind().topic(id),
        version: issued.version,
        message_id: issued.message_id.clone(),
    }
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
    #[error("another request with this Idempotency-Key is being admitted right now; retry in a moment")]
    KeyInProgress,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the broker did not confirm the event: {0}")]
    Broker(String),
}

/// Admission batches in flight at once: a request that arrives while one
/// runs joins the next at once instead of waiting for it to commit. Two,
/// not more: each batch is a commit and locks its products' rows, so more
/// batches at once make them smaller and let them wait on each other's
/// rows (measured in `make bench` scenario 12: keyed requests/s at 1, 2, 4
/// and 8 at once were 1,517, 1,432–1,592, 937–1,220 and 951).
const ADMISSIONS_AT_ONCE: usize = 2;

/// Submits changes: each request's first step is admitted in a batch with
/// the others waiting ([`admission`]), and its event published on one
/// confirm channel per instance shared by every request (lapin publishes on
/// it concurrently; [`ConfirmChannel`] tells each its own confirm).
pub struct Ingest {
    db: Db,
    link: Arc<Link>,
    exchange: String,
    confirm_timeout: Duration,
    channel: tokio::sync::Mutex<Option<ConfirmChannel>>,
    admission: Batches<Ask, Result<Admitted, StoreError>>,
    metrics: Arc<Metrics>,
    /// When expired keys were last purged (seconds since the epoch).
    purged: AtomicI64,
}

impl Ingest {
    /// Starts its batching tasks: call within the runtime.
    pub fn new(db: Db, link: Arc<Link>, exchange: String, confirm_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        let admit_db = db.clone();
        Self {
            db,
            link,
            exchange,
            confirm_timeout,
            channel: tokio::sync::Mutex::new(None),
            admission: Batches::spawn(admission::BATCH, ADMISSIONS_AT_ONCE, move |asks| {
                let db = admit_db.clone();
                async move { admission::admit(&db, asks).await }
            }),
            metrics,
            purged: AtomicI64::new(0),
        }
    }

    /// Issues the change's version, publishes it and waits for the broker's
    /// confirm. Under an idempotency key the key holds the issued event from
    /// the start: a retry of the same request issues nothing (`replayed`
    /// true) and publishes that same event again unless the product has
    /// applied it, so however the first attempt ended (confirm lost or late,
    /// the request gone) the change is applied once, with the version first
    /// issued.
    pub async fn submit(
        &self,
        id: ProductId,
        change: Change,
        key: Option<&str>,
    ) -> Result<(Accepted, bool), IngestError> {
        if key.is_some() {
            self.purge_now_and_then().await;
        }
        let ask = Ask {
            id,
            kind: change.kind(),
            key: key.map(|k| {
                (
                    k.to_owned(),
                    format!("{}:{}:{}", change.kind().as_str(), id, change.value()),
                )
            }),
        };
        let started = Instant::now();
        let admitted = self
            .admission
            .submit(ask)
            .await
            .ok_or_else(|| StoreError::Unavailable("the ingest admission stopped".into()))??;
        self.observe("admit", started);
        match admitted {
            Admitted::Publish { event, replayed } => {
                let started = Instant::now();
                let accepted = self.send(id, change, &event).await?;
                self.observe("confirm", started);
                Ok((accepted, replayed))
            }
            Admitted::Applied(issued) => Ok((accepted(id, change, &issued), true)),
            Admitted::InProgress => Err(IngestError::KeyInProgress),
            Admitted::Mismatch => Err(IngestError::KeyReused),
            Admitted::NoProduct => Err(IngestError::NoProduct(id.get())),
            Admitted::VersionBound => Err(IngestError::VersionBound(id.get())),
        }
    }

    /// Counts the time since `started` in the `step` of accepted requests.
    fn observe(&self, step: &'static str, started: Instant) {
        self.metrics
            .ingest_steps
            .get_or_create(&[("step", step)])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Publishes the event and waits for the broker's confirm.
    async fn send(&self, id: ProductId, change: Change, issued: &IssuedEvent) -> Result<Accepted, IngestError> {
        let span = tracing::info_span!("publish", version = issued.version);
        self.publish(id, change, issued, &span).instrument(span.clone()).await
    }

    async fn publish(
        &self,
        id: ProductId,
        change: Change,
        issued: &IssuedEvent,
        span: &tracing::Span,
    ) -> Result<Accepted, IngestError> {
        let event = event(id, change, issued.version);
        let trace = crate::trace::traceparent(span);
        let out = message(&self.exchange, &event, &issued.message_id, trace.as_deref())
            .map_err(|e| IngestError::Broker(e.to_string()))?;
        let channel = self.channel().await?;
        let confirm = channel.publish(out).map_err(|e| IngestError::Broker(e.to_string()))?;
        let confirmed = tokio::time::timeout(self.confirm_timeout, confirm)
            .await
            .map_err(|_| IngestError::Broker(format!("no confirm within {:?}", self.confirm_timeout)))?
            .map_err(IngestError::Broker)?;
        match confirmed {
            Confirmed::Ack => Ok(accepted(id, change, issued)),
            Confirmed::Returned => Err(IngestError::Broker("unroutable: no queue is bound for it".into())),
            Confirmed::Nacked => Err(IngestError::Broker("refused by the broker".into())),
        }
    }

    /// The shared confirm channel, opened again when it has closed.
    async fn channel(&self) -> Result<ConfirmChannel, IngestError> {
        let mut current = self.channel.lock().await;
        if let Some(c) = current.as_ref()
            && c.connected()
        {
            return Ok(c.clone());
        }
        let conn = self.link.get().await.map_err(|e| IngestError::Broker(e.to_string()))?;
        let channel = ConfirmChannel::open(&conn)
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
