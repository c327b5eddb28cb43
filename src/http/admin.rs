//! Admin endpoints and their bearer-token check.

use std::future::{Ready, ready};

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpRequest};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;

/// Proof that the request carries the admin token: a handler taking it as an
/// argument cannot run for anyone else, and the `/admin` scope requires it
/// in its middleware (`require`), so no route mounted there can forget it.
///
/// Accepts only `Authorization: Bearer <token>` with the configured token
/// (see [`bearer_is`]).
#[derive(Debug, Clone, Copy)]
pub struct Admin(());

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(check(req))
    }
}

fn check(req: &HttpRequest) -> Result<Admin, ApiError> {
    // Without the state there is no token to compare with: refuse.
    let state = req.app_data::<web::Data<AppState>>().ok_or(ApiError::Unauthorized)?;
    match bearer_is(req, state.settings.admin.token.expose()) {
        true => Ok(Admin(())),
        false => Err(ApiError::Unauthorized),
    }
}

/// Whether the request carries `Authorization: Bearer <expected>`. Both
/// sides are hashed first so the comparison takes the same time whatever
/// the presented token's length or content. An empty `expected` matches
/// nothing.
pub fn bearer_is(req: &HttpRequest, expected: &str) -> bool {
    let Some(presented) = bearer(req) else {
        return false;
    };
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    !expected.is_empty() && bool::from(a.ct_eq(&b))
}

/// The token of `Authorization: Bearer <token>`, trimmed.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Middleware of the `/admin` scope: the token is checked before routing,
/// so an unauthenticated request learns nothing about the scope's routes
/// and no body is read.
pub async fn require(
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
pub async fn console(state: web::Data<AppState>) -> actix_web::Result<actix_files::NamedFile> {
    let page = std::path::Path::new(&state.settings.server.static_dir).join("admin.html");
    Ok(actix_files::NamedFile::open_async(page).await?)
}
use serde::Deserialize;
use serde_json::json;

use crate::apply::dead_letters;
use crate::ingest::generator::Control;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GeneratorChange {
    running: Option<bool>,
    /// Events per second.
    #[schema(minimum = 0, maximum = 100_000)]
    rate: Option<f64>,
}

fn generator_status(state: &AppState) -> serde_json::Value {
    let c = state.generator.control();
    json!({ "running": c.running, "rate": c.rate, "active_here": state.generator.is_leader() })
}

#[utoipa::path(get, path = "/admin/generator", tag = "admin", security(("admin" = [])),
    responses(
        (status = 200, description = "Whether the generator runs, its rate, and whether it runs here", body = Object),
        (status = 401, description = "No or a wrong admin token", body = crate::http::openapi::ErrorBody),
    ))]
pub async fn get_generator(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(generator_status(&state)))
}

/// `POST /admin/generator {"rate": 50, "running": true}`: either field may be left out.
#[utoipa::path(post, path = "/admin/generator", tag = "admin", security(("admin" = [])),
    request_body = GeneratorChange,
    responses(
        (status = 200, description = "The generator's state after the change", body = Object),
        (status = 400, description = "Malformed path, query or body", body = crate::http::openapi::ErrorBody), (status = 401, description = "No or a wrong admin token", body = crate::http::openapi::ErrorBody), (status = 413, description = "Body too large", body = crate::http::openapi::ErrorBody), (status = 415, description = "Not JSON", body = crate::http::openapi::ErrorBody),
    ))]
pub async fn set_generator(
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
pub struct Limit {
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
        (status = 400, description = "Malformed path, query or body", body = crate::http::openapi::ErrorBody), (status = 401, description = "No or a wrong admin token", body = crate::http::openapi::ErrorBody), (status = 503, description = "RabbitMQ unavailable", body = crate::http::openapi::ErrorBody),
    ))]
pub async fn list_dead_letters(state: web::Data<AppState>, q: web::Query<Limit>) -> Result<HttpResponse, ApiError> {
    let letters = dead_letters::list(&state.broker, &state.settings.rabbit.topology, limit(&q)?)
        .await
        .map_err(broker_down)?;
    Ok(HttpResponse::Ok().json(json!({ "dead_letters": letters })))
}

#[utoipa::path(post, path = "/admin/dead-letters/replay", tag = "admin", security(("admin" = [])),
    params(("limit" = Option<i64>, Query, minimum = 1, maximum = 10000, description = "At most this many, 1 to 10000")),
    responses(
        (status = 200, description = "Republished with confirms, each removed after its confirm", body = Object),
        (status = 400, description = "Malformed path, query or body", body = crate::http::openapi::ErrorBody), (status = 401, description = "No or a wrong admin token", body = crate::http::openapi::ErrorBody), (status = 503, description = "RabbitMQ unavailable", body = crate::http::openapi::ErrorBody),
    ))]
pub async fn replay_dead_letters(state: web::Data<AppState>, q: web::Query<Limit>) -> Result<HttpResponse, ApiError> {
    let report = dead_letters::replay(&state.broker, &state.settings.rabbit.topology, limit(&q)?)
        .await
        .map_err(broker_down)?;
    Ok(HttpResponse::Ok().json(report))
}

#[utoipa::path(delete, path = "/admin/dead-letters", tag = "admin", security(("admin" = [])),
    responses(
        (status = 200, description = "The queue purged", body = Object),
        (status = 401, description = "No or a wrong admin token", body = crate::http::openapi::ErrorBody), (status = 503, description = "RabbitMQ unavailable", body = crate::http::openapi::ErrorBody),
    ))]
pub async fn purge_dead_letters(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let purged = dead_letters::purge(&state.broker, &state.settings.rabbit.topology)
        .await
        .map_err(broker_down)?;
    Ok(HttpResponse::Ok().json(json!({ "purged": purged })))
}
