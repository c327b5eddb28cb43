//! Scenario 4, resume: clients that left come back after a restart of the service
//! and get every update they missed, from memory or from the stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::{CLOSED_WINDOW, Ctx, tracking_client, wait_clients_gone};
use crate::harness::Instance;
use crate::load::{Pace, key_of, version_of};
use crate::report::{ms, thousands};
use crate::wire::{self, Sse, UpdateInfo, Ws};

struct Caught {
    elapsed: Duration,
    updates: u64,
    newest: HashMap<(i64, bool), i64>,
}

/// Reconnects with `since` and reads until the update at offset `last`.
async fn resume(addr: SocketAddr, sse: bool, since: u64, last: u64) -> Result<Caught> {
    let start = Instant::now();
    let mut c = Caught {
        elapsed: Duration::ZERO,
        updates: 0,
        newest: HashMap::new(),
    };
    let mut see = |offset: u64, u: UpdateInfo| {
        c.updates += 1;
        let v = c.newest.entry((u.product_id, u.price)).or_insert(u.version);
        *v = (*v).max(u.version);
        offset >= last
    };
    let run = async {
        if sse {
            let mut s = Sse::connect(addr, &format!("/events?topics=product.%23&since={since}")).await?;
            loop {
                while let Some(len) = s.event_len() {
                    let ev = &s.body[..len];
                    if let (Some(off), Some(u)) = (wire::num_after(ev, b"id:"), UpdateInfo::parse(ev))
                        && see(off as u64, u)
                    {
                        return Ok(());
                    }
                    s.consume_event(len);
                }
                if !s.fill().await? {
                    bail!("the event stream ended before catching up");
                }
            }
        } else {
            let mut ws = Ws::connect(addr, "/ws", None).await?;
            let sub = serde_json::json!({"op": "subscribe", "topics": ["product.#"], "since": since});
            ws.send_text(sub.to_string().as_bytes()).await?;
            loop {
                while let Some(f) = ws.frame() {
                    if f.op == wire::OP_PING {
                        ws.pong(&f).await?;
                        continue;
                    }
                    if f.op == wire::OP_CLOSE {
                        bail!("closed before catching up");
                    }
                    let p = ws.payload(&f);
                    if p.starts_with(b"{\"type\":\"update\"")
                        && let (Some(off), Some(u)) = (wire::num_after(p, b"\"offset\":"), UpdateInfo::parse(p))
                        && see(off as u64, u)
                    {
                        return Ok(());
                    }
                    ws.consume(&f);
                }
                if ws.fill().await? == 0 {
                    bail!("closed before catching up");
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .map_err(|_| anyhow!("not caught up within 60 s"))??;
    c.elapsed = start.elapsed();
    Ok(c)
}

/// Returns the instance to go on with (a restarted one).
pub async fn resume_scenario(ctx: &mut Ctx, inst: Instance, missed: u64) -> Result<Instance> {
    const S: &str = "4. resume";
    // The offset a client had when it left: it saw one update, then went.
    let (tracker, tstop, tracking) = tracking_client(inst.addr(), ctx.seq.load(Ordering::SeqCst)).await?;
    let first = ctx
        .publish(Pace::Rate(1000.0), None, Some(1), None)
        .await?
        .wait()
        .await?;
    tracker
        .wait_all(first.first_seq, first.end_seq, Duration::from_secs(30))
        .await
        .ok_or_else(|| anyhow!("the first update did not arrive within 30 s"))?;
    let since = tracker.last_offset.load(Ordering::SeqCst);
    // Then `missed` updates it did not see.
    let run = ctx
        .publish(
            Pace::Closed {
                window: CLOSED_WINDOW,
                seen: tracker.distinct.clone(),
            },
            None,
            Some(missed),
            None,
        )
        .await?
        .wait()
        .await?;
    tracker
        .wait_all(run.first_seq, run.end_seq, Duration::from_secs(60))
        .await
        .ok_or_else(|| anyhow!("the {missed} updates did not all arrive within 60 s"))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let last = tracker.last_offset.load(Ordering::SeqCst);
    tstop.cancel();
    tracking.await?;
    let mut want: HashMap<(i64, bool), i64> = HashMap::new();
    for s in run.first_seq..run.end_seq {
        want.insert(key_of(s, ctx.products), version_of(s));
    }
    ctx.report.note(format!(
        "Resume: the client left at offset {since}; {missed} updates followed (offsets up to {last}, {} products × 2 kinds).",
        ctx.products
    ));

    let record = |ctx: &mut Ctx, what: &str, r: Result<Caught>| match r {
        Ok(c) => {
            let converged = want.iter().all(|(k, v)| c.newest.get(k).is_some_and(|g| g >= v));
            ctx.report.row(
                S,
                format!("{what}: time to caught up"),
                format!(
                    "{} ({} updates received, state {})",
                    ms(c.elapsed.as_secs_f64() * 1000.0),
                    thousands(c.updates as f64),
                    if converged { "converged" } else { "NOT converged" }
                ),
                "< 1 s",
                Some(converged && c.elapsed < Duration::from_secs(1)),
            );
        }
        Err(e) => ctx.report.row(
            S,
            format!("{what}: time to caught up"),
            format!("failed: {e:#}"),
            "< 1 s",
            Some(false),
        ),
    };
    ctx.quiet().await;
    let m0 = inst.metric("gateway_resumes", "memory");
    let r = resume(inst.addr(), false, since, last).await;
    record(ctx, &format!("WS, missed {missed}, from hub memory"), r);
    let r = resume(inst.addr(), true, since, last).await;
    record(ctx, &format!("SSE, missed {missed}, from hub memory"), r);
    let from_memory = inst.metric("gateway_resumes", "memory") - m0;
    wait_clients_gone(&inst).await?;

    // A restarted instance without a warm start has no history: the same
    // offsets come from the stream (the resume storm scenario measures the
    // warm start).
    inst.stop().await.context("stop the first instance")?;
    let mut cold = ctx.settings.clone();
    cold.hub.warm_start = false;
    let inst = Instance::start(cold, false).await.context("restart the service")?;
    let s0 = inst.metric("gateway_resumes", "stream");
    let r = resume(inst.addr(), false, since, last).await;
    record(
        ctx,
        &format!("WS, missed {missed}, from the stream (restarted instance)"),
        r,
    );
    let r = resume(inst.addr(), true, since, last).await;
    record(
        ctx,
        &format!("SSE, missed {missed}, from the stream (restarted instance)"),
        r,
    );
    let from_stream = inst.metric("gateway_resumes", "stream") - s0;
    ctx.report.note(format!(
        "Resume sources counted by the service: {from_memory} from memory (first instance), {from_stream} from the stream (restarted instance)."
    ));
    wait_clients_gone(&inst).await?;
    Ok(inst)
}

// ----------------------------------------------------------- 5. photos
