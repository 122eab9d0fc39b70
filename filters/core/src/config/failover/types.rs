//! Validated failover config types (see the parent module for the JSON).

use serde::Deserialize;

use super::MAX_CLOUDS;

/// OIP server readiness, probed on every cloud.
pub const SERVER_READY_PATH: &str = "/v2/health/ready";

/// A validated failover config.
#[derive(Debug, Clone, PartialEq)]
pub struct FailoverConfig {
    /// In config order; a cloud's index here is its identity everywhere
    /// (shared-state keys aside, which use the name).
    pub clouds: Vec<Cloud>,
    /// Every cloud index once, in pick order: priority, then cost, then
    /// name (unique, so the order is total and the same on every proxy).
    pub order: Vec<usize>,
    pub residency: Residency,
    pub health: Health,
    pub replay: Replay,
    pub hedge: Hedge,
    pub trust_downstream_headers: bool,
    pub served_by_header: bool,
}

impl FailoverConfig {
    /// Index of a cloud by name.
    pub fn cloud_index(&self, name: &[u8]) -> Option<usize> {
        self.clouds.iter().position(|c| c.name.as_bytes() == name)
    }

    /// Name of a cloud by index (`"?"` for an index out of range).
    pub fn cloud_name(&self, i: usize) -> &str {
        self.clouds.get(i).map_or("?", |c| c.name.as_str())
    }
}

/// One cloud. Invariants: name valid and unique, cluster unique.
#[derive(Debug, Clone, PartialEq)]
pub struct Cloud {
    /// Written to `x-infermesh-cloud`; Istio routes on it.
    pub name: String,
    /// Envoy cluster for probes and replayed or hedged requests (callouts).
    pub cluster: String,
    /// `:authority` for callouts; the cluster name unless configured.
    pub authority: String,
    /// Region / jurisdiction tags, matched by residency rules.
    pub tags: Vec<String>,
    /// Lower is preferred.
    pub priority: u32,
    /// Lower is preferred among equal priorities; finite, ≥ 0.
    pub cost: f64,
}

/// A set of cloud indices (below [`MAX_CLOUDS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CloudSet(u32);

const _: () = assert!(MAX_CLOUDS <= 32, "CloudSet is a u32 bitmask");

impl CloudSet {
    pub const EMPTY: CloudSet = CloudSet(0);

    /// Clouds `0..n`.
    pub fn all(n: usize) -> Self {
        let mut s = Self::EMPTY;
        for i in 0..n {
            s.insert(i);
        }
        s
    }

    /// Adds `i`; indices ≥ 32 are ignored (configs cannot have them).
    pub fn insert(&mut self, i: usize) {
        if let Some(bit) = Self::bit(i) {
            self.0 |= bit;
        }
    }

    pub fn remove(&mut self, i: usize) {
        if let Some(bit) = Self::bit(i) {
            self.0 &= !bit;
        }
    }

    pub fn contains(self, i: usize) -> bool {
        Self::bit(i).is_some_and(|bit| self.0 & bit != 0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn intersect(self, other: CloudSet) -> CloudSet {
        CloudSet(self.0 & other.0)
    }

    /// Members in ascending index order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..32).filter(move |&i| self.contains(i))
    }

    fn bit(i: usize) -> Option<u32> {
        u32::try_from(i).ok().and_then(|i| 1u32.checked_shl(i))
    }
}

impl FromIterator<usize> for CloudSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut s = Self::EMPTY;
        for i in iter {
            s.insert(i);
        }
        s
    }
}

/// Which request header decides residency, and how its values map to
/// clouds. Without a `residency` block: no header, every cloud allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Residency {
    pub header: Option<String>,
    /// Values are unique ASCII-case-insensitively.
    pub rules: Vec<Rule>,
    /// For requests without the header (or with an unknown value, when
    /// `on_unknown` is `default`).
    pub default: Allowed,
    pub on_unknown: OnUnknown,
}

/// A header value and what it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub value: String,
    pub allowed: Allowed,
}

/// Tags as written (for messages) and the clouds they allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub tags: Vec<String>,
    pub clouds: CloudSet,
}

/// What a residency header value that no rule lists means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnknown {
    /// No cloud is allowed: the request gets the 503 (fail closed).
    Reject,
    /// Treat it like a request without the header.
    Default,
}

/// Active and passive health settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub probe: Probe,
    pub passive: Passive,
}

/// Active readiness probes. Invariants: `timeout_ms ≤ interval_ms`,
/// thresholds in `1..=MAX_THRESHOLD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive successful rounds that bring an unhealthy cloud back.
    pub healthy_threshold: u16,
    /// Consecutive failed rounds that take a healthy cloud out.
    pub unhealthy_threshold: u16,
    /// `GET` paths of one probe round, [`SERVER_READY_PATH`] first; a round
    /// succeeds only when every path answers 200 within `timeout_ms`.
    pub paths: Vec<String>,
}

/// Passive health on live traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passive {
    /// Consecutive live failures that take a healthy cloud out.
    pub consecutive_failures: u16,
    pub failure_rate: Option<FailureRate>,
}

/// Take a cloud out when, within one window, at least `min_requests`
/// requests were seen and `percent` % or more of them failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRate {
    pub percent: u8,
    pub min_requests: u32,
    pub window_ms: u64,
}

/// Replay limits. Invariant: `per_try_timeout_ms ≤ total_deadline_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Attempts per request, the first and any hedge included.
    pub max_attempts: u8,
    /// Larger request bodies are not buffered, hence never replayed.
    pub max_body_bytes: usize,
    pub per_try_timeout_ms: u64,
    pub total_deadline_ms: u64,
    /// OIP inference has no side effects, so a `POST …/infer` may be sent
    /// twice; turn off for models where that is not true.
    pub infer_idempotent: bool,
}

/// Hedging: `default` applies to OIP infer requests of models without an
/// entry in `models`; `None` means off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hedge {
    pub default: Option<HedgeDelay>,
    pub models: Vec<(String, Option<HedgeDelay>)>,
}

impl Hedge {
    /// The hedge policy for `model` (`None`: no hedging).
    pub fn for_model(&self, model: &str) -> Option<&HedgeDelay> {
        match self.models.iter().find(|(m, _)| m == model) {
            Some((_, policy)) => policy.as_ref(),
            None => self.default.as_ref(),
        }
    }
}

/// How long to wait for the chosen cloud before hedging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HedgeDelay {
    Fixed {
        ms: u64,
    },
    /// The cloud's recent latency at `percentile`, clamped to
    /// `min_ms..=max_ms` (`max_ms` until enough samples are in).
    Derived {
        percentile: u8,
        min_ms: u64,
        max_ms: u64,
    },
}
