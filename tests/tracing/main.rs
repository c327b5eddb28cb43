//! Traces end to end, against a real OTLP receiver: one ingested price
//! change is one trace from the ingest API to the socket write, each hop
//! the child of the one before, its spans inside the end-to-end time the
//! client measured; an upstream's `traceparent` is continued; a collector
//! that is gone changes nothing for clients. One test: the trace exporter
//! is the process's, set up once.

mod receiver;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::trace::v1::Span;
use product_gateway::settings::TracingSettings;
use receiver::Receiver;
use serde_json::json;
use testkit::clients::{SseClient, WsClient};
use testkit::{INGEST_TOKEN, eventually, spawn_app};

const T: Duration = Duration::from_secs(20);
/// The hops of a change, in order: each span the parent of the next.
const HOPS: [&str; 6] = ["ingest", "publish", "apply", "relay", "fan_out", "deliver"];

const UPSTREAM_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const UPSTREAM_SPAN: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// POSTs a price change with an optional upstream traceparent: the status
/// and the `traceresponse` header.
async fn post_price(app: &testkit::TestApp, id: i64, cents: i64, traceparent: Option<&str>) -> (u16, Option<String>) {
    let mut req = app
        .client()
        .post(app.url(&format!("/products/{id}/price")))
        .insert_header(("Authorization", format!("Bearer {INGEST_TOKEN}")));
    if let Some(tp) = traceparent {
        req = req.insert_header(("traceparent", tp));
    }
    let res = req
        .send_json(&json!({ "price_cents": cents }))
        .await
        .expect("ingest request");
    let trace = res
        .headers()
        .get("traceresponse")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (res.status().as_u16(), trace)
}

/// The spans of one trace, by hop name; None until every hop is there.
fn hops_of(spans: &[Span], trace_id: &str) -> Option<Vec<Span>> {
    HOPS.iter()
        .map(|name| {
            spans
                .iter()
                .find(|s| s.name == *name && hex(&s.trace_id) == trace_id)
                .cloned()
        })
        .collect()
}

