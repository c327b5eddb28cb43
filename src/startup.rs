//! Builds the whole service from settings: the same code runs in `main` and
//! in tests, which hand it a listener on port 0.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, middleware, web};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::apply::consumer;
use crate::broadcast::{relay, stream};
use crate::broker::link::{Connector, Link};
use crate::broker::topology::{Topology, check_message_limit, report_message_limit};
use crate::http::{self, AppState};
use crate::hub;
use crate::ingest::generator;
use crate::metrics::Metrics;
use crate::photos::PhotoCache;
use crate::settings::Settings;
use crate::store;

/// The service's listening socket, with room in the accept queue for
/// `backlog` connection attempts: when thousands of clients reconnect at
/// once after a restart, an overflowing queue drops their SYNs and each
/// waits a second to try again. (std's `bind` queues 128.)
pub fn bind(host: &str, port: u16, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host}:{port} names no address")))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

pub struct Application {
    port: u16,
    server: actix_web::dev::Server,
    state: web::Data<AppState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Application {
    /// Migrates, connects, starts the pipeline tasks and binds the server.
    pub async fn build(settings: Settings, listener: TcpListener) -> anyhow::Result<Self> {
        settings.check_serving()?;
        if settings.admin.dev_mode {
            tracing::warn!(
                "admin.dev_mode is on: a short or the public default admin token is accepted; never expose this instance"
            );
        }
        let settings = Arc::new(settings);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Metrics::new();
        // Keys first: a subscriber key that does not load stops the start
        // before anything connects.
        let auth = Arc::new(http::auth::Verifier::new(
            &settings.auth,
            settings.hub.max_pattern_words,
        )?);

        store::migrate(settings.database.url.expose()).await?;
        let db = store::pool(&settings.database)?;
        let read_db = store::read_pool(&settings.database)?;
        let photos = Arc::new(PhotoCache::new(
            &settings.redis,
            &settings.photos,
            db.clone(),
            metrics.clone(),
        )?);

        check_message_limit(&settings.rabbit.topology, &settings.consumer).map_err(anyhow::Error::msg)?;
        let topology = Arc::new(Topology::new(&settings.rabbit.topology));
        let instance = instance_name();
        let connector = Connector::new(settings.rabbit.clone(), topology, metrics.clone(), instance);
        let broker = Arc::new(Link::new(connector.clone(), "admin"));
        // The topology must exist before anything publishes; fail start-up
        // loudly when RabbitMQ cannot be reached at all.
        let conn = broker.get().await?;
        report_message_limit(&conn, settings.rabbit.topology.max_message_bytes, &metrics).await;

        let committed = consumer::spawn(
            &settings.consumer,
            &settings.rabbit.topology,
            db.clone(),
            connector.clone(),
            metrics.clone(),
            shutdown.clone(),
            &tracker,
        );
        relay::spawn(
            &settings.rabbit.topology,
            db.clone(),
            connector.clone(),
            metrics.clone(),
            committed,
            shutdown.clone(),
            &tracker,
        );
        consumer::spawn_lag_monitor(
            broker.clone(),
            &settings.rabbit.topology,
            metrics.clone(),
            shutdown.clone(),
            &tracker,
        );
        let hub = hub::spawn(&settings.hub, metrics.clone(), shutdown.clone(), &tracker);
        let mut attached = stream::spawn_live(
            connector.clone(),
            settings.rabbit.topology.updates_stream.clone(),
            settings.hub.stream_prefetch,
            settings.hub.warm_start.then_some(settings.hub.history),
            hub.clone(),
            shutdown.clone(),
            &tracker,
        );
        // Serve only once the stream is read (and the hub's memory filled):
        // a client subscribing earlier would miss the updates broadcast in
        // between, or resume from the stream what memory is about to hold.
        tokio::time::timeout(Duration::from_secs(60), attached.wait_for(|a| *a))
            .await
            .map_err(|_| anyhow::anyhow!("the update stream could not be attached and read within 60 s"))??;
        let catch_up = stream::CatchUpReader::new(
            connector.clone(),
            settings.rabbit.topology.updates_stream.clone(),
            &settings.hub,
            metrics.clone(),
        );
        let generator = generator::spawn(
            &settings,
            db.clone(),
            connector.clone(),
            metrics.clone(),
            shutdown.clone(),
            &tracker,
        );
        // Its own connection, opened on the first call: a stage of its own.
        let ingest = Arc::new(crate::ingest::Ingest::new(
            db.clone(),
            Arc::new(Link::new(connector.clone(), "ingest")),
            settings.rabbit.topology.events_exchange.clone(),
            settings.generator.confirm_timeout,
        ));

        let state = web::Data::new(AppState {
            settings: settings.clone(),
            db,
            read_db,
            snapshots: hub::session::SnapshotLimit::new(&settings.hub),
            photos,
            metrics,
            broker,
            generator,
            hub,
            ingest,
            auth,
            catch_up,
            shutdown: shutdown.clone(),
        });

        let port = listener.local_addr()?.port();
        let server_state = state.clone();
        let static_dir = settings.server.static_dir.clone();
        let max_body = settings.server.max_body_bytes;
        let send_buffer = settings.server.socket_send_buffer;
        let client_timeout = settings.hub.client_timeout;
        let hosts = web::Data::new(http::edge::HostPolicy::new(&settings.server));
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(server_state.clone())
                .app_data(web::PayloadConfig::new(max_body))
                .wrap(http::error::json_errors())
                .app_data(hosts.clone())
                .wrap(middleware::from_fn(http::edge::check_host))
                .wrap(middleware::NormalizePath::trim())
                // Outermost: the span and the access line cover every refusal.
                .wrap(middleware::from_fn(http::access::trace_request))
                .configure(http::routes)
                .service(actix_files::Files::new("/", &static_dir).index_file("index.html"))
        })
        .on_connect(move |conn, _| {
            let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() else {
                return;
            };
            let socket = socket2::SockRef::from(tcp);
            if send_buffer > 0
                && let Err(e) = socket.set_send_buffer_size(send_buffer)
            {
                tracing::debug!(error = %e, "could not set the socket send buffer");
            }
            // A peer that takes nothing (a zero window) or acknowledges
            // nothing (gone without a FIN) for client_timeout is dropped by
            // the kernel: an event stream whose body is not even polled
            // while the socket is full is closed too.
            if let Err(e) = socket.set_tcp_user_timeout(Some(client_timeout)) {
                tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
            }
        })
        // Frames go out as written: with Nagle's algorithm a frame written
        // behind another waits for the client's delayed ACK (40 ms).
        .tcp_nodelay(settings.server.tcp_nodelay)
        .disable_signals()
        .shutdown_timeout(5);
        if settings.server.workers > 0 {
            server = server.workers(settings.server.workers);
        }
        let server = server.listen(listener)?.run();

        Ok(Self {
            port,
            server,
            state,
            shutdown,
            tracker,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Cancelling this token stops the whole service gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then stops accepting,
    /// lets in-flight work finish and waits for every task.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let token = self.shutdown.clone();
        let stopper = tokio::spawn(async move {
            token.cancelled().await;
            handle.stop(true).await;
        });
        let served = self.server.await;
        self.shutdown.cancel();
        let _ = stopper.await;
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 10 s");
        }
        served?;
        Ok(())
    }
}

fn instance_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("gateway-{}-{}", host.trim(), std::process::id())
}
