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
