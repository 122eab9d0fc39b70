//! The pluginConfig of the one shipped module, `infermesh.wasm`: one
//! optional section per stage, each with the schema that stage has always
//! had.
//!
//! ```json
//! {
//!   "router":   { "models": [...], "body": {...}, ... },
//!   "canary":   { "splits": [...], "sticky_key": [...], ... },
//!   "failover": { "clouds": [...], "residency": {...}, ... }
//! }
//! ```
//!
//! Stages run in that order in one pass. At least one section is required:
//! a module that would do nothing is a mistake in the manifest, not a
//! no-op. Errors name the field with its section prefix
//! (`failover.clouds[2].cluster: ...`).

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use super::canary::CanaryConfig;
use super::failover::FailoverConfig;
use super::router::RouterConfig;
use super::{from_json, ConfigError};

/// The section names, in the order the stages run.
pub const SECTIONS: [&str; 3] = ["router", "canary", "failover"];

/// A validated module config: the stages that run, each validated by its
/// own parser.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleConfig {
    pub router: Option<RouterConfig>,
    pub canary: Option<CanaryConfig>,
    pub failover: Option<FailoverConfig>,
}

impl ModuleConfig {
    /// Whether client-sent `x-infermesh-*` headers are removed: unless
    /// every configured stage trusts them. A stage that trusts downstream
    /// headers behind one that does not would otherwise let a client pick
    /// its version or cloud.
    pub fn strips_downstream_headers(&self) -> bool {
        let trusts = [
            self.router.as_ref().map(|c| c.trust_downstream_headers),
            self.canary.as_ref().map(|c| c.trust_downstream_headers),
            self.failover.as_ref().map(|c| c.trust_downstream_headers),
        ];
        trusts.iter().flatten().any(|trust| !trust)
    }

    /// Whether responses get `x-infermesh-served-by`: if any configured
    /// stage asks for it.
    pub fn served_by_header(&self) -> bool {
        self.router.as_ref().is_some_and(|c| c.served_by_header)
            || self.canary.as_ref().is_some_and(|c| c.served_by_header)
            || self.failover.as_ref().is_some_and(|c| c.served_by_header)
    }

    /// The configured section names, in stage order.
    pub fn stages(&self) -> Vec<&'static str> {
        let on = [
            self.router.is_some(),
            self.canary.is_some(),
            self.failover.is_some(),
        ];
        SECTIONS
            .iter()
            .zip(on)
            .filter_map(|(name, on)| on.then_some(*name))
            .collect()
    }
}

/// Parses and validates the module's pluginConfig.
pub fn parse(bytes: &[u8]) -> Result<ModuleConfig, ConfigError> {
    // A map rather than a struct: `"canary": null` must be an error, not
    // a section left out.
    let mut raw: BTreeMap<String, Box<RawValue>> = from_json(bytes)?;
    if let Some(unknown) = raw.keys().find(|k| !SECTIONS.contains(&k.as_str())) {
        return Err(ConfigError::new(
            unknown.as_str(),
            format!(
                "unknown section {unknown:?}, expected one of {}",
                SECTIONS.join(", ")
            ),
        ));
    }
    if raw.is_empty() {
        return Err(ConfigError::new(
            ".",
            "no stage is configured: give at least one of the sections \"router\", \"canary\", \"failover\"",
        ));
    }
    Ok(ModuleConfig {
        router: section(
            "router",
            raw.remove("router").as_deref(),
            super::router::parse,
        )?,
        canary: section(
            "canary",
            raw.remove("canary").as_deref(),
            super::canary::parse,
        )?,
        failover: section(
            "failover",
            raw.remove("failover").as_deref(),
            super::failover::parse,
        )?,
    })
}

/// Parses one section with its stage's parser and prefixes error paths
/// with the section name.
fn section<T>(
    name: &str,
    raw: Option<&RawValue>,
    parse: fn(&[u8]) -> Result<T, ConfigError>,
) -> Result<Option<T>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let text = raw.get();
    if text.trim_start().starts_with("null") {
        return Err(ConfigError::new(
            name,
            "must be an object (leave the section out to turn the stage off)",
        ));
    }
    parse(text.as_bytes()).map(Some).map_err(|e| {
        let path = match e.path.as_str() {
            "." | "" => name.to_owned(),
            p if p.starts_with('[') => format!("{name}{p}"),
            p => format!("{name}.{p}"),
        };
        ConfigError::new(path, e.message)
    })
}

#[cfg(test)]
mod tests;
