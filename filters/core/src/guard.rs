//! The canary guard: live outcomes per version in a sliding window, rules
//! that compare a canary with its baseline, and the state machine that
//! takes a bad canary out of the split, shared by every worker of a proxy.
//!
//! **Window.** Each version of a guarded split has [`SLOTS`] slots of
//! `window_ms / SLOTS`; an outcome lands in the slot of its time, and the
//! window is the slots of the last `SLOTS` slot periods (so it covers
//! between 90% and 100% of `window_ms`). A slot counts requests, errors
//! (5xx, resets) and a histogram of the time to response headers.
//!
//! **Rules** (any one trips; each needs `min_requests` canary requests in
//! the window, a rule over the baseline also `min_requests` baseline ones):
//! - `error_rate`: the canary's error rate is above `max_error_rate`;
//! - `error_rate_over_baseline`: it is more than
//!   `max_error_rate_over_baseline` points above the baseline's;
//! - `p99_over_baseline`: the lower edge of the canary's p99 bucket is
//!   more than `max_p99_ms_over_baseline` above the upper edge of the
//!   baseline's, so the histogram's coarseness can delay a trip but never
//!   cause one.
//!
//! **States** of a canary version, with no way to flap:
//!
//! ```text
//! Normal --rule breached--> Tripped --cool_off passed--> Probing
//!   ^                          ^                            |
//!   |                          +------rule breached---------+
//!   +---a full window with min_requests, no breach----------+
//! ```
//!
//! Without `cool_off_ms` a tripped canary stays tripped until the config
//! changes (a new [`fingerprint`] makes the record fresh). A tripped
//! canary under `rollback` has weight 0 (its buckets go to the baseline);
//! a probing one at most `probe_bp`, from the start of its slot, so the
//! keys it serves are a subset of those it served before. Under `freeze`
//! the split's weights stay those of the schedule at the trip.
//!
//! **Promotion gate.** With `min_shadow_agreement`, the split's shadow
//! copies compared with the client's answers are counted in the record
//! (since the config: compared, agreed). While fewer than
//! `min_shadow_samples` were compared or the agreement is under the
//! threshold, the gate is shut. Until the agreement is first reached
//! under a config, a shut gate holds the split at its base weights (the
//! candidate takes no more live traffic than `versions` gives it before
//! its answers are proven); once reached, the schedule applies as
//! written, and if agreement later falls under the threshold the
//! schedule is held at the step in force at that moment (the record
//! keeps the time) until it is back.
//!
//! **Sharing.** The shim adds each VM's outcomes to the split's
//! [`Record`] in proxy-wasm shared data a few times a second with the CAS
//! token, as failover's health does, and every VM reads the state back on
//! its tick.

mod codec;

pub use codec::{DecodeError, FORMAT};

use crate::config::canary::{Guard, GuardAction, Split};
use crate::hash::BUCKETS;
use crate::weights::{Bp, Weights};

/// Slots per window.
pub const SLOTS: usize = 10;
/// Upper edges (inclusive, ms) of the latency buckets; one more bucket
/// holds everything above the last edge.
pub const LATENCY_EDGES_MS: [u64; 23] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 1_500, 2_000,
    3_000, 5_000, 10_000,
];
pub const LATENCY_BUCKETS: usize = LATENCY_EDGES_MS.len() + 1;

/// Outcomes counted over some time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    pub requests: u32,
    pub errors: u32,
    pub latency: [u32; LATENCY_BUCKETS],
}

impl Tally {
    /// Counts one outcome: `ok` is false for a 5xx or a reset; `ms` is
    /// the time to response headers (or to the reset).
    pub fn record(&mut self, ok: bool, ms: u64) {
        self.requests = self.requests.saturating_add(1);
        if !ok {
            self.errors = self.errors.saturating_add(1);
        }
        let b = LATENCY_EDGES_MS.partition_point(|&edge| edge < ms);
        if let Some(n) = self.latency.get_mut(b) {
            *n = n.saturating_add(1);
        }
    }

