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

use filter_core::config::failover::{FailoverConfig, HedgeDelay};
use filter_core::failover::attempts::{self, Attempts, Body, GiveUp, Next};
use filter_core::failover::health::{self, Record, Update};
use filter_core::failover::latency::{hedge_delay_ms, LatencyTracker};
use filter_core::failover::{self as core, CloudSet, Failure, NoCloud};
use filter_core::{headers, oip};
use filter_shim::{clear_route_cache, now_ms};
use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, Bytes, ContextType, LogLevel, MapType};

use metrics::{Metrics, TryKind};

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
    /// The request headers as they went upstream (for callouts and the
    /// reply's `served-by`).
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
        if self.cfg.served_by_header {
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
            if self.cfg.served_by_header {
                let first = f.borrow().first;
                if let Some(at) = self.served_by.get(first) {
                    let _ = hostcalls::set_map_value(
                        MapType::HttpResponseHeaders,
                        headers::SERVED_BY,
                        Some(at),
                    );
                }
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

    /// `model/version@cloud` from the request headers model-router and
    /// canary set ahead, else `@cloud`.
    fn compose_served_by(&self, fl: &Flight, cloud: usize) -> String {
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
            not_buffered: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct FailoverStream {
    context_id: u32,
    shared: Option<Rc<Shared>>,
    flight: Option<Rc<RefCell<Flight>>>,
    /// The body was over `max_body_bytes`: say so on the response.
    not_buffered: bool,
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
        let find = |name: &str| {
            request_headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_slice())
        };
        let residency = cfg.residency.header.as_deref().and_then(find);
        let scope = core::scope(cfg, residency);
        let path = find(":path").unwrap_or_default();
        let model_header = if cfg.trust_downstream_headers {
            find(headers::MODEL)
        } else {
            None
        };

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
            filter_shim::send_json_error(self, core::NO_CLOUD_STATUS, &body);
            return Action::Pause;
        };
        let Some(cloud) = cfg.clouds.get(first) else {
            return Action::Continue;
        };
        self.set_http_request_header(headers::CLOUD, Some(&cloud.name));
        clear_route_cache();

        let method = find(":method").unwrap_or_default();
        let class = attempts::classify(cfg, method, path, model_header);
        let content_length = find("content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        let now = now_ms(self);
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
        // Keep our own header in the copy: replays overwrite it anyway.
        request_headers.push((headers::CLOUD.to_owned(), cloud.name.as_bytes().to_vec()));
        let flight = Rc::new(RefCell::new(Flight {
            context_id: self.context_id,
            attempts,
            first,
            started_ms: now,
            model: class.model,
            headers: request_headers,
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

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(shared), Some(f)) = (self.shared.clone(), self.flight.clone()) else {
            return Action::Continue;
        };
        let mut fl = f.borrow_mut();
        if fl.replied {
            return Action::Continue;
        }
        if fl.body_state == Body::Incomplete {
            if attempts::may_buffer(&shared.cfg, fl.body.len().saturating_add(body_size)) {
                if body_size > 0 {
                    if let Some(chunk) = self.get_http_request_body(0, body_size) {
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
            shared.request_complete(&mut fl, now_ms(self));
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if let (Some(shared), Some(f)) = (self.shared.clone(), self.flight.clone()) {
            let mut fl = f.borrow_mut();
            if fl.body_state == Body::Incomplete {
                let state = Body::Complete(fl.body.len());
                fl.body_state = state;
                fl.attempts.set_body(state);
            }
            if !fl.request_complete {
                shared.request_complete(&mut fl, now_ms(self));
            }
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
        if f.borrow().replied {
            // The filter's own reply (a hedge or replay answer, or an
            // error): its headers were set when it was sent.
            return Action::Continue;
        }
        let now = now_ms(self);
        let status = self
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
            self.finish_response(&shared, first);
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
        self.finish_response(&shared, first);
        Action::Continue
    }
}

impl FailoverStream {
    /// True while a failed first response is held for a replay.
    fn holding(&self) -> bool {
        self.flight
            .as_ref()
            .is_some_and(|f| matches!(f.try_borrow(), Ok(fl) if fl.held && !fl.replied))
    }

    /// Headers on a response that passes through: who served it, and
    /// whether it could have been replayed.
    fn finish_response(&self, shared: &Shared, cloud: usize) {
        if shared.cfg.served_by_header {
            if let Some(at) = shared.served_by.get(cloud) {
                self.set_http_response_header(headers::SERVED_BY, Some(at));
            }
        }
        if self.not_buffered {
            self.set_http_response_header(REPLAY_HEADER, Some("off; body over max_body_bytes"));
        }
    }
}
