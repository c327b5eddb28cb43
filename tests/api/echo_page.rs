//! The echo page in a real browser: Debian's Chromium, driven by
//! playwright-core, sees updates arrive over WebSocket and SSE. The
//! screenshot is kept in `artifacts/echo-page.png`.

use std::path::Path;
use std::time::Duration;

use testkit::spawn_app;

#[actix_rt::test]
async fn echo_page_shows_updates_over_both_transports() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("tests/browser/node_modules/playwright-core").exists(),
        "playwright-core is missing: run `make test` (or `scripts/services.sh chromium`) to install it"
    );
    let app = spawn_app().await;
    let (status, _) = app.generator(true, Some(20)).await;
    assert_eq!(status, 200);

    // The page itself is served at `/`.
    let mut res = app.client().get(app.url("/")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let html = res.body().await.unwrap();
    assert!(String::from_utf8_lossy(&html).contains("EventSource"));

    let shot = root.join("artifacts/echo-page.png");
    let _ = std::fs::remove_file(&shot);
    let run = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/echo.mjs"))
        .arg(format!("{}/", app.address))
        .arg(&shot)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("browser run stops by itself")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "echo page check failed:\n{stdout}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("JSON summary");
    assert!(summary["ws"].as_u64().unwrap() >= 3, "{summary}");
    assert!(summary["sse"].as_u64().unwrap() >= 3, "{summary}");
    assert!(summary["console_ws"].as_u64().unwrap() >= 1, "{summary}");
    assert!(summary["console_sse"].as_u64().unwrap() >= 1, "{summary}");
    let png = std::fs::read(&shot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    assert!(
        app.metric("gateway_updates_delivered_total", "sse").await >= 3.0,
        "the page's SSE stream was served"
    );
    assert!(
        app.metric("gateway_updates_delivered_total", "ws").await >= 3.0,
        "the page's WebSocket was served"
    );
    app.stop().await;
}
