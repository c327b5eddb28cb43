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
        "playwright-core is missing: run `make test` (or `scripts/tools.sh chromium`) to install it"
    );
    let app = spawn_app().await;
    let (status, _) = app.generator(true, Some(20)).await;
    assert_eq!(status, 200);

    // The page itself is served at `/`.
    let mut res = app.client().get(app.url("/")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let html = res.body().await.unwrap();
    assert!(
        String::from_utf8_lossy(&html).contains("/gateway-client.js"),
        "the page runs on the client module"
    );

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
    assert_eq!(
        summary["photo_revalidation"], 304,
        "photos revalidate by ETag: {summary}"
    );
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

/// Reads lines from the browser script until one satisfies `done`.
async fn read_until(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    within: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    tokio::time::timeout(within, async {
        while let Some(line) = lines.next_line().await.expect("browser stdout") {
            if done(&line) {
                return line;
            }
        }
        panic!("the browser script ended early");
    })
    .await
    .expect("the browser script answers in time")
}

/// The browser client module (`static/gateway-client.js`) over both
/// transports: the network is cut for five seconds under a running
/// generator; afterwards each client's state equals the database and the
/// offsets it received for its topics have no gap. A `reset` makes it take
/// a new snapshot.
#[actix_rt::test]
async fn the_client_module_rides_out_five_seconds_offline_and_ends_equal_to_the_database() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let app = spawn_app().await;
    let proxy = testkit::proxy::Proxy::start(&format!("127.0.0.1:{}", app.port)).await;
    let base = format!("http://127.0.0.1:{}", proxy.port);
    let (status, _) = app.generator(true, Some(30)).await;
    assert_eq!(status, 200);

    let shot = root.join("artifacts/client-module.png");
    let _ = std::fs::remove_file(&shot);
    let mut child = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/client.mjs"))
        .arg(&base)
        .arg(&shot)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    read_until(&mut lines, Duration::from_secs(60), |l| l == "READY").await;
    eprintln!("client module: ready; cutting the network for 5 s");

    // Offline: open connections dropped, new ones refused, for five seconds.
    let delivered = app.metric("gateway_updates_delivered_total", "ws").await;
    let delivered_sse = app.metric("gateway_updates_delivered_total", "sse").await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.restore();
    eprintln!("client module: network restored");
    // Both clients catch up with what was published during and after the
    // cut; the gap check below covers that whole window.
    let after_cut = *stream_update_ids(&app, Duration::from_secs(5))
        .await
        .last()
        .expect("updates on the stream");
    stdin.write_all(format!("WAIT {after_cut}\n").as_bytes()).await.unwrap();
    read_until(&mut lines, Duration::from_secs(40), |l| l == "CAUGHT UP").await;
    assert!(app.metric("gateway_updates_delivered_total", "ws").await > delivered);
    assert!(app.metric("gateway_updates_delivered_total", "sse").await > delivered_sse);

    // A reset: the client takes a new snapshot and goes on.
    let last = app.metric("gateway_updates_broadcast_total", "").await as u64;
    stdin.write_all(format!("RESET {last}\n").as_bytes()).await.unwrap();
    read_until(&mut lines, Duration::from_secs(30), |l| l == "RESET DONE").await;
    eprintln!("client module: re-snapshotted after a reset");

    // Quiet, then compare with the database.
    app.generator(false, None).await;
    // Quiet when the broadcast count stops moving (bounded: 30 s).
    let mut last = -1.0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(750)).await;
        let now = app.metric("gateway_updates_broadcast_total", "").await;
        if now == last {
            break;
        }
        last = now;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stdin.write_all(b"DUMP\n").await.unwrap();
    let dump: serde_json::Value =
        serde_json::from_str(&read_until(&mut lines, Duration::from_secs(30), |l| l.starts_with('{')).await).unwrap();
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;

    let stream = stream_update_ids(&app, Duration::from_secs(30)).await;
    let (_, page) = app.get_json("/products?limit=1000").await;
    let catalog: std::collections::HashMap<i64, &serde_json::Value> = page["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["product_id"].as_i64().unwrap(), p))
        .collect();
    for transport in ["ws", "sse"] {
        let run = &dump[transport];
        let statuses = run["statuses"].as_array().unwrap();
        assert!(
            statuses.iter().any(|s| s == "reconnecting"),
            "{transport}: never saw the cut: {statuses:?}"
        );
        let products = run["products"].as_array().unwrap();
        assert_eq!(products.len(), catalog.len(), "{transport}: every product held");
        for p in products {
            let db = catalog[&p["product_id"].as_i64().unwrap()];
            for field in ["price_cents", "stock", "price_version", "stock_version"] {
                assert_eq!(p[field], db[field], "{transport}: {field} of {p} vs the database {db}");
            }
        }
        // Offsets strictly increase (nothing twice), and up to the reset
        // every update the stream holds between the first and the last one
        // received was received: the cut left no gap.
        let offsets: Vec<u64> = run["offsets"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.as_u64())
            .collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{transport}: offsets out of order"
        );
        let before = &offsets[..run["before_reset"].as_u64().unwrap() as usize];
        let (first, last) = (before[0], *before.last().unwrap());
        assert!(
            last >= after_cut,
            "{transport}: the window ends at {last}, before the cut's end {after_cut}"
        );
        let got: std::collections::HashSet<u64> = before.iter().copied().collect();
        let expected: Vec<u64> = stream
            .iter()
            .copied()
            .filter(|id| (first..=last).contains(id))
            .collect();
        let missing: Vec<u64> = expected.iter().copied().filter(|id| !got.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "{transport}: {} of {} updates missing: {missing:?}",
            missing.len(),
            expected.len()
        );
        println!(
            "{transport}: {} stream updates from offset {first} to {last}, none missing",
            expected.len()
        );
        println!(
            "{transport}: {} updates applied, {} products equal to the database, statuses {:?}",
            offsets.len(),
            products.len(),
            statuses
        );
    }
    assert!(dump["ws"]["errors"].as_array().unwrap().iter().any(|e| e == "reset"));
    let png = std::fs::read(&shot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG"));
    app.stop().await;
}

