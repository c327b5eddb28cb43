//! Hostile HTTP: malformed input, oversize headers and bodies, wrong
//! methods and tokens, foreign origins and connection floods get a 4xx,
//! never a 500.

use std::time::Duration;

use awc::http::{Method, header};
use testkit::clients::{SseClient, WsClient, WsEvent};
use testkit::{ADMIN_TOKEN, spawn_app, spawn_app_with};

/// Method, path, headers, body, expected status and code.
type Case<'a> = (Method, &'a str, Vec<(&'a str, String)>, Vec<u8>, u16, &'a str);

async fn call(
    app: &testkit::TestApp,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let mut req = app
        .client()
        .request(method, app.url(path))
        .timeout(Duration::from_secs(30));
    for (k, v) in headers {
        req = req.insert_header((*k, v.clone()));
    }
    let mut res = req.send_body(body).await.expect("request");
    let status = res.status().as_u16();
    let raw = res.body().limit(1 << 20).await.unwrap_or_default();
    (status, serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null))
}

#[actix_rt::test]
async fn bad_http_input_gets_a_4xx_with_a_json_code() {
    let app = spawn_app().await;
    let bearer = ("Authorization", format!("Bearer {ADMIN_TOKEN}"));
    let json = ("Content-Type", "application/json".to_owned());
    let cases: Vec<Case> = vec![
        (Method::POST, "/products", vec![], vec![], 405, "method_not_allowed"),
        (
            Method::PATCH,
            "/products/1/photo",
            vec![],
            vec![],
            405,
            "method_not_allowed",
        ),
        (Method::GET, "/admin/generator", vec![], vec![], 401, "unauthorized"),
        (
            Method::GET,
            "/admin/dead-letters",
            vec![("Authorization", "Bearer nope".into())],
            vec![],
            401,
            "unauthorized",
        ),
        (
            Method::GET,
            "/admin/dead-letters",
            vec![("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=".into())],
            vec![],
            401,
            "unauthorized",
        ),
        (
            Method::DELETE,
            "/admin/dead-letters",
            vec![],
            vec![],
            401,
            "unauthorized",
        ),
        (
            Method::POST,
            "/admin/generator",
            vec![bearer.clone(), json.clone()],
            b"{not json".to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/admin/generator",
            vec![bearer.clone(), json.clone()],
            br#"{"rate":-5}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/admin/generator",
            vec![bearer.clone(), json.clone()],
            br#"{"rate":"fast"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/admin/generator",
            vec![bearer.clone(), json.clone()],
            br#"{"speed":1}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/admin/generator",
            vec![bearer.clone(), ("Content-Type", "text/plain".into())],
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/admin/generator",
            vec![bearer.clone(), json.clone()],
            vec![b' '; 3 << 20],
            413,
            "payload_too_large",
        ),
        (
            Method::GET,
            "/admin/dead-letters?limit=0",
            vec![bearer.clone()],
            vec![],
            400,
            "bad_request",
        ),
        (Method::GET, "/products?limit=99999", vec![], vec![], 400, "bad_request"),
        (Method::GET, "/products/%00", vec![], vec![], 400, "bad_request"),
        (Method::GET, "/products/1%2F2", vec![], vec![], 400, "bad_request"),
        (
            Method::GET,
            "/events?topics=a&since=-1",
            vec![],
            vec![],
            400,
            "bad_request",
        ),
    ];
    for (method, path, headers, body, status, code) in cases {
        let (got, body) = call(&app, method.clone(), path, &headers, body).await;
        assert_eq!(
            (got, body["code"].as_str().unwrap_or("")),
            (status, code),
            "{method} {path}: {body}"
        );
    }
    // Headers far over the server's limit are refused at the protocol level
    // (431, before any handler runs): a 4xx, never a 500.
    let huge = "x".repeat(1 << 20);
    let res = app
        .client()
        .get(app.url("/products"))
        .insert_header(("X-Huge", huge))
        .send()
        .await;
    if let Ok(res) = res {
        assert!(res.status().is_client_error(), "{}", res.status());
    }
    let (status, _) = app.get_json("/healthz").await;
    assert_eq!(status, 200, "still serving");
    app.stop().await;
}

#[actix_rt::test]
async fn websocket_from_a_foreign_origin_is_refused() {
    let app = spawn_app_with(|settings| {
        settings.hub.allowed_origins = vec!["https://shop.example".into()];
    })
    .await;
    let ws_url = app.address.replace("http://", "ws://") + "/ws";
    let refused = awc::Client::new()
        .ws(&ws_url)
        .origin("https://evil.example")
        .connect()
        .await;
    match refused {
        Err(awc::error::WsClientError::InvalidResponseStatus(s)) => assert_eq!(s.as_u16(), 403),
        other => panic!("foreign origin accepted: {:?}", other.map(|_| ())),
    }
    for origin in ["https://shop.example".to_owned(), app.address.clone()] {
        let ok = awc::Client::new().ws(&ws_url).origin(origin.as_str()).connect().await;
        assert!(ok.is_ok(), "{origin} refused");
    }
    assert!(app.metric("gateway_clients_refused_total", "origin").await >= 1.0);
    app.stop().await;
}

#[actix_rt::test]
async fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let app = spawn_app_with(|settings| {
        settings.hub.max_connections_per_ip = 2;
    })
    .await;
    let mut a = WsClient::connect(&app.address).await;
    a.subscribe(&["#"], None, false).await;
    let _b = SseClient::connect(&app.address, "topics=%23", None).await.unwrap();
    match SseClient::connect(&app.address, "topics=%23", None).await {
        Err((429, body)) => assert_eq!(body["code"], "too_many_connections"),
        _ => panic!("third connection from one address accepted"),
    }
    let mut c = WsClient::connect(&app.address).await;
    assert!(matches!(
        c.next(Duration::from_secs(10)).await,
        Some(WsEvent::Closed(Some(1013)))
    ));
    assert!(app.metric("gateway_clients_refused_total", "per_ip_limit").await >= 2.0);
    app.stop().await;
}

#[actix_rt::test]
async fn photo_with_a_list_of_foreign_etags_is_still_served() {
    let app = spawn_app().await;
    let mut res = app
        .client()
        .get(app.url("/products/1/photo"))
        .insert_header((header::IF_NONE_MATCH, "W/\"x\", \"y\""))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert!(!res.body().await.unwrap().is_empty());
    app.stop().await;
}

#[actix_rt::test]
async fn unauthenticated_photo_upload_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    // Declares nearly the upload limit but sends only a sliver of it, as a
    // slow or hostile client would: the answer must not wait for the rest.
    let head = format!(
        "PUT /products/1/photo HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: image/png\r\nContent-Length: 900000\r\n\r\n",
        app.port
    );
    tcp.write_all(head.as_bytes()).await.expect("send head");
    tcp.write_all(&[0u8; 1000]).await.expect("send part of the body");
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        read.is_ok() && text.starts_with("HTTP/1.1 401"),
        "expected 401 before the body arrives, got {text:?} after {:?}",
        started.elapsed()
    );
    assert!(text.contains(r#""code":"unauthorized""#), "{text}");
    println!("unauthenticated upload answered 401 in {:?}", started.elapsed());
    app.stop().await;
}
