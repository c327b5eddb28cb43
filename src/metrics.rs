//! Process metrics, exposed in Prometheus text format at `GET /metrics`.
//! One struct so each stage increments a field, not a global by name.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Label = [(&'static str, &'static str); 1];
type OwnedLabel = [(&'static str, String); 1];

pub struct Metrics {
    registry: Registry,
    // Generator / publisher.
    pub events_published: Counter,
    pub events_confirmed: Counter,
    pub events_nacked: Counter,
    pub events_returned: Counter,
    pub events_retried: Counter,
    pub generator_retries: Family<Label, Counter>,
    pub generator_asked_rate: Gauge<f64, AtomicU64>,
    pub generator_achieved_rate: Gauge<f64, AtomicU64>,
    // Consumer / apply.
    pub events_applied: Family<Label, Counter>,
    pub events_duplicate: Family<Label, Counter>,
    pub events_dead_lettered: Family<Label, Counter>,
    pub transient_failures: Counter,
    pub apply_batch_size: Histogram,
    pub apply_latency: Histogram,
    pub commit_latency: Histogram,
    pub consumer_lag: Family<OwnedLabel, Gauge>,
    pub updates_broadcast: Counter,
    pub relay_latency: Histogram,
    // Photos.
    pub photo_cache_hits: Family<Label, Counter>,
    pub photo_cache_misses: Counter,
    pub photo_origin_loads: Counter,
    pub redis_errors: Counter,
    // Hub and delivery.
    pub stream_updates: Counter,
    pub clients_connected: Family<Label, Gauge>,
    pub subscriptions: Gauge,
    pub updates_delivered: Family<Label, Counter>,
    pub updates_conflated: Counter,
    pub resumes: Family<Label, Counter>,
    pub client_buffer_high_water: Gauge,
    pub hub_latency: Histogram,
    pub e2e_latency: Histogram,
    /// Kept apart from `e2e_latency`: an exemplar takes a lock, which only
    /// the few traced deliveries may pay.
    pub traced_latency: HistogramWithExemplars<TraceExemplar>,
    pub clients_refused: Family<Label, Counter>,
    pub client_errors: Family<Label, Counter>,
    pub auth_refused: Family<Label, Counter>,
    pub ingest_requests: Family<Label, Counter>,
    pub ingest_steps: Family<Label, Histogram>,
    // Broker links.
    pub broker_reconnects: Counter,
    pub catch_up_resets: Counter,
    pub catch_ups_running: Gauge,
    pub stream_republished: Counter,
    pub stream_moves: Counter,
    pub snapshot_rows: Counter,
    pub snapshots_off_replica: Counter,
    pub broker_max_message_bytes: Gauge,
    pub consumer_reconnects: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("gateway");
        macro_rules! reg {
            ($name:literal, $help:literal, $metric:expr) => {{
                let m = $metric;
                registry.register($name, $help, m.clone());
                m
            }};
        }
        let latency_buckets = || exponential_buckets(0.000_25, 2.0, 16);
        let metrics = Metrics {
            events_published: reg!(
                "events_published",
                "Events published to product.events",
                Counter::default()
            ),
            events_confirmed: reg!("events_confirmed", "Events confirmed by the broker", Counter::default()),
            events_nacked: reg!("events_nacked", "Events nacked by the broker", Counter::default()),
            events_returned: reg!("events_returned", "Events returned as unroutable", Counter::default()),
            events_retried: reg!("events_retried", "Event publishes retried", Counter::default()),
            generator_retries: reg!(
                "generator_retries",
                "Generator events published again after a back-off, by reason (unroutable, nacked, unconfirmed)",
                Family::default()
            ),
            generator_asked_rate: reg!(
                "generator_asked_rate",
                "Events per second the generator is asked to publish here (0 while stopped or running on another instance)",
                Gauge::default()
            ),
            generator_achieved_rate: reg!(
                "generator_achieved_rate",
                "Events per second the generator had confirmed over the last 5 s",
                Gauge::default()
            ),
            events_applied: reg!("events_applied", "Events applied to the catalog", Family::default()),
            events_duplicate: reg!(
                "events_duplicate",
                "Repeated or older events that changed nothing",
                Family::default()
            ),
            events_dead_lettered: reg!(
                "events_dead_lettered",
                "Events dead-lettered, by reason",
                Family::default()
            ),
            transient_failures: reg!(
                "apply_transient_failures",
                "Batches retried after a transient failure",
                Counter::default()
            ),
            apply_batch_size: reg!(
                "apply_batch_size",
                "Events per applied batch",
                Histogram::new(exponential_buckets(1.0, 2.0, 12))
            ),
            apply_latency: reg!(
                "apply_latency_seconds",
                "Time to apply and commit one batch",
                Histogram::new(latency_buckets())
            ),
            commit_latency: reg!(
                "commit_latency_seconds",
                "Publish to the event's apply committed (applied events with a publish time): the first hops of e2e_latency",
                Histogram::new(latency_buckets())
            ),
            consumer_lag: reg!(
                "consumer_lag_messages",
                "Messages ready in each apply queue",
                Family::default()
            ),
            updates_broadcast: reg!(
                "updates_broadcast",
                "Applied updates published to product.updates",
                Counter::default()
            ),
            relay_latency: reg!(
                "relay_latency_seconds",
                "Publish to the broker's confirm of the stream message carrying the update (per update, from the mean publish time of the message's updates): the hops up to the update stream",
                Histogram::new(latency_buckets())
            ),
            photo_cache_hits: reg!(
                "photo_cache_hits",
                "Photos served from a cache, by layer (local, redis)",
                Family::default()
            ),
            photo_cache_misses: reg!(
                "photo_cache_misses",
                "Photo reads that missed the cache",
                Counter::default()
            ),
            photo_origin_loads: reg!(
                "photo_origin_loads",
                "Photos loaded from PostgreSQL",
                Counter::default()
            ),
            redis_errors: reg!(
                "redis_errors",
                "Redis operations that failed or timed out",
                Counter::default()
            ),
            stream_updates: reg!("stream_updates", "Updates read from the stream", Counter::default()),
            clients_connected: reg!("clients_connected", "Connected clients by transport", Family::default()),
            subscriptions: reg!("subscriptions", "Active topic subscriptions", Gauge::default()),
            updates_delivered: reg!(
                "updates_delivered",
                "Updates handed to clients, by transport",
                Family::default()
            ),
            updates_conflated: reg!(
                "updates_conflated",
                "Client buffer overflows conflated",
                Counter::default()
            ),
            resumes: reg!(
                "resumes",
                "Clients that resumed from an offset, by source",
                Family::default()
            ),
            client_buffer_high_water: reg!(
                "client_buffer_high_water",
                "Largest client buffer seen",
                Gauge::default()
            ),
            hub_latency: reg!(
                "hub_latency_seconds",
                "Generator publish to the update read back from the stream for the hub (applied, streamed; live updates only): the pipeline's share of e2e_latency",
                Histogram::new(latency_buckets())
            ),
            e2e_latency: reg!(
                "e2e_latency_seconds",
                "Generator publish to client hand-off",
                Histogram::new(latency_buckets())
            ),
            traced_latency: reg!(
                "traced_delivery_latency_seconds",
                "Publish to socket hand-off of the traced deliveries (one per recorded trace), with trace ids as exemplars",
                HistogramWithExemplars::new(latency_buckets())
            ),
            clients_refused: reg!(
                "clients_refused",
                "Connections or frames refused, by reason",
                Family::default()
            ),
            client_errors: reg!(
                "client_errors",
                "Error frames sent to clients, by code",
                Family::default()
            ),
            auth_refused: reg!(
                "auth_refused",
                "Subscriber tokens and subscribes refused, by reason (unauthorized, token_expired, forbidden)",
                Family::default()
            ),
            ingest_requests: reg!(
                "ingest_requests",
                "Ingest API calls by outcome (accepted, replayed, refused, failed)",
                Family::default()
            ),
            ingest_steps: reg!(
                "ingest_step_seconds",
                "Time an accepted ingest request spent in each step: admit (waiting for and running its admission batch: key lookup, version issued, key stored) and confirm (publish to the broker's confirm)",
                Family::new_with_constructor(step_histogram as fn() -> Histogram)
            ),
            broker_reconnects: reg!(
                "broker_reconnects",
                "Broker connections re-established",
                Counter::default()
            ),
            catch_up_resets: reg!(
                "catch_up_resets",
                "Stream catch-ups given up (broker unreachable, slow, or no turn in time); each client got a reset",
                Counter::default()
            ),
            stream_republished: reg!(
                "stream_republished",
                "Stream messages dropped as a copy the outbox relay published again (its confirm was lost)",
                Counter::default()
            ),
            stream_moves: reg!(
                "stream_moves",
                "Times the live stream reader left its node because this instance's committed updates stopped coming back (a node cut from the stream's leader)",
                Counter::default()
            ),
            catch_ups_running: reg!(
                "catch_ups_running",
                "Stream catch-ups reading now, on the instance's one catch-up connection",
                Gauge::default()
            ),
            snapshot_rows: reg!(
                "snapshot_rows",
                "Catalog rows read for snapshots (a snapshot of named products reads only them)",
                Counter::default()
            ),
            snapshots_off_replica: reg!(
                "snapshots_off_replica",
                "Snapshots read on the primary because the replica had not replayed the primary's commits within database.replica_max_lag_ms",
                Counter::default()
            ),
            broker_max_message_bytes: reg!(
                "broker_max_message_bytes",
                "Largest body the broker accepts, read from its refusal of a probe one byte over rabbit.topology.max_message_bytes at start (0: it accepted the probe)",
                Gauge::default()
            ),
            consumer_reconnects: reg!(
                "consumer_reconnects",
                "Apply consumers restarted after their channel or connection failed",
                Counter::default()
            ),
            registry,
        };
        metrics.prime();
        Arc::new(metrics)
    }

    /// Creates the series of the label values known in advance at zero, so
    /// they exist from the first scrape: a rate over them works at once,
    /// and dashboards and alerts do not see them appear out of nowhere.
    fn prime(&self) {
        for transport in ["ws", "sse"] {
            let _ = self.clients_connected.get_or_create(&[("transport", transport)]);
            let _ = self.updates_delivered.get_or_create(&[("transport", transport)]);
        }
        for kind in ["price", "stock"] {
            let _ = self.events_applied.get_or_create(&[("kind", kind)]);
        }
        for reason in ["unauthorized", "token_expired", "forbidden"] {
            let _ = self.auth_refused.get_or_create(&[("reason", reason)]);
        }
        for outcome in ["accepted", "replayed", "refused", "failed"] {
            let _ = self.ingest_requests.get_or_create(&[("outcome", outcome)]);
        }
        for step in ["admit", "confirm"] {
            let _ = self.ingest_steps.get_or_create(&[("step", step)]);
        }
        for reason in [
            "connection_limit",
            "per_ip_limit",
            "origin",
            "slow_consumer",
            "heartbeat_timeout",
        ] {
            let _ = self.clients_refused.get_or_create(&[("reason", reason)]);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The same samples in Prometheus's classic text format (0.0.4), for
    /// scrapers and tools that do not ask for OpenMetrics (`promtool check
    /// metrics` among them). The two differ only in names and markers: a
    /// classic counter's `HELP` and `TYPE` name its `_total` sample, and
    /// there is no `UNIT` line or `EOF` marker.
    pub fn render_classic(&self) -> String {
        classic_text(&self.render())
    }

    /// Raises the high-water gauge if `len` is above it.
    pub fn observe_buffer(&self, len: usize) {
        let len = len as i64;
        let g = &self.client_buffer_high_water;
        if len > g.get() {
            g.set(len);
        }
    }
}

/// A histogram of one ingest step: 0.25 ms to 8 s, like the latency ones.
fn step_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The exemplar of a traced delivery: the trace to open from a dashboard.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: String,
}

impl Metrics {
    /// Observes a traced delivery's latency since its publish time `ts_us`,
    /// its trace id the exemplar.
    pub fn observe_traced(&self, ts_us: i64, trace_id: String) {
        if ts_us > 0 {
            let seconds = (crate::domain::now_us() - ts_us).max(0) as f64 / 1e6;
            self.traced_latency
                .observe(seconds, Some(TraceExemplar { trace_id }), None);
        }
    }
}

/// Observes the time since an event's publish time `ts_us` in one of the
/// latency histograms; an event without one (0) is not counted.
pub fn observe_since(histogram: &Histogram, ts_us: i64) {
    if ts_us > 0 {
        histogram.observe((crate::domain::now_us() - ts_us).max(0) as f64 / 1e6);
    }
}

/// Rewrites OpenMetrics text as classic text (see [`Metrics::render_classic`]).
fn classic_text(open_metrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in open_metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, "counter")) = rest.split_once(' ')
        {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|m| Some((m, line.strip_prefix(m)?)));
        match meta {
            Some((marker, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{marker}{name}{suffix} {tail}"));
            }
            // Exemplars (` # {trace_id="…"} value`) are OpenMetrics only.
            None => out.push_str(line.split_once(" # {").map_or(line, |(sample, _)| sample)),
        }
        out.push('\n');
    }
    out
}
