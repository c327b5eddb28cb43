//! `rabbit/definitions.json` and the topology the service declares are the
//! same, both as the code states it and as the broker ends up holding it.

use std::collections::BTreeSet;
use std::path::Path;

use product_gateway::broker::topology::Topology;
use serde_json::Value;
use testkit::{rabbit_api_call, spawn_app, spawn_app_with};

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
