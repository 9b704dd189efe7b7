//! When to try a delivery again: exponential back-off with full jitter,
//! and when to give an event up.
//!
//! After the n-th failed attempt in a row the endpoint waits a random time
//! in `[0, min(backoff_max, backoff_min × 2^(n-1))]` ("full jitter"): the
//! ceiling doubles per failure, and the randomness spreads the retries of
//! many gateways whose shared receiver came back at once. A success resets
//! the count. An event older than `max_age` is dropped rather than tried
//! again. Pure functions of their inputs (the random draw is passed in),
//! so they are tested without clocks.

use std::time::Duration;

/// The retry policy of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Ceiling of the first back-off.
    pub backoff_min: Duration,
    /// Largest ceiling.
    pub backoff_max: Duration,
    /// Age (since the event happened) after which it is dropped.
    pub max_age: Duration,
}

impl RetryPolicy {
    /// The ceiling of the wait after `failures` failed attempts in a row
    /// (at least 1).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(32);
        self.backoff_min.saturating_mul(1u32 << doublings.min(31)).min(self.backoff_max)
    }

    /// The wait after `failures` failed attempts in a row, for a uniform
    /// draw `unit` in `[0, 1)`.
    pub fn backoff(&self, failures: u32, unit: f64) -> Duration {
        let unit = if unit.is_nan() { 0.0 } else { unit.clamp(0.0, 1.0) };
        self.ceiling(failures).mul_f64(unit)
    }

    /// Whether an event that happened at `event_ms` is too old to try at
    /// `now_ms`.
    pub fn expired(&self, event_ms: i64, now_ms: i64) -> bool {
        now_ms.saturating_sub(event_ms) > self.max_age.as_millis().min(i64::MAX as u128) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_age: Duration::from_secs(3600),
        }
    }

    #[test]
    fn the_ceiling_doubles_per_failure_up_to_the_maximum() {
        let p = policy();
        let ceilings: Vec<u64> = (1..=9).map(|n| p.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(p.ceiling(0), Duration::from_secs(1), "no failure counts as the first");
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(60), "no overflow");
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let p = policy();
        assert_eq!(p.backoff(4, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(4, 0.5), Duration::from_secs(4));
        assert!(p.backoff(4, 0.999_999) < Duration::from_secs(8));
        assert_eq!(p.backoff(4, 7.0), Duration::from_secs(8), "an out-of-range draw is clamped");
        assert_eq!(p.backoff(4, f64::NAN), Duration::ZERO);
    }

    #[test]
    fn events_expire_after_max_age() {
        let p = policy();
        assert!(!p.expired(0, 3_600_000));
        assert!(p.expired(0, 3_600_001));
        assert!(!p.expired(i64::MAX, i64::MIN), "a clock gone backwards expires nothing");
    }
}
