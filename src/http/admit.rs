//! Who may open a realtime connection, the same for WebSocket and SSE: a
//! page from an allowed Origin (or no browser at all), a subscriber token
//! that verifies (or none: the anonymous grant), and the client's address
//! (the forwarded one behind trusted proxies) for the per-address limits.

use std::net::IpAddr;

use actix_web::HttpRequest;
use actix_web::http::header::HeaderValue;

use super::AppState;
use super::auth;
use super::error::ApiError;
use super::origin::{Origin, check_origin, client_ip, origin_refused};
use crate::hub::Refused;
use crate::hub::scope::Grant;

/// A connection let in, before it takes a slot on the instance.
pub(crate) struct Admitted {
    /// The page's Origin, to answer with CORS headers.
    pub origin: Option<HeaderValue>,
    pub grant: Grant,
    pub ip: Option<IpAddr>,
}

/// Checks the Origin (403) and the token (401, counted), from
/// `Authorization` or `query_token`; `what` names the connection in a
/// refusal ("a WebSocket").
pub(crate) fn admit(
    req: &HttpRequest,
    state: &AppState,
    query_token: Option<&str>,
    what: &str,
) -> Result<Admitted, ApiError> {
    let origin = match check_origin(req, &state.hub.settings().allowed_origins) {
        Origin::Refused => return Err(origin_refused(state, what)),
        Origin::Absent => None,
        Origin::Allowed(o) => Some(o),
    };
    let grant = match auth::request_token(req, query_token) {
        Some(token) => state
            .auth
            .verify(token)
            .inspect_err(|e| auth::count_refusal(&state.metrics, e.code()))?,
        None => state.auth.anonymous(),
    };
    Ok(Admitted {
        origin,
        grant,
        ip: client_ip(req, &state.settings.server.trusted_proxies),
    })
}

/// What a client refused a slot is told.
pub(crate) fn refusal_text(refused: Refused) -> &'static str {
    match refused {
        Refused::Instance => "connection limit reached, try again later",
        Refused::PerIp => "too many connections from this address",
    }
}
