//! Reconnect delays: exponential backoff with full jitter, first retry immediate.
//!
//! Full jitter (a uniform delay between zero and the exponential ceiling) spreads a fleet
//! of agents that lost the same dispatcher at the same moment over the whole window, so
//! they do not return as a thundering herd; the first retry is immediate because most
//! disconnects are one-off (a dispatcher restart, a load balancer closing an idle stream).

use std::time::Duration;

use rand::Rng;

/// Delays between reconnect attempts. Retry 0 is immediate; retry `n ≥ 1` waits a uniform
/// random time in `[0, min(cap, base · 2^(n-1))]`.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// Retries handed out since the last reset.
    retries: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            retries: 0,
        }
    }

    /// The largest delay retry `retry` may get.
    pub fn ceiling(&self, retry: u32) -> Duration {
        if retry == 0 {
            return Duration::ZERO;
        }
        // 2^(retry-1), saturating long before u32 overflows: the cap wins anyway.
        let factor = 1u32.checked_shl(retry - 1).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt, drawn from `rng`.
    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(self.retries);
        self.retries = self.retries.saturating_add(1);
        if ceiling.is_zero() {
            return Duration::ZERO;
        }
        let ms = rng.random_range(0..=ceiling.as_millis() as u64);
        Duration::from_millis(ms)
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    /// The cap itself, for failures that no quick retry can fix (a rejected credential):
    /// keep trying, since an operator may fix it, but slowly.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// Starts over after a healthy connection: the next retry is immediate again.
    pub fn reset(&mut self) {
        self.retries = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_millis(10_000))
    }

    #[test]
    fn first_retry_is_immediate_and_again_after_reset() {
        let mut b = backoff();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(b.next_delay_with(&mut rng), Duration::ZERO);
        b.next_delay_with(&mut rng);
        b.next_delay_with(&mut rng);
        b.reset();
        assert_eq!(b.next_delay_with(&mut rng), Duration::ZERO);
    }

    #[test]
    fn ceilings_double_from_base_up_to_the_cap() {
        let b = backoff();
        let ms: Vec<u128> = (0..10).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(
            ms,
            [0, 100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
        );
        assert_eq!(b.ceiling(u32::MAX), Duration::from_millis(10_000));
    }

    #[test]
    fn delays_are_full_jitter_within_the_ceiling() {
        // Many seeds and retries: every delay lies in [0, ceiling], and the draws use the
        // whole range (some land in the lower and some in the upper half), which a
        // "ceiling plus small jitter" scheme would not.
        let mut low = 0;
        let mut high = 0;
        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut b = backoff();
            for retry in 0..12 {
                let ceiling = b.ceiling(retry);
                let delay = b.next_delay_with(&mut rng);
                assert!(delay <= ceiling, "retry {retry}: {delay:?} > {ceiling:?}");
                if retry >= 1 {
                    if delay < ceiling / 2 {
                        low += 1;
                    } else {
                        high += 1;
                    }
                }
            }
        }
        assert!(low > 0 && high > 0, "low {low}, high {high}");
    }

    #[test]
    fn cap_below_base_is_raised_to_base() {
        let b = Backoff::new(Duration::from_millis(500), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(500));
        assert_eq!(b.cap(), Duration::from_millis(500));
    }
}
