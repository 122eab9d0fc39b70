//! The canary filter's pluginConfig.
//!
//! ```json
//! {
//!   "splits": [{
//!     "model": "digits-mlp",
//!     "versions": [{"name": "1", "weight": 90}, {"name": "2", "weight": 10}],
//!     "schedule": {
//!       "start": "2026-12-01T09:00:00Z",
//!       "steps": [{"after_s": 0, "weights": {"2": 1}},
//!                 {"after_s": 3600, "weights": {"2": 5}}]
//!     },
//!     "guard": {
//!       "window_s": 10, "min_requests": 50,
//!       "max_error_rate": 5, "max_error_rate_over_baseline": 2,
//!       "max_p99_ms_over_baseline": 100,
//!       "action": "rollback", "cool_off_s": 600, "probe_percent": 1,
//!       "min_shadow_agreement": 98, "min_shadow_samples": 100
//!     },
//!     "shadow": {
//!       "version": "2", "fraction": 0.2, "cluster": "outbound|8080|v2|digits-mlp",
//!       "compare": {"abs_tolerance": 1e-4, "rel_tolerance": 1e-3,
//!                   "outputs": {"label": "exact", "probabilities": "argmax"}}
//!     }
//!   }],
//!   "sticky_key": [{"header": "x-user-id"}, {"cookie": "uid"}],
//!   "override_header": "x-canary-version",
//!   "trust_downstream_headers": false,
//!   "served_by_header": true
//! }
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{check_client_header, check_len, check_name, check_token, from_json, ConfigError};
use crate::headers;
use crate::schedule::{parse_rfc3339, Schedule, Step};
use crate::weights::{max_canary_weight, Bp, Weights, WeightsError};

/// Upper bounds that keep a config (and the metrics it defines) bounded.
pub const MAX_SPLITS: usize = 256;
pub const MAX_VERSIONS: usize = 16;
pub const MAX_STEPS: usize = 1_000;
pub const MAX_KEY_SOURCES: usize = 8;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    splits: Vec<RawSplit>,
    #[serde(default)]
    sticky_key: Vec<RawKeySource>,
    #[serde(default)]
    override_header: Option<String>,
    #[serde(default)]
    trust_downstream_headers: bool,
    #[serde(default = "super::default_true")]
    served_by_header: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    model: String,
    versions: Vec<RawVersion>,
    #[serde(default)]
    schedule: Option<RawSchedule>,
    #[serde(default)]
    guard: Option<RawGuard>,
    #[serde(default)]
    shadow: Option<RawShadow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShadow {
    version: String,
    fraction: f64,
    cluster: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    max_in_flight: Option<u32>,
    #[serde(default)]
    max_body_bytes: Option<u32>,
    #[serde(default)]
    compare: Option<RawCompare>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompare {
    #[serde(default)]
    abs_tolerance: Option<f64>,
    #[serde(default)]
    rel_tolerance: Option<f64>,
    #[serde(default)]
    outputs: BTreeMap<String, OutputMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    #[serde(default)]
    window_s: Option<f64>,
    #[serde(default)]
    min_requests: Option<u32>,
    #[serde(default)]
    max_error_rate: Option<f64>,
    #[serde(default)]
    max_error_rate_over_baseline: Option<f64>,
    #[serde(default)]
    max_p99_ms_over_baseline: Option<u64>,
    #[serde(default)]
    action: Option<GuardAction>,
    #[serde(default)]
    cool_off_s: Option<u64>,
    #[serde(default)]
    probe_percent: Option<f64>,
    #[serde(default)]
    min_shadow_agreement: Option<f64>,
    #[serde(default)]
    min_shadow_samples: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersion {
    name: String,
    weight: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    start: String,
    steps: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    after_s: u64,
    weights: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RawKeySource {
    Header(String),
    Cookie(String),
}

/// What a tripped guard does to its canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardAction {
    /// The canary's weight goes to the baseline: keyed and unkeyed
    /// traffic stop reaching it at once.
    Rollback,
    /// The schedule stops stepping: the weights in force at the trip stay.
    Freeze,
}

impl GuardAction {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardAction::Rollback => "rollback",
            GuardAction::Freeze => "freeze",
        }
    }
}

