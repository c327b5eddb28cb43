//! The event pipeline against the real broker and database: generator →
//! exchange → quorum queues → idempotent apply, dead letters and recovery.

use std::time::Duration;

use awc::http::Method;
use testkit::{TestApp, TestPublisher, eventually, spawn_app, spawn_app_with};

/// Stops the generator and waits until every issued version was confirmed
/// and applied: then the catalog holds the newest version of everything.
async fn drain_generator(app: &TestApp) -> (i64, f64) {
    let (status, _) = app.generator(false, None).await;
    assert_eq!(status, 200);
    eventually(
        Duration::from_secs(60),
        "every issued event confirmed and applied",
        || async {
            let issued = issued_versions(app).await;
            let confirmed = app.metric("gateway_events_confirmed_total", "").await;
            let pending = pending_versions(app).await;
            (issued > 0 && confirmed as i64 == issued && pending == 0).then_some((issued, confirmed))
        },
    )
    .await
}

/// Starts the generator at `rate` events/s and waits until `applied`
/// events are applied.
async fn generator_applying(app: &TestApp, rate: u32, applied: f64) {
    let (status, _) = app.generator(true, Some(rate)).await;
    assert_eq!(status, 200);
    eventually(Duration::from_secs(30), "events flowing", || async {
        (app.metric("gateway_events_applied_total", "").await >= applied).then_some(())
    })
    .await;
}

async fn issued_versions(app: &TestApp) -> i64 {
    app.sql_i64("SELECT COALESCE(SUM(price_issued + stock_issued), 0)::int8 AS v FROM products")
        .await
}

/// Products whose applied version lags the last issued one.
async fn pending_versions(app: &TestApp) -> i64 {
    app.sql_i64(
        "SELECT COUNT(*)::int8 AS v FROM products WHERE price_version <> price_issued OR stock_version <> stock_issued",
    )
    .await
}

#[actix_rt::test]
async fn generated_events_are_confirmed_and_applied() {
    let app = spawn_app().await;
    let (status, body) = app.generator(true, Some(200)).await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(30), "some events applied", || async {
        (app.metric("gateway_events_applied_total", "").await >= 50.0).then_some(())
    })
    .await;
    let (issued, confirmed) = drain_generator(&app).await;
    assert!(issued >= 50);
    assert_eq!(confirmed as i64, issued);
    assert!(app.dead_letters().await.is_empty());
    let changed = app
        .sql_i64("SELECT COUNT(*)::int8 AS v FROM products WHERE price_version > 0 OR stock_version > 0")
        .await;
    assert!(changed > 10, "many products changed: {changed}");
    app.stop().await;
}

