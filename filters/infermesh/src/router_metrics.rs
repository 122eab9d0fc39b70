//! The model-router's metrics, defined once per VM at configure time.

use filter_core::config::router::RouterConfig;
use filter_core::router::{BodyFallback, Miss, Source};
use filter_core::stats::router::*;
use filter_core::stats::tagged;
use filter_shim::{bump, counter};
use proxy_wasm::types::Status;

/// Tag value for requests that name no version (the canary picks one).
pub const UNPINNED: &str = "unpinned";

pub struct Metrics {
    /// `[model][version or versions.len() for unpinned][source]`.
    requests: Vec<Vec<[u32; 4]>>,
    rejected: [u32; 3],
    passed: [u32; 3],
    body_fallback: [u32; BodyFallback::ALL.len()],
    stripped: u32,
}

fn source_index(s: Source) -> usize {
    match s {
        Source::Path => 0,
        Source::Header => 1,
        Source::Body => 2,
        Source::Default => 3,
    }
}

fn miss_index(m: Miss) -> usize {
    match m {
        Miss::UnknownModel => 0,
        Miss::UnknownVersion => 1,
        Miss::NotOip => 2,
    }
}

fn fallback_index(f: BodyFallback) -> usize {
    match f {
        BodyFallback::TooLarge => 0,
        BodyFallback::InvalidJson => 1,
        BodyFallback::MissingField => 2,
        BodyFallback::WrongType => 3,
        BodyFallback::NotDelivered => 4,
    }
}

impl Metrics {
    pub fn define(cfg: &RouterConfig) -> Result<Self, Status> {
        let mut requests = Vec::with_capacity(cfg.models.len());
        for m in &cfg.models {
            let versions = m.versions.iter().map(String::as_str).chain([UNPINNED]);
            let mut per_version = Vec::with_capacity(m.versions.len() + 1);
            for v in versions {
                let mut ids = [0u32; 4];
                for (slot, s) in ids.iter_mut().zip(Source::ALL) {
                    *slot = counter(&tagged(
                        REQUESTS,
                        &[
                            ("model", m.name.as_str()),
                            ("version", v),
                            ("source", s.as_str()),
                        ],
                    ))?;
                }
                per_version.push(ids);
            }
            requests.push(per_version);
        }
        let mut rejected = [0u32; 3];
        let mut passed = [0u32; 3];
        for ((r, p), miss) in rejected.iter_mut().zip(passed.iter_mut()).zip(Miss::ALL) {
            *r = counter(&tagged(REJECTED, &[("reason", miss.as_str())]))?;
            *p = counter(&tagged(PASSED, &[("reason", miss.as_str())]))?;
        }
        let mut body_fallback = [0u32; BodyFallback::ALL.len()];
        for (slot, f) in body_fallback.iter_mut().zip(BodyFallback::ALL) {
            *slot = counter(&tagged(BODY_FALLBACK, &[("reason", f.as_str())]))?;
        }
        Ok(Self {
            requests,
            rejected,
            passed,
            body_fallback,
            stripped: counter(STRIPPED)?,
        })
    }

    pub fn routed(&self, model: usize, version: Option<usize>, source: Source) {
        let per_model = self.requests.get(model);
        let row = match version {
            Some(v) => per_model.and_then(|m| m.get(v)),
            None => per_model.and_then(|m| m.last()),
        };
        bump(row.and_then(|r| r.get(source_index(source))).copied(), 1);
    }

    pub fn rejected(&self, miss: Miss) {
        bump(self.rejected.get(miss_index(miss)).copied(), 1);
    }

    pub fn passed(&self, miss: Miss) {
        bump(self.passed.get(miss_index(miss)).copied(), 1);
    }

    pub fn body_fallback(&self, f: BodyFallback) {
        bump(self.body_fallback.get(fallback_index(f)).copied(), 1);
    }

    pub fn stripped(&self, n: usize) {
        if n > 0 {
            bump(Some(self.stripped), n as u64);
        }
    }
}
