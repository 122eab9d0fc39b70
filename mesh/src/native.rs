//! Envoy bootstraps for failover done with Envoy's own features, as the
//! baseline the failover filter is measured against.
//!
//! Both variants send everything to the first cloud while it is healthy
//! and spill to the next one when outlier detection ejects it; retries
//! (to another priority, another host) hide the failures that eject it:
//!
//! - [`Layout::Priority`]: one STATIC cluster, one host per priority level
//!   (cloud `i` at priority `i`), retry priority `previous_priorities`.
//! - [`Layout::Aggregate`]: one cluster per cloud under an
//!   `envoy.clusters.aggregate` cluster, which orders them as priorities.
//!
//! Every response carries `x-upstream-host: %UPSTREAM_HOST%` (the
//! `ip:port` that answered). The listener is named `outbound` and every
//! port is 0, as [`crate::Envoy::try_start_json`] expects.

use std::net::SocketAddr;

use serde_json::{json, Value};

/// The response header naming the upstream host that answered.
pub const UPSTREAM_HOST_HEADER: &str = "x-upstream-host";
/// The route's cluster in [`Layout::Priority`] (and the aggregate's name).
pub const FAILOVER_CLUSTER: &str = "clouds";

/// How the clouds are laid out in Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Priority,
    Aggregate,
}

/// The failover knobs; [`Native::default`] is the setup the benchmark
/// reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Native {
    pub layout: Layout,
    /// Outlier detection: consecutive 5xx (connect failures and per-try
    /// timeouts count as 5xx) and consecutive gateway failures (502/503/504)
    /// that eject a host.
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub base_ejection_time_ms: u64,
    pub interval_ms: u64,
    pub num_retries: u32,
    pub per_try_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Active HTTP health checks on `/v2/health/ready`, if set.
    pub health_check: Option<HealthCheck>,
}

/// Envoy active health checking.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Native {
    /// Outlier detection (3 consecutive 5xx or gateway failures, 30 s base
    /// ejection, 1 s interval, up to 100 % ejected) and 2 retries with a
    /// 500 ms per-try timeout; no active health checks.
    pub fn new(layout: Layout) -> Native {
        Native {
            layout,
            consecutive_5xx: 3,
            consecutive_gateway_failure: 3,
            base_ejection_time_ms: 30_000,
            interval_ms: 1_000,
            num_retries: 2,
            per_try_timeout_ms: 500,
            connect_timeout_ms: 250,
            health_check: None,
        }
    }

    pub fn health_check(mut self, hc: HealthCheck) -> Native {
        self.health_check = Some(hc);
        self
    }

    /// The bootstrap for `clouds` (name, address), highest priority first.
    pub fn bootstrap(&self, clouds: &[(String, SocketAddr)]) -> Value {
        let clusters: Vec<Value> = match self.layout {
            Layout::Priority => {
                let endpoints: Vec<Value> = (0u32..)
                    .zip(clouds)
                    .map(|(prio, (_, addr))| {
                        json!({"priority": prio, "lb_endpoints": [endpoint(*addr)]})
                    })
                    .collect();
                vec![self.static_cluster(FAILOVER_CLUSTER, endpoints)]
            }
            Layout::Aggregate => {
                let mut cs: Vec<Value> = clouds
                    .iter()
                    .map(|(name, addr)| {
                        self.static_cluster(name, vec![json!({"lb_endpoints": [endpoint(*addr)]})])
                    })
                    .collect();
                let names: Vec<&str> = clouds.iter().map(|(n, _)| n.as_str()).collect();
                cs.push(json!({
                    "name": FAILOVER_CLUSTER,
                    "connect_timeout": ms(self.connect_timeout_ms),
                    "lb_policy": "CLUSTER_PROVIDED",
                    "circuit_breakers": circuit_breakers(),
                    "cluster_type": {
                        "name": "envoy.clusters.aggregate",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                            "clusters": names,
                        },
                    },
                }));
                cs
            }
        };
        let route = json!({
            "name": "failover",
            "match": {"prefix": "/"},
            "route": {
                "cluster": FAILOVER_CLUSTER,
                "retry_policy": {
                    "retry_on": "5xx,reset,connect-failure,retriable-status-codes",
                    "retriable_status_codes": [503],
                    "num_retries": self.num_retries,
                    "per_try_timeout": ms(self.per_try_timeout_ms),
                    "retry_priority": {
                        "name": "envoy.retry_priorities.previous_priorities",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                            "update_frequency": 1,
                        },
                    },
                    "retry_host_predicate": [{
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
                    }],
                    "host_selection_retry_max_attempts": 3,
                },
            },
        });
        let hcm = json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": crate::bootstrap::STAT_PREFIX,
            "codec_type": "AUTO",
            "route_config": {
                "name": "80",
                "response_headers_to_add": [{
                    "header": {"key": UPSTREAM_HOST_HEADER, "value": "%UPSTREAM_HOST%"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }],
                "virtual_hosts": [{
                    "name": "infermesh",
                    "domains": ["*"],
                    "include_attempt_count_in_response": true,
                    "routes": [route],
                }],
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        });
        json!({
            "node": {"id": "sidecar~127.0.0.1~bench.native~bench.svc.cluster.local", "cluster": "bench"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{
                    "name": "outbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": hcm,
                    }]}],
                }],
                "clusters": clusters,
            },
        })
    }

    fn static_cluster(&self, name: &str, endpoints: Vec<Value>) -> Value {
        let mut c = json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": ms(self.connect_timeout_ms),
            "load_assignment": {"cluster_name": name, "endpoints": endpoints},
            "circuit_breakers": circuit_breakers(),
            "outlier_detection": {
                "consecutive_5xx": self.consecutive_5xx,
                "consecutive_gateway_failure": self.consecutive_gateway_failure,
                "enforcing_consecutive_5xx": 100,
                "enforcing_consecutive_gateway_failure": 100,
                "interval": ms(self.interval_ms),
                "base_ejection_time": ms(self.base_ejection_time_ms),
                "max_ejection_percent": 100,
            },
        });
        if let Some(hc) = &self.health_check {
            c["health_checks"] = json!([{
                "timeout": ms(hc.timeout_ms),
                "interval": ms(hc.interval_ms),
                // Without this the first checks after start, before any
                // traffic, schedule the next ones 60 s later (Envoy's
                // default no-traffic interval).
                "no_traffic_interval": ms(hc.interval_ms),
                "unhealthy_threshold": hc.unhealthy_threshold,
                "healthy_threshold": hc.healthy_threshold,
                "http_health_check": {"path": "/v2/health/ready"},
            }]);
        }
        c
    }
}

