//! Weights over a model's versions and the monotone bucket layout.
//!
//! Weights are basis points (1/100 of a percent) of the 10 000-bucket space.
//! Version 0 is the *baseline* (stable); versions 1..=k are canaries. Each
//! canary owns a fixed slot of the bucket space, `k` equal slots laid out
//! from bucket 0, and grows from the start of its slot:
//!
//! ```text
//!  k = 2     slot 1: [0, 5000)           slot 2: [5000, 10000)
//!  weights   canary-a [0, w_a) | stable  canary-b [5000, 5000+w_b) | stable
//! ```
//!
//! So raising a canary's weight only takes buckets from the baseline, never
//! from another canary, and lowering it only returns buckets to the
//! baseline: a key never moves from a canary back to stable while that
//! canary's weight grows, and never between canaries. The price is that a
//! canary's weight cannot exceed its slot (with two canaries, 50% each);
//! the config validator says so by name.

use crate::hash::BUCKETS;

/// Basis points; 10 000 = 100%.
pub type Bp = u32;

/// Validated weights, one per version in config order (baseline first).
/// Invariant: they sum to exactly [`BUCKETS`] and every canary weight fits
/// its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    bp: Vec<Bp>,
}

/// Why a weight vector is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsError {
    /// Fewer than two versions.
    TooFew(usize),
    /// The weights do not add up to 100%.
    Sum(Bp),
    /// Canary `index` wants more than its slot.
    SlotOverflow { index: usize, weight: Bp, slot: Bp },
}

impl Weights {
    /// Checks the invariants. `bp[0]` is the baseline.
    pub fn new(bp: Vec<Bp>) -> Result<Self, WeightsError> {
        if bp.len() < 2 {
            return Err(WeightsError::TooFew(bp.len()));
        }
        let sum: u64 = bp.iter().map(|&w| u64::from(w)).sum();
        if sum != u64::from(BUCKETS) {
            return Err(WeightsError::Sum(u32::try_from(sum).unwrap_or(u32::MAX)));
        }
        let canaries = bp.len() - 1;
        for (i, &w) in bp.iter().enumerate().skip(1) {
            let (start, end) = slot(i, canaries);
            if w > end - start {
                return Err(WeightsError::SlotOverflow {
                    index: i,
                    weight: w,
                    slot: end - start,
                });
            }
        }
        Ok(Self { bp })
    }

    /// Weights in config order.
    pub fn as_bp(&self) -> &[Bp] {
        &self.bp
    }

    /// The version index that owns `bucket` (any value; taken mod 10 000).
    pub fn pick(&self, bucket: u32) -> usize {
        let b = bucket % BUCKETS;
        let canaries = self.bp.len().saturating_sub(1);
        for (i, &w) in self.bp.iter().enumerate().skip(1) {
            let (start, _) = slot(i, canaries);
            if b >= start && b < start + w {
                return i;
            }
        }
        0
    }
}

/// Slot `[start, end)` of canary `index` (1-based) among `canaries`.
/// The last slot absorbs the remainder of an uneven division.
pub fn slot(index: usize, canaries: usize) -> (Bp, Bp) {
    let k = u32::try_from(canaries.max(1)).unwrap_or(u32::MAX);
    let i = u32::try_from(index.max(1)).unwrap_or(u32::MAX);
    let width = BUCKETS / k;
    let start = (i - 1).saturating_mul(width).min(BUCKETS);
    let end = if i >= k { BUCKETS } else { start + width };
    (start, end)
}

/// Largest weight a canary can have among `canaries` (the narrowest slot).
pub fn max_canary_weight(canaries: usize) -> Bp {
    let k = u32::try_from(canaries.max(1)).unwrap_or(u32::MAX);
    BUCKETS / k
}

#[cfg(test)]
mod tests;
