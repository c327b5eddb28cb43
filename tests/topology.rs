//! `rabbit/definitions.json` and the topology the service declares are the
//! same, both as the code states it and as the broker ends up holding it.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{rabbit_api_call, spawn_app};
use product_gateway::broker::topology::Topology;
use serde_json::Value;

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
