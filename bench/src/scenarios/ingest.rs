//! Scenario 12, the ingest API: wrk POSTs price and stock changes, each
//! under an idempotency key of its own, over 64 connections; every 202 is
//! an event the broker confirmed. Beside it, the broker's own ceiling.

use std::time::Duration;

use anyhow::{Context, Result};

use super::photos::wrk;
use super::pipeline::measured_ceiling;
use super::{Ctx, drain_applied};
use crate::harness::{Instance, cpu_sample};
use crate::report::{ms, thousands};

pub const METHOD: &str = r#"- **12. Ingest API.** wrk, 2 threads and 64 connections for 20 s, twice: without idempotency keys,
  then with an `Idempotency-Key` of its own on every request (the figure with the target). It POSTs
  `/products/{id}/price` and `/stock` in turn (random products of the 1,000, random values) with the
  ingest token; a 202 is an answer given after the broker confirmed the event. *Accepted/s* is wrk's
  requests/s with every answer a 202 (a non-2xx would be named); latency is wrk's p50 / p99. The ratio
  is to the broker's ceiling of the same run (scenario 1's, or measured here when scenario 1 did not
  run).
"#;

const S: &str = "12. ingest API";
const CONNS: u32 = 64;
const SECS: u32 = 20;

/// Sum and count of the service's admit and confirm step times.
fn steps(inst: &Instance) -> [(f64, f64); 2] {
    let text = inst.metrics_text();
    ["admit", "confirm"].map(|step| {
        let label = format!("step=\"{step}\"");
        (
            testkit::metric_value(&text, "gateway_ingest_step_seconds_sum", &label),
            testkit::metric_value(&text, "gateway_ingest_step_seconds_count", &label),
        )
    })
}

/// wrk's requests: alternating price and stock changes on random products,
/// each with a key of its own (thread, count and run make it unique) when
/// `keys`.
fn script(token: &str, products: i64, run: &str, keys: bool) -> String {
    let key = if keys {
        format!(r#"["Idempotency-Key"] = "bench-{run}-" .. tid .. "-" .. n,"#)
    } else {
        String::new()
    };
    format!(
        r#"local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  n = 0
  math.randomseed(tid * 7919 + os.time())
end
function request()
  n = n + 1
  local product = math.random(1, {products})
  local path, body
  if n % 2 == 0 then
    path = "/products/" .. product .. "/price"
    body = '{{"price_cents":' .. math.random(100, 99999) .. '}}'
  else
    path = "/products/" .. product .. "/stock"
    body = '{{"stock":' .. math.random(0, 1000) .. '}}'
  end
  return wrk.format("POST", path, {{
    ["Authorization"] = "Bearer {token}",
    ["Content-Type"] = "application/json",
    {key}
  }}, body)
end
"#
    )
}

pub async fn scenario(ctx: &mut Ctx, inst: &Instance) -> Result<()> {
    let ceiling = measured_ceiling(ctx).await?;
    for keys in [false, true] {
        run(ctx, inst, keys, ceiling).await?;
        drain_applied(inst, Duration::from_secs(120)).await?;
    }
    Ok(())
}

async fn run(ctx: &mut Ctx, inst: &Instance, keys: bool, ceiling: f64) -> Result<()> {
    ctx.quiet().await;
    let lua = std::env::temp_dir().join(format!("product-gateway-bench-ingest-{}.lua", ctx.iso.id));
    std::fs::write(
        &lua,
        script(ctx.settings.ingest.token.expose(), ctx.products, &ctx.iso.id, keys),
    )
    .with_context(|| format!("write {}", lua.display()))?;
    let what = if keys {
        "with an Idempotency-Key each"
    } else {
        "without keys"
    };
    let steps0 = steps(inst);
    let cpu0 = cpu_sample();
    let perf = ctx.perf(if keys { "ingest-keys" } else { "ingest" }, u64::from(SECS) - 4);
    let run = wrk(format!("http://{}", inst.addr()), CONNS, SECS, Some(&lua)).await;
    let cpu1 = cpu_sample();
    let steps1 = steps(inst);
    let _ = std::fs::remove_file(&lua);
    let w = run?;
    ctx.profile(
        &format!("{S}, {what}, wrk {CONNS} connections"),
        &cpu0,
        &cpu1,
        perf,
        false,
    )
    .await;
    let cpu = cpu1.pct_of(&cpu0, std::process::id());
    let all_accepted = w.problems.is_empty();
    // The target is the one with keys; without, the cost of keys shows.
    ctx.report.row(
        S,
        format!("POST a change {what}, wrk {CONNS} connections {SECS} s: accepted/s, p50 / p99"),
        format!(
            "{} req/s, {} / {} ({}; service {cpu:.0}% of a core{})",
            thousands(w.rps),
            ms(w.p50_ms),
            ms(w.p99_ms),
            w.requests,
            if all_accepted {
                String::new()
            } else {
                format!("; {}", w.problems.join("; "))
            }
        ),
        if keys { "≥ 10,000/s, p99 < 25 ms" } else { "" },
        keys.then_some(all_accepted && w.rps >= 10_000.0 && w.p99_ms < 25.0),
    );
    let mean = |i: usize| {
        let ((s1, c1), (s0, c0)) = (steps1[i], steps0[i]);
        if c1 > c0 {
            (s1 - s0) / (c1 - c0) * 1000.0
        } else {
            f64::NAN
        }
    };
    ctx.report.row(
        S,
        format!("where an accepted request's time went {what}: admit / publish → confirm, mean"),
        format!(
            "{} / {} (the service's `gateway_ingest_step_seconds`)",
            ms(mean(0)),
            ms(mean(1))
        ),
        "",
        None,
    );
    ctx.report.row(
        S,
        format!("ingest accepted/s {what} ÷ broker ceiling"),
        format!(
            "{:.2} ({} ÷ {} msg/s)",
            w.rps / ceiling,
            thousands(w.rps),
            thousands(ceiling)
        ),
        if keys { "≥ 0.5" } else { "" },
        keys.then_some(all_accepted && w.rps / ceiling >= 0.5),
    );
    Ok(())
}
