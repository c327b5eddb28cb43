//! Scenario 10, the latency floor: 100 clients receiving every event at
//! 100 events/s, over WebSocket and then SSE. What a change costs from its
//! publish to the browser when nothing else is going on, and, hop by hop,
//! where that time goes.

use anyhow::Result;

use super::fanout::{FanoutWindow, fanout_window};
use super::{Ctx, hops_text};
use crate::harness::Instance;
use crate::report::{ms, thousands};

pub const METHOD: &str = r#"- **10. Latency floor.** 100 clients in a child process (`bench fanout-clients`), each on every
  price and stock update (`product.#`), first over WebSocket, then over SSE; the bench publishes 100
  events/s. After a 3 s warm-up, a 15 s window: latency is `ts_us` (stamped at the publish) → receipt,
  over every delivery of the window. *Where the time goes*: the publisher's own mean publish → confirm,
  then the means over the window of the service's latency points, each the time since the publish:
  `gateway_commit_latency_seconds` (apply committed), `gateway_relay_latency_seconds` (stream message
  confirmed), `gateway_hub_latency_seconds` (read back for the hub), `gateway_e2e_latency_seconds`
  (handed to the socket); a hop is the difference of two means.
"#;

const S: &str = "10. latency floor";
const CLIENTS: usize = 100;
const RATE: f64 = 100.0;

pub async fn scenario(ctx: &mut Ctx, inst: &Instance) -> Result<()> {
    for (proto, label) in [("ws", "WebSocket"), ("sse", "SSE")] {
        let FanoutWindow {
            result,
            ready,
            publish,
            points,
        } = fanout_window(ctx, inst, proto, label, inst.addr(), CLIENTS, RATE, S).await?;
        let f = |k: &str| result[k].as_f64().unwrap_or(f64::NAN);
        let (p50, p99) = (f("p50_ms"), f("p99_ms"));
        let share = f("per_sec") / (RATE * CLIENTS as f64);
        ctx.report.row(
            S,
            format!("{label}, {CLIENTS} clients, {RATE} events/s: publish → client p50 / p99 / p999 (max)"),
            format!(
                "{} / {} / {} ({}); {:.1}% of every event to every client, connected in {:.1} s",
                ms(p50),
                ms(p99),
                ms(f("p999_ms")),
                ms(f("max_ms")),
                share * 100.0,
                ready["connect_secs"].as_f64().unwrap_or(f64::NAN)
            ),
            "p50 < 5 ms, p99 < 10 ms",
            Some(p50 < 5.0 && p99 < 10.0 && share >= 0.99),
        );
        ctx.report.row(
            S,
            format!("{label}, {CLIENTS} clients: where the time goes (means)"),
            hops_text(publish.confirm_mean_ms, points),
            "",
            None,
        );
        if result["errors"].as_u64().unwrap_or(0) > 0 {
            ctx.report.note(format!(
                "Latency floor, {label}: {} clients ended with an error: {}",
                thousands(f("errors")),
                result["first_error"]
            ));
        }
    }
    Ok(())
}
