//! Liveness, readiness and metrics.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::store;

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Object)))]
pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// How long the stream reader may wait on a full hub shard before the
/// instance says it is not ready.
const HUB_LAG_READY: Duration = Duration::from_secs(2);

/// PostgreSQL, RabbitMQ and a hub that keeps up are required; Redis only
/// speeds photos up, so without it the service is degraded but ready.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "PostgreSQL and RabbitMQ answer (Redis may not: `degraded`)", body = Object),
        (status = 503, description = "PostgreSQL or RabbitMQ does not answer, or the hub is behind", body = Object),
    ))]
pub(crate) async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let within = Duration::from_secs(2);
    let (pg, redis, rabbit) = tokio::join!(
        // The client reads' pool: an unauthenticated probe never takes, or
        // waits for, a connection of the apply path.
        async {
            matches!(
                tokio::time::timeout(within, store::ping(&state.read_db)).await,
                Ok(Ok(()))
            )
        },
        state.photos.ping(),
        state.broker.ready(within),
    );
    let word = |up: bool| if up { "up" } else { "down" };
    // A hub that cannot keep up would only make new clients wait: a
    // balancer should send them elsewhere until it has caught up.
    let hub_keeps_up = state.hub.keeps_up(HUB_LAG_READY);
    let ready = pg && rabbit && hub_keeps_up;
    let status = match (ready, redis) {
        (false, _) => "unavailable",
        (true, false) => "degraded",
        (true, true) => "ready",
    };
    let body = json!({
        "status": status,
        "checks": {
            "postgres": word(pg),
            "rabbitmq": word(rabbit),
            "redis": word(redis),
            "hub": if hub_keeps_up { "up" } else { "behind" },
        },
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// OpenMetrics for a scraper that asks for it (Prometheus does), the
/// classic text format for anyone else.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text (OpenMetrics when asked for in `Accept`)",
        content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let open_metrics = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let mut res = HttpResponse::Ok();
    res.insert_header((header::VARY, "Accept"));
    if open_metrics {
        res.content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
            .body(state.metrics.render())
    } else {
        res.content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(state.metrics.render_classic())
    }
}
