//! Typed configuration: `config/default.toml`, then `GATEWAY__SECTION__KEY`
//! environment variables. Loaded once in `main` and passed down as sub-structs.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub rabbit: RabbitSettings,
    pub generator: GeneratorSettings,
    pub consumer: ConsumerSettings,
    pub hub: HubSettings,
    pub photos: PhotoSettings,
    pub seed: SeedSettings,
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
    /// HTTP worker threads (0: one per core).
    pub workers: usize,
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

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub pool_size: usize,
    pub acquire_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    pub url: Secret,
    /// Prefix of every key, so several deployments (or tests) share one Redis.
    pub key_prefix: String,
    pub pool_size: usize,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RabbitSettings {
    pub url: Secret,
    pub management_url: String,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub topology: TopologySettings,
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
    pub confirm_timeout_ms: u64,
    /// Back-off before an event refused by the broker (nacked, unroutable,
    /// unconfirmed) is published again: doubles from min up to max.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerSettings {
    pub prefetch: u16,
    pub batch_size: usize,
    pub batch_max_wait_ms: u64,
    pub max_body_bytes: usize,
    pub transient_retries: u32,
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HubSettings {
    pub history: usize,
    pub client_buffer: usize,
    pub max_subscriptions: usize,
    pub max_pattern_words: usize,
    pub max_connections: usize,
    /// Connections one client address may hold at once.
    pub max_connections_per_ip: usize,
    /// Origins allowed to open a WebSocket besides the service's own; a
    /// request without `Origin` (not a browser) is always allowed.
    pub allowed_origins: Vec<String>,
    pub max_frame_bytes: usize,
    pub ping_interval_ms: u64,
    pub client_timeout_ms: u64,
    pub sse_keepalive_ms: u64,
    pub sse_retry_ms: u64,
    pub stream_prefetch: u16,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PhotoSettings {
    pub cache_ttl_secs: u64,
    /// Lifetime of the in-process copy in front of Redis (0: none).
    pub local_ttl_ms: u64,
    pub max_upload_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SeedSettings {
    pub products: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Load(#[from] config::ConfigError),
    #[error("admin token is too weak (at least 24 characters); set GATEWAY__ADMIN__TOKEN or enable admin.dev_mode")]
    WeakAdminToken,
}

impl Settings {
    /// Loads `<dir>/default.toml` and the environment overrides.
    pub fn load(dir: &Path) -> Result<Self, SettingsError> {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from(dir.join("default.toml")))
            .add_source(
                config::Environment::with_prefix("GATEWAY")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.check()?;
        Ok(settings)
    }

    /// Refuses settings that would be unsafe to serve with.
    pub fn check(&self) -> Result<(), SettingsError> {
        let token = self.admin.token.expose();
        let weak = token.len() < 24 || token.starts_with("dev-admin-token");
        if weak && !self.admin.dev_mode {
            return Err(SettingsError::WeakAdminToken);
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
    fn weak_or_default_admin_token_is_refused_outside_dev_mode() {
        let mut s = defaults();
        s.admin.dev_mode = false;
        assert!(
            matches!(s.check(), Err(SettingsError::WeakAdminToken)),
            "the shipped default token"
        );
        s.admin.token = Secret::new("short");
        assert!(matches!(s.check(), Err(SettingsError::WeakAdminToken)));
        s.admin.token = Secret::new("a-long-random-production-token-42");
        assert!(s.check().is_ok());
        s.admin.token = Secret::new("short");
        s.admin.dev_mode = true;
        assert!(s.check().is_ok(), "dev mode allows it");
    }

    #[test]
    fn secrets_never_print() {
        let s = defaults();
        let printed = format!("{s:?}");
        assert!(!printed.contains(s.admin.token.expose()));
        assert!(!printed.contains("guest:guest"));
    }
}
