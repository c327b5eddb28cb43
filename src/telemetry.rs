//! Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`).
//! Traces: the pipeline's spans (`product_gateway` at info), exported over
//! OTLP when a collector is configured ([`TracingSettings`]).

use std::fmt::Debug;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracerProvider};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::settings::TracingSettings;

/// The spans exported: one per hop of a change (docs/operations.md,
/// "Tracing").
const HOPS: [&str; 7] = ["ingest", "generate", "publish", "apply", "relay", "fan_out", "deliver"];

/// The trace exporter while it runs; dropping it sends the spans still
/// queued (bounded by the export timeout) and stops it.
#[must_use = "traces stop when this is dropped"]
pub struct Traces(Option<SdkTracerProvider>);

impl Traces {
    /// Whether spans are exported.
    pub fn on(&self) -> bool {
        self.0.is_some()
    }

    /// Sends the spans queued so far; blocks until the collector answered
    /// or the export timed out.
    pub fn flush(&self) {
        if let Some(provider) = &self.0
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "spans not flushed");
        }
    }
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "trace exporter did not stop cleanly");
        }
    }
}

/// Starts logs, and traces when a collector is configured. Only the first
/// call in a process sets them up (tests start several apps in one); later
/// ones return an exporter that is off.
pub fn init(settings: &TracingSettings) -> anyhow::Result<Traces> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,actix_server=warn"));
    let logs = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let provider = exporter(settings)?;
    // The pipeline's hops only, whatever RUST_LOG says of the logs: not
    // the access log's request and connection spans (a WebSocket's lasts
    // hours), nor log lines.
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("product-gateway"))
            .with_filter(filter_fn(|meta| {
                meta.is_span() && meta.target().starts_with("product_gateway") && HOPS.contains(&meta.name())
            }))
    });
    let installed = tracing_subscriber::registry()
        .with(ExpectedRefusals)
        .with(logs)
        .with(spans)
        .try_init()
        .is_ok();
    if !installed {
        return Ok(Traces(None));
    }
    if provider.is_some() {
        tracing::info!(endpoint = %endpoint(settings).unwrap_or_default(), "traces exported over OTLP");
    }
    Ok(Traces(provider))
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

/// The tracer provider, when traces are on: spans queue in the SDK's batch
/// processor (bounded, `OTEL_BSP_MAX_QUEUE_SIZE`, 2,048 by default; a full
/// queue drops spans rather than wait) and leave from its own thread, so a
/// slow or absent collector costs the pipeline nothing but those spans.
fn exporter(settings: &TracingSettings) -> anyhow::Result<Option<SdkTracerProvider>> {
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
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))));
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
