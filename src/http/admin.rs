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
