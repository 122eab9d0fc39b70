//! The failover stage: the host side of `filter_core::failover`.
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
use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::{Action, BufferType, Bytes, MapType, Status};

use crate::failover_metrics::Metrics;
use crate::request::RequestHeaders;

/// Root tick: hedge and try-timeout resolution is this fine.
pub const TICK_MS: u64 = 10;
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
pub(crate) const NOT_FORWARDED: &[&str] = &[
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

impl Shared {
    /// `@cloud` of a cloud index.
    pub fn served_at(&self, cloud: usize) -> Option<&str> {
        self.served_by.get(cloud).map(String::as_str)
    }

    /// How many clouds the stage routes to.
    pub fn clouds(&self) -> usize {
        self.cfg.clouds.len()
    }
}

/// One request in flight: the core's flight and what only the host has.
struct InFlight {
    context_id: u32,
    flight: Flight,
    /// The request headers as they went upstream (for callouts).
    headers: Vec<(String, Bytes)>,
    /// `model/version` the stages ahead chose, for a reply's served-by.
    served_prefix: Option<String>,
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
pub struct Shared {
    cfg: FailoverConfig,
    metrics: Metrics,
    root_id: u32,
    keys: Vec<String>,
    fingerprints: Vec<u32>,
    /// `@cloud` per cloud, for `x-infermesh-served-by`.
    served_by: Vec<String>,
    /// Whether replies carry `x-infermesh-served-by` (the module's choice).
    served_by_header: bool,
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
        if self.served_by_header {
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
        if self.served_by_header {
            let value = self.compose_served_by(&f.borrow(), cloud);
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                headers::SERVED_BY,
                Some(&value),
            );
        }
        let _ = hostcalls::resume_http_response();
    }

    /// `model/version@cloud` with what the stages ahead chose, else
    /// `@cloud`.
    fn compose_served_by(&self, fl: &InFlight, cloud: usize) -> String {
        let at = self.served_by.get(cloud).map_or("@?", String::as_str);
        format!("{}{at}", fl.served_prefix.as_deref().unwrap_or_default())
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

/// Builds the stage's VM-wide state; `root_id` is the root context, made
/// effective again after every root callback.
pub fn configure(
    root_id: u32,
    mut cfg: FailoverConfig,
    served_by_header: bool,
) -> Result<Rc<Shared>, Status> {
    // In the module, client copies of x-infermesh-* were stripped before
    // the stages ran unless every stage trusts them: what the stage sees in
    // the header copy (model-router's model) is trusted.
    cfg.trust_downstream_headers = true;
    let metrics = Metrics::define(&cfg)?;
    let n = cfg.clouds.len();
    let keys = cfg
        .clouds
        .iter()
        .map(|c| health::shared_key(&c.name))
        .collect();
    let fingerprints = (0..n).map(|i| health::fingerprint(&cfg, i)).collect();
    let served_by = cfg.clouds.iter().map(|c| format!("@{}", c.name)).collect();
    info!(
        "infermesh: failover stage: {n} cloud(s) in pick order: {}",
        cfg.order
            .iter()
            .map(|&i| cfg.cloud_name(i))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let shared = Rc::new(Shared {
        metrics,
        root_id,
        keys,
        fingerprints,
        served_by,
        served_by_header,
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
    Ok(shared)
}

impl Shared {
    /// Client headers the module removed, when failover is the first stage.
    pub fn stripped(&self, n: usize) {
        self.metrics.stripped(n);
    }

    /// The root's tick (every [`TICK_MS`]); `ticks` counts them.
    pub fn on_tick(&self, now: u64, ticks: u32) {
        if ticks.is_multiple_of(REFRESH_TICKS) {
            // Reads every record (refreshing this VM's healthy set) and
            // claims the probe rounds that are due.
            self.tick_probes(now);
        }
        self.tick_flights(now);
        let _ = hostcalls::set_effective_context(self.root_id);
    }

    /// A callout answered on the root context (probes, and tries whose
    /// stream callback Envoy routes to the root).
    pub fn on_root_call_response(
        &self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        now: u64,
    ) {
        self.on_call_response(token, num_headers, body_size, now);
        let _ = hostcalls::set_effective_context(self.root_id);
    }
}

/// One stream's failover state.
pub struct Stage {
    context_id: u32,
    shared: Rc<Shared>,
    flight: Option<Rc<RefCell<InFlight>>>,
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.shared.flights.borrow_mut().remove(&self.context_id);
        // Answers to callouts of a finished stream are not delivered:
        // forget them (their health signal is lost, not their memory).
        self.shared.calls.borrow_mut().retain(
            |_, c| !matches!(c, Call::Try { context_id, .. } if *context_id == self.context_id),
        );
    }
}

impl Stage {
    pub fn new(context_id: u32, shared: Rc<Shared>) -> Stage {
        Stage {
            context_id,
            shared,
            flight: None,
        }
    }

    /// A callout of this stream answered.
    pub fn on_call_response(&self, token: u32, num_headers: usize, body_size: usize, now: u64) {
        self.shared
            .on_call_response(token, num_headers, body_size, now);
    }

    /// The request headers, after the stages ahead decided. Picks the
    /// cloud and writes `x-infermesh-cloud`; `served_prefix` is the
    /// `model/version` the stages ahead chose, for a reply's served-by.
    /// `Pause` means the stage answered (no cloud may take the request).
    pub fn on_request_headers(
        &mut self,
        ctx: &dyn HttpContext,
        mut hdrs: RequestHeaders,
        end_of_stream: bool,
        served_prefix: Option<&str>,
        now: u64,
    ) -> Action {
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        let mut out = Out::default();
        let start = {
            let req = Request::from_headers(cfg, |name| hdrs.get(name), end_of_stream);
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
                filter_shim::send_json_error(ctx, status, &body);
                return Action::Pause;
            }
        };
        let first = flight.first();
        let Some(cloud) = cfg.clouds.get(first) else {
            return Action::Continue;
        };
        hdrs.set(ctx, headers::CLOUD, &cloud.name);
        shared.record(&out.signals, now);
        let f = Rc::new(RefCell::new(InFlight {
            context_id: self.context_id,
            flight,
            headers: hdrs.into_list(),
            served_prefix: served_prefix.map(str::to_owned),
        }));
        shared
            .flights
            .borrow_mut()
            .insert(self.context_id, f.clone());
        self.flight = Some(f);
        shared.metrics.try_(first, TryKind::First);
        Action::Continue
    }

    /// Request body: keep a copy for replays (up to the cap).
    pub fn on_request_body(
        &mut self,
        ctx: &dyn HttpContext,
        body_size: usize,
        end_of_stream: bool,
        now: impl FnOnce() -> u64,
    ) {
        let Some(f) = self.flight.clone() else {
            return;
        };
        let now = now();
        let mut out = Out::default();
        self.shared.event(|env| {
            f.borrow_mut().flight.on_request_body(
                env,
                now,
                body_size,
                end_of_stream,
                || ctx.get_http_request_body(0, body_size),
                &mut out,
            )
        });
        self.shared.record(&out.signals, now);
    }

    /// Request trailers: the request is complete.
    pub fn on_request_trailers(&mut self, now: impl FnOnce() -> u64) {
        if let Some(f) = self.flight.clone() {
            let now = now();
            self.shared
                .event(|env| f.borrow_mut().flight.on_request_trailers(env, now));
        }
    }

    /// True while a failed first response is held for a replay: its body
    /// and trailers are held too (with `allow_on_headers_stop_iteration`
    /// Envoy honours the headers' StopIteration, and a body callback
    /// answering Continue would let the failure out while its replay
    /// runs).
    pub fn holding(&self) -> bool {
        self.flight
            .as_ref()
            .is_some_and(|f| matches!(f.try_borrow(), Ok(fl) if fl.flight.holding()))
    }

    /// The stage answered the request itself (a replay, a hedge or an
    /// error): the reply's headers are set.
    pub fn replied(&self) -> bool {
        self.flight
            .as_ref()
            .is_some_and(|f| matches!(f.try_borrow(), Ok(fl) if fl.flight.is_done()))
    }

    /// The routed try's response headers. `Pause` holds a failure while a
    /// replay runs. On a response that passes through, returns the cloud
    /// that served it in `served_at`. `now` and `status` (the response's
    /// `:status`) are read only for a request in flight.
    pub fn on_response_headers(
        &mut self,
        ctx: &dyn HttpContext,
        now: impl FnOnce() -> u64,
        status: impl FnOnce() -> Option<u16>,
        served_at: &mut Option<usize>,
    ) -> Action {
        let Some(f) = self.flight.clone() else {
            return Action::Continue;
        };
        let shared = self.shared.clone();
        let now = now();
        let status = status().unwrap_or(0);
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
            *served_at = Some(cloud);
            if f.borrow().flight.not_buffered() {
                ctx.set_http_response_header(REPLAY_HEADER, Some("off; body over max_body_bytes"));
            }
        }
        Action::Continue
    }

    /// `@cloud` of a cloud index.
    pub fn served_at(&self, cloud: usize) -> Option<&str> {
        self.shared.served_at(cloud)
    }
}
