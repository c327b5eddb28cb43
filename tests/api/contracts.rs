//! Contracts checked by tools nobody here wrote: `/metrics` by Prometheus's
//! own linter (promtool), the HTTP API by schemathesis against
//! `/openapi.json`, `docs/asyncapi.yaml` by the AsyncAPI parser, and real
//! messages and frames by a JSON Schema validator against
//! `docs/schemas/gateway.schema.json`.

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
    std::fs::create_dir_all(&report).expect("create target/schemathesis");
    // A cache left in the source tree by an older run (it is ignored) would
    // hide a new one: gone first, checked after.
    let stray = testkit::repo_root().join(".schemathesis");
    let _ = std::fs::remove_dir_all(&stray);
    let tool = schemathesis();
    // Run from under target/: schemathesis keeps a cache in its working
    // folder, which must not land in the source tree.
    let run = tokio::process::Command::new(&tool)
        .current_dir(&report)
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
    assert!(!stray.exists(), "schemathesis wrote its cache into the source tree");
    app.stop().await;
}

/// The JSON Schemas of docs/schemas, one validator per definition.
struct Schemas {
    doc: serde_json::Value,
}

impl Schemas {
    fn load() -> Self {
        let path = testkit::repo_root().join("docs/schemas/gateway.schema.json");
        let doc = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        Schemas { doc }
    }

    fn of(&self, def: &str) -> jsonschema::Validator {
        assert!(self.doc["$defs"][def].is_object(), "no definition {def}");
        let mut schema = self.doc.clone();
        schema["$ref"] = json!(format!("#/$defs/{def}"));
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap()
    }
}

