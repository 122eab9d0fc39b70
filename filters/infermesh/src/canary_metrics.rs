//! The canary filter's metrics, defined once per VM at configure time.
//!
//! Names carry Istio-style tags (see `filter_core::stats`), so Prometheus
//! sees `infermesh_canary_requests_total{model,version,decision}`.

use filter_core::canary::How;
use filter_core::config::canary::CanaryConfig;
use filter_core::guard::{Rule, State, Tally};
use filter_core::stats::canary::*;
use filter_core::stats::shadow;
use filter_core::stats::tagged;
use filter_shim::{bump, counter, gauge, histogram, set};
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
    /// Guarded splits only, `[split][version]`: the state gauge, trips
    /// per rule (`Rule::ALL` order) and outcomes (ok, error).
    guard: Vec<Vec<GuardIds>>,
    /// Mirrored splits only, `[split]`: ok, error, and skipped per
    /// `SKIP_REASONS`.
    shadow: Vec<Option<ShadowIds>>,
    unmatched: u32,
    stripped: u32,
}

const SKIP_REASONS: [&str; 3] = ["in_flight", "body_too_large", "dispatch"];
/// Why an answered copy was not compared.
pub const NOT_COMPARED_REASONS: [&str; 5] = [
    "baseline_failed",
    "baseline_unreadable",
    "no_baseline",
    "too_large",
    "backlog",
];

struct ShadowIds {
    ok: u32,
    error: u32,
    skipped: [u32; 3],
    agreements: u32,
    disagreements: u32,
    not_compared: [u32; 5],
    difference: u32,
    /// The promotion gate's gauge, if the split has one.
    held: Option<u32>,
}

#[derive(Default)]
struct GuardIds {
    state: u32,
    trips: [u32; 3],
    outcomes: [u32; 2],
}

