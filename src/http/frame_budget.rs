//! How many frames a WebSocket client may send: a token bucket of `rate`
//! frames per second with bursts of twice that. A frame past the budget is
//! refused (`rate_limited`), not queued, so a flood costs the service no
//! more than answering it.

use std::time::Instant;

pub(crate) struct FrameBudget {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl FrameBudget {
    /// A full budget of `rate` frames per second.
    pub(crate) fn new(rate: f64) -> Self {
        Self::starting_at(rate, Instant::now())
    }

    fn starting_at(rate: f64, now: Instant) -> Self {
        Self {
            rate,
            tokens: 2.0 * rate,
            last: now,
        }
    }

    /// Whether one more frame fits the budget now.
    pub(crate) fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(2.0 * self.rate);
        self.last = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_of_twice_the_rate_passes_then_frames_come_back_at_the_rate() {
        let t0 = Instant::now();
        let mut budget = FrameBudget::starting_at(20.0, t0);
        let burst = (0..100).take_while(|_| budget.take_at(t0)).count();
        assert_eq!(burst, 40, "a burst of twice the rate");
        assert!(!budget.take_at(t0), "then refused");
        // A second later, 20 more; never more than the burst, however long the pause.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).take_while(|_| budget.take_at(t1)).count(), 20);
        let later = t1 + Duration::from_secs(3600);
        assert_eq!((0..100).take_while(|_| budget.take_at(later)).count(), 40);
    }
}
