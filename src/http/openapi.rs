//! The HTTP contract as an OpenAPI 3.1 document, generated from the code
//! (utoipa) and served at `/openapi.json`. Each handler's `path` item below
//! sits beside its route in `http::routes`; CI runs schemathesis against a
//! running instance with this document.
//!
//! The realtime routes are described here for completeness; their frames
//! and events are specified in `docs/asyncapi.yaml`.

use actix_web::HttpResponse;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "product-gateway",
        description = "Product catalog with realtime price and stock updates over WebSocket and SSE, \
                       RabbitMQ as its backbone. Realtime frames and events: docs/asyncapi.yaml.",
        license(name = "MIT")
    ),
    paths(
        super::health::healthz,
        super::health::readyz,
        super::health::metrics,
        super::products::list,
        super::products::get,
        super::products::photo,
        super::products::put_photo,
        super::ingest::price,
        super::ingest::stock,
        super::sse::events,
        super::ws::ws,
        super::admin::console,
        super::admin::get_generator,
        super::admin::set_generator,
        super::admin::list_dead_letters,
        super::admin::purge_dead_letters,
        super::admin::replay_dead_letters,
        openapi_json,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Security),
    tags(
        (name = "catalog", description = "Products, their photos"),
        (name = "ingest", description = "Changes from upstream systems"),
        (name = "realtime", description = "WebSocket and SSE delivery"),
        (name = "admin", description = "Operator calls (admin token)"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub(crate) struct ApiDoc;

/// The bearer schemes: the admin token, the ingest token, subscriber JWTs.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(description.to_owned());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme("admin", bearer("admin.token"));
        components.add_security_scheme("ingest", bearer("ingest.token"));
        let mut jwt = Http::new(HttpAuthScheme::Bearer);
        jwt.bearer_format = Some("JWT".into());
        jwt.description = Some("subscriber token: a JWT whose `topics` claim lists the patterns it grants".into());
        components.add_security_scheme("subscriber", SecurityScheme::Http(jwt));
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}
