//! Scenario 3, connections: ten thousand idle WebSocket and SSE clients, their
//! connect rate and what each costs the service in memory.

use std::time::Duration;

use anyhow::{Result, bail};

use super::{Ctx, wait_clients_gone};
use crate::fleet::Child;
use crate::harness::{Instance, rss_kib};
use crate::report::thousands;

/// Opens `ws` WebSocket and `sse` SSE idle connections from a child
/// process; returns it (holding them) and the seconds it took.
async fn idle_fleet(inst: &Instance, ws: usize, sse: usize) -> Result<(Child, f64)> {
    let mut child = Child::spawn(&[
        "idle-clients".into(),
        "--addr".into(),
        inst.addr().to_string(),
        "--ws".into(),
        ws.to_string(),
        "--sse".into(),
        sse.to_string(),
    ])?;
    let ready = child.expect("READY", Duration::from_secs(240)).await?;
    let connected = ready["connected"].as_u64().unwrap_or(0) as usize;
    let failed = ready["failed"].as_u64().unwrap_or(0);
    if connected < ws + sse {
        bail!(
            "{failed} of {} idle connections failed (client open-files limit {}): {}",
            ws + sse,
            ready["nofile"],
            ready["first_error"]
        );
    }
    Ok((child, ready["secs"].as_f64().unwrap_or(f64::NAN)))
}

pub async fn connections(ctx: &mut Ctx, inst: &Instance, ws: usize, sse: usize) -> Result<()> {
    const S: &str = "3. connections";
    ctx.quiet().await;
    // WebSocket first, then SSE, so each transport's cost shows too.
    let before = rss_kib("self")?;
    let (ws_fleet, ws_secs) = idle_fleet(inst, ws, 0).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_ws = rss_kib("self")?;
    let (sse_fleet, sse_secs) = idle_fleet(inst, 0, sse).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib("self")?;
    let counted = inst.metric("gateway_clients_connected", "");
    ws_fleet.stop().await?;
    sse_fleet.stop().await?;
    wait_clients_gone(inst).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let released = rss_kib("self")?;
    let n = (ws + sse) as f64;
    let secs = ws_secs + sse_secs;
    let per_conn = (after.saturating_sub(before)) as f64 / n;
    let per_ws = with_ws.saturating_sub(before) as f64 / ws.max(1) as f64;
    let per_sse = after.saturating_sub(with_ws) as f64 / sse.max(1) as f64;
    ctx.report.row(
        S,
        format!(
            "{} idle connections ({ws} WebSocket, then {sse} SSE, each subscribed): connect rate",
            thousands(n)
        ),
        format!(
            "{} conn/s ({:.1} s for all; WebSocket {} conn/s, SSE {} conn/s)",
            thousands(n / secs),
            secs,
            thousands(ws as f64 / ws_secs),
            thousands(sse as f64 / sse_secs)
        ),
        "",
        None,
    );
    ctx.report.row(
        S,
        "service RSS per connection (VmRSS delta ÷ connections)",
        format!(
            "{per_conn:.1} KiB (WebSocket {per_ws:.1} KiB, SSE {per_sse:.1} KiB; {} → {} MiB, {counted} counted by the service)",
            before / 1024,
            after / 1024
        ),
        "≤ 8 KiB",
        Some(per_conn <= 8.0),
    );
    ctx.report.note(format!(
        "Connections: RSS {} MiB before, {} MiB with {ws} WebSocket, {} MiB with all {}, {} MiB after they closed \
         (freed memory stays with the allocator).",
        before / 1024,
        with_ws / 1024,
        after / 1024,
        thousands(n),
        released / 1024
    ));
    Ok(())
}

// --------------------------------------------------------- 1. pipeline
