//! Scenario 2, fan-out: the same events to 1,000 clients over WebSocket, SSE and
//! RabbitMQ Web-STOMP, side by side, and each side's most.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{Ctx, INTERFERENCE, Points, wait_clients_gone};
use crate::fleet::Child;
use crate::harness::{Instance, cpu_sample};
use crate::load::{self, Pace};
use crate::report::{ms, thousands};

pub struct Fanout {
    pub per_sec: f64,
    pub share: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// What one fan-out window measured: the clients' result and readiness,
/// the publisher's run and the service's latency points over the window.
pub struct FanoutWindow {
    pub result: serde_json::Value,
    pub ready: serde_json::Value,
    pub publish: load::PublishRun,
    pub points: [f64; 4],
}

/// Measures `n` clients over `proto` receiving every event at `rate`, in a
/// child process; a window disturbed by other programs is measured again
/// when the run has time. `title` names it in the CPU shares.
#[allow(clippy::too_many_arguments)]
pub async fn fanout_window(
    ctx: &mut Ctx,
    inst: &Instance,
    proto: &str,
    label: &str,
    addr: SocketAddr,
    n: usize,
    rate: f64,
    title: &str,
) -> Result<FanoutWindow> {
    let (warmup, window) = (Duration::from_secs(3), Duration::from_secs(15));
    if proto == "stomp" {
        let conn = lapin::Connection::connect(
            &ctx.iso.amqp_url(&ctx.iso.vhost),
            lapin::ConnectionProperties::default(),
        )
        .await?;
        let ch = conn.create_channel().await?;
        ch.exchange_declare(
            load::STOMP_EXCHANGE.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .context("declare the Web-STOMP exchange")?;
        let _ = conn.close(200, "declared".into()).await;
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        ctx.quiet().await;
        let mut child = Child::spawn(&[
            "fanout-clients".into(),
            "--proto".into(),
            proto.into(),
            "--addr".into(),
            addr.to_string(),
            "--n".into(),
            n.to_string(),
            "--vhost".into(),
            ctx.iso.vhost.clone(),
            "--warmup-ms".into(),
            warmup.as_millis().to_string(),
            "--window-ms".into(),
            window.as_millis().to_string(),
        ])?;
        let ready = child
            .expect("READY", Duration::from_secs(150))
            .await
            .with_context(|| format!("{n} {label} clients"))?;
        // Web-STOMP clients get each event from a topic exchange of its own
        // as the update the gateway's clients receive, routed by its topic:
        // how RabbitMQ alone would serve these browsers.
        let mirror = (proto == "stomp").then_some(load::STOMP_EXCHANGE);
        let publish = ctx
            .publish_to(Pace::Rate(rate), Some(Duration::from_secs(90)), None, None, mirror)
            .await?;
        // CPU over the clients' whole measuring window.
        tokio::time::sleep(warmup).await;
        let cpu0 = cpu_sample();
        let points0 = Points::read(inst);
        let perf = ctx.perf(&format!("fanout-{proto}"), 8);
        tokio::time::sleep(window).await;
        let cpu1 = cpu_sample();
        let points = Points::read(inst).means_since(&points0);
        let result = child.expect("RESULT", Duration::from_secs(60)).await?;
        publish.stop();
        let publish = publish.wait().await.context("fan-out publisher")?;
        child.stop().await?;
        if proto != "stomp" {
            wait_clients_gone(inst).await?;
        }
        let foreign = ctx
            .profile(
                &format!(
                    "{title}, {n} {label} clients at {rate} events/s{}",
                    if attempt > 1 { " (measured again)" } else { "" }
                ),
                &cpu0,
                &cpu1,
                perf,
                attempt == 1,
            )
            .await;
        if foreign < INTERFERENCE || attempt > 1 || !ctx.may_retry() {
            return Ok(FanoutWindow {
                result,
                ready,
                publish,
                points,
            });
        }
    }
}

pub async fn fanout(
    ctx: &mut Ctx,
    inst: &Instance,
    proto: &str,
    label: &str,
    addr: SocketAddr,
    n: usize,
    rate: f64,
) -> Result<Fanout> {
    const S: &str = "2. fan-out";
    // The figures with targets are those at the base rate.
    let base = rate == FANOUT_RATE;
    let FanoutWindow { result, ready, .. } = fanout_window(ctx, inst, proto, label, addr, n, rate, S).await?;
    let f = |k: &str| result[k].as_f64().unwrap_or(f64::NAN);
    let expected = rate * n as f64;
    let out = Fanout {
        per_sec: f("per_sec"),
        share: f("per_sec") / expected,
        p50: f("p50_ms"),
        p99: f("p99_ms"),
        p999: f("p999_ms"),
    };
    if result["errors"].as_u64().unwrap_or(0) > 0 {
        ctx.report.note(format!(
            "Fan-out {label}: {} clients ended with an error: {}",
            result["errors"], result["first_error"]
        ));
    }
    let gateway = proto != "stomp";
    let target_rate = if gateway && base && n >= 1000 {
        "≥ 100,000/s"
    } else {
        ""
    };
    ctx.report.row(
        S,
        format!("{label}, {n} clients, {rate} events/s: delivered msg/s"),
        format!(
            "{} ({:.1}% of every event to every client; per client {}–{}; connected in {:.1} s)",
            thousands(out.per_sec),
            out.share * 100.0,
            result["min_client"],
            result["max_client"],
            ready["connect_secs"].as_f64().unwrap_or(f64::NAN)
        ),
        target_rate,
        (!target_rate.is_empty()).then_some(out.share >= 0.99),
    );
    let target_lat = if gateway && base { "p99 < 100 ms" } else { "" };
    ctx.report.row(
        S,
        format!("{label}, {n} clients, {rate} events/s: latency ts_us → receipt p50 / p99 / p999 (max)"),
        format!(
            "{} / {} / {} ({})",
            ms(out.p50),
            ms(out.p99),
            ms(out.p999),
            ms(f("max_ms"))
        ),
        target_lat,
        (gateway && base).then_some(out.p99 < 100.0),
    );
    Ok(out)
}

/// Events per second of the fan-out figures with targets.
pub const FANOUT_RATE: f64 = 100.0;

/// A fan-out's most delivered msg/s: the offered rate doubles from `first`
/// (already measured) until the side no longer delivers nearly every event
/// to every client, or `max_rate` is reached. Returns (msg/s, at events/s).
#[allow(clippy::too_many_arguments)]
pub async fn fanout_max(
    ctx: &mut Ctx,
    inst: &Instance,
    proto: &str,
    label: &str,
    addr: SocketAddr,
    n: usize,
    first: &Fanout,
    max_rate: f64,
) -> Result<(f64, f64)> {
    let (mut best, mut at) = (first.per_sec, FANOUT_RATE);
    let (mut share, mut rate) = (first.share, FANOUT_RATE);
    while share >= 0.95 && rate * 2.0 <= max_rate {
        rate *= 2.0;
        let f = fanout(ctx, inst, proto, label, addr, n, rate).await?;
        if f.per_sec > best {
            (best, at) = (f.per_sec, rate);
        }
        share = f.share;
    }
    Ok((best, at))
}

// ----------------------------------------------------------- 4. resume
