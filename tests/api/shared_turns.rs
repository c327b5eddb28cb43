//! Shared turns are lent, not given: snapshots and catch-ups whose clients
//! stop reading give back their turn, read connection and transaction; one
//! address cannot hold every turn; a refusal says when to come back.

use std::time::{Duration, Instant};

use testkit::clients::{WsClient, WsEvent};
use testkit::raw::sse::{Drained, RawSse};
use testkit::raw::ws::RawWs;
use testkit::{TestApp, TestPublisher, eventually, spawn_app_with};

const T: Duration = Duration::from_secs(30);

/// Read transactions of this test's database left open by a client.
async fn idle_in_transaction(app: &TestApp) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = app.state.db.get().await.unwrap();
    let n: N = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query(
            "SELECT COUNT(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND state = 'idle in transaction'",
        ),
        &mut conn,
    )
    .await
    .unwrap();
    n.n
}

/// A whole-catalog snapshot in many small parts, from a client that reads
/// none of them past its first few kilobytes.
async fn stalled_snapshot(app: &TestApp, forwarded_for: Option<&str>) -> RawSse {
    let (status, raw) =
        RawSse::connect_as(app.port, "/events?topics=product.price.*&snapshot=true", forwarded_for).await;
    assert!(status.contains("200"), "{status}");
    raw
}

/// An instance whose whole-catalog snapshot comes in many small parts,
/// more than the socket buffers hold, with `turns` snapshots at once of
/// which `per_address` to one address, a turn waited for up to `wait`, and
/// a client that stalls taken off its snapshot after `stall`. Only the
/// snapshots' own limits may end a stalled client here.
async fn spawn_snapshots(turns: usize, per_address: usize, wait: Duration, stall: Duration) -> TestApp {
    spawn_app_with(move |s| {
        s.hub.snapshot_wait = wait;
        s.seed.products = 3000;
        s.hub.snapshot_part_products = 20;
        s.hub.max_concurrent_snapshots = turns;
        s.hub.max_snapshots_per_ip = per_address;
        s.hub.snapshot_stall = stall;
        s.hub.client_timeout = Duration::from_secs(60);
        s.server.socket_send_buffer = 4096;
        s.server.trusted_proxies = serde_json::from_value(serde_json::json!(["127.0.0.1"])).unwrap();
    })
    .await
}

#[actix_rt::test]
async fn four_stalled_snapshots_give_back_their_turns_and_a_fifth_is_served() {
    let app = spawn_snapshots(4, 4, Duration::from_secs(5), Duration::from_millis(1000)).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(stalled_snapshot(&app, None).await);
    }
    // The fifth, a one-product snapshot, from a client that reads.
    let started = Instant::now();
    let mut ws = WsClient::connect(&app.address).await;
    ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.price.7"], "snapshot": true}))
        .await;
    let snapshot = ws.next_of_any(&["snapshot", "error"], T).await;
    assert_eq!(
        snapshot["type"], "snapshot",
        "the fifth snapshot was refused: {snapshot}"
    );
    assert_eq!(snapshot["products"][0]["product_id"], 7, "{snapshot}");
    let served_after = started.elapsed();
    println!("fifth snapshot served after {served_after:?} beside four stalled ones");
    assert!(served_after < Duration::from_secs(4), "{served_after:?}");
    // Their transactions were rolled back, not left open in the pool.
    eventually(Duration::from_secs(5), "no read transaction left open", || async {
        (idle_in_transaction(&app).await == 0).then_some(())
    })
    .await;
    // A stalled client that reads again learns its snapshot was cut short.
    let Drained::Closed(body) = stalled.pop().unwrap().drain(Duration::from_secs(10)).await else {
        panic!("the cut-short snapshot's stream did not end");
    };
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("\"code\":\"unavailable\""),
        "{}",
        &body[body.len().saturating_sub(400)..]
    );
    app.stop().await;
}

#[actix_rt::test]
async fn one_address_cannot_hold_every_snapshot_turn() {
    // Stalled snapshots keep their turns for the whole test.
    let app = spawn_snapshots(4, 2, Duration::from_millis(500), Duration::from_secs(60)).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(stalled_snapshot(&app, Some("198.51.100.7")).await);
    }
    // A third from the same address waits, then is told to come back.
    let (status, third) = RawSse::connect_as(
        app.port,
        "/events?topics=product.price.1&snapshot=true",
        Some("198.51.100.7"),
    )
    .await;
    assert!(status.contains("200"), "{status}");
    let Drained::Closed(body) = third.drain(T).await else {
        panic!("the refusal did not end its stream")
    };
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("\"code\":\"busy\"") && body.contains("retry: "), "{body}");
    // Another address gets a turn at once.
    let (status, other) = RawSse::connect_as(
        app.port,
        "/events?topics=product.price.1&snapshot=true",
        Some("198.51.100.8"),
    )
    .await;
    assert!(status.contains("200"), "{status}");
    let Drained::Open = other.drain(Duration::from_secs(2)).await else {
        panic!("another address was refused")
    };
    drop(held);
    app.stop().await;
}

