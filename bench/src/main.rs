//! `make bench`: the load benchmark. Runs the service in this
//! process against the real PostgreSQL, RabbitMQ and Redis on loopback, in
//! a database, vhosts and Redis prefix of its own, runs each scenario, prints
//! one table and writes it to BENCHMARKS.md. Bounded: the whole run stops
//! itself before 30 minutes, and on any failure, with a message, after
//! removing what it created.
//!
//! `bench` runs everything; `bench fanout-clients …`, `bench idle-clients …`,
//! `bench storm-clients …`, `bench slow-healthy …`, `bench slow-stalled …`
//! and `bench publish …` are the client fleets and the event publisher it
//! starts as child processes.

mod fleet;
mod harness;
mod load;
mod report;
mod scenarios;
mod wire;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::fleet::Args;
use crate::harness::{Instance, Isolation, mgmt_json, raise_nofile, repo_root};
use crate::report::{Report, thousands};
use crate::scenarios::Ctx;

/// Scenarios, numbered from 1.
const SCENARIOS: u8 = 13;
/// Products in the catalog: above the consumer's batch size (see `load`).
const PRODUCTS: u32 = 1000;
const FANOUT_CLIENTS: usize = 1000;
const IDLE_WS: usize = 5000;
const IDLE_SSE: usize = 5000;
const MISSED: u64 = 10_000;
/// The scenarios stop at this age of the run, leaving time to clean up.
const BUDGET: Duration = Duration::from_secs(30 * 60);
const WEB_STOMP: &str = "127.0.0.1:15674";
/// The bench's log filter when `RUST_LOG` is unset: warnings only (at
/// `info` the service writes an access line for every request).
const BENCH_LOGS: &str = "warn,lapin=error";
/// Longest the whole run waits, before its measurements, for programs that
/// are not part of the bench (a compiler, a test run) to go quiet.
const QUIET_BUDGET: Duration = Duration::from_secs(90);
/// Until this age of the run, a measurement disturbed by other programs is
/// made again (once).
const RETRY_UNTIL: Duration = Duration::from_secs(9 * 60);
/// Open files RabbitMQ needs for 1,000 Web-STOMP clients with room to spare.
const RABBIT_FDS: u32 = 4096;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("fanout-clients") => child(fleet::fanout_clients(Args::new(args[1..].to_vec()))),
        Some("idle-clients") => child(fleet::idle_clients(Args::new(args[1..].to_vec()))),
        Some("publish") => child(fleet::publish_proc(Args::new(args[1..].to_vec()))),
        Some("otlp-sink") => child(scenarios::tracing::sink(Args::new(args[1..].to_vec()))),
        Some("selective-clients") => child(scenarios::selective::selective_clients(Args::new(args[1..].to_vec()))),
        Some("storm-clients") => child(scenarios::storm::storm_clients(Args::new(args[1..].to_vec()))),
        Some("catalog-whole") => child(scenarios::catalog::catalog_whole(Args::new(args[1..].to_vec()))),
        Some("slow-healthy") => child(scenarios::slow_clients::healthy(Args::new(args[1..].to_vec()))),
        Some("slow-stalled") => child(scenarios::slow_clients::stalled(Args::new(args[1..].to_vec()))),
        None | Some("run") => run_all(),
        Some("-h" | "--help" | "help") => {
            println!(
                "usage: bench            run every scenario, print the table, write BENCHMARKS.md\n       \
                 BENCH_ONLY=2,9 bench  run some scenarios, 1 to 13 (BENCHMARKS.md left alone)\n       \
                 (bench fanout-clients / idle-clients / selective-clients / storm-clients / catalog-whole / slow-healthy /\n       \
                 slow-stalled / publish / otlp-sink are child processes it starts)"
            );
            0
        }
        Some(other) => {
            eprintln!("bench: unknown command {other:?} (try --help)");
            2
        }
    };
    std::process::exit(code);
}

fn child(r: Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench client process: {e:#}");
            1
        }
    }
}

