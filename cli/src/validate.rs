//! `infermesh validate`: pluginConfig files and the WasmPlugins in manifests.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::manifest::{self, Doc, Filter};

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

// ---------------------------------------------------------------------------
// Cross-resource rules: what the manifests do together once Istio applies
// them (see istio/README.md for why each rule exists).

/// The installs under the YAML paths given on the command line, each a set
/// of paths applied together: one directory with a `base/` folder is
/// `base/` plus each of its sibling folders (the variants, one at a time);
/// one directory without it, or several paths, is one install.
pub fn installs(paths: &[PathBuf]) -> Vec<Vec<PathBuf>> {
    if let [dir] = paths {
        let base = dir.join("base");
        if base.is_dir() {
            let mut variants: Vec<PathBuf> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir() && *p != base)
                .collect();
            variants.sort();
            return variants
                .into_iter()
                .map(|v| vec![base.clone(), v])
                .collect();
        }
    }
    if paths.is_empty() {
        Vec::new()
    } else {
        vec![paths.to_vec()]
    }
}

/// Runs the cross-resource rules over each install (see [`installs`]):
/// one `ok` finding per clean install, one failure per broken rule.
pub fn check_installs(paths: &[PathBuf]) -> Vec<Finding> {
    let mut out = Vec::new();
    for install in installs(paths) {
        let shown = install
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ");
        match manifest::load_docs(&install) {
            Err(e) => out.push(failure(shown, None, e.to_string())),
            Ok(docs) => {
                let found = cross_check(&docs);
                if found.is_empty() {
                    out.push(Finding {
                        what: format!("{shown} (applied together)"),
                        filter: Some("cross-resource rules"),
                        error: None,
                    });
                }
                out.extend(found);
            }
        }
    }
    out
}

const CLOUD_HEADER: &str = filter_core::headers::CLOUD;

/// A Wasm filter carrying the infermesh module (or any WasmPlugin): where
/// it is, which workloads and ports it selects, how it fails, its config.
struct Plugin<'a> {
    doc: &'a Doc,
    /// Field path prefix for messages (`spec` or `spec.configPatches[i]`).
    at: String,
    selector: Option<&'a Value>,
    /// Whether some selector leaves the ports open.
    all_ports: Option<String>,
    /// `Some(field)` when it fails closed.
    fails_closed: Option<String>,
    /// The pluginConfig, when it is the infermesh module's.
    module: Option<Value>,
}

const STAGES: [&str; 3] = ["router", "canary", "failover"];

/// The config as the module's sections: the module's own pluginConfig, or
/// a single-stage filter's (by its `app.kubernetes.io/component` label)
/// under its stage's name; `None` for other plugins.
fn module_sections(doc: &Doc, config: &Value) -> Option<Value> {
    let component = doc.json["metadata"]["labels"]["app.kubernetes.io/component"].as_str();
    let stage = match component {
        Some("model-router") => Some("router"),
        Some("canary") => Some("canary"),
        Some("failover") => Some("failover"),
        _ => None,
    };
    match stage {
        Some(s) if !STAGES.iter().any(|k| config.get(*k).is_some()) => {
            Some(serde_json::json!({ s: config }))
        }
        _ => STAGES
            .iter()
            .any(|s| config.get(*s).is_some())
            .then(|| config.clone()),
    }
}