    pub fn add(&mut self, other: &Tally) {
        self.requests = self.requests.saturating_add(other.requests);
        // Saturation could otherwise leave errors above requests.
        self.errors = self.errors.saturating_add(other.errors).min(self.requests);
        for (a, b) in self.latency.iter_mut().zip(other.latency.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requests == 0
    }

    /// Error rate in basis points of a percent (10 000 = 100%).
    pub fn error_rate_bp(&self) -> Bp {
        if self.requests == 0 {
            return 0;
        }
        let bp = u64::from(self.errors) * u64::from(BUCKETS) / u64::from(self.requests);
        Bp::try_from(bp).unwrap_or(BUCKETS)
    }

    /// The p99's latency bucket as `(lower, upper)` edges in ms (`upper`
    /// is `None` above the last edge); `None` with no requests.
    pub fn p99_ms(&self) -> Option<(u64, Option<u64>)> {
        let total: u64 = self.latency.iter().map(|&n| u64::from(n)).sum();
        if total == 0 {
            return None;
        }
        let mut seen = 0u64;
        for (i, &n) in self.latency.iter().enumerate() {
            seen += u64::from(n);
            if seen * 100 >= total * 99 {
                let lower = i
                    .checked_sub(1)
                    .and_then(|j| LATENCY_EDGES_MS.get(j))
                    .copied()
                    .unwrap_or(0);
                return Some((lower, LATENCY_EDGES_MS.get(i).copied()));
            }
        }
        None
    }
}

/// A guard rule; also a metric tag (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    ErrorRate,
    ErrorRateOverBaseline,
    P99OverBaseline,
}

impl Rule {
    pub const ALL: [Rule; 3] = [
        Rule::ErrorRate,
        Rule::ErrorRateOverBaseline,
        Rule::P99OverBaseline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ErrorRate => "error_rate",
            Rule::ErrorRateOverBaseline => "error_rate_over_baseline",
            Rule::P99OverBaseline => "p99_over_baseline",
        }
    }
}

/// A canary version's guard state; also a gauge value
/// ([`State::gauge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Normal,
    Tripped,
    Probing,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Normal => "normal",
            State::Tripped => "tripped",
            State::Probing => "probing",
        }
    }

    /// The `infermesh_canary_guard_state` gauge: 0 normal, 1 tripped,
    /// 2 probing.
    pub fn gauge(self) -> u64 {
        match self {
            State::Normal => 0,
            State::Tripped => 1,
            State::Probing => 2,
        }
    }
}

/// Why a rule tripped, with the numbers it saw; [`Verdict::describe`]
/// is the log line's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub rule: Rule,
    pub canary: Tally,
    pub baseline: Tally,
}

impl Verdict {
    /// `error_rate 31.00% > 10.00% (31 of 100 requests; baseline 0.00% of 120)`.
    pub fn describe(&self, guard: &Guard) -> String {
        let pct = |bp: Bp| format!("{}.{:02}%", bp / 100, bp % 100);
        let (c, b) = (&self.canary, &self.baseline);
        let counts = format!(
            "{} errors of {} requests; baseline {} of {}",
            c.errors, c.requests, b.errors, b.requests
        );
        let window = format!("{} ms window", guard.window_ms);
        match self.rule {
            Rule::ErrorRate => format!(
                "error_rate {} > {} ({counts}; {window})",
                pct(c.error_rate_bp()),
                pct(guard.max_error_rate_bp.unwrap_or(0))
            ),
            Rule::ErrorRateOverBaseline => format!(
                "error_rate_over_baseline {} - {} > {} points ({counts}; {window})",
                pct(c.error_rate_bp()),
                pct(b.error_rate_bp()),
                pct(guard.max_error_rate_over_baseline_bp.unwrap_or(0))
            ),
            Rule::P99OverBaseline => {
                let span = |p: Option<(u64, Option<u64>)>| match p {
                    Some((lo, Some(hi))) => format!("({lo}, {hi}] ms"),
                    Some((lo, None)) => format!("> {lo} ms"),
                    None => "-".to_owned(),
                };
                format!(
                    "p99_over_baseline: canary p99 in {} vs baseline p99 in {}, more than {} ms apart ({counts}; {window})",
                    span(c.p99_ms()),
                    span(b.p99_ms()),
                    guard.max_p99_ms_over_baseline.unwrap_or(0)
                )
            }
        }
    }
}