/// A split's guard: rules over a sliding window of live outcomes per
/// version, see [`crate::guard`]. Rates are basis points of a percent
/// (1 = 0.01%).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub window_ms: u64,
    /// A version is judged only with at least this many requests in the
    /// window (and the baseline too, for a rule over the baseline).
    pub min_requests: u32,
    pub max_error_rate_bp: Option<Bp>,
    pub max_error_rate_over_baseline_bp: Option<Bp>,
    pub max_p99_ms_over_baseline: Option<u64>,
    pub action: GuardAction,
    /// `None`: a tripped canary stays tripped until the config changes.
    pub cool_off_ms: Option<u64>,
    /// The canary's share, at most, while it is probed after the cool-off.
    pub probe_bp: Bp,
    /// The promotion gate: the schedule does not step while the shadow's
    /// agreement is under this share (or has fewer than `samples`
    /// compared copies). `None`: no gate.
    pub promotion: Option<PromotionGate>,
}

/// The guard's promotion gate on shadow agreement, see [`crate::guard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromotionGate {
    /// Least agreement, basis points of a percent.
    pub min_agreement_bp: Bp,
    /// Least compared copies before the agreement counts.
    pub min_samples: u32,
}

/// Guard limits and defaults.
pub const GUARD_WINDOW_S: f64 = 10.0;
pub const GUARD_MIN_WINDOW_MS: u64 = 500;
pub const GUARD_MAX_WINDOW_MS: u64 = 3_600_000;
pub const GUARD_MIN_REQUESTS: u32 = 50;
pub const GUARD_MAX_MIN_REQUESTS: u32 = 1_000_000;
pub const GUARD_MAX_P99_MS: u64 = 600_000;
pub const GUARD_MAX_COOL_OFF_S: u64 = 7 * 86_400;
pub const GUARD_PROBE_PERCENT: f64 = 1.0;
pub const GUARD_MIN_SHADOW_SAMPLES: u32 = 100;

/// A split's mirror: a copy of a share of the baseline's infer requests
/// goes to a candidate version, whose answer the client never sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadow {
    /// Index of the candidate in the split's versions (never 0).
    pub version: usize,
    /// Share of the baseline's infer requests copied, basis points.
    pub fraction_bp: Bp,
    /// The Envoy cluster that serves the candidate, and its `:authority`.
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u64,
    /// Copies in flight per worker at most; a request beyond is not copied.
    pub max_in_flight: u32,
    /// A larger request body is not copied (and a larger response is
    /// not compared).
    pub max_body_bytes: u32,
    /// How the candidate's answer is compared with the client's.
    pub compare: Compare,
}

/// How a shadow's answer is compared with the baseline's, output by
/// output, see [`crate::shadow::compare`].
#[derive(Debug, Clone, PartialEq)]
pub struct Compare {
    /// Numeric outputs agree where `|a - b| <= abs + rel * |a|` for every
    /// element (`a` the baseline's).
    pub abs_tolerance: f64,
    pub rel_tolerance: f64,
    /// Per output name; an output not named is compared by its datatype:
    /// floating point with the tolerances, anything else exactly.
    pub outputs: BTreeMap<String, OutputMode>,
}

// The tolerances are validated finite, so equality is an equivalence.
impl Eq for Compare {}

impl Default for Compare {
    fn default() -> Self {
        Compare {
            abs_tolerance: SHADOW_ABS_TOLERANCE,
            rel_tolerance: SHADOW_REL_TOLERANCE,
            outputs: BTreeMap::new(),
        }
    }
}

/// How one output is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputMode {
    /// Every element equal (labels, class ids, strings).
    Exact,
    /// The index of the largest element of each row (the last dimension)
    /// equal: a classifier's scores or probabilities.
    Argmax,
    /// Every element within the tolerances.
    Tolerance,
    /// Not compared.
    Ignore,
}

impl OutputMode {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputMode::Exact => "exact",
            OutputMode::Argmax => "argmax",
            OutputMode::Tolerance => "tolerance",
            OutputMode::Ignore => "ignore",
        }
    }
}

