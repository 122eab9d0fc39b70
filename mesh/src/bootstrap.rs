//! An Envoy bootstrap shaped like Istio's outbound sidecar listener.
//!
//! HTTP filters run in Istio's order: `cors`, `fault` (Istio puts both ahead
//! of Wasm plugins; both look the route up, so the route is already cached
//! when the Wasm filters run), optional extra filters, the Wasm filters,
//! then the router. The route table matches exact header values like a
//! VirtualService header match (`x-infermesh-version: 2` → cluster of subset
//! `2`; several headers must all match), may rewrite the path by regex like
//! a VirtualService `rewrite.uriRegexRewrite`, and ends with a default
//! route, like Istio's. One STATIC cluster per upstream on 127.0.0.1. Ports
//! are 0: Envoy picks them, the harness asks the admin API which it picked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::upstream::Upstream;

/// What Envoy does when a Wasm plugin fails (Istio's `failStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// `FAIL_CLOSE`: requests get an error instead of skipping the plugin.
    FailClosed,
    /// `FAIL_OPEN`: the plugin is skipped.
    FailOpen,
}

/// One `envoy.filters.http.wasm` filter.
#[derive(Debug, Clone)]
pub struct WasmFilter {
    /// Plugin name (also used in Envoy's log lines).
    pub name: String,
    pub wasm: PathBuf,
    /// The `pluginConfig` JSON, passed as a `google.protobuf.StringValue`.
    pub config: String,
    pub root_id: String,
    pub vm_id: String,
    pub failure_policy: FailurePolicy,
    /// `allow_on_headers_stop_iteration`: required on Envoy >= 1.35 for a
    /// filter that waits for the body in its headers callback.
    pub allow_on_headers_stop_iteration: bool,
}

impl WasmFilter {
    /// A fail-closed plugin named `name` with root and VM ids `name`.
    pub fn new(name: &str, wasm: &Path, config: impl Into<String>) -> WasmFilter {
        WasmFilter {
            name: name.to_owned(),
            wasm: wasm.to_owned(),
            config: config.into(),
            root_id: name.to_owned(),
            vm_id: name.to_owned(),
            failure_policy: FailurePolicy::FailClosed,
            allow_on_headers_stop_iteration: false,
        }
    }

    /// Sets `allow_on_headers_stop_iteration` (body-buffering filters).
    pub fn allow_on_headers_stop_iteration(mut self, allow: bool) -> WasmFilter {
        self.allow_on_headers_stop_iteration = allow;
        self
    }

    pub fn failure_policy(mut self, p: FailurePolicy) -> WasmFilter {
        self.failure_policy = p;
        self
    }

    fn to_json(&self) -> Value {
        json!({
            "name": "envoy.filters.http.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": self.name,
                    "root_id": self.root_id,
                    "vm_config": {
                        "vm_id": self.vm_id,
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": self.wasm}},
                    },
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": self.config,
                    },
                    "allow_on_headers_stop_iteration": self.allow_on_headers_stop_iteration,
                    "failure_policy": match self.failure_policy {
                        FailurePolicy::FailClosed => "FAIL_CLOSED",
                        FailurePolicy::FailOpen => "FAIL_OPEN",
                    },
                },
            },
        })
    }
}

/// A route taken when request header `header` equals `value` exactly.
#[derive(Debug, Clone)]
pub struct HeaderRoute {
    pub header: String,
    pub value: String,
    pub cluster: String,
}

/// A path rewrite by regular expression (Envoy's `regex_rewrite`, RE2
/// syntax; `\1` in the substitution is the first capture group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegexRewrite {
    pub pattern: String,
    pub substitution: String,
}

/// A route taken when every `(header, value)` in `headers` matches exactly
/// (no headers: every request); it may rewrite the path on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub headers: Vec<(String, String)>,
    pub cluster: String,
    pub regex_rewrite: Option<RegexRewrite>,
}

impl Route {
    /// A route to `cluster` with no header match yet and no rewrite.
    pub fn new(cluster: &str) -> Route {
        Route {
            headers: Vec::new(),
            cluster: cluster.to_owned(),
            regex_rewrite: None,
        }
    }

