//! `admission.k8s.io/v1` AdmissionReview in, AdmissionReview out: the
//! webhook's logic without the network, so it is tested directly.
//!
//! | request | answer |
//! |---|---|
//! | not JSON, not an AdmissionReview v1, no `request.uid` | HTTP 400, `{"error": …}` (the API server applies the `failurePolicy`) |
//! | an object the injector leaves alone (opted out, not opted in, already injected, excluded namespace, a kind without pod template, not CREATE) | `allowed: true`, no patch |
//! | an opted-in object | `allowed: true`, a JSON Patch |
//! | an opted-in object that cannot be injected (name or port taken, no model volume, bad annotation) | `allowed: false`, HTTP-style code 400 and the reason |

use base64::Engine;
use serde_json::{json, Value};

use super::{inject, patch, template_pointer, Options, Outcome, Scope};

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// What the HTTP layer sends back.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

fn refuse(msg: String) -> Answer {
    Answer {
        status: 400,
        body: json!({ "error": msg }),
    }
}

fn review(response: Value) -> Answer {
    Answer {
        status: 200,
        body: json!({"apiVersion": API_VERSION, "kind": KIND, "response": response}),
    }
}

/// Answers one AdmissionReview body.
pub fn handle(body: &[u8], scope: Scope, opts: &Options) -> Answer {
    let doc: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return refuse(format!("body is not JSON: {e}")),
    };
    let api_version = doc.get("apiVersion").and_then(Value::as_str);
    let kind = doc.get("kind").and_then(Value::as_str);
    if api_version != Some(API_VERSION) || kind != Some(KIND) {
        return refuse(format!(
            "expected apiVersion {API_VERSION} kind {KIND}, got {} {}",
            api_version.unwrap_or("(none)"),
            kind.unwrap_or("(none)")
        ));
    }
    let Some(request) = doc.get("request").filter(|r| r.is_object()) else {
        return refuse("AdmissionReview has no request".into());
    };
    let Some(uid) = request.get("uid").and_then(Value::as_str) else {
        return refuse("request.uid is missing".into());
    };
    let allow = || review(json!({"uid": uid, "allowed": true}));
    let operation = request
        .get("operation")
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some(object) = request.get("object").filter(|o| o.is_object()) else {
        return allow();
    };
    let object_kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    // A pod's spec is immutable after creation; a workload's template can
    // be injected on update too.
    let mutable = match template_pointer(object_kind) {
        Some("") => operation == "CREATE",
        Some(_) => matches!(operation, "CREATE" | "UPDATE"),
        None => false,
    };
    if !mutable {
        return allow();
    }
    let namespace = request.get("namespace").and_then(Value::as_str);
    match inject(object, namespace, scope, opts) {
        Ok(Outcome::Skipped(_)) => allow(),
        Ok(Outcome::Injected(new)) => {
            let ops = Value::Array(patch::diff(object, &new));
            let bytes = serde_json::to_vec(&ops).unwrap_or_default();
            review(json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
            }))
        }
        Err(e) => review(json!({
            "uid": uid,
            "allowed": false,
            "status": {"code": 400, "message": format!("infermesh sidecar injection: {e}")},
        })),
    }
}
