//! Waiting on observable state with a deadline, instead of sleeping for a guessed time: a
//! test goes on as soon as what it needs has happened, and a wait that runs out panics
//! naming what never came rather than leaving a later assertion to fail for a short sleep.
//!
//! [`eventually`] (async) and [`wait_until`] (blocking) poll a condition and panic when the
//! deadline passes. [`observe_until`] returns the last observation instead, for the caller
//! to assert on with the figures it saw in the message. [`Poll`] sets another interval.

use std::time::{Duration, Instant};

/// How often a condition is checked unless a [`Poll`] says otherwise: short next to the
/// seconds the waits allow, and light on a two-core machine running several services.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// How long to keep checking, and how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    within: Duration,
    every: Duration,
}

impl Poll {
    /// Checks for up to `within`, every [`DEFAULT_INTERVAL`].
    pub const fn within(within: Duration) -> Self {
        Self { within, every: DEFAULT_INTERVAL }
    }

    /// Checks every `every` instead: where the moment the condition is seen matters (a
    /// crash injected once a share of a fast stream is through, a clock started).
    pub const fn every(self, every: Duration) -> Self {
        Self { every, ..self }
    }

    /// Returns once `check` holds; panics naming `what` when it has not within the limit.
    pub async fn until(self, what: &str, mut check: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + self.within;
        while !check().await {
            if Instant::now() >= deadline {
                self.timed_out(what);
            }
            tokio::time::sleep(self.every).await;
        }
    }

    /// [`Poll::until`] for a blocking `check`, off any async runtime.
    pub fn until_blocking(self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + self.within;
        while !check() {
            if Instant::now() >= deadline {
                self.timed_out(what);
            }
            std::thread::sleep(self.every);
        }
    }

    /// Observes until `done` holds for what `observe` returned, and returns that; when the
    /// limit passes first, returns the last observation (no panic: the caller's assertion
    /// says what was wrong with it).
    pub async fn observe<T>(self, mut observe: impl AsyncFnMut() -> T, mut done: impl FnMut(&T) -> bool) -> T {
        let deadline = Instant::now() + self.within;
        loop {
            let seen = observe().await;
            if done(&seen) || Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(self.every).await;
        }
    }

    /// [`Poll::observe`] for a blocking `observe`, off any async runtime.
    pub fn observe_blocking<T>(self, mut observe: impl FnMut() -> T, mut done: impl FnMut(&T) -> bool) -> T {
        let deadline = Instant::now() + self.within;
        loop {
            let seen = observe();
            if done(&seen) || Instant::now() >= deadline {
                return seen;
            }
            std::thread::sleep(self.every);
        }
    }

    fn timed_out(self, what: &str) -> ! {
        panic!("timed out after {:?} waiting for {what}", self.within)
    }
}

/// Returns once `check` holds, checking every [`DEFAULT_INTERVAL`]; panics naming `what`
/// when it has not within `within`.
pub async fn eventually(within: Duration, what: &str, check: impl AsyncFnMut() -> bool) {
    Poll::within(within).until(what, check).await;
}

/// [`eventually`] for a blocking `check`.
pub fn wait_until(within: Duration, what: &str, check: impl FnMut() -> bool) {
    Poll::within(within).until_blocking(what, check);
}

/// The first observation `done` accepts, or the last one when `within` passes first: see
/// [`Poll::observe`].
pub async fn observe_until<T>(within: Duration, observe: impl AsyncFnMut() -> T, done: impl FnMut(&T) -> bool) -> T {
    Poll::within(within).observe(observe, done).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn eventually_returns_once_the_condition_holds() {
        let mut checks = 0;
        eventually(Duration::from_secs(5), "the third check", async || {
            checks += 1;
            checks == 3
        })
        .await;
        assert_eq!(checks, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for a condition that never holds")]
    async fn eventually_panics_naming_what_it_waited_for() {
        eventually(Duration::from_millis(20), "a condition that never holds", async || false).await;
    }

    #[test]
    fn wait_until_polls_a_blocking_condition() {
        let mut checks = 0;
        Poll::within(Duration::from_secs(5)).every(SHORT).until_blocking("the second check", || {
            checks += 1;
            checks == 2
        });
        assert_eq!(checks, 2);
    }

    #[test]
    #[should_panic(expected = "timed out after 20ms waiting for nothing")]
    fn wait_until_panics_after_its_limit() {
        wait_until(Duration::from_millis(20), "nothing", || false);
    }

    #[tokio::test]
    async fn observe_until_returns_the_accepted_observation_or_the_last_one() {
        let mut count = 0;
        let seen = observe_until(
            Duration::from_secs(5),
            async || {
                count += 1;
                count
            },
            |n| *n >= 4,
        )
        .await;
        assert_eq!(seen, 4);
        let last = Poll::within(Duration::from_millis(20)).every(SHORT).observe(async || 7, |n| *n > 7).await;
        assert_eq!(last, 7, "the last observation when none was accepted");
    }
}
