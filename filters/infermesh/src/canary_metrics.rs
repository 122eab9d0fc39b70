//! The canary filter's metrics, defined once per VM at configure time.
//!
//! Names carry Istio-style tags (see `filter_core::stats`), so Prometheus
//! sees `infermesh_canary_requests_total{model,version,decision}`.

use filter_core::canary::How;
use filter_core::config::canary::CanaryConfig;
use filter_core::stats::canary::*;
use filter_core::stats::tagged;
use filter_shim::{bump, counter, gauge, set};
use proxy_wasm::types::Status;

/// Decisions per version: keyed, unkeyed, override (the `How` values) and
/// pinned.
const DECISIONS: usize = 4;
const PINNED: usize = 3;

pub struct Metrics {
    /// `[split][version][decision]`.
    requests: Vec<Vec<[u32; DECISIONS]>>,
    /// `[split][version]` gauges.
    weights: Vec<Vec<u32>>,
    override_rejected: Vec<u32>,
    unmatched: u32,
    stripped: u32,
}

fn how_index(how: How) -> usize {
    match how {
        How::Keyed => 0,
        How::Unkeyed => 1,
        How::Override => 2,
    }
}

impl Metrics {
    pub fn define(cfg: &CanaryConfig) -> Result<Self, Status> {
        let mut requests = Vec::with_capacity(cfg.splits.len());
        let mut weights = Vec::with_capacity(cfg.splits.len());
        let mut override_rejected = Vec::with_capacity(cfg.splits.len());
        for split in &cfg.splits {
            let mut per_version = Vec::with_capacity(split.versions.len());
            let mut gauges = Vec::with_capacity(split.versions.len());
            for v in &split.versions {
                let tags = |decision| {
                    [
                        ("model", split.model.as_str()),
                        ("version", v.as_str()),
                        ("decision", decision),
                    ]
                };
                let mut ids = [0u32; DECISIONS];
                for how in How::ALL {
                    if let Some(slot) = ids.get_mut(how_index(how)) {
                        *slot = counter(&tagged(REQUESTS, &tags(how.as_str())))?;
                    }
                }
                if let Some(slot) = ids.get_mut(PINNED) {
                    *slot = counter(&tagged(REQUESTS, &tags("pinned")))?;
                }
                per_version.push(ids);
                gauges.push(gauge(&tagged(
                    WEIGHT,
                    &[("model", split.model.as_str()), ("version", v.as_str())],
                ))?);
            }
            requests.push(per_version);
            weights.push(gauges);
            override_rejected.push(counter(&tagged(
                OVERRIDE_REJECTED,
                &[("model", split.model.as_str())],
            ))?);
        }
        Ok(Self {
            requests,
            weights,
            override_rejected,
            unmatched: counter(UNMATCHED)?,
            stripped: counter(STRIPPED)?,
        })
    }

    fn request_id(&self, split: usize, version: usize, decision: usize) -> Option<u32> {
        self.requests
            .get(split)?
            .get(version)?
            .get(decision)
            .copied()
    }

    pub fn routed(&self, split: usize, version: usize, how: How) {
        bump(self.request_id(split, version, how_index(how)), 1);
    }

    pub fn pinned(&self, split: usize, version: Option<usize>) {
        if let Some(v) = version {
            bump(self.request_id(split, v, PINNED), 1);
        }
    }

    pub fn override_rejected(&self, split: usize) {
        bump(self.override_rejected.get(split).copied(), 1);
    }

    pub fn unmatched(&self) {
        bump(Some(self.unmatched), 1);
    }

    pub fn stripped(&self, n: usize) {
        if n > 0 {
            bump(Some(self.stripped), n as u64);
        }
    }

    pub fn set_weights(&self, split: usize, bp: &[u32]) {
        let Some(ids) = self.weights.get(split) else {
            return;
        };
        for (id, w) in ids.iter().zip(bp) {
            set(*id, u64::from(*w));
        }
    }
}
