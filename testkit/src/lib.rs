//! What the integration tests and the load benchmark share. Every test gets
//! its own database, RabbitMQ vhost, Redis key prefix and port
//! ([`Isolation`], [`spawn_app_with`]), so tests run in parallel and can run
//! twice in a row; [`clients`] and [`raw`] speak WebSocket and SSE as a
//! browser or a stalled tab would; [`metric_value`] reads `/metrics`;
//! [`verdict`] judges a chaos run.

pub mod chaos;
pub mod clients;
pub mod proxy;
pub mod raw;
pub mod verdict;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use product_gateway::http::AppState;
use product_gateway::settings::{Secret, Settings};
use product_gateway::startup::Application;
use product_gateway::store;
use tokio_util::sync::CancellationToken;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
pub const INGEST_TOKEN: &str = "test-ingest-token-0123456789abcdef";

/// The workspace root (the product crate's folder): config, static files,
/// scripts and `rabbit/definitions.json` live there.
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

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

/// Names shared by one test's resources. When the last clone goes, the
/// database and the vhost go too, so repeated runs do not pile them up.
#[derive(Clone, Debug)]
pub struct Isolation {
    pub id: String,
    pub database_url: String,
    pub vhost: String,
    pub redis_prefix: String,
    _cleanup: std::sync::Arc<Cleanup>,
}

#[derive(Debug)]
struct Cleanup {
    /// The PostgreSQL server holding the database.
    server: String,
    database: String,
    vhost: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (server, database, vhost) = (self.server.clone(), self.database.clone(), self.vhost.clone());
        // Drop cannot await: clean up on a thread with its own runtime.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let _ = rabbit_api_call(awc::http::Method::DELETE, &format!("/api/vhosts/{vhost}"), None).await;
                let admin_url = format!("{server}/postgres");
                if let Ok(mut conn) =
                    <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&admin_url).await
                {
                    let drop = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"));
                    let _ = diesel_async::RunQueryDsl::execute(drop, &mut conn).await;
                }
            });
        });
        let _ = done.join();
    }
}

impl Isolation {
    pub async fn new() -> Self {
        Self::on(&pg_server()).await
    }

    /// An isolation whose database is on the PostgreSQL server at `server`
    /// (`postgres://user@host:port`).
    pub async fn on(server: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let iso = Isolation {
            database_url: format!("{server}/gw_test_{id}"),
            vhost: format!("gw-test-{id}"),
            redis_prefix: format!("gw-test:{id}:"),
            _cleanup: std::sync::Arc::new(Cleanup {
                server: server.to_owned(),
                database: format!("gw_test_{id}"),
                vhost: format!("gw-test-{id}"),
            }),
            id,
        };
        store::create_database(&iso.database_url)
            .await
            .expect("create test database");
        create_vhost(&iso.vhost).await;
        iso
    }

    /// This isolation's database as reached through a loopback port, such as
    /// a [`proxy::Proxy`] in front of PostgreSQL.
    pub fn database_url_through(&self, port: u16) -> String {
        let name = self.database_url.rsplit('/').next().unwrap_or_default();
        format!("postgres://postgres@127.0.0.1:{port}/{name}")
    }

    pub fn amqp_url(&self) -> String {
        format!("{}/{}", amqp_server(), self.vhost)
    }

    /// This isolation's vhost on the broker, reached through a loopback
    /// proxy at `port` (which forwards to the shared broker).
    pub fn amqp_url_through(&self, port: u16) -> String {
        let server = amqp_server();
        let (credentials, _) = server.rsplit_once('@').unwrap_or(("amqp://guest:guest", ""));
        format!("{credentials}@127.0.0.1:{port}/{}", self.vhost)
    }

    /// host:port of the shared broker's AMQP listener, for a proxy.
    pub fn amqp_address(&self) -> String {
        let server = amqp_server();
        let rest = server.rsplit_once('@').map_or(server.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or(rest).to_owned()
    }

    /// Settings for one instance of the service in this isolation.
    pub fn settings(&self) -> Settings {
        let dir = repo_root().join("config");
        let mut s = Settings::load(&dir).expect("load config");
        s.server.static_dir = repo_root().join("static").display().to_string();
        s.admin.token = Secret::new(ADMIN_TOKEN);
        s.ingest.token = Secret::new(INGEST_TOKEN);
        s.admin.dev_mode = false;
        s.database.url = Secret::new(self.database_url.clone());
        s.database.pool_size = 8;
        s.redis.url = Secret::new(redis_url());
        s.redis.key_prefix = self.redis_prefix.clone();
        s.rabbit.url = Secret::new(self.amqp_url());
        s.rabbit.management_url = rabbit_api();
        s.generator.enabled = false;
        s.seed.products = 50;
        // Test clients are anonymous and subscribe to anything; the tests of
        // subscriber tokens set their own grants.
        s.auth.anonymous_patterns = vec!["#".into()];
        s
    }
}

pub async fn rabbit_api_call(method: awc::http::Method, path: &str, body: Option<serde_json::Value>) -> (u16, String) {
    let client = awc::Client::builder().timeout(Duration::from_secs(60)).finish();
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
    spawn_app_with(|_| {}).await
}

/// A seeded instance in a fresh isolation, its settings first changed by
/// `configure`.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let iso = Isolation::new().await;
    let mut settings = iso.settings();
    configure(&mut settings);
    spawn_with(iso, settings).await
}

