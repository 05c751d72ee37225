//! Exponential backoff with jitter, for reconnects, OVERLOADED and upload
//! retries.
//!
//! Attempt `n` waits a random duration in `[cap/2, cap]` where
//! `cap = min(max, min · 2ⁿ)` ("equal jitter"): never less than half the
//! nominal delay, so a crowd of clients spreads out without any of them
//! hammering the server, and never more than `max`.

use std::time::Duration;

/// Backoff state for one kind of retry.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    /// The first delay's cap.
    min: Duration,
    /// The largest delay.
    max: Duration,
    /// Attempts since the last [`Backoff::reset`].
    attempt: u32,
}

impl Backoff {
    /// Delays from about `min` up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min: min.max(Duration::from_millis(1)),
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        let cap = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        let jitter = rand::random_range(0..=half.as_micros() as u64);
        half + Duration::from_micros(jitter)
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(3));
        let mut b = Backoff::new(min, max);
        let mut caps = Vec::new();
        for n in 0..10u32 {
            let cap = (min * 2u32.pow(n)).min(max);
            let d = b.next_delay();
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {n}: {d:?} vs cap {cap:?}"
            );
            caps.push(cap);
        }
        assert_eq!(*caps.last().unwrap(), max);
        b.reset();
        assert!(b.next_delay() <= min);
        // Jitter: 50 first delays are not all equal.
        let delays: std::collections::HashSet<_> = (0..50)
            .map(|_| {
                let mut b = Backoff::new(min, max);
                b.next_delay()
            })
            .collect();
        assert!(delays.len() > 1);
    }
}
