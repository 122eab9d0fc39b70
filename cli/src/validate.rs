//! `infermesh validate`: pluginConfig files and the WasmPlugins in manifests.

use std::path::Path;

use crate::manifest::{self, Filter};

/// The outcome for one config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `file` or `file#WasmPlugin/name`.
    pub what: String,
    pub filter: Option<&'static str>,
    /// `None` when the config is valid.
    pub error: Option<String>,
}

impl Finding {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Checks a path: a `.json` pluginConfig (the filter comes from `filter`,
/// or from the file name, e.g. `canary.json`, `failover-eu.json`; see
/// [`Filter::from_file_stem`]), a YAML manifest, or a
/// directory of manifests.
pub fn check_path(path: &Path, filter: Option<Filter>) -> Vec<Finding> {
    let shown = path.display().to_string();
    if path.is_dir() {
        return match manifest::yaml_files(path) {
            Ok(files) => files.iter().flat_map(|f| check_manifest(f)).collect(),
            Err(e) => vec![failure(shown, None, e.to_string())],
        };
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => check_manifest(path),
        _ => {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let Some(filter) = filter.or_else(|| Filter::from_file_stem(stem)) else {
                return vec![failure(
                    shown,
                    None,
                    format!(
                        "cannot tell which filter {stem:?} configures: pass --filter ({})",
                        Filter::names()
                    ),
                )];
            };
            match std::fs::read(path) {
                Ok(bytes) => vec![Finding {
                    what: shown,
                    filter: Some(filter.name()),
                    error: filter.check(&bytes).err().map(|e| e.to_string()),
                }],
                Err(e) => vec![failure(shown, Some(filter), e.to_string())],
            }
        }
    }
}

fn failure(what: String, filter: Option<Filter>, error: String) -> Finding {
    Finding {
        what,
        filter: filter.map(Filter::name),
        error: Some(error),
    }
}

fn check_manifest(path: &Path) -> Vec<Finding> {
    let plugins = match manifest::wasm_plugins(path) {
        Ok(p) => p,
        Err(e) => return vec![failure(path.display().to_string(), None, e.to_string())],
    };
    plugins
        .into_iter()
        .map(|p| {
            let what = format!("{}#{}", path.display(), p.name);
            let component = p.component.as_deref().unwrap_or("");
            match Filter::from_name(component) {
                Some(f) => Finding {
                    what,
                    filter: Some(f.name()),
                    error: f.check(&p.plugin_config).err().map(|e| {
                        if e.path == "." {
                            format!("pluginConfig: {}", e.message)
                        } else {
                            format!("pluginConfig.{e}")
                        }
                    }),
                },
                None => failure(
                    what,
                    None,
                    format!(
                        "label app.kubernetes.io/component is {component:?}; expected one of: {}",
                        Filter::names()
                    ),
                ),
            }
        })
        .collect()
}
