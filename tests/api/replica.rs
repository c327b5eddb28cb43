//! Snapshots served from a read replica (`database.read_url`): against real
//! streaming standbys of a primary that `scripts/replica.sh` starts, one
//! that keeps up and one that applies each commit two seconds late.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use product_gateway::domain::ProductId;
use product_gateway::settings::{Secret, Settings};
use product_gateway::store::catalog;
use testkit::clients::{WsClient, WsEvent};
use testkit::{Isolation, TestApp, TestPublisher, env_or, eventually};

const T: Duration = Duration::from_secs(20);

fn primary() -> String {
    env_or("GATEWAY_TEST_PG_PRIMARY", "postgres://postgres@127.0.0.1:5440")
}

/// A standby that replays as fast as it receives.
fn standby() -> String {
    env_or("GATEWAY_TEST_PG_STANDBY", "postgres://postgres@127.0.0.1:5441")
}

/// A standby that applies each commit two seconds after the primary.
fn lagging() -> String {
    env_or("GATEWAY_TEST_PG_LAGGING", "postgres://postgres@127.0.0.1:5442")
}

/// An instance whose database is on the replicated primary and whose client
/// reads go to `standby`.
async fn on_replica(standby: &str, max_lag: Duration, configure: impl FnOnce(&mut Settings)) -> TestApp {
    assert!(
        AsyncPgConnection::establish(&format!("{}/postgres", primary()))
            .await
            .is_ok(),
        "no replicated primary at {}: scripts/replica.sh up starts one with its standbys",
        primary()
    );
    let iso = Isolation::on(&primary()).await;
    let name = iso.database_url.rsplit('/').next().unwrap().to_owned();
    let read_url = format!("{standby}/{name}");
    eventually(T, "the new database on the standby", || async {
        AsyncPgConnection::establish(&read_url).await.ok().map(drop)
    })
    .await;
    let mut s = iso.settings();
    s.database.read_url = Some(Secret::new(read_url));
    s.database.replica_max_lag = max_lag;
    configure(&mut s);
    testkit::spawn_with(iso, s).await
}

async fn price_version(app: &TestApp, id: i64) -> i64 {
    let id = ProductId::new(id).unwrap();
    catalog::get(&app.state.db, id).await.unwrap().unwrap().price_version
}

/// The one product of a snapshot of `product.price.<id>`.
async fn snapshot_of(app: &TestApp, id: i64) -> (WsClient, serde_json::Value) {
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&[&format!("product.price.{id}")], None, true).await;
    let snap = ws.snapshot(T).await;
    let product = snap["products"][0].clone();
    assert_eq!(product["product_id"], id, "{snap}");
    (ws, product)
}