/// The first rule `canary` breaches against `baseline`, if any.
pub fn judge(guard: &Guard, canary: &Tally, baseline: &Tally) -> Option<Verdict> {
    if canary.requests < guard.min_requests {
        return None;
    }
    let verdict = |rule| {
        Some(Verdict {
            rule,
            canary: *canary,
            baseline: *baseline,
        })
    };
    let rate = canary.error_rate_bp();
    if guard.max_error_rate_bp.is_some_and(|max| rate > max) {
        return verdict(Rule::ErrorRate);
    }
    if baseline.requests < guard.min_requests {
        return None;
    }
    if let Some(max) = guard.max_error_rate_over_baseline_bp {
        if rate.saturating_sub(baseline.error_rate_bp()) > max {
            return verdict(Rule::ErrorRateOverBaseline);
        }
    }
    if let Some(max) = guard.max_p99_ms_over_baseline {
        // A baseline above the last edge cannot be outrun measurably.
        if let (Some((lo, _)), Some((_, Some(b_hi)))) = (canary.p99_ms(), baseline.p99_ms()) {
            if lo.saturating_sub(b_hi) > max {
                return verdict(Rule::P99OverBaseline);
            }
        }
    }
    None
}

/// One slot of a version's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slot {
    /// `now_ms / slot_ms` when the slot was last written.
    pub epoch: u64,
    pub tally: Tally,
}

/// One version's part of the record. The baseline's (index 0) state is
/// always `Normal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub state: State,
    /// The rule of the last trip (kept after recovery, for operators).
    pub rule: Option<Rule>,
    /// When the state last changed.
    pub since_ms: u64,
    /// When the episode began (the first trip since `Normal`): a frozen
    /// schedule stays at this time's step.
    pub tripped_at_ms: u64,
    pub slots: [Slot; SLOTS],
}

impl Default for Version {
    fn default() -> Self {
        Version {
            state: State::Normal,
            rule: None,
            since_ms: 0,
            tripped_at_ms: 0,
            slots: [Slot::default(); SLOTS],
        }
    }
}

/// A state change, for the shim's log line and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub version: usize,
    pub to: State,
    /// The breach, for a move to `Tripped`.
    pub verdict: Option<Verdict>,
}

/// A guarded split's shared record: one [`Version`] per version of the
/// split, baseline first, and the promotion gate's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub versions: Vec<Version>,
    /// Shadow copies compared since the config, and how many agreed.
    pub agreement: Agreement,
    /// When the promotion gate shut, while it is shut (0: before the
    /// schedule's first step: shut since the config arrived).
    pub held_at_ms: Option<u64>,
    /// The gate has been open under this config.
    pub proven: bool,
}

/// Compared shadow copies and agreements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Agreement {
    pub compared: u64,
    pub agreed: u64,
}

impl Agreement {
    pub fn add(&mut self, other: Agreement) {
        self.compared = self.compared.saturating_add(other.compared);
        self.agreed = self.agreed.saturating_add(other.agreed).min(self.compared);
    }

    /// Agreement in basis points of a percent; `None` with no samples.
    pub fn rate_bp(&self) -> Option<Bp> {
        let bp = u128::from(self.agreed) * u128::from(BUCKETS) / u128::from(self.compared.max(1));
        (self.compared > 0).then(|| Bp::try_from(bp).unwrap_or(BUCKETS))
    }

