//! Benchmark reference: the least a header-routing Wasm filter can do.
//! It hashes one request header, writes `x-infermesh-version` (`1` or `2`,
//! by a basis-point split), and asks Envoy to re-pick the route.
//!
//! The pluginConfig is a space-separated list of options (empty = all
//! defaults), parsed by [`Options::parse`]:
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `header=NAME` | `x-user-id` | the header to hash |
//! | `canary_bp=N` | `1000` | share of version `2`, in basis points |
//! | `path` | off | also read `:path` |
//! | `strip` | off | fetch the whole header map and remove `x-infermesh-*` |
//! | `metric` | off | bump a counter per routed request |
//! | `served-by` | off | set `x-infermesh-served-by: digits-mlp/<v>` on the response |
//! | `remove=NAME` | none | remove request header NAME without reading it (repeatable) |
//! | `clock` | off | read the host clock once |
//!
//! The optional steps each add one thing the canary filter does, so that
//! their cost can be measured one at a time.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

/// The routing header the filter writes.
pub const VERSION_HEADER: &str = "x-infermesh-version";
/// Prefix of the headers `strip` removes.
pub const OWNED_PREFIX: &str = "x-infermesh-";
/// Response header `served-by` writes.
pub const SERVED_BY_HEADER: &str = "x-infermesh-served-by";
/// Number of hash buckets; shares are in basis points of this space.
pub const BUCKETS: u64 = 10_000;

/// Parsed pluginConfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub header: String,
    /// Share of version `2` in basis points, `0..=10_000`.
    pub canary_bp: u64,
    pub read_path: bool,
    pub strip: bool,
    pub metric: bool,
    pub served_by: bool,
    /// Request headers removed blindly, in order.
    pub remove: Vec<String>,
    pub clock: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            header: "x-user-id".to_owned(),
            canary_bp: 1_000,
            read_path: false,
            strip: false,
            metric: false,
            served_by: false,
            remove: Vec::new(),
            clock: false,
        }
    }
}

impl Options {
    /// Parses the space-separated option list; names the bad token on error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut opts = Self::default();
        for token in text.split_ascii_whitespace() {
            match token.split_once('=') {
                Some(("header", name)) => {
                    if name.is_empty() || !name.bytes().all(is_header_byte) {
                        return Err(format!("header: invalid header name {name:?}"));
                    }
                    opts.header = name.to_ascii_lowercase();
                }
                Some(("remove", name)) => {
                    if name.is_empty() || !name.bytes().all(is_header_byte) {
                        return Err(format!("remove: invalid header name {name:?}"));
                    }
                    opts.remove.push(name.to_ascii_lowercase());
                }
                Some(("canary_bp", n)) => {
                    opts.canary_bp =
                        n.parse::<u64>()
                            .ok()
                            .filter(|n| *n <= BUCKETS)
                            .ok_or_else(|| {
                                format!("canary_bp: {n:?} is not an integer in 0..=10000")
                            })?;
                }
                None if token == "path" => opts.read_path = true,
                None if token == "strip" => opts.strip = true,
                None if token == "metric" => opts.metric = true,
                None if token == "served-by" => opts.served_by = true,
                None if token == "clock" => opts.clock = true,
                _ => return Err(format!("unknown option {token:?}")),
            }
        }
        Ok(opts)
    }

    /// The version for a key: `"2"` for the lowest `canary_bp` buckets.
    pub fn pick(&self, key: &[u8]) -> &'static str {
        if bucket(key) < self.canary_bp {
            "2"
        } else {
            "1"
        }
    }
}

fn is_header_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// FNV-1a 64 with MurmurHash3's finaliser, reduced to a bucket.
pub fn bucket(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h % BUCKETS
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(HashRoot::default()) });
}}

struct Shared {
    opts: Options,
    /// Counter id when `metric` is on.
    counter: Option<u32>,
}

#[derive(Default)]
struct HashRoot {
    shared: Option<Rc<Shared>>,
}

impl Context for HashRoot {}

