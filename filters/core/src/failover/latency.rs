//! Recent latency of one cloud, for the derived hedge delay.
//!
//! A ring of the last [`SAMPLES`] answer times (ms); a percentile is the
//! nearest-rank value over them. Fixed size, no allocation per sample, and
//! a quantile sorts at most [`SAMPLES`] words. The shim keeps one tracker
//! per cloud per worker (latency needs no cross-worker agreement) and
//! records the time to response headers of every answer below 500.

use crate::config::failover::HedgeDelay;

/// Samples kept per cloud.
pub const SAMPLES: usize = 64;
/// Fewer samples than this give no estimate.
pub const MIN_SAMPLES: usize = 16;

/// The last [`SAMPLES`] latencies of one cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyTracker {
    ring: [u32; SAMPLES],
    next: usize,
    len: usize,
}

impl Default for LatencyTracker {
    fn default() -> Self {
        LatencyTracker {
            ring: [0; SAMPLES],
            next: 0,
            len: 0,
        }
    }
}

impl LatencyTracker {
    /// Adds one answer time; values past `u32::MAX` ms are clamped.
    pub fn record(&mut self, ms: u64) {
        if let Some(slot) = self.ring.get_mut(self.next) {
            *slot = u32::try_from(ms).unwrap_or(u32::MAX);
        }
        self.next = (self.next + 1) % SAMPLES;
        self.len = (self.len + 1).min(SAMPLES);
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The nearest-rank `percentile` (1–100) of the held samples, or
    /// `None` with fewer than [`MIN_SAMPLES`].
    pub fn percentile(&self, percentile: u8) -> Option<u64> {
        if self.len < MIN_SAMPLES {
            return None;
        }
        let mut sorted = self.ring;
        let held = sorted.get_mut(..self.len)?;
        held.sort_unstable();
        // Nearest rank: ceil(p/100 · n), 1-based.
        let p = usize::from(percentile.clamp(1, 100));
        let rank = (p * self.len).div_ceil(100).max(1);
        held.get(rank - 1).map(|&v| u64::from(v))
    }
}

/// How long to wait for a cloud before hedging: the fixed delay, or the
/// cloud's recent latency at the configured percentile clamped to
/// `min_ms..=max_ms` (`max_ms` while the tracker has too few samples, so
/// a cold start hedges late rather than doubling traffic).
pub fn hedge_delay_ms(policy: &HedgeDelay, tracker: &LatencyTracker) -> u64 {
    match *policy {
        HedgeDelay::Fixed { ms } => ms,
        HedgeDelay::Derived {
            percentile,
            min_ms,
            max_ms,
        } => tracker
            .percentile(percentile)
            .map_or(max_ms, |p| p.clamp(min_ms, max_ms.max(min_ms))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(values: impl IntoIterator<Item = u64>) -> LatencyTracker {
        let mut t = LatencyTracker::default();
        for v in values {
            t.record(v);
        }
        t
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let t = filled(1..=20);
        assert_eq!(t.len(), 20);
        assert_eq!(t.percentile(50), Some(10));
        assert_eq!(t.percentile(90), Some(18));
        assert_eq!(t.percentile(95), Some(19));
        assert_eq!(t.percentile(99), Some(20));
        assert_eq!(t.percentile(100), Some(20));
        assert_eq!(t.percentile(0), Some(1), "p0 is treated as p1");
        // Order of arrival does not matter.
        assert_eq!(filled((1..=20).rev()).percentile(90), Some(18));
    }

    #[test]
    fn too_few_samples_give_no_estimate() {
        assert!(LatencyTracker::default().is_empty());
        let t = filled(1..MIN_SAMPLES as u64);
        assert_eq!(t.percentile(50), None);
        assert_eq!(filled(1..=MIN_SAMPLES as u64).percentile(100), Some(16));
    }

    #[test]
    fn old_samples_age_out() {
        // 64 slow answers, then 64 fast ones: only the fast ones count.
        let mut t = filled(std::iter::repeat_n(900, SAMPLES));
        assert_eq!(t.percentile(50), Some(900));
        for _ in 0..SAMPLES - 1 {
            t.record(10);
        }
        assert_eq!(t.percentile(100), Some(900), "one slow sample left");
        assert_eq!(t.percentile(95), Some(10));
        t.record(10);
        assert_eq!(t.percentile(99), Some(10));
        assert_eq!(t.len(), SAMPLES);
        t.record(u64::MAX);
        assert_eq!(t.percentile(100), Some(u64::from(u32::MAX)));
    }

    #[test]
    fn hedge_delay_is_fixed_or_clamped_percentile() {
        let fixed = HedgeDelay::Fixed { ms: 40 };
        let derived = HedgeDelay::Derived {
            percentile: 90,
            min_ms: 20,
            max_ms: 500,
        };
        let cold = LatencyTracker::default();
        assert_eq!(hedge_delay_ms(&fixed, &cold), 40);
        assert_eq!(hedge_delay_ms(&derived, &cold), 500, "cold start: max");
        let mid = filled((1..=20).map(|i| i * 10));
        assert_eq!(hedge_delay_ms(&derived, &mid), 180);
        assert_eq!(hedge_delay_ms(&fixed, &mid), 40);
        let fast = filled(std::iter::repeat_n(3, 20));
        assert_eq!(hedge_delay_ms(&derived, &fast), 20, "clamped up to min");
        let slow = filled(std::iter::repeat_n(9_000, 20));
        assert_eq!(hedge_delay_ms(&derived, &slow), 500, "clamped down to max");
    }
}
