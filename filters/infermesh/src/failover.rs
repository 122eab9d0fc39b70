//! The failover stage: the host side of `filter_core::failover`.
//!
//! **The first try is Envoy's.** Per request the stage picks the first
//! healthy cloud the residency rule allows, writes it to
//! `x-infermesh-cloud`, and lets the route carry the request to that
//! cloud's cluster: the common case costs a header and streams both ways.
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
//! cancel one) and only its health signal is kept. Try timeouts, hedge
//! delays and the total deadline start when the request body is complete.
//! Losing a hedge race is not a failure (a stalled proxy makes every cloud
//! late); a hung cloud leaves by its try timeout and its probes, and until
//! then every request to it is hedged.
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

use filter_core::config::failover::{FailoverConfig, HedgeDelay};
use filter_core::failover::attempts::{self, Attempts, Body, GiveUp, Next};
use filter_core::failover::health::{self, Record, Update};
use filter_core::failover::latency::{hedge_delay_ms, LatencyTracker};
use filter_core::failover::{self as core, CloudSet, Failure, NoCloud};
use filter_core::{headers, oip};
use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::{Action, Bytes, MapType, Status};

use crate::failover_metrics::{Metrics, TryKind};
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
    Probe {
        cloud: usize,
        seq: u32,
    },
    Try {
        context_id: u32,
        cloud: usize,
        kind: TryKind,
        started_ms: u64,
        timeout_ms: u64,
    },
}

/// A probe round this VM runs for one cloud.
#[derive(Debug, Clone, Copy)]
struct Round {
    seq: u32,
    pending: usize,
    failed: bool,
}

/// One request in flight: its tries, its buffered copy, its timers.
struct Flight {
    context_id: u32,
    attempts: Attempts,
    first: usize,
    started_ms: u64,
    model: Option<String>,
    /// `model/version` the stages ahead chose, for a reply's served-by.
    served_prefix: Option<String>,
    /// The request headers as they went upstream (for callouts).
    headers: Vec<(String, Bytes)>,
    body: Vec<u8>,
    body_state: Body,
    /// The whole request went upstream: the timers run.
    request_complete: bool,
    hedge_policy: Option<HedgeDelay>,
    /// The try Envoy routed has not answered and was not abandoned.
    routed_live: bool,
    routed_deadline_ms: u64,
    deadline_ms: u64,
    hedge_at_ms: Option<u64>,
    /// The routed try's failure response is paused at its headers.
    held: bool,
    /// The filter sent its own reply: nothing more to do.
    replied: bool,
    /// Every failed try, for the give-up body (bounded by max_attempts).
    failures: Vec<(usize, Failure)>,
}

