//! infermesh model-router filter: the proxy-wasm shim over
//! `filter_core::router`.
//!
//! Reads the model and version a request names (OIP path, headers, and a
//! JSON body field when configured), writes `x-infermesh-model` and, when
//! the request pins a version, `x-infermesh-version`, clears the route
//! cache, and answers unknown models and versions with an OIP 404 itself.
//!
//! Body routing buffers the request body before deciding: the headers
//! callback returns `StopIteration`, which Envoy ≥ 1.35 only honours with
//! `allow_on_headers_stop_iteration: true` in the Wasm filter config
//! (without it such requests hang). The body is read only when the path
//! and headers leave a field it could fill, and never past the cap.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod metrics;

use std::rc::Rc;

use filter_core::config::router::RouterConfig;
use filter_core::headers;
use filter_core::router::{self, Body, Decision, Request};
use filter_shim::{clear_route_cache, send_json_error, strip_owned_request_headers};
use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use metrics::Metrics;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(RouterRoot::default()) });
}}

struct Shared {
    cfg: RouterConfig,
    /// `x-infermesh-served-by` values, `[model][version]`, built once.
    served_by: Vec<Vec<String>>,
    metrics: Metrics,
}

#[derive(Default)]
struct RouterRoot {
    shared: Option<Rc<Shared>>,
}

impl Context for RouterRoot {}

impl RootContext for RouterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(cfg) = filter_shim::parse_plugin_config(
            self,
            "model-router",
            filter_core::config::router::parse,
        ) else {
            return false;
        };
        let metrics = match Metrics::define(&cfg) {
            Ok(m) => m,
            Err(status) => {
                error!("infermesh model-router: cannot define metrics: {status:?}");
                return false;
            }
        };
        info!(
            "infermesh model-router: configured {} model(s){}",
            cfg.models.len(),
            if cfg.body.is_some() {
                ", body routing on"
            } else {
                ""
            }
        );
        let served_by = cfg
            .models
            .iter()
            .map(|m| {
                m.versions
                    .iter()
                    .map(|v| format!("{}/{v}", m.name))
                    .collect()
            })
            .collect();
        self.shared = Some(Rc::new(Shared {
            cfg,
            metrics,
            served_by,
        }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RouterStream {
            shared: self.shared.clone(),
            pending: None,
            served_by: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// What the headers said, kept while the body is buffered.
struct Pending {
    path: Vec<u8>,
    header_model: Option<Vec<u8>>,
    header_version: Option<Vec<u8>>,
}

struct RouterStream {
    shared: Option<Rc<Shared>>,
    pending: Option<Pending>,
    /// `(model, version)` for the response header.
    served_by: Option<(usize, usize)>,
}

impl Context for RouterStream {}

impl HttpContext for RouterStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            send_json_error(
                self,
                503,
                br#"{"error":"model-router filter is not configured"}"#,
            );
            return Action::Pause;
        };
        let cfg = &shared.cfg;
        let path = self
            .get_http_request_header_bytes(":path")
            .unwrap_or_default();
        let header = |name: &Option<String>| {
            name.as_deref()
                .and_then(|h| self.get_http_request_header_bytes(h))
        };
        let header_model = header(&cfg.model_header);
        let header_version = header(&cfg.version_header);
        if !cfg.trust_downstream_headers {
            shared.metrics.stripped(strip_owned_request_headers(self));
        }
        let pending = Pending {
            path,
            header_model,
            header_version,
        };
        let wants_body = !end_of_stream
            && router::needs_body(
                cfg,
                &pending.path,
                pending.header_model.is_some(),
                pending.header_version.is_some(),
            );
        if !wants_body {
            return self.finish(&shared, &pending, Body::None);
        }
        // A body declared larger than the cap is never buffered: Envoy
        // answers 413 once buffered data passes the listener's buffer limit,
        // even if the filter resumes, so the only safe way past a large
        // body is not to hold it at all.
        let cap = cfg.body.as_ref().map_or(0, |b| b.max_bytes);
        let declared = self
            .get_http_request_header_bytes("content-length")
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > cap as u64) {
            return self.finish(&shared, &pending, Body::TooLarge);
        }
        self.pending = Some(pending);
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(shared), Some(pending)) = (self.shared.clone(), self.pending.take()) else {
            return Action::Continue;
        };
        let cap = shared.cfg.body.as_ref().map_or(0, |b| b.max_bytes);
        if body_size > cap {
            return self.finish(&shared, &pending, Body::TooLarge);
        }
        if !end_of_stream {
            self.pending = Some(pending);
            return Action::Pause; // keep buffering
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.finish(&shared, &pending, Body::Complete(&body))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // A request with trailers never sees end_of_stream on its body:
        // decide here, on what was buffered, rather than stall it.
        let (Some(shared), Some(pending)) = (self.shared.clone(), self.pending.take()) else {
            return Action::Continue;
        };
        let cap = shared.cfg.body.as_ref().map_or(0, |b| b.max_bytes);
        let body = self
            .get_http_request_body(0, cap.saturating_add(1))
            .unwrap_or_default();
        if body.len() > cap {
            return self.finish(&shared, &pending, Body::TooLarge);
        }
        self.finish(&shared, &pending, Body::Complete(&body))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let (Some((row, col)), Some(shared)) = (self.served_by.take(), self.shared.clone()) {
            if let Some(value) = shared.served_by.get(row).and_then(|r| r.get(col)) {
                let existing = self.get_http_response_header_bytes(headers::SERVED_BY);
                if let Some(v) = headers::served_by(value, existing.as_deref()) {
                    self.set_http_response_header(headers::SERVED_BY, Some(&v));
                }
            }
        }
        Action::Continue
    }
}

impl RouterStream {
    /// Decides and applies: headers and route cache, or a local 404.
    fn finish(&mut self, shared: &Shared, p: &Pending, body: Body<'_>) -> Action {
        let cfg = &shared.cfg;
        let req = Request {
            path: &p.path,
            header_model: p.header_model.as_deref(),
            header_version: p.header_version.as_deref(),
            body,
        };
        let (decision, body_fallback) = router::decide(cfg, &req);
        if let Some(reason) = body_fallback {
            shared.metrics.body_fallback(reason);
        }
        match decision {
            Decision::Route {
                model,
                version,
                source,
                rewrite,
            } => {
                shared.metrics.routed(model, version, source);
                let Some(m) = cfg.models.get(model) else {
                    return Action::Continue;
                };
                self.set_http_request_header(headers::MODEL, Some(&m.name));
                if let Some((i, v)) = version.and_then(|i| m.versions.get(i).map(|v| (i, v))) {
                    self.set_http_request_header(headers::VERSION, Some(v));
                    if cfg.served_by_header {
                        self.served_by = Some((model, i));
                    }
                }
                if let Some(path) = rewrite {
                    self.set_http_request_header(":path", Some(&path));
                }
                clear_route_cache();
                Action::Continue
            }
            Decision::Reject { miss, message } => {
                shared.metrics.rejected(miss);
                send_json_error(self, 404, &router::error_body(&message));
                Action::Pause
            }
            Decision::Pass { miss } => {
                shared.metrics.passed(miss);
                Action::Continue
            }
        }
    }
}
