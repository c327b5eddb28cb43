//! Scenario 5, photos: the photo endpoint (Redis cache-aside) beside nginx serving
//! the same files, under wrk.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::{Ctx, INTERFERENCE};
use crate::harness::{Instance, cpu_sample, http};
use crate::report::{ms, thousands};

/// What one wrk run printed.
pub struct Wrk {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: String,
    /// Non-2xx answers and socket errors, as wrk words them.
    pub problems: Vec<String>,
}

/// Runs wrk (2 threads) on `url`; with `script`, its requests come from
/// that Lua file.
pub async fn wrk(url: String, conns: u32, secs: u32, script: Option<&std::path::Path>) -> Result<Wrk> {
    let mut args = vec![
        "-t2".to_owned(),
        format!("-c{conns}"),
        format!("-d{secs}s"),
        "--latency".to_owned(),
    ];
    if let Some(script) = script {
        args.extend(["-s".to_owned(), script.display().to_string()]);
    }
    args.push(url);
    let out = tokio::process::Command::new("wrk")
        .args(&args)
        .kill_on_drop(true)
        .output()
        .await
        .context("run wrk (scripts/bench-tools.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no Requests/sec in wrk's output: {text}"))?;
    let percentile = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .map(|v| duration_ms(v.trim()))
            .unwrap_or(f64::NAN)
    };
    let (p50, p99) = (percentile("50%"), percentile("99%"));
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .unwrap_or("")
        .trim()
        .to_owned();
    let problems = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(|l| l.trim().to_owned())
        .collect();
    Ok(Wrk {
        rps,
        p50_ms: p50,
        p99_ms: p99,
        requests,
        problems,
    })
}

fn duration_ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.trim().parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

pub async fn photos(ctx: &mut Ctx, inst: &Instance) -> Result<()> {
    const S: &str = "5. photos";
    const CONNS: u32 = 64;
    const SECS: u32 = 15;
    let path = "/products/1/photo";
    let first = http(&inst.host(), "GET", path, &[], None).await?;
    if first.status != 200 || first.body.is_empty() {
        bail!("GET {path}: {} ({} bytes)", first.status, first.body.len());
    }
    let hits0 = inst.metric("gateway_photo_cache_hits", "");
    let again = http(&inst.host(), "GET", path, &[], None).await?;
    if again.body != first.body || inst.metric("gateway_photo_cache_hits", "") <= hits0 {
        bail!("the second GET {path} was not served from the Redis cache");
    }
    let bytes = first.body;

    // nginx serving the same bytes as a static file.
    let dir = std::env::temp_dir().join(format!("product-gateway-bench-nginx-{}", ctx.iso.id));
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::write(www.join("photo.png"), &bytes)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n  keepalive_requests 1000000;\n  \
         keepalive_timeout 75s;\n  open_file_cache max=64 inactive=60s;\n  etag on;\n  \
         client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  \
         types {{ image/png png; }}\n  default_type application/octet-stream;\n  \
         server {{\n    listen 127.0.0.1:{port};\n    root {d}/www;\n    location / {{ }}\n  }}\n}}\n",
        workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let nginx_bin = if std::path::Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    };
    let mut nginx = tokio::process::Command::new(nginx_bin)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("start nginx (scripts/bench-tools.sh installs it)")?;
    let nginx_host = format!("127.0.0.1:{port}");
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http(&nginx_host, "GET", "/photo.png", &[], None).await
                && r.status == 200
            {
                if r.body != bytes {
                    bail!("nginx served other bytes than the gateway");
                }
                break;
            }
            if let Some(status) = nginx.try_wait()? {
                bail!("nginx exited at start ({status}); see {}/error.log", dir.display());
            }
            if Instant::now() > deadline {
                bail!("nginx did not answer within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut results = Vec::new();
        for (who, url) in [
            ("gateway", format!("http://{}{path}", inst.host())),
            ("nginx", format!("http://{nginx_host}/photo.png")),
        ] {
            for attempt in 1..=2 {
                ctx.quiet().await;
                let load = tokio::spawn(wrk(url.clone(), CONNS, SECS, None));
                // CPU shares while wrk runs (wrk's own included).
                tokio::time::sleep(Duration::from_secs(3)).await;
                let cpu0 = cpu_sample();
                let perf = ctx.perf(&format!("photos-{who}"), 8);
                tokio::time::sleep(Duration::from_secs(9)).await;
                let cpu1 = cpu_sample();
                let w = load.await.map_err(|e| anyhow!("wrk task: {e}"))??;
                let title = format!(
                    "5. photos, {who}, wrk {CONNS} connections{}",
                    if attempt > 1 { " (measured again)" } else { "" }
                );
                let foreign = ctx.profile(&title, &cpu0, &cpu1, perf, attempt == 1).await;
                if foreign < INTERFERENCE || attempt > 1 || !ctx.may_retry() {
                    results.push(w);
                    break;
                }
            }
        }
        let ng = results.pop().ok_or_else(|| anyhow!("no nginx result"))?;
        let gw = results.pop().ok_or_else(|| anyhow!("no gateway result"))?;
        Ok::<_, anyhow::Error>((gw, ng))
    }
    .await;
    if let Some(pid) = nginx.id() {
        // SIGQUIT: the master stops its workers and exits.
        // SAFETY: kill only sends a signal to our own child.
        unsafe {
            libc::kill(pid as i32, libc::SIGQUIT);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), nginx.wait()).await;
    let _ = nginx.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    let (gw, ng) = result?;
    for (who, w) in [("gateway", &gw), ("nginx", &ng)] {
        if !w.problems.is_empty() {
            ctx.report.note(format!("Photos, {who}: {}", w.problems.join("; ")));
        }
        ctx.report.note(format!("Photos, {who}: {}", w.requests));
    }
    let size = bytes.len();
    ctx.report.row(
        S,
        format!("gateway GET {path} ({size} B PNG, warm Redis cache), wrk {CONNS} conns {SECS} s"),
        format!("{} req/s, p99 {}", thousands(gw.rps), ms(gw.p99_ms)),
        "",
        None,
    );
    ctx.report.row(
        S,
        "nginx, the same bytes as a static file, same wrk",
        format!("{} req/s, p99 {}", thousands(ng.rps), ms(ng.p99_ms)),
        "",
        None,
    );
    let ratio = gw.rps / ng.rps;
    ctx.report.row(
        S,
        "gateway ÷ nginx requests/s",
        format!("{ratio:.2}"),
        "≥ 0.50",
        Some(ratio >= 0.5 && gw.problems.is_empty()),
    );
    Ok(())
}
