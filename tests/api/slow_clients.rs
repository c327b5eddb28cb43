//! Clients that read slowly, stop reading, or only pretend to be alive:
//! each is cut off within its stated time, at a bounded cost, and nobody
//! else notices.

use std::time::{Duration, Instant};

use testkit::clients::WsClient;
use testkit::raw::sse::{Drained, RawSse};
use testkit::raw::ws::RawWs;
use testkit::{Isolation, TestApp, TestPublisher, eventually, spawn_with};

const T: Duration = Duration::from_secs(30);

/// An instance whose clients time out quickly, with small socket buffers
/// so a stalled socket fills within the test.
async fn spawn_impatient(configure: impl FnOnce(&mut product_gateway::settings::Settings)) -> TestApp {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    settings.hub.client_timeout = Duration::from_millis(1500);
    settings.hub.ping_interval = Duration::from_millis(500);
    settings.server.socket_send_buffer = 4096;
    configure(&mut settings);
    spawn_with(iso, settings).await
}

async fn connected(app: &TestApp, transport: &str) -> f64 {
    app.metric("gateway_clients_connected", &format!("transport=\"{transport}\""))
        .await
}

async fn slow_consumers(app: &TestApp) -> f64 {
    app.metric("gateway_clients_refused", "reason=\"slow_consumer\"").await
}

