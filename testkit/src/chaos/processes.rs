//! The chaos run's processes: gateway instances started from the built
//! binary, the scripts that inject faults, and the admin and readiness
//! calls the run makes to them.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::Plan;
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

/// One gateway process, killed when dropped.
pub(super) struct Instance {
    child: Option<tokio::process::Child>,
}

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Instance {
    pub(super) async fn start(iso: &Isolation, name: &'static str, port: u16, plan: &Plan) -> Instance {
        let logs = repo_root().join("target/chaos-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{name}.log")))
            .unwrap();
        let mut command = tokio::process::Command::new(plan.gateway);
        if plan.cluster {
            // Every node, each with the isolation's vhost.
            let urls: Vec<String> = cluster(&["urls"])
                .await
                .split(',')
                .map(|u| format!("{}/{}", u.trim_end_matches("/%2f"), iso.vhost))
                .collect();
            command
                .env("GATEWAY__RABBIT__URLS", urls.join(","))
                .env("GATEWAY__RABBIT__TOPOLOGY__REPLICAS", "3")
                .env("GATEWAY__RABBIT__MANAGEMENT_URL", crate::rabbit_api());
        }
        let child = command
            .arg("serve")
            .env("GATEWAY_CONFIG_DIR", repo_root().join("config"))
            .env("GATEWAY__SERVER__PORT", port.to_string())
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
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("gateway process starts");
        let i = Instance { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while readyz(port).await.map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "{name} did not become ready");
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
pub(super) async fn readyz(port: u16) -> Option<(u16, serde_json::Value)> {
    let client = awc::Client::builder().timeout(Duration::from_secs(3)).finish();
    let mut res = client
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .ok()?;
    let body = res.json().await.unwrap_or(serde_json::Value::Null);
    Some((res.status().as_u16(), body))
}

/// Sets the generator through the admin API.
pub(super) async fn admin(port: u16, body: serde_json::Value) {
    let client = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    let _ = client
        .post(format!("http://127.0.0.1:{port}/admin/generator"))
        .insert_header(("Authorization", format!("Bearer {ADMIN_TOKEN}")))
        .send_json(&body)
        .await;
}