/// Shadow limits and defaults.
pub const SHADOW_TIMEOUT_MS: u64 = 1_000;
pub const SHADOW_MAX_TIMEOUT_MS: u64 = 60_000;
pub const SHADOW_MAX_IN_FLIGHT: u32 = 64;
pub const SHADOW_MAX_IN_FLIGHT_LIMIT: u32 = 10_000;
pub const SHADOW_MAX_BODY_BYTES: u32 = 256 << 10;
pub const SHADOW_MAX_BODY_LIMIT: u32 = 16 << 20;
pub const SHADOW_ABS_TOLERANCE: f64 = 1e-4;
pub const SHADOW_REL_TOLERANCE: f64 = 1e-3;
pub const SHADOW_MAX_COMPARED_OUTPUTS: usize = 64;

/// Where a sticky key is read from, tried in config order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(String),
    Cookie(String),
}

/// A validated canary config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryConfig {
    pub splits: Vec<Split>,
    pub sticky_key: Vec<KeySource>,
    /// `None` disables overrides.
    pub override_header: Option<String>,
    pub trust_downstream_headers: bool,
    pub served_by_header: bool,
}

/// One model's split. Invariants: ≥ 2 versions with unique names; the base
/// weights and every step's weights are valid [`Weights`] over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub model: String,
    /// Version names; index 0 is the baseline (stable).
    pub versions: Vec<String>,
    pub base: Weights,
    pub schedule: Option<Schedule>,
    pub guard: Option<Guard>,
    pub shadow: Option<Shadow>,
}

impl Split {
    /// The weights in force at `now_ms`.
    pub fn weights_at(&self, now_ms: u64) -> &Weights {
        match &self.schedule {
            Some(s) => s.weights_at(&self.base, now_ms),
            None => &self.base,
        }
    }

    /// Index of a version by name (bytes, as read from a header).
    pub fn version_index(&self, name: &[u8]) -> Option<usize> {
        self.versions.iter().position(|v| v.as_bytes() == name)
    }
}

impl CanaryConfig {
    /// The split for `model`, if any.
    pub fn split_index(&self, model: &[u8]) -> Option<usize> {
        self.splits.iter().position(|s| s.model.as_bytes() == model)
    }
}

/// Parses and validates a canary pluginConfig.
pub fn parse(bytes: &[u8]) -> Result<CanaryConfig, ConfigError> {
    let raw: RawConfig = from_json(bytes)?;
    validate(raw)
}

fn validate(raw: RawConfig) -> Result<CanaryConfig, ConfigError> {
    check_len("splits", raw.splits.len(), MAX_SPLITS, "split")?;
    let mut splits: Vec<Split> = Vec::with_capacity(raw.splits.len());
    for (i, s) in raw.splits.into_iter().enumerate() {
        let split = validate_split(&format!("splits[{i}]"), s)?;
        if splits.iter().any(|o| o.model == split.model) {
            return Err(ConfigError::new(
                format!("splits[{i}].model"),
                format!("model {:?} has more than one split", split.model),
            ));
        }
        splits.push(split);
    }

    if raw.sticky_key.len() > MAX_KEY_SOURCES {
        return Err(ConfigError::new(
            "sticky_key",
            format!(
                "{} sources, the limit is {MAX_KEY_SOURCES}",
                raw.sticky_key.len()
            ),
        ));
    }
    let mut sticky_key = Vec::with_capacity(raw.sticky_key.len());
    for (i, src) in raw.sticky_key.into_iter().enumerate() {
        sticky_key.push(match src {
            RawKeySource::Header(h) => {
                let path = format!("sticky_key[{i}].header");
                check_client_header(&path, &h)?;
                if h == "cookie" {
                    return Err(ConfigError::new(
                        path,
                        "use {\"cookie\": NAME} to key on one cookie, not the whole cookie header",
                    ));
                }
                KeySource::Header(h)
            }
            RawKeySource::Cookie(c) => {
                let path = format!("sticky_key[{i}].cookie");
                let ok = !c.is_empty()
                    && c.len() <= 256
                    && c.bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
                if !ok {
                    return Err(ConfigError::new(
                        path,
                        format!("{c:?} is not a cookie name"),
                    ));
                }
                KeySource::Cookie(c)
            }
        });
    }

    let override_header = match raw.override_header {
        None => Some(headers::DEFAULT_OVERRIDE.to_owned()),
        Some(h) if h.is_empty() => None,
        Some(h) => {
            check_client_header("override_header", &h)?;
            Some(h)
        }
    };

    Ok(CanaryConfig {
        splits,
        sticky_key,
        override_header,
        trust_downstream_headers: raw.trust_downstream_headers,
        served_by_header: raw.served_by_header,
    })
}

