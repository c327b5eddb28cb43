//! Slow and hostile clients: a client that never reads does not delay the
//! others and still converges; malformed frames get their error and the
//! server stays up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use testkit::clients::{SseClient, WsClient, WsEvent};
use testkit::rawws::RawWs;
use testkit::{Isolation, TestPublisher, eventually, spawn_app, spawn_with};

const T: Duration = Duration::from_secs(30);

/// Publishes rounds of price updates over products 1..=20 and returns the
/// fast client's latencies (ms, from `ts_us` to receipt).
async fn latencies(p: &TestPublisher, fast: &mut WsClient, first_version: i64, rounds: i64) -> Vec<f64> {
    let mut lat = Vec::new();
    for r in 0..rounds {
        let v = first_version + r;
        let events: Vec<(i64, &str, i64, i64)> = (1..=20).map(|id| (id, "price", 1000 + v * 10 + id, v)).collect();
        p.burst(&events).await;
        for u in fast.updates(20, T).await {
            let ts = u["data"]["ts_us"].as_i64().unwrap();
            lat.push((chrono::Utc::now().timestamp_micros() - ts) as f64 / 1000.0);
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat
}

fn p95(v: &[f64]) -> f64 {
    v[(v.len() * 95 / 100).min(v.len() - 1)]
}

#[actix_rt::test]
async fn a_client_that_never_reads_does_not_delay_others_and_converges() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    settings.hub.client_buffer = 32;
    // Small kernel buffers, so the stalled socket fills within the test.
    settings.server.socket_send_buffer = 8192;
    let app = spawn_with(iso, settings).await;
    let p = TestPublisher::connect(&app.iso).await;
    let mut fast = WsClient::connect(&app.address).await;
    fast.subscribe(&["product.price.*"], None, false).await;

    let baseline = latencies(&p, &mut fast, 1, 10).await;

    let mut slow = RawWs::connect(app.port).await;
    slow.send_text(r#"{"op":"subscribe","topics":["product.price.*"]}"#)
        .await;
    let ack = slow.next_text(T).await.unwrap();
    assert!(ack.contains("subscribed"), "{ack}");
    // From here on the slow client reads nothing while 2,000 updates flow.
    let loaded = latencies(&p, &mut fast, 11, 100).await;
    let (b, l) = (p95(&baseline), p95(&loaded));
    println!("fast client p95 latency: alone {b:.1} ms, beside a stalled client {l:.1} ms");
    assert!(
        l <= 4.0 * b + 250.0,
        "a stalled client slowed the fast one: {b:.1} ms -> {l:.1} ms"
    );
    assert!(
        app.metric("gateway_updates_conflated_total", "").await >= 1.0,
        "the stalled buffer was conflated"
    );

    // The stalled client now reads everything it was sent: its last value of
    // each product is the database's.
    let mut latest: HashMap<i64, (i64, i64)> = HashMap::new();
    let started = Instant::now();
    while let Some(text) = slow.next_text(Duration::from_secs(2)).await {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        if v["type"] == "update" {
            let d = &v["data"];
            latest.insert(
                d["product_id"].as_i64().unwrap(),
                (d["price_cents"].as_i64().unwrap(), d["version"].as_i64().unwrap()),
            );
        }
        assert!(started.elapsed() < Duration::from_secs(60));
    }
    for id in 1..=20 {
        let product = app.product(id).await;
        let want = (
            product["price_cents"].as_i64().unwrap(),
            product["price_version"].as_i64().unwrap(),
        );
        assert_eq!(latest.get(&id), Some(&want), "product {id}");
        assert_eq!(want.1, 110);
    }
    app.stop().await;
}

async fn expect_error(ws: &mut WsClient, code: &str) {
    let v = ws.next_of("error", T).await;
    assert_eq!(v["code"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[actix_rt::test]
async fn malformed_frames_get_their_error_and_the_server_stays_up() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.send_binary(vec![1, 2, 3]).await;
    expect_error(&mut ws, "binary_not_supported").await;
    ws.send_text("{not json").await;
    expect_error(&mut ws, "bad_json").await;
    ws.send_text(r#"{"op":"dance"}"#).await;
    expect_error(&mut ws, "unknown_op").await;
    ws.send_text(r#"{"topics":["a"]}"#).await;
    expect_error(&mut ws, "unknown_op").await;
    ws.send_text(r#"{"op":"subscribe","topics":"product.#"}"#).await;
    expect_error(&mut ws, "bad_frame").await;
    ws.send_text(r#"{"op":"subscribe","topics":["product..price"]}"#).await;
    expect_error(&mut ws, "bad_pattern").await;
    let long = vec!["a"; 10_000].join(".");
    ws.send(serde_json::json!({"op": "subscribe", "topics": [long]})).await;
    expect_error(&mut ws, "bad_pattern").await;
    let many: Vec<String> = (0..300).map(|i| format!("product.price.{i}")).collect();
    ws.send(serde_json::json!({"op": "subscribe", "topics": many})).await;
    expect_error(&mut ws, "too_many_subscriptions").await;
    // Still usable after all of that.
    ws.subscribe(&["product.stock.*"], None, false).await;
    TestPublisher::connect(&app.iso).await.event(5, "stock", 9, 1).await;
    assert_eq!(ws.updates(1, T).await[0]["data"]["product_id"], 5);

    // An oversize frame closes with 1009.
    let mut big = WsClient::connect(&app.address).await;
    big.send_text(&format!(r#"{{"op":"subscribe","topics":["{}"]}}"#, "x".repeat(100_000)))
        .await;
    match big.next(T).await {
        Some(WsEvent::Closed(code)) => assert_eq!(code, Some(1009)),
        other => panic!("expected close 1009, got {other:?}"),
    }
    // A flood of frames is refused, then disconnected with 1008.
    let mut flood = WsClient::connect(&app.address).await;
    for _ in 0..200 {
        flood.send_text(r#"{"op":"unsubscribe","topics":["a"]}"#).await;
    }
    let mut codes = Vec::new();
    let close = loop {
        match flood.next(T).await {
            Some(WsEvent::Json(v)) => codes.push(v["code"].as_str().unwrap_or("").to_owned()),
            Some(WsEvent::Closed(code)) => break code,
            None => panic!("flood never ended"),
        }
    };
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
    assert_eq!(close, Some(1008));

    // SSE refuses bad queries with a JSON 400.
    for query in [
        "topics=product..x",
        "topics=",
        "topics=a&since=abc",
        "topics=a&snapshot=maybe",
        "topics=a&x=1",
    ] {
        match SseClient::connect(&app.address, query, None).await {
            Err((400, body)) => assert_eq!(body["code"], "bad_request", "{query}: {body}"),
            Err(other) => panic!("{query}: {other:?}"),
            Ok(_) => panic!("{query}: accepted"),
        }
    }
    let (status, _) = app.get_json("/healthz").await;
    assert_eq!(status, 200);
    assert!(app.metric("gateway_client_errors_total", "bad_pattern").await >= 2.0);
    app.stop().await;
}

#[actix_rt::test]
async fn connections_over_the_limit_are_refused_with_1013_and_503() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    settings.hub.max_connections = 2;
    let app = spawn_with(iso, settings).await;
    let mut a = WsClient::connect(&app.address).await;
    a.subscribe(&["#"], None, false).await;
    let _b = SseClient::connect(&app.address, "topics=%23", None).await.unwrap();
    let mut c = WsClient::connect(&app.address).await;
    match c.next(T).await {
        Some(WsEvent::Closed(code)) => assert_eq!(code, Some(1013)),
        other => panic!("expected close 1013, got {other:?}"),
    }
    match SseClient::connect(&app.address, "topics=%23", None).await {
        Err((503, body)) => assert_eq!(body["code"], "unavailable"),
        _ => panic!("third connection accepted"),
    }
    drop(a);
    eventually(T, "a slot frees up", || async {
        SseClient::connect(&app.address, "topics=%23", None)
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    assert!(app.metric("gateway_clients_refused_total", "connection_limit").await >= 2.0);
    app.stop().await;
}