impl RootContext for HashRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let Ok(text) = std::str::from_utf8(&bytes) else {
            log::error!("bench-hash-route: pluginConfig is not UTF-8");
            return false;
        };
        let opts = match Options::parse(text) {
            Ok(o) => o,
            Err(e) => {
                log::error!("bench-hash-route: {e}");
                return false;
            }
        };
        let counter = if opts.metric {
            match hostcalls::define_metric(MetricType::Counter, "bench_hash_route_requests_total") {
                Ok(id) => Some(id),
                Err(status) => {
                    log::error!("bench-hash-route: cannot define metric: {status:?}");
                    return false;
                }
            }
        } else {
            None
        };
        self.shared = Some(Rc::new(Shared { opts, counter }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HashStream {
            shared: self.shared.clone(),
            served_by: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HashStream {
    shared: Option<Rc<Shared>>,
    served_by: Option<String>,
}

impl Context for HashStream {}

impl HttpContext for HashStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let opts = &shared.opts;
        if opts.read_path {
            // Read for its cost only, as the canary does to find the model.
            let _path = self.get_http_request_header_bytes(":path");
        }
        if opts.strip {
            let owned: Vec<String> = self
                .get_http_request_headers_bytes()
                .into_iter()
                .filter_map(|(name, _)| name.starts_with(OWNED_PREFIX).then_some(name))
                .collect();
            for name in &owned {
                self.set_http_request_header(name, None);
            }
        }
        for name in &opts.remove {
            // Blind: the cost of a remove whether or not the client sent it.
            self.set_http_request_header(name, None);
        }
        if opts.clock {
            let _now = self.get_current_time();
        }
        let Some(key) = self.get_http_request_header_bytes(&opts.header) else {
            return Action::Continue;
        };
        let version = opts.pick(&key);
        self.set_http_request_header(VERSION_HEADER, Some(version));
        // Envoy only re-picks the route when asked (envoy PR #36671); an
        // Envoy without the function re-picks on its own.
        let _ = hostcalls::call_foreign_function("clear_route_cache", None);
        if let Some(id) = shared.counter {
            let _ = hostcalls::increment_metric(id, 1);
        }
        if opts.served_by {
            self.served_by = Some(format!("digits-mlp/{version}"));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(v) = self.served_by.take() {
            self.set_http_response_header(SERVED_BY_HEADER, Some(&v));
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_minimal_filter() {
        assert_eq!(Options::parse(""), Ok(Options::default()));
    }

    #[test]
    fn options_parse_and_reject() {
        let o = Options::parse(
            "header=X-Key canary_bp=2500 path strip metric served-by remove=X-A remove=b clock",
        )
        .unwrap_or_default();
        assert_eq!(o.remove, vec!["x-a".to_owned(), "b".to_owned()]);
        assert!(o.clock);
        assert_eq!(o.header, "x-key");
        assert_eq!(o.canary_bp, 2_500);
        assert!(o.read_path && o.strip && o.metric && o.served_by);
        for bad in [
            "header=",
            "remove=",
            "remove=a:b",
            "clock=1",
            "header=a:b",
            "canary_bp=10001",
            "canary_bp=-1",
            "canary_bp=x",
            "bogus",
            "strip=1",
        ] {
            let err = Options::parse(bad).err();
            assert!(err.is_some(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn split_is_sticky_and_close_to_the_share() {
        let o = Options::default();
        assert_eq!(o.pick(b"user-7"), o.pick(b"user-7"));
        let canary = (0..10_000)
            .filter(|i| o.pick(format!("user-{i}").as_bytes()) == "2")
            .count();
        assert!(
            (900..=1100).contains(&canary),
            "10% canary got {canary}/10000"
        );
        let all = Options::parse("canary_bp=10000").unwrap_or_default();
        assert!((0..100).all(|i| all.pick(format!("u{i}").as_bytes()) == "2"));
        let none = Options::parse("canary_bp=0").unwrap_or_default();
        assert!((0..100).all(|i| none.pick(format!("u{i}").as_bytes()) == "1"));
    }
}
