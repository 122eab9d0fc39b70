//! The canary stage: the host side of `filter_core::canary`.
//!
//! Reads host facts (headers from the request copy, time, a random word),
//! asks the core, and writes the decision as `x-infermesh-version`. All
//! logic and every invariant live in `filter-core`.
//!
//! **Guard.** For a split with a guard, a request routed to one of its
//! versions is watched ([`Watch`]): its outcome (5xx or reset, and the
//! time to response headers) goes into this VM's pending tally, with no
//! host call beyond the clock. The root's tick adds the pending tallies
//! to the split's shared [`Record`] (one compare-and-swap per split per
//! flush), steps the rules, and reads back the state every worker
//! shares; the weights a tripped or probed canary routes on are cached
//! here, so a request pays one borrow, not a shared-data read.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;

use filter_core::canary::{self, Decision, How, Request};
use filter_core::config::canary::{CanaryConfig, Guard, GuardAction};
use filter_core::guard::{self, Agreement, GateChange, Record, State, Tally, Transition};
use filter_core::hash::fmix64;
use filter_core::headers;
use filter_core::shadow;
use filter_core::shadow::compare::{self, Verdict};
use filter_core::weights::Weights;
use log::{debug, info, warn};
use proxy_wasm::hostcalls;
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
    /// Per split: its guard's host state, if it has a guard.
    guards: Vec<Option<Guarded>>,
    /// Per split: the weights a guard put in force (empty: no guards).
    effective: RefCell<Vec<Option<Weights>>>,
    /// When the guards last flushed.
    flushed_at_ms: Cell<u64>,
    /// The root context, which owns the shadow copies' callouts (a
    /// stream's callouts end with the stream).
    root_id: u32,
    /// The copy the last decision started, for the stream to take.
    started_copy: RefCell<Option<Copy>>,
    /// Complete copies waiting for the root's tick to send them: a
    /// callout made in a stream's callback belongs to the stream, and its
    /// answer is lost when the stream ends first.
    queued: RefCell<Vec<Copy>>,
    /// Copies in flight: callout token -> (split, pair).
    copies: RefCell<HashMap<u32, (usize, Option<u64>)>>,
    /// Answers of mirrored requests waiting for the other side, by pair
    /// id: the client's (from the stream) and the candidate's (from the
    /// callout).
    pairs: RefCell<HashMap<u64, Pair>>,
    next_pair: Cell<u64>,
    /// Any split mirrors (then the root must tick).
    has_shadow: bool,
}

/// How often the root sends queued shadow copies: the most a copy waits.
pub const SHADOW_TICK_MS: u64 = 20;

/// A request being copied to its split's shadow version: the request
/// headers as they went upstream and the body so far.
pub struct Copy {
    split: usize,
    /// The pair its answer is compared in, if the comparison has room.
    pair: Option<u64>,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    too_large: bool,
}

/// An answer: status and body (`None`: over the size limit).
struct Answer {
    status: u32,
    body: Option<Vec<u8>>,
}

/// A mirrored request's two answers, as they come.
struct Pair {
    split: usize,
    started_ms: u64,
    baseline: Option<Answer>,
    candidate: Option<Answer>,
    /// The client's stream ended without a complete answer.
    lost: bool,
}

/// The client's answer to a mirrored request, as the stream sees it.
pub struct Capture {
    pair: u64,
    /// The split's `max_body_bytes`: a longer answer is not compared.
    limit: usize,
    status: u32,
    body: Vec<u8>,
    too_large: bool,
}

/// Pairs per in-flight copy allowed before new copies go uncompared.
const PAIRS_PER_COPY: usize = 4;
/// How long after a copy's timeout a pair waits for the client's answer.
const PAIR_GRACE_MS: u64 = 10_000;

