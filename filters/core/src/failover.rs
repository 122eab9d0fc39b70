//! The failover decisions: where a request may go, which cloud serves it,
//! when to replay or hedge, and how health is tracked and shared.
//!
//! Everything is a pure function of the config, host facts passed in
//! (header values, `now_ms`, upstream outcomes) and the per-cloud health
//! [`health::Record`]s that the shim keeps in proxy-wasm shared data.
//!
//! A request's life, as the shim drives it:
//! 1. [`scope`] turns the residency header into the allowed clouds;
//!    [`pick`] takes the first healthy allowed cloud in the config's order
//!    (priority, cost, name). None: answer 503 with [`no_cloud_body`].
//! 2. [`attempts::classify`] says whether the request may be sent twice
//!    and whether (and after how long, see [`latency`]) to hedge;
//!    [`attempts::Attempts`] tracks the tries.
//! 3. On a failed try, [`attempts::Attempts::on_upstream_failure`] answers
//!    `ReplayTo(cloud)`, `Wait` (a hedge is still running) or
//!    `GiveUp(reason)`; on an answer, `on_answer` says whether it wins.
//! 4. [`flight::Flight`] runs one request's lifecycle on these pieces:
//!    events in (request, routed response, callout answer, tick, each
//!    with `now_ms`), effects and signals out; the shim and `infermesh
//!    explain` read a request's headers with [`flight::Request`].
//! 5. Every live outcome and probe result updates the cloud's
//!    [`health::Record`] (compare-and-swap in shared data), which moves
//!    the cloud between healthy and unhealthy with hysteresis.

pub mod attempts;
pub mod flight;
pub mod health;
pub mod latency;

pub use crate::config::failover::CloudSet;
use crate::config::failover::FailoverConfig;

/// Why a try failed; also a metric tag. The shim maps Envoy's facts:
/// response flags `UF`, `UH`, `UO`, `NR` (nothing was sent) →
/// `ConnectFailure`; `UC`, `UR`, `URX`, `LR` → `Reset`; `UT` or a callout
/// timeout → `Timeout`; any other response with status ≥ 500 →
/// `Status5xx` (see [`Failure::from_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request never reached the upstream.
    ConnectFailure,
    Reset,
    Timeout,
    Status5xx,
}

impl Failure {
    pub const ALL: [Failure; 4] = [
        Failure::ConnectFailure,
        Failure::Reset,
        Failure::Timeout,
        Failure::Status5xx,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::ConnectFailure => "connect_failure",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::Status5xx => "status_5xx",
        }
    }

    /// True when the upstream may have received (part of) the request, so
    /// only an idempotent request may be sent again.
    pub fn reached_upstream(self) -> bool {
        !matches!(self, Failure::ConnectFailure)
    }

    /// Classifies a response status: `Some(Status5xx)` for 500–599.
    pub fn from_status(status: u16) -> Option<Failure> {
        (500..=599).contains(&status).then_some(Failure::Status5xx)
    }

    /// Classifies a callout's 5xx answer. Envoy answers a failed callout
    /// itself with a short text body (`upstream request timeout`,
    /// `upstream connect error or disconnect/reset before headers. reset
    /// reason: …`, `no healthy upstream`); anything else is the upstream's
    /// own 5xx.
    pub fn from_callout_body(body: &[u8]) -> Failure {
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        if body.starts_with(b"upstream request timeout") {
            Failure::Timeout
        } else if body.starts_with(b"no healthy upstream")
            || (body.starts_with(b"upstream connect error")
                && (has(b"connection failure")
                    || has(b"connection timeout")
                    || has(b"overflow")
                    || has(b"Connection refused")))
        {
            Failure::ConnectFailure
        } else if body.starts_with(b"upstream connect error") {
            Failure::Reset
        } else {
            Failure::Status5xx
        }
    }

    /// Classifies a 5xx response from Envoy's `response.code_details`:
    /// `via_upstream` is the upstream's own 5xx; Envoy's own answers name
    /// what went wrong (`upstream_reset_before_response_started{
    /// remote_connection_failure,…}`, `upstream_response_timeout`,
    /// `no_healthy_upstream`, `cluster_not_found`, …). Unknown details
    /// count as a 5xx that may have reached the upstream, the cautious
    /// reading for non-idempotent requests.
    pub fn from_details(details: &[u8]) -> Failure {
        let has = |needle: &[u8]| details.windows(needle.len()).any(|w| w == needle);
        if details == b"via_upstream" {
            Failure::Status5xx
        } else if has(b"connection_failure")
            || has(b"connection_refused")
            || has(b"Connection_refused")
            || has(b"connect_timeout")
            || has(b"no_healthy_upstream")
            || has(b"cluster_not_found")
            || has(b"route_not_found")
            || has(b"overflow")
            || has(b"maintenance_mode")
        {
            Failure::ConnectFailure
        } else if has(b"timeout") {
            Failure::Timeout
        } else if has(b"reset") || has(b"terminated") {
            Failure::Reset
        } else {
            Failure::Status5xx
        }
    }
}

