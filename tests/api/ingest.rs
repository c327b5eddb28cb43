//! The ingest API end to end: a change posted by an upstream system is
//! confirmed by the broker (202), applied, and delivered to subscribers;
//! idempotency keys, validation and the service token.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::clients::{SseClient, WsClient};
use testkit::{eventually, spawn_app, spawn_app_with};

const T: Duration = Duration::from_secs(20);

#[actix_rt::test]
async fn a_posted_change_is_confirmed_applied_and_delivered() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.price.3"], None, false).await;
    let mut sse = SseClient::connect(&app.address, "topics=product.stock.3", None)
        .await
        .unwrap();
    let before = app.product(3).await;

    let (status, price, _) = app.ingest("price", 3, json!({ "price_cents": 4242 }), None).await;
    assert_eq!(status, 202, "{price}");
    assert_eq!(price["topic"], "product.price.3");
    assert_eq!(price["value"], 4242);
    let version = price["version"].as_i64().unwrap();
    assert!(
        version > before["price_version"].as_i64().unwrap(),
        "{price} after {before}"
    );
    let (status, stock, _) = app.ingest("stock", 3, json!({ "stock": 17 }), None).await;
    assert_eq!((status, &stock["topic"]), (202, &json!("product.stock.3")), "{stock}");

    let update = ws.next_of("update", T).await;
    assert_eq!(update["data"]["price_cents"], 4242, "{update}");
    assert_eq!(update["data"]["version"], version);
    let e = &sse.updates(1, T).await[0];
    assert_eq!(
        (e.data["stock"].as_i64(), e.data["version"].as_i64()),
        (Some(17), stock["version"].as_i64())
    );
    let p = app.product(3).await;
    assert_eq!(
        (p["price_cents"].as_i64(), p["price_version"].as_i64()),
        (Some(4242), Some(version))
    );
    assert_eq!(p["stock"], 17);
    assert_eq!(app.metric("gateway_ingest_requests_total", "accepted").await, 2.0);
    app.stop().await;
}

