//! `infermesh.wasm`: the one shipped Envoy module. Its pluginConfig has a
//! section per stage (`router`, `canary`, `failover`; see
//! `filter_core::config::module`), and every configured stage runs in one
//! pass over one stream context:
//!
//! - the request header map is read from the host **once** and every stage
//!   asks that copy ([`request::RequestHeaders`]);
//! - client-sent `x-infermesh-*` headers are removed once, unless every
//!   stage trusts them;
//! - model-router decides the model (and a pinned version), canary the
//!   version, failover the cloud; each writes its header, and the route
//!   cache is cleared **once**, after the last stage, so Envoy re-picks the
//!   route on what they wrote (envoy PR #36671: a filter ahead may already
//!   have computed it);
//! - the response gets one `x-infermesh-served-by: model/version@cloud`.
//!
//! The stage modules only translate host callbacks; decisions live in
//! `filter-core`. A panic would trap the VM, so none of this code can
//! panic on request data.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod canary;
mod canary_metrics;
mod failover;
mod failover_metrics;
mod request;
mod router;
mod router_metrics;

use std::cell::{Cell, RefCell, RefMut};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use filter_core::config::module::{self, HostPattern, ModuleConfig};
use filter_core::headers;
use filter_core::stats::COUNTER_FLUSH_MS;
use filter_shim::{clear_route_cache, now_ms, now_nanos};
use log::{error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use request::RequestHeaders;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(Root { id, stages: None, ticks: 0, steps: Vec::new(), weights_at_ms: 0 })
    });
}}

/// How often canary weights (their schedules) are re-published.
const SCHEDULE_TICK_MS: u64 = 1_000;
const BODY_WAIT_TICK_MS: u64 = 10;
/// After this many waits that ended with no body and no body ever seen,
/// the VM stops waiting: the host does not deliver bodies to a filter that
/// paused the headers.
const WITHHELD_AFTER: u32 = 3;

/// Every configured stage, shared by the HTTP contexts of one VM.
struct Stages {
    /// `Some`: only requests to these hosts are the module's.
    hosts: Option<Vec<HostPattern>>,
    router: Option<router::Router>,
    canary: Option<canary::Canary>,
    failover: Option<Rc<failover::Shared>>,
    strip: bool,
    served_by: bool,
    /// `model/version@cloud` values, when failover composes them.
    served_at: ServedAt,
    /// Streams whose router stage waits for the body.
    waits: BodyWaits,
}

impl Stages {
    fn new(root_id: u32, cfg: ModuleConfig, seed: u64) -> Result<Stages, String> {
        let strip = cfg.strips_downstream_headers();
        let served_by = cfg.served_by_header();
        let stages = cfg.stages().join(" -> ");
        let hosts = cfg.hosts.clone();
        let defined = |stage: &str, e| format!("cannot define the {stage} metrics: {e:?}");
        let router = cfg
            .router
            .map(router::Router::new)
            .transpose()
            .map_err(|e| defined("router", e))?;
        let canary = cfg
            .canary
            .map(|c| canary::Canary::new(c, seed, root_id))
            .transpose()
            .map_err(|e| defined("canary", e))?;
        let failover = cfg
            .failover
            .map(|c| failover::configure(root_id, c, served_by))
            .transpose()
            .map_err(|e| defined("failover", e))?;
        let served_at = match &failover {
            Some(f) if served_by => ServedAt::build(router.as_ref(), canary.as_ref(), f),
            _ => ServedAt::default(),
        };
        info!(
            "infermesh: configured {stages}; client x-infermesh-* headers {}",
            if strip { "removed" } else { "trusted" }
        );
        Ok(Stages {
            hosts,
            router,
            canary,
            failover,
            strip,
            served_by,
            served_at,
            waits: BodyWaits::default(),
        })
    }

    /// Counts stripped headers on the first stage's metric, as that
    /// stage's single-stage filter did.
    fn count_stripped(&self, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(r) = &self.router {
            r.metrics.stripped(n);
        } else if let Some(c) = &self.canary {
            c.metrics.stripped(n);
        } else if let Some(f) = &self.failover {
            f.stripped(n);
        }
    }
}

