//! infermesh failover filter: the proxy-wasm shim over `filter_core::failover`.
//!
//! **The first try is Envoy's.** Per request the filter picks the first
//! healthy cloud the residency rule allows, writes it to
//! `x-infermesh-cloud`, clears the route cache, and lets the route carry
//! the request to that cloud's cluster: the common case costs a header and
//! streams both ways.
//!
//! **Replays and hedges are callouts.** A failed first try (connect
//! failure, reset, 5xx, timeout) is held at the response headers, and the
//! buffered request goes to the next allowed cloud with `dispatch_http_call`;
//! its answer goes downstream as the filter's reply. Envoy retries cannot
//! do this: a retry stays on the route's cluster, while the next cloud is
//! another cluster, and a route cannot be re-picked once the request went
//! upstream. A hedge is the same callout, started from the root context's
//! tick when the first try is slower than the hedge delay; whichever
//! answers first wins. When a callout wins, Envoy resets the routed try as
//! the reply goes out; a losing callout runs to its end (proxy-wasm cannot
//! cancel one) and only its health signal is kept.
//!
//! **The lifecycle is the core's.** Each request is a
//! [`filter_core::failover::flight::Flight`]: this shim turns host
//! callbacks into its events and its effects into host calls (callouts,
//! pausing, resuming or replacing the response), and records its signals
//! (health, latency, metrics).
//!
//! **Health is shared.** Every worker VM keeps the same per-cloud
//! [`Record`]s in shared data (compare-and-swap updates), fed by readiness
//! probes (claimed so that one worker probes per round) and by live
//! outcomes; each VM caches the healthy set, refreshed every few ticks and
//! on every update it makes itself.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod metrics;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Duration;

use filter_core::config::failover::FailoverConfig;
use filter_core::failover::flight::{
    self, Answer, Effect, Env, Flight, Out, Request, Signal, Start, Try, TryKind,
};
use filter_core::failover::health::{self, Record, Update};
use filter_core::failover::latency::LatencyTracker;
use filter_core::failover::CloudSet;
use filter_core::headers;
use filter_shim::{clear_route_cache, now_ms};
use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, Bytes, ContextType, LogLevel, MapType};

use metrics::Metrics;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(FailoverRoot { id, shared: None, ticks: 0 })
    });
}}

/// Root tick: hedge and try-timeout resolution is this fine.
const TICK_MS: u64 = 10;
/// The healthy set is re-read from shared data every this many ticks (and
/// after every update this VM makes).
const REFRESH_TICKS: u32 = 5;
/// Compare-and-swap attempts before an update is dropped.
const CAS_TRIES: usize = 8;
/// Response header saying the answer came from a replay or a hedge.
const FAILOVER_HEADER: &str = "x-infermesh-failover";
/// Response header saying the request could not have been replayed.
const REPLAY_HEADER: &str = "x-infermesh-replay";
/// Request headers not copied into a callout: hop-by-hop ones, and those
/// Envoy derives (`content-length` from the body, `:authority` from the
/// cloud).
const NOT_FORWARDED: &[&str] = &[
    ":authority",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "expect",
    headers::CLOUD,
];
/// Response headers not copied from a callout answer into the reply.
const NOT_RETURNED: &[&str] = &[
    ":status",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    headers::SERVED_BY,
];

/// What a callout token is for.
#[derive(Debug, Clone, Copy)]
enum Call {
    Probe { cloud: usize, seq: u32 },
    Try { context_id: u32, try_: Try },
}

/// A probe round this VM runs for one cloud.
#[derive(Debug, Clone, Copy)]
struct Round {
    seq: u32,
    pending: usize,
    failed: bool,
}

/// One request in flight: the core's flight and what only the host has.
struct InFlight {
    context_id: u32,
    flight: Flight,
    /// The request headers as they went upstream (for callouts and the
    /// reply's `served-by`).
    headers: Vec<(String, Bytes)>,
}

impl InFlight {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Where effects are carried out: in the routed response's headers
/// callback (which answers with an `Action`), or elsewhere (a tick, a
/// callout answer), through the stream's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    ResponseHeaders,
    /// A callout answer; its body is this long.
    Callout {
        body_size: usize,
    },
    Tick,
}