/// A retry under `key` as a client makes it: told busy (another attempt
/// is being admitted at that moment), it comes back a moment later.
async fn retried(app: &testkit::TestApp, kind: &str, id: i64, body: Value, key: &str) -> (u16, Value, bool) {
    for _ in 0..100 {
        let answer = app.ingest(kind, id, body.clone(), Some(key)).await;
        if !(answer.0 == 503 && answer.1["code"] == "busy") {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("still busy after 2 s of retries under {key}");
}

#[actix_rt::test]
async fn a_repeated_idempotency_key_returns_the_first_answer_and_publishes_once() {
    let app = spawn_app().await;
    let body = json!({ "price_cents": 1999 });
    let (status, first, replayed) = app.ingest("price", 5, body.clone(), Some("order-77-reprice")).await;
    assert_eq!((status, replayed), (202, false), "{first}");
    let (status, again, replayed) = retried(&app, "price", 5, body.clone(), "order-77-reprice").await;
    assert_eq!((status, replayed), (202, true), "{again}");
    assert_eq!(again, first, "the first answer, message id included");

    // The same key for another request is a conflict, not a silent replay.
    let (status, other, _) = app
        .ingest("price", 5, json!({ "price_cents": 2999 }), Some("order-77-reprice"))
        .await;
    assert_eq!((status, other["code"].as_str()), (409, Some("conflict")), "{other}");

    // The replay issued no version: the next change gets the one after.
    let (_, next, _) = app.ingest("price", 5, json!({ "price_cents": 2100 }), None).await;
    assert_eq!(
        next["version"].as_i64(),
        first["version"].as_i64().map(|v| v + 1),
        "{next}"
    );

    // Retries racing each other: one version issued, every answer the same
    // or "retry in a moment".
    let tries = (0..6).map(|_| app.ingest("stock", 5, json!({ "stock": 3 }), Some("restock-5")));
    let answers = futures_util::future::join_all(tries).await;
    let versions: std::collections::HashSet<i64> = answers
        .iter()
        .filter(|(s, _, _)| *s == 202)
        .map(|(_, a, _)| a["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions.len(), 1, "{answers:?}");
    assert!(answers.iter().all(|(s, _, _)| *s == 202 || *s == 503), "{answers:?}");
    eventually(T, "the price applied", || async {
        (app.product(5).await["price_cents"] == 2100).then_some(())
    })
    .await;
    assert_eq!(
        app.metric("gateway_ingest_requests_total", "replayed").await as usize,
        1 + answers.iter().filter(|a| a.2).count()
    );
    app.stop().await;
}

#[actix_rt::test]
async fn bad_ingest_calls_get_4xx_json_and_publish_nothing() {
    let app = spawn_app().await;
    let before = app.product(1).await;
    let cases: [(&str, i64, Value, Option<&str>, u16); 8] = [
        ("price", 0, json!({ "price_cents": 100 }), None, 400),
        ("price", 999_999, json!({ "price_cents": 100 }), None, 404),
        ("price", 1, json!({ "price_cents": 0 }), None, 400),
        ("price", 1, json!({ "price_cents": 100_000_000_000i64 }), None, 400),
        ("stock", 1, json!({ "stock": -1 }), None, 400),
        ("stock", 1, json!({ "stock": 1, "price_cents": 5 }), None, 400),
        ("stock", 1, json!({ "stock": "ten" }), None, 400),
        ("stock", 1, json!({ "stock": 1 }), Some(&"k".repeat(300)), 400),
    ];
    for (kind, id, body, key, want) in cases {
        let (status, answer, _) = app.ingest(kind, id, body.clone(), key).await;
        assert_eq!(status, want, "{kind} {id} {body}: {answer}");
        assert!(answer["code"].is_string() && answer["message"].is_string(), "{answer}");
    }
    let url = app.url("/products/1/price");
    for auth in [None, Some("Bearer wrong-token"), Some("Basic Zm9vOmJhcg==")] {
        let mut req = app.client().post(&url);
        if let Some(a) = auth {
            req = req.insert_header(("Authorization", a));
        }
        let mut res = req.send_json(&json!({ "price_cents": 100 })).await.unwrap();
        let body: Value = res.json().await.unwrap();
        assert_eq!(
            (res.status().as_u16(), body["code"].as_str()),
            (401, Some("unauthorized")),
            "{auth:?}"
        );
    }
    // A product whose prices have used every version refuses a price,
    // with a conflict, and still takes a stock change.
    app.sql(&format!(
        "UPDATE products SET price_issued = {} WHERE id = 2",
        product_gateway::domain::MAX_VERSION
    ))
    .await;
    let (status, answer, _) = app
        .ingest("price", 2, json!({ "price_cents": 100 }), Some("bound-1"))
        .await;
    assert_eq!((status, answer["code"].as_str()), (409, Some("conflict")), "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("another version"),
        "{answer}"
    );
    assert_eq!(app.metric("gateway_ingest_requests_total", "accepted").await, 0.0);
    let (status, answer, _) = app.ingest("stock", 2, json!({ "stock": 3 }), None).await;
    assert_eq!(status, 202, "{answer}");
    // No refused call issued a version: the next good one takes the next.
    let (status, ok, _) = app.ingest("price", 1, json!({ "price_cents": 100 }), None).await;
    assert_eq!(status, 202, "{ok}");
    assert_eq!(
        ok["version"].as_i64(),
        before["price_version"].as_i64().map(|v| v + 1),
        "{ok} after {before}"
    );
    app.stop().await;

    // Without a configured token the API is off for everyone.
    let off = spawn_app_with(|s| s.ingest.token = product_gateway::settings::Secret::new("")).await;
    let (status, answer, _) = off.ingest("price", 1, json!({ "price_cents": 100 }), None).await;
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("ingest.token is not set"),
        "{answer}"
    );
    off.stop().await;
}

#[actix_rt::test]
async fn a_retry_after_a_failed_publish_sends_the_version_already_issued_and_applies_once() {
    let app = spawn_app().await;
    // Where the product's versions stand.
    let (_, base, _) = app.ingest("price", 8, json!({ "price_cents": 700 }), None).await;
    let base = base["version"].as_i64().unwrap();

    app.route_prices(false).await;
    let body = json!({ "price_cents": 777 });
    let (status, refused, _) = app.ingest("price", 8, body.clone(), Some("reprice-8")).await;
    assert_eq!(status, 503, "{refused}");
    app.route_prices(true).await;

    // The retry publishes the event the first attempt issued and stored,
    // and says it issued nothing new.
    let (status, accepted, replayed) = app.ingest("price", 8, body.clone(), Some("reprice-8")).await;
    assert_eq!((status, replayed), (202, true), "{accepted}");
    assert_eq!(
        accepted["version"].as_i64(),
        Some(base + 1),
        "the version the failed attempt issued, not a newer one: {accepted}"
    );
    eventually(T, "the change applied", || async {
        (app.product(8).await["price_cents"] == 777).then_some(())
    })
    .await;
    // Nothing else was issued: the next change takes the version after.
    let (_, next, _) = app.ingest("price", 8, json!({ "price_cents": 778 }), None).await;
    assert_eq!(next["version"].as_i64(), Some(base + 2), "{next}");
    // And a replay of the key answers what the retry answered, without
    // publishing: the change is applied (with prices unroutable a publish
    // would be refused).
    app.route_prices(false).await;
    let (status, again, replayed) = retried(&app, "price", 8, body, "reprice-8").await;
    assert_eq!((status, replayed, &again), (202, true, &accepted));
    app.stop().await;
}

/// With prices unroutable and stock routed, many changes of both in flight
/// at once on the instance's one confirm channel: no price change is
/// accepted (none reached a queue), and every accepted stock change is
/// applied. The broker's returns name no delivery tag, so a return read
/// beside another message's ack must not be taken for that message's.
#[actix_rt::test]
async fn with_one_kind_unroutable_no_change_is_accepted_that_reached_no_queue() {
    let app = spawn_app().await;
    // The instance's broker link is opened (and the topology declared) by
    // its first change, before prices are unbound.
    let (status, first, _) = app.ingest("stock", 1, json!({ "stock": 1 }), None).await;
    assert_eq!(status, 202, "{first}");
    app.route_prices(false).await;
    let shared = &app;
    let mut answers = Vec::new();
    for round in 0..4_i64 {
        let asks = (1..=50_i64).flat_map(|id| {
            [
                ("price", id, json!({ "price_cents": 5000 + id })),
                ("stock", id, json!({ "stock": 500 + round * 100 + id })),
            ]
        });
        answers.extend(
            futures_util::future::join_all(asks.map(|(kind, id, body)| async move {
                let status = shared.ingest(kind, id, body.clone(), None).await.0;
                (kind, id, body, status)
            }))
            .await,
        );
    }
    let accepted_prices: Vec<i64> = answers
        .iter()
        .filter(|(kind, _, _, status)| *kind == "price" && *status == 202)
        .map(|(_, id, _, _)| *id)
        .collect();
    let refused_stock = answers
        .iter()
        .filter(|(kind, _, _, status)| *kind == "stock" && *status != 202)
        .count();
    println!(
        "price changes accepted: {} of 200, stock changes refused: {refused_stock} of 200",
        accepted_prices.len()
    );
    assert!(
        accepted_prices.is_empty(),
        "price changes accepted although no queue took them: products {accepted_prices:?}"
    );
    let other: Vec<u16> = answers
        .iter()
        .filter(|(kind, _, _, status)| *kind == "price" && *status != 503)
        .map(|a| a.3)
        .collect();
    assert!(other.is_empty(), "price changes answered other than 503: {other:?}");
    // A stock change refused may still have reached its queue (its fate
    // unknown, it is refused rather than lost); one accepted is applied.
    for id in 1..=50_i64 {
        let last_accepted = answers
            .iter()
            .filter(|(kind, i, _, status)| *kind == "stock" && *i == id && *status == 202)
            .map(|(_, _, body, _)| body["stock"].clone())
            .next_back();
        if let Some(stock) = last_accepted {
            eventually(T, "the last accepted stock change applied or overtaken", || async {
                (app.product(id).await["stock"].as_i64() >= stock.as_i64()).then_some(())
            })
            .await;
        }
    }
    app.stop().await;
}

#[actix_rt::test]
async fn concurrent_changes_get_unique_versions_in_batches_and_each_its_own_answer() {
    let app = spawn_app().await;
    let base_price = app.product(5).await["price_version"].as_i64().unwrap();
    let base_stock = app.product(6).await["stock_version"].as_i64().unwrap();
    let asks = (0..20)
        .map(|i| ("price", 5, json!({ "price_cents": 1000 + i }), None))
        .chain((0..20).map(|i| ("stock", 6, json!({ "stock": i }), None)))
        .chain((0..5).map(|_| ("price", 999_999, json!({ "price_cents": 1 }), None)))
        .chain((0..5).map(|_| ("price", 7, json!({ "price_cents": 777 }), Some("same-key"))));
    let shared = &app;
    let answers = futures_util::future::join_all(
        asks.map(|(kind, id, body, key)| async move { (kind, id, shared.ingest(kind, id, body, key).await) }),
    )
    .await;
    let versions_of = |kind: &str, id: i64| {
        let mut v: Vec<i64> = answers
            .iter()
            .filter(|(k, i, _)| *k == kind && *i == id)
            .map(|(_, _, (status, body, _))| {
                assert_eq!(*status, 202, "{body}");
                body["version"].as_i64().unwrap()
            })
            .collect();
        v.sort();
        v
    };
    // Every change of one product has a version of its own, none skipped.
    assert_eq!(
        versions_of("price", 5),
        (base_price + 1..=base_price + 20).collect::<Vec<_>>()
    );
    assert_eq!(
        versions_of("stock", 6),
        (base_stock + 1..=base_stock + 20).collect::<Vec<_>>()
    );
    let missing: Vec<u16> = answers
        .iter()
        .filter(|(_, id, _)| *id == 999_999)
        .map(|(_, _, (s, _, _))| *s)
        .collect();
    assert_eq!(missing, [404; 5], "a missing product fails alone");
    // One key, five at once: one publishes; the others are told to retry
    // in a moment (503 busy) or get its answer.
    let keyed: Vec<&(u16, Value, bool)> = answers
        .iter()
        .filter(|(_, id, _)| *id == 7)
        .map(|(_, _, a)| a)
        .collect();
    let published: Vec<_> = keyed.iter().filter(|(s, _, replayed)| *s == 202 && !replayed).collect();
    assert_eq!(published.len(), 1, "{keyed:?}");
    let version = published[0].1["version"].clone();
    for (status, body, replayed) in &keyed {
        assert!(
            (*status == 503 && body["code"] == "busy") || (*status == 202 && (!replayed || body["version"] == version)),
            "{status} {body}"
        );
    }
    // The newest of each is applied.
    eventually(T, "the last versions applied", || async {
        let (p, s) = (app.product(5).await, app.product(6).await);
        (p["price_version"].as_i64() == Some(base_price + 20) && s["stock_version"].as_i64() == Some(base_stock + 20))
            .then_some(())
    })
    .await;
    app.stop().await;
}

#[actix_rt::test]
async fn two_instances_issue_one_products_versions_without_a_collision() {
    let iso = testkit::Isolation::new().await;
    let a = testkit::spawn_with(iso.clone(), iso.settings()).await;
    let b = testkit::spawn_with(iso.clone(), iso.settings()).await;
    let base = a.product(4).await["price_version"].as_i64().unwrap();
    let (on_a, on_b) = (&a, &b);
    let answers = futures_util::future::join_all((0..40).map(|i| async move {
        let app = if i % 2 == 0 { on_a } else { on_b };
        app.ingest("price", 4, json!({ "price_cents": 2000 + i }), None).await
    }))
    .await;
    let mut versions: Vec<i64> = answers
        .iter()
        .map(|(status, body, _)| {
            assert_eq!(*status, 202, "{body}");
            body["version"].as_i64().unwrap()
        })
        .collect();
    versions.sort();
    assert_eq!(
        versions,
        (base + 1..=base + 40).collect::<Vec<_>>(),
        "unique, none skipped"
    );
    eventually(T, "the newest version applied", || async {
        (a.product(4).await["price_version"].as_i64() == Some(base + 40)).then_some(())
    })
    .await;
    b.stop().await;
    a.stop().await;
}

/// A plan made from statistics taken while the keys' table was nearly
/// empty (a scan is then the cheapest way to read it) reads it whole once
/// it has grown, and the table grows far faster than its statistics;
/// admission, a prepared statement, also keeps its plan. The keys must
/// still be found through their index, never by reading the whole table
/// for each batch.
#[actix_rt::test]
async fn admission_is_prepared_and_finds_keys_by_index_however_the_table_grew() {
    // One pooled connection: the statements it prepared are the ones this
    // test's queries see.
    let app = spawn_app_with(|s| s.database.pool_size = 1).await;
    // Enough keyed requests, one at a time, for the connection to settle on
    // a cached plan for the table as it is now: nearly empty, and analyzed
    // so (as autovacuum does early in a table's life).
    for i in 0..120 {
        if i == 20 {
            app.sql("ANALYZE ingest_keys").await;
        }
        let key = format!("small-{i}");
        let (status, answer, _) = app
            .ingest("price", 1 + i % 7, json!({ "price_cents": 100 + i }), Some(&key))
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    // Then a day's keys, with no statistics refreshed since.
    app.sql(
        "INSERT INTO ingest_keys (key, request, version, message_id) \
         SELECT 'earlier-' || g, 'price:1:100', 1, 'm-' || g FROM generate_series(1, 200000) g",
    )
    .await;
    const SCANS: &str = "SELECT seq_scan AS v FROM pg_stat_user_tables WHERE relname = 'ingest_keys'";
    const PROBES: &str = "SELECT idx_scan AS v FROM pg_stat_user_tables WHERE relname = 'ingest_keys'";
    let (scans, probes) = (app.sql_i64(SCANS).await, app.sql_i64(PROBES).await);
    for i in 0..40 {
        let key = format!("large-{i}");
        let (status, answer, _) = app.ingest("stock", 1 + i % 7, json!({ "stock": i }), Some(&key)).await;
        assert_eq!(status, 202, "{answer}");
    }
    // Every request probed the index at least once (its key's insert);
    // once the statistics show those probes, they show any scan too.
    eventually(T, "the keys' probes counted", || async {
        (app.sql_i64(PROBES).await >= probes + 40).then_some(())
    })
    .await;
    let scanned = app.sql_i64(SCANS).await - scans;
    assert_eq!(scanned, 0, "40 keyed requests scanned the 200,000 keys {scanned} times");
    // And every batch ran the one statement the connection prepared.
    const ADMISSION: &str = "FROM pg_prepared_statements WHERE statement LIKE 'WITH ask AS%'";
    let prepared = app.sql_i64(&format!("SELECT COUNT(*)::int8 AS v {ADMISSION}")).await;
    let runs = app
        .sql_i64(&format!(
            "SELECT COALESCE(SUM(generic_plans + custom_plans), 0)::int8 AS v {ADMISSION}"
        ))
        .await;
    assert_eq!(
        (prepared, runs),
        (1, 160),
        "admission prepared once, run for each of 160 requests"
    );
    app.stop().await;
}
