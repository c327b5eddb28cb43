//! Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`).

use std::fmt::Debug;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,actix_server=warn"));
    // A second init (tests start several apps in one process) is harmless.
    let _ = tracing_subscriber::registry()
        .with(ExpectedRefusals)
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_writer(std::io::stderr),
        )
        .try_init();
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
