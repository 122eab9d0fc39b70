//! Mirroring: which requests a split copies to its shadow version.
//!
//! A request is copied when the canary routed it to the split's baseline
//! by its weights (keyed or unkeyed; never an override or a pinned
//! version), it is an OIP infer request, and its random word falls in the
//! shadow's fraction. The copy names the candidate in its path, so it
//! reaches that version whatever the candidate's routing.

pub mod compare;

use crate::canary::How;
use crate::config::canary::Split;
use crate::hash::random_bucket;
use crate::oip::{self, Action};

/// The path of the copy to send to the split's shadow version, if this
/// request is mirrored. `version` and `how` are the canary's decision;
/// `random` a fresh random word.
pub fn mirror_path(
    split: &Split,
    version: usize,
    how: How,
    path: &[u8],
    random: u64,
) -> Option<String> {
    let shadow = split.shadow.as_ref()?;
    if version != 0 || how == How::Override {
        return None;
    }
    let parsed = oip::parse_path(path)?;
    if parsed.action != Action::Infer || parsed.version.is_some() {
        return None;
    }
    if random_bucket(random) >= shadow.fraction_bp {
        return None;
    }
    let candidate = split.versions.get(shadow.version)?;
    oip::with_version(path, &parsed, candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::canary::parse;
    use crate::hash::fmix64;

    fn split(fraction: f64) -> Split {
        let json = format!(
            r#"{{"splits":[{{"model":"m","versions":[{{"name":"1","weight":90}},{{"name":"2","weight":10}}],
                "shadow":{{"version":"2","fraction":{fraction},"cluster":"v2"}}}}]}}"#
        );
        parse(json.as_bytes()).unwrap().splits.remove(0)
    }

    #[test]
    fn copies_only_the_baselines_split_infer_requests() {
        let s = split(1.0);
        let infer = b"/v2/models/m/infer?x=1".as_slice();
        assert_eq!(
            mirror_path(&s, 0, How::Keyed, infer, 7).as_deref(),
            Some("/v2/models/m/versions/2/infer?x=1")
        );
        assert!(mirror_path(&s, 0, How::Unkeyed, infer, 7).is_some());
        assert_eq!(
            mirror_path(&s, 1, How::Keyed, infer, 7),
            None,
            "the canary's own"
        );
        assert_eq!(mirror_path(&s, 0, How::Override, infer, 7), None);
        assert_eq!(
            mirror_path(&s, 0, How::Keyed, b"/v2/models/m/ready", 7),
            None
        );
        assert_eq!(mirror_path(&s, 0, How::Keyed, b"/v2/models/m", 7), None);
        assert_eq!(
            mirror_path(&s, 0, How::Keyed, b"/v2/models/m/versions/1/infer", 7),
            None
        );
        assert_eq!(mirror_path(&s, 0, How::Keyed, b"/predict", 7), None);
        let mut plain = s.clone();
        plain.shadow = None;
        assert_eq!(mirror_path(&plain, 0, How::Keyed, infer, 7), None);
    }

    #[test]
    fn copies_the_configured_fraction() {
        let s = split(0.2);
        let n = 20_000u64;
        let copied = (0..n)
            .filter(|i| {
                mirror_path(&s, 0, How::Unkeyed, b"/v2/models/m/infer", fmix64(*i)).is_some()
            })
            .count();
        // σ ≈ 57 at n = 20 000; ±300 is > 5σ.
        assert!((3_700..=4_300).contains(&copied), "{copied}");
    }
}
