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