impl Flight {
    fn next_due_ms(&self) -> u64 {
        if self.replied {
            return u64::MAX;
        }
        let mut due = self.deadline_ms;
        if self.routed_live {
            due = due.min(self.routed_deadline_ms);
        }
        if let Some(at) = self.hedge_at_ms {
            due = due.min(at);
        }
        due
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// How a failed try ended for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Another try is running (started now, or earlier).
    Trying,
    /// No more tries: the failure stands.
    GaveUp(GiveUp),
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
    flights: RefCell<BTreeMap<u32, Rc<RefCell<Flight>>>>,
    calls: RefCell<HashMap<u32, Call>>,
    rounds: RefCell<Vec<Option<Round>>>,
}

impl Shared {
    fn cloud_name(&self, cloud: usize) -> &str {
        self.cfg.cloud_name(cloud)
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

    /// The whole request went upstream at `now`: the total deadline, the
    /// routed try's timeout and the hedge delay start here, as Envoy's own
    /// try timeouts do (a slow upload is not the cloud's fault).
    fn request_complete(&self, fl: &mut Flight, now: u64) {
        fl.request_complete = true;
        fl.attempts.start_clock(now);
        fl.started_ms = now;
        fl.deadline_ms = fl.attempts.deadline_ms(&self.cfg);
        if fl.routed_live {
            fl.routed_deadline_ms = now
                .saturating_add(self.cfg.replay.per_try_timeout_ms)
                .min(fl.deadline_ms);
            fl.hedge_at_ms = fl.hedge_policy.as_ref().map(|policy| {
                let delay = self
                    .latency
                    .borrow()
                    .get(fl.first)
                    .map_or(0, |t| hedge_delay_ms(policy, t));
                now.saturating_add(delay)
            });
        }
    }

    fn record_latency(&self, cloud: usize, ms: u64) {
        if let Some(t) = self.latency.borrow_mut().get_mut(cloud) {
            t.record(ms);
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

    // ---- tries ----------------------------------------------------------

    /// A try to `cloud` failed: record it, then replay, wait or give up.
    fn fail(&self, f: &Rc<RefCell<Flight>>, cloud: usize, failure: Failure, now: u64) -> After {
        self.metrics.failure(cloud, failure);
        self.live(cloud, false, now);
        let next = {
            let mut fl = f.borrow_mut();
            fl.failures.push((cloud, failure));
            fl.attempts.on_upstream_failure(
                &self.cfg,
                now,
                cloud,
                failure,
                false,
                self.healthy.get(),
            )
        };
        self.act(f, next, TryKind::Replay, now)
    }

    fn act(&self, f: &Rc<RefCell<Flight>>, next: Next, kind: TryKind, now: u64) -> After {
        match next {
            Next::ReplayTo { cloud, timeout_ms } => self.start_try(f, cloud, kind, timeout_ms, now),
            Next::Wait => After::Trying,
            Next::GiveUp(reason) => {
                self.metrics.give_up(reason);
                After::GaveUp(reason)
            }
        }
    }

    /// Sends the buffered request to `cloud` as a callout.
    fn start_try(
        &self,
        f: &Rc<RefCell<Flight>>,
        cloud: usize,
        kind: TryKind,
        timeout_ms: u64,
        now: u64,
    ) -> After {
        let Some(c) = self.cfg.clouds.get(cloud) else {
            return After::GaveUp(GiveUp::NoCloudLeft);
        };
        let sent = {
            let fl = f.borrow();
            let pinned = pinned_path(&fl);
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
            let body = (!fl.body.is_empty()).then_some(fl.body.as_slice());
            hostcalls::dispatch_http_call(
                &c.cluster,
                hdrs,
                body,
                vec![],
                Duration::from_millis(timeout_ms),
            )
        };
        match sent {
            Ok(token) => {
                let context_id = f.borrow().context_id;
                self.calls.borrow_mut().insert(
                    token,
                    Call::Try {
                        context_id,
                        cloud,
                        kind,
                        started_ms: now,
                        timeout_ms,
                    },
                );
                self.metrics.try_(cloud, kind);
                debug!("infermesh failover: {} to cloud {}", kind.as_str(), c.name);
                After::Trying
            }
            Err(status) => {
                warn!(
                    "infermesh failover: cannot call cloud {} (cluster {}): {status:?}",
                    c.name, c.cluster
                );
                self.fail(f, cloud, Failure::ConnectFailure, now)
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
        match call {
            Call::Probe { cloud, seq } => {
                self.on_probe_response(cloud, seq, status == Some(200), now);
            }
            Call::Try {
                context_id,
                cloud,
                kind,
                started_ms,
                timeout_ms,
            } => {
                let flight = self.flights.borrow().get(&context_id).cloned();
                match status {
                    Some(s) if s < 500 => {
                        self.live(cloud, true, now);
                        self.record_latency(cloud, now.saturating_sub(started_ms));
                        let Some(f) = flight else {
                            return;
                        };
                        let wins = {
                            let mut fl = f.borrow_mut();
                            !fl.replied && fl.attempts.on_answer(cloud) == attempts::Answer::Use
                        };
                        if wins {
                            self.reply_from_callout(&f, cloud, s, kind, body_size, now);
                        }
                    }
                    _ => {
                        let failure = match status {
                            Some(_) => {
                                // Envoy's own answers are short; 256 bytes
                                // tell them from an upstream's 5xx.
                                let head = hostcalls::get_buffer(
                                    proxy_wasm::types::BufferType::HttpCallResponseBody,
                                    0,
                                    body_size.min(256),
                                )
                                .ok()
                                .flatten()
                                .unwrap_or_default();
                                Failure::from_callout_body(&head)
                            }
                            None if now.saturating_sub(started_ms) + TICK_MS >= timeout_ms => {
                                Failure::Timeout
                            }
                            None => Failure::Reset,
                        };
                        let Some(f) = flight else {
                            self.metrics.failure(cloud, failure);
                            self.live(cloud, false, now);
                            return;
                        };
                        if f.borrow().replied {
                            return;
                        }
                        if let After::GaveUp(reason) = self.fail(&f, cloud, failure, now) {
                            self.finish_failed(&f, reason);
                        }
                    }
                }
            }
        }
    }

    /// Answers the request with a callout's response.
    fn reply_from_callout(
        &self,
        f: &Rc<RefCell<Flight>>,
        cloud: usize,
        status: u32,
        kind: TryKind,
        body_size: usize,
        now: u64,
    ) {
        let resp_headers =
            hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default();
        let body = hostcalls::get_buffer(
            proxy_wasm::types::BufferType::HttpCallResponseBody,
            0,
            body_size,
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        let (context_id, served_by, outcome, first) = {
            let mut fl = f.borrow_mut();
            fl.replied = true;
            fl.held = false;
            (
                fl.context_id,
                self.compose_served_by(&fl, cloud),
                fl.attempts.outcome(),
                fl.first,
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
        self.metrics.request(cloud, outcome);
        if kind == TryKind::Hedge {
            // The slow cloud's time is at least this: without it the
            // derived delay would only see fast answers and shrink.
            let started = f.borrow().started_ms;
            self.record_latency(first, now.saturating_sub(started));
        }
        debug!(
            "infermesh failover: {how} to {} after {} failed or was slow",
            self.cloud_name(cloud),
            self.cloud_name(first)
        );
        if hostcalls::set_effective_context(context_id).is_ok() {
            let _ = hostcalls::send_http_response(status, out, Some(&body));
        }
        self.flights.borrow_mut().remove(&context_id);
    }

    /// No try succeeded: pass the held failure on, or answer with an error.
    fn finish_failed(&self, f: &Rc<RefCell<Flight>>, reason: GiveUp) {
        let (context_id, held, routed_live) = {
            let fl = f.borrow();
            (fl.context_id, fl.held, fl.routed_live)
        };
        if routed_live && !held {
            // The routed try still runs; its answer decides.
            return;
        }
        {
            let mut fl = f.borrow_mut();
            fl.replied = true;
            fl.held = false;
            self.metrics.request(fl.first, core::Outcome::Failed);
        }
        if hostcalls::set_effective_context(context_id).is_err() {
            return;
        }
        if held {
            if self.served_by_header {
                let fl = f.borrow();
                let value = self.compose_served_by(&fl, fl.first);
                let _ = hostcalls::set_map_value(
                    MapType::HttpResponseHeaders,
                    headers::SERVED_BY,
                    Some(&value),
                );
            }
            let _ = hostcalls::resume_http_response();
        } else {
            let fl = f.borrow();
            let (status, body) =
                core::give_up_response(&self.cfg, fl.model.as_deref(), &fl.failures, reason);
            let _ = hostcalls::send_http_response(
                status,
                vec![("content-type", "application/json")],
                Some(&body),
            );
        }
        self.flights.borrow_mut().remove(&context_id);
    }

    /// `model/version@cloud` with what the stages ahead chose, else
    /// `@cloud`.
    fn compose_served_by(&self, fl: &Flight, cloud: usize) -> String {
        let at = self.served_by.get(cloud).map_or("@?", String::as_str);
        format!("{}{at}", fl.served_prefix.as_deref().unwrap_or_default())
    }

    // ---- timers ---------------------------------------------------------

    fn tick_flights(&self, now: u64) {
        let due: Vec<Rc<RefCell<Flight>>> = self
            .flights
            .borrow()
            .values()
            .filter(|f| f.borrow().next_due_ms() <= now)
            .cloned()
            .collect();
        for f in due {
            self.on_timer(&f, now);
        }
    }

    fn on_timer(&self, f: &Rc<RefCell<Flight>>, now: u64) {
        let (deadline, routed_expired, hedge_due, first) = {
            let fl = f.borrow();
            (
                now >= fl.deadline_ms,
                fl.routed_live && now >= fl.routed_deadline_ms,
                fl.hedge_at_ms.is_some_and(|at| now >= at),
                fl.first,
            )
        };
        if deadline {
            self.metrics.give_up(GiveUp::Deadline);
            {
                let mut fl = f.borrow_mut();
                fl.routed_live = false;
                fl.hedge_at_ms = None;
            }
            self.finish_failed(f, GiveUp::Deadline);
            return;
        }
        if routed_expired {
            {
                let mut fl = f.borrow_mut();
                fl.routed_live = false;
                fl.hedge_at_ms = None;
            }
            if let After::GaveUp(reason) = self.fail(f, first, Failure::Timeout, now) {
                self.finish_failed(f, reason);
            }
            return;
        }
        if hedge_due {
            let next = {
                let mut fl = f.borrow_mut();
                fl.hedge_at_ms = None;
                fl.attempts.on_hedge_due(&self.cfg, now, self.healthy.get())
            };
            match next {
                Next::ReplayTo { .. } => {
                    // Being slower than the delay is not counted as a
                    // failure: when the proxy itself stalls, every cloud
                    // is late, and ejecting them one after another would
                    // cascade. A hung cloud goes out by its try timeout
                    // and its probes; until then hedges hide it.
                    self.act(f, next, TryKind::Hedge, now);
                }
                // A hedge that cannot go out is not a request giving up.
                Next::GiveUp(_) | Next::Wait => {}
            }
        }
    }
}

/// The request's OIP path with the version canary or model-router chose
/// (`x-infermesh-version`) written into it, so a replay or hedge reaches
/// that version on a cloud whose routing does not look at the header;
/// `None` to send the path unchanged.
fn pinned_path(fl: &Flight) -> Option<String> {
    let version = std::str::from_utf8(fl.header(headers::VERSION)?).ok()?;
    let path = fl.header(":path")?;
    let parsed = oip::parse_path(path)?;
    oip::with_version(path, &parsed, version)
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
    cfg: FailoverConfig,
    served_by_header: bool,
) -> Result<Rc<Shared>, Status> {
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
    flight: Option<Rc<RefCell<Flight>>>,
    /// The body was over `max_body_bytes`: say so on the response.
    not_buffered: bool,
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
            not_buffered: false,
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
        let residency = cfg.residency.header.as_deref().and_then(|h| hdrs.get(h));
        let scope = core::scope(cfg, residency);
        let path = hdrs.get(":path").unwrap_or_default();
        // Client copies were stripped unless every stage trusts them; what
        // remains is model-router's decision or a trusted header.
        let model_header = hdrs.get(headers::MODEL);

        let Some(first) = core::pick(cfg, scope.allowed, shared.healthy.get(), CloudSet::EMPTY)
        else {
            let reason = NoCloud::of(&scope);
            shared.metrics.no_cloud(reason);
            let model = oip::parse_path(path).map(|p| p.model).or_else(|| {
                model_header
                    .and_then(|m| std::str::from_utf8(m).ok())
                    .map(str::to_owned)
            });
            let body = core::no_cloud_body(cfg, model.as_deref(), &scope, residency);
            debug!("infermesh failover: no cloud: {}", reason.as_str());
            filter_shim::send_json_error(ctx, core::NO_CLOUD_STATUS, &body);
            return Action::Pause;
        };
        let Some(cloud) = cfg.clouds.get(first) else {
            return Action::Continue;
        };

        let class = attempts::classify(
            cfg,
            hdrs.get(":method").unwrap_or_default(),
            path,
            model_header,
        );
        let content_length = hdrs
            .get("content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        hdrs.set(ctx, headers::CLOUD, &cloud.name);
        let mut attempts = Attempts::start(now, first, scope.allowed, &class);
        let body_state = if end_of_stream {
            Body::Complete(0)
        } else if content_length.is_some_and(|n| !attempts::may_buffer(cfg, n)) {
            shared.metrics.not_buffered();
            self.not_buffered = true;
            Body::TooLarge
        } else {
            Body::Incomplete
        };
        attempts.set_body(body_state);
        let flight = Rc::new(RefCell::new(Flight {
            context_id: self.context_id,
            attempts,
            first,
            started_ms: now,
            model: class.model,
            served_prefix: served_prefix.map(str::to_owned),
            headers: hdrs.into_list(),
            body: Vec::new(),
            body_state,
            request_complete: false,
            hedge_policy: class.hedge,
            routed_live: true,
            // Set when the request is complete (below, or when its body or
            // trailers end).
            routed_deadline_ms: u64::MAX,
            deadline_ms: u64::MAX,
            hedge_at_ms: None,
            held: false,
            replied: false,
            failures: Vec::new(),
        }));
        if end_of_stream {
            shared.request_complete(&mut flight.borrow_mut(), now);
        }
        shared
            .flights
            .borrow_mut()
            .insert(self.context_id, flight.clone());
        self.flight = Some(flight);
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
        let shared = &self.shared;
        let mut fl = f.borrow_mut();
        if fl.replied {
            return;
        }
        if fl.body_state == Body::Incomplete {
            if attempts::may_buffer(&shared.cfg, fl.body.len().saturating_add(body_size)) {
                if body_size > 0 {
                    if let Some(chunk) = ctx.get_http_request_body(0, body_size) {
                        fl.body.extend_from_slice(&chunk);
                    }
                }
                if end_of_stream {
                    let state = Body::Complete(fl.body.len());
                    fl.body_state = state;
                    fl.attempts.set_body(state);
                }
            } else {
                fl.body = Vec::new();
                fl.body_state = Body::TooLarge;
                fl.attempts.set_body(Body::TooLarge);
                shared.metrics.not_buffered();
                self.not_buffered = true;
            }
        }
        if end_of_stream && !fl.request_complete {
            shared.request_complete(&mut fl, now());
        }
    }

    /// Request trailers: the request is complete.
    pub fn on_request_trailers(&mut self, now: impl FnOnce() -> u64) {
        let Some(f) = self.flight.clone() else {
            return;
        };
        let mut fl = f.borrow_mut();
        if fl.body_state == Body::Incomplete {
            let state = Body::Complete(fl.body.len());
            fl.body_state = state;
            fl.attempts.set_body(state);
        }
        if !fl.request_complete {
            self.shared.request_complete(&mut fl, now());
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
            .is_some_and(|f| matches!(f.try_borrow(), Ok(fl) if fl.held && !fl.replied))
    }

    /// The routed try's response headers. `Pause` holds a failure while a
    /// replay runs. On a response that passes through, returns the cloud
    /// that served it in `served_at` (`@cloud`).
    pub fn on_response_headers(
        &mut self,
        ctx: &dyn HttpContext,
        now: u64,
        served_at: &mut Option<usize>,
    ) -> Action {
        let Some(f) = self.flight.clone() else {
            return Action::Continue;
        };
        let shared = self.shared.clone();
        if f.borrow().replied {
            // The filter's own reply (a hedge or replay answer, or an
            // error): its headers were set when it was sent.
            return Action::Continue;
        }
        let status = ctx
            .get_http_response_header_bytes(":status")
            .and_then(|v| {
                std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
            })
            .unwrap_or(0);
        let (first, was_live, started) = {
            let mut fl = f.borrow_mut();
            let was_live = fl.routed_live;
            fl.routed_live = false;
            fl.hedge_at_ms = None;
            (fl.first, was_live, fl.started_ms)
        };

        if Failure::from_status(status).is_some() {
            let details = hostcalls::get_property(vec!["response", "code_details"])
                .ok()
                .flatten()
                .unwrap_or_default();
            let failure = Failure::from_details(&details);
            f.borrow_mut().held = true;
            let after = if was_live {
                shared.fail(&f, first, failure, now)
            } else {
                // Abandoned after its try timeout; a replay is running.
                After::Trying
            };
            if after == After::Trying {
                return Action::Pause;
            }
            {
                let mut fl = f.borrow_mut();
                fl.replied = true;
                fl.held = false;
            }
            shared.metrics.request(first, core::Outcome::Failed);
            shared.flights.borrow_mut().remove(&self.context_id);
            self.finish_response(ctx, first, served_at);
            return Action::Continue;
        }

        let answer = f.borrow_mut().attempts.on_answer(first);
        if answer == attempts::Answer::Use {
            // A late answer after the try timeout was already counted as a
            // failure; it is used, not counted again.
            if was_live {
                shared.live(first, true, now);
                shared.record_latency(first, now.saturating_sub(started));
            }
            let outcome = f.borrow().attempts.outcome();
            shared.metrics.request(first, outcome);
        }
        f.borrow_mut().replied = true;
        shared.flights.borrow_mut().remove(&self.context_id);
        self.finish_response(ctx, first, served_at);
        Action::Continue
    }

    /// A response that passes through: which cloud served it, and whether
    /// it could have been replayed.
    fn finish_response(&self, ctx: &dyn HttpContext, cloud: usize, served_at: &mut Option<usize>) {
        *served_at = Some(cloud);
        if self.not_buffered {
            ctx.set_http_response_header(REPLAY_HEADER, Some("off; body over max_body_bytes"));
        }
    }

    /// The stage answered the request itself (a replay, a hedge or an
    /// error): the reply's headers are set.
    pub fn replied(&self) -> bool {
        self.flight
            .as_ref()
            .is_some_and(|f| matches!(f.try_borrow(), Ok(fl) if fl.replied))
    }

    /// `@cloud` of a cloud index.
    pub fn served_at(&self, cloud: usize) -> Option<&str> {
        self.shared.served_by.get(cloud).map(String::as_str)
    }
}
