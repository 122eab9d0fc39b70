//! Reads one cookie out of a `Cookie` request header, as bytes.

/// The value of cookie `name` in a `Cookie` header (`a=1; b=2`), if present
/// and non-empty. Works on raw bytes: header values may hold any octet.
/// Surrounding double quotes are removed, as RFC 6265 allows them.
pub fn find<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|&c| c == b';').find_map(|pair| {
        let pair = trim(pair);
        let eq = pair.iter().position(|&c| c == b'=')?;
        let (k, v) = (pair.get(..eq)?, pair.get(eq + 1..)?);
        if trim(k) != name.as_bytes() {
            return None;
        }
        let v = trim(v);
        let v = match v {
            [b'"', inner @ .., b'"'] => inner,
            other => other,
        };
        (!v.is_empty()).then_some(v)
    })
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_cookies() {
        let h = b"theme=dark; uid=abc123;  session = \"q w\" ;empty=; =x; last=\xff\xfe";
        assert_eq!(find(h, "uid"), Some(&b"abc123"[..]));
        assert_eq!(find(h, "theme"), Some(&b"dark"[..]));
        assert_eq!(find(h, "session"), Some(&b"q w"[..]));
        assert_eq!(find(h, "last"), Some(&b"\xff\xfe"[..]));
        assert_eq!(find(h, "empty"), None);
        assert_eq!(find(h, "missing"), None);
        assert_eq!(find(h, "ui"), None);
        assert_eq!(find(b"", "uid"), None);
        assert_eq!(find(b"uid", "uid"), None);
        assert_eq!(find(b"\"", "uid"), None);
        assert_eq!(find(b"uid=\"", "uid"), Some(&b"\""[..]));
    }

    proptest! {
        #[test]
        fn never_panics(h in proptest::collection::vec(any::<u8>(), 0..200), n in "[a-z]{0,4}") {
            let _ = find(&h, &n);
        }
    }
}
