//! Trace context across the pipeline's hops: the W3C `traceparent` of one
//! hop's span, carried in an AMQP header (and in the outbox row between
//! apply and the relay), becomes the parent, or a link, of the next hop's
//! span. Spans are `tracing` spans; the OpenTelemetry layer
//! (`telemetry`) gives them their ids. With tracing off they have none: no
//! header is written and every hop starts no trace.

use std::sync::atomic::{AtomicBool, Ordering};

use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header (HTTP and AMQP) that carries a trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The header the ingest API answers with: its span's traceparent, whose
/// trace id finds the change's trace in a viewer.
pub const TRACERESPONSE: &str = "traceresponse";

/// `span`'s context as a traceparent; None when it has none (tracing off).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| format(&sc))
}

/// `span`'s context when it is recorded (sampled): what the hops after it
/// carry on.
pub fn sampled(span: &tracing::Span) -> Option<SpanContext> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then_some(sc)
}

/// The trace an update carries from the hub to the sockets: its fan-out
/// span's context, and whether a delivery has been traced. One socket write
/// per update ends its trace; tracing every client's would multiply the
/// spans by the audience.
#[derive(Debug)]
pub struct Traced {
    parent: SpanContext,
    delivered: AtomicBool,
}

impl Traced {
    pub fn new(parent: SpanContext) -> Self {
        Traced {
            parent,
            delivered: AtomicBool::new(false),
        }
    }

    /// The parent of the first delivery to ask; None for the others.
    pub fn claim(&self) -> Option<&SpanContext> {
        (!self.delivered.swap(true, Ordering::Relaxed)).then_some(&self.parent)
    }
}

/// Writes the trace id into `span`'s `trace_id` field (declared empty) when
/// the span is recorded, so the log lines inside it name their trace.
pub fn show_id(span: &tracing::Span) {
    if let Some(sc) = sampled(span) {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}

/// The trace id of a recorded span, for an exemplar.
pub fn id_of(span: &tracing::Span) -> Option<String> {
    sampled(span).map(|sc| sc.trace_id().to_string())
}

/// The traceparent of a span context (version 00).
pub fn format(sc: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8())
}

/// A traceparent's span context, or None when it is not one. Versions
/// after 00 are read by their first four fields, as the W3C format asks.
pub fn parse(text: &str) -> Option<SpanContext> {
    let mut fields = text.trim().split('-');
    let (version, trace, span, flags) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
    let hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if version == "00" && fields.next().is_some() {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// The trace context an AMQP message carries, if any.
pub fn of_headers(headers: &Option<FieldTable>) -> Option<SpanContext> {
    match headers.as_ref()?.inner().get(TRACEPARENT)? {
        AMQPValue::LongString(s) => parse(std::str::from_utf8(s.as_bytes()).ok()?),
        AMQPValue::ShortString(s) => parse(s.as_str()),
        _ => None,
    }
}

/// Adds `span`'s context to an AMQP message's headers, when it has one.
pub fn add_to(headers: &mut FieldTable, span: &tracing::Span) {
    if let Some(tp) = traceparent(span) {
        insert(headers, &tp);
    }
}

/// Adds a traceparent to an AMQP message's headers.
pub fn insert(headers: &mut FieldTable, traceparent: &str) {
    headers.insert(TRACEPARENT.into(), AMQPValue::LongString(traceparent.into()));
}

/// Makes the span of another hop (or an upstream system) `span`'s parent.
/// Call before the span is entered.
pub fn follow(span: &tracing::Span, parent: &SpanContext) {
    // Fails only without the OpenTelemetry layer, when there is no trace.
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent.clone()));
}

/// Makes the first of `contexts` `span`'s parent and links it to the
/// others, each once: a batch serves many traces, and each of them leads to
/// it (a generator tick's events share one context).
pub fn follow_all(span: &tracing::Span, contexts: impl IntoIterator<Item = SpanContext>) {
    let mut seen = std::collections::HashSet::new();
    for (i, cx) in contexts.into_iter().enumerate() {
        if !seen.insert(cx.span_id()) {
            continue;
        }
        if i == 0 {
            follow(span, &cx);
        } else {
            span.add_link(cx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_it_was_written() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse(text).unwrap();
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(format(&sc), text);
        let unsampled = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.is_sampled());
        // A later version may add fields; its first four are read.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
    }

    #[test]
    fn what_is_not_a_traceparent_is_refused() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