/// The pipeline's statements are prepared once per connection and planned
/// from PostgreSQL's plan cache (a statement sent as unnamed text is parsed
/// and planned again on every batch), and the cached plan of the apply
/// update looks each product up by index rather than comparing every pair
/// of rows in a batch.
#[actix_rt::test]
async fn apply_and_outbox_statements_are_prepared_once_and_cached_plans_stay_linear() {
    const PRODUCTS: i64 = 500;
    // One pooled connection, so the statements the pipeline prepared are
    // the ones this test's session can see.
    let app = spawn_app_with(|s| {
        s.database.pool_size = 1;
        s.seed.products = PRODUCTS as u32;
    })
    .await;
    let publisher = TestPublisher::connect(&app.iso).await;
    for version in 1..=3 {
        publisher.event(5, "price", 500 + version, version).await;
        eventually(Duration::from_secs(20), "the event applied and relayed", || async {
            let applied = app.metric("gateway_events_applied_total", "price").await;
            let relayed = app.metric("gateway_updates_broadcast_total", "").await;
            (applied as i64 == version && relayed as i64 >= version).then_some(())
        })
        .await;
    }
    // (prepared statements, executions) whose text starts with `prefix`.
    let prepared = |prefix: &'static str| {
        let app = &app;
        async move {
            let sql = format!("FROM pg_prepared_statements WHERE statement LIKE '{prefix}%'");
            let count = app.sql_i64(&format!("SELECT COUNT(*)::int8 AS v {sql}")).await;
            let runs = app
                .sql_i64(&format!(
                    "SELECT COALESCE(SUM(generic_plans + custom_plans), 0)::int8 AS v {sql}"
                ))
                .await;
            (count, runs)
        }
    };
    // Each ran once per batch, on the one statement prepared for it.
    for prefix in [
        "SELECT id, price_version, stock_version FROM products",
        "UPDATE products p SET price_cents",
        "INSERT INTO update_outbox",
        "SELECT seq, message_id",
        "DELETE FROM update_outbox",
    ] {
        let (count, runs) = prepared(prefix).await;
        assert_eq!(count, 1, "one prepared statement for {prefix}");
        assert!(runs >= 3, "{prefix}: prepared once, run {runs} times");
    }

    // The apply update's text as the pipeline prepared it, planned as a
    // cached plan is (for ten input rows, whatever the batch), and run on
    // a whole catalog's batch in a transaction rolled back.
    #[derive(diesel::QueryableByName)]
    struct Text {
        #[diesel(sql_type = diesel::sql_types::Text)]
        statement: String,
    }
    #[derive(diesel::QueryableByName)]
    struct Plan {
        #[diesel(sql_type = diesel::sql_types::Json, column_name = "QUERY PLAN")]
        plan: serde_json::Value,
    }
    let mut conn = app.state.db.get().await.unwrap();
    let update: Text = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE 'UPDATE products p SET price_cents%'",
        ),
        &mut conn,
    )
    .await
    .unwrap();
    let list = |f: &dyn Fn(i64) -> i64| {
        format!(
            "'{{{}}}'",
            (1..=PRODUCTS).map(|i| f(i).to_string()).collect::<Vec<_>>().join(",")
        )
    };
    let setup = format!(
        "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
         PREPARE linear_probe(int8[], int8[], int8[]) AS {}",
        update.statement
    );
    diesel_async::SimpleAsyncConnection::batch_execute(&mut *conn, &setup)
        .await
        .unwrap();
    let plan: Result<Plan, _> = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query(format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE linear_probe({}, {}, {})",
            list(&|i| i),
            list(&|i| 1_000 + i),
            list(&|_| 1_000_000),
        )),
        &mut conn,
    )
    .await;
    diesel_async::SimpleAsyncConnection::batch_execute(&mut *conn, "ROLLBACK; DEALLOCATE linear_probe")
        .await
        .unwrap();
    let plan = plan.unwrap().plan;
    fn removed_by_join_filter(node: &serde_json::Value) -> i64 {
        let here = node["Rows Removed by Join Filter"].as_i64().unwrap_or(0);
        let below: i64 = node["Plans"]
            .as_array()
            .map(|plans| plans.iter().map(removed_by_join_filter).sum())
            .unwrap_or(0);
        here + below
    }
    let root = &plan[0]["Plan"];
    assert_eq!(
        removed_by_join_filter(root),
        0,
        "the cached plan compares rows pairwise: {plan:#}"
    );
    drop(conn);
    app.stop().await;
}

#[actix_rt::test]
async fn duplicate_delivery_does_not_double_apply() {
    let app = spawn_app().await;
    let publisher = TestPublisher::connect(&app.iso).await;
    publisher.event(4, "price", 4242, 1).await;
    publisher.event(4, "price", 4242, 1).await;
    eventually(Duration::from_secs(20), "both deliveries handled", || async {
        let applied = app.metric("gateway_events_applied_total", "price").await;
        let dup = app.metric("gateway_events_duplicate_total", "price").await;
        (applied + dup >= 2.0).then_some(())
    })
    .await;
    assert_eq!(app.metric("gateway_events_applied_total", "price").await, 1.0);
    assert_eq!(app.metric("gateway_events_duplicate_total", "price").await, 1.0);
    let p = app.product(4).await;
    assert_eq!(
        (p["price_cents"].as_i64(), p["price_version"].as_i64()),
        (Some(4242), Some(1))
    );
    app.stop().await;
}