fn validate_split(path: &str, raw: RawSplit) -> Result<Split, ConfigError> {
    check_name(&format!("{path}.model"), &raw.model)?;
    if raw.versions.len() < 2 {
        return Err(ConfigError::new(
            format!("{path}.versions"),
            format!(
                "{} version(s): a split needs at least two",
                raw.versions.len()
            ),
        ));
    }
    if raw.versions.len() > MAX_VERSIONS {
        return Err(ConfigError::new(
            format!("{path}.versions"),
            format!(
                "{} versions, the limit is {MAX_VERSIONS}",
                raw.versions.len()
            ),
        ));
    }
    let mut names: Vec<String> = Vec::with_capacity(raw.versions.len());
    let mut base = Vec::with_capacity(raw.versions.len());
    for (i, v) in raw.versions.into_iter().enumerate() {
        let vpath = format!("{path}.versions[{i}]");
        check_name(&format!("{vpath}.name"), &v.name)?;
        if names.contains(&v.name) {
            return Err(ConfigError::new(
                format!("{vpath}.name"),
                format!("version {:?} is listed twice", v.name),
            ));
        }
        base.push(percent_to_bp(&format!("{vpath}.weight"), v.weight)?);
        names.push(v.name);
    }
    let base = weights(&format!("{path}.versions"), base, &names)?;

    let schedule = match raw.schedule {
        None => None,
        Some(s) => Some(validate_schedule(&format!("{path}.schedule"), s, &names)?),
    };
    let guard = match raw.guard {
        None => None,
        Some(g) => Some(validate_guard(&format!("{path}.guard"), g)?),
    };
    let shadow = match raw.shadow {
        None => None,
        Some(sh) => Some(validate_shadow(&format!("{path}.shadow"), sh, &names)?),
    };
    if guard.as_ref().is_some_and(|g| g.promotion.is_some()) && shadow.is_none() {
        return Err(ConfigError::new(
            format!("{path}.guard.min_shadow_agreement"),
            "needs a shadow on the split: agreement is measured on its copies",
        ));
    }
    Ok(Split {
        model: raw.model,
        versions: names,
        base,
        schedule,
        guard,
        shadow,
    })
}

