//! The model-router decision: which model and version a request names.
//!
//! Each of model and version is taken from the first source that has it:
//! **path** (`/v2/models/{m}[/versions/{v}]/…`) → **header** → **body**
//! (a JSON field, only when configured) → for the model only, the
//! configured **default**. The path wins because the upstream serves what
//! the path names; a header or body that disagrees would route the request
//! to a server that then answers for another model.
//!
//! Versions may be aliases (`stable`, `canary`, `latest`, user-defined),
//! resolved to concrete versions. A request that names a version is
//! *pinned*: `x-infermesh-version` is set and the canary never splits it.
//! One that names only a model gets `x-infermesh-model`, and the canary
//! (if any) picks the version.

use crate::config::router::{RouterConfig, Unknown};
use crate::jsonscan::{self, Found, ScanError};
use crate::oip;

/// Where a name came from; also a metric tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Path,
    Header,
    Body,
    Default,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::Path, Source::Header, Source::Body, Source::Default];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Path => "path",
            Source::Header => "header",
            Source::Body => "body",
            Source::Default => "default",
        }
    }
}

/// Why the body gave no usable field; also a metric tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFallback {
    TooLarge,
    InvalidJson,
    MissingField,
    WrongType,
    /// The host did not hand the filter the body within `max_wait_ms`.
    NotDelivered,
}

impl BodyFallback {
    pub const ALL: [BodyFallback; 5] = [
        BodyFallback::TooLarge,
        BodyFallback::InvalidJson,
        BodyFallback::MissingField,
        BodyFallback::WrongType,
        BodyFallback::NotDelivered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BodyFallback::TooLarge => "too_large",
            BodyFallback::InvalidJson => "invalid_json",
            BodyFallback::MissingField => "missing_field",
            BodyFallback::WrongType => "wrong_type",
            BodyFallback::NotDelivered => "not_delivered",
        }
    }
}

/// Why a request could not be placed; also a metric tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    UnknownModel,
    UnknownVersion,
    NotOip,
}

impl Miss {
    pub const ALL: [Miss; 3] = [Miss::UnknownModel, Miss::UnknownVersion, Miss::NotOip];

    pub fn as_str(self) -> &'static str {
        match self {
            Miss::UnknownModel => "unknown_model",
            Miss::UnknownVersion => "unknown_version",
            Miss::NotOip => "not_oip",
        }
    }
}

/// The body, as far as routing is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    /// No body routing, or no body on this request.
    None,
    /// The whole body (within the cap).
    Complete(&'a [u8]),
    /// Larger than the cap: not read.
    TooLarge,
    /// Wanted, but the host did not deliver it in time.
    NotDelivered,
}

/// Facts about one request.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub path: &'a [u8],
    pub header_model: Option<&'a [u8]>,
    pub header_version: Option<&'a [u8]>,
    pub body: Body<'a>,
}

/// The router's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Route: set `x-infermesh-model`, and `x-infermesh-version` if pinned.
    Route {
        model: usize,
        /// Index into the model's versions, when the request names one.
        version: Option<usize>,
        /// Source of the version if pinned, else of the model.
        source: Source,
        /// New `:path`, when rewriting is on and the path must change.
        rewrite: Option<String>,
    },
    /// Answer 404 with `{"error": message}`.
    Reject { miss: Miss, message: String },
    /// Leave the request untouched.
    Pass { miss: Miss },
}

/// Whether the filter should buffer the body before deciding: body routing
/// is configured and the path and headers leave a field it could fill. A
/// model the path or header names that the router does not know is decided
/// at once (404 or pass): no body can change that.
pub fn needs_body(
    cfg: &RouterConfig,
    path: &[u8],
    header_model: Option<&[u8]>,
    header_version: bool,
) -> bool {
    let Some(body) = &cfg.body else {
        return false;
    };
    let p = oip::parse_path(path);
    let named = p.as_ref().map(|p| p.model.as_bytes()).or(header_model);
    if named.is_some_and(|m| cfg.model_index(m).is_none()) {
        return false;
    }
    let has_model = named.is_some();
    let has_version = p.as_ref().is_some_and(|p| p.version.is_some()) || header_version;
    (body.model.is_some() && !has_model) || (body.version.is_some() && !has_version)
}

