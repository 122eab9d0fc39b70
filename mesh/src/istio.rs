//! The Envoy configuration Istio 1.30 generates for a client sidecar,
//! rendered from Kubernetes manifests (the project's `istio/` folder).
//!
//! No istiod can run here, so this module reproduces the parts of Istio's
//! translation that decide what the inference filter sees, each rule
//! written from Istio 1.30.3's source (the file is named at the rule):
//!
//! - one outbound listener per HTTP service port, `0.0.0.0_<port>`, with
//!   Istio's HTTP filters in Istio's order; WasmPlugins placed by phase and
//!   priority, delivered by ECDS under their 1.30 names;
//! - `pluginConfig` → protobuf `Struct` → JSON in a `StringValue`;
//! - EnvoyFilter `HTTP_FILTER` patches (`INSERT_BEFORE` etc.);
//! - routes from VirtualServices (header and URI matches, authority and
//!   URI rewrites, retries, timeouts), Istio's default route and retry
//!   policy elsewhere;
//! - clusters `outbound|PORT|SUBSET|HOST` from Services, ServiceEntries and
//!   DestinationRule subsets.
//!
//! Stand-ins, where Istio's parts cannot run on loopback: Istio's own
//! filters that ship only in Istio's Envoy build (`istio.metadata_exchange`,
//! `istio.alpn`, `istio.stats`) are no-op Lua filters under the same names;
//! the agent's module fetch (pkg/wasm) is a lookup of `<image>.wasm` in a
//! local directory; the ECDS and EDS servers are a file (`path_config_source`)
//! and STATIC endpoints; TLS origination from DestinationRules is left out
//! (the stub upstreams speak plain HTTP). RDS is inlined.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Number, Value};
use yaml_rust2::{Yaml, YamlLoader};

/// The Istio release whose translation this module reproduces.
pub const ISTIO_VERSION: &str = "1.30.3";

/// Prefix of the ECDS resource name of a TrafficExtension
/// (pilot/pkg/model/extensions.go `TrafficExtensionResourceNamePrefix`).
pub const EXTENSION_PREFIX: &str = "extensions.istio.io/trafficextension/";

/// Suffix of the TrafficExtension Istio synthesises from a WasmPlugin
/// (pilot/pkg/config/kube/extensions/translate.go `syntheticMarker`).
pub const WASMPLUGIN_MARKER: &str = "~istio-translated-wasmplugin";

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const HCM: &str = "envoy.filters.network.http_connection_manager";
const ROUTER: &str = "envoy.filters.http.router";

/// The Envoy HTTP filter name Istio 1.30 gives WasmPlugin `ns/name`.
pub fn wasmplugin_filter_name(namespace: &str, name: &str) -> String {
    format!("{EXTENSION_PREFIX}{namespace}.{name}{WASMPLUGIN_MARKER}")
}

/// Istio's cluster name (pilot/pkg/model/service.go `BuildSubsetKey`).
pub fn cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// Istio's outbound listener name for a port (pilot/pkg/networking/core
/// listener.go: `0.0.0.0_<port>` for a wildcard-bound HTTP port).
pub fn listener_name(port: u16) -> String {
    format!("0.0.0.0_{port}")
}

// ---------------------------------------------------------------------------
// Manifests

/// Kubernetes objects, as JSON, in the order read.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub docs: Vec<Value>,
}

impl Manifests {
    /// Every object in the YAML files at `paths` (files, or directories
    /// read recursively in name order), in that order.
    pub fn load(paths: &[PathBuf]) -> Result<Manifests, String> {
        let mut m = Manifests::default();
        for p in paths {
            for file in yaml_files(p)? {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                let docs = YamlLoader::load_from_str(&text)
                    .map_err(|e| format!("{}: invalid YAML: {e}", file.display()))?;
                m.docs.extend(
                    docs.iter()
                        .map(yaml_to_json)
                        .filter(|d| d.get("kind").is_some()),
                );
            }
        }
        Ok(m)
    }

    /// Adds one object (e.g. a Service the test brings along).
    pub fn push(&mut self, doc: Value) -> &mut Manifests {
        self.docs.push(doc);
        self
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.docs.iter().filter(move |d| d["kind"] == kind)
    }
}

/// `path` itself if it is a file, else the YAML files under it, sorted.
pub fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(|e| format!("cannot read {}: {e}", d.display()))?;
        for entry in entries {
            let p = entry
                .map_err(|e| format!("cannot read {}: {e}", d.display()))?
                .path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Converts a YAML node to JSON. Map keys that are not strings are
/// rendered, so nothing is silently dropped.
pub fn yaml_to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Yaml::Integer(i) => Value::Number((*i).into()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Real(r) => r.clone(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect::<Map<_, _>>(),
        ),
        Yaml::Null | Yaml::BadValue | Yaml::Alias(_) => Value::Null,
    }
}

// ---------------------------------------------------------------------------
// pluginConfig → Struct → JSON

/// The JSON Istio hands a Wasm module as its configuration: the
/// WasmPlugin's `pluginConfig` became a `google.protobuf.Struct` when the
/// API server's JSON was decoded (every number a double), and
/// pilot/pkg/model/extensions.go `buildWasmConfig` writes it with
/// pkg/util/protomarshal `ToJSON` (golang/protobuf `jsonpb`, no indent):
/// map keys sorted, numbers formatted by Go's `encoding/json`, strings
/// escaped by it. Empty or absent: no configuration at all (`None`).
pub fn plugin_config_json(config: &Value) -> Option<String> {
    match config {
        Value::Object(m) if !m.is_empty() => {
            let mut out = String::new();
            write_struct_value(config, &mut out);
            Some(out)
        }
        _ => None,
    }
}

fn write_struct_value(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&go_float(n.as_f64().unwrap_or(0.0))),
        Value::String(s) => go_string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_struct_value(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_string(k, out);
                out.push(':');
                write_struct_value(&m[k], out);
            }
            out.push('}');
        }
    }
}

