//! The model repository on disk: `DIR/<model>/<version>/model.onnx` plus an
//! optional `DIR/<model>/config.json`, turned into validated specs. No tract
//! here; errors never carry file system paths (they reach clients).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::tensor::DataType;

/// Largest accepted `max_batch_size`.
pub const MAX_BATCH_LIMIT: usize = 4096;
/// Largest accepted `dynamic_batching.max_delay_us` (10 s).
pub const MAX_DELAY_LIMIT_US: u64 = 10_000_000;
/// Largest number of elements in one batch row of a tensor.
pub const MAX_ROW_ELEMENTS: usize = 1 << 28;

/// Why a model (or a version of it) cannot be served.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RepoError {
    #[error("invalid model name {0:?}: use letters, digits, '_', '-', '.' (not leading)")]
    InvalidName(String),
    #[error("model {0} is not in the repository")]
    NotFound(String),
    #[error("config.json of model {model}: {reason}")]
    Config { model: String, reason: String },
    #[error("model {0} has no numeric version directory")]
    NoVersions(String),
    #[error("model {model} version {version}: model.onnx is missing")]
    MissingFile { model: String, version: String },
    #[error("model {0}: version policy selects no version")]
    PolicyEmpty(String),
    #[error("model {model} version {version}: {reason}")]
    Unavailable {
        model: String,
        version: String,
        reason: String,
    },
    #[error("model repository cannot be read")]
    Unreadable,
}

/// One declared tensor. `shape` uses -1 for the batch dimension only.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// Which versions on disk get loaded.
#[derive(Debug, Clone, PartialEq)]
pub enum VersionPolicy {
    Latest(usize),
    All,
    Specific(BTreeSet<u64>),
}

/// Dynamic batching parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batching {
    pub max_delay: Duration,
    pub preferred_batch_size: usize,
}

/// A validated `config.json` (or the defaults when it is absent).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// 0: the model has no batch dimension and every request runs alone.
    pub max_batch_size: usize,
    /// `None`: collect nothing, run each request as it comes.
    pub batching: Option<Batching>,
    pub version_policy: VersionPolicy,
    /// `None`: taken from the model itself by the engine.
    pub inputs: Option<Vec<TensorSpec>>,
    pub outputs: Option<Vec<TensorSpec>>,
    pub labels: BTreeMap<String, Vec<String>>,
    pub description: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            max_batch_size: DEFAULT_MAX_BATCH,
            batching: None,
            version_policy: VersionPolicy::Latest(1),
            inputs: None,
            outputs: None,
            labels: BTreeMap::new(),
            description: None,
        }
    }
}

/// `max_batch_size` when no config says otherwise and the model's first
/// dimension is symbolic.
pub const DEFAULT_MAX_BATCH: usize = 32;

/// One loadable model version.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub version: String,
    pub version_num: u64,
    pub path: PathBuf,
    pub config: Arc<ModelConfig>,
}

/// A model directory after scanning: the versions the policy selected, and
/// per-version problems found on the way.
#[derive(Debug, Clone)]
pub struct ModelPlan {
    pub name: String,
    pub versions: Vec<ModelSpec>,
    pub skipped: Vec<(String, RepoError)>,
}

/// A file whose content says why a model or version cannot be served
/// (written by the object store mirror, see `object_repo`).
pub const UNAVAILABLE_MARKER: &str = ".infermesh-unavailable";

/// Model names become path components; only a conservative alphabet passes.
pub fn validate_name(name: &str) -> Result<(), RepoError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(RepoError::InvalidName(name.chars().take(64).collect()))
    }
}