/// State every context of one VM shares.
struct Shared {
    cfg: FailoverConfig,
    metrics: Metrics,
    root_id: u32,
    keys: Vec<String>,
    fingerprints: Vec<u32>,
    /// `@cloud` per cloud, for `x-infermesh-served-by`.
    served_by: Vec<String>,
    /// Healthy clouds as this VM last saw them.
    healthy: Cell<CloudSet>,
    /// Clouds whose record had no live failure pending: a live success
    /// then changes nothing and needs no shared-data write.
    clean: Cell<CloudSet>,
    latency: RefCell<Vec<LatencyTracker>>,
    flights: RefCell<BTreeMap<u32, Rc<RefCell<InFlight>>>>,
    calls: RefCell<HashMap<u32, Call>>,
    rounds: RefCell<Vec<Option<Round>>>,
}

impl Shared {
    fn cloud_name(&self, cloud: usize) -> &str {
        self.cfg.cloud_name(cloud)
    }

    /// Runs one event of a flight with this VM's health and latency view.
    fn event<R>(&self, f: impl FnOnce(&Env) -> R) -> R {
        let latency = self.latency.borrow();
        let env = Env {
            cfg: &self.cfg,
            healthy: self.healthy.get(),
            latency: &latency,
        };
        f(&env)
    }

    /// Read–modify–write of a cloud's shared record; `f` may run more than
    /// once (on a CAS mismatch). Returns the record as written or read, or
    /// `None` if shared data failed or every CAS lost.
    fn update(&self, cloud: usize, mut f: impl FnMut(&mut Record) -> Update) -> Option<Record> {
        let key = self.keys.get(cloud)?;
        let fp = *self.fingerprints.get(cloud)?;
        for _ in 0..CAS_TRIES {
            let (bytes, cas) = hostcalls::get_shared_data(key).ok()?;
            let mut rec = Record::decode_or_fresh(bytes.as_deref(), fp);
            let update = f(&mut rec);
            if update != Update::Unchanged {
                match hostcalls::set_shared_data(key, Some(&rec.encode(fp)), cas) {
                    Ok(()) => {}
                    Err(_) => continue,
                }
            }
            if let Update::Transition { to, cause } = update {
                self.metrics.transition(cloud, to, cause);
                info!(
                    "infermesh failover: cloud {} is now {} ({})",
                    self.cloud_name(cloud),
                    to.as_str(),
                    cause.as_str()
                );
            }
            self.observe(cloud, &rec);
            return Some(rec);
        }
        debug!(
            "infermesh failover: health update of {} lost {CAS_TRIES} CAS races; dropped",
            self.cloud_name(cloud)
        );
        None
    }

    /// Takes a record's state into this VM's cache.
    fn observe(&self, cloud: usize, rec: &Record) {
        let mut healthy = self.healthy.get();
        let was = healthy.contains(cloud);
        if rec.is_healthy() {
            healthy.insert(cloud);
        } else {
            healthy.remove(cloud);
        }
        self.healthy.set(healthy);
        if was != rec.is_healthy() {
            self.metrics.set_healthy(cloud, rec.is_healthy());
        }
        let mut clean = self.clean.get();
        if rec.live_failures == 0 {
            clean.insert(cloud);
        } else {
            clean.remove(cloud);
        }
        self.clean.set(clean);
    }

    /// Re-reads every cloud's record.
    fn refresh(&self) {
        for cloud in 0..self.cfg.clouds.len() {
            let (Some(key), Some(&fp)) = (self.keys.get(cloud), self.fingerprints.get(cloud))
            else {
                continue;
            };
            if let Ok((bytes, _)) = hostcalls::get_shared_data(key) {
                self.observe(cloud, &Record::decode_or_fresh(bytes.as_deref(), fp));
            }
        }
    }

    /// A live outcome for `cloud`.
    fn live(&self, cloud: usize, ok: bool, now: u64) {
        let passive = &self.cfg.health.passive;
        if ok && passive.failure_rate.is_none() && self.clean.get().contains(cloud) {
            return;
        }
        self.update(cloud, |r| r.on_live_result(passive, now, ok));
    }

