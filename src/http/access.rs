//! Request tracing: every HTTP request runs in a `request` span carrying a
//! request id (the caller's `X-Request-Id` when it is a sane token, a fresh
//! one otherwise, echoed in the response) and ends with one access log line,
//! so one request's story can be picked out of the logs.

use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use tracing::Instrument;

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A caller's id is kept only if it cannot forge log lines or bloat them.
fn caller_id(req: &ServiceRequest) -> Option<String> {
    let raw = req.headers().get(&REQUEST_ID)?.to_str().ok()?;
    let sane = (1..=128).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic());
    sane.then(|| raw.to_owned())
}

pub(crate) async fn trace_request(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let id = caller_id(&req).unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.path());
    let started = Instant::now();
    // No clone of the request is kept across the call: the router and
    // NormalizePath need the only reference to it.
    let mut res = match next.call(req).instrument(span.clone()).await {
        Ok(res) => res.map_into_boxed_body(),
        Err(e) => {
            let status = e.as_response_error().status_code().as_u16();
            span.in_scope(|| access_line(status, started));
            return Err(e);
        }
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID, value);
    }
    span.in_scope(|| access_line(res.status().as_u16(), started));
    Ok(res)
}

fn access_line(status: u16, started: Instant) {
    tracing::info!(
        target: "access",
        status,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request served"
    );
}

/// The span a WebSocket or SSE connection runs in, from its subscription to
/// its close: every line about one client carries its id and address.
pub(crate) fn connection_span(id: u64, transport: &'static str, ip: Option<std::net::IpAddr>) -> tracing::Span {
    tracing::info_span!("connection", id, transport, client_ip = ip.map(tracing::field::display))
}
