//! How every service waits between attempts: exponential backoff with jitter, so that the
//! partition workers of a processor, the connections of a simulated fleet or the replicas
//! of a service that all saw the same failure do not retry in lockstep.
//!
//! The schedule comes from `backon` (a maintained crate): each wait is the previous one
//! doubled, up to a cap, plus a random part of up to itself. [`Backoff::reset`] starts over
//! after a success.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

/// The waits between attempts of one retry loop.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    schedule: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Waits from `first` (doubling each time) up to `max`, each with jitter.
    pub fn new(first: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(first)
            .with_max_delay(max.max(first))
            .without_max_times();
        Self { builder, schedule: builder.build(), max: max.max(first) }
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // The schedule has no end (`without_max_times`); the cap stands in if it ever did.
        self.schedule.next().unwrap_or(self.max)
    }

    /// Waits before the next attempt.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// After a success: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.schedule = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter_and_start_over_after_a_reset() {
        let (first, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut backoff = Backoff::new(first, max);
        let waits: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        // Each wait is its step's delay plus a jitter of up to that delay again.
        let steps = [100, 200, 400, 800, 1000, 1000, 1000, 1000].map(Duration::from_millis);
        for (wait, step) in waits.iter().zip(steps) {
            assert!(*wait >= step && *wait <= step * 2, "{waits:?}");
        }
        backoff.reset();
        let again = backoff.next_delay();
        assert!(again >= first && again <= first * 2, "{again:?}");
    }

    #[test]
    fn two_loops_do_not_wait_in_lockstep() {
        let schedule = || {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
            (0..6).map(|_| backoff.next_delay()).collect::<Vec<_>>()
        };
        assert_ne!(schedule(), schedule(), "two retry loops drew the same jittered waits");
    }
}
