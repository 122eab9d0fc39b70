//! Reading Kubernetes manifests and the filter configs inside them.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use yaml_rust2::YamlLoader;

/// A pluginConfig schema, named as in `app.kubernetes.io/component` and
/// `examples/config/<name>.json`: the module's (`infermesh`, a section per
/// stage, what `infermesh.wasm` takes), or one stage's alone (the schema
/// of that section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Module,
    Canary,
    ModelRouter,
    Failover,
}

impl Filter {
    /// The module, then the stages in the order they run.
    pub const ALL: [Filter; 4] = [
        Filter::Module,
        Filter::ModelRouter,
        Filter::Canary,
        Filter::Failover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Filter::Module => "infermesh",
            Filter::Canary => "canary",
            Filter::ModelRouter => "model-router",
            Filter::Failover => "failover",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The filter a config file is for, from its name without extension:
    /// the filter's name (`failover`) or that name followed by `-`, `_` or
    /// `.` and anything (`failover-eu`, `canary.staging`).
    pub fn from_file_stem(stem: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| {
            stem.strip_prefix(f.name())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', '_', '.']))
        })
    }

    /// The known filter names, comma-separated, for messages.
    pub fn names() -> String {
        Self::ALL.map(Filter::name).join(", ")
    }

    /// Parses a pluginConfig with the filter's own parser.
    pub fn check(self, config: &[u8]) -> Result<(), filter_core::ConfigError> {
        match self {
            Filter::Module => filter_core::config::module::parse(config).map(drop),
            Filter::Canary => filter_core::config::canary::parse(config).map(drop),
            Filter::ModelRouter => filter_core::config::router::parse(config).map(drop),
            Filter::Failover => filter_core::config::failover::parse(config).map(drop),
        }
    }
}

/// A filter config found in a manifest: a WasmPlugin's `pluginConfig`, or
/// the `configuration` of a Wasm filter inserted by an EnvoyFilter.
#[derive(Debug, Clone)]
pub struct WasmPlugin {
    /// `Kind/name`, plus the patch index for EnvoyFilters.
    pub name: String,
    /// `app.kubernetes.io/component`, if set.
    pub component: Option<String>,
    /// `spec.pluginConfig` as JSON (`{}` when absent).
    pub plugin_config: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("{message}")]
    Walk { message: String },
}

/// Converts a YAML node to JSON (shared with the Istio renderer).
pub use mesh::istio::yaml_to_json as to_json;

const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// The Wasm filter configs an EnvoyFilter inserts.
fn envoyfilter_configs(name: &str, component: Option<&str>, doc: &Value) -> Vec<WasmPlugin> {
    let patches = doc
        .get("spec")
        .and_then(|s| s.get("configPatches"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    patches
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let typed = p.get("patch")?.get("value")?.get("typed_config")?;
            if typed.get("@type").and_then(Value::as_str) != Some(WASM_FILTER_TYPE) {
                return None;
            }
            let config = typed
                .get("config")?
                .get("configuration")?
                .get("value")?
                .as_str()?;
            Some(WasmPlugin {
                name: format!("EnvoyFilter/{name}#configPatches[{i}]"),
                component: component.map(str::to_owned),
                plugin_config: config.as_bytes().to_vec(),
            })
        })
        .collect()
}

/// Every filter config in a YAML file: WasmPlugins and EnvoyFilter-inserted
/// Wasm filters (multi-document files included).
pub fn wasm_plugins(path: &Path) -> Result<Vec<WasmPlugin>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    let docs = YamlLoader::load_from_str(&text).map_err(|e| ManifestError::Yaml {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for doc in docs.iter().map(to_json) {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind != "WasmPlugin" && kind != "EnvoyFilter" {
            continue;
        }
        let meta = doc.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let component = meta
            .and_then(|m| m.get("labels"))
            .and_then(|l| l.get("app.kubernetes.io/component"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        if kind == "EnvoyFilter" {
            out.extend(envoyfilter_configs(&name, component.as_deref(), &doc));
            continue;
        }
        let config = doc
            .get("spec")
            .and_then(|s| s.get("pluginConfig"))
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()));
        out.push(WasmPlugin {
            name: format!("WasmPlugin/{name}"),
            component,
            plugin_config: serde_json::to_vec(&config).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// YAML files under `dir`, sorted, recursively.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    mesh::istio::yaml_files(dir).map_err(|message| ManifestError::Walk { message })
}

/// A Kubernetes object read from a manifest file.
#[derive(Debug, Clone)]
pub struct Doc {
    pub file: PathBuf,
    pub json: Value,
}

impl Doc {
    pub fn kind(&self) -> &str {
        self.json["kind"].as_str().unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.json["metadata"]["name"].as_str().unwrap_or("?")
    }

    /// `metadata.namespace`, `default` when unset.
    pub fn namespace(&self) -> &str {
        self.json["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
    }

    /// `Kind namespace/name`, as messages name it.
    pub fn id(&self) -> String {
        format!("{} {}/{}", self.kind(), self.namespace(), self.name())
    }

    /// `file#Kind namespace/name`.
    pub fn what(&self) -> String {
        format!("{}#{}", self.file.display(), self.id())
    }

    pub fn spec(&self) -> &Value {
        &self.json["spec"]
    }
}

/// Every object in the YAML files at `paths` (files or directories), in
/// file-name order.
pub fn load_docs(paths: &[PathBuf]) -> Result<Vec<Doc>, ManifestError> {
    let mut out = Vec::new();
    for p in paths {
        let files = if p.is_dir() {
            yaml_files(p)?
        } else {
            vec![p.clone()]
        };
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Read {
                path: file.clone(),
                source,
            })?;
            let docs = YamlLoader::load_from_str(&text).map_err(|e| ManifestError::Yaml {
                path: file.clone(),
                message: e.to_string(),
            })?;
            out.extend(
                docs.iter()
                    .map(to_json)
                    .filter(|d| d.get("kind").is_some())
                    .map(|json| Doc {
                        file: file.clone(),
                        json,
                    }),
            );
        }
    }
    Ok(out)
}
