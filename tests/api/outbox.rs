//! Every committed version reaches the update stream at least once, whatever
//! fails between the commit and the ack: a lost COMMIT reply, or a stream
//! that refuses publishes for longer than every retry.

use std::time::Duration;

use awc::http::Method;
use product_gateway::settings::Secret;
use serde_json::Value;
use testkit::clients::WsClient;
use testkit::proxy::Proxy;
use testkit::{Isolation, TestPublisher, eventually, rabbit_api_call, spawn_with};

const T: Duration = Duration::from_secs(30);

fn versions(updates: &[Value]) -> Vec<(String, i64)> {
    updates
        .iter()
        .map(|u| {
            (
                u["topic"].as_str().unwrap().to_owned(),
                u["data"]["version"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[actix_rt::test]
async fn version_whose_commit_reply_was_lost_still_reaches_the_stream() {
    let iso = Isolation::new().await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let mut settings = iso.settings();
    settings.database.url = Secret::new(iso.database_url_through(proxy.port));
    let app = spawn_with(iso, settings).await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.price.9"], None, false).await;
    let p = TestPublisher::connect(&app.iso).await;

    // The apply transaction locks its rows first; its COMMIT reaches
    // PostgreSQL, and the connection drops before the answer comes back.
    proxy.lose_reply_after(b"ORDER BY id FOR UPDATE", b"COMMIT");
    p.event(9, "price", 909, 1).await;
    eventually(T, "the COMMIT reply lost", || async {
        proxy.reply_lost().then_some(())
    })
    .await;
    eventually(T, "version 1 committed", || async {
        (app.product(9).await["price_version"] == 1).then_some(())
    })
    .await;
    p.event(9, "price", 910, 2).await;
    let got = ws.updates(2, T).await;
    let broadcast = eventually(T, "both counted", || async {
        let n = app.metric("gateway_updates_broadcast_total", "").await;
        (n >= 2.0).then_some(n)
    })
    .await;
    println!(
        "lost COMMIT reply: versions seen on the stream {:?}, updates broadcast {broadcast}",
        versions(&got)
    );
    assert_eq!(
        versions(&got),
        [("product.price.9".to_owned(), 1), ("product.price.9".to_owned(), 2)],
        "the committed version, then the next"
    );
    assert!(app.dead_letters().await.is_empty());
    app.stop().await;
}

async fn set_updates_write(vhost: &str, allowed: bool) {
    // Publishing needs write permission on the exchange; declaring it needs
    // only configure, so the topology is still declared on reconnect.
    let write = if allowed { ".*" } else { "^(?!product\\.updates$).*" };
    let perms = serde_json::json!({"configure": ".*", "write": write, "read": ".*"});
    let (status, body) = rabbit_api_call(Method::PUT, &format!("/api/permissions/{vhost}/guest"), Some(perms)).await;
    assert!(status < 300, "permissions: {status} {body}");
}

#[actix_rt::test]
async fn versions_committed_while_the_stream_refuses_publishes_reach_it_later() {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    // Few deliveries, so today's redelivery loop reaches its limit quickly.
    settings.rabbit.topology.delivery_limit = 3;
    settings.consumer.transient_retries = 1;
    let app = spawn_with(iso, settings).await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.stock.*"], None, false).await;
    let p = TestPublisher::connect(&app.iso).await;

    set_updates_write(&app.iso.vhost, false).await;
    for id in 1..=3 {
        p.event(id, "stock", 300 + id, 1).await;
    }
    eventually(T, "the events committed", || async {
        for id in 1..=3 {
            if app.product(id).await["stock_version"] != 1 {
                return None;
            }
        }
        Some(())
    })
    .await;
    // Longer than the retries: redelivered past the limit, or kept pending.
    let waited = tokio::time::Instant::now();
    while waited.elapsed() < Duration::from_secs(8) && app.dead_letters().await.is_empty() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead_while_blocked = app.dead_letters().await.len();
    set_updates_write(&app.iso.vhost, true).await;

    let got = ws.updates(3, T).await;
    let mut seen = versions(&got);
    seen.sort();
    let broadcast = eventually(T, "all three counted", || async {
        let n = app.metric("gateway_updates_broadcast_total", "").await;
        (n >= 3.0).then_some(n)
    })
    .await;
    println!(
        "stream refused publishes: dead letters while blocked {dead_while_blocked}, versions seen {seen:?}, updates broadcast {broadcast}"
    );
    assert_eq!(
        seen,
        (1..=3).map(|id| (format!("product.stock.{id}"), 1)).collect::<Vec<_>>()
    );
    assert_eq!(dead_while_blocked, 0, "nothing dead-lettered");
    assert!(app.dead_letters().await.is_empty());
    app.stop().await;
}