    /// Also requires request header `name` to equal `value`.
    pub fn header(mut self, name: &str, value: &str) -> Route {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Rewrites the path matching `pattern` to `substitution`.
    pub fn regex_rewrite(mut self, pattern: &str, substitution: &str) -> Route {
        self.regex_rewrite = Some(RegexRewrite {
            pattern: pattern.to_owned(),
            substitution: substitution.to_owned(),
        });
        self
    }

    fn to_json(&self) -> Value {
        let name = self
            .headers
            .iter()
            .map(|(h, v)| format!("{h}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let headers: Vec<Value> = self
            .headers
            .iter()
            .map(|(h, v)| json!({"name": h, "string_match": {"exact": v}}))
            .collect();
        let mut action = istio_route_action(&self.cluster);
        if let Some(r) = &self.regex_rewrite {
            action["regex_rewrite"] = json!({
                "pattern": {"regex": r.pattern},
                "substitution": r.substitution,
            });
        }
        json!({
            "name": name,
            "match": {"prefix": "/", "headers": headers},
            "route": action,
        })
    }
}

impl From<HeaderRoute> for Route {
    fn from(r: HeaderRoute) -> Route {
        Route::new(&r.cluster).header(&r.header, &r.value)
    }
}

/// Envoy bootstrap builder; see the module docs for its shape.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    clusters: Vec<(String, SocketAddr)>,
    routes: Vec<Route>,
    default_cluster: Option<String>,
    istio_filters: bool,
    extra_filters: Vec<Value>,
    behind_filters: Vec<Value>,
    wasm: Vec<WasmFilter>,
    max_request_headers: Option<u32>,
    listener_port: u16,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Bootstrap::new()
    }
}

/// Istio's stat prefix for an outbound HTTP listener.
pub const STAT_PREFIX: &str = "outbound_0.0.0.0_80";

impl Bootstrap {
    /// No clusters, no routes, Istio's CORS and fault filters on.
    pub fn new() -> Bootstrap {
        Bootstrap {
            clusters: Vec::new(),
            routes: Vec::new(),
            default_cluster: None,
            istio_filters: true,
            extra_filters: Vec::new(),
            behind_filters: Vec::new(),
            wasm: Vec::new(),
            max_request_headers: None,
            listener_port: 0,
        }
    }

    /// Listens on `127.0.0.1:port` instead of an ephemeral port (for a
    /// mesh a person points a client at).
    pub fn listener_port(mut self, port: u16) -> Bootstrap {
        self.listener_port = port;
        self
    }

    /// A STATIC cluster `name` with one endpoint.
    pub fn cluster(mut self, name: &str, addr: SocketAddr) -> Bootstrap {
        self.clusters.push((name.to_owned(), addr));
        self
    }

    /// Routes requests whose `header` equals `value` to `cluster`. Routes
    /// are tried in the order added, before the default route.
    pub fn route_header(mut self, header: &str, value: &str, cluster: &str) -> Bootstrap {
        self.routes.push(
            HeaderRoute {
                header: header.to_owned(),
                value: value.to_owned(),
                cluster: cluster.to_owned(),
            }
            .into(),
        );
        self
    }

    /// Adds `route` (several header matches, a path rewrite). Routes are
    /// tried in the order added, before the default route.
    pub fn route(mut self, route: Route) -> Bootstrap {
        self.routes.push(route);
        self
    }

    /// Where requests no header route matches go.
    pub fn default_route(mut self, cluster: &str) -> Bootstrap {
        self.default_cluster = Some(cluster.to_owned());
        self
    }

    /// The VirtualService/DestinationRule pair of a versioned model:
    /// `x-infermesh-version: v` → the cluster of `v`'s upstream (named after
    /// the upstream), everything else → `default`'s.
    pub fn version_subsets(
        mut self,
        subsets: &[(&str, &Upstream)],
        default: &Upstream,
    ) -> Bootstrap {
        for (version, up) in subsets {
            self = self.cluster(&up.name, up.addr).route_header(
                filter_core::headers::VERSION,
                version,
                &up.name,
            );
        }
        self.cluster(&default.name, default.addr)
            .default_route(&default.name)
    }

    /// Leaves out Istio's CORS and fault filters.
    pub fn without_istio_filters(mut self) -> Bootstrap {
        self.istio_filters = false;
        self
    }

    /// An HTTP filter (JSON as in Envoy's config) placed after CORS and
    /// fault and before the Wasm filters.
    pub fn filter_ahead(mut self, filter: Value) -> Bootstrap {
        self.extra_filters.push(filter);
        self
    }

    /// An HTTP filter placed after the Wasm filters, before the router:
    /// it sees the headers the Wasm filters set (the local mesh's fault
    /// knob).
    pub fn filter_behind(mut self, filter: Value) -> Bootstrap {
        self.behind_filters.push(filter);
        self
    }

    pub fn wasm(mut self, filter: WasmFilter) -> Bootstrap {
        self.wasm.push(filter);
        self
    }

    /// Raises Envoy's per-request header count limit (default 100).
    pub fn max_request_headers(mut self, n: u32) -> Bootstrap {
        self.max_request_headers = Some(n);
        self
    }

