//! Photo cache: Redis in front of PostgreSQL (cache-aside). One origin load
//! per key under concurrent misses; Redis trouble means slower, never failing.

pub mod image;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_redis::redis::AsyncCommands;
use tokio::sync::OnceCell;

use crate::domain::ProductId;
use crate::metrics::Metrics;
use crate::settings::{PhotoSettings, RedisSettings};
use crate::store::catalog::{self, Photo};
use crate::store::{Db, StoreError};

/// A photo ready to serve; `bytes` is shared, not copied, per response.
#[derive(Debug, Clone)]
pub struct CachedPhoto {
    pub content_type: String,
    pub etag: String,
    pub bytes: Bytes,
}

type Flight = Arc<OnceCell<Option<CachedPhoto>>>;

pub struct PhotoCache {
    redis: deadpool_redis::Pool,
    /// Uploads: the pipeline's pool.
    db: Db,
    /// Origin loads on a miss: the pool of client reads, so a flood of
    /// misses (or of unknown ids) never waits on, or holds, the apply path's
    /// connections.
    read_db: Db,
    prefix: String,
    ttl_secs: u64,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// Loads in progress per product, with the invalidation generation they
    /// started under, so a load that raced a replacement does not cache stale bytes.
    flights: Mutex<HashMap<ProductId, (u64, Flight)>>,
    generation: std::sync::atomic::AtomicU64,
    /// A short-lived copy in this process in front of Redis, so a hot photo
    /// costs no network round trip. Another instance's replacement shows
    /// here after at most `near_ttl`; this instance's own, at once. `None`:
    /// no such product, so asking again for an unknown id within `near_ttl`
    /// costs no database read either.
    near: Mutex<HashMap<ProductId, (Instant, Option<CachedPhoto>)>>,
    near_ttl: Duration,
}

/// Photos kept in the near cache at most; past that it starts afresh.
const NEAR_ENTRIES: usize = 4096;

impl PhotoCache {
    pub fn new(
        redis_settings: &RedisSettings,
        photos: &PhotoSettings,
        db: Db,
        read_db: Db,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let mut cfg = deadpool_redis::Config::from_url(redis_settings.url.expose());
        let timeout = redis_settings.timeout;
        let mut pool_cfg = deadpool_redis::PoolConfig::new(redis_settings.pool_size);
        pool_cfg.timeouts.wait = Some(timeout);
        pool_cfg.timeouts.create = Some(timeout);
        pool_cfg.timeouts.recycle = Some(timeout);
        cfg.pool = Some(pool_cfg);
        let redis = cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
        Ok(Self {
            redis,
            db,
            read_db,
            prefix: redis_settings.key_prefix.clone(),
            ttl_secs: photos.cache_ttl.as_secs(),
            timeout,
            metrics,
            flights: Mutex::new(HashMap::new()),
            generation: Default::default(),
            near: Mutex::new(HashMap::new()),
            near_ttl: photos.local_ttl,
        })
    }

    fn key(&self, id: ProductId) -> String {
        format!("{}photo:{}", self.prefix, id)
    }