    fn record_latency(&self, cloud: usize, ms: u64) {
        if let Some(t) = self.latency.borrow_mut().get_mut(cloud) {
            t.record(ms);
        }
    }

    /// Records what a flight signalled.
    fn record(&self, signals: &[Signal], now: u64) {
        for s in signals {
            match *s {
                Signal::Live { cloud, ok } => self.live(cloud, ok, now),
                Signal::Latency { cloud, ms } => self.record_latency(cloud, ms),
                Signal::Failed { cloud, failure } => self.metrics.failure(cloud, failure),
                Signal::GaveUp(reason) => self.metrics.give_up(reason),
                Signal::Finished { cloud, outcome } => self.metrics.request(cloud, outcome),
                Signal::NotBuffered => self.metrics.not_buffered(),
            }
        }
    }

    // ---- probes ---------------------------------------------------------

    fn tick_probes(&self, now: u64) {
        let probe = &self.cfg.health.probe;
        for cloud in 0..self.cfg.clouds.len() {
            let mut claimed = None;
            let written = self.update(cloud, |r| {
                claimed = r.claim_probe(probe, now);
                if claimed.is_some() {
                    Update::Changed
                } else {
                    Update::Unchanged
                }
            });
            if let (Some(_), Some(seq)) = (written, claimed) {
                self.start_round(cloud, seq, now);
            }
        }
    }

    fn start_round(&self, cloud: usize, seq: u32, now: u64) {
        let Some(c) = self.cfg.clouds.get(cloud) else {
            return;
        };
        let probe = &self.cfg.health.probe;
        let mut round = Round {
            seq,
            pending: 0,
            failed: false,
        };
        for path in &probe.paths {
            let sent = hostcalls::dispatch_http_call(
                &c.cluster,
                vec![
                    (":method", "GET"),
                    (":path", path),
                    (":authority", &c.authority),
                    ("user-agent", "infermesh-failover-probe"),
                ],
                None,
                vec![],
                Duration::from_millis(probe.timeout_ms),
            );
            match sent {
                Ok(token) => {
                    self.calls
                        .borrow_mut()
                        .insert(token, Call::Probe { cloud, seq });
                    round.pending += 1;
                }
                Err(status) => {
                    warn!(
                        "infermesh failover: cannot probe cloud {} (cluster {}): {status:?}",
                        c.name, c.cluster
                    );
                    round.failed = true;
                }
            }
        }
        if round.pending == 0 {
            self.end_round(cloud, seq, false, now);
        } else if let Some(slot) = self.rounds.borrow_mut().get_mut(cloud) {
            *slot = Some(round);
        }
    }

    fn on_probe_response(&self, cloud: usize, seq: u32, ok: bool, now: u64) {
        let done = {
            let mut rounds = self.rounds.borrow_mut();
            let Some(slot) = rounds.get_mut(cloud) else {
                return;
            };
            match slot {
                Some(r) if r.seq == seq => {
                    r.pending = r.pending.saturating_sub(1);
                    r.failed |= !ok;
                    if r.pending == 0 {
                        let failed = r.failed;
                        *slot = None;
                        Some(!failed)
                    } else {
                        None
                    }
                }
                _ => None,
            }
        };
        if let Some(ok) = done {
            self.end_round(cloud, seq, ok, now);
        }
    }

    fn end_round(&self, cloud: usize, seq: u32, ok: bool, now: u64) {
        self.metrics.probe(cloud, ok);
        let probe = &self.cfg.health.probe;
        self.update(cloud, |r| r.on_probe_result(probe, now, seq, ok));
    }

    // ---- flights --------------------------------------------------------

