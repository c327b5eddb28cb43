//! The generator's rate: how many fresh events are due at each tick
//! ([`Pace`]) and what it holds ([`Held`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::Control;
use crate::metrics::Metrics;

/// What the generator holds: events confirmed per second over the last
/// [`HELD_WINDOW`], for the admin API, the console and a metric, with a
/// warning once it has stayed below [`HELD_SHORT`] of the rate asked for
/// [`HELD_WARN_AFTER`] (the broker or database is slower than asked, or
/// refuses events).
pub(super) struct Held {
    /// (when, events confirmed so far), one every [`HELD_SAMPLE`].
    samples: VecDeque<(Instant, u64)>,
    achieved: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    short_since: Option<Instant>,
    warned: bool,
}

const HELD_WINDOW: Duration = Duration::from_secs(5);
const HELD_SAMPLE: Duration = Duration::from_millis(100);
const HELD_SHORT: f64 = 0.9;
const HELD_WARN_AFTER: Duration = Duration::from_secs(10);

impl Held {
    pub(super) fn new(achieved: Arc<AtomicU64>, metrics: Arc<Metrics>) -> Self {
        Held {
            samples: VecDeque::new(),
            achieved,
            metrics,
            short_since: None,
            warned: false,
        }
    }

    /// Records the count of confirmed events now; `asked` is the rate
    /// this instance should hold (0 while stopped or not the leader).
    pub(super) fn sample(&mut self, confirmed: u64, asked: f64) {
        self.sample_at(Instant::now(), confirmed, asked);
    }

    fn sample_at(&mut self, now: Instant, confirmed: u64, asked: f64) {
        if self
            .samples
            .back()
            .is_some_and(|(t, _)| now.duration_since(*t) < HELD_SAMPLE)
        {
            return;
        }
        self.samples.push_back((now, confirmed));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= HELD_WINDOW)
        {
            self.samples.pop_front();
        }
        let Some(&(since, before)) = self.samples.front() else {
            return;
        };
        let secs = now.duration_since(since).as_secs_f64();
        let rate = if secs > 0.0 {
            confirmed.saturating_sub(before) as f64 / secs
        } else {
            0.0
        };
        self.achieved.store(rate.to_bits(), Ordering::Relaxed);
        self.metrics.generator_asked_rate.set(asked);
        self.metrics.generator_achieved_rate.set(rate);
        // Judged only over a whole window: a start or a change of rate is
        // not a shortfall.
        let judged = secs >= HELD_WINDOW.as_secs_f64() * 0.9;
        if asked > 0.0 && judged && rate < HELD_SHORT * asked {
            let since = *self.short_since.get_or_insert(now);
            if !self.warned && now.duration_since(since) >= HELD_WARN_AFTER {
                self.warned = true;
                tracing::warn!(
                    asked,
                    achieved = rate.round(),
                    "the generator holds less than the rate asked"
                );
            }
        } else if asked == 0.0 || rate >= HELD_SHORT * asked {
            if self.warned {
                tracing::info!(
                    asked,
                    achieved = rate.round(),
                    "the generator holds the rate asked again"
                );
            }
            self.short_since = None;
            self.warned = false;
        }
    }

    #[cfg(test)]
    fn achieved(&self) -> f64 {
        f64::from_bits(AtomicU64::load(&self.achieved, Ordering::Relaxed))
    }
}

/// How many fresh events are due at each tick: the set rate, with at most
/// one second's worth made up after a pause, and none while the generator
/// is stopped or may not make any.
#[derive(Debug, Default)]
pub(super) struct Pace {
    budget: f64,
    last: Option<tokio::time::Instant>,
}

impl Pace {
    /// On a new connection: the time before it is not made up for.
    pub(super) fn restart(&mut self) {
        self.last = Some(tokio::time::Instant::now());
    }

    pub(super) fn reset(&mut self) {
        self.budget = 0.0;
    }

    /// Events due now, at most `room`. `may` is false while this instance
    /// is not the leader or refused events wait.
    pub(super) fn due(&mut self, c: Control, may: bool, room: usize) -> usize {
        self.due_at(tokio::time::Instant::now(), c, may, room)
    }

    fn due_at(&mut self, now: tokio::time::Instant, c: Control, may: bool, room: usize) -> usize {
        let elapsed = self.last.map_or(0.0, |l| now.duration_since(l).as_secs_f64());
        self.last = Some(now);
        if !c.running || c.rate <= 0.0 || !may {
            self.budget = 0.0;
            return 0;
        }
        self.budget = (self.budget + c.rate * elapsed).min(c.rate.max(1.0));
        let n = (self.budget.floor() as usize).min(room);
        self.budget -= n as f64;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_keeps_the_rate_makes_up_at_most_a_second_and_nothing_while_it_may_not() {
        let on = Control {
            running: true,
            rate: 100.0,
        };
        let t0 = tokio::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut pace = Pace {
            last: Some(t0),
            ..Pace::default()
        };
        // 10 ms ticks at 100/s: one a tick, 100 a second.
        let made: usize = (1..=100).map(|i| pace.due_at(at(i * 10), on, true, 1000)).sum();
        assert_eq!(made, 100);
        // Five seconds without a tick: one second's worth, within the room.
        assert_eq!(pace.due_at(at(6000), on, true, 1000), 100);
        assert_eq!(pace.due_at(at(7000), on, true, 40), 40, "at most the room");
        // Not the leader (or refused events waiting): none, and none saved up.
        assert_eq!(pace.due_at(at(8000), on, false, 1000), 0);
        assert_eq!(pace.due_at(at(8010), on, true, 1000), 1);
        let off = Control { running: false, ..on };
        assert_eq!(pace.due_at(at(9000), off, true, 1000), 0);
    }

    #[test]
    fn held_is_the_confirmed_rate_and_warns_only_after_a_sustained_shortfall() {
        let metrics = Metrics::new();
        let mut held = Held::new(Arc::new(AtomicU64::new(0)), metrics.clone());
        let t0 = Instant::now();
        let mut confirmed = 0;
        // 500 events/s confirmed, 100 ms apart; `asked` for `secs` from `from`.
        let mut run = |held: &mut Held, from: u64, secs: u64, asked: f64| {
            for step in 0..secs * 10 {
                confirmed += 50;
                held.sample_at(t0 + Duration::from_millis((from * 10 + step) * 100), confirmed, asked);
            }
        };
        run(&mut held, 0, 10, 500.0);
        assert!((held.achieved() - 500.0).abs() < 1.0, "{}", held.achieved());
        assert_eq!(metrics.generator_achieved_rate.get(), held.achieved());
        assert!(!held.warned, "holds what is asked");
        // Asked twice as much: short, but warned only after 10 s of it.
        run(&mut held, 10, 9, 1000.0);
        assert!(!held.warned, "not yet: a shortfall of 9 s");
        run(&mut held, 19, 3, 1000.0);
        assert!(held.warned, "a shortfall of 12 s");
        assert_eq!(metrics.generator_asked_rate.get(), 1000.0);
        // Stopped (or running elsewhere): nothing is asked, nothing short.
        run(&mut held, 22, 1, 0.0);
        assert!(!held.warned && held.short_since.is_none());
    }
}