#[actix_rt::test]
async fn stale_event_does_not_overwrite_newer_stock() {
    let app = spawn_app().await;
    let publisher = TestPublisher::connect(&app.iso).await;
    publisher.event(6, "stock", 500, 5).await;
    eventually(Duration::from_secs(20), "v5 applied", || async {
        (app.product(6).await["stock_version"] == 5).then_some(())
    })
    .await;
    publisher.event(6, "stock", 300, 3).await;
    publisher.event(6, "stock", 700, 7).await;
    eventually(Duration::from_secs(20), "v7 applied", || async {
        (app.product(6).await["stock_version"] == 7).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "stale v3 counted", || async {
        (app.metric("gateway_events_duplicate_total", "stock").await >= 1.0).then_some(())
    })
    .await;
    let p = app.product(6).await;
    assert_eq!(p["stock"], 700);
    app.stop().await;
}

#[actix_rt::test]
async fn poison_messages_are_dead_lettered_with_their_reason_and_consumer_goes_on() {
    let app = spawn_app().await;
    let p = TestPublisher::connect(&app.iso).await;
    let ok = |id: i64| {
        serde_json::json!({"product_id": id, "kind": "price", "price_cents": 777, "version": 1,
            "occurred_at": "2026-11-24T00:00:00Z", "ts_us": 1})
        .to_string()
    };
    let json = Some("application/json");
    p.raw("product.price.1", b"\xff\xfe\xfd", json).await;
    p.raw("product.price.1", b"{not json", json).await;
    p.raw("product.price.1", br#"{"hello":"world"}"#, json).await;
    p.raw("product.price.1", br#"{"product_id":1,"kind":"price","price_cents":-10,"version":1,"occurred_at":"2026-11-24T00:00:00Z","ts_us":1}"#, json).await;
    p.raw("product.price.999", ok(999).as_bytes(), json).await;
    p.raw("product.price.1", ok(1).as_bytes(), Some("text/plain")).await;
    // Above consumer.max_body_bytes, below the broker's own limit.
    p.raw("product.price.1", &vec![b' '; 64 << 10], json).await;
    p.raw("product.price.2", ok(1).as_bytes(), json).await;
    // A valid event after all of them is still applied.
    p.raw("product.price.3", ok(3).as_bytes(), json).await;

    eventually(Duration::from_secs(30), "valid event applied", || async {
        (app.product(3).await["price_cents"] == 777).then_some(())
    })
    .await;
    let letters = eventually(Duration::from_secs(30), "eight dead letters", || async {
        let l = app.dead_letters().await;
        (l.len() >= 8).then_some(l)
    })
    .await;
    let mut reasons: Vec<&str> = letters.iter().map(|l| l["reason"].as_str().unwrap()).collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            "invalid_value",
            "not_json",
            "not_utf8",
            "oversize",
            "routing_key_mismatch",
            "unknown_product",
            "wrong_content_type",
            "wrong_schema"
        ]
    );
    assert!(
        letters
            .iter()
            .all(|l| l["detail"].as_str().is_some_and(|d| !d.is_empty()))
    );
    // Listing does not consume.
    assert_eq!(app.dead_letters().await.len(), 8);
    let dead = app.metric("gateway_events_dead_lettered_total", "").await;
    assert_eq!(dead, 8.0);
    let (status, body) = app.admin(Method::DELETE, "/admin/dead-letters", None).await;
    assert_eq!((status, body["purged"].as_u64()), (200, Some(8)));
    assert!(app.dead_letters().await.is_empty());
    app.stop().await;
}

#[actix_rt::test]
async fn replayed_dead_letter_that_is_now_valid_is_applied() {
    let app = spawn_app().await;
    let p = TestPublisher::connect(&app.iso).await;
    p.event(77, "price", 1234, 1).await;
    let letters = eventually(Duration::from_secs(20), "dead letter", || async {
        let l = app.dead_letters().await;
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(letters[0]["reason"], "unknown_product");
    assert_eq!(letters[0]["routing_key"], "product.price.77");
    // The product now exists, so the event can apply.
    app.sql("INSERT INTO products (id, name, price_cents, stock) VALUES (77, 'Late Lamp', 100, 1)")
        .await;
    let (status, report) = app.admin(Method::POST, "/admin/dead-letters/replay", None).await;
    assert_eq!((status, report["replayed"].as_u64()), (200, Some(1)), "{report}");
    eventually(Duration::from_secs(20), "replayed event applied", || async {
        let p = app.product(77).await;
        (p["price_cents"] == 1234 && p["price_version"] == 1).then_some(())
    })
    .await;
    assert!(app.dead_letters().await.is_empty());
    app.stop().await;
}

#[actix_rt::test]
async fn replaying_letters_that_fail_again_replays_each_once() {
    let app = spawn_app().await;
    let p = TestPublisher::connect(&app.iso).await;
    // Unknown products: dead-lettered again as soon as they are replayed.
    for id in 0..20 {
        p.event(9000 + id, "price", 100, 1).await;
    }
    eventually(Duration::from_secs(20), "20 dead letters", || async {
        (app.dead_letters().await.len() == 20).then_some(())
    })
    .await;
    let (status, report) = app
        .admin(Method::POST, "/admin/dead-letters/replay?limit=1000", None)
        .await;
    assert_eq!((status, report["replayed"].as_u64()), (200, Some(20)), "{report}");
    eventually(Duration::from_secs(20), "each back once", || async {
        (app.dead_letters().await.len() == 20).then_some(())
    })
    .await;
    app.stop().await;
}

#[actix_rt::test]
async fn broker_closing_connections_mid_stream_loses_nothing() {
    let app = spawn_app().await;
    app.generator(true, Some(300)).await;
    let mut closed = 0;
    for _ in 0..3 {
        eventually(Duration::from_secs(30), "events flowing", || async {
            (app.metric("gateway_events_confirmed_total", "").await > 0.0).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        closed += close_vhost_connections(&app.iso.vhost).await;
    }
    assert!(closed >= 3, "connections were closed: {closed}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (issued, confirmed) = drain_generator(&app).await;
    assert_eq!(confirmed as i64, issued, "every issued event confirmed");
    assert!(app.dead_letters().await.is_empty(), "nothing dead-lettered");
    let applied = app.metric("gateway_events_applied_total", "").await;
    let dup = app.metric("gateway_events_duplicate_total", "").await;
    assert!(
        applied + dup >= confirmed,
        "applied {applied} + duplicate {dup} covers confirmed {confirmed}"
    );
    assert!(app.metric("gateway_broker_reconnects_total", "").await >= 1.0);
    app.stop().await;
}

#[actix_rt::test]
async fn events_wait_in_the_queue_while_postgres_is_unreachable() {
    let (app, proxy) = testkit::spawn_behind_database_proxy().await;
    let p = TestPublisher::connect(&app.iso).await;

    proxy.cut();
    for id in 1..=5 {
        p.event(id, "stock", 4000 + id, 1).await;
    }
    eventually(Duration::from_secs(10), "apply attempted", || async {
        (app.metric("gateway_apply_transient_failures_total", "").await >= 1.0).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the events still in the queue, unacked",
        || async {
            let (ready, unacked) = queue_depth(&app.iso.vhost, &app.state.settings.rabbit.topology.stock_queue).await;
            (ready + unacked == 5).then_some(())
        },
    )
    .await;
    assert_eq!(app.metric("gateway_events_applied_total", "").await, 0.0);

    proxy.restore();
    eventually(Duration::from_secs(60), "applied after PostgreSQL returns", || async {
        (app.metric("gateway_events_applied_total", "stock").await == 5.0).then_some(())
    })
    .await;
    for id in 1..=5 {
        assert_eq!(app.product(id).await["stock"], 4000 + id);
    }
    eventually(Duration::from_secs(20), "the queue drained", || async {
        (queue_depth(&app.iso.vhost, &app.state.settings.rabbit.topology.stock_queue).await == (0, 0)).then_some(())
    })
    .await;
    assert!(app.dead_letters().await.is_empty());
    app.stop().await;
}

/// The messages of the log events at warn and info level, from every
/// thread of this test process.
fn captured_logs() -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
    type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;
    struct Capture(Lines);
    impl<S: tracing::Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            if *event.metadata().level() <= tracing::Level::INFO {
                let mut m = Message(String::new());
                event.record(&mut m);
                self.0.lock().unwrap().push(m.0);
            }
        }
    }
    let lines = Lines::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture(lines.clone())))
        .expect("no other subscriber in this test process");
    lines
}

/// While PostgreSQL is unreachable the generator issues no versions and
/// pauses: it says so once, not at every tick, and once when it resumes.
#[actix_rt::test]
async fn the_generator_says_once_that_it_paused_for_the_database_and_once_that_it_resumed() {
    let logs = captured_logs();
    let (app, proxy) = testkit::spawn_behind_database_proxy().await;
    generator_applying(&app, 200, 20.0).await;
    proxy.cut();
    // Ticks every 10 ms, each failing within the pool's 500 ms wait, until
    // the lost lock session stops generation here.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let applied = app.metric("gateway_events_applied_total", "").await;
    proxy.restore();
    eventually(Duration::from_secs(30), "events applied again", || async {
        (app.metric("gateway_events_applied_total", "").await >= applied + 20.0).then_some(())
    })
    .await;
    let count = |text: &str| logs.lock().unwrap().iter().filter(|l| l.starts_with(text)).count();
    assert_eq!(count("generator paused: database unavailable"), 1);
    assert_eq!(count("generator resumed"), 1);
    drain_generator(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn version_issuing_refuses_a_product_at_the_version_bound_instead_of_overflowing() {
    let app = spawn_app().await;
    // A row written before versions were bounded.
    app.sql("UPDATE products SET price_version = 9223372036854775807 WHERE id = 7")
        .await;
    let id = product_gateway::domain::ProductId::new(7).unwrap();
    let pid = |n| product_gateway::domain::ProductId::new(n).unwrap();
    let mut conn = app.state.db.get().await.unwrap();
    // Product 7's price is at the bound: it is left out, the others get
    // their next versions (two stock versions for 8), a missing one nothing.
    let batch = product_gateway::ingest::issue_many(
        &mut conn,
        &[(id, 1, 0), (pid(8), 1, 2), (pid(9), 0, 1), (pid(999_999), 1, 0)],
    )
    .await
    .unwrap();
    // Its other kind is still issued normally.
    let stock = product_gateway::ingest::issue_many(&mut conn, &[(id, 0, 1)])
        .await
        .unwrap();
    drop(conn);
    assert_eq!(stock.len(), 1);
    assert_eq!(stock[0].issued.stock_issued, 1);
    let mut got: Vec<(i64, i64, i64)> = batch
        .iter()
        .map(|r| (r.id, r.issued.price_issued, r.issued.stock_issued))
        .collect();
    got.sort();
    assert_eq!(got, [(8, 1, 2), (9, 0, 1)]);
    app.stop().await;
}

/// The bindings of the apply queues on `product.events` in the test's vhost.
async fn event_bindings(app: &TestApp) -> Vec<(String, String)> {
    let t = &app.state.settings.rabbit.topology;
    let mut out = Vec::new();
    for queue in [&t.price_queue, &t.stock_queue] {
        let path = format!("/api/bindings/{}/e/{}/q/{queue}", app.iso.vhost, t.events_exchange);
        let (status, body) = testkit::rabbit_api_call(Method::GET, &path, None).await;
        assert_eq!(status, 200, "{body}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        for b in list {
            out.push((queue.to_owned(), b["properties_key"].as_str().unwrap().to_owned()));
        }
    }
    out
}

/// When the events stop, the stream reader stays where it is: the last
/// batch's message may be read before its writer marks it, and that mark
/// is no stall (it used to move a healthy reader, and reconnect, 5 s into
/// every quiet spell).
#[actix_rt::test]
async fn a_pipeline_gone_quiet_keeps_its_stream_reader() {
    let app = spawn_app().await;
    generator_applying(&app, 50, 20.0).await;
    let (status, _) = app.generator(false, None).await;
    assert_eq!(status, 200);
    // Past the reader's 5 s wait for a marked batch.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let moves = app.metric("gateway_stream_moves_total", "").await;
    let reconnects = app.metric("gateway_broker_reconnects_total", "").await;
    println!("after 7 s quiet: {moves} stream moves, {reconnects} broker reconnects");
    assert_eq!((moves, reconnects), (0.0, 0.0), "stream moves, reconnects");
    app.stop().await;
}

#[actix_rt::test]
async fn unroutable_events_are_retried_with_backoff_and_all_apply_once_routing_returns() {
    let app = spawn_app().await;
    generator_applying(&app, 50, 10.0).await;
    app.stages_connected().await;
    // Nothing routes any more: every publish comes back as unroutable.
    let bindings = event_bindings(&app).await;
    assert_eq!(bindings.len(), 2, "{bindings:?}");
    for (queue, key) in &bindings {
        let key: String = key.replace('%', "%25").replace('*', "%2A").replace('#', "%23");
        let path = format!(
            "/api/bindings/{}/e/{}/q/{queue}/{key}",
            app.iso.vhost, app.state.settings.rabbit.topology.events_exchange
        );
        let (status, body) = testkit::rabbit_api_call(Method::DELETE, &path, None).await;
        assert!(status < 300, "unbind {queue}: {status} {body}");
    }
    eventually(Duration::from_secs(30), "events returned", || async {
        (app.metric("gateway_events_returned_total", "").await >= 1.0).then_some(())
    })
    .await;
    // Past the first quick attempts, then a window of steady refusal.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window = Duration::from_secs(4);
    let issued_before = issued_versions(&app).await;
    let reconnects_before = app.metric("gateway_broker_reconnects_total", "").await;
    let pending_before = issued_before - app.metric("gateway_events_confirmed_total", "").await as i64;
    let retried_before = app.metric("gateway_events_retried_total", "").await;
    tokio::time::sleep(window).await;
    let retried = app.metric("gateway_events_retried_total", "").await - retried_before;
    let confirmed = app.metric("gateway_events_confirmed_total", "").await;
    let issued = issued_versions(&app).await;
    let pending = issued - confirmed as i64;
    let counted = app
        .metric("gateway_generator_retries_total", "reason=\"unroutable\"")
        .await;
    let reconnects = app.metric("gateway_broker_reconnects_total", "").await - reconnects_before;
    println!(
        "unroutable for {window:?}: {pending_before} then {pending} pending events, {retried} retries, \
         {counted} counted as unroutable, {reconnects} broker reconnects"
    );
    // Every connection declares the topology: a stage that reconnected
    // would have bound the queues again, and the window measured nothing.
    let bound = event_bindings(&app).await;
    assert!(
        bound.is_empty(),
        "queues bound again during the window ({reconnects} reconnects): {bound:?}"
    );
    assert!(pending >= 1, "some events wait for routing");
    // No fresh events are made while the broker refuses the ones it has.
    // (Pending may still fall: an event routed before the unbinding can be
    // confirmed late when the machine is busy.)
    assert_eq!(issued, issued_before, "events made while others were refused");
    // Back-off doubling from 100 ms (jittered to between half and all of
    // it): an event refused for a second or more waits at least 0.8 s, then
    // 1.6 s, 2.5 s, so at most 3 attempts in the window. Retrying at once
    // makes as many as the broker answers.
    assert!(
        retried <= 4.0 * pending as f64,
        "{retried} retries of {pending} pending events in {window:?}"
    );
    assert!(counted >= 1.0, "retries counted by reason");
    // Routing restored: every issued event is confirmed and applied.
    let t = &app.state.settings.rabbit.topology;
    for (queue, name) in [("price", &t.price_queue), ("stock", &t.stock_queue)] {
        let path = format!("/api/bindings/{}/e/{}/q/{name}", app.iso.vhost, t.events_exchange);
        let body = serde_json::json!({"routing_key": format!("product.{queue}.*")});
        let (status, body) = testkit::rabbit_api_call(Method::POST, &path, Some(body)).await;
        assert!(status < 300, "rebind {queue}: {status} {body}");
    }
    let (issued, confirmed) = drain_generator(&app).await;
    println!("after routing returned: {issued} issued, {confirmed} confirmed, all applied");
    assert_eq!(confirmed as i64, issued);
    assert!(app.dead_letters().await.is_empty());
    app.stop().await;
}

/// Malformed messages and events for unknown products, interleaved with
/// valid events, with many batches closing on a poison message: each poison
/// is dead-lettered once, every valid event applies, and the consumer never
/// loses its channel (a settled tag settled again would close it).
#[actix_rt::test]
async fn poison_flood_causes_no_consumer_reconnect() {
    let app = spawn_app().await;
    let p = TestPublisher::connect(&app.iso).await;
    let json = Some("application/json");
    let rounds = 40i64;
    for i in 1..=rounds {
        let id = i;
        p.event(id, "price", 1000 + i, i).await;
        if i % 2 == 0 {
            p.raw(&format!("product.price.{id}"), b"this is not json", json).await;
        } else {
            p.event(1000 + i, "price", 5, 1).await;
        }
        // Let the batch close here, on the poison message.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // Then a flood pipelined with valid events, batched however it comes.
    for i in 1..=rounds {
        p.raw(&format!("product.stock.{i}"), b"this is not json", json).await;
        p.event(i, "stock", 10 + i, 1).await;
        p.event(2000 + i, "stock", 5, 1).await;
    }
    let poison = rounds * 3;
    let letters = eventually(Duration::from_secs(60), "every poison dead-lettered", || async {
        let l = app.dead_letters().await;
        (l.len() as i64 >= poison).then_some(l)
    })
    .await;
    for i in 1..=rounds {
        eventually(Duration::from_secs(30), "valid price applied", || async {
            let p = app.product(i).await;
            (p["price_cents"] == 1000 + i && p["price_version"] == i).then_some(())
        })
        .await;
        eventually(Duration::from_secs(30), "valid stock applied", || async {
            (app.product(i).await["stock"] == 10 + i).then_some(())
        })
        .await;
    }
    // A channel closed by a double ack is noticed on the next delivery wait.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let letters_after = app.dead_letters().await;
    let mut keys: Vec<(String, String)> = letters_after
        .iter()
        .map(|l| {
            (
                l["reason"].as_str().unwrap().to_owned(),
                l["routing_key"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    keys.sort();
    let before = keys.len();
    keys.dedup();
    let reconnects = app.metric("gateway_consumer_reconnects_total", "").await;
    println!(
        "poison flood: {poison} poison messages, {} dead letters ({} distinct), consumer reconnects {reconnects}",
        letters_after.len(),
        keys.len()
    );
    assert_eq!(reconnects, 0.0, "consumer reconnects");
    assert_eq!(before, keys.len(), "each poison dead-lettered once");
    assert_eq!(letters.len() as i64, poison);
    assert_eq!(letters_after.len() as i64, poison);
    app.stop().await;
}

/// Closes every client connection of a vhost, as an operator or a broker
/// failover would: `rabbitmqctl` when it is here, else the management API.
async fn close_vhost_connections(vhost: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "close_all_connections",
            "-p",
            vhost,
            "--limit",
            "1000",
            "closed by test",
        ])
        .output()
        .await;
    if let Ok(out) = out
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        return text.matches("Closing connection").count().max(1);
    }
    let (status, body) = testkit::rabbit_api_call(
        awc::http::Method::GET,
        &format!("/api/vhosts/{vhost}/connections"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let conns: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let mut closed = 0;
    for c in conns {
        let name = c["name"].as_str().unwrap_or_default();
        let encoded: String = name
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, _) =
            testkit::rabbit_api_call(awc::http::Method::DELETE, &format!("/api/connections/{encoded}"), None).await;
        if status < 300 {
            closed += 1;
        }
    }
    closed
}

/// Ready + unacked messages of a queue in a vhost (management statistics,
/// which lag by a few seconds).
async fn queue_depth(vhost: &str, queue: &str) -> (u64, u64) {
    let (status, body) =
        testkit::rabbit_api_call(awc::http::Method::GET, &format!("/api/queues/{vhost}/{queue}"), None).await;
    assert_eq!(status, 200, "{body}");
    let q: serde_json::Value = serde_json::from_str(&body).unwrap();
    (
        q["messages_ready"].as_u64().unwrap_or(0),
        q["messages_unacknowledged"].as_u64().unwrap_or(0),
    )
}

#[actix_rt::test]
async fn the_generator_keeps_its_rate_over_sparse_ids_and_touches_only_existing_products() {
    let app = spawn_app().await;
    // Three products left of fifty: ids with wide gaps.
    app.sql("DELETE FROM products WHERE id NOT IN (3, 20, 45)").await;
    let published = || app.metric("gateway_events_published", "");
    let before = published().await;
    let started = std::time::Instant::now();
    app.generator(true, Some(200)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.generator(false, None).await;
    let secs = started.elapsed().as_secs_f64();
    let events = published().await - before;
    let issued = issued_versions(&app).await;
    let per_product = app
        .sql_i64("SELECT COUNT(*)::int8 AS v FROM products WHERE price_issued + stock_issued > 0")
        .await;
    println!(
        "{events} events in {secs:.1} s at 200/s over ids 3, 20, 45; {issued} versions issued, {per_product} products touched"
    );
    // Picks among 1..=45 that skipped missing ids would publish 3/45 of the
    // rate (about 40 events); a loaded machine may slow the generator, so the
    // bound sits far below the rate and far above that.
    assert!(events >= 0.3 * 200.0 * 3.0, "{events} events in {secs:.1} s");
    assert_eq!(per_product, 3, "every existing product is picked");
    app.stop().await;
}

#[actix_rt::test]
async fn the_generator_reports_the_rate_it_holds_and_shows_when_it_falls_short() {
    let app = spawn_app().await;
    app.generator(true, Some(100)).await;
    let held = || async {
        let (_, g) = app.admin(Method::GET, "/admin/generator", None).await;
        g["achieved_rate"].as_f64().unwrap_or(-1.0)
    };
    let holding = eventually(Duration::from_secs(30), "the generator holds 100 events/s", || async {
        let r = held().await;
        (80.0..=120.0).contains(&r).then_some(r)
    })
    .await;
    assert_eq!(app.metric("gateway_generator_asked_rate", "").await, 100.0);
    // Price events unroutable: they are refused and retried, and no fresh
    // events are made meanwhile, so it holds far less than it is asked.
    app.route_prices(false).await;
    let short = eventually(Duration::from_secs(30), "the shortfall shows", || async {
        let r = held().await;
        (r < 50.0).then_some(r)
    })
    .await;
    assert!(app.metric("gateway_generator_achieved_rate", "").await < 90.0);
    println!("held {holding:.0} events/s, then {short:.0} with price events unroutable");
    app.route_prices(true).await;
    drain_generator(&app).await;
    app.stop().await;
}

/// A generator stopping while the versions of its next events are being
/// issued publishes those events before it stops: dropped, they would be
/// versions issued and never sent, a gap no retry fills.
#[actix_rt::test]
async fn a_generator_stopped_while_issuing_versions_publishes_them_before_it_stops() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    let mut app = spawn_app().await;
    // Every product row locked: the generator's first batch waits for them.
    let mut lock = AsyncPgConnection::establish(&app.iso.database_url).await.unwrap();
    lock.batch_execute("BEGIN; SELECT id FROM products FOR UPDATE")
        .await
        .unwrap();
    app.generator(true, Some(200)).await;
    eventually(
        Duration::from_secs(10),
        "the first batch waits for the locked rows",
        || async {
            let waiting = app
                .sql_i64(
                    "SELECT COUNT(*)::int8 AS v FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .await;
            (waiting > 0).then_some(())
        },
    )
    .await;
    // Stopped while it waits; the rows are released a moment later.
    app.token.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), &mut app.handle)
        .await
        .expect("stopped within 20 s")
        .expect("the service task")
        .expect("a clean stop");
    let count = |column: &str| format!("SELECT COUNT(*)::int8 AS v FROM products WHERE {column} > 0");
    let issued = app.sql_i64(&count("price_issued")).await + app.sql_i64(&count("stock_issued")).await;
    let applied = app.sql_i64(&count("price_version")).await + app.sql_i64(&count("stock_version")).await;
    assert!(issued > 0, "the batch that waited was issued");
    // Each product and kind got one version at most: every one issued is
    // applied or waits in its queue for the next instance.
    let topology = &app.state.settings.rabbit.topology;
    let queued = eventually(Duration::from_secs(20), "the queues' counts settle", || async {
        let price = queue_depth(&app.iso.vhost, &topology.price_queue).await;
        let stock = queue_depth(&app.iso.vhost, &topology.stock_queue).await;
        let queued = (price.0 + price.1 + stock.0 + stock.1) as i64;
        (applied + queued == issued).then_some(queued)
    })
    .await;
    println!("{issued} versions issued after the stop: {applied} applied, {queued} queued");
}

/// The latency points are counted once per update, so the difference of
/// two points' means is the mean time of one hop (a stream message carries
/// several updates; counted per message, the relay point's mean would stand
/// apart from the others').
#[actix_rt::test]
async fn every_latency_point_counts_each_update_once() {
    let app = spawn_app().await;
    let publisher = TestPublisher::connect(&app.iso).await;
    // Published back to back: batches and stream messages carry several.
    for id in 1..=40 {
        publisher.event(id, "price", 700 + id, 1).await;
    }
    eventually(Duration::from_secs(20), "all 40 applied and relayed", || async {
        let relayed = app.metric("gateway_updates_broadcast_total", "").await;
        (relayed >= 40.0).then_some(())
    })
    .await;
    assert_eq!(app.metric("gateway_commit_latency_seconds_count", "").await, 40.0);
    assert_eq!(app.metric("gateway_relay_latency_seconds_count", "").await, 40.0);
    app.stop().await;
}