fn body_field(
    body: &Body<'_>,
    pointer: Option<&jsonscan::Pointer>,
) -> Result<Option<String>, BodyFallback> {
    let Some(pointer) = pointer else {
        return Ok(None);
    };
    let doc = match body {
        Body::None => return Ok(None),
        Body::TooLarge => return Err(BodyFallback::TooLarge),
        Body::NotDelivered => return Err(BodyFallback::NotDelivered),
        Body::Complete(doc) => doc,
    };
    match jsonscan::find(doc, pointer) {
        Ok(Found::String(s)) | Ok(Found::Integer(s)) => Ok(Some(s)),
        Ok(Found::OtherType) => Err(BodyFallback::WrongType),
        Err(ScanError::Missing) => Err(BodyFallback::MissingField),
        Err(ScanError::Invalid | ScanError::BadPointer) => Err(BodyFallback::InvalidJson),
    }
}

/// Decides for one request. The second value says why the body gave
/// nothing, when it was consulted and did not help (whatever the decision).
pub fn decide(cfg: &RouterConfig, req: &Request<'_>) -> (Decision, Option<BodyFallback>) {
    let mut body_fallback = None;
    let decision = decide_with(cfg, req, &mut body_fallback);
    (decision, body_fallback)
}

fn decide_with(
    cfg: &RouterConfig,
    req: &Request<'_>,
    body_fallback: &mut Option<BodyFallback>,
) -> Decision {
    let path = oip::parse_path(req.path);
    let mut from_body = |pointer| match body_field(&req.body, pointer) {
        Ok(v) => v,
        Err(e) => {
            body_fallback.get_or_insert(e);
            None
        }
    };
    let body_cfg = cfg.body.as_ref();
    // Only read a body field when the earlier sources left it empty.
    let need_model = path.is_none() && req.header_model.is_none();
    let need_version =
        path.as_ref().and_then(|p| p.version.as_ref()).is_none() && req.header_version.is_none();
    let body_model = if need_model {
        from_body(body_cfg.and_then(|b| b.model.as_ref()))
    } else {
        None
    };
    let body_version = if need_version {
        from_body(body_cfg.and_then(|b| b.version.as_ref()))
    } else {
        None
    };

    let model_named: Option<(Vec<u8>, Source)> = path
        .as_ref()
        .map(|p| (p.model.clone().into_bytes(), Source::Path))
        .or_else(|| req.header_model.map(|m| (m.to_vec(), Source::Header)))
        .or_else(|| body_model.map(|m| (m.into_bytes(), Source::Body)));
    let (model_idx, model_source) = match model_named {
        Some((name, source)) => match cfg.model_index(&name) {
            Some(i) => (i, source),
            None => {
                return miss(
                    cfg.on_unknown,
                    Miss::UnknownModel,
                    format!("model {:?} is not served here", String::from_utf8_lossy(&name)),
                )
            }
        },
        None => match cfg.default_model {
            Some(i) => (i, Source::Default),
            None => {
                return miss(
                    cfg.on_non_oip,
                    Miss::NotOip,
                    "the request names no model: use /v2/models/{model}/... (Open Inference Protocol v2)".to_owned(),
                )
            }
        },
    };
    let Some(model) = cfg.models.get(model_idx) else {
        return Decision::Pass {
            miss: Miss::UnknownModel,
        };
    };

    let version_named: Option<(Vec<u8>, Source)> = path
        .as_ref()
        .and_then(|p| p.version.clone())
        .map(|v| (v.into_bytes(), Source::Path))
        .or_else(|| req.header_version.map(|v| (v.to_vec(), Source::Header)))
        .or_else(|| body_version.map(|v| (v.into_bytes(), Source::Body)));
    let (version, source) = match version_named {
        None => (None, model_source),
        Some((name, source)) => match model.resolve(&name) {
            Some(v) => (Some(v), source),
            None => {
                return miss(
                    cfg.on_unknown,
                    Miss::UnknownVersion,
                    format!(
                        "model {:?} has no version {:?}",
                        model.name,
                        String::from_utf8_lossy(&name)
                    ),
                )
            }
        },
    };

    let rewrite = match (&path, version) {
        (Some(p), Some(v)) if cfg.rewrite_path => {
            let concrete = model.versions.get(v).map_or("", String::as_str);
            crate::oip::with_version(req.path, p, concrete)
        }
        _ => None,
    };
    Decision::Route {
        model: model_idx,
        version,
        source,
        rewrite,
    }
}

fn miss(policy: Unknown, miss: Miss, message: String) -> Decision {
    match policy {
        Unknown::Reject => Decision::Reject { miss, message },
        Unknown::Pass => Decision::Pass { miss },
    }
}

/// The OIP-style JSON error body for a rejection.
pub fn error_body(message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": message }))
        .unwrap_or_else(|_| br#"{"error":"not found"}"#.to_vec())
}

#[cfg(test)]
mod tests;
