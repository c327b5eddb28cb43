//! Contracts checked by tools nobody here wrote: `/metrics` by Prometheus's
//! own linter (promtool).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use testkit::clients::{SseClient, WsClient};
use testkit::{TestPublisher, spawn_app};

const T: Duration = Duration::from_secs(20);

/// promtool: `GATEWAY_TEST_PROMTOOL`, else the copy `make test` unpacks
/// into `target/tools`, else the one on PATH.
fn promtool() -> String {
    if let Ok(p) = std::env::var("GATEWAY_TEST_PROMTOOL") {
        return p;
    }
    let local = testkit::repo_root().join("target/tools/bin/promtool");
    if local.exists() {
        return local.display().to_string();
    }
    "promtool".into()
}

#[actix_rt::test]
async fn metrics_pass_promtool_check_with_every_family_in_use() {
    let app = spawn_app().await;
    // Traffic on every path, so labelled families have samples to check.
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.price.2"], None, false).await;
    ws.send(json!({ "op": "nonsense" })).await;
    let _sse = SseClient::connect(&app.address, "topics=product.price.2", None)
        .await
        .unwrap();
    TestPublisher::connect(&app.iso).await.event(2, "price", 250, 1).await;
    ws.next_of("update", T).await;
    app.ingest("price", 2, json!({ "price_cents": 260 }), None).await;
    let text = app.metrics_text().await;
    assert!(text.contains("gateway_updates_delivered_total"), "{text}");

    let tool = promtool();
    let mut child = Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool} does not run ({e}): `make test` unpacks it into target/tools"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "promtool check metrics: exit {}, {} lines checked; said: {said:?}",
        out.status,
        text.lines().count()
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );

    // A scraper asking for OpenMetrics gets it, same samples.
    let mut res = app
        .client()
        .get(app.url("/metrics"))
        .insert_header((
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        ))
        .send()
        .await
        .unwrap();
    let content_type = res.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let open = String::from_utf8(res.body().await.unwrap().to_vec()).unwrap();
    assert!(open.ends_with("# EOF\n") && open.contains("# TYPE gateway_updates_delivered counter"));
    app.stop().await;
}

/// schemathesis: `GATEWAY_TEST_SCHEMATHESIS`, else the virtualenv `make
/// test` installs it into.
fn schemathesis() -> String {
    std::env::var("GATEWAY_TEST_SCHEMATHESIS").unwrap_or_else(|_| {
        testkit::repo_root()
            .join("target/tools/venv/bin/schemathesis")
            .display()
            .to_string()
    })
}

#[actix_rt::test]
async fn the_http_api_answers_as_its_openapi_document_says_under_schemathesis() {
    // One bearer token for the admin and ingest operations alike, so the
    // tool's one header reaches both.
    let app = testkit::spawn_app_with(|s| {
        s.ingest.token = product_gateway::settings::Secret::new(testkit::ADMIN_TOKEN);
    })
    .await;
    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.1.0")), "{doc}");
    let report = testkit::repo_root().join("target/schemathesis");
    let tool = schemathesis();
    let run = tokio::process::Command::new(&tool)
        .arg("run")
        .arg(app.url("/openapi.json"))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
            "--max-examples",
            "30",
            "--request-timeout",
            "10",
            // Streams never end: their answers are checked in tests/api/realtime.rs.
            "--exclude-path",
            "/events",
            "--exclude-path",
            "/ws",
            "--generation-database",
            "none",
            "--no-color",
            "--report",
            "junit",
        ])
        .arg("--report-dir")
        .arg(&report)
        .arg("--header")
        .arg(format!("Authorization: Bearer {}", testkit::ADMIN_TOKEN))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("schemathesis finishes within 5 minutes")
        .unwrap_or_else(|e| panic!("{tool} does not run ({e}): `make test` installs it into target/tools/venv"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains(" passed") || l.contains(" failed") || l.starts_with("Test cases:") || l.contains("generated")
        })
        .collect();
    println!("schemathesis: {}", summary.join(" | "));
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    app.stop().await;
}
