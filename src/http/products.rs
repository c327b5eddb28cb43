//! REST: the catalog and its photos.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::extract::{Admin, parse_id};
use crate::domain::ProductId;
use crate::photos::image;
use crate::store::catalog::{self, Photo};

const MAX_PAGE: i64 = 1000;
const MAX_IDS: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    limit: Option<String>,
    after: Option<String>,
    ids: Option<String>,
}

/// A page of the catalog and where the next one starts (null: the last).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ProductPage {
    products: Vec<catalog::Product>,
    next_after: Option<i64>,
}

/// `GET /products?limit=100&after=ID&ids=1,2,3` — keyset pagination by id.
#[utoipa::path(get, path = "/products", tag = "catalog",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "Page size, 1 to 1000 (default 100)"),
        ("after" = Option<i64>, Query, minimum = 0, description = "The `next_after` of the previous page (0: the first)"),
        ("ids" = Option<String>, Query, pattern = "^[1-9][0-9]{0,17}(,[1-9][0-9]{0,17}){0,999}$", description = "Comma-separated product ids, at most 1000"),
    ),
    responses(
        (status = 200, description = "A page of products, by id", body = ProductPage),
        (status = 400, description = "Malformed path, query or body", body = crate::http::error::ErrorBody),
        (status = 503, description = "The catalog is unavailable", body = crate::http::error::ErrorBody),
    ))]
pub(crate) async fn list(state: web::Data<AppState>, query: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let limit = match &query.limit {
        None => 100,
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return Err(ApiError::BadRequest(format!("limit must be between 1 and {MAX_PAGE}"))),
        },
    };
    let after = match &query.after {
        None => 0,
        // 0 is allowed here: "after nothing", the first page.
        Some(raw) if raw == "0" => 0,
        Some(raw) => parse_id(raw)?.get(),
    };
    let ids = match &query.ids {
        None => None,
        Some(raw) => {
            let ids = raw
                .split(',')
                .map(|part| parse_id(part.trim()).map(ProductId::get))
                .collect::<Result<Vec<_>, _>>()?;
            if ids.len() > MAX_IDS {
                return Err(ApiError::BadRequest(format!("at most {MAX_IDS} ids")));
            }
            Some(ids)
        }
    };
    let products = catalog::list(&state.read_db, after, limit, ids.as_deref()).await?;
    let next_after = (products.len() as i64 == limit)
        .then(|| products.last().map(|p| p.id))
        .flatten();
    Ok(HttpResponse::Ok().json(ProductPage { products, next_after }))
}

#[utoipa::path(get, path = "/products/{id}", tag = "catalog",
    params(("id" = i64, Path, minimum = 1, description = "Product id, a positive integer")),
    responses(
        (status = 200, description = "The product", body = catalog::Product),
        (status = 400, description = "Malformed path, query or body", body = crate::http::error::ErrorBody),
        (status = 404, description = "No such product", body = crate::http::error::ErrorBody),
        (status = 503, description = "The catalog is unavailable", body = crate::http::error::ErrorBody),
    ))]
pub(crate) async fn get(state: web::Data<AppState>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    let product = catalog::get(&state.read_db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("product {id} does not exist")))?;
    Ok(HttpResponse::Ok().json(product))
}

#[utoipa::path(get, path = "/products/{id}/photo", tag = "catalog",
    params(
        ("id" = i64, Path, minimum = 1, description = "Product id, a positive integer"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier answer"),
    ),
    responses(
        (status = 200, description = "The photo, with `ETag` and `Cache-Control`", content_type = "image/png", body = Vec<u8>),
        (status = 304, description = "Unchanged since the given ETag"),
        (status = 400, description = "Malformed path, query or body", body = crate::http::error::ErrorBody),
        (status = 404, description = "No such product, or no photo", body = crate::http::error::ErrorBody),
        (status = 503, description = "The catalog is unavailable", body = crate::http::error::ErrorBody),
    ))]
pub(crate) async fn photo(
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    let photo = state
        .photos
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("product {id} has no photo")))?;
    let cache_control = format!("public, max-age={}", state.settings.photos.cache_ttl.as_secs().min(300));
    let matches = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == photo.etag || tag.trim() == "*"));
    if matches {
        return Ok(HttpResponse::NotModified()
            .insert_header((header::ETAG, photo.etag))
            .insert_header((header::CACHE_CONTROL, cache_control))
            .finish());
    }
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, photo.content_type))
        .insert_header((header::ETAG, photo.etag))
        .insert_header((header::CACHE_CONTROL, cache_control))
        .body(photo.bytes))
}

/// `PUT /products/{id}/photo` (admin): the body is the image.
#[utoipa::path(put, path = "/products/{id}/photo", tag = "catalog",
    params(("id" = i64, Path, minimum = 1, description = "Product id, a positive integer")),
    request_body(description = "The image: PNG, JPEG, GIF or WebP", content_type = "image/png", content = Vec<u8>),
    security(("admin" = [])),
    responses(
        (status = 200, description = "Stored; the cached copies are replaced", body = Object),
        (status = 400, description = "Malformed path, query or body", body = crate::http::error::ErrorBody),
        (status = 401, description = "No or a wrong admin token", body = crate::http::error::ErrorBody),
        (status = 404, description = "No such product", body = crate::http::error::ErrorBody),
        (status = 413, description = "Larger than photos.max_upload_bytes", body = crate::http::error::ErrorBody),
        (status = 415, description = "Not an image of a supported type, or not the declared one", body = crate::http::error::ErrorBody),
        (status = 503, description = "The catalog is unavailable", body = crate::http::error::ErrorBody),
    ))]
pub(crate) async fn put_photo(
    _: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // The token (the first extractor) and the path are checked before a byte
    // of the body is read, so an unauthenticated client cannot make the
    // server buffer an upload.
    let id = parse_id(&path)?;
    let body = read_upload(&req, payload, state.settings.photos.max_upload_bytes).await?;
    let declared = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let sniffed = image::sniff(&body);
    let content_type = match (declared.as_deref(), sniffed) {
        (Some(d), Some(s)) if d == s => s,
        (Some(d), Some(s)) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "declared {d} but the body is {s}"
            )));
        }
        _ => {
            return Err(ApiError::UnsupportedMediaType(
                "the body must be a PNG, JPEG, GIF or WebP image with a matching Content-Type".into(),
            ));
        }
    };
    let photo = Photo {
        content_type: content_type.to_owned(),
        etag: image::etag(&body),
        bytes: body.to_vec(),
    };
    let etag = photo.etag.clone();
    if !state.photos.put(id, photo).await? {
        return Err(ApiError::NotFound(format!("product {id} does not exist")));
    }
    Ok(HttpResponse::Ok()
        .insert_header((header::ETAG, etag.clone()))
        .json(json!({ "product_id": id, "etag": etag, "content_type": content_type })))
}

/// Reads an upload of at most `max` bytes, refusing a larger declared length
/// before reading anything.
async fn read_upload(req: &HttpRequest, mut payload: web::Payload, max: usize) -> Result<web::Bytes, ApiError> {
    use futures_util::StreamExt;
    let too_large = || ApiError::PayloadTooLarge(format!("photos are limited to {max} bytes"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            actix_web::error::PayloadError::Overflow => too_large(),
            e => ApiError::BadRequest(format!("the upload could not be read: {e}")),
        })?;
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
