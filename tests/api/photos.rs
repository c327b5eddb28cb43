//! Photos: served from PostgreSQL through the Redis cache, with ETags,
//! single-flight loading, invalidation on replace, and Redis outages.

use std::time::Duration;

use awc::http::header;
use product_gateway::photos::image;
use testkit::{ADMIN_TOKEN, Isolation, spawn_app, spawn_with};

async fn get_photo(
    app: &testkit::TestApp,
    id: i64,
    etag: Option<&str>,
) -> (u16, Option<String>, Option<String>, Vec<u8>) {
    let mut req = app.client().get(app.url(&format!("/products/{id}/photo")));
    if let Some(tag) = etag {
        req = req.insert_header((header::IF_NONE_MATCH, tag));
    }
    let mut res = req.send().await.expect("photo request");
    let h = |name| res.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (ct, tag) = (h(header::CONTENT_TYPE), h(header::ETAG));
    let body = res.body().limit(8 << 20).await.expect("photo body").to_vec();
    (res.status().as_u16(), ct, tag, body)
}

#[actix_rt::test]
async fn photo_is_served_with_etag_revalidated_and_cached() {
    let app = spawn_app().await;
    let (status, ct, etag, body) = get_photo(&app, 5, None).await;
    assert_eq!(status, 200);
    assert_eq!(ct.as_deref(), Some("image/png"));
    assert_eq!(image::sniff(&body), Some("image/png"));
    let etag = etag.expect("ETag header");
    assert_eq!(etag, image::etag(&body));
    assert_eq!(app.metric("gateway_photo_origin_loads_total", "").await, 1.0);

    let (status, _, _, body2) = get_photo(&app, 5, None).await;
    assert_eq!(status, 200);
    assert_eq!(body2, body);
    assert_eq!(
        app.metric("gateway_photo_cache_hits_total", "").await,
        1.0,
        "second read comes from Redis"
    );
    assert_eq!(app.metric("gateway_photo_origin_loads_total", "").await, 1.0);

    let (status, _, etag304, body304) = get_photo(&app, 5, Some(&etag)).await;
    assert_eq!(status, 304);
    assert_eq!(etag304.as_deref(), Some(etag.as_str()));
    assert!(body304.is_empty());

    let (status, _, _, _) = get_photo(&app, 5, Some("\"stale\"")).await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[actix_rt::test]
async fn replacing_a_photo_invalidates_the_cache() {
    let app = spawn_app().await;
    let (_, _, old_etag, _) = get_photo(&app, 9, None).await;
    let new_png = image::product_png(123_456);
    let mut res = app
        .client()
        .put(app.url("/products/9/photo"))
        .insert_header((header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}")))
        .insert_header((header::CONTENT_TYPE, "image/png"))
        .send_body(new_png.clone())
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200, "{:?}", res.body().await);
    let (status, _, etag, body) = get_photo(&app, 9, None).await;
    assert_eq!(status, 200);
    assert_eq!(body, new_png, "the new photo is served, not the cached old one");
    assert_ne!(etag, old_etag);
    // The old ETag no longer revalidates.
    let (status, _, _, _) = get_photo(&app, 9, old_etag.as_deref()).await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[actix_rt::test]
async fn concurrent_first_reads_cause_one_origin_load() {
    let app = spawn_app().await;
    let reads = (0..100).map(|_| get_photo(&app, 17, None));
    let results = futures_util::future::join_all(reads).await;
    assert!(results.iter().all(|(status, ..)| *status == 200));
    let first = &results[0].3;
    assert!(results.iter().all(|r| &r.3 == first));
    assert_eq!(app.metric("gateway_photo_origin_loads_total", "").await, 1.0);
    app.stop().await;
}

#[actix_rt::test]
async fn photos_are_served_from_postgres_when_redis_is_down() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    // Nothing listens on port 1: every Redis call is refused. No local copy
    // either, so every read shows the fallback.
    settings.photos.local_ttl = Duration::ZERO;
    settings.redis.url = product_gateway::settings::Secret::new("redis://127.0.0.1:1");
    let app = spawn_with(iso, settings).await;
    for _ in 0..3 {
        let (status, ct, etag, body) = get_photo(&app, 3, None).await;
        assert_eq!(status, 200);
        assert_eq!(ct.as_deref(), Some("image/png"));
        assert_eq!(etag, Some(image::etag(&body)));
    }
    assert!(app.metric("gateway_redis_errors_total", "").await >= 3.0);
    assert_eq!(app.metric("gateway_photo_origin_loads_total", "").await, 3.0);
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, 200, "Redis is optional: {ready}");
    assert_eq!(ready["checks"]["redis"], "down");
    assert_eq!(ready["status"], "degraded");
    app.stop().await;
}

