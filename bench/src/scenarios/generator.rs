//! Scenario 11, the built-in generator: asked for 2,000, then 10,000
//! events/s, how many it publishes (confirmed by the broker) over 30 s,
//! and what it reports holding.

use std::time::Duration;

use anyhow::{Result, bail};
use product_gateway::ingest::Control;

use super::Ctx;
use crate::harness::{Instance, cpu_sample};
use crate::report::thousands;

pub const METHOD: &str = r#"- **11. Generator.** The service's own generator (on the instance's 1,000 products, no clients),
  asked for 2,000 and then 10,000 events/s through its admin handle; after 5 s to reach the rate, a
  30 s window: *published* is `gateway_events_published_total` (events the broker confirmed) over the
  window ÷ its length, beside the rate asked and the `achieved_rate` the admin API reports at its end.
  The apply pipeline consumes them meanwhile, in the same process.
"#;

const S: &str = "11. generator";
const RAMP: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_secs(30);

pub async fn scenario(ctx: &mut Ctx, inst: &Instance) -> Result<()> {
    let generator = &inst.state.generator;
    for asked in [2_000.0, 10_000.0] {
        ctx.quiet().await;
        generator.set(Control {
            running: true,
            rate: asked,
        });
        // The generator runs only where it holds the leader lock.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !generator.is_leader() {
            if tokio::time::Instant::now() > deadline {
                bail!("the generator did not take the leader lock within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(RAMP).await;
        let published = || inst.metric("gateway_events_published", "");
        let (before, cpu0) = (published(), cpu_sample());
        tokio::time::sleep(WINDOW).await;
        let (after, cpu1) = (published(), cpu_sample());
        let achieved = generator.achieved();
        generator.set(Control {
            running: false,
            rate: asked,
        });
        let rate = (after - before) / WINDOW.as_secs_f64();
        let share = rate / asked;
        let cpu = cpu1.pct_of(&cpu0, std::process::id());
        ctx.report.row(
            S,
            format!("asked {} events/s: published (confirmed) over {} s", thousands(asked), WINDOW.as_secs()),
            format!(
                "{} events/s ({:.1}% of asked; admin API's achieved_rate {}; service with its apply at {cpu:.0}% of a core)",
                thousands(rate),
                share * 100.0,
                thousands(achieved)
            ),
            "≥ 98% of asked",
            Some(share >= 0.98),
        );
        // Let the pipeline apply what was published before the next step.
        super::drain_applied(inst, Duration::from_secs(60)).await?;
    }
    Ok(())
}