/// A seeded instance whose database connections go through a
/// [`proxy::Proxy`] the test can cut, with short pool waits (500 ms) so that
/// a cut shows at once.
pub async fn spawn_behind_database_proxy() -> (TestApp, proxy::Proxy) {
    let iso = Isolation::new().await;
    let proxy = proxy::Proxy::start("127.0.0.1:5432").await;
    let mut settings = iso.settings();
    settings.database.url = Secret::new(iso.database_url_through(proxy.port));
    settings.database.acquire_timeout = Duration::from_millis(500);
    (spawn_with(iso, settings).await, proxy)
}

/// Starts a seeded instance with the given settings.
pub async fn spawn_with(iso: Isolation, settings: Settings) -> TestApp {
    let listener = product_gateway::startup::bind("127.0.0.1", 0, settings.server.listen_backlog).expect("bind port 0");
    let seed = settings.seed.products;
    let app = Application::build(settings, listener).await.expect("build app");
    let state = app.state();
    product_gateway::seed::seed(&state.db, seed).await.expect("seed");
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
        metric_value(&self.metrics_text().await, name, label)
    }

    /// The whole `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        let mut res = self.client().get(self.url("/metrics")).send().await.expect("metrics");
        String::from_utf8(res.body().limit(16 << 20).await.expect("body").to_vec()).expect("utf8")
    }

    pub async fn stop(self) {
        self.token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.handle).await;
    }
}

/// Sum of the samples of metric `name` (or `name_total`, as counters are
/// exposed) whose line contains `label`, in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let metric = l.split(['{', ' ']).next().unwrap_or("");
            (metric == name || metric.strip_suffix("_total") == Some(name)) && l.contains(label)
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

/// A test-side publisher on the isolation's vhost.
pub struct TestPublisher {
    _conn: lapin::Connection,
    channel: lapin::Channel,
    /// The events exchange, as the settings name it.
    exchange: String,
}

impl TestPublisher {
    pub async fn connect(iso: &Isolation) -> Self {
        let conn = lapin::Connection::connect(&iso.amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("test publisher connects");
        let channel = product_gateway::broker::publisher::confirm_channel(&conn)
            .await
            .unwrap();
        TestPublisher {
            _conn: conn,
            channel,
            exchange: iso.settings().rabbit.topology.events_exchange,
        }
    }

    /// Publishes raw bytes to the events exchange and waits for the confirm.
    pub async fn raw(&self, routing_key: &str, body: &[u8], content_type: Option<&str>) {
        let mut props = lapin::BasicProperties::default().with_delivery_mode(2);
        if let Some(ct) = content_type {
            props = props.with_content_type(ct.into());
        }
        self.with_properties(routing_key, body, props).await;
    }

    /// Publishes raw bytes with the given properties and waits for the confirm.
    pub async fn with_properties(&self, routing_key: &str, body: &[u8], props: lapin::BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "test publish confirmed");
    }

    /// Publishes many events pipelined, then waits for every confirm.
    pub async fn burst(&self, events: &[(i64, &str, i64, i64)]) {
        let mut confirms = Vec::with_capacity(events.len());
        for (id, kind, value, version) in events {
            let field = if *kind == "price" { "price_cents" } else { "stock" };
            let body = serde_json::json!({
                "schema": 1, "product_id": id, "kind": kind, field: value, "version": version,
                "occurred_at": chrono::Utc::now(), "ts_us": chrono::Utc::now().timestamp_micros(),
            });
            let props = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            let c = self
                .channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    format!("product.{kind}.{id}").into(),
                    lapin::options::BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    props,
                )
                .await
                .unwrap();
            confirms.push(c);
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }

    pub async fn event(&self, id: i64, kind: &str, value: i64, version: i64) {
        let field = if kind == "price" { "price_cents" } else { "stock" };
        let body = serde_json::json!({
            "schema": 1, "product_id": id, "kind": kind, field: value, "version": version,
            "occurred_at": chrono::Utc::now(), "ts_us": chrono::Utc::now().timestamp_micros(),
        });
        self.raw(
            &format!("product.{kind}.{id}"),
            body.to_string().as_bytes(),
            Some("application/json"),
        )
        .await;
    }
}