fn run_all() -> i32 {
    // Logs as the service's, and its trace exporter, off until scenario 13.
    if let Err(e) = scenarios::tracing::init(BENCH_LOGS) {
        eprintln!("bench: FAILED: logs and traces: {e:#}");
        return 1;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: FAILED: tokio runtime: {e}");
            return 1;
        }
    };
    let started = Instant::now();
    let code = rt.block_on(async {
        match bench(started).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("\nbench: FAILED after {:.0} s: {e:#}", started.elapsed().as_secs_f64());
                1
            }
        }
    });
    // Client threads that are still blocked go with the process.
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

struct RunInfo {
    nofile: u64,
    rabbit: HashMap<String, String>,
    perf: bool,
    versions: Vec<(String, String)>,
    command: String,
    /// The commit measured (`git describe --always --dirty`).
    commit: String,
}

async fn bench(started: Instant) -> Result<()> {
    let root = repo_root();
    let only = selected()?;
    let partial = only.len() < SCENARIOS as usize;
    let nofile = raise_nofile()?;
    ensure_tools(&root).await?;
    let rabbit = rabbit_script(&root, &["prepare", &RABBIT_FDS.to_string()]).await?;
    let perf = harness::perf_works();
    let mut iso = Isolation::new();
    let versions = versions(&iso).await;
    let info = RunInfo {
        nofile,
        rabbit,
        perf,
        versions,
        commit: commit(&root),
        command: std::env::var("BENCH_COMMAND").unwrap_or_else(|_| {
            std::iter::once("target/release/bench".to_owned())
                .chain(std::env::args().skip(1))
                .collect::<Vec<_>>()
                .join(" ")
        }),
    };
    eprintln!("bench: run {} (database {}, vhost {})", iso.id, iso.db_name, iso.vhost);
    let created = iso.create().await;
    let settings = harness::settings(&iso, PRODUCTS)?;
    let stomp_clients = stomp_capacity().await;
    let mut ctx = Ctx {
        iso,
        settings,
        seq: Arc::new(AtomicU64::new(0)),
        products: i64::from(PRODUCTS),
        perf,
        report: Report::default(),
        stomp_clients,
        live: None,
        quiet_budget: QUIET_BUDGET,
        retry_until: started + RETRY_UNTIL,
        ceiling: None,
    };
    let outcome = match created {
        Err(e) => Err(e),
        Ok(()) => {
            let budget = BUDGET.saturating_sub(started.elapsed());
            match tokio::time::timeout(budget, scenarios(&mut ctx, &only)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!(
                    "the run reached its time budget ({} s) and was stopped",
                    BUDGET.as_secs()
                )),
            }
        }
    };
    if outcome.is_err()
        && let Some(token) = ctx.live.take()
    {
        token.cancel();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!("bench: removing the run's database, vhosts and Redis keys");
    let errors = ctx.iso.cleanup().await;
    let restored = rabbit_script(&root, &["restore"]).await;
    for e in &errors {
        eprintln!("bench: cleanup: {e}");
    }
    if let Err(e) = restored {
        eprintln!("bench: restoring RabbitMQ's plugins: {e:#}");
    }
    outcome?;

    let total = started.elapsed();
    let md = render(&ctx, &info, total);
    println!("\n{}", ctx.report.table());
    if partial {
        let path = std::env::temp_dir().join("product-gateway-bench-partial.md");
        std::fs::write(&path, &md).with_context(|| format!("write {}", path.display()))?;
        println!(
            "bench: partial run (BENCH_ONLY) done in {}; BENCHMARKS.md left as it was, this run's report is in {}",
            human(total),
            path.display()
        );
    } else {
        let path = root.join("BENCHMARKS.md");
        let old = std::fs::read_to_string(&path).ok();
        let history = report::history(&md, old.as_deref());
        let md = with_history(md, &history);
        report::write_benchmarks_md(&path, &md).with_context(|| format!("write {}", path.display()))?;
        let json_path = root.join("BENCHMARKS.json");
        let figures = report::figures_json(&ctx.report, &facts(&md, &info, total));
        std::fs::write(&json_path, format!("{}\n", serde_json::to_string_pretty(&figures)?))
            .with_context(|| format!("write {}", json_path.display()))?;
        println!(
            "bench: done in {}; written to {} and {}",
            human(total),
            path.display(),
            json_path.display()
        );
    }
    Ok(())
}