#[actix_rt::test]
async fn one_ingested_change_is_one_trace_from_the_upstream_to_the_socket() {
    let receiver = Receiver::start();
    let traces = product_gateway::telemetry::init(
        &TracingSettings {
            otlp_endpoint: receiver.endpoint.clone(),
            sample_ratio: 1.0,
        },
        "warn",
    )
    .unwrap();
    assert!(traces.on(), "the first init of the process sets up the exporter");
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.price.3"], None, false).await;

    // An upstream system's change, under its own trace.
    let upstream = format!("00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01");
    let (sent_at, started) = (unix_nanos(), Instant::now());
    let (status, answered) = post_price(&app, 3, 4321, Some(&upstream)).await;
    assert_eq!(status, 202);
    let update = ws.next_of("update", T).await;
    let end_to_end = started.elapsed();
    let received_at = unix_nanos();
    assert_eq!(update["data"]["price_cents"], 4321, "{update}");
    let answered = answered.expect("a traceresponse header");
    assert!(
        answered.starts_with(&format!("00-{UPSTREAM_TRACE}-")),
        "continued: {answered}"
    );

    let flush = tokio::task::spawn_blocking(move || {
        traces.flush();
        traces
    });
    let traces = flush.await.unwrap();
    let hops = eventually(T, "every hop's span at the receiver", || async {
        hops_of(&receiver.received.spans(), UPSTREAM_TRACE)
    })
    .await;
    // Each hop is the child of the one before; the first, of the upstream's.
    assert_eq!(hex(&hops[0].parent_span_id), UPSTREAM_SPAN);
    for pair in hops.windows(2) {
        assert_eq!(
            hex(&pair[1].parent_span_id),
            hex(&pair[0].span_id),
            "{} is the child of {}",
            pair[1].name,
            pair[0].name
        );
    }
    // In order in time, and inside what the client measured.
    for pair in hops.windows(2) {
        assert!(
            pair[0].start_time_unix_nano <= pair[1].start_time_unix_nano,
            "{} starts before {}",
            pair[0].name,
            pair[1].name
        );
    }
    // Every hop starts between the request and the client's read (the
    // write's span may end after the client has read the frame).
    let first = hops[0].start_time_unix_nano;
    for s in &hops {
        assert!(
            (sent_at..=received_at).contains(&s.start_time_unix_nano),
            "{} starts within the request and its delivery",
            s.name
        );
    }
    let traced = Duration::from_nanos(hops[5].start_time_unix_nano - first);
    assert!(
        traced <= end_to_end,
        "publish to socket write {traced:?} within the measured {end_to_end:?}"
    );
    // The trace as the receiver reconstructs it (the README shows one).
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut tree = format!(
        "trace {UPSTREAM_TRACE} (client: posted → update read {:.2} ms)\n",
        end_to_end.as_secs_f64() * 1e3
    );
    for (depth, s) in hops.iter().enumerate() {
        tree += &format!(
            "{:indent$}{} {} parent {}  starts +{:.2} ms, lasts {:.2} ms\n",
            "",
            s.name,
            hex(&s.span_id),
            hex(&s.parent_span_id),
            ms(s.start_time_unix_nano - first),
            ms(s.end_time_unix_nano - s.start_time_unix_nano),
            indent = depth * 2
        );
    }
    eprintln!("{tree}");

    // The traced delivery's latency carries its trace id as an exemplar,
    // in OpenMetrics (classic text has no exemplars).
    let mut res = app
        .client()
        .get(app.url("/metrics"))
        .insert_header(("Accept", "application/openmetrics-text; version=1.0.0"))
        .send()
        .await
        .unwrap();
    let open_metrics = String::from_utf8(res.body().limit(16 << 20).await.unwrap().to_vec()).unwrap();
    let exemplar = format!("# {{trace_id=\"{UPSTREAM_TRACE}\"}}");
    assert!(
        open_metrics
            .lines()
            .any(|l| l.starts_with("gateway_traced_delivery_latency_seconds_bucket") && l.contains(&exemplar)),
        "no exemplar {exemplar} in:\n{open_metrics}"
    );
    assert!(
        !app.metrics_text().await.contains(" # {"),
        "classic text without exemplars"
    );

    // An SSE client's delivery ends its trace as well.
    let mut sse = SseClient::connect(&app.address, "topics=product.price.4", None)
        .await
        .unwrap();
    let sse_trace = "0af7651916cd43dd8448eb211c80319c";
    let (status, _) = post_price(&app, 4, 777, Some(&format!("00-{sse_trace}-b7ad6b7169203331-01"))).await;
    assert_eq!(status, 202);
    assert_eq!(sse.updates(1, T).await[0].data["price_cents"], 777);
    let traces = tokio::task::spawn_blocking(move || {
        traces.flush();
        traces
    })
    .await
    .unwrap();
    let sse_hops = eventually(T, "the SSE delivery's trace at the receiver", || async {
        hops_of(&receiver.received.spans(), sse_trace)
    })
    .await;
    for pair in sse_hops.windows(2) {
        assert_eq!(hex(&pair[1].parent_span_id), hex(&pair[0].span_id));
    }
    let transport = sse_hops[5]
        .attributes
        .iter()
        .find(|a| a.key == "transport")
        .and_then(|a| a.value.clone())
        .map(|v| format!("{v:?}"));
    assert!(
        transport.is_some_and(|t| t.contains("sse")),
        "{:?}",
        sse_hops[5].attributes
    );

    // A change without an upstream trace starts one of its own.
    let (status, own) = post_price(&app, 3, 4322, None).await;
    assert_eq!(status, 202);
    let own = own.expect("a traceresponse header");
    assert!(!own.contains(UPSTREAM_TRACE), "{own}");
    ws.next_of("update", T).await;

    // The collector gone: answers and deliveries go on as before.
    receiver.stop().await;
    for cents in 5000..5010 {
        let started = Instant::now();
        let (status, _) = post_price(&app, 3, cents, None).await;
        assert_eq!(status, 202);
        let update = ws.next_of("update", T).await;
        assert_eq!(update["data"]["price_cents"], cents, "{update}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
    app.stop().await;
    drop(traces);
}