fn rule_index(rule: Rule) -> usize {
    match rule {
        Rule::ErrorRate => 0,
        Rule::ErrorRateOverBaseline => 1,
        Rule::P99OverBaseline => 2,
    }
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
        let mut guard = Vec::with_capacity(cfg.splits.len());
        let mut shadow_ids = Vec::with_capacity(cfg.splits.len());
        for split in &cfg.splits {
            let mut ids = None;
            if let Some(sh) = &split.shadow {
                let v = split.versions.get(sh.version).map_or("", String::as_str);
                let mv = [("model", split.model.as_str()), ("version", v)];
                let mut skipped = [0u32; 3];
                for (slot, reason) in skipped.iter_mut().zip(SKIP_REASONS) {
                    *slot = counter(&tagged(
                        shadow::SKIPPED,
                        &[
                            ("model", split.model.as_str()),
                            ("version", v),
                            ("reason", reason),
                        ],
                    ))?;
                }
                let mut not_compared = [0u32; 5];
                for (slot, reason) in not_compared.iter_mut().zip(NOT_COMPARED_REASONS) {
                    *slot = counter(&tagged(
                        shadow::NOT_COMPARED,
                        &[
                            ("model", split.model.as_str()),
                            ("version", v),
                            ("reason", reason),
                        ],
                    ))?;
                }
                let gated = split.guard.as_ref().is_some_and(|g| g.promotion.is_some());
                ids = Some(ShadowIds {
                    ok: counter(&tagged(shadow::REQUESTS, &mv))?,
                    error: counter(&tagged(shadow::ERRORS, &mv))?,
                    skipped,
                    agreements: counter(&tagged(shadow::AGREEMENTS, &mv))?,
                    disagreements: counter(&tagged(shadow::DISAGREEMENTS, &mv))?,
                    not_compared,
                    difference: histogram(&tagged(shadow::DIFFERENCE, &mv))?,
                    held: if gated {
                        Some(gauge(&tagged(
                            PROMOTION_HELD,
                            &[("model", split.model.as_str())],
                        ))?)
                    } else {
                        None
                    },
                });
            }
            shadow_ids.push(ids);
            let mut ids = Vec::new();
            if split.guard.is_some() {
                for v in &split.versions {
                    let mv = [("model", split.model.as_str()), ("version", v.as_str())];
                    let tag = |k, val| {
                        [
                            ("model", split.model.as_str()),
                            ("version", v.as_str()),
                            (k, val),
                        ]
                    };
                    let mut g = GuardIds {
                        state: gauge(&tagged(GUARD_STATE, &mv))?,
                        ..GuardIds::default()
                    };
                    for rule in Rule::ALL {
                        if let Some(slot) = g.trips.get_mut(rule_index(rule)) {
                            *slot = counter(&tagged(GUARD_TRIPS, &tag("reason", rule.as_str())))?;
                        }
                    }
                    for (slot, outcome) in g.outcomes.iter_mut().zip(["ok", "error"]) {
                        *slot = counter(&tagged(GUARD_OUTCOMES, &tag("outcome", outcome)))?;
                    }
                    // A fresh VM starts normal until the shared state says
                    // otherwise.
                    set(g.state, 0);
                    ids.push(g);
                }
            }
            guard.push(ids);
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
            guard,
            shadow: shadow_ids,
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

    fn guard_ids(&self, split: usize, version: usize) -> Option<&GuardIds> {
        self.guard.get(split)?.get(version)
    }

    pub fn set_guard_state(&self, split: usize, version: usize, state: State) {
        if let Some(g) = self.guard_ids(split, version) {
            set(g.state, state.gauge());
        }
    }

    pub fn trip(&self, split: usize, version: usize, rule: Rule) {
        let id = self
            .guard_ids(split, version)
            .and_then(|g| g.trips.get(rule_index(rule)).copied());
        bump(id, 1);
    }

    /// Counts a flush's outcomes, `deltas[version]`.
    pub fn outcomes(&self, split: usize, deltas: &[Tally]) {
        for (v, d) in deltas.iter().enumerate() {
            let Some(g) = self.guard_ids(split, v) else {
                continue;
            };
            let ok = d.requests.saturating_sub(d.errors);
            if ok > 0 {
                bump(g.outcomes.first().copied(), u64::from(ok));
            }
            if d.errors > 0 {
                bump(g.outcomes.get(1).copied(), u64::from(d.errors));
            }
        }
    }

    fn shadow_ids(&self, split: usize) -> Option<&ShadowIds> {
        self.shadow.get(split)?.as_ref()
    }

    /// A copy the shadow answered (`ok`: below 500) or failed.
    pub fn shadow_answered(&self, split: usize, ok: bool) {
        if let Some(ids) = self.shadow_ids(split) {
            bump(Some(if ok { ids.ok } else { ids.error }), 1);
        }
    }

    /// A request picked for a copy that was not copied.
    pub fn shadow_skipped(&self, split: usize, reason: &str) {
        let id = self.shadow_ids(split).and_then(|ids| {
            SKIP_REASONS
                .iter()
                .position(|r| *r == reason)
                .and_then(|i| ids.skipped.get(i).copied())
        });
        bump(id, 1);
    }

    /// A compared copy: agreed or not, and the largest numeric difference.
    pub fn shadow_compared(&self, split: usize, agreed: bool, max_abs_diff: Option<f64>) {
        let Some(ids) = self.shadow_ids(split) else {
            return;
        };
        bump(
            Some(if agreed {
                ids.agreements
            } else {
                ids.disagreements
            }),
            1,
        );
        if let Some(d) = max_abs_diff {
            // Saturating float-to-int cast; NaN records 0.
            set(ids.difference, (d * 1e6).round() as u64);
        }
    }

    /// An answered copy that was not compared (`reason` one of
    /// [`NOT_COMPARED_REASONS`]).
    pub fn shadow_not_compared(&self, split: usize, reason: &str) {
        let id = self.shadow_ids(split).and_then(|ids| {
            NOT_COMPARED_REASONS
                .iter()
                .position(|r| *r == reason)
                .and_then(|i| ids.not_compared.get(i).copied())
        });
        bump(id, 1);
    }

    /// The promotion gate's gauge.
    pub fn set_promotion_held(&self, split: usize, held: bool) {
        if let Some(id) = self.shadow_ids(split).and_then(|ids| ids.held) {
            set(id, u64::from(held));
        }
    }
}