#[actix_rt::test]
async fn photo_upload_errors_have_status_and_code() {
    let app = spawn_app().await;
    let png = image::product_png(1);
    let put = |auth: Option<&str>, ct: &str, body: Vec<u8>, id: &str| {
        let mut req = app
            .client()
            .put(app.url(&format!("/products/{id}/photo")))
            .timeout(Duration::from_secs(30))
            .insert_header((header::CONTENT_TYPE, ct.to_owned()));
        if let Some(token) = auth {
            req = req.insert_header((header::AUTHORIZATION, format!("Bearer {token}")));
        }
        async move {
            let mut res = req.send_body(body).await.expect("put");
            let json: serde_json::Value = res.json().limit(1 << 20).await.expect("JSON error body");
            (res.status().as_u16(), json["code"].as_str().unwrap_or("").to_owned())
        }
    };
    assert_eq!(
        put(None, "image/png", png.clone(), "1").await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        put(Some("wrong-token"), "image/png", png.clone(), "1").await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        put(Some(ADMIN_TOKEN), "text/plain", b"hello".to_vec(), "1").await,
        (415, "unsupported_media_type".into())
    );
    assert_eq!(
        put(Some(ADMIN_TOKEN), "image/jpeg", png.clone(), "1").await,
        (415, "unsupported_media_type".into()),
        "declared type must match the bytes"
    );
    let mut big = png.clone();
    big.resize(1_500_000, 0);
    assert_eq!(
        put(Some(ADMIN_TOKEN), "image/png", big, "1").await,
        (413, "payload_too_large".into())
    );
    assert_eq!(
        put(Some(ADMIN_TOKEN), "image/png", png.clone(), "4444").await,
        (404, "not_found".into())
    );
    assert_eq!(
        put(Some(ADMIN_TOKEN), "image/png", png, "x1").await,
        (400, "bad_request".into())
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_seeded_catalog_stores_no_photos_and_each_product_shows_its_own_image() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    // Two batches of the seed's statement.
    settings.seed.products = 60_000;
    let started = std::time::Instant::now();
    let app = spawn_with(iso, settings).await;
    println!(
        "started with 60,000 seeded products in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (status, p) = app.get_json("/products/59999").await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["name"], product_gateway::seed::name_of(59_999));
    let mut conn = app.state.db.get().await.unwrap();
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let stored: N = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query("SELECT (SELECT COUNT(*) FROM product_photos) + (SELECT COUNT(*) FROM products) AS n"),
        &mut conn,
    )
    .await
    .unwrap();
    assert_eq!(stored.n, 60_000, "60,000 products and no stored photo");
    drop(conn);
    // The image is drawn from the id, served and cached like a stored one.
    let (status, content_type, etag, body) = get_photo(&app, 59_999, None).await;
    assert_eq!((status, content_type.as_deref()), (200, Some("image/png")));
    let png = image::product_png(59_999);
    assert_eq!(body, png);
    assert_eq!(etag.as_deref(), Some(image::etag(&png).as_str()));
    let (again, ..) = get_photo(&app, 59_999, etag.as_deref()).await;
    assert_eq!(again, 304);
    let (missing, ..) = get_photo(&app, 60_001, None).await;
    assert_eq!(missing, 404);
    app.stop().await;
}

#[actix_rt::test]
async fn photo_misses_and_readiness_never_wait_on_the_apply_pool() {
    let app = testkit::spawn_app_with(|s| {
        s.database.pool_size = 2;
        s.database.acquire_timeout = Duration::from_secs(2);
    })
    .await;
    // Every connection of the apply path held, as long batches would (the
    // relay may hold one of its own already).
    let mut held = Vec::new();
    while let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_millis(500), app.state.db.get()).await {
        held.push(conn);
    }
    assert!(!held.is_empty() && held.len() <= 2);
    let started = std::time::Instant::now();
    let (status, ..) = get_photo(&app, 23, None).await;
    assert_eq!(status, 200, "a photo miss reads through the client reads' pool");
    let ready = app.client().get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "readiness pings the client reads' pool");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "neither waited for an apply connection: {:?}",
        started.elapsed()
    );
    drop(held);
    app.stop().await;
}

#[actix_rt::test]
async fn asking_again_for_an_unknown_product_photo_costs_no_database_read() {
    // Longer than the run takes, on any machine.
    let app = testkit::spawn_app_with(|s| s.photos.local_ttl = Duration::from_secs(60)).await;
    for _ in 0..20 {
        let (status, ..) = get_photo(&app, 987_654_321, None).await;
        assert_eq!(status, 404);
    }
    assert_eq!(
        app.metric("gateway_photo_origin_loads_total", "").await,
        1.0,
        "one read found there is no such product; the others knew"
    );
    app.stop().await;
}
