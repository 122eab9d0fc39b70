//! The live set of loaded model versions. Requests hold an `Arc` to the
//! version they use, so unloading only removes it from the map and
//! in-flight requests finish on it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

use crate::batching::{Batcher, Policy};
use crate::engine::{Engine, EngineError, Signature};
use crate::metrics::Metrics;
use crate::model_repo::{self, ModelSpec, RepoError};

/// A loaded, serving model version.
#[derive(Debug)]
pub struct LoadedVersion {
    pub name: String,
    pub version: String,
    pub signature: Signature,
    pub labels: BTreeMap<String, Vec<String>>,
    pub batcher: Batcher,
}

/// One row of the repository index.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub state: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

#[derive(Default)]
struct Slot {
    versions: BTreeMap<u64, Arc<LoadedVersion>>,
    index: Vec<IndexEntry>,
}

/// Why a load request failed (safe to show to clients).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("model {0} could not be loaded: {1}")]
    Failed(String, String),
}

/// Settings the registry applies to every version it loads.
#[derive(Debug, Clone)]
pub struct Limits {
    pub queue_capacity: usize,
    pub instances: usize,
}

/// Loaded models by name and version.
pub struct Registry {
    root: PathBuf,
    limits: Limits,
    metrics: Metrics,
    slots: RwLock<BTreeMap<String, Slot>>,
    /// Serialises load/unload per model.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("root", &self.root)
            .finish()
    }
}

