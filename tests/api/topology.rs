//! `rabbit/definitions.json` and the topology the service declares are the
//! same, both as the code states it and as the broker ends up holding it.

use std::collections::BTreeSet;
use std::path::Path;

use std::time::Duration;

use product_gateway::broker::topology::{Arg, Topology, field_table};
use product_gateway::settings::Secret;
use serde_json::Value;
use testkit::clients::WsClient;
use testkit::{TestPublisher, eventually, rabbit_api_call, spawn_app, spawn_app_with};

const T: Duration = Duration::from_secs(20);

fn definitions_file() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("rabbit/definitions.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The declared parts, without the vhost and keys the broker adds on export.
fn normalise(defs: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for section in ["exchanges", "queues", "bindings"] {
        for item in defs[section].as_array().unwrap_or(&vec![]) {
            let mut item = item.clone();
            let obj = item.as_object_mut().unwrap();
            obj.remove("vhost");
            if section == "exchanges" && obj["name"].as_str().unwrap_or("").is_empty() {
                continue;
            }
            if section == "queues" {
                obj.remove("type");
            }
            out.insert(format!("{section}: {item}"));
        }
    }
    out
}

#[test]
fn definitions_file_equals_the_declared_topology() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let settings = product_gateway::settings::Settings::load(&dir).unwrap();
    let declared = Topology::new(&settings.rabbit.topology).definitions("/");
    assert_eq!(normalise(&definitions_file()), normalise(&declared));
}

#[actix_rt::test]
async fn broker_holds_exactly_the_definitions_after_start() {
    let app = spawn_app().await;
    let (status, body) = rabbit_api_call(
        awc::http::Method::GET,
        &format!("/api/definitions/{}", app.iso.vhost),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let on_broker: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(normalise(&on_broker), normalise(&definitions_file()));
    app.stop().await;
}

/// `max_message_size` of a rabbitmq.conf file, if it sets one.
fn conf_max_message_size(path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "max_message_size")
        .and_then(|(_, v)| v.trim().parse().ok())
}

#[test]
fn shipped_broker_config_refuses_bodies_above_max_message_bytes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let settings = product_gateway::settings::Settings::load(&dir).unwrap();
    let limit = settings.rabbit.topology.max_message_bytes as u64;
    assert_eq!(
        conf_max_message_size("docker/rabbitmq.conf"),
        Some(limit),
        "docker/rabbitmq.conf (compose, and what scripts/services.sh installs for a broker it starts)"
    );
    // Far below RabbitMQ's default of 128 MiB, so prefetched oversize bodies
    // cannot take much memory, and above every event the decoder accepts.
    assert!(limit <= 1 << 20, "{limit}");
    assert!(limit >= settings.consumer.max_body_bytes as u64);
}

/// The shared broker's own `max_message_size`, as the node reports it: a
/// broker `scripts/services.sh` started holds the gateway's limit (256 KiB),
/// one started otherwise RabbitMQ's default (128 MiB). Without `rabbitmqctl`
/// the broker is the compose one, configured by `docker/rabbitmq.conf`.
async fn broker_max_message_size() -> u64 {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "eval", "application:get_env(rabbit, max_message_size)."])
        .output()
        .await;
    if let Ok(out) = out
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        let digits: String = text.chars().filter(char::is_ascii_digit).collect();
        return digits.parse().unwrap_or_else(|_| panic!("rabbitmqctl said {text:?}"));
    }
    conf_max_message_size("docker/rabbitmq.conf").unwrap()
}

#[actix_rt::test]
async fn service_reports_a_broker_that_accepts_bodies_above_max_message_bytes() {
    // 64 KiB is below any broker's limit (the gateway's 256 KiB, RabbitMQ's
    // default 128 MiB) and above what the default batch size needs: the
    // broker accepts the probe, and the service says so instead of assuming.
    let broker = broker_max_message_size().await;
    let setting = 64 << 10;
    assert!(broker > setting as u64, "broker limit {broker}");
    let app = spawn_app_with(|settings| settings.rabbit.topology.max_message_bytes = setting).await;
    let text = app.metrics_text().await;
    let line = text
        .lines()
        .find(|l| l.starts_with("gateway_broker_max_message_bytes "))
        .unwrap_or_else(|| panic!("no gateway_broker_max_message_bytes in /metrics"));
    println!("broker limit {broker}, setting {setting}: {line}");
    assert_eq!(line, "gateway_broker_max_message_bytes 0");
    app.stop().await;
}

#[actix_rt::test]
async fn broker_refuses_a_body_above_max_message_bytes_at_publish_time() {
    // With the setting at the broker's own limit, the broker refuses the
    // start-up probe one byte over it, and the service reads the broker's
    // limit from the refusal.
    let broker = broker_max_message_size().await;
    let app = spawn_app_with(|settings| {
        settings.rabbit.topology.max_message_bytes = broker as usize;
    })
    .await;
    let seen = app.metric("gateway_broker_max_message_bytes", "").await;
    println!("broker limit {broker} (rabbitmqctl), read from its refusal: {seen}");
    assert_eq!(seen, broker as f64);
    app.stop().await;
}

