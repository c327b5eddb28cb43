//! Typed configuration: `config/default.toml`, then `GATEWAY__SECTION__KEY`
//! environment variables. Loaded once in `main` and passed down as sub-structs.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub auth: AuthSettings,
    pub ingest: IngestSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub rabbit: RabbitSettings,
    pub generator: GeneratorSettings,
    pub consumer: ConsumerSettings,
    pub hub: HubSettings,
    pub photos: PhotoSettings,
    pub seed: SeedSettings,
    pub tracing: TracingSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// Folder holding the echo page.
    pub static_dir: String,
    pub max_body_bytes: usize,
    /// Kernel send buffer per client socket in bytes (0: the kernel's
    /// autotuning). A small one bounds kernel memory per connection and lets
    /// a stalled client reach its conflating buffer sooner.
    pub socket_send_buffer: usize,
    /// Unsent bytes the kernel holds per client socket before a write
    /// waits (`TCP_NOTSENT_LOWAT`; 0: no limit). Bytes in flight are not
    /// counted, so a distant client keeps its throughput; a client that
    /// stops reading backs up into its own conflating buffer within this
    /// many bytes instead of into megabytes of kernel memory.
    pub socket_unsent_bytes: u32,
    /// `TCP_NODELAY` on client sockets: frames go out as written, none held
    /// back for the client's delayed ACK.
    pub tcp_nodelay: bool,
    /// HTTP worker threads (0: one per core).
    pub workers: usize,
    /// Connection attempts the kernel queues before the service accepts
    /// them (capped by `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Host names (optionally `name:port`) clients may address the service
    /// by, besides `localhost` and IP literals; other `Host` headers (a
    /// DNS-rebinding page's) are refused. `"*"` turns the check off.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Peers (IPs or CIDRs) whose `X-Forwarded-For` is believed: load
    /// balancers in front of the service. Empty: the header is ignored.
    #[serde(default)]
    pub trusted_proxies: TrustedProxies,
}

/// Parsed `server.trusted_proxies`: a bare address is a one-address range.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<Vec<String>> for TrustedProxies {
    type Error = String;
    fn try_from(entries: Vec<String>) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                let e = e.trim();
                e.parse::<ipnet::IpNet>()
                    .or_else(|_| e.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("server.trusted_proxies: {e:?} is neither an IP address nor a CIDR range"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

#[derive(Clone, Deserialize)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AdminSettings {
    pub token: Secret,
    /// Allows a short or default token; never on in production.
    pub dev_mode: bool,
}

/// The ingest API's callers.
#[derive(Debug, Clone, Deserialize)]
pub struct IngestSettings {
    /// Their bearer token; empty: the ingest API refuses every call.
    pub token: Secret,
}

/// Subscriber tokens (JWTs) and what anyone may subscribe to without one.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    /// Patterns open to every connection, token or not.
    pub anonymous_patterns: Vec<String>,
    /// HS256 secret; empty: HS256 tokens are refused.
    pub hs256_secret: Secret,
    /// A PEM public key or a folder of `*.pem` ones; empty: none.
    pub public_keys: String,
    /// Required `iss` and `aud` claims; empty: not checked.
    pub issuer: String,
    pub audience: String,
    #[serde(rename = "leeway_secs", deserialize_with = "seconds")]
    pub leeway: Duration,
}