/// A float64 as Go's `encoding/json` writes it: the shortest decimal that
/// round-trips, exponent form only below 1e-6 or from 1e21 (`1e+21`,
/// `1e-7`). NaN and infinities cannot come from JSON.
pub fn go_float(f: f64) -> String {
    let abs = f.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        let s = format!("{f:e}");
        // Rust writes `1e21`/`1e-7`; Go writes `1e+21`/`1e-7`.
        match s.split_once('e') {
            Some((m, e)) if !e.starts_with('-') => format!("{m}e+{e}"),
            _ => s,
        }
    } else {
        format!("{f}")
    }
}

/// A string as Go's `encoding/json` writes it (HTML-safe escaping on).
fn go_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------
// The proxy and its surroundings

/// The sidecar whose configuration is rendered.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Istio's root namespace (`istio-system` by default).
    pub root_namespace: String,
}

impl Proxy {
    pub fn new(namespace: &str, labels: &[(&str, &str)]) -> Proxy {
        Proxy {
            namespace: namespace.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            root_namespace: "istio-system".to_owned(),
        }
    }

    /// Whether a resource in `ns` applies to this proxy: its own namespace
    /// or the root namespace (pilot/pkg/model/push_context.go
    /// `TrafficExtensionsByListenerInfo`, `EnvoyFilters`).
    fn sees(&self, ns: &str) -> bool {
        ns == self.namespace || ns == self.root_namespace
    }

    /// A `matchLabels` selector: absent or empty selects every workload.
    fn selected_by(&self, match_labels: Option<&Value>) -> bool {
        match match_labels.and_then(Value::as_object) {
            None => true,
            Some(m) => m
                .iter()
                .all(|(k, v)| v.as_str() == self.labels.get(k).map(String::as_str)),
        }
    }
}

/// What the stand-ins need to know: where each cluster's endpoints
/// listen, where fetched modules are, where to write ECDS files.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// Endpoints per cluster name; clusters not listed get none.
    pub endpoints: HashMap<String, Vec<SocketAddr>>,
    /// Stand-in for the agent's module cache: `<image>.wasm` for
    /// `oci://…/<image>:<tag>`, `<file name>` for a local file.
    pub wasm_dir: PathBuf,
    /// Where the ECDS resources are written.
    pub ecds_dir: PathBuf,
}

/// The rendered configuration.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The Envoy bootstrap (listeners bound to 127.0.0.1, ephemeral ports).
    pub bootstrap: Value,
    /// ECDS files the bootstrap names, with their contents.
    pub ecds: Vec<(PathBuf, Value)>,
    /// Outbound HTTP listener names by service port.
    pub listeners: BTreeMap<u16, String>,
}

impl Rendered {
    /// Writes the ECDS files.
    pub fn write_ecds(&self) -> Result<(), String> {
        for (path, v) in &self.ecds {
            let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
            std::fs::write(path, text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// The HTTP filter names of the listener for `port`, in order.
    pub fn http_filter_names(&self, port: u16) -> Vec<String> {
        let Some(l) = self.listener(port) else {
            return Vec::new();
        };
        l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|f| f["name"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The listener for service port `port`.
    pub fn listener(&self, port: u16) -> Option<&Value> {
        let name = self.listeners.get(&port)?;
        self.bootstrap["static_resources"]["listeners"]
            .as_array()?
            .iter()
            .find(|l| l["name"] == name.as_str())
    }

    /// The route configuration of the listener for `port`.
    pub fn routes(&self, port: u16) -> Option<&Value> {
        Some(
            &self.listener(port)?["filter_chains"][0]["filters"][0]["typed_config"]["route_config"],
        )
    }

    /// The ECDS resource (a `TypedExtensionConfig`) named `name`.
    pub fn extension(&self, name: &str) -> Option<&Value> {
        self.ecds
            .iter()
            .flat_map(|(_, v)| v["resources"].as_array().into_iter().flatten())
            .find(|r| r["name"] == name)
    }
}

// ---------------------------------------------------------------------------
// Services

/// Protocols as far as listener building cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Other,
}

/// A Kubernetes Service port's protocol (pkg/config/kube/conversion.go
/// `ConvertProtocol`): `appProtocol` if set (with Kubernetes' `h2c` and
/// `ws` names), else the port name; `grpc-web…` first, else the part
/// before the first `-`, parsed case-insensitively
/// (pkg/config/protocol/instance.go `Parse`). HTTP, HTTP2, http_proxy,
/// gRPC and gRPC-Web give an HTTP listener (`IsHTTP`); anything else,
/// unnamed ports included, a TCP one.
pub fn kube_port_protocol(name: Option<&str>, app_protocol: Option<&str>) -> Protocol {
    let name = match app_protocol {
        Some("kubernetes.io/h2c" | "kubernetes.io/ws") => return Protocol::Http,
        Some(app) => app,
        None => name.unwrap_or(""),
    };
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("grpc-web") {
        return Protocol::Http;
    }
    match lower.split('-').next().unwrap_or("") {
        "http" | "http2" | "http_proxy" | "grpc" => Protocol::Http,
        _ => Protocol::Other,
    }
}

/// A ServiceEntry port's `protocol` field (pkg/config/protocol/instance.go).
fn serviceentry_protocol(p: Option<&str>) -> Protocol {
    match p.map(str::to_ascii_uppercase).as_deref() {
        Some("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB") => Protocol::Http,
        _ => Protocol::Other,
    }
}

#[derive(Debug, Clone)]
struct Service {
    host: String,
    ports: Vec<(u16, Protocol)>,
}

fn port_number(v: &Value) -> Option<u16> {
    v.as_u64().and_then(|n| u16::try_from(n).ok())
}

fn services(m: &Manifests) -> Vec<Service> {
    let mut out = Vec::new();
    for s in m.of_kind("Service") {
        let name = s["metadata"]["name"].as_str().unwrap_or_default();
        let ns = s["metadata"]["namespace"].as_str().unwrap_or("default");
        let ports = s["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    port_number(&p["port"])?,
                    kube_port_protocol(p["name"].as_str(), p["appProtocol"].as_str()),
                ))
            })
            .collect();
        out.push(Service {
            host: format!("{name}.{ns}.svc.cluster.local"),
            ports,
        });
    }
    for se in m.of_kind("ServiceEntry") {
        let ports: Vec<(u16, Protocol)> = se["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    port_number(&p["number"])?,
                    serviceentry_protocol(p["protocol"].as_str()),
                ))
            })
            .collect();
        for h in se["spec"]["hosts"].as_array().into_iter().flatten() {
            if let Some(h) = h.as_str() {
                out.push(Service {
                    host: h.to_owned(),
                    ports: ports.clone(),
                });
            }
        }
    }
    out
}