    /// Records an event's signals and carries out its effects at `site`.
    /// Returns the cloud whose routed response may pass (response headers
    /// only; the caller adds its headers).
    fn apply(&self, f: &Rc<RefCell<InFlight>>, out: Out, now: u64, site: Site) -> Option<usize> {
        self.record(&out.signals, now);
        let mut pass = None;
        for effect in out.effects {
            match effect {
                Effect::Dispatch(t) => {
                    if !self.start_try(f, t) {
                        let mut again = Out::default();
                        self.event(|env| {
                            f.borrow_mut()
                                .flight
                                .on_dispatch_failed(env, now, &t, &mut again)
                        });
                        pass = self.apply(f, again, now, site).or(pass);
                    }
                }
                // The headers callback pauses while the flight holds.
                Effect::Hold => {}
                Effect::PassThrough { cloud } => pass = Some(cloud),
                Effect::Resume { cloud } if site == Site::ResponseHeaders => pass = Some(cloud),
                Effect::Resume { cloud } => self.resume(f, cloud),
                Effect::Reply {
                    cloud,
                    kind,
                    status,
                } => {
                    let body_size = match site {
                        Site::Callout { body_size } => body_size,
                        _ => 0,
                    };
                    self.reply_from_callout(f, cloud, kind, status, body_size);
                }
                Effect::ReplyError { status, body } => {
                    let context_id = f.borrow().context_id;
                    if hostcalls::set_effective_context(context_id).is_ok() {
                        let _ = hostcalls::send_http_response(
                            status,
                            vec![("content-type", "application/json")],
                            Some(&body),
                        );
                    }
                }
            }
        }
        let (done, context_id) = {
            let fl = f.borrow();
            (fl.flight.is_done(), fl.context_id)
        };
        if done {
            self.flights.borrow_mut().remove(&context_id);
        }
        pass
    }

    /// Sends the buffered request to `t.cloud` as a callout; false if the
    /// host refused it.
    fn start_try(&self, f: &Rc<RefCell<InFlight>>, t: Try) -> bool {
        let Some(c) = self.cfg.clouds.get(t.cloud) else {
            return false;
        };
        let fl = f.borrow();
        let sent = {
            let pinned = fl
                .header(":path")
                .and_then(|path| flight::pinned_path(path, fl.header(headers::VERSION)));
            let mut hdrs: Vec<(&str, &str)> = Vec::with_capacity(fl.headers.len() + 2);
            for (name, value) in &fl.headers {
                if NOT_FORWARDED.contains(&name.as_str()) {
                    continue;
                }
                if let (":path", Some(p)) = (name.as_str(), pinned.as_deref()) {
                    hdrs.push((":path", p));
                    continue;
                }
                // Callout headers are strings; a value that is not UTF-8
                // is left out rather than mangled.
                if let Ok(v) = std::str::from_utf8(value) {
                    hdrs.push((name.as_str(), v));
                }
            }
            hdrs.push((":authority", &c.authority));
            hdrs.push((headers::CLOUD, &c.name));
            let body = fl.flight.body();
            hostcalls::dispatch_http_call(
                &c.cluster,
                hdrs,
                (!body.is_empty()).then_some(body),
                vec![],
                Duration::from_millis(t.timeout_ms),
            )
        };
        match sent {
            Ok(token) => {
                self.calls.borrow_mut().insert(
                    token,
                    Call::Try {
                        context_id: fl.context_id,
                        try_: t,
                    },
                );
                self.metrics.try_(t.cloud, t.kind);
                debug!(
                    "infermesh failover: {} to cloud {}",
                    t.kind.as_str(),
                    c.name
                );
                true
            }
            Err(status) => {
                warn!(
                    "infermesh failover: cannot call cloud {} (cluster {}): {status:?}",
                    c.name, c.cluster
                );
                false
            }
        }
    }

