//! The `infermesh` command line: checks pluginConfig files and manifests
//! with the filters' own parsers (`validate`) and prints the decision each
//! filter would take for a request (`explain`), using the same core code
//! the filters run in Envoy. `inject` adds the inference sidecar to pods,
//! offline or as a mutating admission webhook.

pub mod demo;
pub mod explain;
pub mod inject;
pub mod local;
pub mod manifest;
pub mod validate;
