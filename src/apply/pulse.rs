//! Whether the update stream still reaches this instance: the one signal
//! a live connection to a cut-off node gives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Whether the update stream still reaches this instance. Apply marks each
/// batch whose updates went to the outbox, this instance's outbox relay
/// each message the broker confirmed on the stream, and the live stream
/// reader each message it reads. A mark followed by no message at all for
/// a while means the reader's node no longer receives the stream although
/// its connection lives on (the node cut from the stream's leader, as by a
/// bridge partition, or from this host while the relay moved on): the
/// reader then moves to another node. A relay that cannot publish stalls
/// the stream too; the reader's move then costs one reconnection and
/// resumes at its offset, losing nothing.
pub struct StreamPulse {
    origin: Instant,
    /// Milliseconds after `origin` (plus one) of the oldest batch committed
    /// since the reader last read a message; 0 when there is none.
    awaited: AtomicU64,
}

impl Default for StreamPulse {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            awaited: Default::default(),
        }
    }
}

impl StreamPulse {
    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// A batch's updates are in the outbox, or a message is on the stream:
    /// the reader should see it.
    pub fn committed(&self) {
        let _ = self
            .awaited
            .compare_exchange(0, self.now(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The reader read a message: the stream flows.
    pub fn received(&self) {
        self.awaited.store(0, Ordering::Relaxed);
    }

    /// True when a batch committed longer than `within` ago was followed by
    /// no message; the wait starts over, so a stalled relay costs one move
    /// per `within`, not one per check.
    pub fn stalled(&self, within: Duration) -> bool {
        let since = self.awaited.load(Ordering::Relaxed);
        let now = self.now();
        let late = since != 0 && now.saturating_sub(since) > within.as_millis() as u64;
        if late {
            let _ = self
                .awaited
                .compare_exchange(since, now, Ordering::Relaxed, Ordering::Relaxed);
        }
        late
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::StreamPulse;

    #[test]
    fn a_commit_with_no_message_after_it_is_a_stall_once_per_wait() {
        // Waits well apart from each other: a busy machine may pause this
        // thread for some milliseconds between two lines.
        let (wait, past) = (Duration::from_millis(200), Duration::from_millis(300));
        let pulse = StreamPulse::default();
        assert!(!pulse.stalled(Duration::ZERO), "nothing committed, nothing awaited");
        pulse.committed();
        std::thread::sleep(past);
        pulse.committed(); // the oldest commit counts
        assert!(!pulse.stalled(Duration::from_secs(60)));
        assert!(pulse.stalled(wait));
        assert!(!pulse.stalled(wait), "the wait started over");
        std::thread::sleep(past);
        assert!(pulse.stalled(wait));
        pulse.received();
        std::thread::sleep(past);
        assert!(!pulse.stalled(wait), "a message came after the commit");
    }
}