/// `[row][version][cloud]`: each `prefix(row, version)` with every cloud's
/// `@cloud` appended.
fn table<'a>(
    rows: usize,
    versions: impl Fn(usize) -> usize,
    prefix: impl Fn(usize, usize) -> Option<&'a str>,
    with_clouds: &impl Fn(&str) -> Vec<String>,
) -> Vec<Vec<Vec<String>>> {
    (0..rows)
        .map(|a| {
            (0..versions(a))
                .map(|b| prefix(a, b).map_or_else(Vec::new, with_clouds))
                .collect()
        })
        .collect()
}

/// Every `x-infermesh-served-by` value a response of a failover module
/// can carry, `[decision][version][cloud]`, built at configure time so a
/// response writes one and formats none.
#[derive(Default)]
struct ServedAt {
    router: Vec<Vec<Vec<String>>>,
    canary: Vec<Vec<Vec<String>>>,
}

impl ServedAt {
    fn build(
        router: Option<&router::Router>,
        canary: Option<&canary::Canary>,
        failover: &failover::Shared,
    ) -> ServedAt {
        let with_clouds = |prefix: &str| -> Vec<String> {
            (0..failover.clouds())
                .map(|c| format!("{prefix}{}", failover.served_at(c).unwrap_or("@?")))
                .collect()
        };
        let router = router.map_or_else(Vec::new, |r| {
            let versions = |m: usize| r.cfg.models.get(m).map_or(0, |m| m.versions.len());
            table(
                r.cfg.models.len(),
                versions,
                |m, v| r.served_by(m, v),
                &with_clouds,
            )
        });
        let canary = canary.map_or_else(Vec::new, |c| {
            let versions = |s: usize| c.cfg.splits.get(s).map_or(0, |s| s.versions.len());
            table(
                c.cfg.splits.len(),
                versions,
                |s, v| c.served_by(s, v),
                &with_clouds,
            )
        });
        ServedAt { router, canary }
    }

    fn get(&self, served: Served, cloud: usize) -> Option<&str> {
        let (table, a, b) = match served {
            Served::Router(m, v) => (&self.router, m, v),
            Served::Canary(s, v) => (&self.canary, s, v),
        };
        table.get(a)?.get(b)?.get(cloud).map(String::as_str)
    }
}

struct Root {
    id: u32,
    stages: Option<Rc<Stages>>,
    ticks: u32,
    /// Active schedule step per canary split, to log step changes once.
    steps: Vec<Option<usize>>,
    /// When the canary weight gauges were last refreshed.
    weights_at_ms: u64,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        // The plugin stops (a new config, a drained listener): publish
        // what the last ticks did not.
        filter_shim::flush_counters();
        true
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let canary = self.stages.as_ref().and_then(|s| s.canary.as_ref());
        if canary.is_some_and(|c| c.on_copy_response(token_id, num_headers, body_size)) {
            return;
        }
        if let Some(f) = self.stages.as_ref().and_then(|s| s.failover.clone()) {
            let now = now_ms(self);
            f.on_root_call_response(token_id, num_headers, body_size, now);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(cfg) = filter_shim::parse_plugin_config(self, module::parse) else {
            return false;
        };
        // Seed per VM from the clock's nanoseconds (std::process::id panics
        // on WASI).
        let stages = match Stages::new(self.id, cfg, now_nanos(self)) {
            Ok(s) => Rc::new(s),
            Err(e) => {
                error!("infermesh: {e}");
                return false;
            }
        };
        let body_routing = stages.router.as_ref().is_some_and(|r| r.cfg.body.is_some());
        let has_failover = stages.failover.is_some();
        let canary_tick = stages.canary.as_ref().and_then(|c| c.tick_ms());
        self.stages = Some(stages);
        self.refresh_weights(now_ms(self));
        // Every tick publishes the counters; a stage may tick faster.
        let tick_ms = if has_failover {
            failover::TICK_MS
        } else if body_routing {
            BODY_WAIT_TICK_MS
        } else if let Some(ms) = canary_tick {
            ms
        } else {
            COUNTER_FLUSH_MS
        };
        self.set_tick_period(Duration::from_millis(tick_ms.min(COUNTER_FLUSH_MS)));
        true
    }