fn plugins(docs: &[Doc]) -> Vec<Plugin<'_>> {
    let mut out = Vec::new();
    for doc in docs {
        let spec = doc.spec();
        match doc.kind() {
            "WasmPlugin" => {
                let matches = spec["match"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let all_ports = if matches.is_empty() {
                    Some("spec.match".to_owned())
                } else {
                    matches.iter().enumerate().find_map(|(i, m)| {
                        let ports = m["ports"].as_array().map_or(0, Vec::len);
                        (ports == 0).then(|| format!("spec.match[{i}].ports"))
                    })
                };
                // Istio's default failStrategy is FAIL_CLOSE.
                let fails_closed =
                    matches!(spec["failStrategy"].as_str(), None | Some("FAIL_CLOSE"))
                        .then(|| "spec.failStrategy".to_owned());
                let config = &spec["pluginConfig"];
                out.push(Plugin {
                    doc,
                    at: "spec".to_owned(),
                    selector: spec["selector"].get("matchLabels"),
                    all_ports,
                    fails_closed,
                    module: module_sections(doc, config),
                });
            }
            "EnvoyFilter" => {
                let patches = spec["configPatches"].as_array().into_iter().flatten();
                for (i, p) in patches.enumerate() {
                    let at = format!("spec.configPatches[{i}]");
                    let typed = &p["patch"]["value"]["typed_config"];
                    if typed["@type"]
                        .as_str()
                        .is_none_or(|t| !t.ends_with(".wasm.v3.Wasm"))
                    {
                        continue;
                    }
                    let cfg = &typed["config"];
                    let all_ports = p["match"]["listener"]["portNumber"]
                        .as_u64()
                        .is_none()
                        .then(|| format!("{at}.match.listener.portNumber"));
                    // Envoy's default failure_policy fails closed.
                    let fails_closed = matches!(
                        cfg["failure_policy"].as_str(),
                        None | Some("FAIL_CLOSED" | "UNSPECIFIED")
                    )
                    .then(|| format!("{at}.patch.value.typed_config.config.failure_policy"));
                    let module = cfg["configuration"]["value"]
                        .as_str()
                        .and_then(|s| serde_json::from_str::<Value>(s).ok())
                        .and_then(|c| module_sections(doc, &c));
                    out.push(Plugin {
                        doc,
                        at,
                        selector: spec["workloadSelector"].get("labels"),
                        all_ports,
                        fails_closed,
                        module,
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// Whether some workload can match both label selectors (absent or empty
/// selects every workload; two selectors exclude each other only if they
/// demand different values for one label).
fn selectors_overlap(a: Option<&Value>, b: Option<&Value>) -> bool {
    let (Some(a), Some(b)) = (a.and_then(Value::as_object), b.and_then(Value::as_object)) else {
        return true;
    };
    a.iter().all(|(k, v)| b.get(k).is_none_or(|w| w == v))
}

/// A WasmPlugin/EnvoyFilter in `ns` applies to pods in `ns`; in the root
/// namespace, to every namespace.
fn namespaces_overlap(a: &str, b: &str) -> bool {
    a == b || a == "istio-system" || b == "istio-system"
}

fn resolve_host(host: &str, ns: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_owned()
    } else {
        format!("{host}.{ns}.svc.cluster.local")
    }
}

/// `(port, host)` of an Istio cluster name `outbound|PORT|SUBSET|HOST`.
fn parse_cluster(name: &str) -> Option<(u64, &str)> {
    let mut parts = name.split('|');
    let (Some("outbound"), Some(port), Some(_), Some(host), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    Some((port.parse().ok()?, host))
}

/// Whether a Service or ServiceEntry defines `host` with port `port`.
fn defines_host_port(docs: &[Doc], host: &str, port: u64) -> bool {
    docs.iter().any(|d| match d.kind() {
        "ServiceEntry" => {
            let hosts = d.spec()["hosts"].as_array().into_iter().flatten();
            let ports = d.spec()["ports"].as_array().into_iter().flatten();
            hosts.clone().any(|h| h == host) && ports.clone().any(|p| p["number"] == port)
        }
        "Service" => {
            format!("{}.{}.svc.cluster.local", d.name(), d.namespace()) == host
                && d.spec()["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["port"] == port)
        }
        _ => false,
    })
}

fn rule(doc: &Doc, field: &str, message: String) -> Finding {
    Finding {
        what: doc.what(),
        filter: None,
        error: Some(format!("{field}: {message}")),
    }
}

/// The cross-resource rules over one install.
pub fn cross_check(docs: &[Doc]) -> Vec<Finding> {
    let mut out = Vec::new();
    let plugins = plugins(docs);

    for p in &plugins {
        // No ports: runs on every outbound HTTP listener of the pods.
        if let Some(field) = &p.all_ports {
            out.push(rule(
                p.doc,
                field,
                "no port restriction: the filter runs on every outbound HTTP port of the \
                 selected pods, other services' traffic included; list the inference ports"
                    .to_owned(),
            ));
        }
        // Failing closed on a broad match denies unrelated traffic.
        if let (Some(field), true) = (
            &p.fails_closed,
            p.all_ports.is_some() || p.selector.is_none(),
        ) {
            out.push(rule(
                p.doc,
                field,
                "fails closed on a broad match: if the module cannot be fetched or \
                 configured, Istio puts a deny-all filter in its place and all HTTP of the \
                 selected pods is refused; use FAIL_OPEN or narrow the match"
                    .to_owned(),
            ));
        }
        // An unpinned image that is never re-pulled.
        if p.doc.kind() == "WasmPlugin" {
            let spec = p.doc.spec();
            let url = spec["url"].as_str().unwrap_or("");
            let remote = !url.starts_with("file://") && !url.starts_with("http");
            let latest = url
                .rsplit('/')
                .next()
                .is_some_and(|l| !l.contains(':') || l.ends_with(":latest"));
            let policy = spec["imagePullPolicy"].as_str();
            let if_not_present = match policy {
                None => !latest,
                Some(p) => p == "IfNotPresent",
            };
            if remote && spec["sha256"].as_str().is_none_or(str::is_empty) && if_not_present {
                out.push(rule(
                    p.doc,
                    "spec.sha256",
                    "unset with imagePullPolicy IfNotPresent: a re-pushed tag is never \
                     pulled again; set sha256 (dist/oci/infermesh.manifest.sha256) or \
                     imagePullPolicy: Always"
                        .to_owned(),
                ));
            }
        }
    }

    // Both routing variants (any two filters running one stage) on one
    // workload.
    let modules: Vec<&Plugin> = plugins.iter().filter(|p| p.module.is_some()).collect();
    let stages = |p: &Plugin| -> Vec<&str> {
        STAGES
            .into_iter()
            .filter(|s| p.module.as_ref().is_some_and(|m| m.get(*s).is_some()))
            .collect()
    };
    for (i, a) in modules.iter().enumerate() {
        for b in &modules[..i] {
            let shared: Vec<&str> = stages(a)
                .into_iter()
                .filter(|s| stages(b).contains(s))
                .collect();
            if !shared.is_empty()
                && namespaces_overlap(a.doc.namespace(), b.doc.namespace())
                && selectors_overlap(a.selector, b.selector)
            {
                let field = match a.doc.kind() {
                    "EnvoyFilter" => "spec.workloadSelector",
                    _ => "spec.selector",
                };
                out.push(rule(
                    a.doc,
                    field,
                    format!(
                        "selects the same workloads as {} ({}): the {} stage(s) would run \
                         twice; apply istio/base with path-routing/ or body-routing/, not both",
                        b.doc.id(),
                        b.at,
                        shared.join(", ")
                    ),
                ));
            }
        }
    }

    // Failover clouds: each cluster must exist.
    let mut cloud_hosts = Vec::new();
    for p in &modules {
        let clouds = p.module.as_ref().map(|m| &m["failover"]["clouds"]);
        for (i, c) in clouds
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = match p.doc.kind() {
                "WasmPlugin" => format!("spec.pluginConfig.failover.clouds[{i}].cluster"),
                _ => format!("{}.…configuration.failover.clouds[{i}].cluster", p.at),
            };
            let name = c["cluster"].as_str().unwrap_or("");
            match parse_cluster(name) {
                None => out.push(rule(
                    p.doc,
                    &at,
                    format!("{name:?} is not an Istio cluster name (outbound|PORT||HOST)"),
                )),
                Some((port, host)) => {
                    cloud_hosts.push(host.to_owned());
                    if !defines_host_port(docs, host, port) {
                        out.push(rule(
                            p.doc,
                            &at,
                            format!(
                                "{name}: no ServiceEntry or Service defines host {host} port \
                                 {port}, so Istio creates no such cluster and every probe and \
                                 replay to this cloud fails"
                            ),
                        ));
                    }
                }
            }
        }
    }

    // Routes the failover stage replays must not carry Istio's retries.
    let failover_on = !cloud_hosts.is_empty();
    for vs in docs.iter().filter(|d| d.kind() == "VirtualService") {
        let ns = vs.namespace();
        let routes = vs.spec()["http"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let routes_clouds = routes.iter().any(|r| {
            r["match"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["headers"].get(CLOUD_HEADER).is_some())
        });
        for (i, r) in routes.iter().enumerate() {
            let to_cloud = r["route"].as_array().into_iter().flatten().any(|d| {
                d["destination"]["host"]
                    .as_str()
                    .is_some_and(|h| cloud_hosts.contains(&resolve_host(h, ns)))
            });
            let replayed = failover_on && (routes_clouds || to_cloud);
            let no_retries = r["retries"]["attempts"].as_i64().is_some_and(|a| a <= 0);
            if replayed && !no_retries {
                let name = r["name"]
                    .as_str()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default();
                out.push(rule(
                    vs,
                    &format!("spec.http[{i}]{name}.retries"),
                    "Istio's default retry policy (2 retries on connect-failure, \
                     refused-stream, unavailable, cancelled) applies to this route, which the \
                     failover stage replays on its own budget; set retries.attempts: 0"
                        .to_owned(),
                ));
            }
        }
    }

    // Model Services: their ports must be HTTP to Istio.
    let vs_hosts: Vec<String> = docs
        .iter()
        .filter(|d| d.kind() == "VirtualService")
        .flat_map(|d| {
            d.spec()["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|h| resolve_host(h, d.namespace()))
                .collect::<Vec<_>>()
        })
        .collect();
    for svc in docs.iter().filter(|d| d.kind() == "Service") {
        let host = format!("{}.{}.svc.cluster.local", svc.name(), svc.namespace());
        if !vs_hosts.contains(&host) {
            continue;
        }
        let ports = svc.spec()["ports"].as_array().into_iter().flatten();
        for (i, port) in ports.enumerate() {
            let proto = mesh::istio::kube_port_protocol(
                port["name"].as_str(),
                port["appProtocol"].as_str(),
            );
            if proto != mesh::istio::Protocol::Http {
                out.push(rule(
                    svc,
                    &format!("spec.ports[{i}]"),
                    format!(
                        "port {} (name {}, appProtocol {}) is not HTTP to Istio: the sidecars \
                         treat it as TCP and no HTTP filter, the module included, sees its \
                         requests; name it http-* or set appProtocol: http",
                        port["port"], port["name"], port["appProtocol"]
                    ),
                ));
            }
        }
    }
    out
}