/// A VirtualService or DestinationRule host, short names resolved in the
/// resource's namespace (pilot/pkg/model/config.go
/// `ResolveShortnameToFQDN`).
fn resolve_host(host: &str, ns: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_owned()
    } else {
        format!("{host}.{ns}.svc.cluster.local")
    }
}

// ---------------------------------------------------------------------------
// Rendering

/// Renders the outbound configuration of `proxy` for `manifests`.
pub fn render(manifests: &Manifests, proxy: &Proxy, env: &Env) -> Result<Rendered, String> {
    let services = services(manifests);
    let mut http_ports: Vec<u16> = services
        .iter()
        .flat_map(|s| s.ports.iter())
        .filter(|(_, p)| *p == Protocol::Http)
        .map(|(n, _)| *n)
        .collect();
    http_ports.sort_unstable();
    http_ports.dedup();

    let plugins = wasm_plugins(manifests, proxy);
    let mut ecds = Vec::new();
    for (i, p) in plugins.iter().enumerate() {
        let path = env.ecds_dir.join(format!("ecds-{i}.json"));
        ecds.push((path, ecds_resource(p, env)));
    }
    let ecds_paths: HashMap<String, PathBuf> = plugins
        .iter()
        .zip(&ecds)
        .map(|(p, (path, _))| (p.resource_name.clone(), path.clone()))
        .collect();

    let mut listeners = Vec::new();
    let mut names = BTreeMap::new();
    for &port in &http_ports {
        let mut filters = http_filters(&plugins, port, &ecds_paths);
        apply_envoyfilters(manifests, proxy, port, &mut filters, env)?;
        let routes = route_config(manifests, &services, port)?;
        let name = listener_name(port);
        listeners.push(json!({
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": HCM,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": format!("outbound_0.0.0.0_{port}"),
                    "codec_type": "AUTO",
                    "use_remote_address": false,
                    "normalize_path": true,
                    "stream_idle_timeout": "0s",
                    "route_config": routes,
                    "http_filters": filters,
                },
            }]}],
        }));
        names.insert(port, name);
    }

    let stats_tags: Vec<Value> = filter_core::stats::TAGS
        .iter()
        .map(|t| json!({"tag_name": t, "regex": filter_core::stats::tag_regex(t)}))
        .collect();
    let bootstrap = json!({
        "node": {
            "id": format!("sidecar~127.0.0.1~client.{ns}~{ns}.svc.cluster.local", ns = proxy.namespace),
            "cluster": format!("client.{}", proxy.namespace),
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "stats_config": {"stats_tags": stats_tags},
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters(manifests, &services, env),
        },
    });
    Ok(Rendered {
        bootstrap,
        ecds,
        listeners: names,
    })
}

/// A WasmPlugin as Istio 1.30 sees it: translated to a TrafficExtension.
#[derive(Debug, Clone)]
struct Plugin {
    /// `<ns>.<name>~istio-translated-wasmplugin`.
    config_name: String,
    /// [`EXTENSION_PREFIX`] + `config_name`.
    resource_name: String,
    phase: i32,
    priority: Option<i64>,
    spec: Value,
}

/// WasmPlugins applying to `proxy`, in the order Istio keeps them
/// (pilot/pkg/model/push_context.go `initTrafficExtensions`: by creation
/// time; here, the order read).
fn wasm_plugins(m: &Manifests, proxy: &Proxy) -> Vec<Plugin> {
    m.of_kind("WasmPlugin")
        .filter(|w| {
            let ns = w["metadata"]["namespace"].as_str().unwrap_or("default");
            // Only the proxy's own and the root namespace
            // (push_context.go `TrafficExtensionsByListenerInfo`); the
            // selector as a workload selector (model/policyattachment.go).
            proxy.sees(ns) && proxy.selected_by(w["spec"]["selector"].get("matchLabels"))
        })
        .map(|w| {
            let ns = w["metadata"]["namespace"].as_str().unwrap_or("default");
            let name = w["metadata"]["name"].as_str().unwrap_or_default();
            // translate.go: name + syntheticMarker; extensions.go:
            // resource name prefix, config name `<ns>.<name>`.
            let config_name = format!("{ns}.{name}{WASMPLUGIN_MARKER}");
            Plugin {
                resource_name: format!("{EXTENSION_PREFIX}{config_name}"),
                config_name,
                phase: match w["spec"]["phase"].as_str() {
                    Some("AUTHN") => 1,
                    Some("AUTHZ") => 2,
                    Some("STATS") => 3,
                    _ => 0,
                },
                priority: w["spec"]["priority"].as_i64(),
                spec: w["spec"].clone(),
            }
        })
        .collect()
}

