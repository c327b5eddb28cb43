//! Recovery from a refused snapshot in a real browser: Debian's Chromium,
//! driven by playwright-core (`tests/browser/recovery.mjs`). The instance
//! has one snapshot turn, held by a client of the test that asked for a
//! snapshot of a 100,000-product catalog and reads nothing; a page asking
//! for a snapshot meanwhile is refused `busy`. Once the test lets go of the
//! turn (drops that client), the page gets its snapshot with no action of
//! its own: a plain `EventSource` through the reconnect the refusal's
//! `retry:` asks for, the client module (`static/gateway-client.js`)
//! through its own retries, over WebSocket and over SSE.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use testkit::TestApp;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// An instance with a single snapshot turn, given up after 200 ms of
/// waiting, and a catalog far larger than the sockets buffer.
async fn app_with_one_snapshot_turn() -> TestApp {
    testkit::spawn_app_with(|s| {
        s.seed.products = 100_000;
        s.hub.max_concurrent_snapshots = 1;
        s.hub.snapshot_wait = Duration::from_millis(200);
        s.hub.snapshot_part_products = 10;
        // The held turn stays held until the test lets go of it.
        s.hub.snapshot_stall = Duration::from_secs(120);
        s.hub.client_timeout = Duration::from_secs(120);
    })
    .await
}

/// A client that asks for a snapshot of everything, takes the response
/// head and the first part, then reads nothing: the snapshot stops at the
/// full socket and holds its turn until this is dropped.
async fn hold_the_snapshot_turn(app: &TestApp) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(([127, 0, 0, 1], app.port).into()).await.unwrap();
    let head = format!(
        "GET /events?topics=%23&snapshot=true HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
        app.port
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 256];
    let read = async {
        while !String::from_utf8_lossy(&got).contains("event: snapshot\n") {
            let n = stream.read(&mut chunk).await.expect("the held snapshot's stream");
            assert!(n > 0, "the held snapshot ended: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the held snapshot's first part in time");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    stream
}

/// Runs `recovery.mjs` in `mode` while the turn is held, lets go of it once
/// the page was refused, and returns what the page saw.
async fn page_run(app: &TestApp, mode: &str) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("tests/browser/node_modules/playwright-core").exists(),
        "playwright-core is missing: run `make test` (or `scripts/tools.sh chromium`) to install it"
    );
    let holder = hold_the_snapshot_turn(app).await;
    let mut child = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/recovery.mjs"))
        .arg(&app.address)
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let refused = next_line(&mut lines, Duration::from_secs(60), |l| l == "REFUSED").await;
    // The page marks the moment first: what it saw before the mark, it saw
    // while the turn was held.
    let marked = match refused {
        Some(_) => {
            stdin.write_all(b"RELEASE\n").await.unwrap();
            next_line(&mut lines, Duration::from_secs(20), |l| l == "MARKED").await
        }
        None => None,
    };
    // Whatever the page saw, the turn is given back.
    drop(holder);
    let summary = match marked {
        Some(_) => next_line(&mut lines, Duration::from_secs(60), |l| l.starts_with('{')).await,
        None => None,
    };
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    let _ = child.start_kill();
    let stderr = tokio::time::timeout(Duration::from_secs(5), stderr)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let Some(summary) = summary else {
        panic!(
            "{mode}: the browser script gave no summary (refused: {}, marked: {})\n{stderr}",
            refused.is_some(),
            marked.is_some()
        );
    };
    serde_json::from_str(&summary).unwrap_or_else(|e| panic!("{mode}: JSON summary: {e}\n{summary}\n{stderr}"))
}