    /// The bootstrap as JSON.
    pub fn to_json(&self) -> Value {
        let loopback0 = json!({"socket_address": {"address": "127.0.0.1", "port_value": 0}});
        let mut filters = Vec::new();
        if self.istio_filters {
            filters.push(json!({
                "name": "envoy.filters.http.cors",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
            }));
            filters.push(json!({
                "name": "envoy.filters.http.fault",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"},
            }));
        }
        filters.extend(self.extra_filters.iter().cloned());
        filters.extend(self.wasm.iter().map(WasmFilter::to_json));
        filters.extend(self.behind_filters.iter().cloned());
        filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }));

        let mut routes: Vec<Value> = self.routes.iter().map(Route::to_json).collect();
        if let Some(c) = &self.default_cluster {
            routes.push(
                json!({"name": "default", "match": {"prefix": "/"}, "route": istio_route_action(c)}),
            );
        }

        let mut hcm = json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": STAT_PREFIX,
            "codec_type": "AUTO",
            "route_config": {
                "name": "80",
                "virtual_hosts": [{"name": "infermesh", "domains": ["*"], "routes": routes}],
            },
            "http_filters": filters,
        });
        if let Some(n) = self.max_request_headers {
            hcm["common_http_protocol_options"] = json!({"max_headers_count": n});
        }

        let clusters: Vec<Value> = self
            .clusters
            .iter()
            .map(|(name, addr)| {
                json!({
                    "name": name,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": name,
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                            "address": addr.ip().to_string(),
                            "port_value": addr.port(),
                        }}}}]}],
                    },
                })
            })
            .collect();

        let stats_tags: Vec<Value> = filter_core::stats::TAGS
            .iter()
            .map(|t| json!({"tag_name": t, "regex": filter_core::stats::tag_regex(t)}))
            .collect();

        json!({
            "node": {"id": "sidecar~127.0.0.1~e2e.test~test.svc.cluster.local", "cluster": "e2e"},
            "admin": {"address": loopback0},
            "stats_config": {"stats_tags": stats_tags},
            // As Istio's bootstrap: runtime values settable on the admin
            // API (`/runtime_modify`).
            "layered_runtime": {"layers": [{"name": "admin", "admin_layer": {}}]},
            "static_resources": {
                "listeners": [{
                    "name": "outbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.listener_port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": hcm,
                    }]}],
                }],
                "clusters": clusters,
            },
        })
    }
}

/// A route action as Istio writes it for a VirtualService route without
/// timeout or retry settings: no route timeout, and Istio's default retry
/// policy (two retries on connect failure, refused stream, `unavailable`,
/// `cancelled` and 503, on other hosts when there are any).
fn istio_route_action(cluster: &str) -> Value {
    json!({
        "cluster": cluster,
        "timeout": "0s",
        "retry_policy": {
            "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            "num_retries": 2,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
            }],
            "host_selection_retry_max_attempts": "5",
            "retriable_status_codes": [503],
        },
    })
}

/// A Lua filter that records the route Envoy had picked when the request
/// reached it and returns its name in the response header
/// `x-route-seen-ahead`: placed ahead of the Wasm filters, it proves the
/// route was computed before they ran.
pub fn route_seen_ahead_filter() -> Value {
    lua_filter(
        r#"
function envoy_on_request(h)
  h:streamInfo():dynamicMetadata():set("e2e", "route", h:streamInfo():routeName())
end
function envoy_on_response(h)
  local md = h:streamInfo():dynamicMetadata():get("e2e")
  h:headers():add("x-route-seen-ahead", md and md["route"] or "none")
end
"#,
    )
}

/// A Lua filter running `code` (which must define `envoy_on_request`
/// and/or `envoy_on_response`).
pub fn lua_filter(code: &str) -> Value {
    json!({
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": code},
        },
    })
}

/// A `header_mutation` filter that sets request header `name` to `value`.
/// It does not clear the route cache.
pub fn set_request_header_filter(name: &str, value: &str) -> Value {
    json!({
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"append": {
                "header": {"key": name, "value": value},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }}]},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(b: &Bootstrap) -> Vec<Value> {
        let j = b.to_json();
        j["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["route_config"]["virtual_hosts"][0]["routes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn a_header_route_keeps_its_shape() {
        let r = routes(&Bootstrap::new().route_header("x-v", "2", "v2"));
        assert_eq!(
            r,
            vec![json!({
                "name": "x-v=2",
                "match": {"prefix": "/", "headers": [{"name": "x-v", "string_match": {"exact": "2"}}]},
                "route": istio_route_action("v2"),
            })]
        );
        assert_eq!(r[0]["route"]["retry_policy"]["num_retries"], 2);
    }

    #[test]
    fn a_route_matches_every_header_and_rewrites() {
        let b = Bootstrap::new()
            .route(
                Route::new("cloud-gcp")
                    .header("x-cloud", "gcp")
                    .header("x-v", "2")
                    .regex_rewrite("^/m/([^/]+)$", "/m/\\1/v/2"),
            )
            .route_header("x-cloud", "gcp", "cloud-gcp")
            .default_route("cloud-aws");
        let r = routes(&b);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0]["name"], "x-cloud=gcp,x-v=2");
        assert_eq!(
            r[0]["match"]["headers"],
            json!([
                {"name": "x-cloud", "string_match": {"exact": "gcp"}},
                {"name": "x-v", "string_match": {"exact": "2"}},
            ])
        );
        assert_eq!(
            r[0]["route"]["regex_rewrite"],
            json!({"pattern": {"regex": "^/m/([^/]+)$"}, "substitution": "/m/\\1/v/2"})
        );
        assert_eq!(r[0]["route"]["cluster"], "cloud-gcp");
        assert_eq!(
            r[0]["route"]["retry_policy"],
            istio_route_action("x")["retry_policy"]
        );
        assert_eq!(r[1]["route"].get("regex_rewrite"), None);
        assert_eq!(r[2]["name"], "default");
    }
}
