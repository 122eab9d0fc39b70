//! `infermesh inject -f`: injects the pods and workloads of a manifest
//! file, like `istioctl kube-inject`, with the webhook's code path.

use serde_json::Value;
use yaml_rust2::yaml::Hash;
use yaml_rust2::{Yaml, YamlEmitter, YamlLoader};

use super::{inject, InjectError, Options, Outcome, Scope, Skip};
use crate::manifest::to_json;

/// What happened to one document, for the report on stderr.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// `Kind/name`.
    pub what: String,
    /// `None` if injected.
    pub skipped: Option<Skip>,
}

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("{what}: {source}")]
    Inject { what: String, source: InjectError },
}

fn describe(doc: &Value) -> String {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("?");
    let name = doc
        .pointer("/metadata/name")
        .or_else(|| doc.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    format!("{kind}/{name}")
}

/// Injects every document of `text` (YAML, multi-document; JSON is YAML).
/// `kind: List` items are injected one by one. Returns the documents and a
/// note per pod or workload; any document that opted in but cannot be
/// injected fails the whole file.
pub fn inject_text(
    text: &str,
    scope: Scope,
    opts: &Options,
) -> Result<(Vec<Value>, Vec<Note>), OfflineError> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| OfflineError::Yaml(e.to_string()))?;
    let mut notes = Vec::new();
    let mut out = Vec::new();
    for doc in docs.iter().map(to_json) {
        if doc.is_null() {
            continue;
        }
        out.push(inject_doc(doc, scope, opts, &mut notes)?);
    }
    Ok((out, notes))
}

fn inject_doc(
    mut doc: Value,
    scope: Scope,
    opts: &Options,
    notes: &mut Vec<Note>,
) -> Result<Value, OfflineError> {
    if doc.get("kind").and_then(Value::as_str) == Some("List") {
        if let Some(Value::Array(items)) = doc.get_mut("items") {
            let taken = std::mem::take(items);
            *items = taken
                .into_iter()
                .map(|item| inject_doc(item, scope, opts, notes))
                .collect::<Result<_, _>>()?;
        }
        return Ok(doc);
    }
    let what = describe(&doc);
    match inject(&doc, None, scope, opts) {
        Ok(Outcome::Injected(new)) => {
            notes.push(Note {
                what,
                skipped: None,
            });
            Ok(new)
        }
        Ok(Outcome::Skipped(Skip::NoPodTemplate(_))) => Ok(doc),
        Ok(Outcome::Skipped(why)) => {
            notes.push(Note {
                what,
                skipped: Some(why),
            });
            Ok(doc)
        }
        Err(source) => Err(OfflineError::Inject { what, source }),
    }
}

/// JSON to YAML nodes (numbers keep their JSON text).
pub fn to_yaml(v: &Value) -> Yaml {
    match v {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) if n.is_f64() => Yaml::Real(n.to_string()),
        Value::Number(n) => n
            .as_i64()
            .map_or_else(|| Yaml::Real(n.to_string()), Yaml::Integer),
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(a) => Yaml::Array(a.iter().map(to_yaml).collect()),
        Value::Object(m) => Yaml::Hash(
            m.iter()
                .map(|(k, v)| (Yaml::String(k.clone()), to_yaml(v)))
                .collect::<Hash>(),
        ),
    }
}

/// Documents as a multi-document YAML stream.
pub fn emit_yaml(docs: &[Value]) -> String {
    let mut out = String::new();
    for doc in docs {
        let mut s = String::new();
        // Writing to a String cannot fail; a document that cannot be
        // emitted is skipped rather than half-written.
        if YamlEmitter::new(&mut s).dump(&to_yaml(doc)).is_ok() {
            out.push_str(&s);
            out.push('\n');
        }
    }
    out
}