impl Plugin {
    /// pilot/pkg/model/extensions.go `matchTrafficExtensionSelectors`:
    /// no `match` matches every listener; else any selector whose mode is
    /// CLIENT (or unset, or CLIENT_AND_SERVER) for an outbound listener and
    /// whose `ports` are empty or list this port.
    fn matches_outbound_port(&self, port: u16) -> bool {
        let Some(sel) = self.spec["match"].as_array().filter(|a| !a.is_empty()) else {
            return true;
        };
        sel.iter().any(|s| {
            let mode_ok = matches!(
                s["mode"].as_str(),
                None | Some("CLIENT" | "CLIENT_AND_SERVER" | "UNDEFINED")
            );
            let ports = s["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
            let port_ok = ports.is_empty()
                || ports
                    .iter()
                    .any(|p| port_number(&p["number"]).is_some_and(|n| n == port));
            mode_ok && port_ok
        })
    }
}

/// The ECDS reference Istio puts in the HTTP filter chain
/// (pilot/pkg/networking/core/extension/extensionfilter.go
/// `toEnvoyHTTPTrafficExtension`): config from ADS there, from a file here.
fn ecds_filter(name: &str, path: &Path) -> Value {
    json!({
        "name": name,
        "config_discovery": {
            "config_source": {
                "path_config_source": {"path": path},
                "resource_api_version": "V3",
                "initial_fetch_timeout": "0s",
            },
            "type_urls": [WASM_TYPE, RBAC_TYPE],
        },
    })
}

/// The ECDS resource for a plugin as it reaches Envoy: built by
/// extensions.go `buildWasmConfig` (config name, root id = `pluginName`,
/// pluginConfig as a StringValue, V8, failure policy), then rewritten by
/// the agent (pkg/wasm/convert.go `rewriteVMConfig`: the remote module
/// becomes a local file and the `ISTIO_META_*` variables are dropped;
/// `MaybeConvertWasmExtensionConfig`: a module that cannot be fetched
/// becomes an RBAC filter that allows all (FAIL_OPEN) or denies all).
fn ecds_resource(p: &Plugin, env: &Env) -> Value {
    let spec = &p.spec;
    let fail_open = spec["failStrategy"].as_str() == Some("FAIL_OPEN");
    let url = spec["url"].as_str().unwrap_or_default();
    let typed_config = match fetched_module(url, &env.wasm_dir) {
        Some(file) => {
            let mut config = json!({
                "name": p.config_name,
                "root_id": spec["pluginName"].as_str().unwrap_or(""),
                "vm_config": {
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": file}},
                },
            });
            if let Some(json) = plugin_config_json(&spec["pluginConfig"]) {
                config["configuration"] = json!({
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json,
                });
            }
            match spec["failStrategy"].as_str() {
                Some("FAIL_OPEN") => config["failure_policy"] = json!("FAIL_OPEN"),
                Some("FAIL_CLOSE") => config["failure_policy"] = json!("FAIL_CLOSED"),
                Some("FAIL_RELOAD") => config["failure_policy"] = json!("FAIL_RELOAD"),
                _ => {}
            }
            json!({"@type": WASM_TYPE, "config": config})
        }
        None if fail_open => json!({"@type": RBAC_TYPE, "rules_stat_prefix": "wasm-default-allow"}),
        None => json!({"@type": RBAC_TYPE, "rules": {}, "rules_stat_prefix": "wasm-default-deny"}),
    };
    json!({
        "version_info": "1",
        "type_url": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": p.resource_name,
            "typed_config": typed_config,
        }],
    })
}

/// Stand-in for the agent's fetch: `oci://host/path/<image>:<tag>` (or no
/// scheme, which Istio reads as oci) → `<wasm_dir>/<image>.wasm`;
/// `file:///x/y.wasm` → `<wasm_dir>/y.wasm`. `None`: not there.
fn fetched_module(url: &str, wasm_dir: &Path) -> Option<PathBuf> {
    let last = url.rsplit('/').next()?;
    let file = if url.starts_with("file://") || last.ends_with(".wasm") {
        last.to_owned()
    } else {
        let image = last.split([':', '@']).next()?;
        format!("{image}.wasm")
    };
    let path = wasm_dir.join(file);
    path.is_file().then_some(path)
}

/// A no-op Lua filter under the name of an Istio filter that only Istio's
/// Envoy build has.
fn stand_in(name: &str) -> Value {
    json!({
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": "function envoy_on_request(h) end"},
        },
    })
}

/// The outbound HTTP filter chain for `port`
/// (pilot/pkg/networking/core/listener_builder.go
/// `buildHTTPConnectionManager`, sidecar outbound, default mesh config):
/// metadata exchange; AUTHN-phase plugins; (authn filters: none outbound,
/// pilot/pkg/networking/plugin/authn/authentication.go); AUTHZ-phase
/// plugins; (authz filters: none outbound, plugin/authz/authorization.go);
/// STATS-phase plugins; unspecified-phase plugins; grpc_stats; ALPN
/// (`PILOT_ENABLE_ALPN_FILTER` defaults on); fault; CORS; the stats
/// filter (Telemetry, Prometheus by default); the router.
fn http_filters(plugins: &[Plugin], port: u16, ecds: &HashMap<String, PathBuf>) -> Vec<Value> {
    let mut by_phase: BTreeMap<i32, Vec<&Plugin>> = BTreeMap::new();
    for p in plugins.iter().filter(|p| p.matches_outbound_port(port)) {
        by_phase.entry(p.phase).or_default().push(p);
    }
    // push_context.go `sortByPriority`: highest first, unset lowest, stable.
    for list in by_phase.values_mut() {
        list.sort_by_key(|p| std::cmp::Reverse(p.priority.unwrap_or(i64::from(i32::MIN))));
    }
    let mut pop = |phase: i32, out: &mut Vec<Value>| {
        for p in by_phase.remove(&phase).unwrap_or_default() {
            if let Some(path) = ecds.get(&p.resource_name) {
                out.push(ecds_filter(&p.resource_name, path));
            }
        }
    };
    let mut f = vec![stand_in("istio.metadata_exchange")];
    pop(1, &mut f);
    pop(2, &mut f);
    pop(3, &mut f);
    pop(0, &mut f);
    f.push(json!({
        "name": "envoy.filters.http.grpc_stats",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
            "emit_filter_state": true,
            "stats_for_all_methods": false,
        },
    }));
    f.push(stand_in("istio.alpn"));
    f.push(json!({
        "name": "envoy.filters.http.fault",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"},
    }));
    f.push(json!({
        "name": "envoy.filters.http.cors",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
    }));
    f.push(stand_in("istio.stats"));
    f.push(json!({
        "name": ROUTER,
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }));
    f
}

