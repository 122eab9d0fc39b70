//! infermesh canary filter: the proxy-wasm shim over `filter_core::canary`.
//!
//! Each hook only translates: read host facts (headers as bytes, time, a
//! random word), ask the core, write the decision as `x-infermesh-version`,
//! clear Envoy's route cache so the route is re-picked on that header, and
//! count. All logic and every invariant live in `filter-core`.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod metrics;

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use filter_core::canary::{self, Decision, How, Request};
use filter_core::config::canary::CanaryConfig;
use filter_core::hash::fmix64;
use filter_core::headers;
use filter_shim::{clear_route_cache, now_ms, now_nanos, strip_owned_request_headers};
use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use metrics::Metrics;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(CanaryRoot::default()) });
}}

/// How often the root context refreshes the weight gauges (schedules only).
const TICK: Duration = Duration::from_secs(1);

/// State every HTTP context of one VM shares.
struct Shared {
    cfg: CanaryConfig,
    /// `x-infermesh-served-by` values, `[split][version]`, built once so a
    /// request does not format one.
    served_by: Vec<Vec<String>>,
    metrics: Metrics,
    /// splitmix64 state for requests without a sticky key.
    rng: Cell<u64>,
}

impl Shared {
    fn random(&self) -> u64 {
        let s = self.rng.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.rng.set(s);
        fmix64(s)
    }
}

#[derive(Default)]
struct CanaryRoot {
    shared: Option<Rc<Shared>>,
    /// Active schedule step per split, to log step changes once.
    steps: Vec<Option<usize>>,
}

impl Context for CanaryRoot {}

impl RootContext for CanaryRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(cfg) =
            filter_shim::parse_plugin_config(self, "canary", filter_core::config::canary::parse)
        else {
            return false;
        };
        let metrics = match Metrics::define(&cfg) {
            Ok(m) => m,
            Err(status) => {
                error!("infermesh canary: cannot define metrics: {status:?}");
                return false;
            }
        };
        // Seed per VM from the clock's nanoseconds (std::process::id panics
        // on WASI). Only unkeyed requests use it: no fairness depends on it
        // beyond a uniform spread.
        let seed = now_nanos(self);
        let has_schedule = cfg.splits.iter().any(|s| s.schedule.is_some());
        self.steps = vec![None; cfg.splits.len()];
        let served_by = cfg
            .splits
            .iter()
            .map(|s| {
                s.versions
                    .iter()
                    .map(|v| format!("{}/{v}", s.model))
                    .collect()
            })
            .collect();
        let shared = Rc::new(Shared {
            served_by,
            cfg,
            metrics,
            rng: Cell::new(fmix64(seed)),
        });
        info!(
            "infermesh canary: configured {} split(s): {}",
            shared.cfg.splits.len(),
            shared
                .cfg
                .splits
                .iter()
                .map(|s| s.model.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.shared = Some(shared);
        self.refresh_weights();
        if has_schedule {
            self.set_tick_period(TICK);
        }
        true
    }

    fn on_tick(&mut self) {
        self.refresh_weights();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(CanaryStream {
            shared: self.shared.clone(),
            served_by: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl CanaryRoot {
    /// Publishes the weights in force as gauges and logs schedule steps.
    fn refresh_weights(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let now = now_ms(self);
        for (i, split) in shared.cfg.splits.iter().enumerate() {
            let weights = split.weights_at(now);
            shared.metrics.set_weights(i, weights.as_bp());
            let step = split
                .schedule
                .as_ref()
                .and_then(|s| s.active(now))
                .map(|(n, _)| n);
            if let Some(seen) = self.steps.get_mut(i) {
                if *seen != step {
                    if let Some(n) = step {
                        info!(
                            "infermesh canary: model {} entered schedule step {n}: weights {:?} (bp)",
                            split.model,
                            weights.as_bp()
                        );
                    }
                    *seen = step;
                }
            }
        }
    }
}

struct CanaryStream {
    shared: Option<Rc<Shared>>,
    /// `(split, version)` for the response header.
    served_by: Option<(usize, usize)>,
}

impl Context for CanaryStream {}

impl HttpContext for CanaryStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            // Unreachable in Envoy (no stream before a successful configure),
            // but never serve a request with no config.
            warn!("infermesh canary: request before configuration; refusing it");
            filter_shim::send_json_error(
                self,
                503,
                br#"{"error":"canary filter is not configured"}"#,
            );
            return Action::Pause;
        };
        let cfg = &shared.cfg;

        let path = self
            .get_http_request_header_bytes(":path")
            .unwrap_or_default();
        let override_version = cfg
            .override_header
            .as_deref()
            .and_then(|h| self.get_http_request_header_bytes(h));
        let sticky_key =
            canary::sticky_key(&cfg.sticky_key, |h| self.get_http_request_header_bytes(h));
        let (trusted_model, trusted_version) = if cfg.trust_downstream_headers {
            (
                self.get_http_request_header_bytes(headers::MODEL),
                self.get_http_request_header_bytes(headers::VERSION),
            )
        } else {
            shared.metrics.stripped(strip_owned_request_headers(self));
            (None, None)
        };

        let now = if cfg.splits.iter().any(|s| s.schedule.is_some()) {
            now_ms(self)
        } else {
            0
        };
        let req = Request {
            path: &path,
            trusted_model: trusted_model.as_deref(),
            trusted_version: trusted_version.as_deref(),
            override_version: override_version.as_deref(),
            sticky_key: sticky_key.as_deref(),
        };
        let decision = canary::decide(cfg, &req, now, shared.random());

        let (split, version) = match decision {
            Decision::Unmatched => {
                shared.metrics.unmatched();
                return Action::Continue;
            }
            Decision::Pinned { split, version } => {
                shared.metrics.pinned(split, version);
                let Some(version) = version else {
                    return Action::Continue;
                };
                (split, version)
            }
            Decision::Split {
                split,
                version,
                how,
                override_rejected,
            } => {
                if override_rejected {
                    shared.metrics.override_rejected(split);
                    debug!("infermesh canary: override names a version the split does not list; ignored");
                }
                shared.metrics.routed(split, version, how);
                if how == How::Override {
                    debug!("infermesh canary: override to version index {version}");
                }
                (split, version)
            }
        };
        let Some(split_cfg) = cfg.splits.get(split) else {
            return Action::Continue;
        };
        let Some(name) = split_cfg.versions.get(version) else {
            return Action::Continue;
        };
        self.set_http_request_header(headers::VERSION, Some(name));
        clear_route_cache();
        if cfg.served_by_header {
            self.served_by = Some((split, version));
        }
        Action::Continue
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
