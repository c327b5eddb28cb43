//! The benchmark's scenarios, one file each (numbered as in
//! BENCHMARKS.md), and what they share: the run's context, the tracking
//! client, waiting for clients to leave. Each adds its rows to the report;
//! an infrastructure failure (a service that does not answer, a client
//! that cannot connect, a time-out waiting for anything at all) is an error
//! that stops the run; a missed target is a figure.

pub mod catalog;
pub mod connections;
pub mod fanout;
pub mod floor;
pub mod generator;
pub mod ingest;
pub mod photos;
pub mod pipeline;
pub mod resume;
pub mod selective;
pub mod slow;
pub mod slow_clients;
pub mod storm;
pub mod tracing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use product_gateway::settings::Settings;
use tokio_util::sync::CancellationToken;

use crate::fleet::PubProc;
use crate::harness::{
    CpuSample, Instance, Isolation, Perf, cpu_shares, foreign_pct, format_shares, on_thread, wait_quiet,
};
use crate::load::{self, Pace, Tracker};
use crate::report::{Profile, Report, ms};

/// Events in flight (published, not yet consumed or delivered) in the
/// closed-loop runs.
const CLOSED_WINDOW: u64 = 4000;

pub struct Ctx {
    pub iso: Isolation,
    pub settings: Settings,
    pub seq: Arc<AtomicU64>,
    pub products: i64,
    pub perf: bool,
    pub report: Report,
    /// Web-STOMP clients RabbitMQ's limits allow in this run.
    pub stomp_clients: usize,
    /// Stops the running instance when a scenario fails.
    pub live: Option<CancellationToken>,
    /// How long, in all, the run may still wait for other programs on the
    /// machine to go quiet before a measurement.
    pub quiet_budget: Duration,
    /// Until when a window disturbed by other programs is measured again.
    pub retry_until: Instant,
    /// The broker's ceiling (msg/s), once measured in this run.
    pub ceiling: Option<f64>,
}

/// CPU (% of a core) of programs outside the bench above which a measured
/// window counts as disturbed.
const INTERFERENCE: f64 = 20.0;

impl Ctx {
    /// Starts the event publisher (a child process) on the service's vhost,
    /// or on `url` when given.
    pub async fn publish(
        &self,
        pace: Pace,
        duration: Option<Duration>,
        count: Option<u64>,
        url: Option<&str>,
    ) -> Result<PubProc> {
        self.publish_to(pace, duration, count, url, None).await
    }

    /// `publish`, also sending each event as an update to `mirror`.
    async fn publish_to(
        &self,
        pace: Pace,
        duration: Option<Duration>,
        count: Option<u64>,
        url: Option<&str>,
        mirror: Option<&str>,
    ) -> Result<PubProc> {
        let default = self.iso.amqp_url(&self.iso.vhost);
        PubProc::start(
            url.unwrap_or(&default),
            &self.settings.rabbit.topology.events_exchange,
            self.products,
            self.seq.clone(),
            pace,
            duration,
            count,
            mirror,
        )
        .await
    }

    pub fn perf(&self, label: &str, secs: u64) -> Option<Perf> {
        if self.perf { Perf::start(label, secs) } else { None }
    }

    /// Before a measurement: lets other programs' CPU load pass, within
    /// the run's waiting budget.
    pub async fn quiet(&mut self) {
        wait_quiet(&mut self.quiet_budget).await;
    }

    /// Records CPU per program over a measured window (and perf's view of
    /// it); flags the window when other programs took a noticeable share.
    /// `retryable`: the caller measures a disturbed window again when
    /// there is time (`self.again(..)` says whether it will).
    pub async fn profile(
        &mut self,
        title: &str,
        a: &CpuSample,
        b: &CpuSample,
        perf: Option<Perf>,
        retryable: bool,
    ) -> f64 {
        let shares = cpu_shares(a, b);
        let foreign = foreign_pct(&shares);
        if foreign >= INTERFERENCE {
            self.report.note(format!(
                "**Interference**: during \"{title}\" programs that are not part of the bench used {foreign:.0}% of a core \
                 (see the CPU shares below){}.",
                if retryable && self.may_retry() {
                    "; measured again"
                } else {
                    "; that window's figures are pessimistic"
                }
            ));
        }
        let perf = match perf {
            Some(p) => p.report(12).await,
            None => None,
        };
        self.report.profiles.push(Profile {
            title: title.to_owned(),
            cpu: format_shares(&shares),
            perf,
        });
        foreign
    }

