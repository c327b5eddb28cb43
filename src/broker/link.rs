//! Connections to RabbitMQ. Every pipeline stage owns its connection, so a
//! failure in one does not stall the others; each (re)connection declares
//! the topology, so a restarted broker or a fresh vhost is ready at once.

use std::sync::Arc;
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use super::topology::Topology;
use crate::metrics::Metrics;
use crate::settings::RabbitSettings;

/// What a stage needs to (re)connect.
#[derive(Clone)]
pub struct Connector {
    settings: RabbitSettings,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    /// Prefix of connection names in the management UI, per instance.
    instance: String,
    /// Stages that have connected before, so a later connection counts as a reconnect.
    connected: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Connector {
    pub fn new(settings: RabbitSettings, topology: Arc<Topology>, metrics: Arc<Metrics>, instance: String) -> Self {
        Self {
            settings,
            topology,
            metrics,
            instance,
            connected: Default::default(),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// One attempt: connect and declare the topology.
    pub async fn connect(&self, stage: &str) -> lapin::Result<Connection> {
        let name = format!("{}/{}", self.instance, stage);
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let conn = Connection::connect(self.settings.url.expose(), props).await?;
        let channel = conn.create_channel().await?;
        self.topology.declare(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(conn)
    }

    /// Connects with exponential back-off until it succeeds or shutdown.
    pub async fn connect_retry(&self, stage: &str, shutdown: &CancellationToken) -> Option<Connection> {
        let mut delay = self.settings.reconnect_min;
        let max = self.settings.reconnect_max;
        loop {
            let attempt = tokio::time::timeout(Duration::from_secs(10), self.connect(stage));
            match tokio::select! { r = attempt => r, _ = shutdown.cancelled() => return None } {
                Ok(Ok(conn)) => {
                    let fresh = self
                        .connected
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(stage.to_owned());
                    if !fresh {
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
