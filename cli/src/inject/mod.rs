//! The sidecar injector: which pods get the inference sidecar, and what
//! injection adds to them. `infermesh inject -f` (offline) and the admission
//! webhook both call [`inject`]; the webhook only turns its answer into a
//! JSON Patch ([`patch::diff`]), so the two cannot disagree.

pub mod offline;
pub mod patch;
pub mod review;
pub mod server;
mod spec;

use serde_json::{json, Map, Value};

pub use spec::{is_quantity, Mode, Options, Resources, CONTAINER};

/// Opt-in (`"true"`) or opt-out (`"false"`), as a pod template label (the
/// webhook's object selector sees labels only) or annotation.
pub const INJECT: &str = "infermesh.io/inject";
/// Written on injection: what was injected. Its presence makes a second
/// pass a no-op.
pub const STATUS: &str = "infermesh.io/status";
/// The label Istio's DestinationRule subsets route on.
pub const VERSION_LABEL: &str = "version";
/// Sets [`VERSION_LABEL`] when the pod template has none.
pub const VERSION: &str = "infermesh.io/version";
/// Per-pod overrides.
pub const IMAGE: &str = "infermesh.io/sidecar-image";
pub const MODE: &str = "infermesh.io/sidecar-mode";
pub const PORT: &str = "infermesh.io/port";
pub const MODEL_VOLUME: &str = "infermesh.io/model-volume";
pub const CPU: &str = "infermesh.io/sidecar-cpu";
pub const MEMORY: &str = "infermesh.io/sidecar-memory";
pub const CPU_LIMIT: &str = "infermesh.io/sidecar-cpu-limit";
pub const MEMORY_LIMIT: &str = "infermesh.io/sidecar-memory-limit";
pub const ARGS: &str = "infermesh.io/sidecar-args";
pub const STARTUP_SECONDS: &str = "infermesh.io/startup-timeout-seconds";
/// `kubectl logs/exec` pick this container when none is named.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// Whether the pod's namespace opted in as a whole (the webhook path the
/// namespace-selector webhook calls, or `inject -f --namespace-enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Inject only pods that opt in themselves.
    OptIn,
    /// Inject every pod that does not opt out.
    Namespace,
}

/// Why an object was left untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    OptedOut,
    NotOptedIn,
    AlreadyInjected,
    ExcludedNamespace(String),
    /// A kind without a pod template (Service, ConfigMap, ...).
    NoPodTemplate(String),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::OptedOut => write!(f, "{INJECT} is false"),
            Skip::NotOptedIn => write!(f, "no {INJECT}: \"true\" and the namespace did not opt in"),
            Skip::AlreadyInjected => write!(f, "already injected ({STATUS} is set)"),
            Skip::ExcludedNamespace(ns) => write!(f, "namespace {ns} is excluded"),
            Skip::NoPodTemplate(kind) => write!(f, "{kind} has no pod template"),
        }
    }
}

/// The result of a pass over one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The object with the sidecar added.
    Injected(Value),
    Skipped(Skip),
}

/// An object that opted in but cannot be injected; the message names the
/// field or annotation and the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("{path} is not {what}")]
    Malformed { path: String, what: &'static str },
    #[error("annotation {key}: {value:?} {reason}")]
    BadAnnotation {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("container name {0:?} is already taken by another container")]
    NameTaken(String),
    #[error("port {port} is already taken by container {container:?} (set {PORT})")]
    PortTaken { port: u16, container: String },
    #[error("the pod has no volume {0:?} for the model repository (name one with {MODEL_VOLUME})")]
    NoModelVolume(String),
}

