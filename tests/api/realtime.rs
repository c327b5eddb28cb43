//! Realtime delivery over WebSocket and SSE: topic filtering, resume by
//! offset (from memory, from the stream, across instances and restarts)
//! and snapshots.

use std::collections::HashMap;
use std::time::Duration;

use awc::http::Method;
use serde_json::Value;
use testkit::clients::{SseClient, WsClient};
use testkit::{Isolation, TestPublisher, eventually, spawn_app, spawn_with};

const T: Duration = Duration::from_secs(20);

fn topics(updates: &[Value]) -> Vec<String> {
    updates
        .iter()
        .map(|u| u["topic"].as_str().unwrap().to_owned())
        .collect()
}

fn offsets(updates: &[Value]) -> Vec<u64> {
    updates.iter().map(|u| u["offset"].as_u64().unwrap()).collect()
}

#[actix_rt::test]
async fn clients_receive_only_updates_matching_their_patterns() {
    let app = spawn_app().await;
    let mut price_star = WsClient::connect(&app.address).await;
    price_star.subscribe(&["product.price.*"], None, false).await;
    let mut any_of_7 = WsClient::connect(&app.address).await;
    any_of_7.subscribe(&["product.*.7"], None, false).await;
    let mut hash = WsClient::connect(&app.address).await;
    hash.subscribe(&["#"], None, false).await;
    let mut stock_hash = SseClient::connect(&app.address, "topics=product.stock.%23", None)
        .await
        .unwrap();
    let mut two_ids = SseClient::connect(&app.address, "topics=product.price.8,product.%23.9", None)
        .await
        .unwrap();

    let p = TestPublisher::connect(&app.iso).await;
    for (id, kind, v) in [(7, "price", 700), (7, "stock", 70), (8, "price", 800), (9, "stock", 90)] {
        p.event(id, kind, v, 1).await;
    }
    // Apply batches keep only the newest version of a product; wait so the
    // sentinels below are not merged with the first events.
    eventually(T, "first events broadcast", || async {
        (app.metric("gateway_updates_broadcast_total", "").await >= 4.0).then_some(())
    })
    .await;
    // The last events match every subscription, so each client's list ends there.
    p.event(7, "price", 701, 2).await;
    p.event(7, "stock", 71, 2).await;

    let got = topics(&price_star.updates(3, T).await);
    assert_eq!(got, ["product.price.7", "product.price.8", "product.price.7"]);
    // Price and stock are applied by separate consumers: their relative
    // order is not defined, so each phase is compared as a set.
    let got = topics(&any_of_7.updates(4, T).await);
    let (mut before, mut after) = (got[..2].to_vec(), got[2..].to_vec());
    before.sort();
    after.sort();
    assert_eq!(before, ["product.price.7", "product.stock.7"]);
    assert_eq!(after, ["product.price.7", "product.stock.7"]);
    let all = hash.updates(6, T).await;
    let o = offsets(&all);
    assert!(o.windows(2).all(|w| w[1] > w[0]), "increasing ids: {o:?}");
    // Price and stock commit on separate consumers: the first update may be
    // either, so the first price of product 7 is looked up by its topic.
    let price7 = all.iter().find(|u| u["topic"] == "product.price.7").unwrap();
    assert_eq!(price7["data"]["price_cents"], 700);
    assert_eq!(price7["data"]["version"], 1);
    assert!(price7["data"]["ts_us"].as_i64().unwrap() > 0);

    let sse: Vec<_> = stock_hash.updates(3, T).await;
    let ids: Vec<i64> = sse.iter().map(|e| e.data["product_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [7, 9, 7]);
    assert!(sse.iter().all(|e| e.event == "stock"));
    let stock7 = all.iter().find(|u| u["topic"] == "product.stock.7").unwrap();
    assert_eq!(sse[0].id, stock7["offset"].as_u64(), "SSE id is the stream offset");
    let sse2 = two_ids.updates(2, T).await;
    let mut got: Vec<(String, i64)> = sse2
        .iter()
        .map(|e| (e.event.clone(), e.data["product_id"].as_i64().unwrap()))
        .collect();
    got.sort();
    assert_eq!(got, [("price".to_owned(), 8), ("stock".to_owned(), 9)]);
    app.stop().await;
}

#[actix_rt::test]
async fn reconnecting_with_last_offset_gets_exactly_the_missed_updates() {
    let app = spawn_app().await;
    let p = TestPublisher::connect(&app.iso).await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.price.*"], None, false).await;
    let mut sse = SseClient::connect(&app.address, "topics=product.price.*", None)
        .await
        .unwrap();
    p.event(1, "price", 100, 1).await;
    p.event(2, "price", 200, 1).await;
    let seen = ws.updates(2, T).await;
    let last = seen[1]["offset"].as_u64().unwrap();
    let sse_seen = sse.updates(2, T).await;
    assert_eq!(sse_seen[1].id, Some(last));
    drop(ws);
    drop(sse);

    // Missed: five price updates, with stock noise the clients did not ask for.
    for i in 0..5 {
        p.event(10 + i, "price", 1000 + i, 1).await;
        p.event(10 + i, "stock", 5, 1).await;
    }
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.price.*"], Some(last), false).await;
    let missed = ws.updates(5, T).await;
    let ids: Vec<i64> = missed
        .iter()
        .map(|u| u["data"]["product_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [10, 11, 12, 13, 14]);
    let o = offsets(&missed);
    assert!(o.windows(2).all(|w| w[0] < w[1]) && o[0] > last);

    let mut sse = SseClient::connect(&app.address, "topics=product.price.*", Some(last))
        .await
        .unwrap();
    let sse_missed = sse.updates(5, T).await;
    let sse_ids: Vec<u64> = sse_missed.iter().map(|e| e.id.unwrap()).collect();
    assert_eq!(sse_ids, o, "SSE resumes with Last-Event-ID to the same updates");

    // Then live, once each.
    p.event(3, "price", 300, 1).await;
    let live = ws.updates(1, T).await;
    assert_eq!(live[0]["data"]["product_id"], 3);
    assert_eq!(sse.updates(1, T).await[0].data["product_id"], 3);
    assert!(app.metric("gateway_resumes_total", "memory").await >= 2.0);
    app.stop().await;
}

#[actix_rt::test]
async fn two_instances_serve_every_update_and_clients_can_move_between_them() {
    let iso = Isolation::new().await;
    let a = spawn_with(iso.clone(), iso.settings()).await;
    let b = spawn_with(iso.clone(), iso.settings()).await;
    let mut on_a = WsClient::connect(&a.address).await;
    on_a.subscribe(&["product.#"], None, false).await;
    let mut on_b = WsClient::connect(&b.address).await;
    on_b.subscribe(&["product.#"], None, false).await;
    let mut mover = SseClient::connect(&a.address, "topics=product.%23", None)
        .await
        .unwrap();

    let p = TestPublisher::connect(&iso).await;
    let events: Vec<(i64, &str, i64, i64)> = (1..=10).map(|i| (i, "price", 100 * i, 1)).collect();
    p.burst(&events).await;
    let from_a = offsets(&on_a.updates(10, T).await);
    let from_b = offsets(&on_b.updates(10, T).await);
    assert_eq!(from_a, from_b, "both instances deliver the same updates");

    let first = mover.updates(4, T).await;
    let last = first[3].id.unwrap();
    drop(mover);
    let mut moved = SseClient::connect(&b.address, "topics=product.%23", Some(last))
        .await
        .unwrap();
    let rest: Vec<u64> = moved.updates(6, T).await.iter().map(|e| e.id.unwrap()).collect();
    let mut all: Vec<u64> = first.iter().map(|e| e.id.unwrap()).collect();
    all.extend(rest);
    assert_eq!(all, from_a, "moving to the other instance misses nothing");
    a.stop().await;
    b.stop().await;
}

/// A client's view of the catalog: product id → (price, price_version,
/// stock, stock_version), from a snapshot and then updates.
struct View(HashMap<i64, [i64; 4]>);

impl View {
    fn of_snapshot(snapshot: &Value) -> View {
        let mut view = HashMap::new();
        for p in snapshot["products"].as_array().unwrap() {
            let g = |k: &str| p[k].as_i64().unwrap();
            let row = [g("price_cents"), g("price_version"), g("stock"), g("stock_version")];
            assert!(
                view.insert(g("product_id"), row).is_none(),
                "a product once in a snapshot: {p}"
            );
        }
        View(view)
    }

    /// Applies one update's data, which must be newer than what the view has.
    fn apply(&mut self, d: &Value, transport: &str) {
        let entry = self.0.get_mut(&d["product_id"].as_i64().unwrap()).unwrap();
        let (value, version) = if d["kind"] == "price" { (0, 1) } else { (2, 3) };
        let v = d["version"].as_i64().unwrap();
        assert!(
            v > entry[version],
            "{transport}: no duplicate or stale update after the snapshot: {d}"
        );
        entry[version] = v;
        entry[value] = d[if d["kind"] == "price" { "price_cents" } else { "stock" }]
            .as_i64()
            .unwrap();
    }
}

#[actix_rt::test]
async fn snapshot_in_parts_then_updates_under_a_running_generator_equals_the_database() {
    // Seven products a part: the 50-product catalog comes in eight parts,
    // read one page at a time while the generator changes it.
    let app = testkit::spawn_app_with(|s| s.hub.snapshot_part_products = 7).await;
    snapshot_then_updates_under_the_generator_equal_the_database(&app).await;
    app.stop().await;
}

/// A WebSocket and an SSE client take a snapshot of the whole catalog (in
/// parts of `hub.snapshot_part_products` = 7) while the generator runs,
/// then its updates: no update they already hold comes again, none is
/// missing, and both end equal to the primary database.
pub(crate) async fn snapshot_then_updates_under_the_generator_equal_the_database(app: &testkit::TestApp) {
    app.admin(
        Method::POST,
        "/admin/generator",
        Some(serde_json::json!({"running": true, "rate": 150})),
    )
    .await;
    eventually(T, "generator running", || async {
        (app.metric("gateway_updates_broadcast_total", "").await >= 20.0).then_some(())
    })
    .await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.#"], "snapshot": true}))
        .await;
    let mut sse = SseClient::connect(&app.address, "topics=product.%23&snapshot=true", None)
        .await
        .unwrap();
    let ws_snap = ws.snapshot(T).await;
    let (sse_id, sse_snap) = sse.snapshot(T).await;
    assert_eq!(ws_snap["parts"], 8, "50 products in parts of 7");
    assert_eq!(sse_snap["parts"], 8);
    assert_eq!(
        sse_id,
        sse_snap["offset"].as_u64(),
        "snapshot_end's id is where updates resume"
    );
    let mut ws_view = View::of_snapshot(&ws_snap);
    let mut sse_view = View::of_snapshot(&sse_snap);
    assert_eq!(ws_view.0.len(), 50);
    assert_eq!(sse_view.0.len(), 50);
    let (mut ws_applied, mut sse_applied) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut stopped = false;
    // A transport is done once the generator stopped and it was quiet for 2 s.
    let (mut ws_seen, mut sse_seen) = (tokio::time::Instant::now(), tokio::time::Instant::now());
    let quiet = |seen: tokio::time::Instant| stopped_at_least(seen, Duration::from_secs(2));
    loop {
        let (ws_done, sse_done) = (stopped && quiet(ws_seen), stopped && quiet(sse_seen));
        if ws_done && sse_done {
            break;
        }
        if !stopped && tokio::time::Instant::now() > deadline {
            app.admin(
                Method::POST,
                "/admin/generator",
                Some(serde_json::json!({"running": false})),
            )
            .await;
            stopped = true;
            (ws_seen, sse_seen) = (tokio::time::Instant::now(), tokio::time::Instant::now());
        }
        if !ws_done {
            match ws.next(Duration::from_millis(100)).await {
                Some(testkit::clients::WsEvent::Json(u)) if u["type"] == "update" => {
                    ws_view.apply(&u["data"], "ws");
                    ws_applied += 1;
                    ws_seen = tokio::time::Instant::now();
                }
                Some(testkit::clients::WsEvent::Json(_)) | None => {}
                Some(other) => panic!("ws: {other:?}"),
            }
        }
        if !sse_done {
            match sse.next(Duration::from_millis(100)).await {
                Some(e) if e.event == "price" || e.event == "stock" => {
                    sse_view.apply(&e.data, "sse");
                    sse_applied += 1;
                    sse_seen = tokio::time::Instant::now();
                }
                Some(_) => {}
                None => assert!(!sse.ended, "the SSE stream ended"),
            }
        }
    }
    println!("after a snapshot in 8 parts: {ws_applied} updates on WebSocket, {sse_applied} on SSE");
    assert!(ws_applied > 50, "ws: updates flowed after the snapshot: {ws_applied}");
    assert!(
        sse_applied > 50,
        "sse: updates flowed after the snapshot: {sse_applied}"
    );
    // The write pool: the primary, also when client reads go to a replica.
    let products = product_gateway::store::catalog::list(&app.state.db, 0, 1000, None)
        .await
        .unwrap();
    assert_eq!(products.len(), 50);
    for p in products {
        let want = [p.price_cents, p.price_version, p.stock, p.stock_version];
        assert_eq!(ws_view.0[&p.id], want, "ws: product {}", p.id);
        assert_eq!(sse_view.0[&p.id], want, "sse: product {}", p.id);
    }
}

#[actix_rt::test]
async fn a_snapshot_asked_while_another_is_sent_is_refused_as_busy_and_the_first_completes() {
    // One product a part: the first snapshot is still going out when the
    // second subscribe arrives right behind it.
    let app = testkit::spawn_app_with(|s| s.hub.snapshot_part_products = 1).await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.price.*"], "snapshot": true}))
        .await;
    ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.stock.*"], "snapshot": true}))
        .await;
    let (mut gathered, mut refused, mut whole) = (testkit::clients::Snapshot::default(), None, None);
    while whole.is_none() || refused.is_none() {
        let frame = ws.json(T).await;
        match frame["type"].as_str() {
            Some("snapshot" | "snapshot_end") => whole = whole.or(gathered.take(&frame)),
            Some("error") => refused = Some(frame),
            _ => {}
        }
    }
    let refused = refused.unwrap();
    assert_eq!(refused["code"], "busy", "{refused}");
    assert_eq!(whole.unwrap()["products"].as_array().unwrap().len(), 50);
    // Asked again once the first has ended, it is served.
    ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.stock.*"], "snapshot": true}))
        .await;
    assert_eq!(ws.snapshot(T).await["parts"], 50);
    app.stop().await;
}

#[actix_rt::test]
async fn frames_written_back_to_back_are_not_held_for_the_clients_ack() {
    // A subscribe's answer is three frames written one after another
    // (`subscribed`, a part, `snapshot_end`); with Nagle's algorithm on the
    // server's socket the later ones wait for the client's delayed ACK,
    // 40 ms or more each time.
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app.address).await;
    let mut took = Vec::new();
    for _ in 0..15 {
        let started = std::time::Instant::now();
        ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.*.5"], "snapshot": true}))
            .await;
        ws.snapshot(T).await;
        took.push(started.elapsed());
    }
    took.sort();
    let median = took[took.len() / 2];
    println!(
        "subscribe to snapshot_end: median {median:?}, slowest {:?}",
        took[took.len() - 1]
    );
    assert!(median < Duration::from_millis(30), "median {median:?}: {took:?}");
    app.stop().await;
}

fn stopped_at_least(since: tokio::time::Instant, long: Duration) -> bool {
    since.elapsed() >= long
}

#[actix_rt::test]
async fn an_offset_older_than_retention_gets_an_explicit_reset() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    // A tiny stream: a few small segments, the oldest dropped quickly.
    settings.rabbit.topology.stream_max_length_bytes = 4_000;
    settings.rabbit.topology.stream_max_segment_size_bytes = 1_000;
    let app = spawn_with(iso.clone(), settings.clone()).await;
    let p = TestPublisher::connect(&iso).await;
    let events: Vec<(i64, &str, i64, i64)> = (1..=50)
        .flat_map(|id| [(id, "price", 100 + id, 1), (id, "stock", id, 1)])
        .collect();
    p.burst(&events).await;
    eventually(T, "all broadcast", || async {
        (app.metric("gateway_updates_broadcast_total", "").await >= 100.0).then_some(())
    })
    .await;
    // Retention runs when a segment rolls over: publish until the stream's
    // first offset has moved on.
    let mut version = 1;
    eventually(T, "retention dropped old segments", || {
        version += 1;
        let (p, iso, v) = (&p, &iso, version);
        async move {
            p.event(1, "price", 500 + v, v).await;
            (first_stream_offset(iso).await > 1).then_some(())
        }
    })
    .await;
    app.stop().await;
    // A fresh instance has nothing in memory: old offsets come from the stream.
    let app = spawn_with(iso.clone(), settings).await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.#"], Some(0), false).await;
    let reset = ws.next_of("reset", T).await;
    let first = reset["offset"].as_u64().unwrap();
    assert!(first > 1, "the stream no longer starts at offset 1: {reset}");
    let next = ws.updates(1, T).await;
    assert_eq!(
        next[0]["offset"].as_u64(),
        Some(first),
        "updates go on from the first kept offset"
    );
    app.stop().await;
}

/// Offset of the oldest message the stream still keeps.
async fn first_stream_offset(iso: &Isolation) -> u64 {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let conn = lapin::Connection::connect(&iso.amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(LongString::from("first")),
    );
    let mut consumer = channel
        .basic_consume(
            iso.settings().rabbit.topology.updates_stream.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .unwrap();
    let d = consumer.next().await.unwrap().unwrap();
    match d.properties.headers().as_ref().unwrap().inner().get("x-stream-offset") {
        Some(AMQPValue::LongLongInt(n)) => *n as u64,
        other => panic!("no offset: {other:?}"),
    }
}

#[actix_rt::test]
async fn resubscribing_a_pattern_with_a_snapshot_returns_its_products() {
    let app = spawn_app().await;
    let p = TestPublisher::connect(&app.iso).await;
    p.event(3, "price", 300, 1).await;
    p.event(4, "stock", 4, 1).await;
    eventually(T, "events broadcast", || async {
        (app.metric("gateway_updates_broadcast_total", "").await >= 2.0).then_some(())
    })
    .await;
    let snapshot_ids = |v: &Value| -> Vec<i64> {
        let mut ids: Vec<i64> = v["products"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["product_id"].as_i64().unwrap())
            .collect();
        ids.sort();
        ids
    };
    let mut fresh = WsClient::connect(&app.address).await;
    fresh
        .subscribe(&["product.price.*", "product.stock.4"], None, true)
        .await;
    let want = fresh.snapshot(T).await;

    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.price.*"], None, false).await;
    ws.subscribe(&["product.price.*", "product.stock.4"], None, true).await;
    let got = ws.snapshot(T).await;
    println!(
        "fresh snapshot {:?}, re-subscribed snapshot {:?}",
        snapshot_ids(&want),
        snapshot_ids(&got)
    );
    assert!(snapshot_ids(&want).contains(&3) && snapshot_ids(&want).contains(&4));
    assert_eq!(snapshot_ids(&got), snapshot_ids(&want));
    assert_eq!(got["products"], want["products"]);
    app.stop().await;
}

#[actix_rt::test]
async fn a_second_resume_on_one_connection_keeps_the_first_ones_updates() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    // Almost no memory: resumes read the stream, which takes a while to open.
    settings.hub.history = 1;
    let app = spawn_with(iso, settings).await;
    let p = TestPublisher::connect(&app.iso).await;
    let mut probe = WsClient::connect(&app.address).await;
    probe.subscribe(&["product.price.40"], None, false).await;
    p.event(40, "price", 1, 1).await;
    let since = probe.updates(1, T).await[0]["offset"].as_u64().unwrap();
    let events: Vec<(i64, &str, i64, i64)> = (1..=10)
        .flat_map(|id| [(id, "price", 100 + id, 1), (id, "stock", id, 1)])
        .collect();
    p.burst(&events).await;
    eventually(T, "all broadcast", || async {
        (app.metric("gateway_updates_broadcast_total", "").await >= 21.0).then_some(())
    })
    .await;

    // Two resumes back to back: the second arrives while the first's stream
    // reader is still opening.
    let mut ws = WsClient::connect(&app.address).await;
    ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.price.*"], "since": since}))
        .await;
    ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.stock.*", "product.price.3"], "since": since}))
        .await;
    let mut got = Vec::new();
    while let Some(testkit::clients::WsEvent::Json(v)) = ws.next(Duration::from_secs(3)).await {
        if v["type"] == "update" {
            got.push(v);
        }
    }
    let per_kind = |kind: &str| -> Vec<i64> {
        got.iter()
            .filter(|u| u["topic"].as_str().unwrap().starts_with(kind))
            .map(|u| u["data"]["product_id"].as_i64().unwrap())
            .collect()
    };
    println!(
        "updates after two resumes: {} (prices {:?}, stocks {:?})",
        got.len(),
        per_kind("product.price"),
        per_kind("product.stock")
    );
    let all: Vec<i64> = (1..=10).collect();
    assert_eq!(per_kind("product.price."), all, "every missed price, once, in order");
    assert_eq!(per_kind("product.stock."), all, "every missed stock, once, in order");

    // Then live, once each.
    p.event(1, "price", 500, 2).await;
    p.event(1, "stock", 50, 2).await;
    let live = topics(&ws.updates(2, T).await);
    assert_eq!(live.len(), 2);
    assert!(live.contains(&"product.price.1".to_owned()) && live.contains(&"product.stock.1".to_owned()));
    app.stop().await;
}

#[actix_rt::test]
async fn a_snapshot_of_named_products_reads_only_their_rows() {
    let app = spawn_app().await;
    let rows = || app.metric("gateway_snapshot_rows", "");
    let before = rows().await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.*.7", "product.price.9"], "snapshot": true}))
        .await;
    let snapshot = ws.snapshot(T).await;
    let ids: Vec<i64> = snapshot["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["product_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [7, 9]);
    let named = rows().await - before;
    // A pattern that leaves the product open reads the whole catalog, by pages.
    ws.send(serde_json::json!({"op": "subscribe", "topics": ["product.stock.*"], "snapshot": true}))
        .await;
    let all = ws.snapshot(T).await;
    let catalog = all["products"].as_array().unwrap().len() as f64;
    let open = rows().await - before - named;
    println!("rows read: {named} for two named products, {open} for product.stock.* over {catalog} products");
    assert_eq!(named, 2.0, "only the named rows are read");
    assert_eq!(open, catalog);
    assert!(catalog >= 50.0);
    app.stop().await;
}

/// Publishes one stream message as the outbox relay does: one price
/// update (`version`, 777 cents) of `product`, from outbox row `seq`.
async fn publish_to_stream(app: &testkit::TestApp, ch: &lapin::Channel, seq: i64, product: i64, version: i64) {
    use lapin::types::{AMQPValue, FieldTable};
    let exchange = &app.state.settings.rabbit.topology.updates_exchange;
    let body =
        format!(r#"[{{"product_id":{product},"kind":"price","price_cents":777,"version":{version},"ts_us":1}}]"#);
    let mut headers = FieldTable::default();
    headers.insert("x-outbox-seq".into(), AMQPValue::LongLongInt(seq));
    headers.insert("x-txid".into(), AMQPValue::LongLongInt(1));
    ch.basic_publish(
        exchange.as_str().into(),
        "product.updates.batch".into(),
        Default::default(),
        body.as_bytes(),
        lapin::BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[actix_rt::test]
async fn a_stream_message_published_again_reaches_clients_once() {
    // A memory of one update: a resume from before the copies reads them
    // back from the stream, through the catch-up reader.
    let app = testkit::spawn_app_with(|s| s.hub.history = 1).await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.price.*"], None, false).await;
    let conn = lapin::Connection::connect(&app.iso.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let publish = |seq: i64, product: i64| publish_to_stream(&app, &ch, seq, product, 9);
    publish(4241, 1).await;
    // What the outbox relay does when a node dies with its confirm in
    // flight: the same outbox row published twice.
    publish(4242, 3).await;
    publish(4242, 3).await;
    publish(4243, 5).await;
    let live = ws.updates(3, T).await;
    let products = |updates: &[Value]| -> Vec<i64> {
        updates
            .iter()
            .map(|u| u["data"]["product_id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(products(&live), [1, 3, 5], "live: the copy dropped");
    eventually(T, "the copy read and dropped", || async {
        (app.metric("gateway_stream_republished_total", "").await == 1.0).then_some(())
    })
    .await;
    if let Some(testkit::clients::WsEvent::Json(v)) = ws.next(Duration::from_millis(500)).await {
        assert_ne!(v["type"], "update", "broadcast twice: {v}");
    }

    let mut resumed = WsClient::connect(&app.address).await;
    let after_first = live[0]["offset"].as_u64().unwrap();
    resumed.subscribe(&["product.price.*"], Some(after_first), false).await;
    let replayed = resumed.updates(2, T).await;
    assert_eq!(products(&replayed), [3, 5], "read back: the copy dropped");
    if let Some(testkit::clients::WsEvent::Json(v)) = resumed.next(Duration::from_millis(500)).await {
        assert_ne!(v["type"], "update", "replayed twice: {v}");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn a_copy_read_back_without_its_original_never_follows_a_newer_version() {
    // A memory of one update: the resume reads the stream back.
    let app = testkit::spawn_app_with(|s| s.hub.history = 1).await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.price.4"], None, false).await;
    let conn = lapin::Connection::connect(&app.iso.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    // Row 51 (version 5) published, then row 52 (version 6), then row 51
    // again: its confirm was lost, and the relay published it once more.
    publish_to_stream(&app, &ch, 51, 4, 5).await;
    publish_to_stream(&app, &ch, 52, 4, 6).await;
    publish_to_stream(&app, &ch, 51, 4, 5).await;
    // Another product's update: the memory of one holds it, so the resume
    // below is read back from the stream.
    publish_to_stream(&app, &ch, 53, 8, 1).await;
    let live = ws.updates(2, T).await;
    let versions =
        |updates: &[Value]| -> Vec<i64> { updates.iter().map(|u| u["data"]["version"].as_i64().unwrap()).collect() };
    assert_eq!(versions(&live), [5, 6]);
    // A client that has version 6 resumes: it is read back from the stream
    // from the message after version 6's, where the copy is the next
    // update of its product, and its original lies before the read.
    let mut resumed = WsClient::connect(&app.address).await;
    resumed
        .subscribe(&["product.price.4"], live[1]["offset"].as_u64(), false)
        .await;
    publish_to_stream(&app, &ch, 54, 4, 7).await;
    assert_eq!(
        versions(&resumed.updates(1, T).await),
        [7],
        "no older version after the newer one"
    );
    assert_eq!(versions(&ws.updates(1, T).await), [7], "live: the copy not broadcast");
    app.stop().await;
}
