//! The canary stage: the host side of `filter_core::canary`.
//!
//! Reads host facts (headers from the request copy, time, a random word),
//! asks the core, and writes the decision as `x-infermesh-version`. All
//! logic and every invariant live in `filter-core`.

use std::cell::Cell;

use filter_core::canary::{self, Decision, How, Request};
use filter_core::config::canary::CanaryConfig;
use filter_core::hash::fmix64;
use filter_core::headers;
use log::{debug, info};
use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::Status;

use crate::canary_metrics::Metrics;
use crate::request::RequestHeaders;

/// The stage, configured once per VM.
pub struct Canary {
    pub cfg: CanaryConfig,
    /// `x-infermesh-served-by` values, `[split][version]`, built once so a
    /// request does not format one.
    served_by: Vec<Vec<String>>,
    pub metrics: Metrics,
    /// splitmix64 state for requests without a sticky key.
    rng: Cell<u64>,
    /// Any split steps on a schedule (then decisions need the clock).
    has_schedule: bool,
}

impl Canary {
    /// `seed` seeds unkeyed picks; no fairness depends on it beyond a
    /// uniform spread.
    pub fn new(cfg: CanaryConfig, seed: u64) -> Result<Canary, Status> {
        let metrics = Metrics::define(&cfg)?;
        let served_by = cfg
            .splits
            .iter()
            .map(|s| {
                s.versions
                    .iter()
                    .map(|v| format!("{}/{v}", s.model))
                    .collect()
            })
            .collect();
        info!(
            "infermesh: canary stage: {} split(s): {}",
            cfg.splits.len(),
            cfg.splits
                .iter()
                .map(|s| s.model.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Canary {
            has_schedule: cfg.splits.iter().any(|s| s.schedule.is_some()),
            served_by,
            cfg,
            metrics,
            rng: Cell::new(fmix64(seed)),
        })
    }

    pub fn served_by(&self, split: usize, version: usize) -> Option<&str> {
        self.served_by
            .get(split)
            .and_then(|r| r.get(version))
            .map(String::as_str)
    }

    fn random(&self) -> u64 {
        let s = self.rng.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.rng.set(s);
        fmix64(s)
    }

    /// Decides the version and writes it; returns `(split, version)` for
    /// the response's served-by. `now_ms` is only read by schedules.
    /// `x-infermesh-model` and `-version` in `hdrs` are trusted: client
    /// copies were stripped unless every stage trusts them, and the
    /// router stage's decision is what remains.
    pub fn decide(
        &self,
        ctx: &dyn HttpContext,
        hdrs: &mut RequestHeaders,
        now_ms: impl FnOnce() -> u64,
    ) -> Option<(usize, usize)> {
        let cfg = &self.cfg;
        let now = if self.has_schedule { now_ms() } else { 0 };
        let sticky_key = canary::sticky_key(&cfg.sticky_key, |h| hdrs.get(h).map(<[u8]>::to_vec));
        let req = Request {
            path: hdrs.get(":path").unwrap_or_default(),
            trusted_model: hdrs.get(headers::MODEL),
            trusted_version: hdrs.get(headers::VERSION),
            override_version: cfg.override_header.as_deref().and_then(|h| hdrs.get(h)),
            sticky_key: sticky_key.as_deref(),
        };
        let decision = canary::decide(cfg, &req, now, self.random());
        let (split, version) = match decision {
            Decision::Unmatched => {
                self.metrics.unmatched();
                return None;
            }
            Decision::Pinned { split, version } => {
                self.metrics.pinned(split, version);
                (split, version?)
            }
            Decision::Split {
                split,
                version,
                how,
                override_rejected,
            } => {
                if override_rejected {
                    self.metrics.override_rejected(split);
                    debug!("infermesh canary: override names a version the split does not list; ignored");
                }
                self.metrics.routed(split, version, how);
                if how == How::Override {
                    debug!("infermesh canary: override to version index {version}");
                }
                (split, version)
            }
        };
        let name = cfg.splits.get(split)?.versions.get(version)?;
        if hdrs.get(headers::VERSION) != Some(name.as_bytes()) {
            hdrs.set(ctx, headers::VERSION, name);
        }
        Some((split, version))
    }

    /// Publishes the weights in force as gauges and logs schedule steps
    /// once; `steps` is the root's memory of the active step per split.
    pub fn refresh_weights(&self, now_ms: u64, steps: &mut Vec<Option<usize>>) {
        steps.resize(self.cfg.splits.len(), None);
        for (i, split) in self.cfg.splits.iter().enumerate() {
            let weights = split.weights_at(now_ms);
            self.metrics.set_weights(i, weights.as_bp());
            let step = split
                .schedule
                .as_ref()
                .and_then(|s| s.active(now_ms))
                .map(|(n, _)| n);
            if let Some(seen) = steps.get_mut(i) {
                if *seen != step {
                    if let Some(n) = step {
                        info!(
                            "infermesh canary: model {} entered schedule step {n}: weights {:?} (bp)",
                            split.model,
                            weights.as_bp()
                        );
                    }
                    *seen = step;
                }
            }
        }
    }
}
