//! The HTTP edge's defaults: the shipped config refuses the public admin
//! token, requests naming a foreign `Host` (DNS rebinding) are refused, the
//! per-address limit sees through trusted proxies only, and SSE has the same
//! Origin policy as WebSocket.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use awc::http::{Method, header};
use product_gateway::settings::{Secret, Settings};
use product_gateway::startup::Application;
use testkit::{ADMIN_TOKEN, Isolation, spawn_app_with, spawn_with};

/// Status, JSON body (Null when not JSON) and headers of one request.
async fn call(
    app: &testkit::TestApp,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
) -> (u16, serde_json::Value, header::HeaderMap) {
    let mut req = app
        .client()
        .request(method, app.url(path))
        .timeout(Duration::from_secs(30));
    for (k, v) in headers {
        req = req.insert_header((*k, v.clone()));
    }
    let mut res = req.send().await.expect("request");
    let status = res.status().as_u16();
    let mut head = header::HeaderMap::new();
    for (k, v) in res.headers() {
        head.append(k.clone(), v.clone());
    }
    if status == 200 && path.starts_with("/events") {
        // A stream never ends: its headers are the answer.
        return (status, serde_json::Value::Null, head);
    }
    let raw = res.body().limit(1 << 20).await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null),
        head,
    )
}

/// Opens an SSE stream with extra headers; the open response keeps the
/// connection (and its per-address slot) until dropped.
async fn open_events(
    app: &testkit::TestApp,
    headers: &[(&str, &str)],
) -> Result<awc::ClientResponse, (u16, serde_json::Value)> {
    let mut req = awc::Client::builder()
        .timeout(Duration::from_secs(3600))
        .finish()
        .get(app.url("/events?topics=%23"));
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let mut res = tokio::time::timeout(Duration::from_secs(10), req.send())
        .await
        .expect("answer within 10 s")
        .expect("request");
    if res.status().as_u16() == 200 {
        return Ok(res);
    }
    let status = res.status().as_u16();
    let body = res.json().await.unwrap_or(serde_json::Value::Null);
    Err((status, body))
}

#[actix_rt::test]
async fn shipped_config_refuses_to_start_with_the_default_admin_token() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut settings = Settings::load(&dir).expect("the shipped config loads");
    assert!(!settings.admin.dev_mode, "the shipped config has dev mode off");
    // Nothing shared is touched if start-up gets past the check: every
    // backing service points at a closed port.
    settings.database.url = Secret::new("postgres://postgres@127.0.0.1:1/none");
    settings.redis.url = Secret::new("redis://127.0.0.1:1");
    settings.rabbit.url = Secret::new("amqp://guest:guest@127.0.0.1:1/%2f");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let built = tokio::time::timeout(Duration::from_secs(30), Application::build(settings, listener))
        .await
        .expect("start-up decides within 30 s");
    let Err(e) = built else {
        panic!("started with the public default admin token");
    };
    let message = format!("{e:#}");
    println!("start-up refused: {message}");
    assert!(
        message.contains("GATEWAY__ADMIN__TOKEN") && message.contains("GATEWAY__ADMIN__DEV_MODE=true"),
        "the refusal says how to set a token or enable dev mode: {message}"
    );
}