/// Where a kind keeps its pod template, as a JSON pointer ("" for a Pod).
pub fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Decides whether `object` (a Pod or a workload with a pod template) gets
/// the sidecar and, if so, returns it with the sidecar added. `namespace`
/// is where the object lives (the object's own `metadata.namespace` when
/// `None`).
pub fn inject(
    object: &Value,
    namespace: Option<&str>,
    scope: Scope,
    opts: &Options,
) -> Result<Outcome, InjectError> {
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let Some(pointer) = template_pointer(kind) else {
        let kind = if kind.is_empty() {
            "an object without kind"
        } else {
            kind
        };
        return Ok(Outcome::Skipped(Skip::NoPodTemplate(kind.to_owned())));
    };
    let namespace = namespace.or_else(|| object.pointer("/metadata/namespace")?.as_str());
    if let Some(ns) = namespace.filter(|ns| opts.excluded_namespaces.iter().any(|e| e == ns)) {
        return Ok(Outcome::Skipped(Skip::ExcludedNamespace(ns.to_owned())));
    }
    let template = object
        .pointer(pointer)
        .filter(|t| t.is_object())
        .ok_or_else(|| malformed(pointer, "an object"))?;
    if template
        .get("metadata")
        .is_some_and(|m| !m.is_object() && !m.is_null())
    {
        return Err(malformed(&format!("{pointer}/metadata"), "an object"));
    }
    let labels = string_map(template, "/metadata/labels")?;
    let annotations = string_map(template, "/metadata/annotations")?;
    if annotations.contains_key(STATUS) {
        return Ok(Outcome::Skipped(Skip::AlreadyInjected));
    }
    let flag = labels.get(INJECT).or_else(|| annotations.get(INJECT));
    match flag.map(String::as_str) {
        Some("true") => {}
        Some("false") => return Ok(Outcome::Skipped(Skip::OptedOut)),
        Some(other) => {
            return Err(InjectError::BadAnnotation {
                key: INJECT,
                value: other.to_owned(),
                reason: "is not \"true\" or \"false\"".into(),
            })
        }
        None if scope == Scope::Namespace => {}
        None => return Ok(Outcome::Skipped(Skip::NotOptedIn)),
    }

    let sidecar = spec::Sidecar::resolve(opts, &annotations)?;
    let pod_spec = template
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| malformed(&format!("{pointer}/spec"), "an object"))?;
    check_pod(pod_spec, pointer, &sidecar)?;

    let mut out = object.clone();
    let Some(Value::Object(tpl)) = out.pointer_mut(pointer) else {
        return Err(malformed(pointer, "an object"));
    };
    let version_label = match (&sidecar.version, labels.get(VERSION_LABEL)) {
        (Some(want), Some(have)) if want != have => {
            return Err(InjectError::BadAnnotation {
                key: VERSION,
                value: want.clone(),
                reason: format!("conflicts with the label {VERSION_LABEL}={have}"),
            })
        }
        (Some(want), None) => Some(want.clone()),
        _ => None,
    };
    let meta = object_at(tpl, "metadata");
    if let Some(v) = version_label {
        object_at(meta, "labels").insert(VERSION_LABEL.into(), Value::String(v));
    }
    let first_app = pod_spec
        .get("containers")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .and_then(|c| c.get("name"))
        .cloned();
    let notes = object_at(meta, "annotations");
    notes.insert(STATUS.into(), Value::String(sidecar.status()));
    if sidecar.o.mode == Mode::Container {
        if let Some(name) = first_app {
            notes.entry(DEFAULT_CONTAINER).or_insert(name);
        }
    }
    let spec = object_at(tpl, "spec");
    let list = match sidecar.o.mode {
        Mode::Native => "initContainers",
        Mode::Container => "containers",
    };
    let containers = spec.entry(list).or_insert_with(|| json!([]));
    let Value::Array(containers) = containers else {
        return Err(malformed(&format!("{pointer}/spec/{list}"), "a list"));
    };
    containers.push(sidecar.container());
    Ok(Outcome::Injected(out))
}

/// Refuses pods the sidecar would clash with: its container name or port
/// already used, or no volume for the model repository.
fn check_pod(
    pod_spec: &Map<String, Value>,
    pointer: &str,
    sidecar: &spec::Sidecar,
) -> Result<(), InjectError> {
    for list in ["initContainers", "containers"] {
        let Some(items) = pod_spec.get(list) else {
            continue;
        };
        let items = items
            .as_array()
            .ok_or_else(|| malformed(&format!("{pointer}/spec/{list}"), "a list"))?;
        for c in items {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            if name == spec::CONTAINER {
                return Err(InjectError::NameTaken(name.to_owned()));
            }
            let ports = c.get("ports").and_then(Value::as_array);
            let taken = ports.into_iter().flatten().any(|p| {
                p.get("containerPort").and_then(Value::as_u64) == Some(u64::from(sidecar.o.port))
            });
            if taken {
                return Err(InjectError::PortTaken {
                    port: sidecar.o.port,
                    container: name.to_owned(),
                });
            }
        }
    }
    let volumes = pod_spec.get("volumes").and_then(Value::as_array);
    let found = volumes
        .into_iter()
        .flatten()
        .any(|v| v.get("name").and_then(Value::as_str) == Some(sidecar.o.model_volume.as_str()));
    if !found {
        return Err(InjectError::NoModelVolume(sidecar.o.model_volume.clone()));
    }
    Ok(())
}

fn malformed(path: &str, what: &'static str) -> InjectError {
    let path = if path.is_empty() { "/" } else { path };
    InjectError::Malformed {
        path: path.to_owned(),
        what,
    }
}

/// `labels` or `annotations` of a template as strings; absent is empty.
fn string_map(
    template: &Value,
    pointer: &str,
) -> Result<std::collections::BTreeMap<String, String>, InjectError> {
    let Some(v) = template.pointer(pointer) else {
        return Ok(Default::default());
    };
    if v.is_null() {
        return Ok(Default::default());
    }
    let map = v
        .as_object()
        .ok_or_else(|| malformed(pointer, "a map of strings"))?;
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(malformed(&format!("{pointer}/{k}"), "a string")),
        })
        .collect()
}

/// The object under `key`, created if absent or `null` (callers checked
/// that it is not anything else).
fn object_at<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let slot = map.entry(key).or_insert(Value::Null);
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut().expect("just made an object")
}

#[cfg(test)]
mod tests;
