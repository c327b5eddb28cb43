//! Admin endpoints, and the `/admin` scope's middleware that requires the
//! admin token (`extract::Admin`) before routing.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;

use super::AppState;
use super::error::ApiError;
use super::extract::Admin;

/// Middleware of the `/admin` scope: the token is checked before routing,
/// so an unauthenticated request learns nothing about the scope's routes
/// and no body is read.
pub(crate) async fn require(
    _: Admin,
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    next.call(req).await
}

use actix_web::{HttpResponse, web};

/// `GET /admin/`: the operator console's page (`static/admin.html`). It
/// holds no data and is served without the token; every call it makes
/// carries the token the operator types in.
#[utoipa::path(get, path = "/admin", tag = "admin",
    responses((status = 200, description = "The operator console (HTML)", content_type = "text/html", body = String)))]
pub(crate) async fn console(state: web::Data<AppState>) -> actix_web::Result<actix_files::NamedFile> {
    let page = std::path::Path::new(&state.settings.server.static_dir).join("admin.html");
    Ok(actix_files::NamedFile::open_async(page).await?)
}
use serde::Deserialize;
use serde_json::json;

use crate::apply::dead_letters;
use crate::ingest::generator::Control;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GeneratorChange {
    running: Option<bool>,
    /// Events per second.
    #[schema(minimum = 0, maximum = 100_000)]
    rate: Option<f64>,
}

fn generator_status(state: &AppState) -> serde_json::Value {
    let c = state.generator.control();
    json!({
        "running": c.running,
        "rate": c.rate,
        "active_here": state.generator.is_leader(),
        "achieved_rate": state.generator.achieved(),
    })
}

#[utoipa::path(get, path = "/admin/generator", tag = "admin", security(("admin" = [])),
    responses(
        (status = 200, description = "Whether the generator runs, the rate asked, whether it runs here, and the rate it holds here (events confirmed per second over the last 5 s)", body = Object),
        (status = 401, description = "No or a wrong admin token", body = crate::http::error::ErrorBody),
    ))]
pub(crate) async fn get_generator(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(generator_status(&state)))
}

/// `POST /admin/generator {"rate": 50, "running": true}`: either field may be left out.
#[utoipa::path(post, path = "/admin/generator", tag = "admin", security(("admin" = [])),
    request_body = GeneratorChange,
    responses(
        (status = 200, description = "The generator's state after the change", body = Object),
        (status = 400, description = "Malformed path, query or body", body = crate::http::error::ErrorBody), (status = 401, description = "No or a wrong admin token", body = crate::http::error::ErrorBody), (status = 413, description = "Body too large", body = crate::http::error::ErrorBody), (status = 415, description = "Not JSON", body = crate::http::error::ErrorBody),
    ))]
pub(crate) async fn set_generator(
    state: web::Data<AppState>,
    body: web::Json<GeneratorChange>,
) -> Result<HttpResponse, ApiError> {
    let mut c: Control = state.generator.control();
    if let Some(rate) = body.rate {
        if !rate.is_finite() || !(0.0..=100_000.0).contains(&rate) {
            return Err(ApiError::BadRequest(
                "rate must be between 0 and 100000 events/s".into(),
            ));
        }
        c.rate = rate;
    }
    if let Some(running) = body.running {
        c.running = running;
    }
    state.generator.set(c);
    Ok(HttpResponse::Ok().json(generator_status(&state)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Limit {
    limit: Option<usize>,
}

fn limit(q: &Limit) -> Result<usize, ApiError> {
    match q.limit {
        None => Ok(100),
        Some(n) if (1..=10_000).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::BadRequest("limit must be between 1 and 10000".into())),
    }
}

fn broker_down(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(format!("RabbitMQ: {e}"))
}

#[utoipa::path(get, path = "/admin/dead-letters", tag = "admin", security(("admin" = [])),
    params(("limit" = Option<i64>, Query, minimum = 1, maximum = 10000, description = "At most this many, 1 to 10000")),
    responses(
        (status = 200, description = "Dead letters with reason, detail, routing key and body; left in the queue", body = Object),
        (status = 400, description = "Malformed path, query or body", body = crate::http::error::ErrorBody), (status = 401, description = "No or a wrong admin token", body = crate::http::error::ErrorBody), (status = 503, description = "RabbitMQ unavailable", body = crate::http::error::ErrorBody),
    ))]
pub(crate) async fn list_dead_letters(
    state: web::Data<AppState>,
    q: web::Query<Limit>,
) -> Result<HttpResponse, ApiError> {
    let letters = dead_letters::list(&state.broker, &state.settings.rabbit.topology, limit(&q)?)
        .await
        .map_err(broker_down)?;
    Ok(HttpResponse::Ok().json(json!({ "dead_letters": letters })))
}

#[utoipa::path(post, path = "/admin/dead-letters/replay", tag = "admin", security(("admin" = [])),
    params(("limit" = Option<i64>, Query, minimum = 1, maximum = 10000, description = "At most this many, 1 to 10000")),
    responses(
        (status = 200, description = "Republished with confirms, each removed after its confirm", body = Object),
        (status = 400, description = "Malformed path, query or body", body = crate::http::error::ErrorBody), (status = 401, description = "No or a wrong admin token", body = crate::http::error::ErrorBody), (status = 503, description = "RabbitMQ unavailable", body = crate::http::error::ErrorBody),
    ))]
pub(crate) async fn replay_dead_letters(
    state: web::Data<AppState>,
    q: web::Query<Limit>,
) -> Result<HttpResponse, ApiError> {
    let report = dead_letters::replay(&state.broker, &state.settings.rabbit.topology, limit(&q)?)
        .await
        .map_err(broker_down)?;
    Ok(HttpResponse::Ok().json(report))
}

#[utoipa::path(delete, path = "/admin/dead-letters", tag = "admin", security(("admin" = [])),
    responses(
        (status = 200, description = "The queue purged", body = Object),
        (status = 401, description = "No or a wrong admin token", body = crate::http::error::ErrorBody), (status = 503, description = "RabbitMQ unavailable", body = crate::http::error::ErrorBody),
    ))]
pub(crate) async fn purge_dead_letters(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let purged = dead_letters::purge(&state.broker, &state.settings.rabbit.topology)
        .await
        .map_err(broker_down)?;
    Ok(HttpResponse::Ok().json(json!({ "purged": purged })))
}