fn validate_shadow(path: &str, raw: RawShadow, names: &[String]) -> Result<Shadow, ConfigError> {
    let version = match names.iter().position(|n| *n == raw.version) {
        Some(0) => {
            return Err(ConfigError::new(
                format!("{path}.version"),
                format!(
                    "{:?} is the baseline: the shadow copies the baseline's requests to another version",
                    raw.version
                ),
            ))
        }
        Some(i) => i,
        None => {
            return Err(ConfigError::new(
                format!("{path}.version"),
                format!("{:?} is not one of the split's versions {names:?}", raw.version),
            ))
        }
    };
    let fpath = format!("{path}.fraction");
    if !raw.fraction.is_finite() || raw.fraction <= 0.0 || raw.fraction > 1.0 {
        return Err(ConfigError::new(
            fpath,
            format!("{} is not a fraction above 0 and at most 1", raw.fraction),
        ));
    }
    let fraction_bp = percent_to_bp(&fpath, raw.fraction * 100.0)?;
    check_token(&format!("{path}.cluster"), "cluster name", &raw.cluster)?;
    let authority = match raw.authority {
        Some(a) => {
            check_token(&format!("{path}.authority"), "authority", &a)?;
            a
        }
        None => raw.cluster.clone(),
    };
    let ranged = |field: &str, v: u64, max: u64| -> Result<u64, ConfigError> {
        if (1..=max).contains(&v) {
            Ok(v)
        } else {
            Err(ConfigError::new(
                format!("{path}.{field}"),
                format!("{v} is not between 1 and {max}"),
            ))
        }
    };
    let timeout_ms = ranged(
        "timeout_ms",
        raw.timeout_ms.unwrap_or(SHADOW_TIMEOUT_MS),
        SHADOW_MAX_TIMEOUT_MS,
    )?;
    let max_in_flight = ranged(
        "max_in_flight",
        u64::from(raw.max_in_flight.unwrap_or(SHADOW_MAX_IN_FLIGHT)),
        u64::from(SHADOW_MAX_IN_FLIGHT_LIMIT),
    )?;
    let max_body_bytes = ranged(
        "max_body_bytes",
        u64::from(raw.max_body_bytes.unwrap_or(SHADOW_MAX_BODY_BYTES)),
        u64::from(SHADOW_MAX_BODY_LIMIT),
    )?;
    let compare = match raw.compare {
        None => Compare::default(),
        Some(c) => validate_compare(&format!("{path}.compare"), c)?,
    };
    Ok(Shadow {
        version,
        fraction_bp,
        cluster: raw.cluster,
        authority,
        timeout_ms,
        max_in_flight: u32::try_from(max_in_flight).unwrap_or(SHADOW_MAX_IN_FLIGHT),
        max_body_bytes: u32::try_from(max_body_bytes).unwrap_or(SHADOW_MAX_BODY_BYTES),
        compare,
    })
}

fn validate_compare(path: &str, raw: RawCompare) -> Result<Compare, ConfigError> {
    let tolerance = |field: &str, v: Option<f64>, default: f64| -> Result<f64, ConfigError> {
        let v = v.unwrap_or(default);
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(ConfigError::new(
                format!("{path}.{field}"),
                format!("{v} is not a finite number of at least 0"),
            ))
        }
    };
    let abs_tolerance = tolerance("abs_tolerance", raw.abs_tolerance, SHADOW_ABS_TOLERANCE)?;
    let rel_tolerance = tolerance("rel_tolerance", raw.rel_tolerance, SHADOW_REL_TOLERANCE)?;
    if raw.outputs.len() > SHADOW_MAX_COMPARED_OUTPUTS {
        return Err(ConfigError::new(
            format!("{path}.outputs"),
            format!(
                "{} outputs named; at most {SHADOW_MAX_COMPARED_OUTPUTS}",
                raw.outputs.len()
            ),
        ));
    }
    for name in raw.outputs.keys() {
        if name.is_empty() || name.len() > 256 {
            return Err(ConfigError::new(
                format!("{path}.outputs"),
                format!("{name:?} is not an output name (1 to 256 bytes)"),
            ));
        }
    }
    Ok(Compare {
        abs_tolerance,
        rel_tolerance,
        outputs: raw.outputs,
    })
}

