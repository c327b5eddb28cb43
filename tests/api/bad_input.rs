//! The bad-input corpus: malformed events published straight to the
//! exchange, valid ones between them. Each bad one ends in the dead-letter
//! queue with its reason; none stalls the consumer; every valid one applies.
//! Also: a silent (half-open) WebSocket peer is closed by the heartbeat.

use std::time::Duration;

use lapin::BasicProperties;
use testkit::raw::ws::RawWs;
use testkit::{TestPublisher, eventually, spawn_app, spawn_app_with};

fn json() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

fn event(id: i64, field: &str, value: &str, version: &str) -> String {
    format!(
        r#"{{"product_id":{id},"kind":"price","{field}":{value},"version":{version},"occurred_at":"2026-11-24T00:00:00Z","ts_us":1}}"#
    )
}

#[actix_rt::test]
async fn every_malformed_event_is_dead_lettered_with_its_reason_and_valid_ones_apply() {
    let app = spawn_app().await;
    let p = TestPublisher::connect(&app.iso).await;
    let rk = "product.price.2";
    let corpus: Vec<(&str, Vec<u8>, BasicProperties, &str)> = vec![
        ("invalid UTF-8", b"\xc3\x28\xa0\xa1".to_vec(), json(), "not_utf8"),
        ("not JSON", b"price=5".to_vec(), json(), "not_json"),
        ("empty body", Vec::new(), json(), "not_json"),
        ("JSON null", b"null".to_vec(), json(), "wrong_schema"),
        ("JSON array", b"[1,2,3]".to_vec(), json(), "wrong_schema"),
        (
            "missing field",
            br#"{"product_id":2,"kind":"price","price_cents":5}"#.to_vec(),
            json(),
            "wrong_schema",
        ),
        (
            "unknown field",
            event(2, "price_cents", "5", "1")
                .replace("\"ts_us\"", "\"extra\":1,\"ts_us\"")
                .into_bytes(),
            json(),
            "wrong_schema",
        ),
        (
            "wrong type",
            event(2, "price_cents", "\"5\"", "1").into_bytes(),
            json(),
            "wrong_schema",
        ),
        (
            "version as text",
            event(2, "price_cents", "5", "\"one\"").into_bytes(),
            json(),
            "wrong_schema",
        ),
        (
            "float price",
            event(2, "price_cents", "5.5", "1").into_bytes(),
            json(),
            "wrong_schema",
        ),
        (
            "price and stock",
            event(2, "price_cents", "5", "1")
                .replace("\"version\"", "\"stock\":3,\"version\"")
                .into_bytes(),
            json(),
            "wrong_schema",
        ),
        (
            "unknown kind",
            event(2, "price_cents", "5", "1")
                .replace("\"price\",", "\"colour\",")
                .into_bytes(),
            json(),
            "wrong_schema",
        ),
        (
            "negative price",
            event(2, "price_cents", "-1", "1").into_bytes(),
            json(),
            "invalid_value",
        ),
        (
            "zero price",
            event(2, "price_cents", "0", "1").into_bytes(),
            json(),
            "invalid_value",
        ),
        (
            "absurd price",
            event(2, "price_cents", "9223372036854775807", "1").into_bytes(),
            json(),
            "invalid_value",
        ),
        (
            "zero version",
            event(2, "price_cents", "5", "0").into_bytes(),
            json(),
            "invalid_value",
        ),
        (
            "number overflow",
            event(2, "price_cents", "99999999999999999999999", "1").into_bytes(),
            json(),
            "wrong_schema",
        ),
        (
            "unknown product",
            event(4242, "price_cents", "5", "1").into_bytes(),
            json(),
            "routing_key_mismatch",
        ),
        (
            "wrong content type",
            event(2, "price_cents", "5", "1").into_bytes(),
            BasicProperties::default().with_content_type("text/xml".into()),
            "wrong_content_type",
        ),
        (
            "gzip encoding",
            event(2, "price_cents", "5", "1").into_bytes(),
            json().with_content_encoding("gzip".into()),
            "wrong_content_encoding",
        ),
        // Above consumer.max_body_bytes (4 KiB) and below the broker's own
        // limit (256 KiB when scripts/services.sh started it), so the broker
        // delivers it and the decoder must refuse it.
        ("64 KiB body", vec![b'{'; 64 << 10], json(), "oversize"),
    ];
    let mut version = 0;
    for (_what, body, props, _) in &corpus {
        p.with_properties(rk, body, props.clone()).await;
        // A valid event after each bad one.
        version += 1;
        let ok = event(3, "price_cents", &(1000 + version).to_string(), &version.to_string());
        p.with_properties("product.price.3", ok.as_bytes(), json()).await;
    }
    p.with_properties(
        "product.price.4242",
        event(4242, "price_cents", "5", "1").as_bytes(),
        json(),
    )
    .await;

    let letters = eventually(Duration::from_secs(60), "every bad event dead-lettered", || async {
        let l = app.dead_letters().await;
        (l.len() > corpus.len()).then_some(l)
    })
    .await;
    let mut got: Vec<String> = letters
        .iter()
        .map(|l| l["reason"].as_str().unwrap().to_owned())
        .collect();
    let mut want: Vec<String> = corpus
        .iter()
        .map(|c| c.3.to_owned())
        .chain(["unknown_product".to_owned()])
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let p3 = app.product(3).await;
    assert_eq!(p3["price_version"], version, "every valid event between them applied");
    assert_eq!(p3["price_cents"], 1000 + version);
    assert_eq!(
        app.product(2).await["price_version"],
        0,
        "nothing bad touched product 2"
    );
    let (status, _) = app.get_json("/readyz").await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[actix_rt::test]
async fn a_silent_websocket_peer_is_closed_by_the_heartbeat() {
    let app = spawn_app_with(|settings| {
        settings.hub.ping_interval = Duration::from_millis(200);
        settings.hub.client_timeout = Duration::from_millis(1000);
    })
    .await;
    let mut silent = RawWs::connect(app.port).await;
    silent.send_text(r##"{"op":"subscribe","topics":["#"]}"##).await;
    eventually(Duration::from_secs(10), "the silent peer is dropped", || async {
        (app.metric("gateway_clients_refused_total", "heartbeat_timeout").await >= 1.0).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "no client left connected", || async {
        (app.metric("gateway_clients_connected", "ws").await == 0.0).then_some(())
    })
    .await;
    drop(silent);
    app.stop().await;
}

#[actix_rt::test]
async fn absurd_version_is_dead_lettered_and_the_product_stays_updatable() {
    let app = spawn_app().await;
    let p = TestPublisher::connect(&app.iso).await;
    let rk = "product.price.2";
    // i64::MAX would freeze the product (nothing newer exists); 2^53 is the
    // first integer a JavaScript client cannot hold exactly.
    let absurd = ["9223372036854775807", "9007199254740992", "-1", "0"];
    for v in absurd {
        p.with_properties(rk, event(2, "price_cents", "500", v).as_bytes(), json())
            .await;
    }
    let letters = eventually(
        Duration::from_secs(30),
        "every absurd version dead-lettered",
        || async {
            let l = app.dead_letters().await;
            (l.len() >= absurd.len()).then_some(l)
        },
    )
    .await;
    let reasons: Vec<&str> = letters.iter().map(|l| l["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, vec!["invalid_value"; absurd.len()], "{letters:?}");
    // A normal event after them still applies, and so does the largest
    // version the bound allows.
    p.with_properties(rk, event(2, "price_cents", "700", "1").as_bytes(), json())
        .await;
    eventually(Duration::from_secs(30), "the next normal event applies", || async {
        let p2 = app.product(2).await;
        (p2["price_version"] == 1 && p2["price_cents"] == 700).then_some(())
    })
    .await;
    p.with_properties(
        rk,
        event(2, "price_cents", "800", "9007199254740991").as_bytes(),
        json(),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the largest allowed version applies",
        || async {
            let p2 = app.product(2).await;
            (p2["price_version"] == 9_007_199_254_740_991_i64 && p2["price_cents"] == 800).then_some(())
        },
    )
    .await;
    assert_eq!(app.dead_letters().await.len(), absurd.len());
    app.stop().await;
}
