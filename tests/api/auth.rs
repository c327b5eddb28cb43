//! Subscriber tokens over both transports: what a token's `topics` claim
//! allows, what the anonymous patterns allow, and every way a token is
//! refused (bad signature, `alg: none`, a key not configured, expiry).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use testkit::clients::{SseClient, WsClient, WsEvent};
use testkit::{TestApp, TestPublisher, repo_root, spawn_app_with};

const T: Duration = Duration::from_secs(20);
const SECRET: &str = "a-subscriber-token-secret-of-32-bytes-or-more";

fn keys() -> std::path::PathBuf {
    repo_root().join("tests/fixtures/jwt")
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An instance taking HS256 tokens with [`SECRET`] and RS256/ES256 ones
/// with the fixture keys; `anonymous` is what needs no token.
async fn app(anonymous: &[&str]) -> TestApp {
    let anonymous: Vec<String> = anonymous.iter().map(|s| s.to_string()).collect();
    spawn_app_with(move |s| {
        s.auth.anonymous_patterns = anonymous;
        s.auth.hs256_secret = product_gateway::settings::Secret::new(SECRET);
        s.auth.public_keys = keys().join("public").display().to_string();
        s.auth.leeway = Duration::ZERO;
    })
    .await
}

fn hs256(topics: &[&str], exp: u64) -> String {
    hs256_with(topics, exp, SECRET)
}

fn hs256_with(topics: &[&str], exp: u64, secret: &str) -> String {
    let claims = json!({ "sub": "tester", "exp": exp, "topics": topics });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn signed(alg: Algorithm, private_key: &str, kid: Option<&str>, topics: &[&str]) -> String {
    let pem = std::fs::read(keys().join(private_key)).unwrap();
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let claims = json!({ "exp": now() + 600, "topics": topics });
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// A token with `alg: none` and no signature, as an attacker would forge it.
fn unsigned(topics: &[&str]) -> String {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = b64(json!({ "exp": now() + 600, "topics": topics }).to_string().as_bytes());
    format!("{header}.{claims}.")
}

async fn ws_with(app: &TestApp, token: &str) -> WsClient {
    WsClient::connect_to(&app.address, &format!("/ws?token={token}"))
        .await
        .expect("upgrade with a valid token")
}

/// Subscribes and returns the answer: `subscribed` or an error frame.
async fn ws_subscribe(ws: &mut WsClient, topics: &[&str]) -> Value {
    ws.send(json!({ "op": "subscribe", "topics": topics })).await;
    ws.next_of_any(&["subscribed", "error"], T).await
}

fn assert_error(frame: &Value, code: &str) {
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["code"], code, "{frame}");
}

#[actix_rt::test]
async fn anonymous_connections_get_the_anonymous_patterns_and_nothing_more() {
    let app = app(&["product.price.*", "product.stock.*"]).await;
    let mut ws = WsClient::connect(&app.address).await;
    let ok = ws_subscribe(&mut ws, &["product.price.*", "product.stock.42"]).await;
    assert_eq!(ok["type"], "subscribed", "{ok}");
    // `*` in the kind could be any word: not within the public topics.
    for wider in ["#", "product.#", "product.*.42"] {
        let refused = ws_subscribe(&mut ws, &[wider]).await;
        assert_error(&refused, "forbidden");
    }
    // Nothing else changed on the connection: still the two patterns, and
    // their updates still come.
    let again = ws_subscribe(&mut ws, &["product.price.9"]).await;
    assert_eq!(
        again["topics"],
        json!(["product.price.*", "product.stock.42", "product.price.9"])
    );
    TestPublisher::connect(&app.iso).await.event(9, "price", 900, 1).await;
    let update = ws.next_of("update", T).await;
    assert_eq!(update["topic"], "product.price.9");

    let (status, body) = SseClient::connect(&app.address, "topics=product.%23", None)
        .await
        .err()
        .expect("refused");
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{body}");
    assert!(
        SseClient::connect(&app.address, "topics=product.stock.*", None)
            .await
            .is_ok()
    );
    assert!(app.metric("gateway_auth_refused_total", "forbidden").await >= 4.0);
    app.stop().await;
}

#[actix_rt::test]
async fn a_token_allows_its_patterns_over_both_transports_and_nothing_else() {
    let app = app(&[]).await;
    let exact = hs256(&["product.*.7"], now() + 600);
    let mut ws = ws_with(&app, &exact).await;
    for allowed in [
        &["product.price.7"][..],
        &["product.*.7"],
        &["product.stock.7", "product.price.7"],
    ] {
        let ok = ws_subscribe(&mut ws, allowed).await;
        assert_eq!(ok["type"], "subscribed", "{allowed:?}: {ok}");
    }
    for refused in ["product.price.8", "product.price.*", "#"] {
        assert_error(&ws_subscribe(&mut ws, &[refused]).await, "forbidden");
    }

    // A wildcard scope covers the narrower patterns it contains.
    let wide = hs256(&["product.#"], now() + 600);
    let mut ws = ws_with(&app, &wide).await;
    let ok = ws_subscribe(&mut ws, &["product.*.42", "product.price.*", "product.#"]).await;
    assert_eq!(ok["type"], "subscribed", "{ok}");
    assert_error(&ws_subscribe(&mut ws, &["#"]).await, "forbidden");

    // Without a token nothing is open here.
    let mut anon = WsClient::connect(&app.address).await;
    assert_error(&ws_subscribe(&mut anon, &["product.price.7"]).await, "forbidden");

    // SSE: the token as a bearer header or as a query parameter.
    let mut sse = SseClient::connect_with(&app.address, "topics=product.price.7", None, Some(&exact))
        .await
        .expect("bearer token accepted");
    let mut by_query = SseClient::connect(&app.address, &format!("topics=product.stock.7&token={exact}"), None)
        .await
        .expect("query token accepted");
    let (status, body) = SseClient::connect_with(&app.address, "topics=product.price.8", None, Some(&exact))
        .await
        .err()
        .expect("outside the token");
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{body}");
    let (status, _) = SseClient::connect(&app.address, "topics=product.price.7", None)
        .await
        .err()
        .expect("no token");
    assert_eq!(status, 403);

    let p = TestPublisher::connect(&app.iso).await;
    p.event(7, "price", 700, 1).await;
    p.event(7, "stock", 70, 1).await;
    let e = &sse.updates(1, T).await[0];
    assert_eq!((e.event.as_str(), &e.data["product_id"]), ("price", &json!(7)));
    let e = &by_query.updates(1, T).await[0];
    assert_eq!((e.event.as_str(), &e.data["product_id"]), ("stock", &json!(7)));
    app.stop().await;
}

#[actix_rt::test]
async fn bad_tokens_are_refused_over_both_transports() {
    let app = app(&[]).await;
    let topics = ["#"];
    let cases = [
        (
            "bad signature",
            hs256_with(&topics, now() + 600, "another-secret-of-32-bytes-or-more-here"),
            "unauthorized",
        ),
        ("alg none", unsigned(&topics), "unauthorized"),
        (
            "key not configured",
            signed(Algorithm::RS256, "other-rsa-private.pem", None, &topics),
            "unauthorized",
        ),
        (
            "wrong kid",
            signed(Algorithm::RS256, "rsa-private.pem", Some("ec"), &topics),
            "unauthorized",
        ),
        ("expired", hs256(&topics, now() - 10), "token_expired"),
        ("not a JWT", "not-a-token".to_owned(), "unauthorized"),
    ];
    for (what, token, code) in &cases {
        let (status, body) = SseClient::connect_with(&app.address, "topics=product.price.1", None, Some(token))
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: SSE accepted"));
        assert_eq!((status, body["code"].as_str()), (401, Some(*code)), "{what}: {body}");
        let refused = WsClient::connect_to(&app.address, &format!("/ws?token={token}"))
            .await
            .err();
        assert_eq!(refused, Some(401), "{what}: WebSocket upgrade");
        // In place on an open socket: an error frame, the connection stays.
        let mut ws = WsClient::connect(&app.address).await;
        ws.send(json!({ "op": "auth", "token": token })).await;
        assert_error(&ws.next_of_any(&["authorized", "error"], T).await, code);
        assert_error(&ws_subscribe(&mut ws, &["product.price.1"]).await, "forbidden");
    }
    assert!(app.metric("gateway_auth_refused_total", "unauthorized").await >= 15.0);
    app.stop().await;
}

#[actix_rt::test]
async fn rs256_and_es256_tokens_are_checked_with_the_configured_public_keys() {
    let app = app(&[]).await;
    for (alg, key, kid) in [
        (Algorithm::RS256, "rsa-private.pem", None),
        (Algorithm::RS256, "rsa-private.pem", Some("rsa")),
        (Algorithm::ES256, "ec-private.pem", None),
        (Algorithm::ES256, "ec-private.pem", Some("ec")),
    ] {
        let token = signed(alg, key, kid, &["product.price.*"]);
        let mut ws = ws_with(&app, &token).await;
        let ok = ws_subscribe(&mut ws, &["product.price.3"]).await;
        assert_eq!(ok["type"], "subscribed", "{alg:?} {kid:?}: {ok}");
        assert_error(&ws_subscribe(&mut ws, &["product.stock.3"]).await, "forbidden");
        let sse = SseClient::connect_with(&app.address, "topics=product.price.3", None, Some(&token)).await;
        assert!(sse.is_ok(), "{alg:?} {kid:?} over SSE");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn an_expiring_token_closes_the_websocket_and_ends_the_sse_stream() {
    let app = app(&[]).await;
    let token = hs256(&["product.#"], now() + 2);
    let mut ws = ws_with(&app, &token).await;
    assert_eq!(ws_subscribe(&mut ws, &["product.price.1"]).await["type"], "subscribed");
    let mut sse = SseClient::connect_with(&app.address, "topics=product.price.1", None, Some(&token))
        .await
        .expect("valid for now");

    let closed = loop {
        match ws.next(Duration::from_secs(10)).await {
            Some(WsEvent::Closed(code)) => break code,
            Some(WsEvent::Json(_)) => continue,
            None => panic!("the socket stayed open past the token's expiry"),
        }
    };
    assert_eq!(closed, Some(4001), "documented close code of an expired token");
    let last = sse.next(Duration::from_secs(10)).await.expect("an error event");
    assert_eq!(
        (last.event.as_str(), &last.data["code"]),
        ("error", &json!("token_expired"))
    );
    assert!(
        sse.next(Duration::from_secs(5)).await.is_none() && sse.ended,
        "the stream ends"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_websocket_refreshes_its_token_in_place() {
    let app = app(&[]).await;
    let mut ws = ws_with(&app, &hs256(&["product.*.5"], now() + 2)).await;
    assert_eq!(ws_subscribe(&mut ws, &["product.price.5"]).await["type"], "subscribed");

    // A token that would not cover the subscription is refused; the old
    // grant stays.
    ws.send(json!({ "op": "auth", "token": hs256(&["product.stock.*"], now() + 600) }))
        .await;
    assert_error(&ws.next_of_any(&["authorized", "error"], T).await, "forbidden");

    let fresh = now() + 600;
    ws.send(json!({ "op": "auth", "token": hs256(&["product.*.5", "product.*.6"], fresh) }))
        .await;
    let ok = ws.next_of_any(&["authorized", "error"], T).await;
    assert_eq!(ok["type"], "authorized", "{ok}");
    assert_eq!(ok["expires"], fresh);
    assert_eq!(ws_subscribe(&mut ws, &["product.stock.6"]).await["type"], "subscribed");

    // Past the first token's expiry the socket is open and delivering.
    tokio::time::sleep(Duration::from_secs(3)).await;
    TestPublisher::connect(&app.iso).await.event(5, "price", 500, 1).await;
    let update = ws.next_of("update", T).await;
    assert_eq!(update["topic"], "product.price.5");
    app.stop().await;
}

#[actix_rt::test]
async fn an_sse_stream_whose_client_stalls_sends_nothing_queued_after_its_token_expired() {
    let app = spawn_app_with(|s| {
        s.auth.anonymous_patterns = vec![];
        s.auth.hs256_secret = product_gateway::settings::Secret::new(SECRET);
        s.auth.leeway = Duration::ZERO;
        s.server.socket_send_buffer = 4096;
        // Only the token may end this stream here.
        s.hub.client_timeout = Duration::from_secs(60);
    })
    .await;
    let exp = now() + 3;
    let token = hs256(&["product.price.*"], exp);
    let (status, stalled) =
        testkit::raw::sse::RawSse::connect(app.port, &format!("/events?topics=product.price.*&token={token}")).await;
    assert!(status.contains("200"), "{status}");
    // Updates flow from before the expiry to well after it, far more than
    // the socket buffers hold, while the client reads nothing.
    let p = TestPublisher::connect(&app.iso).await;
    let mut version = 10;
    while now() < exp + 2 {
        version += 1;
        let events: Vec<(i64, &str, i64, i64)> = (1..=50).map(|id| (id, "price", 100 + id, version)).collect();
        p.burst(&events).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let testkit::raw::sse::Drained::Closed(body) = stalled.drain(T).await else {
        panic!("the expired stream did not end");
    };
    let body = String::from_utf8_lossy(&body);
    let exp_us = exp as i64 * 1_000_000;
    let mut updates = 0;
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(ts) = v["ts_us"].as_i64() {
            updates += 1;
            assert!(
                ts <= exp_us,
                "an update published {} ms after the token expired was sent",
                (ts - exp_us) / 1000
            );
        }
    }
    assert!(updates > 0, "updates flowed before the expiry");
    let last = body
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_default();
    assert!(
        last.contains("token_expired"),
        "the stream ends with token_expired: {last}"
    );
    app.stop().await;
}