fn validate_guard(path: &str, raw: RawGuard) -> Result<Guard, ConfigError> {
    let window_s = raw.window_s.unwrap_or(GUARD_WINDOW_S);
    let window_ms = window_s * 1000.0;
    if !window_ms.is_finite()
        || window_ms < GUARD_MIN_WINDOW_MS as f64
        || window_ms > GUARD_MAX_WINDOW_MS as f64
    {
        return Err(ConfigError::new(
            format!("{path}.window_s"),
            format!(
                "{window_s} is not between {} and {}",
                GUARD_MIN_WINDOW_MS as f64 / 1000.0,
                GUARD_MAX_WINDOW_MS / 1000
            ),
        ));
    }
    let min_requests = raw.min_requests.unwrap_or(GUARD_MIN_REQUESTS);
    if !(1..=GUARD_MAX_MIN_REQUESTS).contains(&min_requests) {
        return Err(ConfigError::new(
            format!("{path}.min_requests"),
            format!("{min_requests} is not between 1 and {GUARD_MAX_MIN_REQUESTS}"),
        ));
    }
    // A rate of 100% can never be exceeded: such a rule would never trip.
    let rate = |field: &str, v: Option<f64>| -> Result<Option<Bp>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let fpath = format!("{path}.{field}");
        if !v.is_finite() || !(0.0..100.0).contains(&v) {
            return Err(ConfigError::new(
                fpath,
                format!("{v} is not a percentage from 0 up to (not including) 100"),
            ));
        }
        percent_to_bp(&fpath, v).map(Some)
    };
    let max_error_rate_bp = rate("max_error_rate", raw.max_error_rate)?;
    let max_error_rate_over_baseline_bp = rate(
        "max_error_rate_over_baseline",
        raw.max_error_rate_over_baseline,
    )?;
    if let Some(ms) = raw.max_p99_ms_over_baseline {
        if !(1..=GUARD_MAX_P99_MS).contains(&ms) {
            return Err(ConfigError::new(
                format!("{path}.max_p99_ms_over_baseline"),
                format!("{ms} is not between 1 and {GUARD_MAX_P99_MS}"),
            ));
        }
    }
    let promotion = match raw.min_shadow_agreement {
        None if raw.min_shadow_samples.is_some() => {
            return Err(ConfigError::new(
                format!("{path}.min_shadow_samples"),
                "needs min_shadow_agreement",
            ))
        }
        None => None,
        Some(p) => {
            let fpath = format!("{path}.min_shadow_agreement");
            if !p.is_finite() || p <= 0.0 || p > 100.0 {
                return Err(ConfigError::new(
                    fpath,
                    format!("{p} is not a percentage above 0 and at most 100"),
                ));
            }
            let min_samples = raw.min_shadow_samples.unwrap_or(GUARD_MIN_SHADOW_SAMPLES);
            if !(1..=GUARD_MAX_MIN_REQUESTS).contains(&min_samples) {
                return Err(ConfigError::new(
                    format!("{path}.min_shadow_samples"),
                    format!("{min_samples} is not between 1 and {GUARD_MAX_MIN_REQUESTS}"),
                ));
            }
            Some(PromotionGate {
                min_agreement_bp: percent_to_bp(&fpath, p)?,
                min_samples,
            })
        }
    };
    if max_error_rate_bp.is_none()
        && max_error_rate_over_baseline_bp.is_none()
        && raw.max_p99_ms_over_baseline.is_none()
        && promotion.is_none()
    {
        return Err(ConfigError::new(
            path,
            "a guard needs at least one rule: max_error_rate, max_error_rate_over_baseline, \
             max_p99_ms_over_baseline or min_shadow_agreement",
        ));
    }
    let cool_off_ms = match raw.cool_off_s {
        None => None,
        Some(s) if (1..=GUARD_MAX_COOL_OFF_S).contains(&s) => Some(s * 1000),
        Some(s) => {
            return Err(ConfigError::new(
                format!("{path}.cool_off_s"),
                format!("{s} is not between 1 and {GUARD_MAX_COOL_OFF_S}"),
            ))
        }
    };
    let probe_bp = match raw.probe_percent {
        None => percent_to_bp(&format!("{path}.probe_percent"), GUARD_PROBE_PERCENT)?,
        Some(_) if cool_off_ms.is_none() => {
            return Err(ConfigError::new(
                format!("{path}.probe_percent"),
                "a probe share needs cool_off_s: without it a tripped canary stays tripped",
            ))
        }
        Some(p) => {
            let bp = percent_to_bp(&format!("{path}.probe_percent"), p)?;
            if bp == 0 {
                return Err(ConfigError::new(
                    format!("{path}.probe_percent"),
                    "0: a canary probed with no traffic could never recover",
                ));
            }
            bp
        }
    };
    Ok(Guard {
        window_ms: window_ms.round() as u64,
        min_requests,
        max_error_rate_bp,
        max_error_rate_over_baseline_bp,
        max_p99_ms_over_baseline: raw.max_p99_ms_over_baseline,
        action: raw.action.unwrap_or(GuardAction::Rollback),
        cool_off_ms,
        probe_bp,
        promotion,
    })
}