/// How a request ended; also a metric tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served by the first cloud tried.
    Served,
    /// Served after one or more replays.
    Replayed,
    /// Served by a hedged try that answered first.
    Hedged,
    /// Every try failed, or replay was not allowed; the failure went out.
    Failed,
    /// No healthy allowed cloud: the filter answered 503 itself.
    NoCloud,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Served,
        Outcome::Replayed,
        Outcome::Hedged,
        Outcome::Failed,
        Outcome::NoCloud,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::Replayed => "replayed",
            Outcome::Hedged => "hedged",
            Outcome::Failed => "failed",
            Outcome::NoCloud => "no_cloud",
        }
    }
}

/// Which residency rule applied to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The config has no residency block: every cloud is allowed.
    Unrestricted,
    /// The header matched `cfg.residency.rules[i]`.
    Rule(usize),
    /// The header was absent or empty: the default applies.
    Default,
    /// The header named no rule; `fell_back` when `on_unknown` is
    /// `default`, otherwise no cloud is allowed.
    Unknown { fell_back: bool },
}

/// The clouds a request may go to, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    pub allowed: CloudSet,
    pub applied: Applied,
}

/// Applies the residency rule to the header's value (`None` when absent).
/// Values match ASCII-case-insensitively, surrounding whitespace ignored.
pub fn scope(cfg: &FailoverConfig, value: Option<&[u8]>) -> Scope {
    let r = &cfg.residency;
    if r.header.is_none() {
        return Scope {
            allowed: r.default.clouds,
            applied: Applied::Unrestricted,
        };
    }
    let value = value.map(<[u8]>::trim_ascii).filter(|v| !v.is_empty());
    let Some(value) = value else {
        return Scope {
            allowed: r.default.clouds,
            applied: Applied::Default,
        };
    };
    if let Some(i) = r
        .rules
        .iter()
        .position(|rule| rule.value.as_bytes().eq_ignore_ascii_case(value))
    {
        let allowed = r.rules.get(i).map_or(CloudSet::EMPTY, |x| x.allowed.clouds);
        return Scope {
            allowed,
            applied: Applied::Rule(i),
        };
    }
    let fell_back = r.on_unknown == crate::config::failover::OnUnknown::Default;
    Scope {
        allowed: if fell_back {
            r.default.clouds
        } else {
            CloudSet::EMPTY
        },
        applied: Applied::Unknown { fell_back },
    }
}

/// The first cloud in pick order (priority, cost, name) that is allowed,
/// healthy and not in `exclude` (clouds already tried).
pub fn pick(
    cfg: &FailoverConfig,
    allowed: CloudSet,
    healthy: CloudSet,
    exclude: CloudSet,
) -> Option<usize> {
    cfg.order
        .iter()
        .copied()
        .find(|&c| allowed.contains(c) && healthy.contains(c) && !exclude.contains(c))
}

/// Why no cloud could take a request; also a metric tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCloud {
    /// Residency allows no cloud at all.
    NoneAllowed,
    /// Clouds are allowed, but none of them is healthy.
    NoneHealthy,
}

impl NoCloud {
    pub const ALL: [NoCloud; 2] = [NoCloud::NoneAllowed, NoCloud::NoneHealthy];

    pub fn as_str(self) -> &'static str {
        match self {
            NoCloud::NoneAllowed => "none_allowed",
            NoCloud::NoneHealthy => "none_healthy",
        }
    }

    pub fn of(scope: &Scope) -> NoCloud {
        if scope.allowed.is_empty() {
            NoCloud::NoneAllowed
        } else {
            NoCloud::NoneHealthy
        }
    }
}

