//! The failover filter's pluginConfig.
//!
//! ```json
//! {
//!   "clouds": [
//!     {"name": "aws-eu", "cluster": "outbound|8000||inference.aws-eu.example.com",
//!      "authority": "inference.aws-eu.example.com",
//!      "tags": ["eu", "aws"], "priority": 0, "cost": 1.0},
//!     {"name": "gcp-eu", "cluster": "outbound|8000||inference.gcp-eu.example.com",
//!      "tags": ["eu", "gcp"], "priority": 0, "cost": 1.4},
//!     {"name": "aws-us", "cluster": "outbound|8000||inference.aws-us.example.com",
//!      "tags": ["us", "aws"], "priority": 1, "cost": 0.7}
//!   ],
//!   "residency": {
//!     "header": "x-data-residency",
//!     "rules": {"eu": ["eu"], "us": ["us"], "global": ["*"]},
//!     "default": ["eu"],
//!     "on_unknown": "reject"
//!   },
//!   "health": {
//!     "probe": {"interval_ms": 5000, "timeout_ms": 1000,
//!               "healthy_threshold": 2, "unhealthy_threshold": 3,
//!               "models": [{"model": "digits-mlp", "version": "2"}]},
//!     "passive": {"consecutive_failures": 5,
//!                 "failure_rate": {"percent": 50, "min_requests": 20, "window_ms": 10000}}
//!   },
//!   "replay": {"max_attempts": 3, "max_body_bytes": 1048576,
//!              "per_try_timeout_ms": 5000, "total_deadline_ms": 12000,
//!              "infer_idempotent": true},
//!   "hedge": {"enabled": true, "percentile": 95, "min_delay_ms": 20, "max_delay_ms": 1000,
//!             "models": {"tiny-cnn": {"enabled": false}, "digits-mlp": {"delay_ms": 50}}},
//!   "trust_downstream_headers": false,
//!   "served_by_header": true
//! }
//! ```
//!
//! Only `clouds` is required. Clouds are tried by `priority` (lower first),
//! then `cost` (lower first), then name. A residency rule maps a header
//! value to tags; a cloud is allowed when it carries at least one of them
//! (`"*"` allows every cloud, `[]` none). Without `residency` every cloud is
//! allowed. Durations are milliseconds.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{check_header_name, check_name, check_token, from_json, ConfigError};
use crate::headers;

mod settings;
mod types;

use settings::{validate_health, validate_hedge, validate_replay, RawHealth, RawHedge, RawReplay};
pub use types::*;