    /// The product's photo, from Redis when cached, else from PostgreSQL (its
    /// uploaded photo, or the image drawn from its id); None when no such product.
    pub async fn get(&self, id: ProductId) -> Result<Option<CachedPhoto>, StoreError> {
        if let Some(hit) = self.near_get(id) {
            self.metrics.photo_cache_hits.get_or_create(&[("layer", "local")]).inc();
            return Ok(hit);
        }
        if let Some(hit) = self.cache_get(id).await {
            self.metrics.photo_cache_hits.get_or_create(&[("layer", "redis")]).inc();
            self.near_put(id, Some(&hit));
            return Ok(Some(hit));
        }
        self.metrics.photo_cache_misses.inc();
        let (generation, flight) = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            let current = self.generation.load(std::sync::atomic::Ordering::SeqCst);
            flights
                .entry(id)
                .or_insert_with(|| (current, Flight::default()))
                .clone()
        };
        let result = flight
            .get_or_try_init(|| async {
                // A flight that ended between our miss and this one has
                // filled the cache: look again before going to the origin.
                if let Some(hit) = self.cache_get(id).await {
                    return Ok(Some(hit));
                }
                self.metrics.photo_origin_loads.inc();
                let photo = catalog::photo(&self.read_db, id)
                    .await?
                    .map(|stored| into_cached(stored.unwrap_or_else(|| generated(id))));
                if self.generation.load(std::sync::atomic::Ordering::SeqCst) == generation {
                    if let Some(p) = &photo {
                        self.cache_put(id, p).await;
                    }
                    self.near_put(id, photo.as_ref());
                }
                Ok::<_, StoreError>(photo)
            })
            .await
            .cloned();
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights.get(&id).is_some_and(|(_, f)| Arc::ptr_eq(f, &flight)) {
            flights.remove(&id);
        }
        result
    }

    /// Replaces the photo at the origin, then drops the cached copy.
    pub async fn put(&self, id: ProductId, photo: Photo) -> Result<bool, StoreError> {
        let stored = catalog::put_photo(&self.db, id, &photo).await?;
        if stored {
            self.invalidate(id).await;
        }
        Ok(stored)
    }

    pub async fn invalidate(&self, id: ProductId) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.near.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.flights.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let key = self.key(id);
        let deleted = self
            .with_redis(|mut conn| async move { conn.del::<_, ()>(key).await })
            .await;
        if deleted.is_none() {
            tracing::warn!(product = %id, "photo cache invalidation failed; entry expires by TTL");
        }
    }

    pub async fn ping(&self) -> bool {
        self.with_redis(|mut conn| async move {
            deadpool_redis::redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
        })
        .await
        .is_some()
    }

    /// `Some(None)`: known here to be no product.
    fn near_get(&self, id: ProductId) -> Option<Option<CachedPhoto>> {
        if self.near_ttl.is_zero() {
            return None;
        }
        let near = self.near.lock().unwrap_or_else(|p| p.into_inner());
        near.get(&id)
            .filter(|(at, _)| at.elapsed() < self.near_ttl)
            .map(|(_, p)| p.clone())
    }

    fn near_put(&self, id: ProductId, photo: Option<&CachedPhoto>) {
        if self.near_ttl.is_zero() {
            return;
        }
        let mut near = self.near.lock().unwrap_or_else(|p| p.into_inner());
        if near.len() >= NEAR_ENTRIES {
            near.clear();
        }
        near.insert(id, (Instant::now(), photo.cloned()));
    }

    async fn cache_get(&self, id: ProductId) -> Option<CachedPhoto> {
        let key = self.key(id);
        let raw: Option<Vec<u8>> = self
            .with_redis(|mut conn| async move { conn.get::<_, Option<Vec<u8>>>(key).await })
            .await
            .flatten();
        raw.and_then(|r| unpack(&r))
    }

    async fn cache_put(&self, id: ProductId, photo: &CachedPhoto) {
        let key = self.key(id);
        let packed = pack(photo);
        let ttl = self.ttl_secs;
        self.with_redis(|mut conn| async move { conn.set_ex::<_, _, ()>(key, packed, ttl).await })
            .await;
    }

    /// Runs one Redis operation with a deadline; failures are logged and
    /// counted, and the caller carries on without the cache.
    async fn with_redis<T, F, Fut>(&self, op: F) -> Option<T>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T, deadpool_redis::redis::RedisError>>,
    {
        let attempt = async {
            let conn = self.redis.get().await.map_err(|e| e.to_string())?;
            op(conn).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "redis unavailable; serving from PostgreSQL");
                None
            }
            Err(_) => {
                self.metrics.redis_errors.inc();
                tracing::warn!("redis timed out; serving from PostgreSQL");
                None
            }
        }
    }
}

/// The photo of a product without one of its own: drawn from its id, the
/// same on every instance and every time, so it is never stored (a large
/// catalog would otherwise hold gigabytes of images that are a function of
/// the id) and caches like any other.
fn generated(id: ProductId) -> Photo {
    let bytes = image::product_png(id.get() as u64);
    Photo {
        content_type: "image/png".into(),
        etag: image::etag(&bytes),
        bytes,
    }
}

fn into_cached(p: Photo) -> CachedPhoto {
    CachedPhoto {
        content_type: p.content_type,
        etag: p.etag,
        bytes: Bytes::from(p.bytes),
    }
}

/// One Redis value per photo: `len(ct) ct len(etag) etag bytes`, so a hit is one GET.
fn pack(p: &CachedPhoto) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + p.content_type.len() + p.etag.len() + p.bytes.len());
    for field in [p.content_type.as_bytes(), p.etag.as_bytes()] {
        out.extend_from_slice(&(field.len() as u16).to_be_bytes());
        out.extend_from_slice(field);
    }
    out.extend_from_slice(&p.bytes);
    out
}

fn unpack(raw: &[u8]) -> Option<CachedPhoto> {
    let mut rest = raw;
    let mut field = || -> Option<String> {
        let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
        let text = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_owned();
        rest = &rest[2 + len..];
        Some(text)
    };
    let content_type = field()?;
    let etag = field()?;
    Some(CachedPhoto {
        content_type,
        etag,
        bytes: Bytes::copy_from_slice(rest),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_photo_unpacks_to_itself_and_garbage_is_refused() {
        let p = CachedPhoto {
            content_type: "image/png".into(),
            etag: "\"abc\"".into(),
            bytes: Bytes::from_static(b"\x89PNG data"),
        };
        let back = unpack(&pack(&p)).unwrap();
        assert_eq!(
            (back.content_type, back.etag, back.bytes),
            (p.content_type, p.etag, p.bytes)
        );
        assert!(unpack(&[0, 200, 1]).is_none());
    }
}
