//! Liveness, readiness and metrics.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::store;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// PostgreSQL and RabbitMQ are required; Redis only speeds photos up, so
/// without it the service is degraded but ready.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let within = Duration::from_secs(2);
    let (pg, redis, rabbit) = tokio::join!(
        async { matches!(tokio::time::timeout(within, store::ping(&state.db)).await, Ok(Ok(()))) },
        state.photos.ping(),
        state.broker.ready(within),
    );
    let word = |up: bool| if up { "up" } else { "down" };
    let ready = pg && rabbit;
    let status = match (ready, redis) {
        (false, _) => "unavailable",
        (true, false) => "degraded",
        (true, true) => "ready",
    };
    let body = json!({
        "status": status,
        "checks": { "postgres": word(pg), "rabbitmq": word(rabbit), "redis": word(redis) },
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.render())
}