    /// A callout answered (or failed: no headers).
    fn on_call_response(&self, token: u32, num_headers: usize, body_size: usize, now: u64) {
        let Some(call) = self.calls.borrow_mut().remove(&token) else {
            return;
        };
        let status = if num_headers > 0 {
            hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders)
                .ok()
                .and_then(|h| status_of(&h))
        } else {
            None
        };
        let (context_id, t) = match call {
            Call::Probe { cloud, seq } => {
                self.on_probe_response(cloud, seq, status == Some(200), now);
                return;
            }
            Call::Try { context_id, try_ } => (context_id, try_),
        };
        // Only a 5xx body is read: Envoy's own answers are short, and
        // their start tells them from an upstream's 5xx.
        let head = match status {
            Some(s) if s >= 500 => hostcalls::get_buffer(
                BufferType::HttpCallResponseBody,
                0,
                body_size.min(flight::ANSWER_HEAD_BYTES),
            )
            .ok()
            .flatten()
            .unwrap_or_default(),
            _ => Vec::new(),
        };
        let answer = match status {
            Some(status) => Answer::Status {
                status,
                head: &head,
            },
            None => Answer::None,
        };
        let mut out = Out::default();
        let found = self.flights.borrow().get(&context_id).cloned();
        match found {
            Some(f) => {
                self.event(|env| {
                    f.borrow_mut()
                        .flight
                        .on_callout(env, now, &t, answer, &mut out)
                });
                self.apply(&f, out, now, Site::Callout { body_size });
            }
            None => {
                flight::orphan_answer(now, &t, answer, &mut out);
                self.record(&out.signals, now);
            }
        }
    }

    /// Answers the request with the callout answer at hand.
    fn reply_from_callout(
        &self,
        f: &Rc<RefCell<InFlight>>,
        cloud: usize,
        kind: TryKind,
        status: u32,
        body_size: usize,
    ) {
        let resp_headers =
            hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default();
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let (context_id, served_by, first) = {
            let fl = f.borrow();
            (
                fl.context_id,
                self.compose_served_by(&fl, cloud),
                fl.flight.first(),
            )
        };
        let mut out: Vec<(&str, &str)> = Vec::with_capacity(resp_headers.len() + 2);
        for (name, value) in &resp_headers {
            if NOT_RETURNED.contains(&name.as_str()) {
                continue;
            }
            if let Ok(v) = std::str::from_utf8(value) {
                out.push((name.as_str(), v));
            }
        }
        if self.cfg.served_by_header {
            out.push((headers::SERVED_BY, &served_by));
        }
        let how = match kind {
            TryKind::Hedge => "hedged",
            _ => "replayed",
        };
        out.push((FAILOVER_HEADER, how));
        debug!(
            "infermesh failover: {how} to {} after {} failed or was slow",
            self.cloud_name(cloud),
            self.cloud_name(first)
        );
        if hostcalls::set_effective_context(context_id).is_ok() {
            let _ = hostcalls::send_http_response(status, out, Some(&body));
        }
    }

    /// Lets a held failure of `cloud` go downstream (from a tick or a
    /// callout answer).
    fn resume(&self, f: &Rc<RefCell<InFlight>>, cloud: usize) {
        let context_id = f.borrow().context_id;
        if hostcalls::set_effective_context(context_id).is_err() {
            return;
        }
        if self.cfg.served_by_header {
            if let Some(at) = self.served_by.get(cloud) {
                let _ = hostcalls::set_map_value(
                    MapType::HttpResponseHeaders,
                    headers::SERVED_BY,
                    Some(at),
                );
            }
        }
        let _ = hostcalls::resume_http_response();
    }

    /// `model/version@cloud` from the request headers model-router and
    /// canary set ahead, else `@cloud`.
    fn compose_served_by(&self, fl: &InFlight, cloud: usize) -> String {
        let at = self.served_by.get(cloud).map_or("@?", String::as_str);
        match (fl.header(headers::MODEL), fl.header(headers::VERSION)) {
            (Some(m), Some(v)) => format!(
                "{}/{}{at}",
                String::from_utf8_lossy(m),
                String::from_utf8_lossy(v)
            ),
            _ => at.to_owned(),
        }
    }

    fn tick_flights(&self, now: u64) {
        let due: Vec<Rc<RefCell<InFlight>>> = self
            .flights
            .borrow()
            .values()
            .filter(|f| f.borrow().flight.next_due_ms() <= now)
            .cloned()
            .collect();
        for f in due {
            let mut out = Out::default();
            self.event(|env| f.borrow_mut().flight.on_tick(env, now, &mut out));
            self.apply(&f, out, now, Site::Tick);
        }
    }
}