#[actix_rt::test]
async fn a_busy_snapshot_over_sse_answers_an_event_that_says_when_to_come_back() {
    let app = spawn_snapshots(1, 1, Duration::from_millis(300), Duration::from_secs(60)).await;
    let holder = stalled_snapshot(&app, None).await;
    let (status, refused) = RawSse::connect(app.port, "/events?topics=product.price.1&snapshot=true").await;
    // Not a 503: an EventSource would give up for good.
    assert!(status.contains("200"), "{status}");
    let Drained::Closed(body) = refused.drain(T).await else {
        panic!("the refusal did not end its stream")
    };
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("retry: 300"), "the retry hint is the wait: {body}");
    assert!(
        body.contains("event: error") && body.contains("\"code\":\"busy\""),
        "{body}"
    );
    assert!(body.contains("\"retry_ms\":300"), "{body}");
    assert!(app.metric("gateway_client_errors", "code=\"busy\"").await >= 1.0);
    drop(holder);
    app.stop().await;
}

#[actix_rt::test]
async fn a_stalled_catch_up_gives_back_its_turn() {
    const PRODUCTS: i64 = 200;
    const ROUNDS: i64 = 20;
    let app = spawn_app_with(|s| {
        s.seed.products = PRODUCTS as u32;
        // Every resume from the start is read back from the stream, one at a time.
        s.hub.history = 16;
        s.hub.max_concurrent_catch_ups = 1;
        s.hub.catch_up_wait = Duration::from_secs(4);
        s.hub.catch_up_stall = Duration::from_millis(1000);
        s.hub.client_timeout = Duration::from_secs(60);
        s.server.socket_send_buffer = 4096;
    })
    .await;
    let p = TestPublisher::connect(&app.iso).await;
    for v in 10..10 + ROUNDS {
        let events: Vec<(i64, &str, i64, i64)> = (1..=PRODUCTS).map(|id| (id, "price", 100 * v + id, v)).collect();
        p.burst(&events).await;
    }
    eventually(T, "every update broadcast", || async {
        (app.metric("gateway_updates_broadcast_total", "").await >= (PRODUCTS * ROUNDS) as f64).then_some(())
    })
    .await;
    // A resume of everything, from a client that reads nothing of it.
    let mut stalled = RawWs::connect(app.port).await;
    stalled
        .send_text(r#"{"op":"subscribe","topics":["product.price.*"],"since":0}"#)
        .await;
    assert!(stalled.next_text(T).await.unwrap().contains("subscribed"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The only turn comes back once the stalled catch-up gives up on its
    // client: this resume is served, whole, with no reset.
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.price.1"], Some(0), false).await;
    let mut versions: Vec<i64> = Vec::new();
    while versions.last() != Some(&(10 + ROUNDS - 1)) {
        match ws.next(T).await {
            Some(WsEvent::Json(v)) if v["type"] == "update" => versions.push(v["data"]["version"].as_i64().unwrap()),
            other => panic!("after updates {versions:?}: {other:?}"),
        }
    }
    // Everything after update 0 (product 1's first version, when it was
    // the stream's first message), each once, in order.
    let first = versions[0];
    assert!(first <= 11, "{versions:?}");
    assert_eq!(versions, (first..10 + ROUNDS).collect::<Vec<_>>());
    assert!(
        app.metric("gateway_catch_up_resets", "").await >= 1.0,
        "the stalled one was given up"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_connection_has_only_a_few_resumes_queued_at_once() {
    use product_gateway::hub::session::{ClientErrorCode, Session, Transport};
    let app = spawn_app_with(|_| {}).await;
    let p = TestPublisher::connect(&app.iso).await;
    p.event(1, "price", 100, 10).await;
    let mut sub = Session::open(
        app.state.session_context(),
        Transport::WebSocket,
        None,
        app.state.auth.anonymous(),
    )
    .unwrap_or_else(|_| panic!("a connection slot"));
    // A client that resumes pattern after pattern and reads none of it:
    // each resume waits on the ones before, and only a few may wait.
    let mut refused = None;
    for id in 1..=10 {
        let topic = [format!("product.price.{id}")];
        if let Err(e) = sub.subscribe(&topic, Some(0), false).await {
            refused = Some((id, e));
            break;
        }
    }
    let (id, e) = refused.expect("a bound on queued resumes");
    assert_eq!(e.code, ClientErrorCode::Busy, "{e:?}");
    assert!(e.retry.is_some(), "says when to come back");
    assert!(id <= 5, "refused only at resume {id}");
    assert!(
        !sub.patterns().contains(&format!("product.price.{id}").as_str()),
        "a refused resume subscribes nothing"
    );
    drop(sub);
    app.stop().await;
}