impl AuthSettings {
    /// The anonymous patterns; an empty entry (as an empty environment
    /// variable gives) is none.
    pub fn anonymous(&self) -> impl Iterator<Item = &str> {
        self.anonymous_patterns
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub pool_size: usize,
    #[serde(rename = "acquire_timeout_ms", deserialize_with = "millis")]
    pub acquire_timeout: Duration,
    /// Connections for client reads (REST, snapshots), apart from the pool
    /// the apply path writes with, so reads can never starve it.
    pub read_pool_size: usize,
    /// A replica for client reads; `url` when absent.
    #[serde(default)]
    pub read_url: Option<Secret>,
    /// How long a snapshot waits for the replica to replay what the primary
    /// had committed when the client subscribed; past it the snapshot is
    /// read on the primary.
    #[serde(rename = "replica_max_lag_ms", deserialize_with = "millis")]
    pub replica_max_lag: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    pub url: Secret,
    /// Prefix of every key, so several deployments (or tests) share one Redis.
    pub key_prefix: String,
    pub pool_size: usize,
    #[serde(rename = "timeout_ms", deserialize_with = "millis")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RabbitSettings {
    pub url: Secret,
    /// Every node of a cluster, tried in turn; when empty, `url` alone.
    #[serde(default)]
    pub urls: Vec<Secret>,
    pub management_url: String,
    #[serde(rename = "reconnect_min_ms", deserialize_with = "millis")]
    pub reconnect_min: Duration,
    #[serde(rename = "reconnect_max_ms", deserialize_with = "millis")]
    pub reconnect_max: Duration,
    /// AMQP heartbeat asked of every connection (the lower of this and the
    /// broker's wins; 0 takes the broker's). A node cut off by the network
    /// sends no error: two missed heartbeats are how a connection learns it
    /// is gone and moves to the next node.
    pub heartbeat_secs: u16,
    pub topology: TopologySettings,
}

impl RabbitSettings {
    /// The broker endpoints to connect to, in the order given.
    pub fn endpoints(&self) -> Vec<Secret> {
        if self.urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.urls.clone()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TopologySettings {
    pub events_exchange: String,
    pub dlx: String,
    pub price_queue: String,
    pub stock_queue: String,
    pub dead_letter_queue: String,
    pub updates_exchange: String,
    pub updates_stream: String,
    pub delivery_limit: i64,
    pub stream_max_age: String,
    pub stream_max_length_bytes: i64,
    pub stream_max_segment_size_bytes: i64,
    /// Nodes that hold each apply queue and the update stream when they are
    /// created (`x-quorum-initial-group-size`, `x-initial-cluster-size`): 1
    /// on a single node, 3 on a three-node cluster; 0 leaves it to the broker.
    pub replicas: u32,
    /// Largest message body the broker should accept (its `max_message_size`,
    /// node-wide, set in the broker config this project ships); checked
    /// against the broker at start.
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GeneratorSettings {
    pub enabled: bool,
    pub rate: f64,
    pub max_in_flight: usize,
    #[serde(rename = "confirm_timeout_ms", deserialize_with = "millis")]
    pub confirm_timeout: Duration,
    /// Back-off before an event refused by the broker (nacked, unroutable,
    /// unconfirmed) is published again: doubles from min up to max.
    #[serde(rename = "retry_min_ms", deserialize_with = "millis")]
    pub retry_min: Duration,
    #[serde(rename = "retry_max_ms", deserialize_with = "millis")]
    pub retry_max: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerSettings {
    pub prefetch: u16,
    pub batch_size: usize,
    #[serde(rename = "batch_max_wait_ms", deserialize_with = "millis")]
    pub batch_max_wait: Duration,
    pub max_body_bytes: usize,
    pub transient_retries: u32,
    #[serde(rename = "retry_min_ms", deserialize_with = "millis")]
    pub retry_min: Duration,
    #[serde(rename = "retry_max_ms", deserialize_with = "millis")]
    pub retry_max: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HubSettings {
    /// Tasks the clients are spread over; 0: one per core.
    pub shards: usize,
    pub history: usize,
    /// Updates one client may have waiting; past it they conflate, and a
    /// client with more distinct keys waiting is cut off (`slow_consumer`).
    pub client_buffer: usize,
    /// Frame bytes one client may have waiting before it is cut off.
    pub client_buffer_bytes: usize,
    pub max_subscriptions: usize,
    pub max_pattern_words: usize,
    pub max_connections: usize,
    /// Connections one client address may hold at once.
    pub max_connections_per_ip: usize,
    /// Origins allowed to open a WebSocket or an SSE stream besides the
    /// service's own; a request without `Origin` (not a browser) is always
    /// allowed.
    pub allowed_origins: Vec<String>,
    pub max_frame_bytes: usize,
    #[serde(rename = "ping_interval_ms", deserialize_with = "millis")]
    pub ping_interval: Duration,
    #[serde(rename = "client_timeout_ms", deserialize_with = "millis")]
    pub client_timeout: Duration,
    #[serde(rename = "sse_keepalive_ms", deserialize_with = "millis")]
    pub sse_keepalive: Duration,
    #[serde(rename = "sse_retry_ms", deserialize_with = "millis")]
    pub sse_retry: Duration,
    pub stream_prefetch: u16,
    /// Snapshots read and serialised at once; more wait for a turn.
    pub max_concurrent_snapshots: usize,
    /// How long a snapshot waits for a turn before the client is told to
    /// retry later.
    #[serde(rename = "snapshot_wait_ms", deserialize_with = "millis")]
    pub snapshot_wait: Duration,
    /// How long a snapshot waits for its client to take the next part
    /// before it ends with `unavailable`, giving back its turn, read
    /// connection and transaction.
    #[serde(rename = "snapshot_stall_ms", deserialize_with = "millis")]
    pub snapshot_stall: Duration,
    /// Snapshots one client address may have read at once.
    pub max_snapshots_per_ip: usize,
    /// Catalog rows read per page of a snapshot, and products per
    /// `snapshot` part at most.
    pub snapshot_part_products: usize,
    /// Stream catch-ups (resumes older than the history) reading at once,
    /// each a channel on the instance's one catch-up connection.
    pub max_concurrent_catch_ups: usize,
    /// How long a catch-up waits for a turn before its client gets a reset.
    #[serde(rename = "catch_up_wait_ms", deserialize_with = "millis")]
    pub catch_up_wait: Duration,
    /// How long a catch-up waits for its client to take the next update
    /// before it gives back its turn (the client gets a `reset`).
    #[serde(rename = "catch_up_stall_ms", deserialize_with = "millis")]
    pub catch_up_stall: Duration,
    /// Stream catch-ups one client address may run at once.
    pub max_catch_ups_per_ip: usize,
    /// Stream messages a catch-up has in flight from the broker: little, as
    /// a client that stops reading holds them until its catch-up gives up.
    pub catch_up_prefetch: u16,
    /// Load the last `history` updates from the stream before serving, so
    /// clients resuming after a restart are served from memory.
    pub warm_start: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PhotoSettings {
    #[serde(rename = "cache_ttl_secs", deserialize_with = "seconds")]
    pub cache_ttl: Duration,
    /// Lifetime of the in-process copy in front of Redis (0: none).
    #[serde(rename = "local_ttl_ms", deserialize_with = "millis")]
    pub local_ttl: Duration,
    pub max_upload_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SeedSettings {
    pub products: u32,
}

/// Traces over OTLP (HTTP/protobuf). Off while no endpoint is set here or
/// in `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`;
/// the other `OTEL_*` variables (sampler, service name, export queue) are
/// read as the OpenTelemetry SDK reads them.
#[derive(Debug, Clone, Deserialize)]
pub struct TracingSettings {
    /// The collector's traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub otlp_endpoint: String,
    /// Share of new traces recorded (0 to 1); a change that arrives with a
    /// sampled `traceparent` is always recorded, an unsampled one never.
    /// `OTEL_TRACES_SAMPLER` overrides it.
    pub sample_ratio: f64,
}

/// Durations are written as whole milliseconds (`*_ms` keys) or seconds
/// (`*_secs` keys) in the config and the environment, and are `Duration`
/// from the moment settings load, so no use site converts (or mixes units).
fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Load(#[from] config::ConfigError),
    #[error(
        "admin token is the public default or shorter than 24 characters: set GATEWAY__ADMIN__TOKEN to a long \
         random secret, or for a local run only enable dev mode (GATEWAY__ADMIN__DEV_MODE=true)"
    )]
    WeakAdminToken,
    #[error(
        "ingest token is shorter than 24 characters: set GATEWAY__INGEST__TOKEN to a long random secret \
         (or leave it empty to keep the ingest API off)"
    )]
    WeakIngestToken,
    #[error("setting {key} {reason}")]
    Invalid { key: &'static str, reason: &'static str },
}

impl Settings {
    /// Loads `<dir>/default.toml` and the environment overrides.
    pub fn load(dir: &Path) -> Result<Self, SettingsError> {
        Self::load_with(dir, None)
    }

    /// [`Settings::load`] with these variables in place of the process's
    /// environment, when given.
    pub fn load_with(dir: &Path, env: Option<config::Map<String, String>>) -> Result<Self, SettingsError> {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from(dir.join("default.toml")))
            .add_source(
                config::Environment::with_prefix("GATEWAY")
                    .source(env)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    // Lists from one variable: GATEWAY__RABBIT__URLS=amqp://a,amqp://b
                    .list_separator(",")
                    .with_list_parse_key("rabbit.urls")
                    .with_list_parse_key("server.trusted_proxies")
                    .with_list_parse_key("server.allowed_hosts")
                    .with_list_parse_key("hub.allowed_origins")
                    .with_list_parse_key("auth.anonymous_patterns"),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Refuses settings that would be unsafe to serve with. Checked when the
    /// service is built (`Application::build`), not on load, so `seed`,
    /// `migrate` and tools starting from the shipped config still run.
    pub fn check_serving(&self) -> Result<(), SettingsError> {
        self.validate()?;
        let token = self.admin.token.expose();
        let weak = token.len() < 24 || token.starts_with("dev-admin-token");
        if weak && !self.admin.dev_mode {
            return Err(SettingsError::WeakAdminToken);
        }
        let ingest = self.ingest.token.expose();
        if !ingest.is_empty() && ingest.len() < 24 && !self.admin.dev_mode {
            return Err(SettingsError::WeakIngestToken);
        }
        Ok(())
    }
}

impl Settings {
    /// Refuses values the service cannot run with: a zero interval panics
    /// `tokio::time::interval` when a connection starts, a zero back-off
    /// retries in a hot loop, a zero pool or timeout fails every request.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let zero: [(&'static str, bool); 30] = [
            ("database.pool_size", self.database.pool_size == 0),
            ("database.read_pool_size", self.database.read_pool_size == 0),
            ("database.acquire_timeout_ms", self.database.acquire_timeout.is_zero()),
            ("redis.pool_size", self.redis.pool_size == 0),
            ("redis.timeout_ms", self.redis.timeout.is_zero()),
            ("rabbit.reconnect_min_ms", self.rabbit.reconnect_min.is_zero()),
            ("rabbit.reconnect_max_ms", self.rabbit.reconnect_max.is_zero()),
            ("generator.max_in_flight", self.generator.max_in_flight == 0),
            ("generator.confirm_timeout_ms", self.generator.confirm_timeout.is_zero()),
            ("consumer.batch_size", self.consumer.batch_size == 0),
            ("consumer.retry_min_ms", self.consumer.retry_min.is_zero()),
            ("consumer.retry_max_ms", self.consumer.retry_max.is_zero()),
            ("hub.ping_interval_ms", self.hub.ping_interval.is_zero()),
            ("hub.client_timeout_ms", self.hub.client_timeout.is_zero()),
            ("hub.sse_keepalive_ms", self.hub.sse_keepalive.is_zero()),
            ("hub.sse_retry_ms", self.hub.sse_retry.is_zero()),
            ("hub.max_concurrent_snapshots", self.hub.max_concurrent_snapshots == 0),
            ("hub.snapshot_part_products", self.hub.snapshot_part_products == 0),
            ("server.listen_backlog", self.server.listen_backlog == 0),
            ("hub.max_concurrent_catch_ups", self.hub.max_concurrent_catch_ups == 0),
            ("hub.catch_up_wait_ms", self.hub.catch_up_wait.is_zero()),
            ("hub.client_buffer", self.hub.client_buffer == 0),
            ("hub.client_buffer_bytes", self.hub.client_buffer_bytes == 0),
            ("hub.snapshot_stall_ms", self.hub.snapshot_stall.is_zero()),
            ("hub.max_snapshots_per_ip", self.hub.max_snapshots_per_ip == 0),
            ("hub.catch_up_stall_ms", self.hub.catch_up_stall.is_zero()),
            ("hub.max_catch_ups_per_ip", self.hub.max_catch_ups_per_ip == 0),
            ("hub.catch_up_prefetch", self.hub.catch_up_prefetch == 0),
            ("photos.cache_ttl_secs", self.photos.cache_ttl.is_zero()),
            ("photos.max_upload_bytes", self.photos.max_upload_bytes == 0),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, is_zero)| *is_zero) {
            return Err(SettingsError::Invalid {
                key,
                reason: "must be greater than 0",
            });
        }
        let ordered = [
            (
                "rabbit.reconnect_min_ms",
                self.rabbit.reconnect_min,
                self.rabbit.reconnect_max,
            ),
            (
                "consumer.retry_min_ms",
                self.consumer.retry_min,
                self.consumer.retry_max,
            ),
        ];
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return Err(SettingsError::Invalid {
                key: "tracing.sample_ratio",
                reason: "must be between 0 and 1",
            });
        }
        if let Some((key, _, _)) = ordered.iter().find(|(_, min, max)| min > max) {
            return Err(SettingsError::Invalid {
                key,
                reason: "must not exceed its maximum",
            });
        }
        // One stream message (a committed batch) is pushed to a client at
        // once: a buffer that cannot hold it would cut off healthy clients.
        if self.hub.client_buffer < self.consumer.batch_size {
            return Err(SettingsError::Invalid {
                key: "hub.client_buffer",
                reason: "must hold at least consumer.batch_size updates",
            });
        }
        let rate = self.generator.rate;
        if !rate.is_finite() || !(0.0..=100_000.0).contains(&rate) {
            return Err(SettingsError::Invalid {
                key: "generator.rate",
                reason: "must be between 0 and 100000 events/s",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Settings {
        Settings::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config")).unwrap()
    }

    #[test]
    fn a_short_ingest_token_is_refused_outside_dev_mode_and_an_empty_one_is_off() {
        let mut s = defaults();
        s.admin.dev_mode = false;
        s.admin.token = Secret::new("a-long-random-production-token-42");
        assert!(s.check_serving().is_ok(), "no ingest token: the API is off");
        s.ingest.token = Secret::new("short");
        assert!(matches!(s.check_serving(), Err(SettingsError::WeakIngestToken)));
        s.ingest.token = Secret::new("a-long-random-ingest-token-0042");
        assert!(s.check_serving().is_ok());
        s.ingest.token = Secret::new("short");
        s.admin.dev_mode = true;
        assert!(s.check_serving().is_ok());
    }

    #[test]
    fn weak_or_default_admin_token_is_refused_outside_dev_mode() {
        let mut s = defaults();
        s.admin.dev_mode = false;
        assert!(
            matches!(s.check_serving(), Err(SettingsError::WeakAdminToken)),
            "the shipped default token"
        );
        s.admin.token = Secret::new("short");
        assert!(matches!(s.check_serving(), Err(SettingsError::WeakAdminToken)));
        s.admin.token = Secret::new("a-long-random-production-token-42");
        assert!(s.check_serving().is_ok());
        s.admin.token = Secret::new("short");
        s.admin.dev_mode = true;
        assert!(s.check_serving().is_ok(), "dev mode allows it");
    }

    #[test]
    fn zero_intervals_and_sizes_are_refused_naming_the_key() {
        type Set = fn(&mut Settings);
        let zeroed: &[(&str, Set)] = &[
            ("hub.ping_interval_ms", |s| s.hub.ping_interval = Duration::ZERO),
            ("hub.sse_keepalive_ms", |s| s.hub.sse_keepalive = Duration::ZERO),
            ("hub.sse_retry_ms", |s| s.hub.sse_retry = Duration::ZERO),
            ("hub.client_timeout_ms", |s| s.hub.client_timeout = Duration::ZERO),
            ("rabbit.reconnect_min_ms", |s| s.rabbit.reconnect_min = Duration::ZERO),
            ("rabbit.reconnect_max_ms", |s| s.rabbit.reconnect_max = Duration::ZERO),
            ("consumer.retry_min_ms", |s| s.consumer.retry_min = Duration::ZERO),
            ("consumer.retry_max_ms", |s| s.consumer.retry_max = Duration::ZERO),
            ("consumer.batch_size", |s| s.consumer.batch_size = 0),
            ("generator.confirm_timeout_ms", |s| {
                s.generator.confirm_timeout = Duration::ZERO
            }),
            ("generator.max_in_flight", |s| s.generator.max_in_flight = 0),
            ("database.pool_size", |s| s.database.pool_size = 0),
            ("database.read_pool_size", |s| s.database.read_pool_size = 0),
            ("hub.max_concurrent_snapshots", |s| s.hub.max_concurrent_snapshots = 0),
            ("hub.snapshot_part_products", |s| s.hub.snapshot_part_products = 0),
            ("database.acquire_timeout_ms", |s| {
                s.database.acquire_timeout = Duration::ZERO
            }),
            ("redis.pool_size", |s| s.redis.pool_size = 0),
            ("redis.timeout_ms", |s| s.redis.timeout = Duration::ZERO),
            ("photos.cache_ttl_secs", |s| s.photos.cache_ttl = Duration::ZERO),
        ];
        for (key, set) in zeroed {
            let mut s = defaults();
            set(&mut s);
            let err = s.validate().err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|m| m.contains(key)),
                "{key} = 0 must be refused naming the key, got {err:?}"
            );
        }
        let mut s = defaults();
        s.generator.rate = f64::NAN;
        assert!(s.validate().is_err_and(|e| e.to_string().contains("generator.rate")));
        let mut s = defaults();
        s.generator.rate = -1.0;
        assert!(s.validate().is_err_and(|e| e.to_string().contains("generator.rate")));
        let mut s = defaults();
        s.consumer.retry_min = s.consumer.retry_max + Duration::from_millis(1);
        assert!(
            s.validate()
                .is_err_and(|e| e.to_string().contains("consumer.retry_min_ms"))
        );
        let mut s = defaults();
        s.generator.rate = 0.0;
        s.consumer.batch_max_wait = Duration::ZERO;
        s.photos.local_ttl = Duration::ZERO;
        assert!(
            s.validate().is_ok(),
            "zero is meaningful for these: pause, no wait, no local copy"
        );
    }

    #[test]
    fn trusted_proxies_take_addresses_and_ranges_and_refuse_anything_else() {
        let parse = |v: serde_json::Value| serde_json::from_value::<TrustedProxies>(v);
        let p = parse(serde_json::json!(["127.0.0.1", "10.0.0.0/8", "::1"])).unwrap();
        for ip in ["127.0.0.1", "10.200.3.4", "::1"] {
            assert!(p.contains(ip.parse().unwrap()), "{ip}");
        }
        assert!(!p.contains("127.0.0.2".parse().unwrap()));
        let e = parse(serde_json::json!(["10.0.0.0/8", "balancer.internal"])).unwrap_err();
        assert!(e.to_string().contains("balancer.internal"), "{e}");
    }

    #[test]
    fn lists_come_from_one_variable_separated_by_commas() {
        let env = [
            ("GATEWAY__RABBIT__URLS", "amqp://a:5701/%2f,amqp://b:5702/%2f"),
            ("GATEWAY__SERVER__TRUSTED_PROXIES", "127.0.0.1,10.0.0.0/8"),
            ("GATEWAY__SERVER__ALLOWED_HOSTS", "shop.example,localhost"),
            ("GATEWAY__HUB__ALLOWED_ORIGINS", "https://shop.example"),
        ];
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let s = Settings::load_with(&dir, Some(env)).unwrap();
        let urls: Vec<String> = s.rabbit.endpoints().iter().map(|u| u.expose().to_owned()).collect();
        assert_eq!(urls, ["amqp://a:5701/%2f", "amqp://b:5702/%2f"]);
        assert!(s.server.trusted_proxies.contains("10.1.2.3".parse().unwrap()));
        assert!(s.server.trusted_proxies.contains("127.0.0.1".parse().unwrap()));
        assert_eq!(s.server.allowed_hosts, ["shop.example", "localhost"]);
        assert_eq!(s.hub.allowed_origins, ["https://shop.example"]);
    }

    #[test]
    fn secrets_never_print() {
        let s = defaults();
        let printed = format!("{s:?}");
        assert!(!printed.contains(s.admin.token.expose()));
        assert!(!printed.contains("guest:guest"));
    }
}