/// Scenarios to run: all, or those listed in BENCH_ONLY (e.g. `2,5`), for
/// checking one figure while working on it; a partial run does not write
/// BENCHMARKS.md.
fn selected() -> Result<Vec<u8>> {
    match std::env::var("BENCH_ONLY") {
        Err(_) => Ok((1..=SCENARIOS).collect()),
        Ok(list) => list
            .split(',')
            .map(|n| match n.trim().parse::<u8>() {
                Ok(n @ 1..=SCENARIOS) => Ok(n),
                _ => Err(anyhow!(
                    "BENCH_ONLY takes scenario numbers 1 to {SCENARIOS}, like 2,5 (got {list:?})"
                )),
            })
            .collect(),
    }
}

async fn scenarios(ctx: &mut Ctx, only: &[u8]) -> Result<()> {
    eprintln!("bench: starting the service (seeding {PRODUCTS} products)");
    let inst = Instance::start(ctx.settings.clone(), true).await?;
    ctx.live = Some(inst.shutdown_token());

    // First, while the process has freed little memory that new
    // connections could reuse unseen.
    if only.contains(&3) {
        eprintln!("bench: 3. connections: {IDLE_WS} WebSocket + {IDLE_SSE} SSE");
        scenarios::connections(ctx, &inst, IDLE_WS, IDLE_SSE).await?;
    }

    if only.contains(&1) {
        eprintln!("bench: 1. pipeline: broker ceiling, saturation, 30 s held run");
        scenarios::pipeline(ctx, &inst).await?;
    }

    if only.contains(&2) {
        use scenarios::FANOUT_RATE as R;
        eprintln!("bench: 2. fan-out: {FANOUT_CLIENTS} clients each over WebSocket, SSE and Web-STOMP");
        let ws = scenarios::fanout(ctx, &inst, "ws", "gateway WebSocket", inst.addr(), FANOUT_CLIENTS, R).await?;
        let sse = scenarios::fanout(ctx, &inst, "sse", "gateway SSE", inst.addr(), FANOUT_CLIENTS, R).await?;
        let stomp_n = ctx.stomp_clients.min(FANOUT_CLIENTS);
        let stomp_addr: SocketAddr = WEB_STOMP.parse()?;
        if tokio::net::TcpStream::connect(stomp_addr).await.is_err() {
            bail!("RabbitMQ Web-STOMP does not answer on {WEB_STOMP} (rabbitmq_web_stomp not enabled?)");
        }
        let stomp = scenarios::fanout(ctx, &inst, "stomp", "RabbitMQ Web-STOMP", stomp_addr, stomp_n, R).await?;
        let (ws_eq, sse_eq) = if stomp_n < FANOUT_CLIENTS {
            ctx.report.note(format!(
                "RabbitMQ's open-files limit allows {stomp_n} Web-STOMP clients only: the comparison runs the \
                 gateway at {stomp_n} clients too."
            ));
            let a = scenarios::fanout(ctx, &inst, "ws", "gateway WebSocket", inst.addr(), stomp_n, R).await?;
            let b = scenarios::fanout(ctx, &inst, "sse", "gateway SSE", inst.addr(), stomp_n, R).await?;
            (a, b)
        } else {
            (ws, sse)
        };
        for (label, g) in [("WebSocket", &ws_eq), ("SSE", &sse_eq)] {
            let ratio = g.per_sec / stomp.per_sec;
            ctx.report.row(
                "2. fan-out",
                format!(
                    "gateway {label} ÷ Web-STOMP delivered msg/s ({stomp_n} clients each, same {R} events/s; \
                     measures the offered load when the gateway delivers it all)"
                ),
                format!("{ratio:.2}×"),
                "",
                None,
            );
        }
        // Each side's most: the offered rate doubles until it saturates.
        let (ws_max, ws_at) = scenarios::fanout_max(
            ctx,
            &inst,
            "ws",
            "gateway WebSocket",
            inst.addr(),
            stomp_n,
            &ws_eq,
            3200.0,
        )
        .await?;
        let (stomp_max, stomp_at) = scenarios::fanout_max(
            ctx,
            &inst,
            "stomp",
            "RabbitMQ Web-STOMP",
            stomp_addr,
            stomp_n,
            &stomp,
            3200.0,
        )
        .await?;
        let ratio = ws_max / stomp_max;
        ctx.report.row(
            "2. fan-out",
            format!(
                "most delivered msg/s, offered rate doubled from {R} events/s until each side saturates \
                 ({stomp_n} clients): gateway WebSocket ÷ Web-STOMP"
            ),
            format!(
                "{ratio:.2}× ({} at {ws_at} events/s ÷ {} at {stomp_at} events/s)",
                thousands(ws_max),
                thousands(stomp_max)
            ),
            "≥ 5×",
            Some(ratio >= 5.0),
        );
    }

    if only.contains(&10) {
        eprintln!("bench: 10. latency floor: 100 clients at 100 events/s, WebSocket then SSE, hop by hop");
        scenarios::floor::scenario(ctx, &inst).await?;
    }

    if only.contains(&11) {
        eprintln!("bench: 11. generator: asked 2,000 and 10,000 events/s, 30 s each");
        scenarios::generator::scenario(ctx, &inst).await?;
    }

    if only.contains(&12) {
        eprintln!("bench: 12. ingest API: wrk, 64 connections, a key per request");
        scenarios::ingest::scenario(ctx, &inst).await?;
    }

    let inst = if only.contains(&4) {
        eprintln!("bench: 4. resume after {MISSED} missed updates, from memory and after a restart");
        let inst = scenarios::resume_scenario(ctx, inst, MISSED).await?;
        ctx.live = Some(inst.shutdown_token());
        inst
    } else {
        inst
    };

    if only.contains(&5) {
        eprintln!("bench: 5. photos: gateway and nginx under wrk");
        scenarios::photos(ctx, &inst).await?;
    }

    if only.contains(&6) {
        eprintln!("bench: 6. selective fan-out: 1k, 5k, 19k clients on one product each");
        scenarios::selective::selective(ctx, &inst).await?;
    }

    if only.contains(&13) {
        eprintln!("bench: 13. tracing cost: 19k WebSocket clients, 1,000 events/s, traces off, at 1 %, at 100 %");
        scenarios::tracing::scenario(ctx, &inst).await?;
    }

    let inst = if only.contains(&7) {
        eprintln!("bench: 7. resume storm: 10,000 SSE clients resume at once after a restart");
        let inst = scenarios::storm::scenario(ctx, inst).await?;
        ctx.live = Some(inst.shutdown_token());
        inst
    } else {
        inst
    };

    inst.stop().await.context("stop the service")?;
    ctx.live = None;

    if only.contains(&8) {
        eprintln!("bench: 8. a catalog of 1,000,000 products: seed, snapshots, apply lag under snapshots");
        scenarios::catalog::scenario(ctx).await?;
    }

    if only.contains(&9) {
        eprintln!("bench: 9. slow consumers: 10,000 healthy clients beside 1,036 stalled connections, A/B");
        scenarios::slow::scenario(ctx).await?;
    }
    Ok(())
}