impl Registry {
    pub fn new(root: PathBuf, limits: Limits, metrics: Metrics) -> Registry {
        Registry {
            root,
            limits,
            metrics,
            slots: RwLock::new(BTreeMap::new()),
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The version to serve: the given one, or the highest loaded.
    pub fn get(&self, name: &str, version: Option<&str>) -> Option<Arc<LoadedVersion>> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let slot = slots.get(name)?;
        match version {
            Some(v) => slot.versions.get(&model_repo::parse_version(v)?).cloned(),
            None => slot.versions.values().next_back().cloned(),
        }
    }

    /// Loaded versions of `name`, ascending.
    pub fn versions(&self, name: &str) -> Vec<String> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .get(name)
            .map(|s| s.versions.values().map(|v| v.version.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether `name` (and `version`, if given) is something this server
    /// tried to load, whether or not it is serving now.
    pub fn knows(&self, name: &str, version: Option<&str>) -> bool {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        match (slots.get(name), version) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(slot), Some(v)) => slot.index.iter().any(|e| e.version.as_deref() == Some(v)),
        }
    }

    /// The repository index: models on disk and what happened to them.
    pub fn index(&self) -> Vec<IndexEntry> {
        let mut known: BTreeMap<String, Vec<IndexEntry>> = {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            slots
                .iter()
                .map(|(k, s)| (k.clone(), s.index.clone()))
                .collect()
        };
        if let Ok(names) = model_repo::list_models(&self.root) {
            for name in names {
                known.entry(name.clone()).or_insert_with(|| {
                    let reason = match model_repo::validate_name(&name) {
                        Ok(()) => String::new(),
                        Err(e) => e.to_string(),
                    };
                    vec![IndexEntry {
                        name,
                        version: None,
                        state: "UNAVAILABLE",
                        reason,
                    }]
                });
            }
        }
        known.into_values().flatten().collect()
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    /// Loads every model in the repository; failures are logged, recorded
    /// in the index and skipped.
    pub async fn load_all(&self) -> Result<(), RepoError> {
        let names = model_repo::list_models(&self.root)?;
        for name in names {
            if let Err(e) = self.load(&name).await {
                tracing::warn!(model = %name, error = %e, "model skipped");
            }
        }
        Ok(())
    }

    /// (Re)loads a model from disk: reads its config, loads the versions
    /// its policy selects, then swaps them in at once. On failure the
    /// versions already serving keep serving.
    pub async fn load(&self, name: &str) -> Result<Vec<String>, LoadError> {
        self.load_keeping(name, &BTreeSet::new()).await
    }

    /// As [`Registry::load`], but versions in `keep` that are serving now
    /// are kept as they are instead of being read again (their files did
    /// not change).
    pub async fn load_keeping(
        &self,
        name: &str,
        keep: &BTreeSet<u64>,
    ) -> Result<Vec<String>, LoadError> {
        model_repo::validate_name(name)?;
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let plan = match model_repo::scan_model(&self.root, name) {
            Ok(p) => p,
            Err(e) => {
                if !matches!(e, RepoError::NotFound(_)) {
                    self.record_failure(name, &e.to_string());
                }
                return Err(e.into());
            }
        };
        let mut index = Vec::new();
        for (version, err) in &plan.skipped {
            tracing::warn!(model = %name, version = %version, error = %err, "version skipped");
            index.push(IndexEntry {
                name: name.to_string(),
                version: Some(version.clone()),
                state: "UNAVAILABLE",
                reason: err.to_string(),
            });
        }
        let mut loaded = BTreeMap::new();
        for spec in plan.versions {
            let version = spec.version.clone();
            let serving = keep
                .contains(&spec.version_num)
                .then(|| self.get(name, Some(&version)))
                .flatten();
            let result = match serving {
                Some(v) => Ok(v),
                None => self.load_version(spec).await,
            };
            match result {
                Ok(v) => {
                    tracing::info!(model = %name, version = %version, "model version loaded");
                    index.push(IndexEntry {
                        name: name.to_string(),
                        version: Some(version.clone()),
                        state: "READY",
                        reason: String::new(),
                    });
                    loaded.insert(model_repo::parse_version(&version).unwrap_or(0), v);
                }
                Err(e) => {
                    let reason = match &e {
                        EngineError::Signature(s) => s.clone(),
                        other => other.to_string(),
                    };
                    tracing::warn!(model = %name, version = %version, error = ?e, "model version failed to load");
                    index.push(IndexEntry {
                        name: name.to_string(),
                        version: Some(version),
                        state: "UNAVAILABLE",
                        reason,
                    });
                }
            }
        }
        index.sort_by(|a, b| {
            let key = |e: &IndexEntry| e.version.as_deref().and_then(model_repo::parse_version);
            key(a).cmp(&key(b))
        });
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(name.to_string()).or_default();
        if loaded.is_empty() {
            let reasons: Vec<String> = index.iter().map(|e| e.reason.clone()).collect();
            if slot.versions.is_empty() {
                slot.index = index;
            } else {
                // The versions already serving keep serving; the index
                // says why the reload failed.
                let mut idx: Vec<IndexEntry> = slot
                    .versions
                    .values()
                    .map(|v| IndexEntry {
                        name: name.to_string(),
                        version: Some(v.version.clone()),
                        state: "READY",
                        reason: String::new(),
                    })
                    .collect();
                idx.extend(index.into_iter().map(|mut e| {
                    e.reason = format!("reload failed: {}", e.reason);
                    e
                }));
                slot.index = idx;
            }
            return Err(LoadError::Failed(name.to_string(), reasons.join("; ")));
        }
        let versions: Vec<String> = loaded.values().map(|v| v.version.clone()).collect();
        slot.versions = loaded;
        slot.index = index;
        drop(slots);
        self.update_gauge();
        Ok(versions)
    }

    async fn load_version(&self, spec: ModelSpec) -> Result<Arc<LoadedVersion>, EngineError> {
        let config = spec.config.clone();
        let path = spec.path.clone();
        let engine = tokio::task::spawn_blocking(move || Engine::load(&path, &config))
            .await
            .map_err(|_| EngineError::Signature("engine panicked while loading".into()))??;
        let signature = engine.signature().clone();
        if engine.runs_row_by_row() {
            tracing::info!(
                model = %spec.name,
                version = %spec.version,
                "batches run row by row on the batch-1 plan (the model has a convolution)"
            );
        }
        let policy = Policy {
            max_batch_size: signature.max_batch_size,
            batching: spec.config.batching,
            capacity: self.limits.queue_capacity,
            instances: self.limits.instances,
        };
        let batcher = Batcher::spawn(
            Arc::new(engine),
            policy,
            self.metrics.clone(),
            &spec.name,
            &spec.version,
        );
        Ok(Arc::new(LoadedVersion {
            name: spec.name,
            version: spec.version,
            signature,
            labels: spec.config.labels.clone(),
            batcher,
        }))
    }

    /// Stops serving a model; requests already running on it finish.
    pub async fn unload(&self, name: &str) -> Result<(), RepoError> {
        model_repo::validate_name(name)?;
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.get_mut(name) else {
            return Err(RepoError::NotFound(name.to_string()));
        };
        slot.versions.clear();
        for e in &mut slot.index {
            if e.state == "READY" {
                e.state = "UNAVAILABLE";
                e.reason = "unloaded".into();
            }
        }
        drop(slots);
        self.update_gauge();
        tracing::info!(model = %name, "model unloaded");
        Ok(())
    }

    fn record_failure(&self, name: &str, reason: &str) {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(name.to_string()).or_default();
        slot.index.retain(|e| e.state == "READY");
        slot.index.push(IndexEntry {
            name: name.to_string(),
            version: None,
            state: "UNAVAILABLE",
            reason: reason.to_string(),
        });
    }

    fn update_gauge(&self) {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let n: usize = slots.values().map(|s| s.versions.len()).sum();
        self.metrics.models_loaded.set(n as i64);
    }
}
