//! The model-router filter's pluginConfig.
//!
//! ```json
//! {
//!   "models": [{"name": "digits-mlp", "versions": ["1", "2"],
//!               "aliases": {"stable": "1", "canary": "2"}}],
//!   "model_header": "x-model-name",
//!   "version_header": "x-model-version",
//!   "body": {"model_pointer": "/model", "version_pointer": "/parameters/model_version",
//!            "max_bytes": 1048576},
//!   "rewrite_path": true,
//!   "on_unknown": "reject",
//!   "on_non_oip": "pass",
//!   "default_model": null,
//!   "trust_downstream_headers": false,
//!   "served_by_header": true
//! }
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{
    check_client_header, check_len, check_name, check_unique_names, from_json, ConfigError,
};
use crate::jsonscan::Pointer;

pub const MAX_MODELS: usize = 256;
pub const MAX_VERSIONS: usize = 64;
pub const MAX_ALIASES: usize = 64;
/// Default and largest body buffered for body routing.
pub const DEFAULT_BODY_BYTES: usize = 1 << 20;
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// Default and limit of `body.max_wait_ms`.
pub const DEFAULT_BODY_WAIT_MS: u64 = 200;
pub const MAX_BODY_WAIT_MS: u64 = 60_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    models: Vec<RawModel>,
    #[serde(default)]
    model_header: Option<String>,
    #[serde(default)]
    version_header: Option<String>,
    #[serde(default)]
    body: Option<RawBody>,
    #[serde(default)]
    rewrite_path: bool,
    #[serde(default)]
    on_unknown: Option<Unknown>,
    #[serde(default)]
    on_non_oip: Option<Unknown>,
    #[serde(default)]
    default_model: Option<String>,
    #[serde(default)]
    trust_downstream_headers: bool,
    #[serde(default = "super::default_true")]
    served_by_header: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    versions: Vec<String>,
    #[serde(default)]
    aliases: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBody {
    #[serde(default)]
    model_pointer: Option<String>,
    #[serde(default)]
    version_pointer: Option<String>,
    #[serde(default)]
    max_bytes: Option<usize>,
    #[serde(default)]
    max_wait_ms: Option<u64>,
}

/// What to do with a request the router cannot place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unknown {
    /// Answer 404 with an OIP error body; the upstream sees nothing.
    Reject,
    /// Leave the request untouched (default route).
    Pass,
}

/// A validated router config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    pub models: Vec<Model>,
    pub model_header: Option<String>,
    pub version_header: Option<String>,
    pub body: Option<BodySource>,
    pub rewrite_path: bool,
    pub on_unknown: Unknown,
    pub on_non_oip: Unknown,
    /// Index into `models`.
    pub default_model: Option<usize>,
    pub trust_downstream_headers: bool,
    pub served_by_header: bool,
}

/// Body routing: which fields, and how much body to buffer at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodySource {
    pub model: Option<Pointer>,
    pub version: Option<Pointer>,
    pub max_bytes: usize,
    /// How long a request waits for its body before it is routed without
    /// it. Bounds the wait where the host does not hand the filter the body
    /// (Envoy >= 1.35 without `allow_on_headers_stop_iteration`).
    pub max_wait_ms: u64,
}

/// A model the router knows. Invariants: versions unique and valid names;
/// every alias names a listed version and is not itself a version name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub name: String,
    /// Oldest first; `latest` is the last unless an alias says otherwise.
    pub versions: Vec<String>,
    /// alias → index into `versions`, `latest` included.
    pub aliases: Vec<(String, usize)>,
}

impl Model {
    /// Resolves a version name or alias to an index into `versions`.
    pub fn resolve(&self, name: &[u8]) -> Option<usize> {
        self.versions
            .iter()
            .position(|v| v.as_bytes() == name)
            .or_else(|| {
                self.aliases
                    .iter()
                    .find(|(a, _)| a.as_bytes() == name)
                    .map(|(_, i)| *i)
            })
    }
}

impl RouterConfig {
    pub fn model_index(&self, name: &[u8]) -> Option<usize> {
        self.models.iter().position(|m| m.name.as_bytes() == name)
    }
}

/// Parses and validates a model-router pluginConfig.
pub fn parse(bytes: &[u8]) -> Result<RouterConfig, ConfigError> {
    let raw: RawConfig = from_json(bytes)?;
    validate(raw)
}