/// Installs wrk and nginx when missing (scripts/bench-tools.sh).
async fn ensure_tools(root: &Path) -> Result<()> {
    let have = |p: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {p} >/dev/null || test -x /usr/sbin/{p}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("wrk") && have("nginx") {
        return Ok(());
    }
    let status = tokio::process::Command::new(root.join("scripts/bench-tools.sh"))
        .status()
        .await
        .context("run scripts/bench-tools.sh")?;
    if !status.success() {
        bail!("wrk and nginx are needed (scripts/bench-tools.sh failed: {status})");
    }
    Ok(())
}

async fn rabbit_script(root: &Path, args: &[&str]) -> Result<HashMap<String, String>> {
    let out = tokio::process::Command::new(root.join("scripts/bench-rabbit.sh"))
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .context("run scripts/bench-rabbit.sh")?;
    if !out.status.success() {
        bail!("scripts/bench-rabbit.sh {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// Web-STOMP clients RabbitMQ can take now: its socket allowance (from its
/// open-files limit) less what is in use, with a margin.
async fn stomp_capacity() -> usize {
    let Ok(nodes) = mgmt_json("/api/nodes").await else {
        return FANOUT_CLIENTS;
    };
    let node = &nodes[0];
    match (node["sockets_total"].as_u64(), node["sockets_used"].as_u64()) {
        (Some(total), Some(used)) => total.saturating_sub(used + 50) as usize,
        _ => match node["fd_total"].as_u64() {
            Some(fd) => (fd.saturating_sub(200) as f64 * 0.9) as usize,
            None => FANOUT_CLIENTS,
        },
    }
}

async fn versions(iso: &Isolation) -> Vec<(String, String)> {
    let mut v = Vec::new();
    match mgmt_json("/api/overview").await {
        Ok(o) => v.push((
            "RabbitMQ".to_owned(),
            format!(
                "{} (Erlang {})",
                o["rabbitmq_version"].as_str().unwrap_or("?"),
                o["erlang_version"].as_str().unwrap_or("?")
            ),
        )),
        Err(e) => v.push(("RabbitMQ".to_owned(), format!("? ({e})"))),
    }
    v.push((
        "PostgreSQL".to_owned(),
        harness::postgres_version(&iso.pg_server)
            .await
            .unwrap_or_else(|e| format!("? ({e})")),
    ));
    v.push((
        "Redis".to_owned(),
        harness::redis_version(&iso.redis_url)
            .await
            .unwrap_or_else(|e| format!("? ({e})")),
    ));
    let nginx = harness::command_version("nginx", &["-v"]);
    v.push((
        "nginx".to_owned(),
        nginx.rsplit('/').next().unwrap_or(&nginx).to_owned(),
    ));
    let wrk = harness::command_version("wrk", &["-v"]);
    v.push((
        "wrk".to_owned(),
        wrk.split_whitespace().nth(1).unwrap_or(&wrk).to_owned(),
    ));
    v
}

/// The history table goes under the latest run's figures and details.
fn with_history(md: String, history: &str) -> String {
    const AT: &str = "### Where time goes";
    let section = format!(
        "## History\n\nEach full run of `make bench`, newest first (its figures: `BENCHMARKS.json` at that commit).\n\n{history}\n\n"
    );
    match md.find(AT) {
        Some(i) => format!("{}{section}{}", &md[..i], &md[i..]),
        None => format!("{md}\n{section}"),
    }
}

/// The run's facts for `BENCHMARKS.json`: the Markdown's header lines.
fn facts(md: &str, info: &RunInfo, total: Duration) -> Vec<(&'static str, String)> {
    let header = |name: &str| {
        md.lines()
            .find_map(|l| l.strip_prefix(&format!("- **{name}**: ")))
            .unwrap_or_default()
            .to_owned()
    };
    vec![
        ("date", header("Date")),
        ("commit", info.commit.clone()),
        ("command", info.command.clone()),
        ("duration_s", total.as_secs().to_string()),
        ("machine", header("Machine")),
        ("open_files", header("Open-files limits")),
        ("software", header("Software")),
        ("service_settings", header("Service settings")),
    ]
}

fn commit(root: &std::path::Path) -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    format!("{} min {:02} s", s / 60, s % 60)
}

fn os_name() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "Linux".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{pretty}, kernel {}", kernel.trim())
}

fn render(ctx: &Ctx, info: &RunInfo, total: Duration) -> String {
    let mut md = String::new();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let r = &info.rabbit;
    let get = |k: &str| r.get(k).map(String::as_str).unwrap_or("?");
    let rabbit_limit = match (get("restarted"), get("skipped_restart")) {
        ("yes", _) => format!(
            "{} (it was {}: the bench restarted the idle broker with the limit raised, see scripts/bench-rabbit.sh)",
            get("limit"),
            get("limit_before")
        ),
        (_, "") => format!("{} (enough; not restarted)", get("limit")),
        (_, why) => format!("{} (too low, not raised: {why})", get("limit")),
    };
    let _ = writeln!(md, "## Latest run\n");
    let _ = writeln!(md, "- **Date**: {}", chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"));
    let _ = writeln!(md, "- **Commit**: {}", info.commit);
    let _ = writeln!(md, "- **Command**: `{}` — whole run {}", info.command, human(total));
    let _ = writeln!(
        md,
        "- **Machine**: {cores} cores ({}), {:.1} GiB memory, {}",
        harness::cpu_model(),
        harness::mem_total_gib(),
        os_name()
    );
    let _ = writeln!(
        md,
        "- **Open-files limits**: bench process (the service runs in it) and its client processes {}; RabbitMQ {}",
        info.nofile, rabbit_limit
    );
    let versions: Vec<String> = info.versions.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(md, "- **Software**: {}", versions.join("; "));
    let _ = writeln!(
        md,
        "- **Service settings**: `config/default.toml` as committed, except the generator (off: the bench \
         publishes) and the per-address caps `hub.max_connections_per_ip`, `max_snapshots_per_ip` and \
         `max_catch_ups_per_ip` (raised to the instance's own limits: every bench client comes from \
         127.0.0.1; scenario 9 keeps the shipped snapshot and catch-up caps); {} products; logs `{}` \
         (the service's own default is `{}`, under which every connection also keeps its log span)",
        thousands(ctx.products as f64),
        std::env::var("RUST_LOG").unwrap_or_else(|_| BENCH_LOGS.to_owned()),
        product_gateway::telemetry::DEFAULT_LOGS,
    );
    let _ = writeln!(md, "\n{}", ctx.report.table());
    if !ctx.report.notes.is_empty() {
        let _ = writeln!(md, "Details of this run:\n");
        for n in &ctx.report.notes {
            let _ = writeln!(md, "- {n}");
        }
        md.push('\n');
    }
    let missed = ctx.report.missed();
    let _ = writeln!(md, "### Where time goes (measured in this run)\n");
    if missed.is_empty() {
        let _ = writeln!(md, "Every target was met.\n");
    } else {
        let _ = writeln!(md, "Targets missed in this run:\n");
        for m in &missed {
            let _ = writeln!(md, "- {} — {}: {} (target {})", m.scenario, m.figure, m.value, m.target);
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "CPU per program during each measured window (from /proc/PID/stat; % of one core, the machine has {}%){}:\n",
        cores * 100,
        if info.perf {
            "; the hottest symbols machine-wide from `perf record -a -F 199` are in `BENCHMARKS.json` \
             (`profiles[].perf`)"
        } else {
            " (perf did not work here: no symbol profile)"
        }
    );
    for p in &ctx.report.profiles {
        let _ = writeln!(md, "- **{}**: {}", p.title, p.cpu);
    }
    md.push('\n');
    md.push_str(METHOD);
    md.push_str(scenarios::selective::METHOD);
    md.push_str(scenarios::storm::METHOD);
    md.push_str(scenarios::catalog::METHOD);
    md.push_str(scenarios::slow::METHOD);
    md.push_str(scenarios::floor::METHOD);
    md.push_str(scenarios::generator::METHOD);
    md.push_str(scenarios::ingest::METHOD);
    md.push_str(scenarios::tracing::METHOD);
    md
}

const METHOD: &str = r#"### How each figure is measured

- **Isolation.** The run makes its own PostgreSQL database (`gw_bench_<id>`), RabbitMQ vhosts
  (`gw-bench-<id>` for the service, `gw-bench-<id>-ceiling` for the broker-only ceiling) and Redis
  key prefix, and removes them at the end, failure or not. The service runs inside the bench process
  (`Application::build`, settings from `config/default.toml`, the built-in generator off), alone but
  for the single tracking client of scenarios 1 and 4 (a thread of its own) and the ceiling's consumer;
  the event publisher (`bench publish`) and the 1,000- and 10,000-client fleets (`bench fanout-clients`,
  `bench idle-clients`) are child processes, with hand-written WebSocket / SSE / STOMP clients on plain
  tokio sockets, so their CPU and memory are not counted as the service's.
- **Events.** The bench publishes to `product.events` exactly what the generator would (same
  `encode_event` body, same properties), persistent, mandatory, with pipelined publisher confirms
  (at most 2,048 unconfirmed); every publish must be acked. Versions come from one counter, so each
  event has a unique version and each delivered update names one event. Event *s* changes the price
  (even *s*) or stock (odd *s*) of product `(s/2) mod 1000 + 1`: any 1,000 consecutive events of one
  kind touch 1,000 different products, more than the consumer's batch (200), so apply never merges two
  of them within a batch (it keeps only the newest version per product and kind), and every event must
  come out as its own update. Loss is then counted exactly: the client marks each version it receives
  in a bitmap; *delivered* is the number of the run's versions marked; *applied* is checked by
  reading every product back from PostgreSQL (each must hold the last version published for it) and by
  `gateway_events_applied` / `gateway_events_duplicate`.
- **1. Pipeline.** *Broker ceiling*: in the scratch vhost, the same topology (topic exchange, the two
  quorum apply queues with their arguments), the same messages and publisher, consumed the way the
  gateway's consumer does (prefetch 500, batches of up to 200 or 20 ms, one multiple-ack each) but
  without a database: messages consumed per second over 7 s, with at most 4,000 messages in flight
  (closed loop, so the queues do not grow). *Saturation*: the same closed loop through the whole
  pipeline to one WebSocket client subscribed to `product.#`. *Held rate*: an open-loop run of 30 s at
  90% of saturation (rounded down to 100/s); it holds when the publisher kept the rate (≥ 98% of it
  published over the 30 s, and the last confirms within 1 s after; it keeps at most 2,048 publishes
  unconfirmed, so falling short means the system held it back), every confirmed
  event was delivered and applied, the client was never more than one second of events behind after
  the first 5 s nor at the end, and all was delivered within 5 s after. The closed loop's rate is
  bounded by its window over the latency, so an open loop may hold more: while runs hold, the next asks
  10% of saturation more (up to 150%); if the first does not hold, the next asks 10% less (down to 50%)
  until one holds; then one more asks halfway between the highest that held and the lowest that did
  not. The figure is the rate published in the best run that held.
- **2. Fan-out.** 1,000 clients subscribed to `product.#`; the bench publishes 100 events/s (the
  built-in generator's rate counts changes of one or two events, so it cannot give exactly 100 events/s).
  Clients count what they receive during a 15 s window after 3 s of warm-up; latency is the client's
  wall clock at receipt minus the event's `ts_us` (its publish time, same host clock). The delivery
  target counts as met when at least 99% of every event to every client arrived in the window (the
  window's edges move a few events). *Web-STOMP*: the same number of clients connect to RabbitMQ's
  Web-STOMP plugin (port 15674, the bench's vhost) and subscribe to
  `/exchange/bench.stomp.updates/product.#`; during that run the publisher also sends each event, as
  the very update JSON the gateway's clients get, to that topic exchange with the event's routing key
  (`product.<kind>.<id>`), the way RabbitMQ alone would serve browsers: one message per update, routed
  by topic. (The gateway's own `product.updates` now carries one message per committed batch, which a
  STOMP client could not filter by topic.) Their path is shorter than the gateway's (no apply, no
  database, no stream, no hub); latency is measured the same way, and every update inside a message
  is counted.
- **3. Connections.** The child process opens 5,000 WebSocket connections (each subscribed to one
  product's price) and 5,000 SSE streams (one product's stock), 200 connection attempts at a time;
  connect rate = connections ÷ time until all were subscribed. Memory is the bench process's `VmRSS`
  (the service is alone in it: the clients are in the child) after all connected minus before, divided
  by the connections. Kernel socket buffers are not in RSS. This scenario runs first, before other
  scenarios free memory that new connections could reuse without growing the RSS.
- **4. Resume.** A WebSocket client subscribed to `product.#` sees one update and leaves; 10,000
  events follow. A client then reconnects with `since` = its offset (WebSocket `since`, SSE
  `?since=`) and the time from opening the connection to receiving the update at the newest offset is
  measured; *caught up* also requires that it then holds the newest version of every product and kind
  (the hub's per-client buffer conflates to the newest update per product and kind, so fewer than
  10,000 frames may arrive). Then the instance is stopped and a new one started on the same database
  and vhost: its memory is empty, so the same resume is served from the RabbitMQ stream.
- **5. Photos.** `GET /products/1/photo` once to fill Redis, once more to check it is a cache hit,
  then `wrk -t2 -c64 -d15s --latency`; nginx (started by the bench on a free loopback port with a
  temporary config: `sendfile`, `open_file_cache`, 2 workers, unlimited keep-alive requests) serves
  the same bytes as a static file to the same wrk command right after.
- **CPU shares and profiles** are sampled inside the measured windows; the profiler samples at 199 Hz,
  a negligible load. Before each measurement the bench waits (at most 2 minutes in the whole run) until
  programs that are not part of it (a compiler, another test run) use under 15% of a core; a window
  where they still took 20% or more is flagged under the table. PostgreSQL and RabbitMQ are shared with
  whatever else uses them on this machine, which the bench cannot see.
"#;
