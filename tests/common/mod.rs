//! Test harness: every test gets its own database, RabbitMQ vhost, Redis key
//! prefix and port, so tests run in parallel and can run twice in a row.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use product_gateway::http::AppState;
use product_gateway::settings::{Secret, Settings};
use product_gateway::startup::Application;
use product_gateway::store;
use tokio_util::sync::CancellationToken;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

pub fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

pub fn pg_server() -> String {
    env_or("GATEWAY_TEST_PG", "postgres://postgres@127.0.0.1:5432")
}
pub fn amqp_server() -> String {
    env_or("GATEWAY_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
}
/// Management API base, without credentials (they go in a header).
pub fn rabbit_api() -> String {
    let url = env_or("GATEWAY_TEST_RABBIT_API", "http://127.0.0.1:15672");
    match url
        .split_once("://")
        .map(|(scheme, rest)| (scheme, rest.rsplit_once('@')))
    {
        Some((scheme, Some((_, host)))) => format!("{scheme}://{host}"),
        _ => url,
    }
}
pub fn redis_url() -> String {
    env_or("GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379")
}

/// Names shared by one test's resources.
#[derive(Clone, Debug)]
pub struct Isolation {
    pub id: String,
    pub database_url: String,
    pub vhost: String,
    pub redis_prefix: String,
}

impl Isolation {
    pub async fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let iso = Isolation {
            database_url: format!("{}/gw_test_{id}", pg_server()),
            vhost: format!("gw-test-{id}"),
            redis_prefix: format!("gw-test:{id}:"),
            id,
        };
        store::create_database(&iso.database_url)
            .await
            .expect("create test database");
        create_vhost(&iso.vhost).await;
        iso
    }

    pub fn amqp_url(&self) -> String {
        format!("{}/{}", amqp_server(), self.vhost)
    }

    /// Settings for one instance of the service in this isolation.
    pub fn settings(&self) -> Settings {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut s = Settings::load(&dir).expect("load config");
        s.server.static_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("static")
            .display()
            .to_string();
        s.admin.token = Secret::new(ADMIN_TOKEN);
        s.admin.dev_mode = false;
        s.database.url = Secret::new(self.database_url.clone());
        s.database.pool_size = 8;
        s.redis.url = Secret::new(redis_url());
        s.redis.key_prefix = self.redis_prefix.clone();
        s.rabbit.url = Secret::new(self.amqp_url());
        s.rabbit.management_url = rabbit_api();
        s.generator.enabled = false;
        s.seed.products = 50;
        s
    }
}

pub async fn rabbit_api_call(method: awc::http::Method, path: &str, body: Option<serde_json::Value>) -> (u16, String) {
    let client = awc::Client::builder().timeout(Duration::from_secs(20)).finish();
    let req = client
        .request(method, format!("{}{}", rabbit_api(), path))
        .basic_auth("guest", "guest");
    let mut res = match body {
        Some(b) => req.send_json(&b).await,
        None => req.send().await,
    }
    .expect("RabbitMQ management API answers (is rabbitmq_management enabled?)");
    let text = res.body().limit(64 << 20).await.expect("management API body");
    (res.status().as_u16(), String::from_utf8_lossy(&text).into_owned())
}

async fn create_vhost(vhost: &str) {
    let (status, body) = rabbit_api_call(awc::http::Method::PUT, &format!("/api/vhosts/{vhost}"), None).await;
    assert!(status < 300, "create vhost: {status} {body}");
    let perms = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let (status, body) = rabbit_api_call(
        awc::http::Method::PUT,
        &format!("/api/permissions/{vhost}/guest"),
        Some(perms),
    )
    .await;
    assert!(status < 300, "vhost permissions: {status} {body}");
}

/// One running instance of the service.
pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub state: actix_web::web::Data<AppState>,
    pub token: CancellationToken,
    pub iso: Isolation,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn spawn_app() -> TestApp {
    let iso = Isolation::new().await;
    let settings = iso.settings();
    spawn_with(iso, settings).await
}

/// Starts a seeded instance with the given settings.
pub async fn spawn_with(iso: Isolation, settings: Settings) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let seed = settings.seed.products;
    let app = Application::build(settings, listener).await.expect("build app");
    let state = app.state();
    store::seed::seed(&state.db, seed).await.expect("seed");
    let port = app.port();
    let token = app.shutdown_token();
    let handle = tokio::spawn(app.run_until_stopped());
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        state,
        token,
        iso,
        handle,
    }
}

impl TestApp {
    pub fn client(&self) -> awc::Client {
        awc::Client::builder().timeout(Duration::from_secs(30)).finish()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let mut res = self.client().get(self.url(path)).send().await.expect("request");
        let status = res.status().as_u16();
        let body = res.body().limit(64 << 20).await.expect("body");
        let json = serde_json::from_slice(&body).unwrap_or_else(|_| panic!("JSON body for {path}: {body:?}"));
        (status, json)
    }

    /// Current value of a metric (summed over its labels matching `label`).
    pub async fn metric(&self, name: &str, label: &str) -> f64 {
        let mut res = self.client().get(self.url("/metrics")).send().await.expect("metrics");
        let text = String::from_utf8(res.body().limit(16 << 20).await.expect("body").to_vec()).expect("utf8");
        metric_value(&text, name, label)
    }

    pub async fn stop(self) {
        self.token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.handle).await;
    }
}

pub fn metric_value(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let metric = l.split(['{', ' ']).next().unwrap_or("");
            metric == name && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` until it returns Some or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
