//! Filter configuration: the `pluginConfig` JSON of each WasmPlugin.
//!
//! Raw serde types mirror the manifest exactly (snake_case keys, unknown
//! fields rejected); `TryFrom`-style validation turns them into types whose
//! invariants hold, once, at configure time. Every error names the field
//! path, e.g. `splits[0].versions[1].weight: weights sum to 99.5%, not 100%`.

pub mod canary;
pub mod failover;
pub mod module;
pub mod router;

use serde::de::DeserializeOwned;

/// A rejected pluginConfig: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Field path in the pluginConfig (`.` for the document itself).
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Largest pluginConfig accepted. Istio sends it inline in xDS; anything
/// near this size is a mistake, not a config.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Deserialises `bytes` into a raw config type, mapping serde's errors to a
/// field path. An empty config (Istio sends none when `pluginConfig` is
/// empty) is parsed as `{}` so defaults apply or missing fields are named.
pub(crate) fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::new(
            ".",
            format!(
                "config is {} bytes, the limit is {MAX_CONFIG_BYTES}",
                bytes.len()
            ),
        ));
    }
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        bytes
    };
    if bytes.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ConfigError::new(".", "the config must be a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends "at line L column C"; keep it, it helps with
        // hand-written files, but drop it for the path-less syntax case.
        let path = if path.is_empty() || path == "?" {
            ".".to_owned()
        } else {
            path
        };
        ConfigError::new(path, inner.to_string())
    })?;
    de.end()
        .map_err(|e| ConfigError::new(".", format!("trailing characters after the config: {e}")))?;
    Ok(value)
}

/// Serde default for flags that are on unless switched off.
pub(crate) fn default_true() -> bool {
    true
}

/// Longest model or version name in a config.
pub const MAX_NAME: usize = 128;

/// Model and version names: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most
/// [`MAX_NAME`] bytes. They travel in headers and metric names, so they are
/// kept to characters that are safe in both.
pub fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() {
        return Err(ConfigError::new(path, "must not be empty"));
    }
    if name.len() > MAX_NAME {
        return Err(ConfigError::new(
            path,
            format!("{} bytes long, the limit is {MAX_NAME}", name.len()),
        ));
    }
    if !first_ok || !rest_ok {
        return Err(ConfigError::new(
            path,
            format!("{name:?} is not a valid name (letters, digits, '.', '_', '-'; starting with a letter or digit)"),
        ));
    }
    Ok(())
}

/// Header names: a lower-case HTTP token (Envoy hands filters lower-case
/// names, so an upper-case name in config would never match).
pub fn check_header_name(path: &str, name: &str) -> Result<(), ConfigError> {
    let token =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || name.len() > 256 || !name.chars().all(token) {
        return Err(ConfigError::new(
            path,
            format!("{name:?} is not a lower-case HTTP header name"),
        ));
    }
    Ok(())
}

/// Cluster names and authorities: printable ASCII without spaces, which is
/// what Envoy cluster names and `:authority` values look like.
pub fn check_token(path: &str, what: &str, s: &str) -> Result<(), ConfigError> {
    if s.is_empty() || s.len() > 256 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            path,
            format!("{s:?} is not a valid {what} (1 to 256 printable ASCII characters, no spaces)"),
        ));
    }
    Ok(())
}

/// A header a client sends (a sticky key, an override, a model name): a
/// lower-case HTTP token that is not one of the filters' own
/// `x-infermesh-*` headers, which are removed from downstream requests.
pub fn check_client_header(path: &str, name: &str) -> Result<(), ConfigError> {
    check_header_name(path, name)?;
    if crate::headers::is_owned(name) {
        return Err(ConfigError::new(
            path,
            format!(
                "{name:?} starts with {:?}: those headers are removed from downstream requests",
                crate::headers::PREFIX
            ),
        ));
    }
    Ok(())
}

/// Every entry of `names` is a valid name (see [`check_name`]) and none is
/// listed twice; errors name `path[i]`.
pub fn check_unique_names(path: &str, names: &[String], what: &str) -> Result<(), ConfigError> {
    for (i, n) in names.iter().enumerate() {
        check_name(&format!("{path}[{i}]"), n)?;
        if names.iter().take(i).any(|o| o == n) {
            return Err(ConfigError::new(
                format!("{path}[{i}]"),
                format!("{what} {n:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

/// A list of `what` with 1 to `max` entries.
pub fn check_len(path: &str, len: usize, max: usize, what: &str) -> Result<(), ConfigError> {
    if len == 0 {
        return Err(ConfigError::new(
            path,
            format!("at least one {what} is required"),
        ));
    }
    if len > max {
        return Err(ConfigError::new(
            path,
            format!("{len} {what}s, the limit is {max}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("p", "digits-mlp").is_ok());
        assert!(check_name("p", "v1.2_rc-3").is_ok());
        assert!(check_name("p", "2").is_ok());
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "a/b",
            "é",
            "a;b",
            &"a".repeat(MAX_NAME + 1),
        ] {
            let err = check_name("p", bad).unwrap_err();
            assert_eq!(err.path, "p", "{bad:?}");
        }
    }

    #[test]
    fn header_names() {
        assert!(check_header_name("h", "x-user-id").is_ok());
        for bad in ["", "X-User", "a b", "a:b", "é"] {
            assert!(check_header_name("h", bad).is_err(), "{bad:?}");
        }
    }
}
