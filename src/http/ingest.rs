//! The ingest API: `POST /products/{id}/price` and `/stock` for upstream
//! systems (bearer `ingest.token`). The answer, `202 Accepted`, comes only
//! after the broker confirmed the event; the consumer applies it and the
//! realtime clients see it like any other change.

use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::http::header::HeaderName;
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use serde::Deserialize;
use tracing::Instrument;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{bearer_is, parse_id};
use crate::domain::{Change, PriceCents, Stock};
use crate::ingest::IngestError;
use crate::trace;

pub(crate) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on an answer given again for a repeated idempotency key.
pub(crate) const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Longest idempotency key accepted.
pub(crate) const MAX_KEY_LEN: usize = 255;

/// Proof that the request carries the ingest token; the first argument of
/// each handler, so it is checked before the body is read.
pub(crate) struct IngestToken(());

impl FromRequest for IngestToken {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::Unauthorized));
        };
        let token = state.settings.ingest.token.expose();
        ready(match (token.is_empty(), bearer_is(req, token)) {
            (true, _) => Err(ApiError::ServiceUnauthorized(
                "the ingest API is off: ingest.token is not set",
            )),
            (false, true) => Ok(IngestToken(())),
            (false, false) => Err(ApiError::ServiceUnauthorized("a valid ingest bearer token is required")),
        })
    }
}

/// Body of `POST /products/{id}/price`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewPrice {
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    price_cents: i64,
}

/// Body of `POST /products/{id}/stock`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewStock {
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    stock: i64,
}

/// How a price or stock change is answered, for the OpenAPI document
/// (the handlers answer through `ApiError` and `submit`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a description of the answers: never built
enum ChangeAnswers {
    /// Confirmed by the broker; applied and delivered next
    #[response(status = 202)]
    Accepted(crate::ingest::Accepted),
    /// Malformed path, query or body
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No or a wrong ingest token, or the ingest API is off
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// No such product
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// Idempotency-Key used for another request, or no version left
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// Body too large
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Not JSON
    #[response(status = 415)]
    NotJson(ErrorBody),
    /// Not confirmed by the broker, or the same key is being admitted right now: retry
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

#[utoipa::path(post, path = "/products/{id}/price", tag = "ingest",
    params(
        ("id" = i64, Path, minimum = 1, description = "Product id, a positive integer"),
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$", description = "1 to 255 visible ASCII characters; a retry with it gets the first request's change (same version), never a second one"),
    ),
    request_body = NewPrice,
    security(("ingest" = [])),
    responses(ChangeAnswers))]
pub(crate) async fn price(
    _: IngestToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Json<NewPrice>,
) -> Result<HttpResponse, ApiError> {
    let change = PriceCents::try_from(body.price_cents)
        .map(Change::Price)
        .map_err(|e| ApiError::BadRequest(format!("price_cents: {e}")))?;
    submit(&state, &path, &req, change).await
}

#[utoipa::path(post, path = "/products/{id}/stock", tag = "ingest",
    params(
        ("id" = i64, Path, minimum = 1, description = "Product id, a positive integer"),
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$", description = "1 to 255 visible ASCII characters; a retry with it gets the first request's change (same version), never a second one"),
    ),
    request_body = NewStock,
    security(("ingest" = [])),
    responses(ChangeAnswers))]
pub(crate) async fn stock(
    _: IngestToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Json<NewStock>,
) -> Result<HttpResponse, ApiError> {
    let change = Stock::try_from(body.stock)
        .map(Change::Stock)
        .map_err(|e| ApiError::BadRequest(format!("stock: {e}")))?;
    submit(&state, &path, &req, change).await
}

async fn submit(state: &AppState, raw_id: &str, req: &HttpRequest, change: Change) -> Result<HttpResponse, ApiError> {
    let id = parse_id(raw_id)?;
    let key = idempotency_key(req)?;
    // The change's trace starts here, or continues an upstream's.
    let span = tracing::info_span!(
        "ingest",
        product_id = id.get(),
        kind = change.kind().as_str(),
        trace_id = tracing::field::Empty
    );
    if let Some(parent) = req
        .headers()
        .get(trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(trace::parse)
    {
        trace::follow(&span, &parent);
    }
    trace::show_id(&span);
    let outcome = state.ingest.submit(id, change, key).instrument(span.clone()).await;
    let label = match &outcome {
        Ok((_, true)) => "replayed",
        Ok((_, false)) => "accepted",
        Err(IngestError::Store(_) | IngestError::Broker(_)) => "failed",
        Err(_) => "refused",
    };
    state.metrics.ingest_requests.get_or_create(&[("outcome", label)]).inc();
    let (accepted, replayed) = outcome.map_err(|e| match e {
        IngestError::NoProduct(_) => ApiError::NotFound(e.to_string()),
        IngestError::VersionBound(_) | IngestError::KeyReused => ApiError::Conflict(e.to_string()),
        IngestError::KeyInProgress => ApiError::Busy(e.to_string()),
        IngestError::Store(e) => e.into(),
        IngestError::Broker(why) => {
            tracing::warn!(error = %why, "ingest publish failed");
            ApiError::Unavailable("the broker did not confirm the event; retry (with the same Idempotency-Key)".into())
        }
    })?;
    let mut res = HttpResponse::Accepted();
    if replayed {
        res.insert_header((REPLAYED, "true"));
    }
    if let Some(tp) = trace::traceparent(&span) {
        res.insert_header((trace::TRACERESPONSE, tp));
    }
    Ok(res.json(accepted))
}

/// The `Idempotency-Key` header: 1 to [`MAX_KEY_LEN`] visible ASCII
/// characters, or absent.
fn idempotency_key(req: &HttpRequest) -> Result<Option<&str>, ApiError> {
    let Some(raw) = req.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| (1..=MAX_KEY_LEN).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(Some).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"
        ))
    })
}