type Lines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// The first line from the browser script that satisfies `done`; None when
/// the script ends or `within` passes first.
async fn next_line(lines: &mut Lines, within: Duration, done: impl Fn(&str) -> bool) -> Option<String> {
    tokio::time::timeout(within, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if done(&line) {
                return Some(line);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// The entries of a page's log (`[ms, what, …]`) before and after the test
/// let go of the turn.
fn split_at_release(log: &Value) -> (Vec<&Value>, Vec<&Value>) {
    let log = log.as_array().expect("a log");
    let at = log
        .iter()
        .position(|e| e[1] == "RELEASE")
        .expect("the release in the log");
    (log[..at].iter().collect(), log[at + 1..].iter().collect())
}

#[actix_rt::test]
async fn a_plain_event_source_page_recovers_from_busy() {
    let app = app_with_one_snapshot_turn().await;
    let seen = page_run(&app, "eventsource").await;
    println!("the page saw: {seen}");
    let (before, after) = split_at_release(&seen["log"]);
    assert!(
        before.iter().any(|e| e[1] == "error event" && e[2] == "busy"),
        "refused with an `error` event `busy` while the turn was held: {seen}"
    );
    assert!(
        before
            .iter()
            .filter(|e| e[1] == "error event" && e[2] == "busy")
            .all(|e| e[3].as_u64().is_some_and(|ms| ms > 0)),
        "a busy event carries its retry_ms: {seen}"
    );
    assert!(
        !before.iter().any(|e| e[1] == "snapshot_end"),
        "no snapshot while the turn was held: {seen}"
    );
    let end = after
        .iter()
        .find(|e| e[1] == "snapshot_end")
        .unwrap_or_else(|| panic!("the EventSource got its snapshot by itself once the turn was free: {seen}"));
    assert_eq!(end[2], 3, "the snapshot of the page's three products: {seen}");
    assert!(
        app.metric("gateway_client_errors_total", "busy").await >= 1.0,
        "busy answers are counted"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn the_client_module_recovers_from_busy() {
    let app = app_with_one_snapshot_turn().await;
    let seen = page_run(&app, "module").await;
    println!("the page saw: {seen}");
    for transport in ["ws", "sse"] {
        let run = &seen[transport];
        let (before, after) = split_at_release(&run["log"]);
        assert!(
            before.iter().any(|e| e[1] == "error" && e[2] == "busy"),
            "{transport}: refused `busy` while the turn was held: {run}"
        );
        assert!(
            !before.iter().any(|e| e[1] == "state"),
            "{transport}: no snapshot while the turn was held: {run}"
        );
        let state = after
            .iter()
            .rfind(|e| e[1] == "state")
            .unwrap_or_else(|| panic!("{transport}: a state event once the turn was free: {run}"));
        assert_eq!(state[2], 3, "{transport}: the state carries the snapshot: {run}");
        // Honest status: not `open` before the service took the subscription.
        let last_busy = run["log"]
            .as_array()
            .unwrap()
            .iter()
            .rposition(|e| e[1] == "error" && e[2] == "busy")
            .unwrap();
        assert!(
            !run["log"].as_array().unwrap()[..last_busy]
                .iter()
                .any(|e| e[1] == "status" && e[2] == "open"),
            "{transport}: `open` before it was subscribed: {run}"
        );
        assert_eq!(run["status"], "open", "{transport}: {run}");
        let mut ids: Vec<i64> = run["products"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["product_id"].as_i64().unwrap())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 3], "{transport}: {run}");
        assert!(
            run["products"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["price_cents"].is_i64() && p["stock"].is_i64() && p["name"].is_string()),
            "{transport}: the snapshot's values: {run}"
        );
    }
    // Over WebSocket the refused subscribe was asked again, with its snapshot.
    let subscribes = seen["subscribes"].as_array().unwrap();
    assert!(subscribes.len() >= 2, "the subscribe asked again: {subscribes:?}");
    assert!(
        subscribes
            .iter()
            .all(|s| s.as_str().unwrap().contains("\"snapshot\":true")),
        "each time with the snapshot: {subscribes:?}"
    );
    assert!(
        app.metric("gateway_client_errors_total", "busy").await >= 2.0,
        "busy answers are counted, over both transports"
    );
    app.stop().await;
}

/// The client module cut off as a slow consumer (WebSocket close 4002, an
/// SSE `error` event `slow_consumer`, each as the service sends it and
/// handed to the connection's own handlers) reconnects by itself and
/// resumes from its last offset, without a new snapshot: no offset comes
/// twice, and once the generator stops its state equals the database.
#[actix_rt::test]
async fn the_client_module_resumes_from_its_offset_after_a_slow_consumer_cut_off() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let app = testkit::spawn_app().await;
    let (status, _) = app.generator(true, Some(30)).await;
    assert_eq!(status, 200);
    let mut child = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/cutoff.mjs"))
        .arg(&app.address)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    next_line(&mut lines, Duration::from_secs(60), |l| l == "READY")
        .await
        .expect("both clients hold a snapshot and updates");
    stdin.write_all(b"CUT\n").await.unwrap();
    next_line(&mut lines, Duration::from_secs(45), |l| l == "RESUMED")
        .await
        .expect("both clients open again, with updates after the cut");

    // Quiet: the generator stopped and the broadcast count still (bounded).
    app.generator(false, None).await;
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
    let dump = next_line(&mut lines, Duration::from_secs(30), |l| l.starts_with('{'))
        .await
        .expect("the clients' state");
    let dump: Value = serde_json::from_str(&dump).unwrap();
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;

    let (_, page) = app.get_json("/products?limit=1000").await;
    let catalog: std::collections::HashMap<i64, &Value> = page["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["product_id"].as_i64().unwrap(), p))
        .collect();
    for transport in ["ws", "sse"] {
        let run = &dump[transport];
        let errors = run["errors"].as_array().unwrap();
        assert!(errors.iter().any(|e| e == "slow_consumer"), "{transport}: {errors:?}");
        let statuses = run["statuses_after_cut"].as_array().unwrap();
        assert!(
            statuses.first().is_some_and(|s| s == "reconnecting") && statuses.last().is_some_and(|s| s == "open"),
            "{transport}: reconnected by itself: {statuses:?}"
        );
        let offsets: Vec<u64> = run["offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{transport}: an offset twice or out of order: {offsets:?}"
        );
        let products = run["products"].as_array().unwrap();
        assert_eq!(products.len(), catalog.len(), "{transport}: every product held");
        for p in products {
            let db = catalog[&p["product_id"].as_i64().unwrap()];
            for field in ["price_cents", "stock", "price_version", "stock_version"] {
                assert_eq!(p[field], db[field], "{transport}: {field} of {p} vs the database {db}");
            }
        }
        println!(
            "{transport}: cut off at offset {}, {} updates in all, statuses after the cut {statuses:?}",
            run["cut_at"],
            offsets.len()
        );
    }
    // What each asked the service for after the cut: its offset, no snapshot.
    let cut_at = dump["ws"]["cut_at"]
        .as_u64()
        .expect("the WebSocket client's offset at the cut");
    let subscribe = &dump["subscribes_after_cut"][0];
    assert_eq!(subscribe["since"], cut_at, "{subscribe}");
    assert!(subscribe.get("snapshot").is_none(), "{subscribe}");
    let cut_at = dump["sse"]["cut_at"]
        .as_u64()
        .expect("the SSE client's offset at the cut");
    let url = dump["events_requests_after_cut"][0].as_str().expect("an SSE reconnect");
    assert!(
        url.contains(&format!("since={cut_at}")) && !url.contains("snapshot"),
        "{url}"
    );
    app.stop().await;
}