/// Versions are decimal numbers without leading zeros ("1", "2", "10").
pub fn parse_version(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || (v.len() > 1 && v.starts_with('0')) {
        return None;
    }
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Names of the model directories in `root` (sorted), valid or not.
pub fn list_models(root: &Path) -> Result<Vec<String>, RepoError> {
    let entries = std::fs::read_dir(root).map_err(|_| RepoError::Unreadable)?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        // `is_dir` on the path follows symlinks: Kubernetes volumes (ConfigMaps,
        // projected and CSI volumes) present model directories as links.
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// Reads `root/name`: its config and the versions its policy selects.
pub fn scan_model(root: &Path, name: &str) -> Result<ModelPlan, RepoError> {
    validate_name(name)?;
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err(RepoError::NotFound(name.to_string()));
    }
    // Set by the object store mirror when the model's files cannot be synced.
    if let Ok(reason) = std::fs::read_to_string(dir.join(UNAVAILABLE_MARKER)) {
        return Err(RepoError::Config {
            model: name.to_string(),
            reason,
        });
    }
    let config = match std::fs::read(dir.join("config.json")) {
        Ok(bytes) => parse_config(&bytes).map_err(|reason| RepoError::Config {
            model: name.to_string(),
            reason,
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ModelConfig::default(),
        Err(_) => {
            return Err(RepoError::Config {
                model: name.to_string(),
                reason: "cannot be read".into(),
            })
        }
    };
    let config = Arc::new(config);
    let mut on_disk: BTreeMap<u64, String> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir)
        .map_err(|_| RepoError::Unreadable)?
        .filter_map(Result::ok)
    {
        if !entry.path().is_dir() {
            continue;
        }
        if let Some(v) = entry.file_name().to_str().and_then(parse_version) {
            on_disk.insert(v, v.to_string());
        }
    }
    if on_disk.is_empty() {
        return Err(RepoError::NoVersions(name.to_string()));
    }
    let selected: Vec<u64> = match &config.version_policy {
        VersionPolicy::All => on_disk.keys().copied().collect(),
        VersionPolicy::Latest(n) => on_disk.keys().rev().take(*n).copied().collect(),
        VersionPolicy::Specific(set) => on_disk
            .keys()
            .filter(|v| set.contains(v))
            .copied()
            .collect(),
    };
    if selected.is_empty() {
        return Err(RepoError::PolicyEmpty(name.to_string()));
    }
    let mut plan = ModelPlan {
        name: name.to_string(),
        versions: Vec::new(),
        skipped: Vec::new(),
    };
    for v in selected {
        let version = v.to_string();
        let path = dir.join(&version).join("model.onnx");
        if path.is_file() {
            plan.versions.push(ModelSpec {
                name: name.to_string(),
                version,
                version_num: v,
                path,
                config: config.clone(),
            });
        } else if let Ok(reason) =
            std::fs::read_to_string(dir.join(&version).join(UNAVAILABLE_MARKER))
        {
            plan.skipped.push((
                version.clone(),
                RepoError::Unavailable {
                    model: name.to_string(),
                    version,
                    reason,
                },
            ));
        } else {
            plan.skipped.push((
                version.clone(),
                RepoError::MissingFile {
                    model: name.to_string(),
                    version,
                },
            ));
        }
    }
    Ok(plan)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    platform: Option<String>,
    max_batch_size: Option<i64>,
    dynamic_batching: Option<RawBatching>,
    version_policy: Option<RawPolicy>,
    inputs: Option<Vec<RawTensor>>,
    outputs: Option<Vec<RawTensor>>,
    labels: Option<BTreeMap<String, Vec<String>>>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatching {
    max_delay_us: Option<u64>,
    preferred_batch_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum RawPolicy {
    All,
    Latest(u64),
    Specific(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    name: String,
    datatype: String,
    shape: Vec<i64>,
}

/// Parses and validates a `config.json`; the error names the field.
pub fn parse_config(bytes: &[u8]) -> Result<ModelConfig, String> {
    let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if let Some(p) = &raw.platform {
        if p != "onnx" && p != "onnxruntime_onnx" {
            return Err(format!("platform: {p:?} is not supported (use \"onnx\")"));
        }
    }
    let max_batch_size = match raw.max_batch_size {
        None if raw.inputs.is_some() => 0,
        None => DEFAULT_MAX_BATCH,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_BATCH_LIMIT)
            .ok_or_else(|| format!("max_batch_size: {n} is not in 0..={MAX_BATCH_LIMIT}"))?,
    };
    let batching = match raw.dynamic_batching {
        None => None,
        Some(_) if max_batch_size == 0 => {
            return Err("dynamic_batching: needs max_batch_size > 0".into())
        }
        Some(b) => {
            let delay = b.max_delay_us.unwrap_or(0);
            if delay > MAX_DELAY_LIMIT_US {
                return Err(format!(
                    "dynamic_batching.max_delay_us: {delay} exceeds {MAX_DELAY_LIMIT_US}"
                ));
            }
            let preferred = b.preferred_batch_size.unwrap_or(max_batch_size as u64);
            if preferred == 0 || preferred > max_batch_size as u64 {
                return Err(format!(
                    "dynamic_batching.preferred_batch_size: {preferred} is not in 1..={max_batch_size}"
                ));
            }
            Some(Batching {
                max_delay: Duration::from_micros(delay),
                preferred_batch_size: preferred as usize,
            })
        }
    };
    let version_policy = match raw.version_policy {
        None => VersionPolicy::Latest(1),
        Some(RawPolicy::All) => VersionPolicy::All,
        Some(RawPolicy::Latest(n)) => {
            if n == 0 || n > 1000 {
                return Err(format!("version_policy.latest: {n} is not in 1..=1000"));
            }
            VersionPolicy::Latest(n as usize)
        }
        Some(RawPolicy::Specific(list)) => {
            if list.is_empty() {
                return Err("version_policy.specific: is empty".into());
            }
            let mut set = BTreeSet::new();
            for (i, v) in list.iter().enumerate() {
                let n = parse_version(v).ok_or_else(|| {
                    format!("version_policy.specific[{i}]: {v:?} is not a version number")
                })?;
                set.insert(n);
            }
            VersionPolicy::Specific(set)
        }
    };
    let inputs = raw
        .inputs
        .map(|t| tensors("inputs", t, max_batch_size))
        .transpose()?;
    let outputs = raw
        .outputs
        .map(|t| tensors("outputs", t, max_batch_size))
        .transpose()?;
    if inputs.as_ref().is_some_and(Vec::is_empty) {
        return Err("inputs: is empty".into());
    }
    if outputs.as_ref().is_some_and(Vec::is_empty) {
        return Err("outputs: is empty".into());
    }
    let labels = raw.labels.unwrap_or_default();
    for (name, list) in &labels {
        if list.is_empty() {
            return Err(format!("labels.{name}: is empty"));
        }
        if let Some(outs) = &outputs {
            let Some(out) = outs.iter().find(|o| &o.name == name) else {
                return Err(format!("labels.{name}: no output has that name"));
            };
            if let Some(&last) = out.shape.last() {
                if last > 0 && last as usize != list.len() {
                    return Err(format!(
                        "labels.{name}: {} labels, output's last dimension is {last}",
                        list.len()
                    ));
                }
            }
        }
    }
    Ok(ModelConfig {
        max_batch_size,
        batching,
        version_policy,
        inputs,
        outputs,
        labels,
        description: raw.description,
    })
}

fn tensors(field: &str, raw: Vec<RawTensor>, max_batch: usize) -> Result<Vec<TensorSpec>, String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        let at = format!("{field}[{i}]");
        if t.name.is_empty() || t.name.len() > 256 {
            return Err(format!("{at}.name: must be 1..=256 characters"));
        }
        if !seen.insert(t.name.clone()) {
            return Err(format!("{at}.name: {:?} is declared twice", t.name));
        }
        let datatype = DataType::parse(&t.datatype)
            .ok_or_else(|| format!("{at}.datatype: {:?} is not an OIP datatype", t.datatype))?;
        if max_batch > 0 && t.shape.first() != Some(&-1) {
            return Err(format!(
                "{at}.shape: first dimension must be -1 (the batch) when max_batch_size > 0"
            ));
        }
        let fixed = if max_batch > 0 {
            t.shape.get(1..).unwrap_or_default()
        } else {
            &t.shape[..]
        };
        let mut row: usize = 1;
        for (j, d) in fixed.iter().enumerate() {
            let j = if max_batch > 0 { j + 1 } else { j };
            if *d < 1 {
                return Err(format!(
                    "{at}.shape[{j}]: {d} must be positive (only the batch dimension is -1)"
                ));
            }
            row = usize::try_from(*d)
                .ok()
                .and_then(|d| row.checked_mul(d))
                .filter(|r| *r <= MAX_ROW_ELEMENTS)
                .ok_or_else(|| format!("{at}.shape: more than {MAX_ROW_ELEMENTS} elements"))?;
        }
        out.push(TensorSpec {
            name: t.name,
            datatype,
            shape: t.shape,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"platform": "onnx", "max_batch_size": 32,
        "dynamic_batching": {"max_delay_us": 200, "preferred_batch_size": 8},
        "version_policy": {"latest": 2},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
        "labels": {"probabilities": ["a", "b"]}, "description": "d"}"#;

    #[test]
    fn follows_symlinked_model_and_version_directories() {
        // As a Kubernetes volume (or the local mesh) lays a repository out.
        let tmp = std::env::temp_dir().join(format!("infermesh-repo-links-{}", std::process::id()));
        let real = tmp.join("real/m/3");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("model.onnx"), b"not read by the scan").unwrap();
        let repo = tmp.join("repo");
        std::fs::create_dir_all(repo.join("linked")).unwrap();
        std::os::unix::fs::symlink(&real, repo.join("linked/3")).unwrap();
        std::os::unix::fs::symlink(tmp.join("real/m"), repo.join("whole")).unwrap();
        let names = list_models(&repo).unwrap();
        let linked = scan_model(&repo, "linked").map(|p| p.versions.len());
        let whole = scan_model(&repo, "whole").map(|p| p.versions.len());
        std::fs::remove_dir_all(&tmp).ok();
        assert_eq!(names, ["linked", "whole"]);
        assert_eq!(linked.ok(), Some(1));
        assert_eq!(whole.ok(), Some(1));
    }

    #[test]
    fn parses_the_documented_example() {
        let c = parse_config(GOOD.as_bytes()).unwrap();
        assert_eq!(c.max_batch_size, 32);
        assert_eq!(c.version_policy, VersionPolicy::Latest(2));
        let b = c.batching.unwrap();
        assert_eq!(b.preferred_batch_size, 8);
        assert_eq!(b.max_delay, Duration::from_micros(200));
        assert_eq!(c.inputs.unwrap()[0].shape, vec![-1, 784]);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("\"description\"", "\"descr\""), "descr"),
            (
                GOOD.replace(
                    "\"FP32\", \"shape\": [-1, 784]",
                    "\"FP33\", \"shape\": [-1, 784]",
                ),
                "inputs[0].datatype",
            ),
            (GOOD.replace("[-1, 784]", "[-1, 0]"), "inputs[0].shape[1]"),
            (GOOD.replace("[-1, 784]", "[784]"), "inputs[0].shape"),
            (
                GOOD.replace(
                    "\"preferred_batch_size\": 8",
                    "\"preferred_batch_size\": 64",
                ),
                "preferred_batch_size",
            ),
            (
                GOOD.replace("{\"latest\": 2}", "{\"specific\": [\"x\"]}"),
                "version_policy.specific[0]",
            ),
            (
                GOOD.replace("{\"latest\": 2}", "{\"latest\": 0}"),
                "version_policy.latest",
            ),
            (
                GOOD.replace("[\"a\", \"b\"]", "[\"a\"]"),
                "labels.probabilities",
            ),
            (
                GOOD.replace("\"max_batch_size\": 32", "\"max_batch_size\": -1"),
                "max_batch_size",
            ),
            (GOOD.replace("\"onnx\"", "\"tensorflow\""), "platform"),
        ];
        for (text, field) in cases {
            let err = parse_config(text.as_bytes()).unwrap_err();
            assert!(err.contains(field), "{field} not in {err:?}");
        }
    }

    #[test]
    fn policy_all_and_string_forms_parse() {
        let c = parse_config(br#"{"version_policy": "all"}"#).unwrap();
        assert_eq!(c.version_policy, VersionPolicy::All);
        assert_eq!(c.max_batch_size, DEFAULT_MAX_BATCH);
    }

    #[test]
    fn names_and_versions_are_strict() {
        for bad in ["", "..", ".", "a/b", "a\\b", ".hidden", "a b", "%2e%2e"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["digits-mlp", "tiny_cnn", "m.v2"] {
            assert!(validate_name(good).is_ok());
        }
        assert_eq!(parse_version("10"), Some(10));
        for bad in ["", "01", "-1", "1a", "99999999999999999999"] {
            assert_eq!(parse_version(bad), None, "{bad:?}");
        }
    }
}
