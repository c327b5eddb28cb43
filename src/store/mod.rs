//! PostgreSQL: the pools, embedded migrations, the schema, and the
//! catalog's reads; the stages that write (ingest, apply, broadcast) keep
//! their own statements.

pub mod catalog;
pub(crate) mod idempotency;
pub(crate) mod prepared;
pub(crate) mod schema;

use std::time::Duration;

use diesel::Connection;
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::settings::DatabaseSettings;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Advisory lock key under which migrations run, so two instances starting
/// at once do not race.
const MIGRATION_LOCK: i64 = 0x0070_726f_646d_6967;

pub type Db = Pool<AsyncPgConnection>;

/// A product's applied versions (`SELECT id, price_version, stock_version`):
/// what apply compares an event with under the row lock, and what tells an
/// ingest retry whether its event is applied.
#[derive(diesel::QueryableByName)]
pub(crate) struct AppliedVersions {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) id: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) price_version: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) stock_version: i64,
}

impl AppliedVersions {
    pub(crate) fn version(&self, kind: crate::domain::Kind) -> i64 {
        match kind {
            crate::domain::Kind::Price => self.price_version,
            crate::domain::Kind::Stock => self.stock_version,
        }
    }
}
pub type DbConn = Object<AsyncPgConnection>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for StoreError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// The pool the pipeline writes with (apply, version issuing, admin).
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<Db> {
    build_pool(
        settings.url.expose(),
        settings.pool_size,
        settings.acquire_timeout,
        None,
    )
}

/// Set on every read connection: a read transaction left idle this long
/// (a snapshot whose task was lost) is ended by PostgreSQL itself, so no
/// client can hold back vacuum. Snapshots end their own much sooner
/// (`hub.snapshot_stall_ms`); this is the backstop.
const READ_SESSION_SETUP: &str = "SET idle_in_transaction_session_timeout = '30s'";

/// The pool client reads (REST, snapshots) use, on a replica when one is
/// set: a flood of reads waits here, never for the apply path's connections.
pub fn read_pool(settings: &DatabaseSettings) -> anyhow::Result<Db> {
    let url = settings.read_url.as_ref().unwrap_or(&settings.url);
    build_pool(
        url.expose(),
        settings.read_pool_size,
        settings.acquire_timeout,
        Some(READ_SESSION_SETUP),
    )
}

/// What a snapshot read on a replica asks of the primary: which
/// transactions a snapshot holds (a standby's own snapshot does not list
/// those still running, so it cannot tell), and how far the replica must
/// have replayed to hold them.
#[derive(Clone)]
pub struct Replica {
    /// Reads on the primary, apart from the apply path's pool.
    pub primary: Db,
    /// How long a snapshot waits for the replica to replay what the primary
    /// had committed; a snapshot is read on the primary instead after it.
    pub max_lag: Duration,
}

/// The replica's primary when client reads go to a replica; None otherwise.
pub fn replica(settings: &DatabaseSettings) -> anyhow::Result<Option<Replica>> {
    if settings.read_url.is_none() {
        return Ok(None);
    }
    // Created as they are used: a replica that keeps up takes one
    // connection here per snapshot being begun, not one per read.
    let primary = build_pool(
        settings.url.expose(),
        settings.read_pool_size,
        settings.acquire_timeout,
        Some(READ_SESSION_SETUP),
    )?;
    Ok(Some(Replica {
        primary,
        max_lag: settings.replica_max_lag,
    }))
}

fn build_pool(url: &str, size: usize, acquire_timeout: Duration, setup: Option<&'static str>) -> anyhow::Result<Db> {
    let mut config = ManagerConfig::<AsyncPgConnection>::default();
    if let Some(setup) = setup {
        config.custom_setup = Box::new(move |url| {
            let url = url.to_owned();
            Box::pin(async move {
                use diesel_async::{AsyncConnection, RunQueryDsl};
                let mut conn = AsyncPgConnection::establish(&url).await?;
                diesel::sql_query(setup)
                    .execute(&mut conn)
                    .await
                    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                Ok(conn)
            })
        });
    }
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config);
    let timeout = Some(acquire_timeout);
    let pool = Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout)
        .build()?;
    Ok(pool)
}

/// Applies pending migrations under an advisory lock.
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use diesel::RunQueryDsl;
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::establish(&url)?;
        diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK})")).execute(&mut conn)?;
        let result = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("migration failed: {e}"));
        diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})")).execute(&mut conn)?;
        result
    })
    .await?
}

/// Creates the database named in `url` when it does not exist, by connecting
/// to the server's `postgres` database. Used by `make run` and tests.
pub async fn create_database(url: &str) -> anyhow::Result<()> {
    use diesel_async::RunQueryDsl;
    let (server, name) = url
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("database url has no database name"))?;
    let name = name.split('?').next().unwrap_or(name);
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        anyhow::bail!("database name {name:?} must be letters, digits and underscores");
    }
    let mut conn =
        <AsyncPgConnection as diesel_async::AsyncConnection>::establish(&format!("{server}/postgres")).await?;
    #[derive(diesel::QueryableByName)]
    struct Exists {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        exists: bool,
    }
    let found: Exists = diesel::sql_query("SELECT EXISTS(SELECT 1 FROM pg_database WHERE datname = $1) AS exists")
        .bind::<diesel::sql_types::Text, _>(name)
        .get_result(&mut conn)
        .await?;
    if !found.exists {
        // Two processes may race here; "already exists" is success.
        if let Err(e) = diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            && !e.to_string().contains("already exists")
        {
            return Err(e.into());
        }
    }
    Ok(())
}

/// Checks that a connection can be had and answers, within the pool's timeout.
pub async fn ping(db: &Db) -> Result<(), StoreError> {
    use diesel_async::RunQueryDsl;
    let mut conn = db.get().await?;
    diesel::sql_query("SELECT 1").execute(&mut conn).await?;
    Ok(())
}