    /// `97.25% agreement (389 of 400 compared)`.
    pub fn describe(&self) -> String {
        let rate = self.rate_bp().map_or("-".to_owned(), |bp| {
            format!("{}.{:02}%", bp / 100, bp % 100)
        });
        format!(
            "{rate} agreement ({} of {} compared)",
            self.agreed, self.compared
        )
    }
}

/// A change of the promotion gate, for the shim's log line and gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateChange {
    /// `true`: the schedule is held from now on.
    pub held: bool,
    pub agreement: Agreement,
}

/// The shared-data key of a split's record.
pub fn shared_key(model: &str) -> String {
    format!("infermesh.canary.guard.v{FORMAT}.{model}")
}

/// Identity of a split's config: versions, weights, schedule and guard. A
/// record written under another fingerprint (the config changed) decodes
/// as fresh, so a config change ends a rollback and every key returns to
/// its bucket.
pub fn fingerprint(split: &Split) -> u32 {
    // Debug output covers every field; it is stable within a build, and a
    // new build may well start afresh.
    let id = format!("{split:?}");
    (crate::hash::key_hash("canary-guard-fingerprint", id.as_bytes()) >> 32) as u32
}

fn slot_ms(guard: &Guard) -> u64 {
    (guard.window_ms / SLOTS as u64).max(1)
}

impl Record {
    /// A fresh record: every version normal, empty windows.
    pub fn fresh(versions: usize) -> Record {
        Record {
            versions: vec![Version::default(); versions],
            agreement: Agreement::default(),
            held_at_ms: None,
            proven: false,
        }
    }

    /// Whether the promotion gate lets the schedule step.
    pub fn gate_open(&self, guard: &Guard) -> bool {
        let Some(gate) = guard.promotion else {
            return true;
        };
        let a = self.agreement;
        a.compared >= u64::from(gate.min_samples)
            && a.rate_bp().is_some_and(|bp| bp >= gate.min_agreement_bp)
    }

    /// Adds compared shadow copies and moves the promotion gate; returns
    /// its change, if any.
    pub fn gate(&mut self, guard: &Guard, delta: Agreement, now_ms: u64) -> Option<GateChange> {
        self.agreement.add(delta);
        guard.promotion?;
        let open = self.gate_open(guard);
        match (open, self.held_at_ms) {
            (false, None) => {
                self.held_at_ms = Some(if self.proven { now_ms } else { 0 });
                Some(GateChange {
                    held: true,
                    agreement: self.agreement,
                })
            }
            (true, held) => {
                let first = !self.proven;
                self.proven = true;
                if held.is_none() && !first {
                    return None;
                }
                self.held_at_ms = None;
                Some(GateChange {
                    held: false,
                    agreement: self.agreement,
                })
            }
            (false, Some(_)) => None,
        }
    }

    /// Decodes shared bytes; anything missing, malformed, of another
    /// fingerprint or another number of versions is a fresh record.
    pub fn decode_or_fresh(bytes: Option<&[u8]>, fingerprint: u32, versions: usize) -> Record {
        bytes
            .and_then(|b| Record::decode(b, fingerprint).ok())
            .filter(|r| r.versions.len() == versions)
            .unwrap_or_else(|| Record::fresh(versions))
    }

    pub fn state(&self, version: usize) -> State {
        self.versions
            .get(version)
            .map_or(State::Normal, |v| v.state)
    }

    /// Adds outcomes (`deltas[version]`) counted up to `now_ms` to the
    /// current slot.
    pub fn add(&mut self, guard: &Guard, now_ms: u64, deltas: &[Tally]) {
        let epoch = now_ms / slot_ms(guard);
        let i = (epoch % SLOTS as u64) as usize;
        for (v, d) in self.versions.iter_mut().zip(deltas) {
            if d.is_empty() {
                continue;
            }
            if let Some(slot) = v.slots.get_mut(i) {
                if slot.epoch != epoch {
                    *slot = Slot {
                        epoch,
                        tally: Tally::default(),
                    };
                }
                slot.tally.add(d);
            }
        }
    }

