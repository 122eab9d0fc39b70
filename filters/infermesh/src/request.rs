//! The request's headers, read from the host once per stream.
//!
//! Every stage asks this copy, never the host: one host call per request
//! instead of one per header per stage, and the copy is what a failover
//! replay re-sends (Envoy lets a filter read request headers only during
//! the headers callback). Stages that change a header change both the
//! host's map and this copy, so later stages see what the upstream will.

use filter_core::headers;
use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::Bytes;

/// The request headers as they will go upstream.
#[derive(Debug, Default)]
pub struct RequestHeaders {
    list: Vec<(String, Bytes)>,
    /// A stage changed the map: the route must be re-picked.
    changed: bool,
}

impl RequestHeaders {
    /// Reads the whole map (one host call).
    pub fn read(ctx: &dyn HttpContext) -> RequestHeaders {
        RequestHeaders {
            list: ctx.get_http_request_headers_bytes(),
            changed: false,
        }
    }

    /// The first value of `name` (lower-case).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.list
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Sets `name` on the request and in the copy.
    pub fn set(&mut self, ctx: &dyn HttpContext, name: &str, value: &str) {
        ctx.set_http_request_header(name, Some(value));
        self.list.retain(|(n, _)| n != name);
        self.list.push((name.to_owned(), value.as_bytes().to_vec()));
        self.changed = true;
    }

    /// Whether a stage changed the map since it was read.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Removes every client-sent `x-infermesh-*` header from the request
    /// and the copy; returns how many.
    pub fn strip_owned(&mut self, ctx: &dyn HttpContext) -> usize {
        let mut stripped = 0;
        self.list.retain(|(name, _)| {
            if headers::is_owned(name) {
                ctx.set_http_request_header(name, None);
                stripped += 1;
                false
            } else {
                true
            }
        });
        self.changed |= stripped > 0;
        stripped
    }

    /// The headers as they stand.
    pub fn list(&self) -> &[(String, Bytes)] {
        &self.list
    }

    /// The headers, for a replay.
    pub fn into_list(self) -> Vec<(String, Bytes)> {
        self.list
    }
}