/// Applies the `HTTP_FILTER` patches of the EnvoyFilters selecting `proxy`
/// to the chain of the listener for `port`
/// (pilot/pkg/networking/core/envoyfilter/listener_patch.go
/// `patchHTTPFilters`, `listenerMatch`, `networkFilterMatch`,
/// `httpFilterMatch`). Other `applyTo` kinds are refused, not ignored.
fn apply_envoyfilters(
    m: &Manifests,
    proxy: &Proxy,
    port: u16,
    filters: &mut Vec<Value>,
    env: &Env,
) -> Result<(), String> {
    for ef in m.of_kind("EnvoyFilter") {
        let ns = ef["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = ef["metadata"]["name"].as_str().unwrap_or_default();
        if !proxy.sees(ns) || !proxy.selected_by(ef["spec"]["workloadSelector"].get("labels")) {
            continue;
        }
        let patches = ef["spec"]["configPatches"].as_array().into_iter().flatten();
        for (i, cp) in patches.enumerate() {
            let what = format!("EnvoyFilter {ns}/{name} configPatches[{i}]");
            if cp["applyTo"].as_str() != Some("HTTP_FILTER") {
                return Err(format!("{what}: applyTo {} is not rendered", cp["applyTo"]));
            }
            let mat = &cp["match"];
            // envoyfilter/listener_patch.go `commonConditionMatch`: the
            // context must be ANY or SIDECAR_OUTBOUND here.
            if !matches!(
                mat["context"].as_str(),
                None | Some("ANY" | "SIDECAR_OUTBOUND")
            ) {
                continue;
            }
            let lis = &mat["listener"];
            if port_number(&lis["portNumber"]).is_some_and(|p| p != port) {
                continue;
            }
            let fm = &lis["filterChain"]["filter"];
            if fm["name"].as_str().is_some_and(|n| n != HCM) {
                continue;
            }
            let sub = fm["subFilter"]["name"].as_str();
            let value = local_module(cp["patch"]["value"].clone(), &env.wasm_dir);
            let at = sub.and_then(|s| filters.iter().position(|f| f["name"] == s));
            match (cp["patch"]["operation"].as_str(), sub, at) {
                (Some("ADD"), _, _) => filters.push(value),
                (Some("INSERT_FIRST"), _, _) | (Some("INSERT_BEFORE"), None, _) => {
                    filters.insert(0, value);
                }
                (Some("INSERT_AFTER"), None, _) => filters.push(value),
                (Some("INSERT_BEFORE"), Some(_), Some(at)) => filters.insert(at, value),
                (Some("INSERT_AFTER"), Some(_), Some(at)) => filters.insert(at + 1, value),
                (Some("REPLACE"), Some(_), Some(at)) => filters[at] = value,
                (Some("REMOVE"), Some(s), _) => filters.retain(|f| f["name"] != s),
                (Some("INSERT_BEFORE" | "INSERT_AFTER" | "REPLACE"), Some(_), None) => {}
                (op, _, _) => return Err(format!("{what}: operation {op:?} is not rendered")),
            }
        }
    }
    Ok(())
}

/// Stand-in for a module mounted into the sidecar: a Wasm filter's local
/// `filename` is looked up by file name in the module directory.
fn local_module(mut value: Value, wasm_dir: &Path) -> Value {
    let code = &mut value["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"];
    if let Some(f) = code.as_str() {
        if let Some(base) = Path::new(f).file_name() {
            *code = json!(wasm_dir.join(base));
        }
    }
    value
}

/// Istio's default retry policy (pilot/pkg/networking/core/route/retry/
/// retry.go `DefaultPolicy`; `ConvertPolicy`: `attempts <= 0` → none).
pub fn default_retry_policy() -> Value {
    json!({
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2,
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
        }],
        "host_selection_retry_max_attempts": "5",
    })
}

/// route/retry/retry.go `ConvertPolicy` for a VirtualService `retries`.
fn retry_policy(retries: &Value) -> Option<Value> {
    if retries.is_null() {
        return Some(default_retry_policy());
    }
    let attempts = retries["attempts"].as_i64().unwrap_or(0);
    if attempts <= 0 {
        return None;
    }
    let mut p = default_retry_policy();
    p["num_retries"] = json!(attempts);
    if let Some(on) = retries["retryOn"].as_str() {
        let (codes, conds): (Vec<&str>, Vec<&str>) = on
            .split(',')
            .map(str::trim)
            .partition(|s| s.parse::<u16>().is_ok());
        let mut conds = conds.join(",");
        if !codes.is_empty() {
            if !conds.contains("retriable-status-codes") {
                conds.push_str(",retriable-status-codes");
            }
            p["retriable_status_codes"] = json!(codes
                .iter()
                .filter_map(|c| c.parse::<u16>().ok())
                .collect::<Vec<_>>());
        }
        p["retry_on"] = json!(conds);
    }
    if let Some(t) = retries["perTryTimeout"].as_str() {
        p["per_try_timeout"] = json!(t);
    }
    Some(p)
}

/// route.go `translateHeaderMatch` / util `ConvertToEnvoyMatch`.
fn string_match(m: &Value) -> Option<Value> {
    if let Some(v) = m["exact"].as_str() {
        Some(json!({"exact": v}))
    } else if let Some(v) = m["prefix"].as_str() {
        Some(json!({"prefix": v}))
    } else {
        m["regex"]
            .as_str()
            .map(|v| json!({"safe_regex": {"regex": v}}))
    }
}

/// route.go `TranslateRouteMatch`: prefix `/` by default; header matchers
/// sorted by name.
fn route_match(m: &Value) -> Value {
    let mut out = json!({"prefix": "/"});
    let uri = &m["uri"];
    if let Some(p) = uri["exact"].as_str() {
        out = json!({"path": p});
    } else if let Some(p) = uri["prefix"].as_str() {
        out = json!({"prefix": p});
    } else if let Some(p) = uri["regex"].as_str() {
        out = json!({"safe_regex": {"regex": p}});
    }
    if let Some(h) = m["headers"].as_object() {
        let mut names: Vec<&String> = h.keys().collect();
        names.sort();
        let headers: Vec<Value> = names
            .into_iter()
            .map(|n| match string_match(&h[n]) {
                Some(sm) => json!({"name": n, "string_match": sm}),
                // An empty StringMatch: presence (`canBeConvertedToPresentMatch`).
                None => json!({"name": n, "present_match": true}),
            })
            .collect();
        out["headers"] = json!(headers);
    }
    out
}