/// The operator console in Chromium: started from the page, the generator's
/// rates show above zero within seconds; the dead letter published for the
/// test is listed with its reason and replayed. The screenshot is kept in
/// `artifacts/console.png`.
#[actix_rt::test]
async fn the_operator_console_shows_rates_and_replays_a_dead_letter() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let app = spawn_app().await;
    let mut watcher = testkit::clients::WsClient::connect(&app.address).await;
    watcher.subscribe(&["#"], None, false).await;
    testkit::TestPublisher::connect(&app.iso)
        .await
        .raw("product.price.7", b"{\"price\": \"cheap\"}", Some("application/json"))
        .await;
    testkit::eventually(Duration::from_secs(20), "the test's dead letter", || async {
        (!app.dead_letters().await.is_empty()).then_some(())
    })
    .await;

    let shot = root.join("artifacts/console.png");
    let _ = std::fs::remove_file(&shot);
    let run = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/console.mjs"))
        .arg(&app.address)
        .arg(testkit::ADMIN_TOKEN)
        .arg(&shot)
        .kill_on_drop(true)
        .output();
    // The socket must keep reading for delivered updates to count.
    let drain = async {
        loop {
            let _ = watcher.next(Duration::from_secs(1)).await;
        }
    };
    let out = tokio::select! {
        out = tokio::time::timeout(Duration::from_secs(90), run) => out.expect("browser run stops by itself").expect("node runs"),
        _ = drain => unreachable!(),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "console check failed:\n{stdout}\n{stderr}");
    let shown: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("JSON summary");
    println!("the console showed: {shown}");
    for rate in ["published", "applied", "delivered"] {
        let v: f64 = shown["shown"][rate].as_str().unwrap().parse().unwrap();
        assert!(v > 0.0, "{rate}: {shown}");
    }
    let letters = shown["letters"].as_array().unwrap();
    assert!(
        letters
            .iter()
            .any(|row| row[0] == "invalid_value" || row[0] == "wrong_schema" || row[0] == "not_json"),
        "the dead letter with its reason: {letters:?}"
    );
    assert!(
        letters
            .iter()
            .any(|row| row[2] == "product.price.7" && row[3].as_str().unwrap().contains("cheap"))
    );
    assert!(shown["replay"].as_str().unwrap().starts_with("replayed 1"), "{shown}");
    let png = std::fs::read(&shot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    let (_, generator) = app.admin(awc::http::Method::GET, "/admin/generator", None).await;
    assert_eq!(generator["running"], false, "stopped from the page: {generator}");
    app.stop().await;
}

/// Every update id on the instance's update stream, in order: a message at
/// stream offset `o` holding `n` updates has ids `o × 1024 + 0..n`. A copy
/// the relay published again (same `x-outbox-seq`) is counted once. Reads
/// until the stream is quiet for 2 s, or for `at_most` while it is not.
async fn stream_update_ids(app: &testkit::TestApp, at_most: Duration) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + at_most;
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    use lapin::types::{AMQPValue, FieldTable};

    let conn = lapin::Connection::connect(&app.iso.amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
    let stream = app.iso.settings().rabbit.topology.updates_stream;
    let mut consumer = ch
        .basic_consume(stream.as_str().into(), "".into(), BasicConsumeOptions::default(), args)
        .await
        .unwrap();
    let (mut ids, mut seqs) = (Vec::new(), std::collections::HashSet::new());
    while tokio::time::Instant::now() < deadline
        && let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        let seq = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-outbox-seq").cloned());
        if let Some(AMQPValue::LongLongInt(seq)) = seq
            && !seqs.insert(seq)
        {
            continue;
        }
        let offset = product_gateway::broadcast::stream::offset_of(&d).expect("a stream offset");
        let updates: Vec<serde_json::Value> = serde_json::from_slice(&d.data).unwrap();
        ids.extend((0..updates.len()).map(|i| product_gateway::update::update_id(offset, i)));
        d.ack(lapin::options::BasicAckOptions::default()).await.unwrap();
    }
    ids
}