/// A client reading every price, and one subscribed to them all that never
/// reads a frame again.
async fn healthy_and_stalled(app: &TestApp) -> (WsClient, RawWs) {
    let mut healthy = WsClient::connect(&app.address).await;
    healthy.subscribe(&["product.price.*"], None, false).await;
    let mut stalled = RawWs::connect(app.port).await;
    stalled
        .send_text(r#"{"op":"subscribe","topics":["product.price.*"]}"#)
        .await;
    assert!(stalled.next_text(T).await.unwrap().contains("subscribed"));
    (healthy, stalled)
}

#[actix_rt::test]
async fn a_client_with_more_waiting_products_than_its_buffer_is_cut_off_as_a_slow_consumer() {
    // A long timeout: only the buffer's bound can cut the client off here.
    // A buffer holds at least one committed batch (consumer.batch_size).
    let app = spawn_impatient(|s| {
        s.seed.products = 400;
        s.hub.client_buffer = s.consumer.batch_size;
        s.hub.client_timeout = Duration::from_secs(60);
    })
    .await;
    let p = TestPublisher::connect(&app.iso).await;
    // Kept, never read: dropping it would close it.
    let (mut healthy, _stalled) = healthy_and_stalled(&app).await;

    // A hundred products a round, a different hundred each time: more
    // distinct keys wait than the buffer holds, so conflation alone cannot
    // keep it bounded. The healthy client reads each round as it comes.
    let started = Instant::now();
    for round in 1..=12i64 {
        let first = (round % 4) * 100 + 1;
        let events: Vec<(i64, &str, i64, i64)> = (first..first + 100)
            .map(|id| (id, "price", 100 * round + id, round))
            .collect();
        p.burst(&events).await;
        assert_eq!(healthy.updates(100, T).await.len(), 100, "round {round}");
        if slow_consumers(&app).await >= 1.0 {
            break;
        }
    }
    eventually(T, "the stalled client cut off as a slow consumer", || async {
        (slow_consumers(&app).await >= 1.0).then_some(())
    })
    .await;
    eventually(Duration::from_secs(5), "its connection closed", || async {
        (connected(&app, "ws").await == 1.0).then_some(())
    })
    .await;
    println!("cut off after {:?}", started.elapsed());
    assert_eq!(slow_consumers(&app).await, 1.0, "the healthy client was not");
    app.stop().await;
}

#[actix_rt::test]
async fn a_websocket_peer_that_sends_unsolicited_pongs_but_never_reads_is_closed() {
    let app = spawn_impatient(|_| {}).await;
    let mut ws = RawWs::connect(app.port).await;
    ws.send_text(r#"{"op":"subscribe","topics":["product.price.1"]}"#).await;
    assert!(ws.next_text(T).await.unwrap().contains("subscribed"));
    assert_eq!(connected(&app, "ws").await, 1.0);
    // Pongs are legal unasked; they must not pass for answers to our pings.
    let started = Instant::now();
    let mut closed_after = None;
    while started.elapsed() < Duration::from_secs(10) {
        ws.send_pong(b"").await;
        ws.send_pong(&[0u8; 8]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if connected(&app, "ws").await == 0.0 {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("closed while sending unasked pongs");
    // client_timeout + one ping interval, and some slack for a busy machine.
    assert!(
        closed_after < Duration::from_millis(1500 + 500 + 1000),
        "{closed_after:?}"
    );
    assert!(
        app.metric("gateway_clients_refused", "reason=\"heartbeat_timeout\"")
            .await
            >= 1.0
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_websocket_client_that_answers_pings_stays_connected() {
    let app = spawn_impatient(|_| {}).await;
    let mut ws = RawWs::connect(app.port).await;
    ws.send_text(r#"{"op":"subscribe","topics":["product.price.1"]}"#).await;
    assert!(ws.next_text(T).await.unwrap().contains("subscribed"));
    // Reading answers each ping with its own payload: alive for 4 timeouts.
    assert_eq!(ws.next_text(Duration::from_secs(6)).await, None, "no frame but pings");
    assert_eq!(connected(&app, "ws").await, 1.0, "still connected");
    app.stop().await;
}

#[actix_rt::test]
async fn an_sse_peer_with_a_zero_receive_window_is_closed_within_the_timeout() {
    let app = spawn_impatient(|_| {}).await;
    let p = TestPublisher::connect(&app.iso).await;
    let (status, stalled) = RawSse::connect(app.port, "/events?topics=product.price.1").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(connected(&app, "sse").await, 1.0);
    // One product, many versions: the buffer conflates and stays small, so
    // only the socket's lack of progress can close this client.
    let mut version = 0;
    let started = Instant::now();
    let closed_after = loop {
        let events: Vec<(i64, &str, i64, i64)> = (0..50)
            .map(|i| {
                version += 1;
                (1, "price", 1000 + i, version)
            })
            .collect();
        p.burst(&events).await;
        if connected(&app, "sse").await == 0.0 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a stalled event stream still open after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("stalled event stream closed after {closed_after:?}");
    // Filling the buffers takes a moment; then client_timeout + one interval.
    assert!(closed_after < Duration::from_secs(8), "{closed_after:?}");
    assert!(
        matches!(stalled.drain(Duration::from_secs(5)).await, Drained::Closed(_)),
        "the client finds its connection ended"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_client_that_stops_reading_backs_up_into_its_own_buffer_not_into_the_kernel() {
    // The shipped socket settings (no small send buffer as above): with the
    // kernel's autotuning alone a loopback socket nobody reads swallows
    // megabytes before a write waits, and the client's own bounds never see
    // them. A long timeout: only the byte bound can cut the client off.
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    settings.seed.products = 500;
    settings.hub.client_buffer_bytes = 64 * 1024;
    settings.hub.client_timeout = Duration::from_secs(60);
    let app = spawn_with(iso, settings).await;
    let p = TestPublisher::connect(&app.iso).await;
    // Kept, never read: dropping it would close it.
    let (mut healthy, _stalled) = healthy_and_stalled(&app).await;

    // Every product once a round: what waits conflates to 500 frames, a
    // little over the byte bound. A reader that keeps up gets every frame.
    let mut published = 0usize;
    let mut cut_off_after = None;
    for round in 1..=30i64 {
        let events: Vec<(i64, &str, i64, i64)> = (1..=500).map(|id| (id, "price", 100 * round + id, round)).collect();
        p.burst(&events).await;
        let got = healthy.updates(500, T).await;
        assert_eq!(got.len(), 500, "round {round}");
        published += got.iter().map(|u| u.to_string().len()).sum::<usize>();
        if slow_consumers(&app).await >= 1.0 {
            cut_off_after = Some(published);
            break;
        }
    }
    println!("stalled client cut off after {published} bytes of frames");
    // The kernel's share: 16 KiB unsent, plus what the peer's receive
    // window takes in (some 128 KiB here); then 64 KiB in the buffer.
    let cut_off_after = cut_off_after.expect("the stalled client cut off as a slow consumer");
    assert!(cut_off_after < 1024 * 1024, "{cut_off_after} bytes went out first");
    assert_eq!(slow_consumers(&app).await, 1.0, "the healthy client was not cut off");
    app.stop().await;
}
