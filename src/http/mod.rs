//! The HTTP edge: REST, health, admin, and (see `ws`, `sse`) realtime delivery.

pub(crate) mod access;
pub(crate) mod admin;
pub(crate) mod admit;
pub mod auth;
pub(crate) mod error;
pub(crate) mod extract;
pub(crate) mod frame_budget;
pub(crate) mod health;
pub(crate) mod ingest;
pub(crate) mod openapi;
pub(crate) mod origin;
pub(crate) mod products;
pub(crate) mod sse;
pub(crate) mod ws;

use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use rand::Rng;

use crate::broadcast::stream::CatchUpReader;
use crate::broker::link::Link;
use crate::hub::HubHandle;
use crate::hub::session::{SessionContext, SnapshotLimit};
use crate::ingest::generator::GeneratorHandle;
use crate::metrics::Metrics;
use crate::photos::PhotoCache;
use crate::settings::Settings;
use crate::store::Db;

/// Everything a request handler may need; cheap to clone (all shared).
pub struct AppState {
    pub settings: Arc<Settings>,
    /// Pool of the pipeline's writes (apply, generator, admin).
    pub db: Db,
    /// Pool of client reads (REST, snapshots), apart so they cannot starve
    /// the apply path.
    pub read_db: Db,
    /// Bounds the snapshots served at once.
    pub snapshots: SnapshotLimit,
    pub photos: Arc<PhotoCache>,
    pub metrics: Arc<Metrics>,
    /// Connection for admin calls and readiness.
    pub broker: Arc<Link>,
    pub generator: GeneratorHandle,
    pub hub: HubHandle,
    /// Publishes the ingest API's changes.
    pub ingest: Arc<crate::ingest::Ingest>,
    /// Checks subscriber tokens.
    pub auth: Arc<auth::Verifier>,
    /// Reads the stream back for resumes older than the hub's memory.
    pub catch_up: CatchUpReader,
    /// The hub, snapshot and catch-up handles every session shares.
    pub sessions: Arc<SessionContext>,
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl AppState {
    /// What a realtime session needs of the app: one shared value.
    pub fn session_context(&self) -> Arc<SessionContext> {
        self.sessions.clone()
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    let query_errors =
        web::QueryConfig::default().error_handler(|e, _| error::ApiError::BadRequest(format!("bad query: {e}")).into());
    let path_errors =
        web::PathConfig::default().error_handler(|e, _| error::ApiError::BadRequest(format!("bad path: {e}")).into());
    let json_errors = web::JsonConfig::default()
        .limit(64 * 1024)
        .error_handler(|e, _| match e {
            actix_web::error::JsonPayloadError::Overflow { .. }
            | actix_web::error::JsonPayloadError::OverflowKnownLength { .. } => {
                error::ApiError::PayloadTooLarge(format!("{e}")).into()
            }
            actix_web::error::JsonPayloadError::ContentType => {
                error::ApiError::UnsupportedMediaType("send application/json".into()).into()
            }
            e => error::ApiError::BadRequest(format!("bad JSON body: {e}")).into(),
        });
    cfg.app_data(query_errors)
        .app_data(json_errors)
        .app_data(path_errors)
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(health::metrics))
        .route("/openapi.json", web::get().to(openapi::openapi_json))
        .route("/ws", web::get().to(ws::ws))
        .service(
            web::resource("/events")
                .route(web::get().to(sse::events))
                .route(web::method(actix_web::http::Method::OPTIONS).to(origin::preflight)),
        )
        .route("/products", web::get().to(products::list))
        .route("/products/{id}", web::get().to(products::get))
        .route("/products/{id}/price", web::post().to(ingest::price))
        .route("/products/{id}/stock", web::post().to(ingest::stock))
        .service(
            web::resource("/products/{id}/photo")
                .route(web::get().to(products::photo))
                .route(web::put().to(products::put_photo)),
        )
        // The console's page, before the scope: it carries no data.
        .route("/admin", web::get().to(admin::console))
        .service(
            // Every admin route lives in this scope, behind the token check.
            web::scope("/admin")
                .wrap(actix_web::middleware::from_fn(admin::require))
                .service(
                    web::resource("/generator")
                        .route(web::get().to(admin::get_generator))
                        .route(web::post().to(admin::set_generator)),
                )
                .service(
                    web::resource("/dead-letters")
                        .route(web::get().to(admin::list_dead_letters))
                        .route(web::delete().to(admin::purge_dead_letters)),
                )
                .route("/dead-letters/replay", web::post().to(admin::replay_dead_letters)),
        );
}

/// A connection's heartbeat (WebSocket pings, SSE keep-alive comments):
/// every `period`, the first at a random point of the first period. Clients
/// that connect together, as every client of an instance that restarted
/// does, would otherwise be pinged together for as long as they stay: one
/// write per client in the same instant, which delays every update sent
/// beside it.
pub fn heartbeat(period: Duration) -> tokio::time::Interval {
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + first_beat(period), period);
    // A beat held up (a full socket) is not made up for in a burst.
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat
}

/// When a new connection's first heartbeat is due: uniformly within the
/// first period.
fn first_beat(period: Duration) -> Duration {
    period.mul_f64(rand::rng().random_range(0.0..1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_of_connections_opened_together_are_spread_over_the_period() {
        let period = Duration::from_secs(15);
        let firsts: Vec<Duration> = (0..500).map(|_| first_beat(period)).collect();
        assert!(firsts.iter().all(|f| *f < period), "{firsts:?}");
        // Spread evenly: each tenth of the period gets some (a fixed first
        // beat puts them all in one).
        let mut tenths = [0usize; 10];
        for f in &firsts {
            tenths[(f.as_secs_f64() / period.as_secs_f64() * 10.0) as usize] += 1;
        }
        assert!(
            tenths.iter().all(|&n| n >= 20),
            "first beats per tenth of the period: {tenths:?}"
        );
    }
}