/// `:status` of a header list.
fn status_of(h: &[(String, Bytes)]) -> Option<u32> {
    h.iter()
        .find(|(n, _)| n == ":status")
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
}

struct FailoverRoot {
    id: u32,
    shared: Option<Rc<Shared>>,
    ticks: u32,
}

impl Context for FailoverRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some(shared) = self.shared.clone() {
            let now = now_ms(self);
            shared.on_call_response(token_id, num_headers, body_size, now);
            let _ = hostcalls::set_effective_context(self.id);
        }
    }
}

impl RootContext for FailoverRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(cfg) = filter_shim::parse_plugin_config(
            self,
            "failover",
            filter_core::config::failover::parse,
        ) else {
            return false;
        };
        let metrics = match Metrics::define(&cfg) {
            Ok(m) => m,
            Err(status) => {
                log::error!("infermesh failover: cannot define metrics: {status:?}");
                return false;
            }
        };
        let n = cfg.clouds.len();
        let keys = cfg
            .clouds
            .iter()
            .map(|c| health::shared_key(&c.name))
            .collect();
        let fingerprints = (0..n).map(|i| health::fingerprint(&cfg, i)).collect();
        let served_by = cfg.clouds.iter().map(|c| format!("@{}", c.name)).collect();
        info!(
            "infermesh failover: configured {n} cloud(s) in pick order: {}",
            cfg.order
                .iter()
                .map(|&i| cfg.cloud_name(i))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let shared = Rc::new(Shared {
            metrics,
            root_id: self.id,
            keys,
            fingerprints,
            served_by,
            healthy: Cell::new(CloudSet::all(n)),
            clean: Cell::new(CloudSet::all(n)),
            latency: RefCell::new(vec![LatencyTracker::default(); n]),
            flights: RefCell::new(BTreeMap::new()),
            calls: RefCell::new(HashMap::new()),
            rounds: RefCell::new(vec![None; n]),
            cfg,
        });
        for cloud in 0..n {
            shared.metrics.set_healthy(cloud, true);
        }
        shared.refresh();
        self.shared = Some(shared);
        self.set_tick_period(Duration::from_millis(TICK_MS));
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let now = now_ms(self);
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(REFRESH_TICKS) {
            // Reads every record (refreshing this VM's healthy set) and
            // claims the probe rounds that are due.
            shared.tick_probes(now);
        }
        shared.tick_flights(now);
        let _ = hostcalls::set_effective_context(shared.root_id);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FailoverStream {
            context_id,
            shared: self.shared.clone(),
            flight: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct FailoverStream {
    context_id: u32,
    shared: Option<Rc<Shared>>,
    flight: Option<Rc<RefCell<InFlight>>>,
}

impl Drop for FailoverStream {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.flights.borrow_mut().remove(&self.context_id);
            // Answers to callouts of a finished stream are not delivered:
            // forget them (their health signal is lost, not their memory).
            shared.calls.borrow_mut().retain(
                |_, c| !matches!(c, Call::Try { context_id, .. } if *context_id == self.context_id),
            );
        }
    }
}

impl Context for FailoverStream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some(shared) = self.shared.clone() {
            let now = now_ms(self);
            shared.on_call_response(token_id, num_headers, body_size, now);
        }
    }
}