/// Status of the filter's own answer when no cloud can take a request.
pub const NO_CLOUD_STATUS: u32 = 503;

/// Longest residency header value echoed back in a 503 body.
const MAX_ECHO: usize = 64;

/// The OIP-style JSON body of the 503 sent when no healthy allowed cloud
/// is left: `{"error": "...", "model": ..., "residency": {...}}`, naming
/// the model (if known) and the residency rule that applied. `value` is
/// the residency header's value as received.
pub fn no_cloud_body(
    cfg: &FailoverConfig,
    model: Option<&str>,
    scope: &Scope,
    value: Option<&[u8]>,
) -> Vec<u8> {
    let r = &cfg.residency;
    let value = value.map(|v| {
        let v = v.trim_ascii();
        String::from_utf8_lossy(v.get(..v.len().min(MAX_ECHO)).unwrap_or_default()).into_owned()
    });
    let (tags, rule_text): (Vec<String>, String) = match scope.applied {
        Applied::Unrestricted => (r.default.tags.clone(), "no residency rule".to_owned()),
        Applied::Rule(i) => {
            let rule = r.rules.get(i);
            (
                rule.map(|x| x.allowed.tags.clone()).unwrap_or_default(),
                format!(
                    "residency {}={:?}",
                    r.header.as_deref().unwrap_or("?"),
                    rule.map_or("?", |x| x.value.as_str())
                ),
            )
        }
        Applied::Default => (
            r.default.tags.clone(),
            format!(
                "the residency default (no {} header)",
                r.header.as_deref().unwrap_or("?")
            ),
        ),
        Applied::Unknown { fell_back } => (
            if fell_back {
                r.default.tags.clone()
            } else {
                Vec::new()
            },
            format!(
                "residency {}={:?}, which no rule lists{}",
                r.header.as_deref().unwrap_or("?"),
                value.as_deref().unwrap_or(""),
                if fell_back { " (default applied)" } else { "" }
            ),
        ),
    };
    let what = match model {
        Some(m) => format!("model {m:?}"),
        None => "this request".to_owned(),
    };
    let message = match NoCloud::of(scope) {
        NoCloud::NoneAllowed => format!("no cloud may serve {what} under {rule_text}"),
        NoCloud::NoneHealthy => format!(
            "no healthy cloud can serve {what}: {} cloud(s) allowed under {rule_text} (tags {tags:?}), none healthy",
            scope.allowed.len()
        ),
    };
    let body = serde_json::json!({
        "error": message,
        "model": model,
        "residency": {
            "header": r.header,
            "value": value,
            "tags": tags,
        },
    });
    serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"error":"no cloud available"}"#.to_vec())
}

/// The filter's own answer when no try succeeded and no upstream failure
/// response is held to pass on (a try timed out, or the total deadline
/// passed): `504` for the deadline or when every try timed out, else
/// `503`, with an OIP-style JSON body naming the model and every try:
/// `{"error": "...", "model": ..., "tries": [{"cloud": ..., "failure": ...}]}`.
pub fn give_up_response(
    cfg: &FailoverConfig,
    model: Option<&str>,
    tries: &[(usize, Failure)],
    reason: attempts::GiveUp,
) -> (u32, Vec<u8>) {
    let timed_out = !tries.is_empty() && tries.iter().all(|(_, f)| *f == Failure::Timeout);
    let status = if reason == attempts::GiveUp::Deadline || timed_out {
        504
    } else {
        503
    };
    let listed: Vec<String> = tries
        .iter()
        .map(|(c, f)| format!("{} ({})", cfg.cloud_name(*c), f.as_str()))
        .collect();
    let what = match model {
        Some(m) => format!("model {m:?}"),
        None => "this request".to_owned(),
    };
    let message = format!(
        "no cloud answered {what}: tried {}; gave up: {}",
        if listed.is_empty() {
            "none".to_owned()
        } else {
            listed.join(", ")
        },
        reason.as_str()
    );
    let tries: Vec<serde_json::Value> = tries
        .iter()
        .map(|(c, f)| serde_json::json!({"cloud": cfg.cloud_name(*c), "failure": f.as_str()}))
        .collect();
    let body = serde_json::json!({"error": message, "model": model, "tries": tries});
    let bytes =
        serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"error":"no cloud answered"}"#.to_vec());
    (status, bytes)
}

#[cfg(test)]
mod tests;
