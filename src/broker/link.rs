//! Connections to RabbitMQ. Every pipeline stage owns its connection, so a
//! failure in one does not stall the others; each (re)connection declares
//! the topology, so a restarted broker or a fresh vhost is ready at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use super::topology::Topology;
use crate::metrics::Metrics;
use crate::settings::{RabbitSettings, Secret};

/// How long one endpoint may take to accept a connection before the next
/// is tried: a node on this host's network answers in milliseconds, and
/// every second here is a second a stage leaving a cut-off node may spend
/// on another one that is cut off too.
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a reconnection waits for the topology to be declared again.
/// Declaring takes the broker's metadata store, which stalls while a node
/// of the cluster is cut off and not yet given up for lost (Erlang's
/// `net_ticktime`, 60 s); the topology declared earlier by this process is
/// still there, so a reconnection goes on without the answer.
const REDECLARE_WAIT: Duration = Duration::from_secs(1);

/// What a stage needs to (re)connect.
#[derive(Clone)]
pub struct Connector {
    settings: RabbitSettings,
    /// The broker's nodes; connections take them in turn.
    endpoints: Arc<[Secret]>,
    /// The endpoint the next stage connecting for the first time tries
    /// first, so stages spread over the nodes.
    next: Arc<AtomicUsize>,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    /// Prefix of connection names in the management UI, per instance.
    instance: String,
    /// Per stage that has connected before, the endpoint it last used: a
    /// later connection counts as a reconnect and tries the next node first,
    /// as the one it leaves may be the one that failed.
    connected: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// Whether this process has declared the topology once.
    declared: Arc<std::sync::atomic::AtomicBool>,
}

impl Connector {
    pub fn new(settings: RabbitSettings, topology: Arc<Topology>, metrics: Arc<Metrics>, instance: String) -> Self {
        Self {
            endpoints: settings
                .endpoints()
                .iter()
                .map(|url| Secret::new(with_heartbeat(url.expose(), settings.heartbeat_secs)))
                .collect(),
            next: Arc::default(),
            settings,
            topology,
            metrics,
            instance,
            connected: Default::default(),
            declared: Default::default(),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// One attempt: the endpoints in turn until one accepts the connection
    /// and the topology is declared; the last failure when none does.
    pub async fn connect(&self, stage: &str) -> lapin::Result<Connection> {
        let last = self.stages().get(stage).copied();
        let first = match last {
            Some(i) => i + 1,
            None => self.next.fetch_add(1, Ordering::Relaxed),
        };
        let mut failure = None;
        for i in 0..self.endpoints.len() {
            let at = (first + i) % self.endpoints.len();
            let endpoint = &self.endpoints[at];
            let attempt = tokio::time::timeout(ENDPOINT_TIMEOUT, self.connect_to(endpoint, stage)).await;
            match attempt {
                Ok(Ok(conn)) => {
                    if let Some(before) = self.stages().insert(stage.to_owned(), at)
                        && before != at
                    {
                        tracing::info!(stage, endpoint = %endpoint_label(endpoint.expose()), "moved to another node");
                    }
                    return Ok(conn);
                }
                Ok(Err(e)) => {
                    tracing::debug!(stage, endpoint = %endpoint_label(endpoint.expose()), error = %e, "endpoint refused");
                    failure = Some(e);
                }
                Err(_) => {
                    tracing::debug!(stage, endpoint = %endpoint_label(endpoint.expose()), "endpoint timed out");
                    failure = Some(lapin::Error::from(std::io::Error::from(std::io::ErrorKind::TimedOut)));
                }
            }
        }
        Err(failure.unwrap_or_else(|| lapin::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound))))
    }

