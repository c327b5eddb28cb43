//! The chaos run's processes: gateway instances started from the built
//! binary, the scripts that inject faults, and the admin and readiness
//! calls the run makes to them.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::Plan;
use super::plan::Site;
use crate::{ADMIN_TOKEN, Isolation, redis_url, repo_root};

/// A script of `scripts/` with these arguments; its standard output.
pub(super) async fn script(name: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new("bash")
        .arg(repo_root().join("scripts").join(name))
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("scripts/{name} runs: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `scripts/cluster.sh` with these arguments; its standard output.
pub async fn cluster(args: &[&str]) -> String {
    script("cluster.sh", args).await
}

/// A fault of `scripts/faults.sh` on the local services.
pub(super) async fn inject(cmd: &str) {
    script("faults.sh", &[cmd]).await;
}

/// `scripts/netlab.sh` with these arguments; its standard output.
pub async fn netlab(args: &[&str]) -> String {
    script("netlab.sh", args).await
}

/// Whether the lab's kernel can make slow links (`netlab.sh can-slow`).
pub(super) async fn netlab_can_slow() -> bool {
    tokio::process::Command::new("bash")
        .arg(repo_root().join("scripts/netlab.sh"))
        .arg("can-slow")
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

/// Where a gateway instance runs and answers: on this machine's loopback,
/// or on a host of the network lab (`scripts/netlab.sh`).
#[derive(Clone)]
pub(super) struct Place {
    pub(super) name: &'static str,
    /// The lab host (its namespace) the instance runs on.
    host: Option<&'static str>,
    address: String,
    port: u16,
}

impl Place {
    /// Instance `name`'s place: in the lab, a gateway host of its own.
    pub(super) async fn of(name: &'static str, plan: &Plan) -> Place {
        match plan.site {
            Site::Lab => {
                let host = if name == "a" { "g1" } else { "g2" };
                Place {
                    name,
                    host: Some(host),
                    address: netlab(&["addr", host]).await,
                    port: 8080,
                }
            }
            Site::Local | Site::Cluster => Place {
                name,
                host: None,
                address: "127.0.0.1".into(),
                port: free_port(),
            },
        }
    }

    pub(super) fn base(&self) -> String {
        format!("http://{}:{}", self.address, self.port)
    }
}

/// One gateway process, killed when dropped.
pub(super) struct Instance {
    child: Option<tokio::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The broker nodes' URLs with the isolation's vhost; in the lab, instance
/// b's list starts at another node than a's, so a cut of one node leaves
/// one instance on it and the other not.
pub(super) async fn broker_urls(iso: &Isolation, place: &Place, plan: &Plan) -> Option<Vec<String>> {
    let list = match plan.site {
        Site::Local => return None,
        Site::Cluster => cluster(&["urls"]).await,
        Site::Lab => netlab(&["urls"]).await,
    };
    let mut urls: Vec<String> = list
        .split(',')
        .map(|u| format!("{}/{}", u.trim_end_matches("/%2f"), iso.vhost))
        .collect();
    if place.host == Some("g2") {
        urls.rotate_left(1);
    }
    Some(urls)
}

impl Instance {
    pub(super) async fn start(iso: &Isolation, place: &Place, plan: &Plan) -> Instance {
        let logs = repo_root().join("target/chaos-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{}.log", place.name)))
            .unwrap();
        let mut command = match place.host {
            Some(host) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", &format!("gwlab-{host}"), plan.gateway]);
                // Snapshots from the lab's streaming standby.
                let name = iso.database_url.rsplit('/').next().unwrap_or_default();
                let standby = netlab(&["addr", "replica"]).await;
                c.env(
                    "GATEWAY__DATABASE__READ_URL",
                    format!("postgres://postgres@{standby}:5432/{name}"),
                );
                // A node cut from this host is dropped by the broker after
                // two missed heartbeats, and the deliveries its consumers
                // held go to the others only then.
                c.env("GATEWAY__RABBIT__HEARTBEAT_SECS", "5");
                if place.name == "a" {
                    // a's snapshots wait for a lagging standby (up to 15 s);
                    // b's read on the primary past the default 1 s.
                    c.env("GATEWAY__DATABASE__REPLICA_MAX_LAG_MS", "15000");
                }
                c
            }
            None => tokio::process::Command::new(plan.gateway),
        };
        if let Some(urls) = broker_urls(iso, place, plan).await {
            command
                .env("GATEWAY__RABBIT__URLS", urls.join(","))
                .env("GATEWAY__RABBIT__TOPOLOGY__REPLICAS", "3")
                .env("GATEWAY__RABBIT__MANAGEMENT_URL", crate::rabbit_api());
        }
        let child = command
            .arg("serve")
            .env("GATEWAY_CONFIG_DIR", repo_root().join("config"))
            .env("GATEWAY__SERVER__HOST", &place.address)
            .env("GATEWAY__SERVER__PORT", place.port.to_string())
            .env("GATEWAY__SERVER__STATIC_DIR", repo_root().join("static"))
            .env("GATEWAY__ADMIN__TOKEN", ADMIN_TOKEN)
            .env("GATEWAY__ADMIN__DEV_MODE", "false")
            // The run's clients are anonymous and watch `product.#` too.
            .env("GATEWAY__AUTH__ANONYMOUS_PATTERNS", "#")
            .env("GATEWAY__DATABASE__URL", &iso.database_url)
            .env("GATEWAY__DATABASE__ACQUIRE_TIMEOUT_MS", "1000")
            .env("GATEWAY__REDIS__URL", redis_url())
            .env("GATEWAY__REDIS__KEY_PREFIX", &iso.redis_prefix)
            .env("GATEWAY__RABBIT__URL", iso.amqp_url())
            .env("GATEWAY__GENERATOR__ENABLED", "true")
            .env("GATEWAY__GENERATOR__RATE", plan.rate.to_string())
            // Warnings, and every move between broker nodes.
            .env("RUST_LOG", "warn,product_gateway::broker::link=info")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("gateway process starts");
        let i = Instance { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while readyz(&place.base()).await.map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "{} did not become ready", place.name);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        i
    }

    pub(super) async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill(); // SIGKILL
            let _ = c.wait().await;
        }
    }
}

/// Status and body of `/readyz`, None when nothing answers.
pub(super) async fn readyz(base: &str) -> Option<(u16, serde_json::Value)> {
    let client = awc::Client::builder().timeout(Duration::from_secs(3)).finish();
    let mut res = client.get(format!("{base}/readyz")).send().await.ok()?;
    let body = res.json().await.unwrap_or(serde_json::Value::Null);
    Some((res.status().as_u16(), body))
}

/// Sets the generator through the admin API.
pub(super) async fn admin(base: &str, body: serde_json::Value) {
    let client = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    let _ = client
        .post(format!("{base}/admin/generator"))
        .insert_header(("Authorization", format!("Bearer {ADMIN_TOKEN}")))
        .send_json(&body)
        .await;
}
