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
//!
//! An optional top-level `hosts` list scopes the module by `:authority`:
//! requests to any other host pass through untouched (no header is read
//! beyond `:authority`, none is removed or set), so a broad WasmPlugin
//! match can never reach another service's traffic. Entries are host
//! names (`digits-mlp.models.svc.cluster.local`, `digits-mlp`) or suffix
//! wildcards (`*.models.svc.cluster.local`); the port of the authority is
//! ignored and names compare case-insensitively.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use super::canary::CanaryConfig;
use super::failover::FailoverConfig;
use super::router::RouterConfig;
use super::{from_json, ConfigError};

/// The section names, in the order the stages run.
pub const SECTIONS: [&str; 3] = ["router", "canary", "failover"];
/// The top-level keys besides the sections.
pub const HOSTS: &str = "hosts";
/// Most `hosts` entries.
pub const MAX_HOSTS: usize = 64;

/// A validated module config: the stages that run, each validated by its
/// own parser.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleConfig {
    /// `None`: every request; else only requests to these hosts.
    pub hosts: Option<Vec<HostPattern>>,
    pub router: Option<RouterConfig>,
    pub canary: Option<CanaryConfig>,
    pub failover: Option<FailoverConfig>,
}

/// One `hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// The whole host name, lower-case.
    Exact(String),
    /// `*.suffix`: any host ending in `.suffix` (lower-case, without `*.`).
    Suffix(String),
}

impl HostPattern {
    fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostPattern::Exact(h) => host.eq_ignore_ascii_case(h.as_bytes()),
            HostPattern::Suffix(s) => {
                host.len() > s.len() + 1
                    && host
                        .get(host.len() - s.len() - 1..)
                        .and_then(|tail| tail.split_first())
                        .is_some_and(|(dot, rest)| {
                            *dot == b'.' && rest.eq_ignore_ascii_case(s.as_bytes())
                        })
            }
        }
    }
}

/// Whether `authority`'s host matches one of `hosts`.
pub fn in_scope(hosts: &[HostPattern], authority: &[u8]) -> bool {
    let host = authority_host(authority);
    hosts.iter().any(|p| p.matches(host))
}

/// The host of an `:authority` (`host`, `host:port`, `[v6]:port`).
fn authority_host(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        return authority
            .iter()
            .position(|&c| c == b']')
            .and_then(|end| authority.get(..=end))
            .unwrap_or(authority);
    }
    match authority.iter().rposition(|&c| c == b':') {
        Some(colon) => authority.get(..colon).unwrap_or(authority),
        None => authority,
    }
}

impl ModuleConfig {
    /// Whether a request to `authority` is the module's to decide on.
    pub fn concerns(&self, authority: &[u8]) -> bool {
        self.hosts
            .as_deref()
            .is_none_or(|hosts| in_scope(hosts, authority))
    }

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
    let hosts = raw.remove(HOSTS).map(|h| parse_hosts(&h)).transpose()?;
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
        hosts,
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

fn parse_hosts(raw: &RawValue) -> Result<Vec<HostPattern>, ConfigError> {
    let list: Vec<String> = serde_json::from_str(raw.get())
        .map_err(|e| ConfigError::new(HOSTS, format!("must be a list of host names: {e}")))?;
    super::check_len(HOSTS, list.len(), MAX_HOSTS, "host")?;
    list.into_iter()
        .enumerate()
        .map(|(i, h)| {
            let path = format!("{HOSTS}[{i}]");
            let (pattern, name) = match h.strip_prefix("*.") {
                Some(rest) => (HostPattern::Suffix(rest.to_ascii_lowercase()), rest),
                None => (HostPattern::Exact(h.to_ascii_lowercase()), h.as_str()),
            };
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            };
            if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
                return Err(ConfigError::new(
                    path,
                    format!("{h:?} is not a host name or *.suffix (no port, no scheme)"),
                ));
            }
            Ok(pattern)
        })
        .collect()
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
