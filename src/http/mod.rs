//! The HTTP edge: REST, health, admin, and (see `ws`, `sse`) realtime delivery.

pub mod admin;
pub mod error;
pub mod health;
pub mod products;

use std::sync::Arc;

use actix_web::web;

use crate::broker::link::Link;
use crate::metrics::Metrics;
use crate::photos::PhotoCache;
use crate::settings::Settings;
use crate::store::Db;

/// Everything a request handler may need; cheap to clone (all shared).
pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: Db,
    pub photos: Arc<PhotoCache>,
    pub metrics: Arc<Metrics>,
    /// Connection for admin calls and readiness.
    pub broker: Arc<Link>,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    let query_errors =
        web::QueryConfig::default().error_handler(|e, _| error::ApiError::BadRequest(format!("bad query: {e}")).into());
    let path_errors =
        web::PathConfig::default().error_handler(|e, _| error::ApiError::BadRequest(format!("bad path: {e}")).into());
    cfg.app_data(query_errors)
        .app_data(path_errors)
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(health::metrics))
        .route("/products", web::get().to(products::list))
        .route("/products/{id}", web::get().to(products::get))
        .service(
            web::resource("/products/{id}/photo")
                .route(web::get().to(products::photo))
                .route(web::put().to(products::put_photo)),
        );
}
