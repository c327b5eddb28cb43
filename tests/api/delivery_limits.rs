//! Slow and hostile clients: a client that never reads does not delay the
//! others and still converges; malformed frames get their error and the
//! server stays up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use product_gateway::update::Update;
use testkit::clients::{SseClient, WsClient, WsEvent};
use testkit::raw::ws::RawWs;
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
    settings.consumer.batch_size = 32;
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
async fn connections_over_the_limit_are_refused_with_1013_and_an_event_saying_when_to_come_back() {
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
    let refused = SseClient::retry_later(&app.address, "topics=%23")
        .await
        .expect("third connection accepted");
    assert_eq!(refused["code"], "busy", "{refused}");
    assert!(refused["retry_ms"].as_u64().is_some_and(|ms| ms > 0), "{refused}");
    drop(a);
    eventually(T, "a slot frees up", || async {
        SseClient::retry_later(&app.address, "topics=%23")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(app.metric("gateway_clients_refused_total", "connection_limit").await >= 2.0);
    app.stop().await;
}

#[actix_rt::test]
async fn a_topic_list_over_the_limit_is_refused_before_its_patterns_are_parsed() {
    let app = spawn_app().await;
    // Far more than max_subscriptions (256), with a bad pattern at the very
    // end: counting alone must refuse it, before any pattern is parsed.
    let mut many: Vec<String> = (0..3000).map(|i| format!("p.{i}")).collect();
    many.push("bad..pattern".into());
    let mut ws = WsClient::connect(&app.address).await;
    ws.send(serde_json::json!({"op": "subscribe", "topics": many})).await;
    expect_error(&mut ws, "too_many_subscriptions").await;

    let started = Instant::now();
    match SseClient::connect(&app.address, &format!("topics={}", many.join(",")), None).await {
        Err((400, body)) => {
            let message = body["message"].as_str().unwrap_or("");
            assert!(message.starts_with("too_many_subscriptions"), "{body}");
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("accepted"),
    }
    println!("SSE refusal of {} patterns took {:?}", many.len(), started.elapsed());
    // A list within the limit is still parsed, and its bad pattern named.
    let few = ["p.1", "bad..pattern"];
    ws.send(serde_json::json!({"op": "subscribe", "topics": few})).await;
    expect_error(&mut ws, "bad_pattern").await;
    app.stop().await;
}

#[actix_rt::test]
async fn since_subscribes_and_big_unsubscribes_cannot_stall_other_clients() {
    let app = spawn_app().await;
    // A full history, so that every resume from offset 0 has much to look
    // at. Handed to the hub directly: pushing this many through the
    // pipeline would take minutes, and only the hub's memory matters here.
    const KEPT: u64 = 20_000;
    for offset in 1..=KEPT {
        let id = 10_000 + offset;
        let body = format!(r#"{{"product_id":{id},"kind":"stock","stock":1,"version":1,"ts_us":1}}"#);
        let u = Update::from_stream(offset, &format!("product.stock.{id}"), body.as_bytes()).unwrap();
        assert!(app.state.hub.publish(vec![u]).await);
    }
    let p = TestPublisher::connect(&app.iso).await;
    let mut fast = WsClient::connect(&app.address).await;
    fast.subscribe(&["product.price.*"], None, false).await;
    let baseline = latencies(&p, &mut fast, 1, 10).await;

    // Hostile connections alternate resuming (since=0) with the most
    // patterns allowed (none of which match anything) and unsubscribing
    // them, at a pace the frame rate limit accepts.
    let patterns: Vec<String> = (0..256).map(|i| format!("product.stock.{i}.none")).collect();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut hostile = Vec::new();
    for _ in 0..2 {
        let mut ws = WsClient::connect(&app.address).await;
        let (stop, patterns) = (stop.clone(), patterns.clone());
        hostile.push(actix_rt::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let frame = if n.is_multiple_of(2) {
                    serde_json::json!({"op": "subscribe", "topics": patterns, "since": 0})
                } else {
                    serde_json::json!({"op": "unsubscribe", "topics": patterns})
                };
                ws.send(frame).await;
                n += 1;
                // Its answer, then a pause that keeps under the rate limit.
                let _ = ws.next(T).await;
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
            n
        }));
    }
    let loaded = latencies(&p, &mut fast, 11, 40).await;
    stop.cancel();
    let mut frames = 0;
    for h in hostile {
        frames += h.await.unwrap();
    }
    let (b, l) = (p95(&baseline), p95(&loaded));
    println!(
        "fast client p95 latency: alone {b:.1} ms, beside {frames} since-subscribe/unsubscribe frames over a history of {KEPT} {l:.1} ms (max {:.1} ms)",
        loaded.last().unwrap()
    );
    assert!(
        l <= 4.0 * b + 250.0,
        "since-subscribes slowed another client: {b:.1} ms -> {l:.1} ms"
    );

    // An unsubscribe longer than any connection's pattern list is refused
    // before the hub sees it.
    let huge: Vec<String> = (0..5000).map(|i| format!("x.{i}")).collect();
    let mut ws = WsClient::connect(&app.address).await;
    ws.send(serde_json::json!({"op": "unsubscribe", "topics": huge})).await;
    match ws.next(T).await {
        Some(WsEvent::Json(v)) => assert_eq!(v["code"], "too_many_subscriptions", "{v}"),
        other => panic!("no answer to a huge unsubscribe: {other:?}"),
    }
    app.stop().await;
}

#[actix_rt::test]
async fn sse_clients_that_reset_while_subscribing_leave_nothing_behind() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    settings.seed.products = 200;
    let app = spawn_with(iso, settings).await;
    // A full history makes resumes (since=0) slow on the hub, so subscribes
    // queue up while their clients go. Handed to the hub directly: only its
    // memory matters here.
    for offset in 1..=20_000u64 {
        let id = 10_000 + offset;
        let body = format!(r#"{{"product_id":{id},"kind":"stock","stock":1,"version":1,"ts_us":1}}"#);
        let u = Update::from_stream(offset, &format!("product.stock.{id}"), body.as_bytes()).unwrap();
        assert!(app.state.hub.publish(vec![u]).await);
    }
    // Another connection's resume keeps the hub busy, so the SSE
    // subscribes below queue up behind it while their clients reset.
    let mut busy = WsClient::connect(&app.address).await;
    let patterns: Vec<String> = (0..256).map(|i| format!("product.stock.{i}.none")).collect();
    busy.send(serde_json::json!({"op": "subscribe", "topics": patterns, "since": 0}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let port = app.port;
        tasks.push(actix_rt::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
            let req = format!("GET /events?topics=product.price.{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            use tokio::io::AsyncWriteExt;
            s.write_all(req.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(s); // SO_LINGER 0: a reset, not a close
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let _ = busy.next(T).await;
    drop(busy);
    let (subs, clients) = eventually(T, "every reset client left the hub", || async {
        let subs = app.metric("gateway_subscriptions", "").await;
        let clients = app.metric("gateway_clients_connected", "").await;
        println!("subscriptions {subs}, clients {clients}");
        (subs == 0.0 && clients == 0.0).then_some((subs, clients))
    })
    .await;
    assert_eq!((subs, clients), (0.0, 0.0));
    app.stop().await;
}

#[actix_rt::test]
async fn a_websocket_client_that_stops_reading_is_closed_by_the_heartbeat() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    settings.hub.client_buffer = 32;
    settings.consumer.batch_size = 32;
    settings.hub.ping_interval = Duration::from_millis(200);
    settings.hub.client_timeout = Duration::from_millis(2000);
    settings.seed.products = 200;
    settings.server.socket_send_buffer = 4096;
    let app = spawn_with(iso, settings).await;
    let p = TestPublisher::connect(&app.iso).await;
    let first: Vec<(i64, &str, i64, i64)> = (1..=200).map(|id| (id, "price", id, 1)).collect();
    p.burst(&first).await;
    eventually(T, "products created", || async {
        (app.metric("gateway_updates_broadcast_total", "").await >= 200.0).then_some(())
    })
    .await;
    let mut slow = RawWs::connect(app.port).await;
    slow.send_text(r#"{"op":"subscribe","topics":["product.price.*"]}"#)
        .await;
    let ack = slow.next_text(T).await.unwrap();
    assert!(ack.contains("subscribed"), "{ack}");
    let stalled_at = Instant::now();
    // A busy topic: far more than the socket buffers and the session's queue hold.
    let busy = actix_rt::spawn(async move {
        let mut version = 1;
        while stalled_at.elapsed() < Duration::from_millis(8000) {
            version += 1;
            let events: Vec<(i64, &str, i64, i64)> = (1..=200).map(|id| (id, "price", id * 7, version)).collect();
            p.burst(&events).await;
        }
    });
    eventually(T, "the stalled client's slot is released", || async {
        (app.metric("gateway_clients_connected", "").await == 0.0).then_some(())
    })
    .await;
    let released = stalled_at.elapsed();
    println!("stalled client released {released:?} after it stopped reading (client_timeout_ms 2000)");
    assert!(released < Duration::from_millis(2000 + 3000), "{released:?}");
    busy.await.unwrap();
    app.stop().await;
}
