//! Header names shared by the filters, the manifests and the tests.
//!
//! Decisions travel as request headers: each filter writes its decision,
//! clears Envoy's route cache, and Istio routes on the header (a
//! VirtualService header match picks the DestinationRule subset).

/// Every header the filters own starts with this prefix. Requests arriving
/// from downstream have all of them removed unless a filter is told to trust
/// them, so a client cannot bypass a canary or a residency rule.
pub const PREFIX: &str = "x-infermesh-";
/// Model name, set by model-router.
pub const MODEL: &str = "x-infermesh-model";
/// Concrete model version, set by model-router (pinned) or canary (split).
pub const VERSION: &str = "x-infermesh-version";
/// Chosen cloud, set by failover.
pub const CLOUD: &str = "x-infermesh-cloud";
/// Response header naming what served the request: `model/version`, with
/// `@cloud` appended by failover.
pub const SERVED_BY: &str = "x-infermesh-served-by";
/// Default tester override header: pins a version listed in the split.
/// Its name deliberately lacks the `x-infermesh-` prefix: it is a client
/// header by design, and stripping it would defeat its purpose.
pub const DEFAULT_OVERRIDE: &str = "x-canary-version";

/// True when `name` (lower-case, as Envoy hands header names to filters) is
/// one of the filters' own headers.
pub fn is_owned(name: &str) -> bool {
    name.len() >= PREFIX.len()
        && name
            .as_bytes()
            .iter()
            .zip(PREFIX.as_bytes())
            .all(|(a, b)| a.eq_ignore_ascii_case(b))
}

/// The `x-infermesh-served-by` value a filter that decided `mine`
/// (`model/version`) should write over the response's current value
/// `existing`, or `None` to leave it. Response filters run in reverse
/// order, so failover writes `@cloud` first and canary or model-router
/// completes it to `model/version@cloud`; a value that already names a
/// version and a cloud (failover's own reply) stays.
pub fn served_by(mine: &str, existing: Option<&[u8]>) -> Option<String> {
    match existing {
        Some(e) if e.first() == Some(&b'@') => {
            Some(format!("{mine}{}", String::from_utf8_lossy(e)))
        }
        Some(e) if e.contains(&b'@') => None,
        _ => Some(mine.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_by_composes_version_and_cloud() {
        assert_eq!(served_by("m/2", None).as_deref(), Some("m/2"));
        assert_eq!(served_by("m/2", Some(b"@aws")).as_deref(), Some("m/2@aws"));
        assert_eq!(served_by("m/2", Some(b"m/1")).as_deref(), Some("m/2"));
        assert_eq!(served_by("m/2", Some(b"m/2@gcp")), None);
    }

    #[test]
    fn owned_headers_are_recognised_case_insensitively() {
        assert!(is_owned("x-infermesh-version"));
        assert!(is_owned("X-InferMesh-Anything"));
        assert!(is_owned("x-infermesh-"));
        assert!(!is_owned("x-infermesh"));
        assert!(!is_owned("x-user-id"));
        assert!(!is_owned(DEFAULT_OVERRIDE));
        assert!(!is_owned(""));
    }
}
