//! Builds the whole service from settings: the same code runs in `main` and
//! in tests, which hand it a listener on port 0.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, middleware, web};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::apply::consumer;
use crate::broadcast::relay;
use crate::broadcast::stream::{self, CatchUpReader};
use crate::broker::link::{Connector, Link};
use crate::broker::topology::{Topology, check_message_limit, report_message_limit};
use crate::http::{self, AppState};
use crate::hub::{self, HubHandle};
use crate::ingest::Ingest;
use crate::ingest::generator::{self, GeneratorHandle};
use crate::metrics::Metrics;
use crate::photos::PhotoCache;
use crate::settings::Settings;
use crate::store::{self, Db};

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
    server: Server,
    state: web::Data<AppState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Application {
    /// Migrates, connects, starts the pipeline tasks and binds the server,
    /// in that order: each step needs the ones before it.
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
        let stores = Stores::open(&settings, &metrics).await?;
        let broker = Broker::connect(&settings, &metrics).await?;
        let pipeline = Pipeline::start(&settings, &stores, &broker, &metrics, &shutdown, &tracker).await?;

        let snapshots = hub::session::SnapshotLimit::new(&settings.hub);
        let sessions = Arc::new(hub::session::SessionContext {
            hub: pipeline.hub.clone(),
            read_db: stores.read_db.clone(),
            replica: stores.replica.clone(),
            snapshots: snapshots.clone(),
            catch_up: pipeline.catch_up.clone(),
        });
        let state = web::Data::new(AppState {
            settings: settings.clone(),
            db: stores.db,
            read_db: stores.read_db,
            snapshots,
            photos: stores.photos,
            metrics,
            broker: broker.admin,
            generator: pipeline.generator,
            hub: pipeline.hub,
            ingest: pipeline.ingest,
            auth,
            catch_up: pipeline.catch_up,
            sessions,
            shutdown: shutdown.clone(),
        });
        let port = listener.local_addr()?.port();
        let server = serve(&settings, state.clone(), listener)?;
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

/// The databases and the photo cache, the database migrated first.
struct Stores {
    db: Db,
    read_db: Db,
    replica: Option<store::Replica>,
    photos: Arc<PhotoCache>,
}

impl Stores {
    async fn open(settings: &Settings, metrics: &Arc<Metrics>) -> anyhow::Result<Self> {
        store::migrate(settings.database.url.expose()).await?;
        let db = store::pool(&settings.database)?;
        let read_db = store::read_pool(&settings.database)?;
        let replica = store::replica(&settings.database)?;
        let photos = Arc::new(PhotoCache::new(
            &settings.redis,
            &settings.photos,
            db.clone(),
            read_db.clone(),
            metrics.clone(),
        )?);
        Ok(Self {
            db,
            read_db,
            replica,
            photos,
        })
    }
}

/// RabbitMQ: how each stage connects, and the admin connection.
struct Broker {
    connector: Connector,
    /// For admin calls and readiness.
    admin: Arc<Link>,
}

impl Broker {
    /// The topology must exist before anything publishes: start-up fails
    /// loudly when RabbitMQ cannot be reached at all.
    async fn connect(settings: &Settings, metrics: &Arc<Metrics>) -> anyhow::Result<Self> {
        check_message_limit(&settings.rabbit.topology, &settings.consumer).map_err(anyhow::Error::msg)?;
        let topology = Arc::new(Topology::new(&settings.rabbit.topology));
        let connector = Connector::new(settings.rabbit.clone(), topology, metrics.clone(), instance_name());
        let admin = Arc::new(Link::new(connector.clone(), "admin"));
        let conn = admin.get().await?;
        report_message_limit(&conn, settings.rabbit.topology.max_message_bytes, metrics).await;
        Ok(Self { connector, admin })
    }
}

/// The pipeline's stages, running: what the HTTP side holds of them.
struct Pipeline {
    generator: GeneratorHandle,
    ingest: Arc<Ingest>,
    hub: HubHandle,
    catch_up: CatchUpReader,
}

impl Pipeline {
    /// Starts the stages from the store outwards: the consumer and relay,
    /// the hub once it reads the update stream, then the sources.
    async fn start(
        settings: &Arc<Settings>,
        stores: &Stores,
        broker: &Broker,
        metrics: &Arc<Metrics>,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> anyhow::Result<Self> {
        let (db, connector, topology) = (&stores.db, &broker.connector, &settings.rabbit.topology);
        let committed = consumer::spawn(
            &settings.consumer,
            topology,
            db.clone(),
            connector.clone(),
            metrics.clone(),
            shutdown.clone(),
            tracker,
        );
        consumer::spawn_lag_monitor(
            broker.admin.clone(),
            topology,
            metrics.clone(),
            shutdown.clone(),
            tracker,
        );
        relay::spawn(
            topology,
            db.clone(),
            connector.clone(),
            metrics.clone(),
            &committed,
            shutdown.clone(),
            tracker,
        );
        let hub = hub::spawn(&settings.hub, metrics.clone(), shutdown.clone(), tracker);
        let mut attached = stream::spawn_live(
            connector.clone(),
            topology.updates_stream.clone(),
            settings.hub.stream_prefetch,
            settings.hub.warm_start.then_some(settings.hub.history),
            hub.clone(),
            committed.pulse,
            shutdown.clone(),
            tracker,
        );
        // Serve only once the stream is read (and the hub's memory filled):
        // a client subscribing earlier would miss the updates broadcast in
        // between, or resume from the stream what memory is about to hold.
        tokio::time::timeout(Duration::from_secs(60), attached.wait_for(|a| *a))
            .await
            .map_err(|_| anyhow::anyhow!("the update stream could not be attached and read within 60 s"))??;
        let catch_up = CatchUpReader::new(
            connector.clone(),
            topology.updates_stream.clone(),
            &settings.hub,
            metrics.clone(),
        );
        // The sources last, once every stage behind them runs.
        let generator = generator::spawn(
            settings,
            db.clone(),
            connector.clone(),
            metrics.clone(),
            shutdown.clone(),
            tracker,
        );
        // Its own connection, opened on the first call: a stage of its own.
        let ingest = Arc::new(Ingest::new(
            db.clone(),
            Arc::new(Link::new(connector.clone(), "ingest")),
            topology.events_exchange.clone(),
            settings.generator.confirm_timeout,
            metrics.clone(),
        ));
        Ok(Self {
            generator,
            ingest,
            hub,
            catch_up,
        })
    }
}

/// The HTTP server on `listener`, its sockets tuned as they are accepted.
fn serve(settings: &Settings, state: web::Data<AppState>, listener: TcpListener) -> anyhow::Result<Server> {
    let static_dir = settings.server.static_dir.clone();
    let max_body = settings.server.max_body_bytes;
    let tuning = SocketTuning {
        send_buffer: settings.server.socket_send_buffer,
        unsent_bytes: settings.server.socket_unsent_bytes,
        user_timeout: settings.hub.client_timeout,
    };
    let hosts = web::Data::new(http::origin::HostPolicy::new(&settings.server));
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(max_body))
            .wrap(http::error::json_errors())
            .app_data(hosts.clone())
            .wrap(middleware::from_fn(http::origin::check_host))
            .wrap(middleware::NormalizePath::trim())
            // Outermost: the span and the access line cover every refusal.
            .wrap(middleware::from_fn(http::access::trace_request))
            .configure(http::routes)
            .service(actix_files::Files::new("/", &static_dir).index_file("index.html"))
    })
    .on_connect(move |conn, _| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            tuning.apply(tcp);
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
    Ok(server.listen(listener)?.run())
}

/// Options set on every accepted client socket.
#[derive(Clone, Copy)]
struct SocketTuning {
    send_buffer: usize,
    unsent_bytes: u32,
    user_timeout: Duration,
}

impl SocketTuning {
    fn apply(self, tcp: &actix_web::rt::net::TcpStream) {
        let socket = socket2::SockRef::from(tcp);
        if self.send_buffer > 0
            && let Err(e) = socket.set_send_buffer_size(self.send_buffer)
        {
            tracing::debug!(error = %e, "could not set the socket send buffer");
        }
        if self.unsent_bytes > 0
            && let Err(e) = socket.set_tcp_notsent_lowat(self.unsent_bytes)
        {
            tracing::debug!(error = %e, "could not set TCP_NOTSENT_LOWAT");
        }
        // A peer that takes nothing (a zero window) or acknowledges
        // nothing (gone without a FIN) for client_timeout is dropped by
        // the kernel: an event stream whose body is not even polled
        // while the socket is full is closed too.
        if let Err(e) = socket.set_tcp_user_timeout(Some(self.user_timeout)) {
            tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
        }
    }
}

fn instance_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("gateway-{}-{}", host.trim(), std::process::id())
}
