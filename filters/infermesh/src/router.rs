//! The model-router stage: the host side of `filter_core::router`.
//!
//! Reads the model and version a request names (OIP path, headers, and a
//! JSON body field when configured), writes `x-infermesh-model` and, when
//! the request pins a version, `x-infermesh-version`, and answers unknown
//! models and versions with an OIP 404 itself.
//!
//! Body routing buffers the request body before deciding: the headers
//! callback returns `StopIteration`, which Envoy ≥ 1.35 only honours with
//! `allow_on_headers_stop_iteration: true` in the Wasm filter config. The
//! body is read only when the path and headers leave a field it could
//! fill, and never past the cap.

use filter_core::config::router::RouterConfig;
use filter_core::headers;
use filter_core::router::{self, Body, Decision, Request};
use filter_shim::send_json_error;
use log::info;
use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::Status;

use crate::request::RequestHeaders;
use crate::router_metrics::Metrics;

/// The stage, configured once per VM.
pub struct Router {
    pub cfg: RouterConfig,
    /// `x-infermesh-served-by` values, `[model][version]`, built once.
    served_by: Vec<Vec<String>>,
    pub metrics: Metrics,
}

/// Where the stage left the request.
pub enum Step {
    /// Decided; `Some((model, version))` when a version is pinned (for the
    /// response's served-by).
    Done(Option<(usize, usize)>),
    /// Waiting for the body.
    NeedBody,
    /// Answered with a local 404: the stream is over for the stages.
    Replied,
}

impl Router {
    pub fn new(cfg: RouterConfig) -> Result<Router, Status> {
        let metrics = Metrics::define(&cfg)?;
        info!(
            "infermesh: router stage: {} model(s){}",
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
        Ok(Router {
            cfg,
            served_by,
            metrics,
        })
    }

    pub fn served_by(&self, model: usize, version: usize) -> Option<&str> {
        self.served_by
            .get(model)
            .and_then(|r| r.get(version))
            .map(String::as_str)
    }

    fn cap(&self) -> usize {
        self.cfg.body.as_ref().map_or(0, |b| b.max_bytes)
    }

    fn header<'a>(&self, hdrs: &'a RequestHeaders, name: &Option<String>) -> Option<&'a [u8]> {
        name.as_deref().and_then(|h| hdrs.get(h))
    }

    /// The request headers arrived.
    pub fn on_headers(
        &self,
        ctx: &dyn HttpContext,
        hdrs: &mut RequestHeaders,
        end_of_stream: bool,
    ) -> Step {
        let path = hdrs.get(":path").unwrap_or_default();
        let wants_body = !end_of_stream
            && router::needs_body(
                &self.cfg,
                path,
                self.header(hdrs, &self.cfg.model_header),
                self.header(hdrs, &self.cfg.version_header).is_some(),
            );
        if !wants_body {
            return self.finish(ctx, hdrs, Body::None);
        }
        // A body declared larger than the cap is never buffered: Envoy
        // answers 413 once buffered data passes the listener's buffer limit,
        // even if the filter resumes, so the only safe way past a large
        // body is not to hold it at all.
        let declared = hdrs
            .get("content-length")
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.cap() as u64) {
            return self.finish(ctx, hdrs, Body::TooLarge);
        }
        Step::NeedBody
    }

    /// More body arrived while the stage waits for it; `None` to keep
    /// buffering.
    pub fn on_body(
        &self,
        ctx: &dyn HttpContext,
        hdrs: &mut RequestHeaders,
        body_size: usize,
        end_of_stream: bool,
    ) -> Option<Step> {
        if body_size > self.cap() {
            return Some(self.finish(ctx, hdrs, Body::TooLarge));
        }
        if !end_of_stream {
            return None;
        }
        let body = ctx.get_http_request_body(0, body_size).unwrap_or_default();
        Some(self.finish(ctx, hdrs, Body::Complete(&body)))
    }

    /// Trailers arrived while the stage waits for the body: a request with
    /// trailers never sees end_of_stream on its body, so decide on what
    /// was buffered rather than stall it.
    pub fn on_trailers(&self, ctx: &dyn HttpContext, hdrs: &mut RequestHeaders) -> Step {
        let cap = self.cap();
        let body = ctx
            .get_http_request_body(0, cap.saturating_add(1))
            .unwrap_or_default();
        if body.len() > cap {
            return self.finish(ctx, hdrs, Body::TooLarge);
        }
        self.finish(ctx, hdrs, Body::Complete(&body))
    }

    /// The body did not come in time (or this host never delivers it to
    /// a filter that holds the headers): decide on the path and headers.
    pub fn not_delivered(&self, ctx: &dyn HttpContext, hdrs: &mut RequestHeaders) -> Step {
        self.finish(ctx, hdrs, Body::NotDelivered)
    }

    /// Decides and applies: headers, or a local 404.
    fn finish(&self, ctx: &dyn HttpContext, hdrs: &mut RequestHeaders, body: Body<'_>) -> Step {
        let cfg = &self.cfg;
        let req = Request {
            path: hdrs.get(":path").unwrap_or_default(),
            header_model: self.header(hdrs, &cfg.model_header),
            header_version: self.header(hdrs, &cfg.version_header),
            body,
        };
        let (decision, body_fallback) = router::decide(cfg, &req);
        if let Some(reason) = body_fallback {
            self.metrics.body_fallback(reason);
        }
        match decision {
            Decision::Route {
                model,
                version,
                source,
                rewrite,
            } => {
                self.metrics.routed(model, version, source);
                let Some(m) = cfg.models.get(model) else {
                    return Step::Done(None);
                };
                hdrs.set(ctx, headers::MODEL, &m.name);
                let mut served = None;
                if let Some((i, v)) = version.and_then(|i| m.versions.get(i).map(|v| (i, v))) {
                    hdrs.set(ctx, headers::VERSION, v);
                    served = Some((model, i));
                }
                if let Some(path) = rewrite {
                    hdrs.set(ctx, ":path", &path);
                }
                Step::Done(served)
            }
            Decision::Reject { miss, message } => {
                self.metrics.rejected(miss);
                send_json_error(ctx, 404, &router::error_body(&message));
                Step::Replied
            }
            Decision::Pass { miss } => {
                self.metrics.passed(miss);
                Step::Done(None)
            }
        }
    }
}
