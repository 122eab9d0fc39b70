//! The canary decision: which version serves a request.
//!
//! Order of precedence, first match wins:
//! 1. no split for the request's model → [`Decision::Unmatched`];
//! 2. the version is already pinned (OIP `/versions/{v}` path, or a trusted
//!    `x-infermesh-version` from model-router) → [`Decision::Pinned`];
//! 3. a tester override header naming a listed version → `How::Override`;
//!    an unlisted one is ignored (counted, and the request is split as if
//!    the header were absent), so a typo can never route to a version the
//!    rollout does not list;
//! 4. a sticky key → `How::Keyed` (same key, same version, everywhere);
//! 5. otherwise a random bucket → `How::Unkeyed`.

use crate::config::canary::{CanaryConfig, KeySource};
use crate::cookie;
use crate::hash::{bucket, random_bucket};
use crate::oip;
use crate::weights::Weights;

/// Facts about one request, read by the shim from the host.
#[derive(Debug, Default, Clone)]
pub struct Request<'a> {
    /// `:path`, raw bytes.
    pub path: &'a [u8],
    /// `x-infermesh-model`, only when the config trusts it.
    pub trusted_model: Option<&'a [u8]>,
    /// `x-infermesh-version`, only when the config trusts it.
    pub trusted_version: Option<&'a [u8]>,
    /// The override header's value.
    pub override_version: Option<&'a [u8]>,
    /// The sticky key, see [`sticky_key`].
    pub sticky_key: Option<&'a [u8]>,
}

/// How a split version was chosen; also a metric tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    Keyed,
    Unkeyed,
    Override,
}

impl How {
    pub const ALL: [How; 3] = [How::Keyed, How::Unkeyed, How::Override];

    pub fn as_str(self) -> &'static str {
        match self {
            How::Keyed => "keyed",
            How::Unkeyed => "unkeyed",
            How::Override => "override",
        }
    }
}

/// The filter's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No split for this model (or no model): leave routing alone.
    Unmatched,
    /// The request already names a version. `version` is its index when the
    /// split lists it (the shim then sets the header), `None` otherwise.
    Pinned {
        split: usize,
        version: Option<usize>,
    },
    /// Route to `version` of `split`.
    Split {
        split: usize,
        version: usize,
        how: How,
        /// An override header named a version the split does not list.
        override_rejected: bool,
    },
}

/// Decides for one request at `now_ms`; `random` is a fresh random word,
/// used only for requests without a sticky key.
pub fn decide(cfg: &CanaryConfig, req: &Request<'_>, now_ms: u64, random: u64) -> Decision {
    decide_guarded(cfg, req, now_ms, random, &[])
}

/// [`decide`], with the weights a guard put in force: `guarded[split]`,
/// when `Some`, replaces the split's scheduled weights (see
/// [`crate::guard::Record::effective`]); a shorter slice leaves the
/// other splits alone.
pub fn decide_guarded(
    cfg: &CanaryConfig,
    req: &Request<'_>,
    now_ms: u64,
    random: u64,
    guarded: &[Option<Weights>],
) -> Decision {
    let path = oip::parse_path(req.path);
    let split_idx = match req.trusted_model {
        Some(m) => cfg.split_index(m),
        None => path
            .as_ref()
            .and_then(|p| cfg.split_index(p.model.as_bytes())),
    };
    let Some((split_idx, split)) = split_idx.and_then(|i| cfg.splits.get(i).map(|s| (i, s))) else {
        return Decision::Unmatched;
    };

    let pinned = req.trusted_version.or_else(|| {
        path.as_ref()
            .and_then(|p| p.version.as_deref())
            .map(str::as_bytes)
    });
    if let Some(v) = pinned {
        return Decision::Pinned {
            split: split_idx,
            version: split.version_index(v),
        };
    }

    let mut override_rejected = false;
    if let Some(v) = req.override_version {
        match split.version_index(v) {
            Some(version) => {
                return Decision::Split {
                    split: split_idx,
                    version,
                    how: How::Override,
                    override_rejected: false,
                }
            }
            None => override_rejected = true,
        }
    }

    let weights = match guarded.get(split_idx) {
        Some(Some(w)) => w,
        _ => split.weights_at(now_ms),
    };
    let (version, how) = match req.sticky_key {
        Some(key) => (weights.pick(bucket(&split.model, key)), How::Keyed),
        None => (weights.pick(random_bucket(random)), How::Unkeyed),
    };
    Decision::Split {
        split: split_idx,
        version,
        how,
        override_rejected,
    }
}

/// Finds the sticky key: the first configured source present and
/// non-empty. `header` fetches a request header's raw value.
pub fn sticky_key<F>(sources: &[KeySource], mut header: F) -> Option<Vec<u8>>
where
    F: FnMut(&str) -> Option<Vec<u8>>,
{
    let mut cookie_header: Option<Option<Vec<u8>>> = None;
    for src in sources {
        match src {
            KeySource::Header(name) => {
                if let Some(v) = header(name).filter(|v| !v.is_empty()) {
                    return Some(v);
                }
            }
            KeySource::Cookie(name) => {
                let all = cookie_header.get_or_insert_with(|| header("cookie"));
                if let Some(v) = all.as_deref().and_then(|h| cookie::find(h, name)) {
                    return Some(v.to_vec());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