    fn on_tick(&mut self) {
        let now = now_ms(self);
        self.ticks = self.ticks.wrapping_add(1);
        if now.saturating_sub(self.weights_at_ms) >= SCHEDULE_TICK_MS {
            self.refresh_weights(now);
        }
        if let Some(stages) = self.stages.clone() {
            stages.waits.expire(&stages, now, self.id);
            if let Some(f) = &stages.failover {
                f.on_tick(now, self.ticks);
            }
            if let Some(c) = &stages.canary {
                c.on_tick(now);
            }
        }
        filter_shim::flush_counters();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let stages = self.stages.clone();
        let failover = stages
            .as_ref()
            .and_then(|s| s.failover.clone())
            .map(|f| failover::Stage::new(context_id, f));
        Some(Box::new(Stream {
            context_id,
            stages,
            inner: Rc::new(RefCell::new(Inner {
                failover,
                hdrs: None,
                served: None,
                watch: None,
                copy: None,
                capture: None,
                served_at: None,
                done: false,
            })),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    /// Publishes the canary weights in force and logs schedule steps.
    fn refresh_weights(&mut self, now: u64) {
        self.weights_at_ms = now;
        if let Some(c) = self.stages.as_ref().and_then(|s| s.canary.as_ref()) {
            c.refresh_weights(now, &mut self.steps);
        }
    }
}

/// Which stage's `model/version` names what served the request.
#[derive(Debug, Clone, Copy)]
enum Served {
    Router(usize, usize),
    Canary(usize, usize),
}

struct Stream {
    context_id: u32,
    stages: Option<Rc<Stages>>,
    /// Shared with the root, which ends a body wait that ran out.
    inner: Rc<RefCell<Inner>>,
}

/// A stream's state, as the root holds it while the stream waits.
type StreamRef = Weak<RefCell<Inner>>;

/// A stream's state.
struct Inner {
    failover: Option<failover::Stage>,
    /// The header copy while model-router waits for the body.
    hdrs: Option<RequestHeaders>,
    served: Option<Served>,
    /// The canary guard's watch on this request, until its outcome.
    watch: Option<canary::Watch>,
    /// The shadow copy of this request, until its body is complete.
    copy: Option<canary::Copy>,
    /// The client's answer to a copied request, for the comparison.
    capture: Option<canary::Capture>,
    /// The cloud failover reports for a response that passed through.
    served_at: Option<usize>,
    /// A stage answered the request itself.
    done: bool,
}

/// The streams waiting for a request body, and what the VM learnt about
/// the host: whether it hands a filter the body while the filter holds
/// the headers. Envoy >= 1.35 does so only with
/// `allow_on_headers_stop_iteration: true`, a flag Istio's WasmPlugin
/// cannot set; without it the body never comes, so every wait is bounded
/// by `body.max_wait_ms` and then routed without the body.
#[derive(Default)]
struct BodyWaits {
    /// Context id -> (deadline, the stream).
    waiting: RefCell<BTreeMap<u32, (u64, StreamRef)>>,
    /// A body arrived during a wait: the host delivers bodies.
    delivered: Cell<bool>,
    /// Waits that ran out while no body was ever delivered.
    withheld: Cell<u32>,
}

impl BodyWaits {
    /// Whether a request should wait at all: not once the host has shown
    /// it withholds bodies.
    fn worth_waiting(&self) -> bool {
        self.delivered.get() || self.withheld.get() < WITHHELD_AFTER
    }

    fn start(&self, context_id: u32, deadline_ms: u64, inner: &Rc<RefCell<Inner>>) {
        self.waiting
            .borrow_mut()
            .insert(context_id, (deadline_ms, Rc::downgrade(inner)));
    }

    /// A body callback came for a waiting stream.
    fn body_seen(&self, context_id: u32) {
        if self.waiting.borrow_mut().remove(&context_id).is_some() {
            self.delivered.set(true);
        }
    }

    fn forget(&self, context_id: u32) {
        self.waiting.borrow_mut().remove(&context_id);
    }

    /// Routes the streams whose wait ran out without the body, and resumes
    /// them. Called from the root's tick; `root_id` is made effective again.
    fn expire(&self, stages: &Stages, now: u64, root_id: u32) {
        let due: Vec<(u32, StreamRef)> = {
            let mut waiting = self.waiting.borrow_mut();
            let ids: Vec<u32> = waiting
                .iter()
                .filter(|(_, (deadline, _))| *deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| waiting.remove(&id).map(|(_, w)| (id, w)))
                .collect()
        };
        if due.is_empty() {
            return;
        }
        for (id, weak) in due {
            let Some(inner) = weak.upgrade() else {
                continue;
            };
            if !self.delivered.get() {
                let n = self.withheld.get().saturating_add(1);
                self.withheld.set(n);
                if n == 1 {
                    warn!(
                        "infermesh: a request waited {} ms for its body and got none: this Envoy \
                         does not hand a filter the body while it holds the headers (Envoy >= 1.35 \
                         needs allow_on_headers_stop_iteration: true in the Wasm filter config, which \
                         a WasmPlugin cannot set; see istio/body-routing). Routing without the body.",
                        stages
                            .router
                            .as_ref()
                            .and_then(|r| r.cfg.body.as_ref())
                            .map_or(0, |b| b.max_wait_ms)
                    );
                }
            }
            if proxy_wasm::hostcalls::set_effective_context(id).is_err() {
                continue;
            }
            let Ok(mut state) = inner.try_borrow_mut() else {
                continue;
            };
            let action = state.body_not_delivered(stages);
            drop(state);
            if action == Action::Continue {
                let _ = proxy_wasm::hostcalls::resume_http_request();
            }
        }
        let _ = proxy_wasm::hostcalls::set_effective_context(root_id);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(stages) = &self.stages {
            stages.waits.forget(self.context_id);
        }
    }
}

impl Stream {
    /// The stages and the stream's state, for a callback after the request
    /// headers; `None` when the module stays out of this stream (another
    /// host, its own reply sent) or the state is borrowed: a local reply
    /// sent while it is comes back here synchronously, and it is the
    /// module's own answer, so it passes.
    fn active(&self) -> Option<(Rc<Stages>, RefMut<'_, Inner>)> {
        let stages = self.stages.clone()?;
        let inner = self.inner.try_borrow_mut().ok()?;
        (!inner.done).then_some((stages, inner))
    }
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Ok(inner) = self.inner.try_borrow() else {
            return;
        };
        if let Some(f) = &inner.failover {
            f.on_call_response(token_id, num_headers, body_size, now_ms(&Host));
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(stages) = self.stages.clone() else {
            // Unreachable in Envoy (no stream before a successful
            // configure), but never serve a request with no config.
            warn!("infermesh: request before configuration; refusing it");
            filter_shim::send_json_error(self, 503, NOT_CONFIGURED);
            return Action::Pause;
        };
        if let Some(hosts) = &stages.hosts {
            let authority = Host
                .get_http_request_header_bytes(":authority")
                .unwrap_or_default();
            if !module::in_scope(hosts, &authority) {
                // Another service's request: untouched, and the module
                // stays out of the rest of the stream.
                self.stages = None;
                return Action::Continue;
            }
        }
        // Borrowed: a local reply coming back synchronously (see `active`).
        let Ok(mut inner) = self.inner.try_borrow_mut() else {
            return Action::Continue;
        };
        let mut hdrs = RequestHeaders::read(&Host);
        if stages.strip {
            stages.count_stripped(hdrs.strip_owned(&Host));
        }
        if let Some(router) = &stages.router {
            let step = router.on_headers(&Host, &mut hdrs, end_of_stream);
            match step {
                router::Step::NeedBody if stages.waits.worth_waiting() => {
                    let wait = router.cfg.body.as_ref().map_or(0, |b| b.max_wait_ms);
                    stages.waits.start(
                        self.context_id,
                        now_ms(&Host).saturating_add(wait),
                        &self.inner,
                    );
                    inner.hdrs = Some(hdrs);
                    return Action::Pause;
                }
                router::Step::NeedBody => {
                    // This host withholds bodies from a filter that holds
                    // the headers: route on the path and headers now.
                    let step = router.not_delivered(&Host, &mut hdrs);
                    if let Some(action) = inner.routed(step) {
                        return action;
                    }
                }
                step => {
                    if let Some(action) = inner.routed(step) {
                        return action;
                    }
                }
            }
        }
        inner.after_router(&stages, hdrs, end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some((stages, mut inner)) = self.active() else {
            return Action::Continue;
        };
        if let (Some(router), Some(mut hdrs)) = (&stages.router, inner.hdrs.take()) {
            stages.waits.body_seen(self.context_id);
            let Some(step) = router.on_body(&Host, &mut hdrs, body_size, end_of_stream) else {
                inner.hdrs = Some(hdrs);
                // Keep buffering; the wait's deadline no longer applies:
                // the body is coming.
                return Action::Pause;
            };
            if let Some(action) = inner.decided_late(&stages, hdrs, step) {
                return action;
            }
            // The whole buffered body so far is this stream's body for
            // failover's copy.
        }
        if let (Some(c), Some(copy)) = (&stages.canary, inner.copy.take()) {
            inner.copy = c.copy_body(copy, &Host, body_size, end_of_stream);
        }
        if let Some(f) = inner.failover.as_mut() {
            f.on_request_body(&Host, body_size, end_of_stream, || now_ms(&Host));
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let Some((stages, mut inner)) = self.active() else {
            return Action::Continue;
        };
        if let (Some(router), Some(mut hdrs)) = (&stages.router, inner.hdrs.take()) {
            stages.waits.body_seen(self.context_id);
            let step = router.on_trailers(&Host, &mut hdrs);
            if let Some(action) = inner.decided_late(&stages, hdrs, step) {
                return action;
            }
            if let Some(f) = inner.failover.as_mut() {
                // What was buffered is the whole body.
                let size = Host
                    .get_http_request_body(0, usize::MAX)
                    .map_or(0, |b| b.len());
                f.on_request_body(&Host, size, true, || now_ms(&Host));
            }
        }
        if let (Some(c), Some(copy)) = (&stages.canary, inner.copy.take()) {
            c.send_copy(copy);
        }
        if let Some(f) = inner.failover.as_mut() {
            f.on_request_trailers(|| now_ms(&Host));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some((stages, mut inner)) = self.active() else {
            return Action::Continue;
        };
        // Read at most once in this callback, and only if a stage asks.
        let clock = Memo::new(|| now_ms(&Host));
        let status = Memo::new(response_status);
        if let (Some(w), Some(c)) = (inner.watch.take(), &stages.canary) {
            // The routed try's own status, before failover may replace it.
            c.observe(w, status.get().map(u32::from), clock.get());
        }
        let mut from_failover = false;
        if let Some(f) = inner.failover.as_mut() {
            let mut served_at = None;
            let action =
                f.on_response_headers(&Host, || clock.get(), || status.get(), &mut served_at);
            if action == Action::Pause {
                return action;
            }
            match served_at {
                Some(cloud) => inner.served_at = Some(cloud),
                // The stage's own reply: its headers are set.
                None => from_failover = f.replied(),
            }
        }
        if let (Some(cap), Some(c)) = (inner.capture.take(), &stages.canary) {
            let code = status.get().map_or(0, u32::from);
            inner.capture = c.capture_headers(cap, code, end_of_stream);
        }
        if stages.served_by && !from_failover {
            // Every value was built at configure time.
            let value = match (inner.served, inner.served_at, &inner.failover) {
                (Some(served), Some(cloud), Some(_)) => stages.served_at.get(served, cloud),
                (None, Some(cloud), Some(f)) => f.served_at(cloud),
                _ => inner.served_prefix(&stages),
            };
            if let Some(v) = value {
                Host.set_http_response_header(headers::SERVED_BY, Some(v));
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Ok(mut inner) = self.inner.try_borrow_mut() else {
            return Action::Continue;
        };
        let action = inner.response_action();
        if action == Action::Continue {
            if let (Some(cap), Some(c)) = (
                inner.capture.take(),
                self.stages.as_ref().and_then(|s| s.canary.as_ref()),
            ) {
                inner.capture = c.capture_body(cap, &Host, body_size, end_of_stream);
            }
        }
        action
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.inner
            .try_borrow()
            .map_or(Action::Continue, |i| i.response_action())
    }

    fn on_log(&mut self) {
        // A watched request that got no response headers was reset.
        let (watch, capture) = self
            .inner
            .try_borrow_mut()
            .ok()
            .map_or((None, None), |mut i| (i.watch.take(), i.capture.take()));
        let Some(c) = self.stages.as_ref().and_then(|s| s.canary.as_ref()) else {
            return;
        };
        if let Some(w) = watch {
            c.observe(w, None, now_ms(&Host));
        }
        if let Some(cap) = capture {
            c.capture_lost(cap);
        }
    }
}

/// A host fact read at most once per callback, on first use.
struct Memo<T: Copy, F: Fn() -> T> {
    value: Cell<Option<T>>,
    read: F,
}

impl<T: Copy, F: Fn() -> T> Memo<T, F> {
    fn new(read: F) -> Self {
        Memo {
            value: Cell::new(None),
            read,
        }
    }

    fn get(&self) -> T {
        if let Some(v) = self.value.get() {
            return v;
        }
        let v = (self.read)();
        self.value.set(Some(v));
        v
    }
}

/// The response's `:status` (one host call).
fn response_status() -> Option<u16> {
    Host.get_http_response_header_bytes(":status")
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
}

/// The local reply of a stream that reached no configured stage.
const NOT_CONFIGURED: &[u8] = br#"{"error":"infermesh filter is not configured"}"#;

/// The host as seen by the stages: every call goes to the current
/// (effective) context, which during a stream callback is that stream,
/// and during a root tick the stream made effective for it.
pub(crate) struct Host;
impl Context for Host {}
impl HttpContext for Host {}

impl Inner {
    /// Takes the router's decision; `Some` ends the request callback.
    fn routed(&mut self, step: router::Step) -> Option<Action> {
        match step {
            router::Step::Done(served) => {
                self.served = served.map(|(m, v)| Served::Router(m, v));
                None
            }
            router::Step::NeedBody => None,
            router::Step::Replied => Some(self.replied()),
        }
    }

    /// The router decided after the headers callback (on the body, the
    /// trailers, or a wait that ran out): the other stages run now.
    /// `Some` ends the callback.
    fn decided_late(
        &mut self,
        stages: &Stages,
        hdrs: RequestHeaders,
        step: router::Step,
    ) -> Option<Action> {
        if let Some(action) = self.routed(step) {
            return Some(action);
        }
        (self.after_router(stages, hdrs, false) == Action::Pause).then_some(Action::Pause)
    }

    /// The wait for the body ran out: route without it.
    fn body_not_delivered(&mut self, stages: &Stages) -> Action {
        let (Some(router), Some(mut hdrs)) = (&stages.router, self.hdrs.take()) else {
            return Action::Continue;
        };
        let step = router.not_delivered(&Host, &mut hdrs);
        self.decided_late(stages, hdrs, step)
            .unwrap_or(Action::Continue)
    }

    /// Canary and failover, once model-router has decided.
    fn after_router(
        &mut self,
        stages: &Stages,
        mut hdrs: RequestHeaders,
        end_of_stream: bool,
    ) -> Action {
        // One clock read for every stage of this callback, if any needs it.
        let clock = Memo::new(|| now_ms(&Host));
        if let Some(canary) = &stages.canary {
            if let Some((s, v)) = canary.decide(&Host, &mut hdrs, || clock.get()) {
                self.served = Some(Served::Canary(s, v));
                self.watch = canary.watch(s, v, || clock.get());
                self.copy = canary.take_copy();
                self.capture = self.copy.as_ref().and_then(|c| canary.capture(c));
                if end_of_stream {
                    if let Some(copy) = self.copy.take() {
                        canary.send_copy(copy);
                    }
                }
            }
        }
        let changed = hdrs.changed();
        let prefix = self.served_prefix(stages).map(str::to_owned);
        let action = match self.failover.as_mut() {
            Some(f) => {
                f.on_request_headers(&Host, hdrs, end_of_stream, prefix.as_deref(), clock.get())
            }
            None => Action::Continue,
        };
        if action == Action::Pause {
            return self.replied();
        }
        // Failover always writes its header; the others only when they
        // decided (or stripped a client's).
        if changed || self.failover.is_some() {
            clear_route_cache();
        }
        Action::Continue
    }

    fn replied(&mut self) -> Action {
        self.done = true;
        Action::Pause
    }

    fn served_prefix<'s>(&self, stages: &'s Stages) -> Option<&'s str> {
        match self.served? {
            Served::Router(m, v) => stages.router.as_ref()?.served_by(m, v),
            Served::Canary(s, v) => stages.canary.as_ref()?.served_by(s, v),
        }
    }

    fn response_action(&self) -> Action {
        if self.failover.as_ref().is_some_and(failover::Stage::holding) {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}
