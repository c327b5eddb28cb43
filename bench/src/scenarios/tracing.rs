//! Scenario 13, what traces cost: one fleet of 19,000 one-product WebSocket
//! clients at 1,000 events/s, measured three times in a row with traces
//! off, on recording 1 % of new traces, and on recording all of them. The
//! spans go over OTLP to a sink in a child process, so the collector's work
//! is not counted as the service's.

use std::sync::OnceLock;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::{Context, Result};
use product_gateway::settings::TracingSettings;
use product_gateway::telemetry::Traces;
use serde_json::json;

use super::Ctx;
use super::selective::{Tracing, Window, fleet};
use crate::fleet::{Args, Child};
use crate::harness::Instance;

const S: &str = "13. tracing cost";
const CLIENTS: usize = 19_000;
const RATE: f64 = 1000.0;

pub const METHOD: &str = r#"- **13. Tracing cost.** The fleet of scenario 6 (19,000 WebSocket clients, one product each,
  1,000 events/s from the bench's publisher) measured three times in a row on one instance: traces off,
  on recording 1 % of new traces, on recording all. Each event starts its trace at apply (the bench's
  publisher sends no `traceparent`); spans go over OTLP/HTTP to a sink in a child process that reads
  and discards them. *CPU per delivered message* is the bench process's (the service) CPU over the
  window ÷ deliveries; p99 as in scenario 6. The ratio compares the 1 % window with the off window
  of the same run.
"#;

/// The process's traces: the bench's exporter points at the sink's port,
/// off until this scenario turns it on.
static TRACES: OnceLock<(Traces, u16)> = OnceLock::new();

/// Starts logs and the (off) trace exporter of the bench process, aimed at
/// a port the sink will take when scenario 13 runs.
pub fn init(default_logs: &str) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let traces = product_gateway::telemetry::init(
        &TracingSettings {
            otlp_endpoint: format!("http://127.0.0.1:{port}/v1/traces"),
            sample_ratio: 0.0,
        },
        default_logs,
    )?;
    traces.set(None);
    let _ = TRACES.set((traces, port));
    Ok(())
}

/// Turns the service's traces off (None) or on at a ratio.
pub fn set(ratio: Option<f64>) {
    if let Some((traces, _)) = TRACES.get() {
        traces.set(ratio);
    }
}

/// Child process: an OTLP/HTTP endpoint that takes span exports and
/// discards them; `READY {"port":N}` once listening, until `STOP`.
pub fn sink(args: Args) -> Result<()> {
    let port: u16 = args.get("port")?.parse().context("--port")?;
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(|| {
            App::new().app_data(web::PayloadConfig::new(64 << 20)).route(
                "/v1/traces",
                web::post().to(|_: web::Bytes| async { HttpResponse::Ok().finish() }),
            )
        })
        .workers(1)
        .bind(("127.0.0.1", port))?
        .run();
        let handle = server.handle();
        println!("READY {}", json!({ "port": port }));
        // Until told to stop, the parent goes away, or an hour at most.
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            let _ = tokio::time::timeout(Duration::from_secs(3600), lines.next_line()).await;
            handle.stop(false).await;
        });
        server.await?;
        Ok(())
    })
}

pub async fn scenario(ctx: &mut Ctx, inst: &Instance) -> Result<()> {
    let Some((_, port)) = TRACES.get() else {
        ctx.report
            .note("13. tracing cost: not measured (the bench's trace exporter did not start).");
        return Ok(());
    };
    let mut sink = Child::spawn(&["otlp-sink".into(), "--port".into(), port.to_string()])?;
    sink.expect("READY", Duration::from_secs(30)).await?;
    let windows = [None, Some(0.01), Some(1.0)].map(|ratio| Window {
        rate: RATE,
        tracing: Some(Tracing(ratio)),
    });
    let measured = fleet(ctx, inst, S, "ws", CLIENTS, &windows).await;
    set(None);
    sink.stop().await?;
    let figures = measured?;
    if let [off, one, all] = &figures[..] {
        let ratio = one.cpu_us_per_msg / off.cpu_us_per_msg;
        ctx.report.row(
            S,
            "CPU per delivered message, tracing on at 1 % ÷ off".to_owned(),
            format!(
                "{ratio:.2} ({:.1} µs ÷ {:.1} µs; all traces recorded: {:.1} µs, {:.2}×)",
                one.cpu_us_per_msg,
                off.cpu_us_per_msg,
                all.cpu_us_per_msg,
                all.cpu_us_per_msg / off.cpu_us_per_msg
            ),
            "≤ 1.05",
            Some(ratio <= 1.05),
        );
        ctx.report.row(
            S,
            "p99 latency: off / on at 1 % / on at 100 %".to_owned(),
            format!("{:.1} / {:.1} / {:.1} ms", off.p99_ms, one.p99_ms, all.p99_ms),
            "",
            None,
        );
    }
    Ok(())
}
