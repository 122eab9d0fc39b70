//! Open Inference Protocol v2 request paths.
//!
//! Recognises `/v2/models/{model}[/versions/{version}][/{infer,ready}]`
//! (metadata, readiness and inference), percent-decodes the segments and
//! ignores the query string. Anything else is not an OIP model path.

/// What an OIP model path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPath {
    pub model: String,
    pub version: Option<String>,
    pub action: Action,
}

/// The endpoint under the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Metadata,
    Ready,
    Infer,
}

/// Longest model or version name accepted (KServe and Triton use far less).
pub const MAX_NAME: usize = 256;

/// Parses an OIP model path. Returns `None` for non-OIP paths and for
/// segments that are empty, too long, not UTF-8 after decoding, or contain
/// `/`, control characters or badly formed percent escapes.
pub fn parse_path(path: &[u8]) -> Option<ModelPath> {
    let end = path
        .iter()
        .position(|&c| c == b'?' || c == b'#')
        .unwrap_or(path.len());
    let path = path.get(..end)?;
    let rest = path.strip_prefix(b"/v2/models/")?;
    let mut segs = rest.split(|&c| c == b'/');
    let model = decode_segment(segs.next()?)?;
    let mut version = None;
    let mut next = segs.next();
    if next == Some(b"versions") {
        version = Some(decode_segment(segs.next()?)?);
        next = segs.next();
    }
    let action = match next {
        None | Some(b"") => Action::Metadata,
        Some(b"ready") => Action::Ready,
        Some(b"infer") => Action::Infer,
        Some(_) => return None,
    };
    // A trailing slash is tolerated once; anything more is not OIP.
    if let Some(extra) = segs.next() {
        if !extra.is_empty() || segs.next().is_some() || next == Some(b"") {
            return None;
        }
    }
    Some(ModelPath {
        model,
        version,
        action,
    })
}

/// The OIP path naming `version` explicitly, keeping the action and query;
/// `None` when the path already says exactly that, or when the model or
/// version holds a character that would need percent-encoding (config
/// names never do; such a path is left as it is).
pub fn with_version(original: &[u8], p: &ModelPath, version: &str) -> Option<String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if !plain(&p.model) || !plain(version) {
        return None;
    }
    let query = original
        .iter()
        .position(|&c| c == b'?')
        .and_then(|i| original.get(i..))
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let action = match p.action {
        Action::Metadata => "",
        Action::Ready => "/ready",
        Action::Infer => "/infer",
    };
    let new = format!("/v2/models/{}/versions/{version}{action}{query}", p.model);
    (new.as_bytes() != original).then_some(new)
}

/// Percent-decodes one path segment into a name.
pub fn decode_segment(seg: &[u8]) -> Option<String> {
    if seg.is_empty() || seg.len() > MAX_NAME * 3 {
        return None;
    }
    let mut out = Vec::with_capacity(seg.len());
    let mut i = 0;
    while let Some(&c) = seg.get(i) {
        if c == b'%' {
            let hi = hex(*seg.get(i + 1)?)?;
            let lo = hex(*seg.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    let ok = !s.is_empty()
        && s.len() <= MAX_NAME
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == '\\' || c.is_control());
    ok.then_some(s)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_version_pins_plain_names_only() {
        let p = |s: &str| parse_path(s.as_bytes()).unwrap();
        let infer = "/v2/models/digits/infer?x=1";
        assert_eq!(
            with_version(infer.as_bytes(), &p(infer), "2").as_deref(),
            Some("/v2/models/digits/versions/2/infer?x=1")
        );
        let pinned = "/v2/models/digits/versions/2/ready";
        assert_eq!(with_version(pinned.as_bytes(), &p(pinned), "2"), None);
        assert_eq!(
            with_version(pinned.as_bytes(), &p(pinned), "3").as_deref(),
            Some("/v2/models/digits/versions/3/ready")
        );
        let odd = "/v2/models/a%20b/infer";
        assert_eq!(with_version(odd.as_bytes(), &p(odd), "2"), None);
        assert_eq!(with_version(infer.as_bytes(), &p(infer), "2?"), None);
    }
    use proptest::prelude::*;

    fn mp(model: &str, version: Option<&str>, action: Action) -> Option<ModelPath> {
        Some(ModelPath {
            model: model.into(),
            version: version.map(Into::into),
            action,
        })
    }

    #[test]
    fn parses_oip_paths() {
        use Action::*;
        let cases: &[(&[u8], Option<ModelPath>)] = &[
            (b"/v2/models/mlp", mp("mlp", None, Metadata)),
            (b"/v2/models/mlp/", mp("mlp", None, Metadata)),
            (b"/v2/models/mlp/ready", mp("mlp", None, Ready)),
            (b"/v2/models/mlp/infer", mp("mlp", None, Infer)),
            (b"/v2/models/mlp/infer?x=1", mp("mlp", None, Infer)),
            (b"/v2/models/mlp/versions/2", mp("mlp", Some("2"), Metadata)),
            (
                b"/v2/models/mlp/versions/2/infer",
                mp("mlp", Some("2"), Infer),
            ),
            (
                b"/v2/models/mlp/versions/2/ready",
                mp("mlp", Some("2"), Ready),
            ),
            (b"/v2/models/my%20model/infer", mp("my model", None, Infer)),
            (
                b"/v2/models/caf%C3%A9/versions/v%31/infer",
                mp("café", Some("v1"), Infer),
            ),
            (b"/v2/models/mlp/infer/", mp("mlp", None, Infer)),
            (b"/v2/models/", None),
            (b"/v2/models//infer", None),
            (b"/v2/models/mlp/versions//infer", None),
            (b"/v2/models/mlp/versions", None),
            (b"/v2/models/mlp/predict", None),
            (b"/v2/models/mlp/infer/extra", None),
            (b"/v2/models/mlp/infer//", None),
            (b"/v2/models/a%2Fb/infer", None),
            (b"/v2/models/%2e%2e/infer", None),
            (b"/v2/models/%ff/infer", None),
            (b"/v2/models/%zz/infer", None),
            (b"/v2/models/%4/infer", None),
            (b"/v2/models/a%00b/infer", None),
            (b"/v1/models/mlp:predict", None),
            (b"/v2/health/ready", None),
            (b"", None),
            (b"/v2/models/\xff\xfe/infer", None),
        ];
        for (path, want) in cases {
            assert_eq!(&parse_path(path), want, "{}", String::from_utf8_lossy(path));
        }
    }

    #[test]
    fn names_are_capped() {
        let long = format!("/v2/models/{}/infer", "a".repeat(MAX_NAME + 1));
        assert_eq!(parse_path(long.as_bytes()), None);
        let ok = format!("/v2/models/{}/infer", "a".repeat(MAX_NAME));
        assert!(parse_path(ok.as_bytes()).is_some());
    }

    proptest! {
        #[test]
        fn never_panics(tail in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut p = b"/v2/models/".to_vec();
            p.extend(tail);
            let _ = parse_path(&p);
        }

        #[test]
        fn encoded_names_round_trip(name in "[a-zA-Z0-9._~ -]{1,40}") {
            prop_assume!(name != "." && name != "..");
            let enc: String = name.bytes().map(|b| format!("%{b:02X}")).collect();
            let path = format!("/v2/models/{enc}/versions/{enc}/infer");
            let got = parse_path(path.as_bytes());
            prop_assert_eq!(got, mp(&name, Some(&name), Action::Infer));
        }
    }
}