#[actix_rt::test]
async fn a_snapshot_from_a_lagging_replica_holds_what_was_broadcast_before_the_client_came() {
    let app = on_replica(&lagging(), Duration::from_secs(10), |_| {}).await;
    let publisher = TestPublisher::connect(&app.iso).await;
    let version = price_version(&app, 1).await + 1;
    publisher.event(1, "price", 777, version).await;
    // Applied on the primary and broadcast: a client already subscribed has
    // it, and one that comes now gets it from the snapshot or nowhere.
    eventually(T, "the change broadcast", || async {
        (app.metric("gateway_updates_broadcast_total", "").await >= 1.0).then_some(())
    })
    .await;
    let (_ws, product) = snapshot_of(&app, 1).await;
    assert_eq!(
        product["price_version"], version,
        "the snapshot waited for the replica to replay the broadcast change: {product}"
    );
    assert_eq!(product["price_cents"], 777);
    assert_eq!(
        app.metric("gateway_snapshots_off_replica_total", "").await,
        0.0,
        "read on the replica"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_snapshot_is_read_on_the_primary_when_the_replica_lags_past_the_allowed_wait() {
    let app = on_replica(&lagging(), Duration::from_millis(200), |_| {}).await;
    let publisher = TestPublisher::connect(&app.iso).await;
    let version = price_version(&app, 2).await + 1;
    publisher.event(2, "price", 888, version).await;
    eventually(T, "the change broadcast", || async {
        (app.metric("gateway_updates_broadcast_total", "").await >= 1.0).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let (_ws, product) = snapshot_of(&app, 2).await;
    assert_eq!(product["price_version"], version, "{product}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the snapshot did not wait out the replica's 2 s lag: {:?}",
        started.elapsed()
    );
    assert_eq!(app.metric("gateway_snapshots_off_replica_total", "").await, 1.0);
    app.stop().await;
}

#[derive(diesel::QueryableByName)]
struct Xid {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    xid: i64,
}

/// Polls `query` until it gives a transaction id above `above`.
async fn first_xid(conn: &mut AsyncPgConnection, query: &str, above: i64) -> i64 {
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Ok(x) = diesel::sql_query(query).get_result::<Xid>(conn).await
            && x.xid > above
        {
            return x.xid;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {query}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn a_snapshot_from_a_standby_skips_no_update_of_a_transaction_still_running_on_the_primary() {
    let app = on_replica(&standby(), Duration::from_secs(10), |_| {}).await;
    let publisher = TestPublisher::connect(&app.iso).await;
    let before = price_version(&app, 3).await;
    // The outbox held: the next apply transaction locks and changes the
    // product, then waits to record its stream message, running with an id.
    let mut holder = AsyncPgConnection::establish(&app.iso.database_url).await.unwrap();
    diesel::sql_query("BEGIN").execute(&mut holder).await.unwrap();
    diesel::sql_query("LOCK TABLE update_outbox IN EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    publisher.event(3, "price", 333, before + 1).await;
    let mut probe = AsyncPgConnection::establish(&app.iso.database_url).await.unwrap();
    let running = first_xid(
        &mut probe,
        "SELECT backend_xid::text::bigint AS xid FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock' \
           AND query LIKE 'INSERT INTO update_outbox%' AND backend_xid IS NOT NULL",
        0,
    )
    .await;
    // A later transaction ends, and the standby has replayed it: the
    // standby's snapshots now reach past the running one, which they do not
    // list (a standby keeps its running transactions out of `xip`).
    let later = diesel::sql_query("SELECT pg_current_xact_id()::text::bigint AS xid")
        .get_result::<Xid>(&mut probe)
        .await
        .unwrap()
        .xid;
    assert!(later > running);
    let mut on_standby = AsyncPgConnection::establish(&format!(
        "{}/{}",
        standby(),
        app.iso.database_url.rsplit('/').next().unwrap()
    ))
    .await
    .unwrap();
    first_xid(
        &mut on_standby,
        "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xid",
        later,
    )
    .await;
    let (mut ws, product) = snapshot_of(&app, 3).await;
    assert_eq!(product["price_version"], before, "not yet committed: {product}");
    diesel::sql_query("COMMIT").execute(&mut holder).await.unwrap();
    // The change commits now, after the snapshot: it must follow it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got = None;
    while got.is_none() && tokio::time::Instant::now() < deadline {
        if let Some(WsEvent::Json(v)) = ws.next(Duration::from_millis(200)).await
            && v["type"] == "update"
        {
            got = Some(v);
        }
    }
    let got = got.expect("the change committed after the snapshot reached the client");
    assert_eq!(got["data"]["version"], before + 1, "{got}");
    assert_eq!(got["data"]["price_cents"], 333, "{got}");
    app.stop().await;
}

#[actix_rt::test]
async fn snapshots_from_a_standby_under_a_running_generator_then_updates_equal_the_primary() {
    let app = on_replica(&standby(), Duration::from_secs(10), |s| {
        s.hub.snapshot_part_products = 7
    })
    .await;
    crate::realtime::snapshot_then_updates_under_the_generator_equal_the_database(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn snapshots_from_a_lagging_standby_under_a_running_generator_then_updates_equal_the_primary() {
    let app = on_replica(&lagging(), Duration::from_secs(10), |s| {
        s.hub.snapshot_part_products = 7
    })
    .await;
    crate::realtime::snapshot_then_updates_under_the_generator_equal_the_database(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_snapshot_is_read_on_the_primary_when_the_replica_does_not_answer() {
    // The machine's PostgreSQL as primary; the replica's address has
    // nothing listening.
    let app = testkit::spawn_app_with(|s| {
        let name = s.database.url.expose().rsplit('/').next().unwrap().to_owned();
        s.database.read_url = Some(Secret::new(format!("postgres://postgres@127.0.0.1:9/{name}")));
        s.database.acquire_timeout = Duration::from_millis(500);
    })
    .await;
    let (_ws, product) = snapshot_of(&app, 4).await;
    assert_eq!(product["price_version"], price_version(&app, 4).await, "{product}");
    assert_eq!(app.metric("gateway_snapshots_off_replica_total", "").await, 1.0);
    app.stop().await;
}