fn validate_schedule(
    path: &str,
    raw: RawSchedule,
    names: &[String],
) -> Result<Schedule, ConfigError> {
    let start_ms = parse_rfc3339(&raw.start).ok_or_else(|| {
        ConfigError::new(
            format!("{path}.start"),
            format!(
                "{:?} is not an RFC 3339 time such as 2026-12-01T09:00:00Z",
                raw.start
            ),
        )
    })?;
    if raw.steps.is_empty() {
        return Err(ConfigError::new(
            format!("{path}.steps"),
            "a schedule needs at least one step",
        ));
    }
    if raw.steps.len() > MAX_STEPS {
        return Err(ConfigError::new(
            format!("{path}.steps"),
            format!("{} steps, the limit is {MAX_STEPS}", raw.steps.len()),
        ));
    }
    let mut steps: Vec<Step> = Vec::with_capacity(raw.steps.len());
    for (i, step) in raw.steps.into_iter().enumerate() {
        let spath = format!("{path}.steps[{i}]");
        let offset_ms = step
            .after_s
            .checked_mul(1000)
            .and_then(|o| o.checked_add(start_ms));
        let Some(at_ms) = offset_ms else {
            return Err(ConfigError::new(
                format!("{spath}.after_s"),
                "too far in the future",
            ));
        };
        if let Some(prev) = steps.last() {
            if at_ms <= prev.at_ms {
                return Err(ConfigError::new(
                    format!("{spath}.after_s"),
                    "steps must be in strictly increasing after_s order",
                ));
            }
        }
        let mut bp = vec![0; names.len()];
        for (name, w) in &step.weights {
            let wpath = format!("{spath}.weights.{name}");
            let Some(slot) = names
                .iter()
                .position(|n| n == name)
                .and_then(|i| bp.get_mut(i))
            else {
                return Err(ConfigError::new(
                    wpath,
                    format!("{name:?} is not one of the split's versions {names:?}"),
                ));
            };
            *slot = percent_to_bp(&wpath, *w)?;
        }
        // The baseline takes whatever the canaries leave, so a step can
        // name only the canaries: {"2": 5} means 95/5.
        if !step
            .weights
            .contains_key(names.first().map_or("", String::as_str))
        {
            let canaries: Bp = bp.iter().skip(1).sum();
            if let Some(b) = bp.first_mut() {
                *b = crate::hash::BUCKETS.saturating_sub(canaries);
            }
        }
        let weights = weights(&format!("{spath}.weights"), bp, names)?;
        steps.push(Step { at_ms, weights });
    }
    Schedule::new(steps)
        .ok_or_else(|| ConfigError::new(format!("{path}.steps"), "steps are not in order"))
}

/// A weight in percent with at most two decimals, as basis points.
fn percent_to_bp(path: &str, w: f64) -> Result<Bp, ConfigError> {
    if !w.is_finite() || !(0.0..=100.0).contains(&w) {
        return Err(ConfigError::new(
            path,
            format!("{w} is not a percentage between 0 and 100"),
        ));
    }
    let scaled = w * 100.0;
    let rounded = scaled.round();
    if (scaled - rounded).abs() > 1e-6 {
        return Err(ConfigError::new(
            path,
            format!("{w}: weights have at most two decimals (0.01% steps)"),
        ));
    }
    // 0 ≤ rounded ≤ 10 000, so the conversion is exact.
    Ok(rounded as Bp)
}

fn weights(path: &str, bp: Vec<Bp>, names: &[String]) -> Result<Weights, ConfigError> {
    Weights::new(bp).map_err(|e| match e {
        WeightsError::TooFew(n) => ConfigError::new(path, format!("{n} version(s): a split needs at least two")),
        WeightsError::Sum(sum) => ConfigError::new(
            path,
            format!("weights sum to {}%, not 100%", f64::from(sum) / 100.0),
        ),
        WeightsError::SlotOverflow { index, weight, slot } => ConfigError::new(
            path,
            format!(
                "canary {:?} has {}%, but with {} canaries each can take at most {}% \
                 (canaries draw only from the baseline {:?}, so a growing canary never takes users from another)",
                names.get(index).map_or("?", String::as_str),
                f64::from(weight) / 100.0,
                names.len() - 1,
                f64::from(slot.min(max_canary_weight(names.len() - 1))) / 100.0,
                names.first().map_or("?", String::as_str),
            ),
        ),
    })
}

#[cfg(test)]
mod tests;