/// How often the guards flush this VM's outcomes and read the shared
/// state: the bound on how stale a VM's view of a trip is.
pub const GUARD_FLUSH_MS: u64 = 50;
/// Compare-and-swap attempts per flush; a flush that loses them all keeps
/// its outcomes for the next one.
const CAS_TRIES: usize = 8;

/// A guarded split's host side.
struct Guarded {
    key: String,
    fingerprint: u32,
    /// Outcomes of this VM not yet in shared data, per version.
    pending: RefCell<Vec<Tally>>,
    /// Shadow comparisons of this VM not yet in shared data.
    agreement: Cell<Agreement>,
    /// The promotion gate as this VM last saw it.
    held: Cell<bool>,
    /// The states as this VM last saw them, per version.
    states: RefCell<Vec<State>>,
}

/// A request routed to a guarded split's version: what its outcome is
/// recorded against.
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    split: usize,
    version: usize,
    sent_at_ms: u64,
}

impl Canary {
    /// `seed` seeds unkeyed picks; no fairness depends on it beyond a
    /// uniform spread.
    pub fn new(cfg: CanaryConfig, seed: u64, root_id: u32) -> Result<Canary, Status> {
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
        let guards: Vec<Option<Guarded>> = cfg
            .splits
            .iter()
            .map(|s| {
                s.guard.as_ref().map(|_| Guarded {
                    key: guard::shared_key(&s.model),
                    fingerprint: guard::fingerprint(s),
                    pending: RefCell::new(vec![Tally::default(); s.versions.len()]),
                    agreement: Cell::new(Agreement::default()),
                    held: Cell::new(false),
                    states: RefCell::new(vec![State::Normal; s.versions.len()]),
                })
            })
            .collect();
        let effective = if guards.iter().any(Option::is_some) {
            vec![None; cfg.splits.len()]
        } else {
            Vec::new()
        };
        Ok(Canary {
            has_schedule: cfg.splits.iter().any(|s| s.schedule.is_some()),
            guards,
            effective: RefCell::new(effective),
            flushed_at_ms: Cell::new(0),
            root_id,
            started_copy: RefCell::new(None),
            queued: RefCell::new(Vec::new()),
            copies: RefCell::new(HashMap::new()),
            pairs: RefCell::new(HashMap::new()),
            next_pair: Cell::new(0),
            has_shadow: cfg.splits.iter().any(|s| s.shadow.is_some()),
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
        let decision =
            canary::decide_guarded(cfg, &req, now, self.random(), &self.effective.borrow());
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
                self.start_copy(hdrs, split, version, how);
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
        let effective = self.effective.borrow();
        for (i, split) in self.cfg.splits.iter().enumerate() {
            let weights = match effective.get(i) {
                Some(Some(w)) => w,
                _ => split.weights_at(now_ms),
            };
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

impl Canary {
    /// How often the root must tick for this stage, if at all: to send
    /// shadow copies, or to flush the guards.
    pub fn tick_ms(&self) -> Option<u64> {
        if self.has_shadow {
            Some(SHADOW_TICK_MS)
        } else if !self.effective.borrow().is_empty() {
            Some(GUARD_FLUSH_MS)
        } else {
            None
        }
    }

    /// The root's tick.
    pub fn on_tick(&self, now_ms: u64) {
        self.guard_tick(now_ms);
        self.send_queued();
        self.expire_pairs(now_ms);
    }

    /// A watch on a request routed to `version` of `split`, if the split
    /// is guarded; `now_ms` is read only then.
    pub fn watch(
        &self,
        split: usize,
        version: usize,
        now_ms: impl FnOnce() -> u64,
    ) -> Option<Watch> {
        matches!(self.guards.get(split), Some(Some(_))).then(|| Watch {
            split,
            version,
            sent_at_ms: now_ms(),
        })
    }

    /// Records a watched request's outcome: `status` of the response
    /// headers, `None` for a stream that ended without them (a reset).
    pub fn observe(&self, w: Watch, status: Option<u32>, now_ms: u64) {
        let Some(Some(g)) = self.guards.get(w.split) else {
            return;
        };
        let ok = status.is_some_and(|s| s < 500);
        if let Some(t) = g.pending.borrow_mut().get_mut(w.version) {
            t.record(ok, now_ms.saturating_sub(w.sent_at_ms));
        }
    }

    /// The root's tick: every [`GUARD_FLUSH_MS`], flushes each guarded
    /// split's pending outcomes, steps its rules and takes in the state.
    fn guard_tick(&self, now_ms: u64) {
        if now_ms.saturating_sub(self.flushed_at_ms.get()) < GUARD_FLUSH_MS {
            return;
        }
        self.flushed_at_ms.set(now_ms);
        for (i, g) in self.guards.iter().enumerate() {
            let (Some(g), Some(split)) = (g, self.cfg.splits.get(i)) else {
                continue;
            };
            let Some(cfg) = &split.guard else {
                continue;
            };
            let deltas = std::mem::replace(
                &mut *g.pending.borrow_mut(),
                vec![Tally::default(); split.versions.len()],
            );
            let agreement = g.agreement.take();
            match self.flush(g, split.versions.len(), cfg, &deltas, agreement, now_ms) {
                Some((rec, transitions, gate)) => {
                    self.metrics.outcomes(i, &deltas);
                    for t in &transitions {
                        self.log_transition(i, cfg, t);
                    }
                    if let Some(change) = gate {
                        self.log_gate(i, &rec, change, now_ms);
                    }
                    self.take_in(i, &rec, now_ms);
                }
                None => {
                    // Shared data failed or every CAS lost: keep the
                    // outcomes for the next flush.
                    for (p, d) in g.pending.borrow_mut().iter_mut().zip(&deltas) {
                        p.add(d);
                    }
                    let mut a = g.agreement.get();
                    a.add(agreement);
                    g.agreement.set(a);
                }
            }
        }
    }

    /// Read–modify–write of a split's record; `None` if shared data
    /// failed or every CAS lost.
    fn flush(
        &self,
        g: &Guarded,
        versions: usize,
        cfg: &Guard,
        deltas: &[Tally],
        agreement: Agreement,
        now_ms: u64,
    ) -> Option<(Record, Vec<Transition>, Option<GateChange>)> {
        let any = deltas.iter().any(|d| !d.is_empty()) || agreement.compared > 0;
        for _ in 0..CAS_TRIES {
            let (bytes, cas) = hostcalls::get_shared_data(&g.key).ok()?;
            let mut rec = Record::decode_or_fresh(bytes.as_deref(), g.fingerprint, versions);
            rec.add(cfg, now_ms, deltas);
            let transitions = rec.step(cfg, now_ms);
            let gate = rec.gate(cfg, agreement, now_ms);
            if any || !transitions.is_empty() || gate.is_some() {
                let bytes = rec.encode(g.fingerprint);
                if hostcalls::set_shared_data(&g.key, Some(&bytes), cas).is_err() {
                    continue;
                }
            }
            return Some((rec, transitions, gate));
        }
        debug!(
            "infermesh canary guard: update of {} lost {CAS_TRIES} CAS races",
            g.key
        );
        None
    }

    /// Takes a record's states into this VM: gauges, and the weights
    /// decisions route on.
    fn take_in(&self, split: usize, rec: &Record, now_ms: u64) {
        let (Some(Some(g)), Some(s)) = (self.guards.get(split), self.cfg.splits.get(split)) else {
            return;
        };
        let Some(cfg) = &s.guard else {
            return;
        };
        let mut changed = false;
        let held = rec.held_at_ms.is_some();
        if g.held.get() != held {
            g.held.set(held);
            changed = true;
            self.metrics.set_promotion_held(split, held);
        }
        for (v, seen) in g.states.borrow_mut().iter_mut().enumerate() {
            let now = rec.state(v);
            if *seen != now {
                *seen = now;
                changed = true;
                self.metrics.set_guard_state(split, v, now);
            }
        }
        let weights = rec.effective(s, cfg, now_ms);
        if let Some(slot) = self.effective.borrow_mut().get_mut(split) {
            *slot = weights;
        }
        if changed {
            let effective = self.effective.borrow();
            let w = match effective.get(split) {
                Some(Some(w)) => w,
                _ => s.weights_at(now_ms),
            };
            self.metrics.set_weights(split, w.as_bp());
        }
    }

    /// The one log line per transition, from the VM that made it.
    fn log_transition(&self, split: usize, cfg: &Guard, t: &Transition) {
        let Some(s) = self.cfg.splits.get(split) else {
            return;
        };
        let version = s.versions.get(t.version).map_or("?", String::as_str);
        match (t.to, &t.verdict) {
            (State::Tripped, Some(v)) => {
                self.metrics.trip(split, t.version, v.rule);
                let what = match cfg.action {
                    GuardAction::Rollback => "rolled back (weight 0, traffic to the baseline)",
                    GuardAction::Freeze => "frozen (schedule held at the current step)",
                };
                let until = match cfg.cool_off_ms {
                    Some(ms) => format!("probed again after {} s", ms / 1000),
                    None => "until the config changes".to_owned(),
                };
                warn!(
                    "infermesh canary guard: model {} version {version} {what}, {until}: {}",
                    s.model,
                    v.describe(cfg)
                );
            }
            (State::Probing, _) => info!(
                "infermesh canary guard: model {} version {version}: cool-off over, probing with at most {}.{:02}% of traffic",
                s.model,
                cfg.probe_bp / 100,
                cfg.probe_bp % 100
            ),
            (State::Normal, _) => info!(
                "infermesh canary guard: model {} version {version}: probe passed a full window, restored",
                s.model
            ),
            (State::Tripped, None) => {}
        }
    }
}

impl Canary {
    /// The one log line per gate change, from the VM that made it.
    fn log_gate(&self, split: usize, rec: &Record, change: GateChange, now_ms: u64) {
        let Some(s) = self.cfg.splits.get(split) else {
            return;
        };
        let gate = s.guard.as_ref().and_then(|g| g.promotion);
        let min = gate.map_or(0, |g| g.min_agreement_bp);
        let samples = gate.map_or(0, |g| g.min_samples);
        let weights = s.weights_at(rec.held_at_ms.unwrap_or(now_ms));
        if change.held {
            warn!(
                "infermesh canary guard: model {} promotion held at weights {:?} (bp): shadow {}, needs {}.{:02}% over at least {samples}",
                s.model,
                weights.as_bp(),
                change.agreement.describe(),
                min / 100,
                min % 100
            );
        } else {
            info!(
                "infermesh canary guard: model {} promotion released: shadow {}; the schedule applies",
                s.model,
                change.agreement.describe()
            );
        }
    }
}

/// Mirroring: the shadow copies.
impl Canary {
    /// Starts a copy of the request if its split mirrors it; the stream
    /// takes it with [`Canary::take_copy`].
    fn start_copy(&self, hdrs: &RequestHeaders, split: usize, version: usize, how: How) {
        let Some(s) = self.cfg.splits.get(split) else {
            return;
        };
        if s.shadow.is_none() {
            return;
        }
        let path = hdrs.get(":path").unwrap_or_default();
        let Some(path) = shadow::mirror_path(s, version, how, path, self.random()) else {
            return;
        };
        let pair = self.start_pair(split, s.shadow.as_ref().map_or(0, |sh| sh.max_in_flight));
        *self.started_copy.borrow_mut() = Some(Copy {
            split,
            pair,
            path,
            headers: hdrs.list().to_vec(),
            body: Vec::new(),
            too_large: false,
        });
    }

    /// The copy the last decision started, if any.
    pub fn take_copy(&self) -> Option<Copy> {
        self.started_copy.borrow_mut().take()
    }

    /// A pair for a new copy's answers, unless too many wait already
    /// (then the copy is sent but not compared).
    fn start_pair(&self, split: usize, max_in_flight: u32) -> Option<u64> {
        let mut pairs = self.pairs.borrow_mut();
        if pairs.len() >= (max_in_flight as usize).saturating_mul(PAIRS_PER_COPY) {
            self.metrics.shadow_not_compared(split, "backlog");
            return None;
        }
        let id = self.next_pair.get().wrapping_add(1);
        self.next_pair.set(id);
        pairs.insert(
            id,
            Pair {
                split,
                started_ms: filter_shim::now_ms(&crate::Host),
                baseline: None,
                candidate: None,
                lost: false,
            },
        );
        Some(id)
    }

    /// The stream's capture of the client's answer to a copied request.
    pub fn capture(&self, copy: &Copy) -> Option<Capture> {
        let limit = self
            .cfg
            .splits
            .get(copy.split)
            .and_then(|s| s.shadow.as_ref())
            .map_or(0, |sh| sh.max_body_bytes as usize);
        copy.pair.map(|pair| Capture {
            pair,
            limit,
            status: 0,
            body: Vec::new(),
            too_large: false,
        })
    }

    /// The client's response headers: `end_of_stream` ends the answer.
    pub fn capture_headers(
        &self,
        mut cap: Capture,
        status: u32,
        end_of_stream: bool,
    ) -> Option<Capture> {
        cap.status = status;
        if end_of_stream {
            self.baseline_answered(cap);
            return None;
        }
        Some(cap)
    }

    /// A chunk of the client's response body (`ctx` holds it).
    pub fn capture_body(
        &self,
        mut cap: Capture,
        ctx: &dyn HttpContext,
        body_size: usize,
        end_of_stream: bool,
    ) -> Option<Capture> {
        if !cap.too_large && body_size > 0 {
            if cap.body.len().saturating_add(body_size) > cap.limit {
                cap.too_large = true;
                cap.body = Vec::new();
            } else if let Some(chunk) = ctx.get_http_response_body(0, body_size) {
                cap.body.extend_from_slice(&chunk);
            }
        }
        if end_of_stream {
            self.baseline_answered(cap);
            return None;
        }
        Some(cap)
    }

    /// The stream ended before its answer was complete.
    pub fn capture_lost(&self, cap: Capture) {
        let mut pairs = self.pairs.borrow_mut();
        let Some(p) = pairs.get_mut(&cap.pair) else {
            return;
        };
        if p.candidate.is_some() {
            let split = p.split;
            pairs.remove(&cap.pair);
            self.metrics.shadow_not_compared(split, "no_baseline");
        } else {
            // The candidate's answer, when it comes, is counted as such.
            p.lost = true;
        }
    }

    fn baseline_answered(&self, cap: Capture) {
        let answer = Answer {
            status: cap.status,
            body: (!cap.too_large).then_some(cap.body),
        };
        self.deposit(cap.pair, answer, true);
    }

    /// One side of a pair arrived; compares when both are in.
    fn deposit(&self, pair: u64, answer: Answer, baseline: bool) {
        let ready = {
            let mut pairs = self.pairs.borrow_mut();
            let Some(p) = pairs.get_mut(&pair) else {
                return;
            };
            if baseline {
                p.baseline = Some(answer);
            } else {
                p.candidate = Some(answer);
            }
            if p.lost && p.candidate.is_some() {
                let split = p.split;
                pairs.remove(&pair);
                self.metrics.shadow_not_compared(split, "no_baseline");
                return;
            }
            if p.baseline.is_some() && p.candidate.is_some() {
                pairs.remove(&pair)
            } else {
                None
            }
        };
        if let Some(Pair {
            split,
            baseline: Some(b),
            candidate: Some(c),
            ..
        }) = ready
        {
            self.judge(split, &b, &c);
        }
    }

    fn judge(&self, split: usize, b: &Answer, c: &Answer) {
        let Some(s) = self.cfg.splits.get(split) else {
            return;
        };
        let Some(sh) = &s.shadow else {
            return;
        };
        let (Some(bb), Some(cb)) = (&b.body, &c.body) else {
            self.metrics.shadow_not_compared(split, "too_large");
            return;
        };
        let result = compare::compare(&sh.compare, b.status, bb, c.status, cb);
        match &result.verdict {
            Verdict::Agree => self.agreed(split, true, result.max_abs_diff),
            Verdict::Disagree { output, why } => {
                debug!(
                    "infermesh canary shadow: model {} candidate disagrees on output {output:?}: {why}",
                    s.model
                );
                self.agreed(split, false, result.max_abs_diff);
            }
            Verdict::Incomparable(reason) => self.metrics.shadow_not_compared(split, reason),
        }
    }

    fn agreed(&self, split: usize, agreed: bool, max_abs_diff: Option<f64>) {
        self.metrics.shadow_compared(split, agreed, max_abs_diff);
        if let Some(Some(g)) = self.guards.get(split) {
            let mut a = g.agreement.get();
            a.add(Agreement {
                compared: 1,
                agreed: u64::from(agreed),
            });
            g.agreement.set(a);
        }
    }

    /// Drops pairs whose other side will not come.
    fn expire_pairs(&self, now_ms: u64) {
        let mut pairs = self.pairs.borrow_mut();
        if pairs.is_empty() {
            return;
        }
        let splits = &self.cfg.splits;
        pairs.retain(|_, p| {
            let timeout = splits
                .get(p.split)
                .and_then(|s| s.shadow.as_ref())
                .map_or(0, |sh| sh.timeout_ms);
            let keep = now_ms.saturating_sub(p.started_ms) <= timeout.saturating_add(PAIR_GRACE_MS);
            if !keep && p.candidate.is_some() {
                self.metrics.shadow_not_compared(p.split, "no_baseline");
            }
            keep
        });
    }

    fn drop_pair(&self, pair: Option<u64>) {
        if let Some(id) = pair {
            self.pairs.borrow_mut().remove(&id);
        }
    }

    /// A chunk of the request body (`ctx` holds it); at the end of the
    /// request, sends the copy. Never changes what the client's request
    /// does.
    pub fn copy_body(
        &self,
        mut copy: Copy,
        ctx: &dyn HttpContext,
        body_size: usize,
        end_of_stream: bool,
    ) -> Option<Copy> {
        let cap = self
            .cfg
            .splits
            .get(copy.split)
            .and_then(|s| s.shadow.as_ref())
            .map_or(0, |sh| sh.max_body_bytes as usize);
        if !copy.too_large && body_size > 0 {
            if copy.body.len().saturating_add(body_size) > cap {
                copy.too_large = true;
                copy.body = Vec::new();
            } else if let Some(chunk) = ctx.get_http_request_body(0, body_size) {
                copy.body.extend_from_slice(&chunk);
            }
        }
        if end_of_stream {
            self.send_copy(copy);
            return None;
        }
        Some(copy)
    }

    /// Queues a complete copy for the root's next tick, within the
    /// bounds (queued and in flight count alike).
    pub fn send_copy(&self, copy: Copy) {
        let max = self
            .cfg
            .splits
            .get(copy.split)
            .and_then(|s| s.shadow.as_ref())
            .map_or(0, |sh| sh.max_in_flight as usize);
        if copy.too_large {
            self.metrics.shadow_skipped(copy.split, "body_too_large");
            self.drop_pair(copy.pair);
            return;
        }
        let pending = self.copies.borrow().len() + self.queued.borrow().len();
        if pending >= max {
            self.metrics.shadow_skipped(copy.split, "in_flight");
            self.drop_pair(copy.pair);
            return;
        }
        self.queued.borrow_mut().push(copy);
    }

    /// Sends the queued copies from the root context.
    fn send_queued(&self) {
        let queued = std::mem::take(&mut *self.queued.borrow_mut());
        if queued.is_empty() {
            return;
        }
        let _ = hostcalls::set_effective_context(self.root_id);
        for copy in queued {
            self.dispatch_copy(copy);
        }
    }

    fn dispatch_copy(&self, copy: Copy) {
        let Some(s) = self.cfg.splits.get(copy.split) else {
            return;
        };
        let Some(sh) = &s.shadow else {
            return;
        };
        let candidate = s.versions.get(sh.version).map_or("", String::as_str);
        // Ask for an uncompressed answer when it is compared.
        let compared = copy.pair.is_some();
        let mut hdrs: Vec<(&str, &str)> = Vec::with_capacity(copy.headers.len() + 4);
        for (name, value) in &copy.headers {
            if crate::failover::NOT_FORWARDED.contains(&name.as_str())
                || name == ":path"
                || headers::is_owned(name)
                || (compared && name == "accept-encoding")
            {
                continue;
            }
            if let Ok(v) = std::str::from_utf8(value) {
                hdrs.push((name.as_str(), v));
            }
        }
        hdrs.push((":path", &copy.path));
        hdrs.push((":authority", &sh.authority));
        hdrs.push((headers::MODEL, &s.model));
        hdrs.push((headers::VERSION, candidate));
        hdrs.push((SHADOW_HEADER, "1"));
        let sent = hostcalls::dispatch_http_call(
            &sh.cluster,
            hdrs,
            Some(&copy.body),
            vec![],
            Duration::from_millis(sh.timeout_ms),
        );
        match sent {
            Ok(token) => {
                self.copies
                    .borrow_mut()
                    .insert(token, (copy.split, copy.pair));
            }
            Err(status) => {
                self.metrics.shadow_skipped(copy.split, "dispatch");
                self.drop_pair(copy.pair);
                debug!(
                    "infermesh canary: cannot copy to shadow cluster {}: {status:?}",
                    sh.cluster
                );
            }
        }
    }

    /// A callout answered on the root context: `true` if it was a shadow
    /// copy (counted here), `false` if it belongs to another stage.
    pub fn on_copy_response(&self, token: u32, num_headers: usize, body_size: usize) -> bool {
        let Some((split, pair)) = self.copies.borrow_mut().remove(&token) else {
            return false;
        };
        // No headers: reset or timeout.
        let status = (num_headers > 0)
            .then(|| {
                hostcalls::get_map_value(
                    proxy_wasm::types::MapType::HttpCallResponseHeaders,
                    ":status",
                )
                .ok()
                .flatten()
            })
            .flatten()
            .and_then(|s| s.parse::<u32>().ok());
        let ok = status.is_some_and(|s| s < 500);
        self.metrics.shadow_answered(split, ok);
        match (ok, status, pair) {
            (true, Some(status), Some(pair)) => {
                let max = self
                    .cfg
                    .splits
                    .get(split)
                    .and_then(|s| s.shadow.as_ref())
                    .map_or(0, |sh| sh.max_body_bytes as usize);
                let body = if body_size > max {
                    None
                } else {
                    Some(
                        hostcalls::get_buffer(
                            proxy_wasm::types::BufferType::HttpCallResponseBody,
                            0,
                            body_size,
                        )
                        .ok()
                        .flatten()
                        .unwrap_or_default(),
                    )
                };
                self.deposit(pair, Answer { status, body }, false);
            }
            // A failed copy is an error, not a disagreement.
            _ => self.drop_pair(pair),
        }
        true
    }
}

/// Request header marking a shadow copy, so the candidate's own logs and
/// metrics can tell copies from live traffic.
pub const SHADOW_HEADER: &str = "x-infermesh-shadow";
