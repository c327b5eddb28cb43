//! Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`).
//! Traces: the spans of the pipeline's hops (`HOPS`), exported over
//! OTLP when a collector is configured ([`TracingSettings`]).

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use opentelemetry::KeyValue;
use opentelemetry::trace::{Link, SpanKind, TraceId, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SamplingResult, SdkTracerProvider, ShouldSample};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::dynamic_filter_fn;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::settings::TracingSettings;

/// The spans exported: one per hop of a change (docs/operations.md,
/// "Tracing").
const HOPS: [&str; 7] = ["ingest", "generate", "publish", "apply", "relay", "fan_out", "deliver"];

/// The default log filter of the service.
pub const DEFAULT_LOGS: &str = "info,lapin=warn,actix_server=warn";

/// The trace exporter while it runs; dropping it sends the spans still
/// queued (bounded by the export timeout) and stops it.
#[must_use = "traces stop when this is dropped"]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
    /// Whether the hops' spans reach the exporter (off: as if no collector
    /// were configured, nothing built, no header written).
    on: Arc<AtomicBool>,
    /// The share of new traces recorded, as `f64` bits.
    ratio: Arc<AtomicU64>,
}

impl Traces {
    /// Whether spans are exported.
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Turns traces off (None) or on, recording `ratio` of the new ones,
    /// while the service runs (the benchmark measures each); on needs an
    /// exporter.
    pub fn set(&self, ratio: Option<f64>) {
        if let Some(r) = ratio {
            self.ratio.store(r.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
        }
        self.on
            .store(ratio.is_some() && self.provider.is_some(), Ordering::Relaxed);
    }

    /// Sends the spans queued so far; blocks until the collector answered
    /// or the export timed out.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "spans not flushed");
        }
    }
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "trace exporter did not stop cleanly");
        }
    }
}

/// Starts logs (`RUST_LOG`, else `default_logs`), and traces when a
/// collector is configured. Only the first call in a process sets them up
/// (tests start several apps in one); later ones return traces that are off.
pub fn init(settings: &TracingSettings, default_logs: &str) -> anyhow::Result<Traces> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_logs));
    let logs = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let ratio = Arc::new(AtomicU64::new(settings.sample_ratio.to_bits()));
    let provider = exporter(settings, &ratio)?;
    let on = Arc::new(AtomicBool::new(provider.is_some()));
    // The pipeline's hops only, whatever RUST_LOG says of the logs: not
    // the access log's request and connection spans (a WebSocket's lasts
    // hours), nor log lines. Asked at each span, so `Traces::set` holds at
    // once.
    let spans = provider.as_ref().map(|p| {
        let on = on.clone();
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("product-gateway"))
            .with_filter(dynamic_filter_fn(move |meta, _| {
                on.load(Ordering::Relaxed)
                    && meta.is_span()
                    && meta.target().starts_with("product_gateway")
                    && HOPS.contains(&meta.name())
            }))
    });
    let installed = tracing_subscriber::registry()
        .with(ExpectedRefusals)
        .with(logs)
        .with(spans)
        .try_init()
        .is_ok();
    if !installed {
        return Ok(Traces {
            provider: None,
            on: Arc::new(AtomicBool::new(false)),
            ratio,
        });
    }
    if provider.is_some() {
        tracing::info!(endpoint = %endpoint(settings).unwrap_or_default(), "traces exported over OTLP");
    }
    Ok(Traces { provider, on, ratio })
}

/// The collector's traces URL: the settings', else the OTLP variables'.
fn endpoint(settings: &TracingSettings) -> Option<String> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    if !settings.otlp_endpoint.is_empty() {
        return Some(settings.otlp_endpoint.clone());
    }
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT").map(|base| format!("{}/v1/traces", base.trim_end_matches('/'))))
}

/// Parent-based sampling at a ratio that can change while the service
/// runs: a span with a parent follows the parent's decision, a new trace is
/// recorded at the current ratio.
#[derive(Clone, Debug)]
struct Ratio(Arc<AtomicU64>);

impl ShouldSample for Ratio {
    fn should_sample(
        &self,
        parent_context: Option<&opentelemetry::Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let ratio = f64::from_bits(self.0.load(Ordering::Relaxed));
        Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))).should_sample(
            parent_context,
            trace_id,
            name,
            span_kind,
            attributes,
            links,
        )
    }
}

/// The tracer provider, when traces are on: spans queue in the SDK's batch
/// processor (bounded, `OTEL_BSP_MAX_QUEUE_SIZE`, 2,048 by default; a full
/// queue drops spans rather than wait) and leave from its own thread, so a
/// slow or absent collector costs the pipeline nothing but those spans.
fn exporter(settings: &TracingSettings, ratio: &Arc<AtomicU64>) -> anyhow::Result<Option<SdkTracerProvider>> {
    let Some(endpoint) = endpoint(settings) else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .build()?;
    let mut provider = SdkTracerProvider::builder().with_span_processor(BatchSpanProcessor::builder(exporter).build());
    // OTEL_TRACES_SAMPLER, when set, is the SDK's to read.
    if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        provider = provider.with_sampler(Ratio(ratio.clone()));
    }
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "product-gateway".into());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(Some(provider.with_resource(resource).build()))
}

/// Drops lapin's error line for a channel the broker closed because a
/// message was over its size limit, or because a queue exists with other
/// members than the service asks for. At every start the service probes
/// that limit on purpose (`broker::topology::probe_message_limit`), and
/// declares its queues with their member counts, and reports either outcome
/// itself; lapin logs any channel closed by the broker as an error, which
/// would alarm operators at each start. A publisher refused for its size
/// still reports the refusal through its own error.
pub struct ExpectedRefusals;

impl<S: Subscriber> Layer<S> for ExpectedRefusals {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        if !event.metadata().target().starts_with("lapin::channel") {
            return true;
        }
        let mut size_refusal = RefusalText(false);
        event.record(&mut size_refusal);
        !size_refusal.0
    }
}

/// Set when a lapin log event's `method` text is one of the expected refusals.
struct RefusalText(bool);

impl Visit for RefusalText {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "method" {
            let text = format!("{value:?}");
            self.0 |=
                text.contains("is larger than configured max size") || crate::broker::topology::is_other_members(&text);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects the messages of the events that reach it.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Seen {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            struct Message(String);
            impl Visit for Message {
                fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
    }

    #[test]
    fn only_the_size_refusal_of_a_channel_is_dropped() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(ExpectedRefusals).with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            let refusal = "Close { reply_text: \"PRECONDITION_FAILED - message size 262145 is larger than configured max size 262144\" }";
            let other = "Close { reply_text: \"PRECONDITION_FAILED - inequivalent arg 'x-queue-type'\" }";
            let members = "Close { reply_text: \"PRECONDITION_FAILED - inequivalent arg 'x-initial-cluster-size' for queue 's'\" }";
            tracing::error!(target: "lapin::channel", method = refusal, "size refusal");
            tracing::error!(target: "lapin::channel", method = members, "members refusal");
            tracing::error!(target: "lapin::channel", method = other, "other refusal");
            tracing::error!(target: "product_gateway", method = refusal, "not lapin");
        });
        assert_eq!(*seen.0.lock().unwrap(), ["other refusal", "not lapin"]);
    }
}