impl TestApp {
    pub async fn admin(
        &self,
        method: awc::http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let req = self
            .client()
            .request(method, self.url(path))
            .insert_header(("Authorization", format!("Bearer {ADMIN_TOKEN}")));
        let mut res = match body {
            Some(b) => req.send_json(&b).await,
            None => req.send().await,
        }
        .expect("admin request");
        let status = res.status().as_u16();
        let json = res.json().limit(64 << 20).await.unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// Starts or stops the built-in generator (`POST /admin/generator`),
    /// at `rate` events per second when given.
    pub async fn generator(&self, running: bool, rate: Option<u32>) -> (u16, serde_json::Value) {
        let mut body = serde_json::json!({ "running": running });
        if let Some(rate) = rate {
            body["rate"] = rate.into();
        }
        self.admin(awc::http::Method::POST, "/admin/generator", Some(body))
            .await
    }

    /// Waits until every stage that connects on its own at start has its
    /// broker connection: each connection declares the topology, so a
    /// binding removed before a stage connected would come back.
    pub async fn stages_connected(&self) {
        const STAGES: [&str; 5] = ["apply-price", "apply-stock", "outbox-relay", "stream", "generator"];
        let path = format!("/api/vhosts/{}/connections", self.iso.vhost);
        eventually(
            Duration::from_secs(30),
            "every stage connected to the broker",
            || async {
                let (status, body) = rabbit_api_call(awc::http::Method::GET, &path, None).await;
                let conns: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
                let names: Vec<&str> = conns
                    .iter()
                    .filter_map(|c| c["client_properties"]["connection_name"].as_str())
                    .collect();
                let all = STAGES
                    .iter()
                    .all(|stage| names.iter().any(|n| n.ends_with(&format!("/{stage}"))));
                (status == 200 && all).then_some(())
            },
        )
        .await;
    }

    /// Binds the price queue to the events exchange, or unbinds it: a
    /// price event is then unroutable, and the broker returns it instead of
    /// confirming it. Waits first for every stage to have declared the
    /// topology.
    pub async fn route_prices(&self, routed: bool) {
        self.stages_connected().await;
        let t = &self.state.settings.rabbit.topology;
        let conn = lapin::Connection::connect(&self.iso.amqp_url(), Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let (queue, exchange) = (t.price_queue.as_str().into(), t.events_exchange.as_str().into());
        let args = lapin::types::FieldTable::default();
        if routed {
            ch.queue_bind(queue, exchange, "product.price.*".into(), Default::default(), args)
                .await
                .unwrap();
        } else {
            ch.queue_unbind(queue, exchange, "product.price.*".into(), args)
                .await
                .unwrap();
        }
        let _ = conn.close(200, "done".into()).await;
    }

    /// `POST /products/{id}/{kind}` with the ingest token, `body` and an
    /// optional idempotency key: the status, the JSON answer, and whether
    /// it was marked as a replay.
    pub async fn ingest(
        &self,
        kind: &str,
        id: i64,
        body: serde_json::Value,
        key: Option<&str>,
    ) -> (u16, serde_json::Value, bool) {
        let mut req = self
            .client()
            .post(self.url(&format!("/products/{id}/{kind}")))
            .insert_header(("Authorization", format!("Bearer {INGEST_TOKEN}")));
        if let Some(key) = key {
            req = req.insert_header(("Idempotency-Key", key));
        }
        let mut res = req.send_json(&body).await.expect("ingest request");
        let replayed = res.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        let json = res.json().await.unwrap_or(serde_json::Value::Null);
        (res.status().as_u16(), json, replayed)
    }

    pub async fn product(&self, id: i64) -> serde_json::Value {
        let (status, p) = self.get_json(&format!("/products/{id}")).await;
        assert_eq!(status, 200, "{p}");
        p
    }

    /// Runs a statement in the instance's database.
    pub async fn sql(&self, sql: &str) {
        let mut conn = self.state.db.get().await.expect("a database connection");
        diesel_async::RunQueryDsl::execute(diesel::sql_query(sql), &mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// One number from the instance's database: `sql` selects it as `v`.
    pub async fn sql_i64(&self, sql: &str) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct V {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            v: i64,
        }
        let mut conn = self.state.db.get().await.expect("a database connection");
        let v: V = diesel_async::RunQueryDsl::get_result(diesel::sql_query(sql), &mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        v.v
    }

    pub async fn dead_letters(&self) -> Vec<serde_json::Value> {
        let (status, body) = self
            .admin(awc::http::Method::GET, "/admin/dead-letters?limit=1000", None)
            .await;
        assert_eq!(status, 200, "{body}");
        body["dead_letters"].as_array().cloned().unwrap_or_default()
    }
}
