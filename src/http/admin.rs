//! Admin endpoints and their bearer-token check.

use actix_web::HttpRequest;
use actix_web::http::header;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;

/// Accepts only `Authorization: Bearer <token>` with the configured token.
/// Both sides are hashed first so the comparison takes the same time
/// whatever the presented token's length or content.
pub fn authorize(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    let a = Sha256::digest(presented.trim().as_bytes());
    let b = Sha256::digest(state.settings.admin.token.expose().as_bytes());
    if bool::from(a.ct_eq(&b)) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use crate::broker::dead_letters;
use crate::generator::Control;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorChange {
    running: Option<bool>,
    rate: Option<f64>,
}

fn generator_status(state: &AppState) -> serde_json::Value {
    let c = state.generator.control();
    json!({ "running": c.running, "rate": c.rate, "active_here": state.generator.is_leader() })
}

pub async fn get_generator(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    Ok(HttpResponse::Ok().json(generator_status(&state)))
}

/// `POST /admin/generator {"rate": 50, "running": true}`: either field may be left out.
pub async fn set_generator(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<GeneratorChange>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
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

pub async fn list_dead_letters(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<Limit>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let letters = dead_letters::list(&state.broker, &state.settings.rabbit.topology, limit(&q)?)
        .await
        .map_err(broker_down)?;
    Ok(HttpResponse::Ok().json(json!({ "dead_letters": letters })))
}

pub async fn replay_dead_letters(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<Limit>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let report = dead_letters::replay(&state.broker, &state.settings.rabbit.topology, limit(&q)?)
        .await
        .map_err(broker_down)?;
    Ok(HttpResponse::Ok().json(report))
}

pub async fn purge_dead_letters(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let purged = dead_letters::purge(&state.broker, &state.settings.rabbit.topology)
        .await
        .map_err(broker_down)?;
    Ok(HttpResponse::Ok().json(json!({ "purged": purged })))
}