/// The cluster a VirtualService destination names (route.go
/// `processDestination`, networking/core/route `GetDestinationCluster`: no
/// port → the service's only port, else the listener's).
fn destination_cluster(dst: &Value, vs_ns: &str, services: &[Service], listen: u16) -> String {
    let host = resolve_host(dst["host"].as_str().unwrap_or_default(), vs_ns);
    let port = port_number(&dst["port"]["number"]).unwrap_or_else(|| {
        match services
            .iter()
            .find(|s| s.host == host)
            .map(|s| &s.ports[..])
        {
            Some([(only, _)]) => *only,
            _ => listen,
        }
    });
    cluster_name(port, dst["subset"].as_str().unwrap_or(""), &host)
}

/// route.go `TranslateRoute` + `applyHTTPRouteDestination` for one
/// VirtualService HTTP route and one of its matches.
fn vs_route(r: &Value, m: &Value, vs_ns: &str, services: &[Service], port: u16) -> Value {
    let mut name = r["name"].as_str().unwrap_or("").to_owned();
    if let Some(mn) = m["name"].as_str() {
        name = format!("{name}.{mn}");
    }
    let mut action = json!({"timeout": r["timeout"].as_str().unwrap_or("0s")});
    action["max_grpc_timeout"] = action["timeout"].clone();
    let dsts = r["route"].as_array().map(Vec::as_slice).unwrap_or_default();
    if let [one] = dsts {
        action["cluster"] = json!(destination_cluster(
            &one["destination"],
            vs_ns,
            services,
            port
        ));
    } else {
        let weighted: Vec<Value> = dsts
            .iter()
            .filter(|d| d["weight"].as_u64().unwrap_or(0) > 0)
            .map(|d| {
                json!({
                    "name": destination_cluster(&d["destination"], vs_ns, services, port),
                    "weight": d["weight"],
                })
            })
            .collect();
        action["weighted_clusters"] = json!({"clusters": weighted});
    }
    let rw = &r["rewrite"];
    if let Some(a) = rw["authority"].as_str() {
        action["host_rewrite_literal"] = json!(a);
    }
    if let Some(u) = rw["uri"].as_str() {
        action["prefix_rewrite"] = json!(u);
    }
    if let Some(rr) = rw.get("uriRegexRewrite") {
        action["regex_rewrite"] = json!({
            "pattern": {"regex": rr["match"]},
            "substitution": rr["rewrite"],
        });
    }
    if let Some(p) = retry_policy(&r["retries"]) {
        action["retry_policy"] = p;
    }
    json!({"name": name, "match": route_match(m), "route": action})
}

/// Whether a VirtualService applies to sidecars: no `gateways`, or `mesh`
/// among them (pilot/pkg/model/virtualservice.go, sidecar scope).
fn vs_for_sidecars(vs: &Value) -> bool {
    match vs["spec"]["gateways"].as_array() {
        None => true,
        Some(g) => g.is_empty() || g.iter().any(|x| x == "mesh"),
    }
}

