//! Metric names in the form Istio's stats tag extraction understands.
//!
//! proxy-wasm metrics have no labels, only names. Istio's bootstrap (and
//! ours in the e2e tests) extracts tags with the regex
//! `(TAG=\.=(.*?);\.;)`, the convention Istio's own telemetry uses, so a
//! metric defined as
//!
//! ```text
//! infermesh_canary_requests_total.model=.=digits-mlp;.;version=.=2;.;
//! ```
//!
//! shows up in `/stats/prometheus` as
//! `infermesh_canary_requests_total{model="digits-mlp",version="2"}`.
//! In Istio, list the tags in `meshConfig.defaultConfig.extraStatTags` (see
//! `istio/`).

/// How often the module publishes its counters to Envoy, at most: a
/// request adds to a count in the VM, and the root's tick (this often, or
/// sooner when a stage ticks faster) sends every changed count in one
/// `increment_metric` each. A host call per request per counter costs more
/// than the rest of a canary decision; a count in `/stats` lags by up to
/// this much instead. Gauges and histograms are written at once.
pub const COUNTER_FLUSH_MS: u64 = 100;

/// Metric names, one module per stage: the module defines them, and the
/// tests, the demo and the benchmarks read them.
pub mod router {
    pub const REQUESTS: &str = "infermesh_router_requests_total";
    pub const REJECTED: &str = "infermesh_router_rejected_total";
    pub const PASSED: &str = "infermesh_router_passthrough_total";
    pub const BODY_FALLBACK: &str = "infermesh_router_body_fallback_total";
    pub const STRIPPED: &str = "infermesh_router_stripped_headers_total";
}

pub mod canary {
    pub const REQUESTS: &str = "infermesh_canary_requests_total";
    pub const OVERRIDE_REJECTED: &str = "infermesh_canary_override_rejected_total";
    pub const UNMATCHED: &str = "infermesh_canary_unmatched_total";
    pub const STRIPPED: &str = "infermesh_canary_stripped_headers_total";
    pub const WEIGHT: &str = "infermesh_canary_weight_bp";
    /// Gauge per canary version: 0 normal, 1 tripped, 2 probing.
    pub const GUARD_STATE: &str = "infermesh_canary_guard_state";
    /// Trips per canary version, tagged with the rule as `reason`.
    pub const GUARD_TRIPS: &str = "infermesh_canary_guard_trips_total";
    /// Outcomes the guard counted per version (`outcome`: ok, error).
    pub const GUARD_OUTCOMES: &str = "infermesh_canary_guard_outcomes_total";
    /// Gauge per split with a promotion gate: 1 while its schedule is
    /// held for want of shadow agreement.
    pub const PROMOTION_HELD: &str = "infermesh_canary_promotion_held";
}

pub mod shadow {
    /// Copies sent to the shadow version that it answered below 500.
    pub const REQUESTS: &str = "infermesh_shadow_requests_total";
    /// Copies that failed: a 5xx, a reset or no answer in time.
    pub const ERRORS: &str = "infermesh_shadow_errors_total";
    /// Requests picked for a copy but not copied (`reason`: in_flight,
    /// body_too_large, dispatch).
    pub const SKIPPED: &str = "infermesh_shadow_skipped_total";
    /// Answered copies whose answer agreed with the client's.
    pub const AGREEMENTS: &str = "infermesh_shadow_agreements_total";
    /// Answered copies whose answer did not.
    pub const DISAGREEMENTS: &str = "infermesh_shadow_disagreements_total";
    /// Answered copies not compared (`reason`: baseline_failed,
    /// baseline_unreadable, no_baseline, too_large, backlog).
    pub const NOT_COMPARED: &str = "infermesh_shadow_not_compared_total";
    /// Histogram: the largest absolute difference between numeric
    /// outputs of a compared copy, in millionths (1000000 = 1.0).
    pub const DIFFERENCE: &str = "infermesh_shadow_difference_millionths";
}

pub mod failover {
    pub const REQUESTS: &str = "infermesh_failover_requests_total";
    pub const TRIES: &str = "infermesh_failover_tries_total";
    pub const FAILURES: &str = "infermesh_failover_failures_total";
    pub const GIVE_UPS: &str = "infermesh_failover_give_ups_total";
    pub const NO_CLOUD: &str = "infermesh_failover_no_cloud_total";
    pub const NOT_BUFFERED: &str = "infermesh_failover_not_buffered_total";
    pub const PROBES: &str = "infermesh_failover_probes_total";
    pub const TRANSITIONS: &str = "infermesh_failover_transitions_total";
    pub const HEALTHY: &str = "infermesh_failover_cloud_healthy";
    pub const STRIPPED: &str = "infermesh_failover_stripped_headers_total";
}

/// Tags the filters emit; the e2e bootstrap and `istio/` declare each one.
pub const TAGS: &[&str] = &[
    "model", "version", "decision", "source", "reason", "cloud", "outcome", "failure",
];

/// A metric name carrying `tags`. Values are restricted to
/// `[A-Za-z0-9._:-]` (anything else becomes `_`) so a value can never
/// break the `;.;` framing.
pub fn tagged(name: &str, tags: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(name.len() + tags.len() * 24);
    out.push_str(name);
    if !tags.is_empty() {
        out.push('.');
    }
    for (k, v) in tags {
        out.push_str(k);
        out.push_str("=.=");
        out.extend(v.chars().map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                c
            } else {
                '_'
            }
        }));
        out.push_str(";.;");
    }
    out
}

/// The Envoy `stats_tags` regex for a tag, as Istio generates it for
/// `extraStatTags`.
pub fn tag_regex(tag: &str) -> String {
    format!(r"({tag}=\.=(.*?);\.;)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_istio_convention() {
        assert_eq!(
            tagged(
                "infermesh_canary_requests_total",
                &[("model", "m"), ("version", "v2")]
            ),
            "infermesh_canary_requests_total.model=.=m;.;version=.=v2;.;"
        );
        assert_eq!(tagged("x_total", &[]), "x_total");
        assert_eq!(
            tagged("x", &[("model", "a;.;b=c d")]),
            "x.model=.=a_._b_c_d;.;"
        );
        assert_eq!(tag_regex("model"), r"(model=\.=(.*?);\.;)");
    }
}