impl HttpContext for FailoverStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            warn!("infermesh failover: request before configuration; refusing it");
            filter_shim::send_json_error(
                self,
                503,
                br#"{"error":"failover filter is not configured"}"#,
            );
            return Action::Pause;
        };
        let cfg = &shared.cfg;

        // One read of the header map: to strip spoofed x-infermesh-*
        // headers and to keep a copy for replays. The copy must be taken
        // now: Envoy lets a filter read the request headers only during
        // this callback (a later read, e.g. when a replay starts, sees an
        // empty map).
        let mut request_headers = self.get_http_request_headers_bytes();
        if !cfg.trust_downstream_headers {
            let mut stripped = 0;
            request_headers.retain(|(name, _)| {
                if headers::is_owned(name) {
                    self.set_http_request_header(name, None);
                    stripped += 1;
                    false
                } else {
                    true
                }
            });
            if stripped > 0 {
                clear_route_cache();
                shared.metrics.stripped(stripped);
            }
        }
        let now = now_ms(self);
        let mut out = Out::default();
        let start = {
            let find = |name: &str| {
                request_headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_slice())
            };
            let req = Request::from_headers(cfg, find, end_of_stream);
            shared.event(|env| Flight::start(env, &req, now, &mut out))
        };
        let flight = match start {
            Start::Routed(flight) => flight,
            Start::NoCloud {
                reason,
                status,
                body,
            } => {
                shared.metrics.no_cloud(reason);
                debug!("infermesh failover: no cloud: {}", reason.as_str());
                filter_shim::send_json_error(self, status, &body);
                return Action::Pause;
            }
        };
        let first = flight.first();
        let Some(cloud) = cfg.clouds.get(first) else {
            return Action::Continue;
        };
        self.set_http_request_header(headers::CLOUD, Some(&cloud.name));
        clear_route_cache();
        shared.record(&out.signals, now);
        // Keep our own header in the copy: replays overwrite it anyway.
        request_headers.push((headers::CLOUD.to_owned(), cloud.name.as_bytes().to_vec()));
        let f = Rc::new(RefCell::new(InFlight {
            context_id: self.context_id,
            flight,
            headers: request_headers,
        }));
        shared
            .flights
            .borrow_mut()
            .insert(self.context_id, f.clone());
        self.flight = Some(f);
        shared.metrics.try_(first, TryKind::First);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(shared), Some(f)) = (self.shared.clone(), self.flight.clone()) else {
            return Action::Continue;
        };
        let now = now_ms(self);
        let mut out = Out::default();
        shared.event(|env| {
            f.borrow_mut().flight.on_request_body(
                env,
                now,
                body_size,
                end_of_stream,
                || self.get_http_request_body(0, body_size),
                &mut out,
            )
        });
        shared.record(&out.signals, now);
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if let (Some(shared), Some(f)) = (self.shared.clone(), self.flight.clone()) {
            let now = now_ms(self);
            shared.event(|env| f.borrow_mut().flight.on_request_trailers(env, now));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        // A held failure keeps its body too: with
        // `allow_on_headers_stop_iteration` Envoy honours the headers'
        // StopIteration, and a body callback answering Continue would let
        // the failure out while its replay runs.
        if self.holding() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.holding() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (Some(shared), Some(f)) = (self.shared.clone(), self.flight.clone()) else {
            return Action::Continue;
        };
        let now = now_ms(self);
        let status = self
            .get_http_response_header_bytes(":status")
            .and_then(|v| {
                std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
            })
            .unwrap_or(0);
        let details = || {
            hostcalls::get_property(vec!["response", "code_details"])
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let mut out = Out::default();
        shared.event(|env| {
            f.borrow_mut()
                .flight
                .on_response_headers(env, now, status, details, &mut out)
        });
        // No effect: the filter's own reply (a hedge or replay answer, or
        // an error), whose headers were set when it was sent.
        let pass = shared.apply(&f, out, now, Site::ResponseHeaders);
        if self.holding() {
            return Action::Pause;
        }
        if let Some(cloud) = pass {
            self.finish_response(&shared, cloud);
        }
        Action::Continue
    }
}

impl FailoverStream {
    /// True while a failed first response is held for a replay.
    fn holding(&self) -> bool {
        self.flight
            .as_ref()
            .is_some_and(|f| matches!(f.try_borrow(), Ok(fl) if fl.flight.holding()))
    }

    /// Headers on a response that passes through: who served it, and
    /// whether it could have been replayed.
    fn finish_response(&self, shared: &Shared, cloud: usize) {
        if shared.cfg.served_by_header {
            if let Some(at) = shared.served_by.get(cloud) {
                self.set_http_response_header(headers::SERVED_BY, Some(at));
            }
        }
        let not_buffered = self
            .flight
            .as_ref()
            .is_some_and(|f| f.borrow().flight.not_buffered());
        if not_buffered {
            self.set_http_response_header(REPLAY_HEADER, Some("off; body over max_body_bytes"));
        }
    }
}