#[actix_rt::test]
async fn every_stage_moves_to_another_endpoint_when_its_node_goes_away() {
    let iso = testkit::Isolation::new().await;
    let a = testkit::proxy::Proxy::start(&iso.amqp_address()).await;
    let b = testkit::proxy::Proxy::start(&iso.amqp_address()).await;
    let mut settings = iso.settings();
    // Three endpoints; the first never answers, so connecting starts past it.
    settings.rabbit.urls = [1, a.port, b.port]
        .iter()
        .map(|port| Secret::new(iso.amqp_url_through(*port)))
        .collect();
    let app = testkit::spawn_with(iso.clone(), settings).await;
    let (on_a, on_b) = (a.open(), b.open());
    println!("connections through endpoint a: {on_a}, b: {on_b}");
    assert!(
        on_a > 0 && on_b > 0,
        "stages spread over the endpoints: a {on_a}, b {on_b}"
    );

    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.#"], None, false).await;
    let publisher = TestPublisher::connect(&iso).await;
    publisher.burst(&[(1, "price", 111, 1), (2, "stock", 5, 1)]).await;
    let before = ws.updates(2, T).await;

    // Node a goes away: its connections drop and it takes no new ones.
    a.cut();
    eventually(T, "the stages of endpoint a on endpoint b", || async {
        let moved = app.metric("gateway_broker_reconnects_total", "").await;
        (a.open() == 0 && b.open() > on_b && moved >= 1.0).then_some(())
    })
    .await;
    publisher.burst(&[(3, "price", 333, 1), (4, "stock", 7, 1)]).await;
    let after = ws.updates(2, T).await;
    // Price and stock apply on separate consumers: their order may differ.
    let mut topics: Vec<&str> = before
        .iter()
        .chain(&after)
        .map(|u| u["topic"].as_str().unwrap())
        .collect();
    topics.sort_unstable();
    assert_eq!(
        topics,
        [
            "product.price.1",
            "product.price.3",
            "product.stock.2",
            "product.stock.4"
        ],
        "each update once across the move"
    );
    if let Some(testkit::clients::WsEvent::Json(extra)) = ws.next(Duration::from_millis(500)).await {
        assert_ne!(extra["type"], "update", "no update twice: {extra}");
    }
    println!(
        "after the cut: {} connections through b, {} reconnects",
        b.open(),
        app.metric("gateway_broker_reconnects_total", "").await
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_queue_created_with_other_members_keeps_them_and_the_service_starts() {
    let iso = testkit::Isolation::new().await;
    let settings = iso.settings();
    // The apply queue and the stream as a release without member counts
    // declared them; the stream then with another count than the settings' 1.
    let topology = Topology::new(&settings.rabbit.topology);
    let conn = lapin::Connection::connect(&iso.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let old = [
        &settings.rabbit.topology.price_queue,
        &settings.rabbit.topology.updates_stream,
    ];
    for q in topology.queues.iter().filter(|q| old.contains(&&q.name)) {
        let mut args: Vec<_> = q
            .arguments
            .iter()
            .filter(|(k, _)| !k.contains("initial"))
            .cloned()
            .collect();
        assert!(
            args.len() < q.arguments.len(),
            "{} is declared with its members",
            q.name
        );
        // The stream with another count than the settings' 1.
        if q.name == settings.rabbit.topology.updates_stream {
            args.push(("x-initial-cluster-size", Arg::Int(2)));
        }
        let durable = lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(q.name.as_str().into(), durable, field_table(&args))
            .await
            .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;

    let app = testkit::spawn_with(iso.clone(), settings.clone()).await;
    let mut ws = WsClient::connect(&app.address).await;
    ws.subscribe(&["product.#"], None, false).await;
    TestPublisher::connect(&iso).await.burst(&[(1, "price", 111, 1)]).await;
    ws.updates(1, T).await;
    for q in old {
        let (status, body) =
            rabbit_api_call(awc::http::Method::GET, &format!("/api/queues/{}/{q}", iso.vhost), None).await;
        assert_eq!(status, 200, "{body}");
        let queue: Value = serde_json::from_str(&body).unwrap();
        let args = queue["arguments"].as_object().unwrap();
        let members = args
            .get("x-quorum-initial-group-size")
            .or(args.get("x-initial-cluster-size"))
            .and_then(Value::as_i64);
        let created_with = (q == &settings.rabbit.topology.updates_stream).then_some(2);
        assert_eq!(
            members, created_with,
            "{q} kept the arguments it was created with: {args:?}"
        );
    }
    app.stop().await;
}

/// Routable and unroutable messages in flight together on one channel:
/// every unroutable one is reported returned, never acked. (lapin alone
/// pairs a return with whichever ack it reads next: its own reading of
/// these messages reported 2 to 32 of the 1,334 acked, in each of five runs.)
#[actix_rt::test]
async fn among_many_in_flight_every_unroutable_message_is_reported_returned() {
    use product_gateway::broker::confirms::ConfirmChannel;
    use product_gateway::broker::publisher::{Confirmed, Outgoing};

    let app = testkit::spawn_app().await;
    app.generator(false, None).await;
    app.route_prices(false).await;
    let conn = lapin::Connection::connect(&app.iso.amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = ConfirmChannel::open(&conn).await.unwrap();
    let exchange = app.state.settings.rabbit.topology.events_exchange.clone();
    let mut pending = Vec::new();
    for i in 0..4000_u32 {
        let kind = if i % 3 == 0 { "price" } else { "stock" };
        // Unknown products: the consumer dead-letters them, nothing applies.
        let key = format!("product.{kind}.{}", 900_000 + i % 50);
        let m = Outgoing::json(&exchange, key, b"{}".to_vec(), format!("{kind}-{i}"), None);
        pending.push((kind, channel.publish(m).unwrap()));
    }
    let (mut lost, mut routed_returned, mut unroutable) = (0, 0, 0);
    for (kind, confirm) in pending {
        match (kind, confirm.await.unwrap()) {
            ("price", Confirmed::Ack) => lost += 1,
            ("price", _) => unroutable += 1,
            (_, Confirmed::Returned) => routed_returned += 1,
            (_, Confirmed::Ack) => {}
            (_, other) => panic!("a routed message {other:?}"),
        }
    }
    println!(
        "{unroutable} unroutable reported returned, {lost} reported acked; \
         {routed_returned} routed ones reported returned (an ack beside another message's return: fate unknown)"
    );
    assert_eq!(lost, 0, "unroutable messages reported acked");
    assert_eq!(unroutable, 1334);
    let _ = conn.close(200, "done".into()).await;
    app.stop().await;
}

/// A caller that gives up on its confirm (a client gone, a time-out)
/// leaves nothing behind that later confirms wait for: its message is
/// published and confirmed all the same.
#[actix_rt::test]
async fn a_confirm_given_up_holds_up_no_later_confirm() {
    use product_gateway::broker::confirms::ConfirmChannel;
    use product_gateway::broker::publisher::{Confirmed, Outgoing};

    let app = testkit::spawn_app().await;
    app.generator(false, None).await;
    let conn = lapin::Connection::connect(&app.iso.amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = ConfirmChannel::open(&conn).await.unwrap();
    let exchange = app.state.settings.rabbit.topology.events_exchange.clone();
    let message = |i: u32| {
        let key = format!("product.stock.{}", 900_000 + i);
        Outgoing::json(&exchange, key, b"{}".to_vec(), format!("abandoned-{i}"), None)
    };
    for i in 0..50 {
        drop(channel.publish(message(i)).expect("published"));
    }
    let confirm = channel.publish(message(50)).unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), confirm).await;
    assert_eq!(answer.ok(), Some(Ok(Confirmed::Ack)), "the next publish's confirm");
    let _ = conn.close(200, "done".into()).await;
    app.stop().await;
}

/// Messages published in a row reach their queue in the order of the
/// calls, although the caller waits for none of them to be written, and
/// although each goes on in a task of its own on a runtime of several
/// threads (as the generator's does).
#[actix_rt::test]
async fn messages_published_in_a_row_reach_their_queue_in_order() {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use product_gateway::broker::confirms::ConfirmChannel;
    use product_gateway::broker::publisher::{Confirmed, Outgoing};

    const N: usize = 3000;
    let app = testkit::spawn_app().await;
    let url = app.iso.amqp_url();
    let publish_and_read = async move {
        let conn = lapin::Connection::connect(&url, Default::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = ch
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .unwrap();
        let channel = ConfirmChannel::open(&conn).await.unwrap();
        let confirms: Vec<_> = (0..N)
            .map(|i| {
                let m = Outgoing::json("", queue.name().to_string(), b"{}".to_vec(), format!("m-{i}"), None);
                channel.publish(m).unwrap()
            })
            .collect();
        for (i, confirm) in confirms.into_iter().enumerate() {
            assert_eq!(confirm.await, Ok(Confirmed::Ack), "message {i}");
        }
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let mut consumer = ch
            .basic_consume(queue.name().clone(), "order".into(), no_ack, FieldTable::default())
            .await
            .unwrap();
        let mut ids = Vec::with_capacity(N);
        while ids.len() < N {
            let delivery = tokio::time::timeout(T, consumer.next())
                .await
                .expect("a delivery in time")
                .expect("the consumer is open")
                .unwrap();
            ids.push(delivery.properties.message_id().as_ref().map(|s| s.to_string()));
        }
        let _ = conn.close(200, "done".into()).await;
        ids
    };
    let ids = std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(publish_and_read)
    })
    .join()
    .unwrap();
    let out_of_place = (0..N).filter(|&i| ids[i] != Some(format!("m-{i}"))).count();
    assert_eq!(out_of_place, 0, "of {N} deliveries, out of the order published");
    app.stop().await;
}