/// The route configuration `<port>` (pilot/pkg/networking/core/httproute.go
/// `buildSidecarOutboundHTTPRouteConfig`): a virtual host per service
/// with an HTTP port `port`, named `host:port`, with the routes of the
/// VirtualService for that host, or Istio's default route
/// (route.go `BuildDefaultHTTPOutboundRoute`); then `allow_any`
/// (outboundTrafficPolicy ALLOW_ANY, to the PassthroughCluster).
fn route_config(m: &Manifests, services: &[Service], port: u16) -> Result<Value, String> {
    let mut vhosts = Vec::new();
    for s in services {
        if !s
            .ports
            .iter()
            .any(|&(p, proto)| p == port && proto == Protocol::Http)
        {
            continue;
        }
        let vs = m.of_kind("VirtualService").find(|vs| {
            let ns = vs["metadata"]["namespace"].as_str().unwrap_or("default");
            vs_for_sidecars(vs)
                && vs["spec"]["hosts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|h| h.as_str().is_some_and(|h| resolve_host(h, ns) == s.host))
        });
        let routes: Vec<Value> = match vs {
            Some(vs) => {
                let ns = vs["metadata"]["namespace"].as_str().unwrap_or("default");
                let mut out = Vec::new();
                for r in vs["spec"]["http"].as_array().into_iter().flatten() {
                    match r["match"].as_array().filter(|a| !a.is_empty()) {
                        None => out.push(vs_route(r, &Value::Null, ns, services, port)),
                        Some(ms) => {
                            for mm in ms {
                                // route.go `TranslateRoute`: a match on
                                // another port is skipped.
                                if port_number(&mm["port"]).is_some_and(|p| p != port) {
                                    continue;
                                }
                                out.push(vs_route(r, mm, ns, services, port));
                            }
                        }
                    }
                }
                out
            }
            None => vec![json!({
                "name": "default",
                "match": {"prefix": "/"},
                "route": {
                    "cluster": cluster_name(port, "", &s.host),
                    "timeout": "0s",
                    "max_grpc_timeout": "0s",
                    "retry_policy": default_retry_policy(),
                },
            })],
        };
        vhosts.push(json!({
            "name": format!("{}:{port}", s.host),
            "domains": [s.host, format!("{}:{port}", s.host)],
            "routes": routes,
            "include_request_attempt_count": true,
        }));
    }
    vhosts.push(json!({
        "name": "allow_any",
        "domains": ["*"],
        "routes": [{"name": "allow_any", "match": {"prefix": "/"}, "route": {"cluster": "PassthroughCluster", "timeout": "0s", "max_grpc_timeout": "0s"}}],
        "include_request_attempt_count": true,
    }));
    Ok(json!({"name": port.to_string(), "virtual_hosts": vhosts, "validate_clusters": false}))
}

/// Clusters: `outbound|P||host` per service port and `outbound|P|s|host`
/// per DestinationRule subset (pilot/pkg/networking/core/cluster.go
/// `buildOutboundClusters`, cluster_builder.go `applyDestinationRule`);
/// `connectTimeout` from the DestinationRule, else the mesh default 10s.
/// Endpoints come from `env` (STATIC) instead of EDS or DNS.
fn clusters(m: &Manifests, services: &[Service], env: &Env) -> Vec<Value> {
    let mut out = Vec::new();
    let cluster = |name: &str, timeout: &str| {
        let eps: Vec<Value> = env
            .endpoints
            .get(name)
            .into_iter()
            .flatten()
            .map(|a| {
                json!({"endpoint": {"address": {"socket_address": {
                    "address": a.ip().to_string(), "port_value": a.port()}}}})
            })
            .collect();
        json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": timeout,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]},
        })
    };
    for s in services {
        let dr = m.of_kind("DestinationRule").find(|d| {
            let ns = d["metadata"]["namespace"].as_str().unwrap_or("default");
            d["spec"]["host"]
                .as_str()
                .is_some_and(|h| resolve_host(h, ns) == s.host)
        });
        let timeout = dr
            .and_then(|d| {
                d["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["connectTimeout"].as_str()
            })
            .unwrap_or("10s");
        for &(port, _) in &s.ports {
            out.push(cluster(&cluster_name(port, "", &s.host), timeout));
            for sub in dr
                .and_then(|d| d["spec"]["subsets"].as_array())
                .into_iter()
                .flatten()
            {
                if let Some(sn) = sub["name"].as_str() {
                    out.push(cluster(&cluster_name(port, sn, &s.host), timeout));
                }
            }
        }
    }
    out.push(cluster("PassthroughCluster", "10s"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Manifests {
        Manifests {
            docs: YamlLoader::load_from_str(text)
                .unwrap_or_default()
                .iter()
                .map(yaml_to_json)
                .collect(),
        }
    }

    #[test]
    fn numbers_are_written_as_go_writes_doubles() {
        let cases = [
            (90.0, "90"),
            (1.0, "1"),
            (0.9, "0.9"),
            (1.3, "1.3"),
            (262_144.0, "262144"),
            (-0.5, "-0.5"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (1e-7, "1e-7"),
            (0.000_001, "0.000001"),
            (0.0, "0"),
        ];
        for (f, want) in cases {
            assert_eq!(go_float(f), want, "{f}");
        }
    }

    #[test]
    fn plugin_config_becomes_sorted_compact_struct_json() {
        let m = yaml(
            "kind: WasmPlugin\nspec:\n  pluginConfig:\n    z: 1\n    a: {cost: 1.0, n: 3, s: \"<&>\"}\n    l: [true, null, \"x\"]\n",
        );
        let got = plugin_config_json(&m.docs[0]["spec"]["pluginConfig"]);
        assert_eq!(
            got.as_deref(),
            Some(r#"{"a":{"cost":1,"n":3,"s":"\u003c\u0026\u003e"},"l":[true,null,"x"],"z":1}"#)
        );
        assert_eq!(plugin_config_json(&json!({})), None);
        assert_eq!(plugin_config_json(&Value::Null), None);
    }

    #[test]
    fn port_protocols_follow_istio_naming() {
        assert_eq!(kube_port_protocol(Some("http-oip"), None), Protocol::Http);
        assert_eq!(kube_port_protocol(Some("http"), None), Protocol::Http);
        assert_eq!(kube_port_protocol(Some("grpc-web"), None), Protocol::Http);
        assert_eq!(kube_port_protocol(Some("oip"), None), Protocol::Other);
        assert_eq!(kube_port_protocol(None, None), Protocol::Other);
        assert_eq!(
            kube_port_protocol(Some("oip"), Some("http")),
            Protocol::Http
        );
        assert_eq!(
            kube_port_protocol(Some("http"), Some("tcp")),
            Protocol::Other
        );
        assert_eq!(kube_port_protocol(Some("HTTP2-x"), None), Protocol::Http);
        assert_eq!(
            kube_port_protocol(Some("tcp"), Some("kubernetes.io/h2c")),
            Protocol::Http
        );
        assert_eq!(kube_port_protocol(Some("https-x"), None), Protocol::Other);
    }

    const MESH: &str = r#"
kind: Service
metadata: {name: m, namespace: ns}
spec:
  ports: [{name: http, port: 8000}]
---
kind: Service
metadata: {name: db, namespace: ns}
spec:
  ports: [{name: tcp, port: 5432}, {name: http-admin, port: 9000}]
---
kind: DestinationRule
metadata: {name: m, namespace: ns}
spec:
  host: m
  subsets: [{name: v1}, {name: v2}]
---
kind: VirtualService
metadata: {name: m, namespace: ns}
spec:
  hosts: [m]
  http:
  - name: v2
    match: [{headers: {x-v: {exact: "2"}, a-first: {prefix: p}}}]
    rewrite: {authority: other.example.com}
    route: [{destination: {host: m, subset: v2}}]
    retries: {attempts: 0}
  - name: rest
    route: [{destination: {host: m, subset: v1}}]
---
kind: WasmPlugin
metadata: {name: low, namespace: ns}
spec:
  url: oci://r/x/low:1
  phase: STATS
  priority: 1
  failStrategy: FAIL_OPEN
  match: [{mode: CLIENT, ports: [{number: 8000}]}]
---
kind: WasmPlugin
metadata: {name: high, namespace: ns}
spec:
  url: oci://r/x/high:1
  phase: STATS
  priority: 5
  failStrategy: FAIL_CLOSE
---
kind: WasmPlugin
metadata: {name: authn, namespace: istio-system}
spec:
  url: oci://r/x/a:1
  phase: AUTHN
---
kind: WasmPlugin
metadata: {name: elsewhere, namespace: other}
spec:
  url: oci://r/x/e:1
---
kind: WasmPlugin
metadata: {name: server, namespace: ns}
spec:
  url: oci://r/x/s:1
  match: [{mode: SERVER}]
---
kind: WasmPlugin
metadata: {name: unselected, namespace: ns}
spec:
  selector: {matchLabels: {app: nope}}
  url: oci://r/x/u:1
"#;

    fn rendered(extra: &str) -> Rendered {
        let m = yaml(&format!("{MESH}{extra}"));
        let env = Env {
            ecds_dir: PathBuf::from("/ecds"),
            ..Env::default()
        };
        render(&m, &Proxy::new("ns", &[("app", "client")]), &env).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ext(name: &str, ns: &str) -> String {
        wasmplugin_filter_name(ns, name)
    }

    #[test]
    fn plugins_go_by_phase_priority_port_mode_namespace_and_selector() {
        let r = rendered("");
        assert_eq!(
            r.listeners.keys().copied().collect::<Vec<_>>(),
            vec![8000, 9000],
            "HTTP ports only"
        );
        assert_eq!(
            r.http_filter_names(8000),
            vec![
                "istio.metadata_exchange".to_owned(),
                ext("authn", "istio-system"),
                ext("high", "ns"),
                ext("low", "ns"),
                "envoy.filters.http.grpc_stats".to_owned(),
                "istio.alpn".to_owned(),
                "envoy.filters.http.fault".to_owned(),
                "envoy.filters.http.cors".to_owned(),
                "istio.stats".to_owned(),
                ROUTER.to_owned(),
            ]
        );
        let on_9000 = r.http_filter_names(9000);
        assert!(!on_9000.contains(&ext("low", "ns")), "{on_9000:?}");
        assert!(on_9000.contains(&ext("high", "ns")), "{on_9000:?}");
        assert_eq!(
            ext("low", "ns"),
            "extensions.istio.io/trafficextension/ns.low~istio-translated-wasmplugin"
        );
    }

    #[test]
    fn an_unfetchable_module_becomes_an_rbac_filter_by_fail_strategy() {
        let r = rendered("");
        let high = r.extension(&ext("high", "ns")).cloned().unwrap_or_default();
        assert_eq!(high["typed_config"]["@type"], RBAC_TYPE);
        assert_eq!(
            high["typed_config"]["rules_stat_prefix"],
            "wasm-default-deny"
        );
        let low = r.extension(&ext("low", "ns")).cloned().unwrap_or_default();
        assert_eq!(
            low["typed_config"]["rules_stat_prefix"],
            "wasm-default-allow"
        );
        // Unset is not open (convert.go `httpWasmFailOpen`).
        let unset = r
            .extension(&ext("authn", "istio-system"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            unset["typed_config"]["rules_stat_prefix"],
            "wasm-default-deny"
        );
    }

    #[test]
    fn a_fetched_module_is_local_with_config_as_string_value() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("low.wasm"), b"\0asm").unwrap_or_else(|e| panic!("{e}"));
        let mut m = yaml(MESH);
        m.docs[4]["spec"]["pluginConfig"] = json!({"b": 2, "a": "x"});
        let env = Env {
            wasm_dir: dir.path().to_owned(),
            ..Env::default()
        };
        let r = render(&m, &Proxy::new("ns", &[]), &env).unwrap_or_else(|e| panic!("{e}"));
        let low = r.extension(&ext("low", "ns")).cloned().unwrap_or_default();
        let c = &low["typed_config"]["config"];
        assert_eq!(low["typed_config"]["@type"], WASM_TYPE);
        assert_eq!(c["name"], "ns.low~istio-translated-wasmplugin");
        assert_eq!(c["root_id"], "");
        assert_eq!(
            c["vm_config"]["code"]["local"]["filename"],
            json!(dir.path().join("low.wasm"))
        );
        assert_eq!(c["configuration"]["value"], r#"{"a":"x","b":2}"#);
        assert_eq!(c["failure_policy"], "FAIL_OPEN");
    }

    #[test]
    fn routes_follow_the_virtualservice_and_defaults_elsewhere() {
        let r = rendered("");
        let rc = r.routes(8000).cloned().unwrap_or_default();
        let vh = &rc["virtual_hosts"];
        assert_eq!(vh[0]["name"], "m.ns.svc.cluster.local:8000");
        let v2 = &vh[0]["routes"][0];
        assert_eq!(v2["name"], "v2");
        assert_eq!(
            v2["match"]["headers"],
            json!([
                {"name": "a-first", "string_match": {"prefix": "p"}},
                {"name": "x-v", "string_match": {"exact": "2"}},
            ])
        );
        assert_eq!(
            v2["route"]["cluster"],
            "outbound|8000|v2|m.ns.svc.cluster.local"
        );
        assert_eq!(v2["route"]["host_rewrite_literal"], "other.example.com");
        assert_eq!(v2["route"].get("retry_policy"), None, "attempts: 0");
        let rest = &vh[0]["routes"][1];
        assert_eq!(rest["match"], json!({"prefix": "/"}));
        assert_eq!(rest["route"]["retry_policy"], default_retry_policy());
        assert_eq!(vh[1]["name"], "allow_any");
        let admin = r.routes(9000).cloned().unwrap_or_default();
        assert_eq!(
            admin["virtual_hosts"][0]["routes"][0]["route"]["cluster"],
            "outbound|9000||db.ns.svc.cluster.local"
        );
    }

    #[test]
    fn envoyfilter_insert_before_the_router_lands_after_istio_filters() {
        let r = rendered(
            r#"
---
kind: EnvoyFilter
metadata: {name: body, namespace: ns}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_OUTBOUND
      listener:
        portNumber: 8000
        filterChain:
          filter:
            name: envoy.filters.network.http_connection_manager
            subFilter: {name: envoy.filters.http.router}
    patch:
      operation: INSERT_BEFORE
      value: {name: mine}
"#,
        );
        let f = r.http_filter_names(8000);
        assert_eq!(f[f.len() - 3..], ["istio.stats", "mine", ROUTER]);
        assert!(!r.http_filter_names(9000).contains(&"mine".to_owned()));
    }

    #[test]
    fn clusters_carry_istio_names() {
        let r = rendered("");
        let names: Vec<String> = r.bootstrap["static_resources"]["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        for want in [
            "outbound|8000||m.ns.svc.cluster.local",
            "outbound|8000|v1|m.ns.svc.cluster.local",
            "outbound|8000|v2|m.ns.svc.cluster.local",
            "outbound|5432||db.ns.svc.cluster.local",
            "outbound|9000||db.ns.svc.cluster.local",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
    }
}