fn endpoint(addr: SocketAddr) -> Value {
    json!({"endpoint": {"address": {"socket_address": {
        "address": addr.ip().to_string(),
        "port_value": addr.port(),
    }}}})
}

/// Limits high enough that a burst of retries at a hang is never refused
/// by a circuit breaker (Envoy's default allows 3 concurrent retries).
fn circuit_breakers() -> Value {
    json!({"thresholds": [{
        "priority": "DEFAULT",
        "max_connections": 10_000,
        "max_pending_requests": 10_000,
        "max_requests": 10_000,
        "max_retries": 10_000,
    }]})
}

/// A protobuf Duration string.
fn ms(ms: u64) -> String {
    format!("{}.{:03}s", ms / 1_000, ms % 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clouds() -> Vec<(String, SocketAddr)> {
        vec![
            ("aws".into(), SocketAddr::from(([127, 0, 0, 2], 8001))),
            ("gcp".into(), SocketAddr::from(([127, 0, 0, 3], 8002))),
        ]
    }

    #[test]
    fn priority_layout_puts_cloud_i_at_priority_i() {
        let b = Native::new(Layout::Priority).bootstrap(&clouds());
        let cs = b["static_resources"]["clusters"].as_array().unwrap();
        assert_eq!(cs.len(), 1);
        let eps = cs[0]["load_assignment"]["endpoints"].as_array().unwrap();
        assert_eq!(eps[1]["priority"], 1);
        assert_eq!(
            eps[1]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"],
            "127.0.0.3"
        );
        assert_eq!(cs[0]["outlier_detection"]["base_ejection_time"], "30.000s");
        let retry = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
            ["retry_policy"];
        assert_eq!(retry["per_try_timeout"], "0.500s");
        assert_eq!(retry["num_retries"], 2);
    }

    #[test]
    fn aggregate_layout_lists_the_clouds_in_order() {
        let b = Native::new(Layout::Aggregate)
            .health_check(HealthCheck {
                interval_ms: 500,
                timeout_ms: 200,
                unhealthy_threshold: 2,
                healthy_threshold: 3,
            })
            .bootstrap(&clouds());
        let cs = b["static_resources"]["clusters"].as_array().unwrap();
        assert_eq!(cs.len(), 3);
        assert_eq!(
            cs[2]["cluster_type"]["typed_config"]["clusters"],
            json!(["aws", "gcp"])
        );
        assert_eq!(cs[0]["health_checks"][0]["interval"], "0.500s");
        assert_eq!(cs[0]["health_checks"][0]["no_traffic_interval"], "0.500s");
        assert!(cs[2].get("health_checks").is_none());
    }
}
