//! Reads against the catalog (snapshots, REST) under load and outage: they
//! never starve the apply path, and a database outage is a clean 503.

use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, AsyncPgConnection};
use testkit::clients::{SseClient, WsClient};
use testkit::{Isolation, TestPublisher, spawn_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Words that only an internal error text (pool, driver, socket) would hold.
const INTERNAL_WORDS: [&str; 8] = [
    "timeout",
    "pool",
    "diesel",
    "connect",
    "backend",
    "wait",
    "error",
    "database unavailable:",
];

fn assert_generic(message: &str) {
    let lower = message.to_ascii_lowercase();
    for word in INTERNAL_WORDS {
        assert!(!lower.contains(word), "message leaks internals ({word:?}): {message:?}");
    }
}

#[actix_rt::test]
async fn database_outage_during_a_snapshot_subscribe_is_unavailable_without_internals() {
    let (app, proxy) = testkit::spawn_behind_database_proxy().await;

    proxy.cut();
    let body = SseClient::retry_later(&app.address, "topics=product.%23&snapshot=true")
        .await
        .expect("an SSE snapshot subscribe succeeded with PostgreSQL cut");
    println!("SSE during the outage: {body}");
    assert_eq!(body["code"], "unavailable", "{body}");
    assert!(body["retry_ms"].as_u64().is_some(), "says when to come back: {body}");
    assert_generic(body["message"].as_str().unwrap_or_default());

    let mut ws = WsClient::connect(&app.address).await;
    ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.#"], "snapshot": true}))
        .await;
    let frame = ws.next_of("error", Duration::from_secs(10)).await;
    println!("WebSocket during the outage: {frame}");
    assert_eq!(frame["code"], "unavailable", "{frame}");
    assert_generic(frame["message"].as_str().unwrap_or_default());

    proxy.restore();
    app.stop().await;
}

/// Opens an SSE snapshot request on `#` and returns its status once the
/// response head arrives (the snapshot has then been read), then hangs up.
async fn snapshot_request(port: u16) -> u16 {
    let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return 0;
    };
    let head = format!("GET /events?topics=%23&snapshot=true HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if tcp.write_all(head.as_bytes()).await.is_err() {
        return 0;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 12 {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return 0,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got[9..12]).parse().unwrap_or(0)
}

#[actix_rt::test]
async fn snapshot_flood_does_not_starve_the_apply_path() {
    const PRODUCTS: i64 = 3000;
    const FLOOD: usize = 150;
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    // A small pool and a short acquire time-out make starvation visible fast;
    // the apply path's transient retry is the symptom a user pays for.
    settings.database.pool_size = 4;
    settings.database.acquire_timeout = Duration::from_millis(300);
    settings.seed.products = PRODUCTS as u32;
    let app = spawn_with(iso, settings).await;
    let publisher = TestPublisher::connect(&app.iso).await;
    let mut direct = AsyncPgConnection::establish(&app.iso.database_url).await.unwrap();

    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let statuses = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    let port = app.port;
    let flood = {
        let (flooding, statuses) = (flooding.clone(), statuses.clone());
        tokio::spawn(async move {
            while flooding.load(std::sync::atomic::Ordering::SeqCst) {
                let wave: Vec<_> = (0..FLOOD)
                    .map(|_| {
                        let statuses = statuses.clone();
                        tokio::spawn(async move {
                            let status = tokio::time::timeout(Duration::from_secs(30), snapshot_request(port))
                                .await
                                .unwrap_or(0);
                            *statuses.lock().unwrap().entry(status).or_default() += 1;
                        })
                    })
                    .collect();
                for w in wave {
                    let _ = w.await;
                }
            }
        })
    };
    // Let the first wave reach the server before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut lags = Vec::new();
    let started = Instant::now();
    let mut n = 0i64;
    while started.elapsed() < Duration::from_secs(6) {
        n += 1;
        let id = 1 + (n * 7) % PRODUCTS;
        let version = 1_000 + n;
        let sent = Instant::now();
        publisher.event(id, "price", 5_000 + n, version).await;
        let lag = loop {
            #[derive(diesel::QueryableByName)]
            struct V {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                price_version: i64,
            }
            use diesel_async::RunQueryDsl;
            let v: V = diesel::sql_query("SELECT price_version FROM products WHERE id = $1")
                .bind::<diesel::sql_types::BigInt, _>(id)
                .get_result(&mut direct)
                .await
                .unwrap();
            if v.price_version >= version {
                break sent.elapsed();
            }
            assert!(sent.elapsed() < Duration::from_secs(30), "event {n} never applied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        lags.push(lag);
    }
    flooding.store(false, std::sync::atomic::Ordering::SeqCst);
    // The wave in flight may take long to drain; what it answered so far counts.
    let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;
    let statuses = statuses.lock().unwrap().clone();
    lags.sort();
    let max = *lags.last().unwrap();
    let median = lags[lags.len() / 2];
    let transient = app.metric("gateway_apply_transient_failures_total", "").await;
    let dead = app.dead_letters().await;
    println!(
        "apply lag during a flood of {FLOOD} concurrent snapshots of {PRODUCTS} products: \
         {} events, median {median:?}, max {max:?}; snapshot answers by status {statuses:?}; \
         transient apply failures {transient}; dead letters {}",
        lags.len(),
        dead.len()
    );
    assert_eq!(transient, 0.0, "the apply path waited for a connection and failed");
    assert!(dead.is_empty(), "valid events were dead-lettered: {dead:?}");
    assert!(max < Duration::from_secs(2), "apply lag reached {max:?}");
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "every snapshot is served or refused with a retry-later 503: {statuses:?}"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_snapshot_holds_its_turn_until_its_last_part_is_taken() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    settings.hub.max_concurrent_snapshots = 1;
    settings.hub.snapshot_wait = Duration::from_millis(300);
    let app = spawn_with(iso.clone(), settings).await;
    // 100,000 products, some 15 MB of snapshot: more than the sockets buffer.
    app.sql(
        "INSERT INTO products (id, name, price_cents, stock) \
             SELECT g, 'product ' || g, 100, 1 FROM generate_series(51, 100000) AS g",
    )
    .await;
    // A client that asks for everything and reads nothing.
    let port = app.port;
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!("GET /events?topics=%23&snapshot=true HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    stalled.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Its snapshot is still being sent: the one turn is taken.
    let body = SseClient::retry_later(&app.address, "topics=product.*.7&snapshot=true")
        .await
        .expect("a second snapshot was served while the only turn was held");
    assert_eq!(body["code"], "busy", "{body}");
    // Once that client hangs up, its turn is free again.
    drop(stalled);
    testkit::eventually(Duration::from_secs(10), "the turn given back", || async {
        SseClient::retry_later(&app.address, "topics=product.*.7&snapshot=true")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    app.stop().await;
}
