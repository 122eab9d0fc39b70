//! Host-side helpers every infermesh filter shim needs: re-picking the
//! route, the clock, stripping downstream `x-infermesh-*` headers, metrics
//! that never fail a request, and OIP-style local replies.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::cell::RefCell;
use std::time::UNIX_EPOCH;

use filter_core::{headers, ConfigError};
use log::{debug, error};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{MetricType, Status};

/// Reads the pluginConfig and parses it with the filter's parser. On error
/// logs `infermesh FILTER: invalid pluginConfig: PATH: MESSAGE` and returns
/// `None`; `on_configure` must then return `false`, so Envoy applies the
/// plugin's failure policy and no request sees a half-parsed config.
pub fn parse_plugin_config<T>(
    root: &dyn RootContext,
    parse: impl FnOnce(&[u8]) -> Result<T, ConfigError>,
) -> Option<T> {
    let bytes = root.get_plugin_configuration().unwrap_or_default();
    match parse(&bytes) {
        Ok(cfg) => Some(cfg),
        Err(e) => {
            error!("infermesh: invalid pluginConfig: {e}");
            None
        }
    }
}

/// Asks Envoy to re-pick the route after a routing header changed. Envoy
/// stopped doing this implicitly for Wasm filters (envoy PR #36671), and a
/// filter ahead (CORS, fault, Lua) may already have computed the route.
/// Older Envoys lack the function but cleared the cache on every header
/// change, so a missing function is not an error.
pub fn clear_route_cache() {
    if let Err(status) = hostcalls::call_foreign_function("clear_route_cache", None) {
        debug!("clear_route_cache unavailable: {status:?}");
    }
}

/// Host wall-clock time in Unix milliseconds (0 if the host clock is
/// before 1970).
pub fn now_ms(ctx: &dyn Context) -> u64 {
    ctx.get_current_time()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Host wall-clock nanoseconds, truncated: a seed, not a timestamp.
pub fn now_nanos(ctx: &dyn Context) -> u64 {
    ctx.get_current_time()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Removes every downstream request header starting with `x-infermesh-`;
/// returns how many were removed. Removing one can change the route (a
/// VirtualService may match on it), so the route cache is cleared too:
/// Envoy only does that implicitly for filters on proxy-wasm ABI 0.2.1.
pub fn strip_owned_request_headers(ctx: &dyn HttpContext) -> usize {
    let owned: Vec<String> = ctx
        .get_http_request_headers_bytes()
        .into_iter()
        .filter_map(|(name, _)| headers::is_owned(&name).then_some(name))
        .collect();
    for name in &owned {
        ctx.set_http_request_header(name, None);
    }
    if !owned.is_empty() {
        clear_route_cache();
    }
    owned.len()
}

/// Defines a counter.
pub fn counter(name: &str) -> Result<u32, Status> {
    hostcalls::define_metric(MetricType::Counter, name)
}

/// Defines a gauge.
pub fn gauge(name: &str) -> Result<u32, Status> {
    hostcalls::define_metric(MetricType::Gauge, name)
}

/// Defines a histogram.
pub fn histogram(name: &str) -> Result<u32, Status> {
    hostcalls::define_metric(MetricType::Histogram, name)
}

thread_local! {
    /// Counter increments not yet sent to the host: `(metric id, count)`,
    /// one entry per counter changed since the last flush.
    static PENDING: RefCell<Vec<(u32, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Adds `by` to a counter, in the VM: [`flush_counters`] sends the sums
/// to the host (see `filter_core::stats::COUNTER_FLUSH_MS`). A failed
/// increment is not worth failing a request over.
pub fn bump(id: Option<u32>, by: u64) {
    let Some(id) = id else {
        return;
    };
    if by == 0 {
        return;
    }
    let batched = PENDING.with(|p| {
        let Ok(mut p) = p.try_borrow_mut() else {
            return false;
        };
        match p.iter_mut().find(|(i, _)| *i == id) {
            Some((_, n)) => *n = n.saturating_add(by),
            None => p.push((id, by)),
        }
        true
    });
    if !batched {
        let _ = hostcalls::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
    }
}

/// Sends every counter increment made since the last flush to the host;
/// call it from the root's tick and when the plugin stops.
pub fn flush_counters() {
    PENDING.with(|p| {
        let Ok(mut p) = p.try_borrow_mut() else {
            return;
        };
        for (id, n) in p.drain(..) {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    });
}

/// Sets a gauge, or records a value in a histogram.
pub fn set(id: u32, value: u64) {
    let _ = hostcalls::record_metric(id, value);
}

/// Answers the request from the filter with an OIP-style JSON error body;
/// the upstream sees nothing.
pub fn send_json_error(ctx: &dyn HttpContext, status: u32, body: &[u8]) {
    ctx.send_http_response(
        status,
        vec![("content-type", "application/json")],
        Some(body),
    );
}