#[actix_rt::test]
async fn admin_call_with_a_foreign_host_is_refused() {
    let iso = Isolation::new().await;
    let settings = iso.settings();
    let app = spawn_with(iso, settings).await;
    let bearer = ("Authorization", format!("Bearer {ADMIN_TOKEN}"));
    let port = app.port;
    for host in [format!("evil.example:{port}"), "evil.example".to_owned()] {
        let (status, body, _) = call(
            &app,
            Method::GET,
            "/admin/generator",
            &[bearer.clone(), ("Host", host.clone())],
        )
        .await;
        println!("Host: {host} -> {status} {body}");
        assert_eq!(status, 421, "Host {host}: {body}");
        assert_eq!(body["code"], "bad_host");
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "localhost".to_owned(),
    ] {
        let (status, body, _) = call(
            &app,
            Method::GET,
            "/admin/generator",
            &[bearer.clone(), ("Host", host.clone())],
        )
        .await;
        assert_eq!(status, 200, "Host {host}: {body}");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn configured_host_is_allowed_and_others_are_not() {
    let app = spawn_app_with(|settings| {
        settings.server.allowed_hosts = vec!["shop.example".into(), "api.shop.example:8443".into()];
    })
    .await;
    for (host, expected) in [
        ("shop.example", 200),
        ("shop.example:443", 200),
        ("SHOP.example", 200),
        ("api.shop.example:8443", 200),
        ("api.shop.example:9000", 421),
        ("shop.example.evil.example", 421),
        ("10.1.2.3:8080", 200),
        ("[::1]:8080", 200),
    ] {
        let (status, body, _) = call(&app, Method::GET, "/healthz", &[("Host", host.to_owned())]).await;
        assert_eq!(status, expected, "Host {host}: {body}");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn websocket_and_sse_with_a_foreign_host_are_refused() {
    let iso = Isolation::new().await;
    let settings = iso.settings();
    let app = spawn_with(iso, settings).await;
    let port = app.port;
    // A DNS-rebinding page: its own origin, and the same name in Host, so the
    // Origin check alone takes it for the service's own page.
    let evil = format!("evil.example:{port}");
    let ws_url = app.address.replace("http://", "ws://") + "/ws";
    let refused = awc::Client::new()
        .ws(&ws_url)
        .origin(format!("http://{evil}").as_str())
        .set_header(header::HOST, evil.as_str())
        .connect()
        .await;
    match refused {
        Err(awc::error::WsClientError::InvalidResponseStatus(s)) => assert_eq!(s.as_u16(), 421),
        other => panic!("WebSocket with Host {evil} accepted: {:?}", other.map(|_| ())),
    }
    let (status, body, _) = call(
        &app,
        Method::GET,
        "/events?topics=%23",
        &[("Host", evil.clone()), ("Origin", format!("http://{evil}"))],
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (421, Some("bad_host")), "SSE: {body}");

    let own = format!("localhost:{port}");
    let ok = awc::Client::new()
        .ws(&ws_url)
        .origin(format!("http://{own}").as_str())
        .set_header(header::HOST, own.as_str())
        .connect()
        .await;
    assert!(ok.is_ok(), "WebSocket with Host {own} refused");
    let sse = open_events(&app, &[("Host", &own), ("Origin", &format!("http://{own}"))]).await;
    assert!(sse.is_ok(), "SSE with Host {own} refused: {:?}", sse.err());
    app.stop().await;
}

#[actix_rt::test]
async fn clients_behind_a_trusted_proxy_get_separate_per_ip_buckets() {
    let app = spawn_app_with(|settings| {
        settings.hub.max_connections_per_ip = 1;
        settings.server.trusted_proxies =
            serde_json::from_value(serde_json::json!(["127.0.0.1", "10.9.0.0/16"])).unwrap();
    })
    .await;
    let xff = "X-Forwarded-For";
    let _a = open_events(&app, &[(xff, "192.0.2.1")]).await.expect("first client");
    // The second client through the same balancer has its own bucket.
    let b = open_events(&app, &[(xff, "192.0.2.2")]).await;
    println!(
        "second client behind the proxy: {:?}",
        b.as_ref().map(|r| r.status()).err()
    );
    let _b = b.expect("second client behind the proxy refused");
    // A client spoofing the header in front of the proxy is still counted by
    // the address the proxy saw (the rightmost untrusted one), also behind
    // a chain of trusted proxies.
    for chain in ["198.51.100.7, 192.0.2.1", "198.51.100.8, 192.0.2.1, 10.9.3.4"] {
        match open_events(&app, &[(xff, chain)]).await {
            Err((429, body)) => assert_eq!(body["code"], "too_many_connections"),
            other => panic!("{chain}: escaped the limit: {:?}", other.map(|r| r.status())),
        }
    }
    app.stop().await;
}

#[actix_rt::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let app = spawn_app_with(|settings| {
        settings.hub.max_connections_per_ip = 1;
        settings.server.trusted_proxies = serde_json::from_value(serde_json::json!(["10.9.0.0/16"])).unwrap();
    })
    .await;
    let xff = "X-Forwarded-For";
    let _a = open_events(&app, &[(xff, "192.0.2.1")]).await.expect("first client");
    match open_events(&app, &[(xff, "192.0.2.2")]).await {
        Err((429, body)) => assert_eq!(body["code"], "too_many_connections"),
        other => panic!(
            "spoofed X-Forwarded-For escaped the limit: {:?}",
            other.map(|r| r.status())
        ),
    }
    app.stop().await;
}

#[actix_rt::test]
async fn sse_from_a_foreign_origin_is_refused() {
    let app = spawn_app_with(|settings| {
        settings.hub.allowed_origins = vec!["https://shop.example".into()];
    })
    .await;
    let (status, body, _) = call(
        &app,
        Method::GET,
        "/events?topics=%23",
        &[("Origin", "https://evil.example".into())],
    )
    .await;
    println!("SSE from a foreign origin: {status} {body}");
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{body}");

    for origin in ["https://shop.example".to_owned(), app.address.clone()] {
        let res = open_events(&app, &[("Origin", &origin)]).await;
        let res = res.unwrap_or_else(|e| panic!("{origin} refused: {e:?}"));
        assert_eq!(
            res.headers()
                .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                .and_then(|v| v.to_str().ok()),
            Some(origin.as_str())
        );
        assert!(
            res.headers()
                .get_all(header::VARY)
                .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("origin")))
        );
    }
    // Not a browser: no Origin, no CORS headers, still served.
    let res = open_events(&app, &[]).await.expect("no Origin");
    assert!(res.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());

    // A preflight from an allowed page is answered; from a foreign one, not.
    let (status, _, head) = call(
        &app,
        Method::OPTIONS,
        "/events?topics=%23",
        &[
            ("Origin", "https://shop.example".into()),
            ("Access-Control-Request-Method", "GET".into()),
            ("Access-Control-Request-Headers", "last-event-id".into()),
        ],
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(
        head.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).unwrap(),
        "https://shop.example"
    );
    assert!(
        head.get(header::ACCESS_CONTROL_ALLOW_HEADERS)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("last-event-id"))
    );
    let (status, body, _) = call(
        &app,
        Method::OPTIONS,
        "/events",
        &[
            ("Origin", "https://evil.example".into()),
            ("Access-Control-Request-Method", "GET".into()),
        ],
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    assert!(app.metric("gateway_clients_refused_total", "origin").await >= 2.0);
    app.stop().await;
}