fn validate(raw: RawConfig) -> Result<RouterConfig, ConfigError> {
    check_len("models", raw.models.len(), MAX_MODELS, "model")?;
    let mut models: Vec<Model> = Vec::with_capacity(raw.models.len());
    for (i, m) in raw.models.into_iter().enumerate() {
        let model = validate_model(&format!("models[{i}]"), m)?;
        if models.iter().any(|o| o.name == model.name) {
            return Err(ConfigError::new(
                format!("models[{i}].name"),
                format!("model {:?} is listed twice", model.name),
            ));
        }
        models.push(model);
    }
    let header = |path: &str, h: Option<String>| -> Result<Option<String>, ConfigError> {
        if let Some(h) = &h {
            check_client_header(path, h)?;
        }
        Ok(h)
    };
    let model_header = header("model_header", raw.model_header)?;
    let version_header = header("version_header", raw.version_header)?;
    let body = match raw.body {
        None => None,
        Some(b) => {
            let pointer = |path: &str, p: Option<String>| -> Result<Option<Pointer>, ConfigError> {
                match p {
                    None => Ok(None),
                    Some(p) => Pointer::parse(&p).map(Some).ok_or_else(|| {
                        ConfigError::new(
                            path,
                            format!("{p:?} is not a JSON pointer such as \"/model\""),
                        )
                    }),
                }
            };
            let model = pointer("body.model_pointer", b.model_pointer)?;
            let version = pointer("body.version_pointer", b.version_pointer)?;
            if model.is_none() && version.is_none() {
                return Err(ConfigError::new(
                    "body",
                    "set model_pointer, version_pointer or both (or remove body)",
                ));
            }
            let max_bytes = b.max_bytes.unwrap_or(DEFAULT_BODY_BYTES);
            if max_bytes == 0 || max_bytes > MAX_BODY_BYTES {
                return Err(ConfigError::new(
                    "body.max_bytes",
                    format!("{max_bytes}: must be between 1 and {MAX_BODY_BYTES}"),
                ));
            }
            let max_wait_ms = b.max_wait_ms.unwrap_or(DEFAULT_BODY_WAIT_MS);
            if max_wait_ms == 0 || max_wait_ms > MAX_BODY_WAIT_MS {
                return Err(ConfigError::new(
                    "body.max_wait_ms",
                    format!("{max_wait_ms}: must be between 1 and {MAX_BODY_WAIT_MS}"),
                ));
            }
            Some(BodySource {
                model,
                version,
                max_bytes,
                max_wait_ms,
            })
        }
    };
    let default_model = match raw.default_model {
        None => None,
        Some(name) => Some(models.iter().position(|m| m.name == name).ok_or_else(|| {
            ConfigError::new(
                "default_model",
                format!("{name:?} is not one of the listed models"),
            )
        })?),
    };
    Ok(RouterConfig {
        models,
        model_header,
        version_header,
        body,
        rewrite_path: raw.rewrite_path,
        on_unknown: raw.on_unknown.unwrap_or(Unknown::Reject),
        on_non_oip: raw.on_non_oip.unwrap_or(Unknown::Pass),
        default_model,
        trust_downstream_headers: raw.trust_downstream_headers,
        served_by_header: raw.served_by_header,
    })
}

fn validate_model(path: &str, raw: RawModel) -> Result<Model, ConfigError> {
    check_name(&format!("{path}.name"), &raw.name)?;
    if raw.versions.is_empty() || raw.versions.len() > MAX_VERSIONS {
        return Err(ConfigError::new(
            format!("{path}.versions"),
            format!("{} versions: list 1 to {MAX_VERSIONS}", raw.versions.len()),
        ));
    }
    check_unique_names(&format!("{path}.versions"), &raw.versions, "version")?;
    if raw.aliases.len() > MAX_ALIASES {
        return Err(ConfigError::new(
            format!("{path}.aliases"),
            format!("{} aliases, the limit is {MAX_ALIASES}", raw.aliases.len()),
        ));
    }
    let mut aliases = Vec::with_capacity(raw.aliases.len() + 1);
    for (alias, target) in &raw.aliases {
        let apath = format!("{path}.aliases.{alias}");
        check_name(&apath, alias)?;
        if raw.versions.contains(alias) {
            return Err(ConfigError::new(
                apath,
                format!("{alias:?} is a version name; an alias must not shadow a version"),
            ));
        }
        let Some(i) = raw.versions.iter().position(|v| v == target) else {
            return Err(ConfigError::new(
                apath,
                format!(
                    "{target:?} is not one of the model's versions {:?}",
                    raw.versions
                ),
            ));
        };
        aliases.push((alias.clone(), i));
    }
    if !raw.aliases.contains_key("latest") && !raw.versions.iter().any(|v| v == "latest") {
        aliases.push(("latest".to_owned(), raw.versions.len() - 1));
    }
    Ok(Model {
        name: raw.name,
        versions: raw.versions,
        aliases,
    })
}

#[cfg(test)]
mod tests;
