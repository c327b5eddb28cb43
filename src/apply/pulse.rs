//! Whether the update stream still reaches this instance: the one signal
//! a live connection to a cut-off node gives.

use std::sync::Mutex;
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
///
/// A mark names the epoch (messages read so far) taken before its batch
/// was written: the reader may read a batch's message before its writer
/// marks it (a stream delivery can overtake the relay's confirm), and a
/// mark for a message already read is no stall.
pub struct StreamPulse {
    origin: Instant,
    state: Mutex<Pulse>,
}

#[derive(Default)]
struct Pulse {
    /// Messages the reader has read.
    read: u64,
    /// Milliseconds after `origin` (plus one) of the oldest mark since the
    /// reader last read a message; 0 when there is none.
    awaited: u64,
}

impl Default for StreamPulse {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            state: Default::default(),
        }
    }
}

impl StreamPulse {
    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Pulse> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Taken before a batch is written, for its mark.
    pub fn epoch(&self) -> u64 {
        self.state().read
    }

    /// A batch written after `epoch` has its updates in the outbox, or its
    /// message is on the stream: the reader should see it, unless it has
    /// read a message since.
    pub fn committed(&self, epoch: u64) {
        let now = self.now();
        let mut s = self.state();
        if s.read == epoch && s.awaited == 0 {
            s.awaited = now;
        }
    }

    /// The reader read a message: the stream flows.
    pub fn received(&self) {
        let mut s = self.state();
        s.read += 1;
        s.awaited = 0;
    }

    /// True when a batch committed longer than `within` ago was followed by
    /// no message; the wait starts over, so a stalled relay costs one move
    /// per `within`, not one per check.
    pub fn stalled(&self, within: Duration) -> bool {
        let now = self.now();
        let mut s = self.state();
        let late = s.awaited != 0 && now.saturating_sub(s.awaited) > within.as_millis() as u64;
        if late {
            s.awaited = now;
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
        pulse.committed(pulse.epoch());
        std::thread::sleep(past);
        pulse.committed(pulse.epoch()); // the oldest commit counts
        assert!(!pulse.stalled(Duration::from_secs(60)));
        assert!(pulse.stalled(wait));
        assert!(!pulse.stalled(wait), "the wait started over");
        std::thread::sleep(past);
        assert!(pulse.stalled(wait));
        pulse.received();
        std::thread::sleep(past);
        assert!(!pulse.stalled(wait), "a message came after the commit");
    }

    #[test]
    fn a_mark_for_a_batch_whose_message_was_already_read_is_no_stall() {
        let pulse = StreamPulse::default();
        let epoch = pulse.epoch();
        // The batch's message is read before its writer marks it.
        pulse.received();
        pulse.committed(epoch);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pulse.stalled(Duration::from_millis(10)), "nothing awaited");
        // A batch begun after that read, and not read: awaited.
        pulse.committed(pulse.epoch());
        std::thread::sleep(Duration::from_millis(50));
        assert!(pulse.stalled(Duration::from_millis(10)));
    }
}