/// Upper bounds that keep a config, its shared state and metrics bounded.
pub const MAX_CLOUDS: usize = 32;
pub const MAX_TAGS: usize = 16;
pub const MAX_RULES: usize = 64;
pub const MAX_PROBE_MODELS: usize = 8;
pub const MAX_HEDGE_MODELS: usize = 256;
pub const MAX_ATTEMPTS: u8 = 8;
pub const MAX_THRESHOLD: u16 = 1_000;
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// The tag that allows every cloud.
pub const ANY_TAG: &str = "*";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    clouds: Vec<RawCloud>,
    #[serde(default)]
    residency: Option<RawResidency>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    replay: RawReplay,
    #[serde(default)]
    hedge: RawHedge,
    #[serde(default)]
    trust_downstream_headers: bool,
    #[serde(default = "super::default_true")]
    served_by_header: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloud {
    name: String,
    cluster: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    priority: u32,
    #[serde(default)]
    cost: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResidency {
    header: String,
    #[serde(default)]
    rules: BTreeMap<String, Vec<String>>,
    default: Vec<String>,
    #[serde(default)]
    on_unknown: Option<OnUnknown>,
}

/// Parses and validates a failover pluginConfig.
pub fn parse(bytes: &[u8]) -> Result<FailoverConfig, ConfigError> {
    let raw: RawConfig = from_json(bytes)?;
    validate(raw)
}

fn validate(raw: RawConfig) -> Result<FailoverConfig, ConfigError> {
    if raw.clouds.is_empty() {
        return Err(ConfigError::new("clouds", "at least one cloud is required"));
    }
    if raw.clouds.len() > MAX_CLOUDS {
        return Err(ConfigError::new(
            "clouds",
            format!("{} clouds, the limit is {MAX_CLOUDS}", raw.clouds.len()),
        ));
    }
    let mut clouds: Vec<Cloud> = Vec::with_capacity(raw.clouds.len());
    for (i, c) in raw.clouds.into_iter().enumerate() {
        let cloud = validate_cloud(&format!("clouds[{i}]"), c)?;
        if clouds.iter().any(|o| o.name == cloud.name) {
            return Err(ConfigError::new(
                format!("clouds[{i}].name"),
                format!("cloud {:?} is listed twice", cloud.name),
            ));
        }
        if let Some(o) = clouds.iter().find(|o| o.cluster == cloud.cluster) {
            return Err(ConfigError::new(
                format!("clouds[{i}].cluster"),
                format!(
                    "cluster {:?} is already used by cloud {:?}",
                    cloud.cluster, o.name
                ),
            ));
        }
        clouds.push(cloud);
    }
    let mut order: Vec<usize> = (0..clouds.len()).collect();
    order.sort_by(|&a, &b| match (clouds.get(a), clouds.get(b)) {
        (Some(a), Some(b)) => a
            .priority
            .cmp(&b.priority)
            .then(a.cost.total_cmp(&b.cost))
            .then(a.name.cmp(&b.name)),
        _ => a.cmp(&b),
    });

    let residency = match raw.residency {
        None => Residency {
            header: None,
            rules: Vec::new(),
            default: Allowed {
                tags: vec![ANY_TAG.to_owned()],
                clouds: CloudSet::all(clouds.len()),
            },
            on_unknown: OnUnknown::Reject,
        },
        Some(r) => validate_residency(r, &clouds)?,
    };
    let health = validate_health(raw.health)?;
    let replay = validate_replay(raw.replay)?;
    let hedge = validate_hedge(raw.hedge, &replay)?;
    Ok(FailoverConfig {
        clouds,
        order,
        residency,
        health,
        replay,
        hedge,
        trust_downstream_headers: raw.trust_downstream_headers,
        served_by_header: raw.served_by_header,
    })
}

fn validate_cloud(path: &str, raw: RawCloud) -> Result<Cloud, ConfigError> {
    check_name(&format!("{path}.name"), &raw.name)?;
    check_token(&format!("{path}.cluster"), "cluster name", &raw.cluster)?;
    let authority = match raw.authority {
        Some(a) => {
            check_token(&format!("{path}.authority"), "authority", &a)?;
            a
        }
        None => raw.cluster.clone(),
    };
    if raw.tags.len() > MAX_TAGS {
        return Err(ConfigError::new(
            format!("{path}.tags"),
            format!("{} tags, the limit is {MAX_TAGS}", raw.tags.len()),
        ));
    }
    super::check_unique_names(&format!("{path}.tags"), &raw.tags, "tag")?;
    if !raw.cost.is_finite() || raw.cost < 0.0 {
        return Err(ConfigError::new(
            format!("{path}.cost"),
            format!("{}: must be a finite number ≥ 0", raw.cost),
        ));
    }
    Ok(Cloud {
        name: raw.name,
        cluster: raw.cluster,
        authority,
        tags: raw.tags,
        priority: raw.priority,
        cost: raw.cost,
    })
}

/// Resolves a tag list to the clouds it allows; every tag must be carried
/// by at least one cloud (a typo would otherwise silently allow nothing).
fn allowed(path: &str, tags: Vec<String>, clouds: &[Cloud]) -> Result<Allowed, ConfigError> {
    let mut set = CloudSet::EMPTY;
    for (i, t) in tags.iter().enumerate() {
        let tpath = format!("{path}[{i}]");
        if tags.iter().take(i).any(|o| o == t) {
            return Err(ConfigError::new(
                tpath,
                format!("tag {t:?} is listed twice"),
            ));
        }
        if t == ANY_TAG {
            set = CloudSet::all(clouds.len());
            continue;
        }
        check_name(&tpath, t)?;
        let carriers: Vec<usize> = (0..clouds.len())
            .filter(|&c| clouds.get(c).is_some_and(|c| c.tags.contains(t)))
            .collect();
        if carriers.is_empty() {
            return Err(ConfigError::new(
                tpath,
                format!("no cloud carries tag {t:?}"),
            ));
        }
        for c in carriers {
            set.insert(c);
        }
    }
    Ok(Allowed { tags, clouds: set })
}

fn validate_residency(raw: RawResidency, clouds: &[Cloud]) -> Result<Residency, ConfigError> {
    check_header_name("residency.header", &raw.header)?;
    if headers::is_owned(&raw.header) {
        return Err(ConfigError::new(
            "residency.header",
            format!(
                "{:?} starts with {:?}: those headers are removed from downstream requests",
                raw.header,
                headers::PREFIX
            ),
        ));
    }
    if raw.rules.len() > MAX_RULES {
        return Err(ConfigError::new(
            "residency.rules",
            format!("{} rules, the limit is {MAX_RULES}", raw.rules.len()),
        ));
    }
    let mut rules: Vec<Rule> = Vec::with_capacity(raw.rules.len());
    for (value, tags) in raw.rules {
        let path = format!("residency.rules.{value}");
        let ok =
            !value.is_empty() && value.len() <= 64 && value.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(ConfigError::new(
                path,
                format!("{value:?} is not a header value (1 to 64 printable ASCII characters, no spaces)"),
            ));
        }
        if rules.iter().any(|r| r.value.eq_ignore_ascii_case(&value)) {
            return Err(ConfigError::new(
                path,
                format!("{value:?} differs from another rule only in case; values match case-insensitively"),
            ));
        }
        let allowed = allowed(&path, tags, clouds)?;
        rules.push(Rule { value, allowed });
    }
    let default = allowed("residency.default", raw.default, clouds)?;
    Ok(Residency {
        header: Some(raw.header),
        rules,
        default,
        on_unknown: raw.on_unknown.unwrap_or(OnUnknown::Reject),
    })
}

#[cfg(test)]
mod tests;