/// Counts what was validated, by kind, and fails on the first mismatch.
#[derive(Default)]
struct Tally(std::collections::BTreeMap<&'static str, usize>);

impl Tally {
    fn check(&mut self, kind: &'static str, v: &jsonschema::Validator, instance: &serde_json::Value) {
        let errors: Vec<String> = v
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{kind} does not match its schema: {instance}\n{errors:#?}"
        );
        *self.0.entry(kind).or_default() += 1;
    }
}

#[actix_rt::test]
async fn real_messages_and_frames_match_the_published_schemas() {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};

    const SECRET: &str = "a-schema-test-secret-of-32-bytes-or-more";
    let schemas = Schemas::load();
    let (event, batch, update, server, client, dead) = (
        schemas.of("Event"),
        schemas.of("UpdateBatch"),
        schemas.of("Update"),
        schemas.of("ServerFrame"),
        schemas.of("ClientFrame"),
        schemas.of("DeadLetterHeaders"),
    );
    let sse_data = |name: &str| match name {
        "price" | "stock" => schemas.of("Update"),
        "snapshot" => schemas.of("SnapshotPart"),
        "snapshot_end" => schemas.of("SnapshotEnd"),
        "reset" => schemas.of("Reset"),
        "error" => schemas.of("Error"),
        other => panic!("an SSE event the schema does not name: {other}"),
    };
    // The schemas are not vacuous: malformed instances fail them.
    assert!(!client.is_valid(&json!({ "op": "subscribe" })));
    assert!(!client.is_valid(&json!({ "op": "subscribe", "topics": ["#"], "extra": 1 })));
    assert!(!update.is_valid(&json!({ "product_id": 1, "kind": "price", "price_cents": 5, "occurred_at": "2026-11-26T00:00:00Z", "ts_us": 1 })));
    assert!(!event.is_valid(&json!({ "schema": 1, "product_id": 1, "kind": "price", "price_cents": 5, "stock": 1, "version": 1, "occurred_at": "2026-11-26T00:00:00Z", "ts_us": 1 })));
    assert!(!server.is_valid(&json!({ "type": "update", "offset": 1, "topic": "product.price.1", "data": {} })));

    let app = testkit::spawn_app_with(|s| {
        s.auth.hs256_secret = product_gateway::settings::Secret::new(SECRET);
    })
    .await;
    let topology = app.iso.settings().rabbit.topology;
    let mut tally = Tally::default();

    // A tap on the events exchange: every event published from here on.
    let conn = lapin::Connection::connect(&app.iso.amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let tap = ch
        .queue_declare("".into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        tap.name().clone(),
        topology.events_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let mut ws = WsClient::connect(&app.address).await;
    let sent = [
        json!({ "op": "subscribe", "topics": ["#"], "snapshot": true }),
        json!({ "op": "subscribe", "topics": ["product.price.4"], "since": 0 }),
    ];
    for frame in &sent {
        tally.check("client frame", &client, frame);
        ws.send(frame.clone()).await;
    }
    let mut sse = SseClient::connect(&app.address, "topics=%23&snapshot=true", None)
        .await
        .unwrap();

    // Traffic through every producer: the generator, the ingest API, and a
    // poison message for a dead letter.
    app.generator(true, Some(40)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.generator(false, None).await;
    let (status, _, _) = app.ingest("price", 4, json!({ "price_cents": 777 }), None).await;
    assert_eq!(status, 202);
    TestPublisher::connect(&app.iso)
        .await
        .raw("product.price.4", b"{\"not\": \"an event\"}", Some("application/json"))
        .await;

    // WebSocket: everything up to a good number of updates, then the other
    // frames a client can cause.
    let mut updates = 0;
    while updates < 20 {
        match ws.next(T).await {
            Some(testkit::clients::WsEvent::Json(frame)) => {
                updates += usize::from(frame["type"] == "update");
                tally.check("WebSocket frame", &server, &frame);
            }
            other => panic!("the socket ended: {other:?}"),
        }
    }
    let token = product_gateway::http::auth::sign_hs256(
        &app.state.settings.auth,
        "schema-test",
        &["product.#".into()],
        Duration::from_secs(60),
    )
    .unwrap();
    for frame in [
        json!({ "op": "auth", "token": token }),
        json!({ "op": "unsubscribe", "topics": ["product.price.4"] }),
    ] {
        tally.check("client frame", &client, &frame);
        ws.send(frame).await;
    }
    ws.send_text("{not json").await;
    for ty in ["authorized", "unsubscribed", "error"] {
        let frame = ws.next_of(ty, T).await;
        tally.check("WebSocket frame", &server, &frame);
    }
    // Frames the service builds for conditions a test cannot cheaply cause,
    // from the same serialisers: every reset reason and error code.
    for reason in product_gateway::update::ResetReason::ALL {
        let frame = product_gateway::hub::session::reset_json(42, reason);
        tally.check("WebSocket frame", &server, &frame);
    }
    for code in product_gateway::hub::session::ClientErrorCode::ALL {
        let e = product_gateway::hub::session::ClientError::new(code, "m");
        tally.check("WebSocket frame", &server, &serde_json::from_str(&e.to_json()).unwrap());
    }

    // SSE: each event's data by its event name.
    let mut sse_updates = 0;
    while sse_updates < 20 {
        let e = sse.next(T).await.expect("SSE events");
        sse_updates += usize::from(e.event == "price" || e.event == "stock");
        tally.check("SSE event", &sse_data(&e.event), &e.data);
    }

    // The events exchange, as tapped.
    while let Some(m) = ch
        .basic_get(tap.name().clone(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let body: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
        if body.get("not").is_none() {
            tally.check("AMQP event", &event, &body);
        }
    }

    // The update stream from its first message, headers included.
    let stream_ch = conn.create_channel().await.unwrap();
    stream_ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
    let mut consumer = stream_ch
        .basic_consume(
            topology.updates_stream.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .unwrap();
    let mut messages = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
        let headers = d.properties.headers().clone().unwrap_or_default();
        for h in ["x-txid", "x-outbox-seq"] {
            assert!(
                matches!(headers.inner().get(h), Some(AMQPValue::LongLongInt(_))),
                "{h} on a stream message"
            );
        }
        tally.check("stream message", &batch, &serde_json::from_slice(&d.data).unwrap());
        messages += 1;
    }
    assert!(messages > 0, "no stream message read");

    // The dead letter's headers.
    let dead_letter = testkit::eventually(T, "the poison message dead-lettered", || async {
        ch.basic_get(
            topology.dead_letter_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    })
    .await;
    let headers = dead_letter.delivery.properties.headers().clone().unwrap_or_default();
    let mut as_json = serde_json::Map::new();
    for (k, v) in headers.inner() {
        if let AMQPValue::LongString(s) = v {
            as_json.insert(k.to_string(), json!(String::from_utf8_lossy(s.as_bytes())));
        }
    }
    tally.check("dead letter", &dead, &serde_json::Value::Object(as_json));

    println!("validated against docs/schemas/gateway.schema.json: {:?}", tally.0);
    for kind in [
        "AMQP event",
        "stream message",
        "WebSocket frame",
        "SSE event",
        "client frame",
        "dead letter",
    ] {
        assert!(tally.0.get(kind).is_some_and(|n| *n > 0), "nothing validated of {kind}");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn the_asyncapi_document_passes_the_asyncapi_parser() {
    let root = testkit::repo_root();
    let run = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/asyncapi.mjs"))
        .arg(root.join("docs/asyncapi.yaml"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the parser finishes within a minute")
        .expect("node runs (`make test` installs tests/browser's packages)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", said.trim());
    assert!(out.status.success(), "docs/asyncapi.yaml:\n{said}");
    assert!(said.contains("5 channels, 7 operations, 10 messages"), "{said}");
}

/// Every `gateway_*` metric name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("gateway_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[actix_rt::test]
async fn alert_rules_and_the_dashboard_pass_promtool_and_name_only_metrics_the_service_has() {
    let root = testkit::repo_root();
    let out = Command::new(promtool())
        .args(["check", "rules"])
        .arg(root.join("docs/alerts.yml"))
        .output()
        .expect("promtool runs (`make test` unpacks it into target/tools)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("promtool check rules: {}", said.trim().replace('\n', " | "));
    assert!(out.status.success(), "{said}");

    let app = spawn_app().await;
    // Labelled families show once they have a sample: a dead letter, and
    // the lag sampler's first round (every 2 s).
    TestPublisher::connect(&app.iso)
        .await
        .raw("product.price.1", b"not json", Some("application/json"))
        .await;
    let exposed = testkit::eventually(T, "every family sampled", || async {
        let text = app.metrics_text().await;
        (text.contains("gateway_events_dead_lettered_total{") && text.contains("gateway_consumer_lag_messages{"))
            .then_some(text)
    })
    .await;
    let has = |name: &str| {
        exposed.contains(&format!("# TYPE {name} "))
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                name.strip_suffix(s)
                    .is_some_and(|base| exposed.contains(&format!("# TYPE {base} histogram")))
            })
    };
    for file in ["docs/alerts.yml", "docs/grafana-dashboard.json"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let names = metric_names(&text);
        assert!(names.len() >= 4, "{file}: {names:?}");
        let unknown: Vec<&String> = names.iter().filter(|n| !has(n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the service does not have: {unknown:?}"
        );
        println!("{file}: {} metric names, all exposed", names.len());
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("docs/grafana-dashboard.json")).unwrap()).unwrap();
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 6));
    app.stop().await;
}