    /// A version's outcomes in the window ending at `now_ms`.
    pub fn window(&self, guard: &Guard, version: usize, now_ms: u64) -> Tally {
        let epoch = now_ms / slot_ms(guard);
        let mut sum = Tally::default();
        if let Some(v) = self.versions.get(version) {
            for s in &v.slots {
                if s.epoch <= epoch && epoch - s.epoch < SLOTS as u64 {
                    sum.add(&s.tally);
                }
            }
        }
        sum
    }

    /// Moves every canary version's state as the rules and the clock say;
    /// returns the changes (empty: nothing to write back).
    pub fn step(&mut self, guard: &Guard, now_ms: u64) -> Vec<Transition> {
        let baseline = self.window(guard, 0, now_ms);
        let mut out = Vec::new();
        for i in 1..self.versions.len() {
            let canary = self.window(guard, i, now_ms);
            let Some(v) = self.versions.get_mut(i) else {
                continue;
            };
            let elapsed = now_ms.saturating_sub(v.since_ms);
            let next = match v.state {
                State::Normal | State::Probing => match judge(guard, &canary, &baseline) {
                    Some(verdict) => {
                        if v.state == State::Normal {
                            v.tripped_at_ms = now_ms;
                        }
                        v.rule = Some(verdict.rule);
                        Some((State::Tripped, Some(verdict)))
                    }
                    None if v.state == State::Probing
                        && elapsed >= guard.window_ms
                        && canary.requests >= guard.min_requests =>
                    {
                        Some((State::Normal, None))
                    }
                    None => None,
                },
                State::Tripped => match guard.cool_off_ms {
                    Some(c) if elapsed >= c => {
                        // The probe is judged on its own traffic only.
                        v.slots = [Slot::default(); SLOTS];
                        Some((State::Probing, None))
                    }
                    _ => None,
                },
            };
            if let Some((to, verdict)) = next {
                v.state = to;
                v.since_ms = now_ms;
                out.push(Transition {
                    version: i,
                    to,
                    verdict,
                });
            }
        }
        out
    }

    /// The weights the split routes on at `now_ms` while some canary is
    /// not normal; `None`: the config's own weights apply.
    pub fn effective(&self, split: &Split, guard: &Guard, now_ms: u64) -> Option<Weights> {
        let all_normal = self.versions.iter().all(|v| v.state == State::Normal);
        if all_normal && self.held_at_ms.is_none() {
            return None;
        }
        // The schedule's time: held by a shut gate, or by a freeze.
        let mut at = self.held_at_ms.map_or(now_ms, |h| h.min(now_ms));
        if all_normal {
            return Some(split.weights_at(at).clone());
        }
        let mut bp: Vec<Bp> = match guard.action {
            GuardAction::Freeze => {
                if let Some(t) = self
                    .versions
                    .iter()
                    .filter(|v| v.state != State::Normal)
                    .map(|v| v.tripped_at_ms)
                    .min()
                {
                    at = at.min(t);
                }
                return Some(split.weights_at(at).clone());
            }
            GuardAction::Rollback => split.weights_at(at).as_bp().to_vec(),
        };
        for (w, v) in bp.iter_mut().zip(&self.versions).skip(1) {
            match v.state {
                State::Normal => {}
                State::Tripped => *w = 0,
                State::Probing => *w = (*w).min(guard.probe_bp),
            }
        }
        let canaries: Bp = bp.iter().skip(1).sum();
        if let Some(b) = bp.first_mut() {
            *b = BUCKETS.saturating_sub(canaries);
        }
        // Lowering canaries keeps every invariant; fall back to the
        // config's weights if that ever failed.
        Weights::new(bp).ok()
    }
}

#[cfg(test)]
mod tests;
