//! Validation of the `health`, `replay` and `hedge` sections.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::types::*;
use super::{MAX_ATTEMPTS, MAX_BODY_BYTES, MAX_HEDGE_MODELS, MAX_PROBE_MODELS, MAX_THRESHOLD};
use crate::config::{check_name, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    #[serde(default)]
    probe: RawProbe,
    #[serde(default)]
    passive: RawPassive,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProbe {
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    healthy_threshold: Option<u16>,
    unhealthy_threshold: Option<u16>,
    #[serde(default)]
    models: Vec<RawProbeModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProbeModel {
    model: String,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPassive {
    consecutive_failures: Option<u16>,
    #[serde(default)]
    failure_rate: Option<RawRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    percent: u8,
    min_requests: Option<u32>,
    window_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReplay {
    max_attempts: Option<u8>,
    max_body_bytes: Option<usize>,
    per_try_timeout_ms: Option<u64>,
    total_deadline_ms: Option<u64>,
    infer_idempotent: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHedge {
    enabled: Option<bool>,
    delay_ms: Option<u64>,
    percentile: Option<u8>,
    min_delay_ms: Option<u64>,
    max_delay_ms: Option<u64>,
    #[serde(default)]
    models: BTreeMap<String, RawModelHedge>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModelHedge {
    enabled: Option<bool>,
    delay_ms: Option<u64>,
}

/// `value` must lie in `lo..=hi`.
fn in_range<T>(path: &str, value: T, lo: T, hi: T, unit: &str) -> Result<T, ConfigError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    if value < lo || value > hi {
        return Err(ConfigError::new(
            path,
            format!("{value}{unit}: must be between {lo}{unit} and {hi}{unit}"),
        ));
    }
    Ok(value)
}

pub(super) fn validate_health(raw: RawHealth) -> Result<Health, ConfigError> {
    let p = raw.probe;
    let interval_ms = in_range(
        "health.probe.interval_ms",
        p.interval_ms.unwrap_or(5_000),
        100,
        300_000,
        "ms",
    )?;
    let timeout_ms = in_range(
        "health.probe.timeout_ms",
        p.timeout_ms.unwrap_or(1_000),
        10,
        60_000,
        "ms",
    )?;
    if timeout_ms > interval_ms {
        return Err(ConfigError::new(
            "health.probe.timeout_ms",
            format!(
                "{timeout_ms}ms is longer than interval_ms ({interval_ms}ms): probes would overlap"
            ),
        ));
    }
    let threshold = |path: &str, v: Option<u16>, default: u16| {
        in_range(path, v.unwrap_or(default), 1, MAX_THRESHOLD, "")
    };
    let healthy_threshold = threshold("health.probe.healthy_threshold", p.healthy_threshold, 2)?;
    let unhealthy_threshold =
        threshold("health.probe.unhealthy_threshold", p.unhealthy_threshold, 3)?;
    if p.models.len() > MAX_PROBE_MODELS {
        return Err(ConfigError::new(
            "health.probe.models",
            format!("{} models, the limit is {MAX_PROBE_MODELS}", p.models.len()),
        ));
    }
    let mut paths = vec![SERVER_READY_PATH.to_owned()];
    for (i, m) in p.models.into_iter().enumerate() {
        let mpath = format!("health.probe.models[{i}]");
        check_name(&format!("{mpath}.model"), &m.model)?;
        // Names are restricted to [A-Za-z0-9._-]: no percent-encoding needed.
        let path = match m.version {
            Some(v) => {
                check_name(&format!("{mpath}.version"), &v)?;
                format!("/v2/models/{}/versions/{v}/ready", m.model)
            }
            None => format!("/v2/models/{}/ready", m.model),
        };
        if paths.contains(&path) {
            return Err(ConfigError::new(mpath, format!("{path} is probed twice")));
        }
        paths.push(path);
    }
    let passive = raw.passive;
    let consecutive_failures = threshold(
        "health.passive.consecutive_failures",
        passive.consecutive_failures,
        5,
    )?;
    let failure_rate = match passive.failure_rate {
        None => None,
        Some(r) => Some(FailureRate {
            percent: in_range(
                "health.passive.failure_rate.percent",
                r.percent,
                1,
                100,
                "%",
            )?,
            min_requests: in_range(
                "health.passive.failure_rate.min_requests",
                r.min_requests.unwrap_or(20),
                1,
                1_000_000,
                "",
            )?,
            window_ms: in_range(
                "health.passive.failure_rate.window_ms",
                r.window_ms.unwrap_or(10_000),
                1_000,
                600_000,
                "ms",
            )?,
        }),
    };
    Ok(Health {
        probe: Probe {
            interval_ms,
            timeout_ms,
            healthy_threshold,
            unhealthy_threshold,
            paths,
        },
        passive: Passive {
            consecutive_failures,
            failure_rate,
        },
    })
}

pub(super) fn validate_replay(raw: RawReplay) -> Result<Replay, ConfigError> {
    let max_attempts = in_range(
        "replay.max_attempts",
        raw.max_attempts.unwrap_or(3),
        1,
        MAX_ATTEMPTS,
        "",
    )?;
    let max_body_bytes = in_range(
        "replay.max_body_bytes",
        raw.max_body_bytes.unwrap_or(1 << 20),
        0,
        MAX_BODY_BYTES,
        " bytes",
    )?;
    let per_try_timeout_ms = in_range(
        "replay.per_try_timeout_ms",
        raw.per_try_timeout_ms.unwrap_or(10_000),
        10,
        300_000,
        "ms",
    )?;
    let total_deadline_ms = in_range(
        "replay.total_deadline_ms",
        raw.total_deadline_ms.unwrap_or(30_000),
        10,
        600_000,
        "ms",
    )?;
    if total_deadline_ms < per_try_timeout_ms {
        return Err(ConfigError::new(
            "replay.total_deadline_ms",
            format!(
                "{total_deadline_ms}ms is shorter than per_try_timeout_ms ({per_try_timeout_ms}ms)"
            ),
        ));
    }
    Ok(Replay {
        max_attempts,
        max_body_bytes,
        per_try_timeout_ms,
        total_deadline_ms,
        infer_idempotent: raw.infer_idempotent.unwrap_or(true),
    })
}

pub(super) fn validate_hedge(raw: RawHedge, replay: &Replay) -> Result<Hedge, ConfigError> {
    let limit = replay.per_try_timeout_ms.saturating_sub(1);
    let fixed = |path: &str, ms: u64| -> Result<HedgeDelay, ConfigError> {
        if ms == 0 || ms > limit {
            return Err(ConfigError::new(
                path,
                format!("{ms}ms: must be between 1ms and {limit}ms (below replay.per_try_timeout_ms, or the try times out first)"),
            ));
        }
        Ok(HedgeDelay::Fixed { ms })
    };
    let delay = match raw.delay_ms {
        Some(ms) => fixed("hedge.delay_ms", ms)?,
        None => {
            let percentile =
                in_range("hedge.percentile", raw.percentile.unwrap_or(95), 50, 99, "")?;
            let min_ms = in_range(
                "hedge.min_delay_ms",
                raw.min_delay_ms.unwrap_or(20),
                1,
                limit.max(1),
                "ms",
            )?;
            let max_ms = in_range(
                "hedge.max_delay_ms",
                raw.max_delay_ms.unwrap_or(1_000.min(limit)),
                min_ms,
                limit.max(min_ms),
                "ms",
            )?;
            HedgeDelay::Derived {
                percentile,
                min_ms,
                max_ms,
            }
        }
    };
    if raw.delay_ms.is_some() {
        for (field, set) in [
            ("percentile", raw.percentile.is_some()),
            ("min_delay_ms", raw.min_delay_ms.is_some()),
            ("max_delay_ms", raw.max_delay_ms.is_some()),
        ] {
            if set {
                return Err(ConfigError::new(
                    format!("hedge.{field}"),
                    "only applies to a derived delay; remove it or remove delay_ms",
                ));
            }
        }
    }
    let enabled = raw.enabled.unwrap_or(true);
    if raw.models.len() > MAX_HEDGE_MODELS {
        return Err(ConfigError::new(
            "hedge.models",
            format!(
                "{} models, the limit is {MAX_HEDGE_MODELS}",
                raw.models.len()
            ),
        ));
    }
    let mut models = Vec::with_capacity(raw.models.len());
    for (name, m) in raw.models {
        let path = format!("hedge.models.{name}");
        check_name(&path, &name)?;
        let delay = match m.delay_ms {
            Some(ms) => fixed(&format!("{path}.delay_ms"), ms)?,
            None => delay.clone(),
        };
        let policy = if m.enabled.unwrap_or(enabled) {
            Some(delay)
        } else {
            None
        };
        models.push((name, policy));
    }
    Ok(Hedge {
        default: enabled.then_some(delay),
        models,
    })
}

#[cfg(test)]
mod tests;