    /// Whether there is time left to measure a disturbed window again.
    fn may_retry(&self) -> bool {
        Instant::now() < self.retry_until
    }
}

/// Starts a tracking client on its own thread and waits until it is subscribed.
async fn tracking_client(
    addr: SocketAddr,
    base: u64,
) -> Result<(Arc<Tracker>, CancellationToken, impl Future<Output = Result<()>>)> {
    let tracker = Tracker::new(base);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let stop = CancellationToken::new();
    let (t, s) = (tracker.clone(), stop.clone());
    let mut handle = Box::pin(on_thread("bench-tracker", move || load::track(addr, t, ready_tx, s)));
    tokio::select! {
        r = ready_rx => r.map_err(|_| anyhow!("tracking client failed before subscribing"))?,
        r = &mut handle => { r?; bail!("tracking client ended before subscribing"); }
        _ = tokio::time::sleep(Duration::from_secs(30)) => bail!("tracking client: no subscription within 30 s"),
    }
    Ok((tracker, stop, handle))
}

pub async fn wait_clients_gone(inst: &Instance) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = inst.metric("gateway_clients_connected", "");
        if n <= 0.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the service still counts {n} connected clients 60 s after they left");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the apply queues are empty, as the service's lag gauge
/// (sampled every 2 s) says twice in a row.
pub async fn drain_applied(inst: &Instance, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut empty = 0;
    while empty < 2 {
        let lag = inst.metric("gateway_consumer_lag_messages", "");
        empty = if lag <= 0.0 { empty + 1 } else { 0 };
        if Instant::now() > deadline {
            bail!(
                "{lag} events still wait in the apply queues after {} s",
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(())
}

// ------------------------------------------------------ 3. connections

pub use connections::connections;
pub use fanout::{FANOUT_RATE, fanout, fanout_max};
pub use photos::photos;
pub use pipeline::pipeline;
pub use resume::resume_scenario;

/// The service's latency points: the time since an event's publish at
/// successive places in the pipeline, as its histograms count them.
const POINTS: [&str; 4] = [
    "gateway_commit_latency_seconds",
    "gateway_relay_latency_seconds",
    "gateway_hub_latency_seconds",
    "gateway_e2e_latency_seconds",
];

/// Sum and count of each latency point at one moment: two readings give
/// the mean of each point over the time between them, and the difference
/// of two means is the mean time of one hop.
pub struct Points([(f64, f64); 4]);

impl Points {
    pub fn read(inst: &Instance) -> Self {
        let text = inst.metrics_text();
        Points(POINTS.map(|name| {
            (
                testkit::metric_value(&text, &format!("{name}_sum"), ""),
                testkit::metric_value(&text, &format!("{name}_count"), ""),
            )
        }))
    }

    /// Each point's mean since `before`, ms after the publish (NaN where
    /// nothing was counted).
    pub fn means_since(&self, before: &Points) -> [f64; 4] {
        let mut means = [f64::NAN; 4];
        for (i, ((s1, c1), (s0, c0))) in self.0.iter().zip(&before.0).enumerate() {
            if c1 > c0 {
                means[i] = (s1 - s0) / (c1 - c0) * 1000.0;
            }
        }
        means
    }
}

/// One line of where the time went: the publisher's own publish → confirm,
/// then each hop inside the service as the difference of two points' means.
pub fn hops_text(confirm_ms: f64, means: [f64; 4]) -> String {
    let [commit, stream, hub, socket] = means;
    format!(
        "publish → confirm {} (publisher); publish → commit {}; → stream confirmed +{}; → hub +{}; → socket +{} \
         (= {} publish → socket)",
        ms(confirm_ms),
        ms(commit),
        ms(stream - commit),
        ms(hub - stream),
        ms(socket - hub),
        ms(socket)
    )
}
