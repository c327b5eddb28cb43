//! Entry point: load settings, start logs, run a subcommand.
//! `serve` (default) runs the service; `seed` fills the catalog; `migrate`
//! only applies migrations; `token` prints an HS256 subscriber token.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use product_gateway::settings::Settings;
use product_gateway::startup::{self, Application};
use product_gateway::{http, seed, store, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config_dir = std::env::var("GATEWAY_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| "config".into());
    let settings = Settings::load(&config_dir)?;
    // Held to the end: its drop sends the spans still queued.
    let _traces = telemetry::init(&settings.tracing, telemetry::DEFAULT_LOGS)?;
    let command = std::env::args().nth(1).unwrap_or_else(|| "serve".into());
    match command.as_str() {
        "serve" => serve(settings).await,
        "migrate" => {
            store::create_database(settings.database.url.expose()).await?;
            store::migrate(settings.database.url.expose()).await
        }
        "seed" => {
            store::create_database(settings.database.url.expose()).await?;
            store::migrate(settings.database.url.expose()).await?;
            let db = store::pool(&settings.database)?;
            let products = match flag("--products") {
                Some(n) => n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--products takes a count of products, got {n:?}"))?,
                None => settings.seed.products,
            };
            seed::seed(&db, products).await?;
            Ok(())
        }
        "token" => {
            // `token --topics product.*.42,product.stock.# [--ttl 3600] [--sub NAME]`
            let topics: Vec<String> = flag("--topics")
                .ok_or_else(|| anyhow::anyhow!("token needs --topics PATTERN[,PATTERN…]"))?
                .split(',')
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect();
            let ttl = match flag("--ttl") {
                Some(n) => n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--ttl takes seconds, got {n:?}"))?,
                None => 3600,
            };
            let sub = flag("--sub").unwrap_or_else(|| "cli".into());
            let token = http::auth::sign_hs256(&settings.auth, &sub, &topics, std::time::Duration::from_secs(ttl))?;
            println!("{token}");
            Ok(())
        }
        other => anyhow::bail!("unknown command {other:?}; use serve, seed, migrate or token"),
    }
}

/// The value after `name` on the command line.
fn flag(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1).cloned()
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let server = &settings.server;
    let listener = startup::bind(&server.host, server.port, server.listen_backlog)?;
    let app = Application::build(settings, listener).await?;
    tracing::info!(port = app.port(), "serving");
    let token = app.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        token.cancel();
    });
    app.run_until_stopped().await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