    fn stages(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, usize>> {
        self.connected.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn connect_to(&self, endpoint: &Secret, stage: &str) -> lapin::Result<Connection> {
        let name = format!("{}/{}", self.instance, stage);
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let conn = Connection::connect(endpoint.expose(), props).await?;
        if !self.declared.load(Ordering::Relaxed) {
            self.topology.declare(&conn).await?;
            self.declared.store(true, Ordering::Relaxed);
        } else {
            match tokio::time::timeout(REDECLARE_WAIT, self.topology.declare(&conn)).await {
                Ok(declared) => declared?,
                Err(_) => tracing::warn!(
                    stage,
                    endpoint = %endpoint_label(endpoint.expose()),
                    "the broker did not confirm the topology in time (a cluster node cut off?); going on with the one declared before"
                ),
            }
        }
        tracing::debug!(stage, endpoint = %endpoint_label(endpoint.expose()), "connected");
        Ok(conn)
    }

    /// Connects with exponential back-off until it succeeds or shutdown.
    pub async fn connect_retry(&self, stage: &str, shutdown: &CancellationToken) -> Option<Connection> {
        let mut delay = self.settings.reconnect_min;
        let max = self.settings.reconnect_max;
        let reconnect = self.stages().contains_key(stage);
        loop {
            let within = ENDPOINT_TIMEOUT * self.endpoints.len() as u32 + Duration::from_secs(5);
            let attempt = tokio::time::timeout(within, self.connect(stage));
            match tokio::select! { r = attempt => r, _ = shutdown.cancelled() => return None } {
                Ok(Ok(conn)) => {
                    if reconnect {
                        self.metrics.broker_reconnects.inc();
                        tracing::info!(stage, "reconnected to RabbitMQ");
                    }
                    return Some(conn);
                }
                Ok(Err(e)) => tracing::warn!(stage, error = %e, retry_in = ?delay, "RabbitMQ connection failed"),
                Err(_) => tracing::warn!(stage, retry_in = ?delay, "RabbitMQ connection timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return None,
            }
            delay = (delay * 2).min(max);
        }
    }
}

/// A shared connection for occasional work (admin calls, readiness),
/// re-established on demand when it has dropped.
pub struct Link {
    connector: Connector,
    stage: &'static str,
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl Link {
    pub fn new(connector: Connector, stage: &'static str) -> Self {
        Self {
            connector,
            stage,
            current: tokio::sync::Mutex::new(None),
        }
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The live connection, reconnecting once if it has dropped.
    pub async fn get(&self) -> lapin::Result<Arc<Connection>> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        let conn = Arc::new(self.connector.connect(self.stage).await?);
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// True when the broker answers within `within`.
    pub async fn ready(&self, within: Duration) -> bool {
        matches!(tokio::time::timeout(within, self.get()).await, Ok(Ok(_)))
    }
}

/// `url` asking for a heartbeat of `secs` unless it names one itself (or
/// `secs` is 0: the broker's).
fn with_heartbeat(url: &str, secs: u16) -> String {
    let query = url.split_once('?').map(|(_, q)| q);
    let named = query.is_some_and(|q| q.split('&').any(|kv| kv.starts_with("heartbeat=")));
    match (secs, named, query) {
        (0, _, _) | (_, true, _) => url.to_owned(),
        (_, false, Some(_)) => format!("{url}&heartbeat={secs}"),
        (_, false, None) => format!("{url}?heartbeat={secs}"),
    }
}

/// An AMQP URL without its credentials, for logs: `host:port/vhost`.
fn endpoint_label(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.rsplit_once('@').map_or(rest, |(_, r)| r)
}

#[cfg(test)]
mod tests {
    use super::{endpoint_label, with_heartbeat};

    #[test]
    fn every_endpoint_asks_for_the_heartbeat_unless_it_names_its_own() {
        assert_eq!(with_heartbeat("amqp://h:1/%2f", 10), "amqp://h:1/%2f?heartbeat=10");
        assert_eq!(
            with_heartbeat("amqp://h:1/%2f?frame_max=8192", 5),
            "amqp://h:1/%2f?frame_max=8192&heartbeat=5"
        );
        assert_eq!(
            with_heartbeat("amqp://h:1/v?heartbeat=30", 5),
            "amqp://h:1/v?heartbeat=30"
        );
        assert_eq!(with_heartbeat("amqp://h:1/v", 0), "amqp://h:1/v");
        // The URI parser lapin uses reads it back.
        let uri: lapin::uri::AMQPUri = with_heartbeat("amqp://g:g@h:1/v", 7).parse().unwrap();
        assert_eq!(uri.query.heartbeat, Some(7));
    }

    #[test]
    fn endpoint_labels_leave_the_credentials_out() {
        assert_eq!(
            endpoint_label("amqp://guest:s3cret@10.0.0.7:5672/%2f"),
            "10.0.0.7:5672/%2f"
        );
        assert_eq!(endpoint_label("amqps://node-2:5671"), "node-2:5671");
        assert_eq!(endpoint_label("amqp://u:p@ss@h:1/v"), "h:1/v");
    }
}
