//! What handlers take from a request before they run: the admin proof,
//! bearer tokens (compared in constant time), product ids from the path.
//! Handlers import these from here, never from each other.

use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::domain::ProductId;

/// Proof that the request carries the admin token: a handler taking it as an
/// argument cannot run for anyone else, and the `/admin` scope requires it
/// in its middleware (`require`), so no route mounted there can forget it.
///
/// Accepts only `Authorization: Bearer <token>` with the configured token
/// (see [`bearer_is`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admin(());

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
pub(crate) fn bearer_is(req: &HttpRequest, expected: &str) -> bool {
    let Some(presented) = bearer(req) else {
        return false;
    };
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    !expected.is_empty() && bool::from(a.ct_eq(&b))
}

/// The token of `Authorization: Bearer <token>`, trimmed.
pub(crate) fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// A product id from a path, or a 400 that says what was wrong.
pub(crate) fn parse_id(raw: &str) -> Result<ProductId, ApiError> {
    ProductId::parse(raw)
        .ok_or_else(|| ApiError::BadRequest(format!("{raw:?} is not a product id (a positive integer)")))
}
