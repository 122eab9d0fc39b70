//! One request's failover lifecycle as a host-free state machine.
//!
//! The shim turns host callbacks into events, each with `now_ms`, and
//! turns what comes out into host calls:
//!
//! | host callback                          | event                          |
//! |----------------------------------------|--------------------------------|
//! | request headers                        | [`Flight::start`]              |
//! | request body chunk                     | [`Flight::on_request_body`]    |
//! | request trailers                       | [`Flight::on_request_trailers`]|
//! | routed response headers                | [`Flight::on_response_headers`]|
//! | callout answer (or callout failure)    | [`Flight::on_callout`]         |
//! | `dispatch_http_call` refused a try     | [`Flight::on_dispatch_failed`] |
//! | root tick                              | [`Flight::on_tick`]            |
//!
//! Out come [`Effect`]s (what the host must do with this stream: send a
//! callout, hold or resume the routed response, reply, let it pass) and
//! [`Signal`]s (what the shim records: live health outcomes, latency
//! samples, metrics). Health and latency state stay in the shim (shared
//! data, per-VM trackers); a flight reads them through [`Env`].
//!
//! **Timers.** The total deadline, the routed try's timeout and the hedge
//! delay start when the request is complete (its last body byte or its
//! trailers went upstream), as Envoy's own try timeouts do: a slow upload
//! is not the cloud's fault. On a tick the deadline is checked first (it
//! ends the request and is not the cloud's fault), then the routed try's
//! timeout (a failure of that cloud, followed by a replay), then the hedge.
//!
//! **Ends.** Every flight ends in exactly one of: the routed response
//! passes ([`Effect::PassThrough`]), a held failure is passed on
//! ([`Effect::Resume`]), a callout's answer replaces it
//! ([`Effect::Reply`]), or the filter answers with an error
//! ([`Effect::ReplyError`]). A held response ([`Effect::Hold`]) is always
//! followed by one of the last three.

use crate::config::failover::{FailoverConfig, HedgeDelay};
use crate::{headers, oip};

use super::attempts::{self, Attempts, Body, Class, GiveUp, Next};
use super::latency::{hedge_delay_ms, LatencyTracker};
use super::{
    give_up_response, no_cloud_body, pick, scope, CloudSet, Failure, NoCloud, Outcome, Scope,
    NO_CLOUD_STATUS,
};

/// A callout that ends with no response headers this close to its
/// timeout (the host's timer resolution) timed out; earlier, it was reset.
pub const TIMEOUT_SLACK_MS: u64 = 10;

/// What failover reads from a request's headers. Built by
/// [`Request::from_headers`] in the shim and in `infermesh explain`, so
/// both read the same headers the same way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a [u8],
    pub path: &'a [u8],
    /// The residency header's value (`None`: absent, or no residency
    /// header configured). An empty value is the default rule's.
    pub residency: Option<&'a [u8]>,
    /// `x-infermesh-model` when downstream headers are trusted and the
    /// value is not empty.
    pub model_header: Option<&'a [u8]>,
    /// `content-length`, when present and a number.
    pub content_length: Option<usize>,
    /// The request has no body (headers ended the stream).
    pub end_of_stream: bool,
}

impl<'a> Request<'a> {
    /// Reads a request through `find` (a header's first value by lower-case
    /// name). An empty `x-infermesh-model` counts as absent, as everywhere
    /// a model is named.
    pub fn from_headers(
        cfg: &FailoverConfig,
        find: impl Fn(&str) -> Option<&'a [u8]>,
        end_of_stream: bool,
    ) -> Request<'a> {
        let model_header = if cfg.trust_downstream_headers {
            find(headers::MODEL).filter(|v| !v.is_empty())
        } else {
            None
        };
        Request {
            method: find(":method").unwrap_or_default(),
            path: find(":path").unwrap_or_default(),
            residency: cfg.residency.header.as_deref().and_then(&find),
            model_header,
            content_length: find("content-length")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.trim().parse::<usize>().ok()),
            end_of_stream,
        }
    }

    /// The clouds residency allows.
    pub fn scope(&self, cfg: &FailoverConfig) -> Scope {
        scope(cfg, self.residency)
    }

    /// Replay and hedge class; its `model` is the one every answer names.
    pub fn class(&self, cfg: &FailoverConfig) -> Class {
        attempts::classify(cfg, self.method, self.path, self.model_header)
    }
}

/// How a try was started; also a metric tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryKind {
    /// The request as routed by Envoy to the picked cloud.
    First,
    /// A callout after a failed try.
    Replay,
    /// A callout racing a slow try.
    Hedge,
}

impl TryKind {
    pub const ALL: [TryKind; 3] = [TryKind::First, TryKind::Replay, TryKind::Hedge];

    pub fn as_str(self) -> &'static str {
        match self {
            TryKind::First => "first",
            TryKind::Replay => "replay",
            TryKind::Hedge => "hedge",
        }
    }
}

/// A callout try. The shim keeps it with the callout's token and hands it
/// back with the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Try {
    pub cloud: usize,
    pub kind: TryKind,
    pub started_ms: u64,
    pub timeout_ms: u64,
}

/// How a callout ended, as the host saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<'a> {
    /// Response headers with this status; `head` is the start of the body
    /// (up to [`ANSWER_HEAD_BYTES`]), read only for a 5xx.
    Status { status: u32, head: &'a [u8] },
    /// No response headers: the callout timed out or was reset.
    None,
}

/// Bytes of a callout's 5xx body that tell Envoy's own answers from an
/// upstream's.
pub const ANSWER_HEAD_BYTES: usize = 256;

/// What the host must do with the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send the buffered request to `try_.cloud` as a callout with
    /// `try_.timeout_ms`; keep `try_` with its token. If the host refuses
    /// the callout, feed [`Flight::on_dispatch_failed`].
    Dispatch(Try),
    /// Pause the routed response (a failure), its body and its trailers.
    Hold,
    /// Let the held failure of `cloud` go downstream.
    Resume { cloud: usize },
    /// Answer downstream with the callout answer being handled (`status`,
    /// its headers and body) from `cloud`.
    Reply {
        cloud: usize,
        kind: TryKind,
        status: u32,
    },
    /// Answer downstream with the filter's own error.
    ReplyError { status: u32, body: Vec<u8> },
    /// Let the routed response of `cloud` go downstream.
    PassThrough { cloud: usize },
}

impl Effect {
    /// Whether this effect ends the flight.
    pub fn is_end(&self) -> bool {
        !matches!(self, Effect::Dispatch(_) | Effect::Hold)
    }
}

/// What the shim records; none changes the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A live outcome of `cloud` for its health record.
    Live { cloud: usize, ok: bool },
    /// A latency sample of `cloud`, ms, for its hedge delay.
    Latency { cloud: usize, ms: u64 },
    /// A try to `cloud` failed (metric).
    Failed { cloud: usize, failure: Failure },
    /// No further try (metric).
    GaveUp(GiveUp),
    /// The request ended (metric), counted for `cloud`.
    Finished { cloud: usize, outcome: Outcome },
    /// The body is over `max_body_bytes`: never replayed (metric; the
    /// response says so).
    NotBuffered,
}

/// What one event produced, in the order the host must act on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Out {
    pub effects: Vec<Effect>,
    pub signals: Vec<Signal>,
}

impl Out {
    fn effect(&mut self, e: Effect) {
        self.effects.push(e);
    }

    fn signal(&mut self, s: Signal) {
        self.signals.push(s);
    }
}

/// The host state a flight reads.
#[derive(Debug, Clone, Copy)]
pub struct Env<'a> {
    pub cfg: &'a FailoverConfig,
    /// Healthy clouds as the shim last saw them.
    pub healthy: CloudSet,
    /// Per-cloud latency trackers (index = cloud).
    pub latency: &'a [LatencyTracker],
}

/// How [`Flight::start`] went.
// Short-lived and moved once into the stream's state: boxing the flight
// would cost an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Start {
    /// Route the request to `flight.first()`.
    Routed(Flight),
    /// No healthy allowed cloud: answer `status` with `body`.
    NoCloud {
        reason: NoCloud,
        status: u32,
        body: Vec<u8>,
    },
}

/// How a failed try ended for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Another try is running (started now, or earlier).
    Trying,
    /// No more tries: the failure stands.
    GaveUp(GiveUp),
}

/// One request in flight: its tries, its buffered body, its timers.
#[derive(Debug, Clone)]
pub struct Flight {
    attempts: Attempts,
    first: usize,
    started_ms: u64,
    model: Option<String>,
    body: Vec<u8>,
    body_state: Body,
    /// The whole request went upstream: the timers run.
    request_complete: bool,
    hedge_policy: Option<HedgeDelay>,
    /// The hedge delay this request uses (set with its timers).
    hedge_delay_ms: u64,
    /// The try Envoy routed has not answered and was not abandoned.
    routed_live: bool,
    routed_deadline_ms: u64,
    deadline_ms: u64,
    hedge_at_ms: Option<u64>,
    /// The routed try's failure response is paused at its headers.
    held: bool,
    /// The flight ended (an end effect went out): nothing more to do.
    done: bool,
    not_buffered: bool,
    /// Every failed try, for the give-up body (bounded by max_attempts).
    failures: Vec<(usize, Failure)>,
}

impl Flight {
    /// The request's headers arrived at `now_ms`: pick the first cloud or
    /// refuse. Complete at once when `req.end_of_stream`.
    pub fn start(env: &Env, req: &Request, now_ms: u64, out: &mut Out) -> Start {
        let cfg = env.cfg;
        let scope = req.scope(cfg);
        let class = req.class(cfg);
        let Some(first) = pick(cfg, scope.allowed, env.healthy, CloudSet::EMPTY) else {
            return Start::NoCloud {
                reason: NoCloud::of(&scope),
                status: NO_CLOUD_STATUS,
                body: no_cloud_body(cfg, class.model.as_deref(), &scope, req.residency),
            };
        };
        let mut attempts = Attempts::start(now_ms, first, scope.allowed, &class);
        let body_state = if req.end_of_stream {
            Body::Complete(0)
        } else if req
            .content_length
            .is_some_and(|n| !attempts::may_buffer(cfg, n))
        {
            out.signal(Signal::NotBuffered);
            Body::TooLarge
        } else {
            Body::Incomplete
        };
        attempts.set_body(body_state);
        let mut flight = Flight {
            attempts,
            first,
            started_ms: now_ms,
            model: class.model,
            body: Vec::new(),
            body_state,
            request_complete: false,
            hedge_policy: class.hedge,
            hedge_delay_ms: 0,
            routed_live: true,
            // Set when the request is complete.
            routed_deadline_ms: u64::MAX,
            deadline_ms: u64::MAX,
            hedge_at_ms: None,
            held: false,
            done: false,
            not_buffered: body_state == Body::TooLarge,
            failures: Vec::new(),
        };
        if req.end_of_stream {
            flight.complete(env, now_ms);
        }
        Start::Routed(flight)
    }

    /// The cloud Envoy routes the request to.
    pub fn first(&self) -> usize {
        self.first
    }

    /// The model the request names, if any.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The buffered request body (empty when not buffered).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body is over `max_body_bytes`: the response should say that the
    /// request could not have been replayed.
    pub fn not_buffered(&self) -> bool {
        self.not_buffered
    }

    /// True while the routed failure is held (its body and trailers too).
    pub fn holding(&self) -> bool {
        self.held && !self.done
    }

    /// The flight ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// When the next timer falls due (`u64::MAX`: none).
    pub fn next_due_ms(&self) -> u64 {
        if self.done {
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

    /// A body chunk of `size` bytes; `read` fetches it from the host, and
    /// is called only when the chunk is buffered.
    pub fn on_request_body(
        &mut self,
        env: &Env,
        now_ms: u64,
        size: usize,
        end_of_stream: bool,
        read: impl FnOnce() -> Option<Vec<u8>>,
        out: &mut Out,
    ) {
        if self.done {
            return;
        }
        if self.body_state == Body::Incomplete {
            if attempts::may_buffer(env.cfg, self.body.len().saturating_add(size)) {
                if size > 0 {
                    if let Some(chunk) = read() {
                        self.body.extend_from_slice(&chunk);
                    }
                }
                if end_of_stream {
                    self.set_body(Body::Complete(self.body.len()));
                }
            } else {
                self.body = Vec::new();
                self.set_body(Body::TooLarge);
                self.not_buffered = true;
                out.signal(Signal::NotBuffered);
            }
        }
        if end_of_stream && !self.request_complete {
            self.complete(env, now_ms);
        }
    }

    /// The request's trailers: the request is complete.
    pub fn on_request_trailers(&mut self, env: &Env, now_ms: u64) {
        if self.body_state == Body::Incomplete {
            self.set_body(Body::Complete(self.body.len()));
        }
        if !self.request_complete {
            self.complete(env, now_ms);
        }
    }

    /// The routed try's response headers: `status`, and `details` (Envoy's
    /// `response.code_details`) read only for a 5xx. No effect: the
    /// response is the filter's own reply; let it pass untouched.
    pub fn on_response_headers(
        &mut self,
        env: &Env,
        now_ms: u64,
        status: u16,
        details: impl FnOnce() -> Vec<u8>,
        out: &mut Out,
    ) {
        if self.done {
            return;
        }
        let first = self.first;
        let was_live = self.routed_live;
        self.routed_live = false;
        self.hedge_at_ms = None;

        if Failure::from_status(status).is_some() {
            let failure = Failure::from_details(&details());
            self.held = true;
            let after = if was_live {
                self.fail(env, first, failure, now_ms, out)
            } else {
                // Abandoned after its try timeout; a replay is running.
                After::Trying
            };
            if after == After::Trying {
                out.effect(Effect::Hold);
                return;
            }
            self.held = false;
            self.end(
                Outcome::Failed,
                first,
                Effect::PassThrough { cloud: first },
                out,
            );
            return;
        }

        if self.attempts.on_answer(first) == attempts::Answer::Use {
            // A late answer after the try timeout was already counted as a
            // failure; it is used, not counted again.
            if was_live {
                out.signal(Signal::Live {
                    cloud: first,
                    ok: true,
                });
                out.signal(Signal::Latency {
                    cloud: first,
                    ms: now_ms.saturating_sub(self.started_ms),
                });
            }
            let outcome = self.attempts.outcome();
            self.end(outcome, first, Effect::PassThrough { cloud: first }, out);
        } else {
            self.done = true;
            out.effect(Effect::PassThrough { cloud: first });
        }
    }

    /// A callout `try_` ended at `now_ms` with `answer`.
    pub fn on_callout(
        &mut self,
        env: &Env,
        now_ms: u64,
        try_: &Try,
        answer: Answer,
        out: &mut Out,
    ) {
        if self.done {
            orphan_answer(now_ms, try_, answer, out);
            return;
        }
        match classify_answer(now_ms, try_, answer) {
            Ok(status) => {
                record_answer(now_ms, try_, out);
                if self.attempts.on_answer(try_.cloud) == attempts::Answer::Use {
                    self.reply_from_callout(try_, status, out);
                }
            }
            Err(failure) => {
                if let After::GaveUp(reason) = self.fail(env, try_.cloud, failure, now_ms, out) {
                    self.finish_failed(env, reason, out);
                }
            }
        }
    }

    /// The host refused to start `try_` (e.g. unknown cluster): a connect
    /// failure of that cloud.
    pub fn on_dispatch_failed(&mut self, env: &Env, now_ms: u64, try_: &Try, out: &mut Out) {
        if self.done {
            return;
        }
        if let After::GaveUp(reason) =
            self.fail(env, try_.cloud, Failure::ConnectFailure, now_ms, out)
        {
            self.finish_failed(env, reason, out);
        }
    }

    /// The root tick at `now_ms`: the deadline, then the routed try's
    /// timeout, then the hedge delay; one of them per tick.
    pub fn on_tick(&mut self, env: &Env, now_ms: u64, out: &mut Out) {
        if now_ms < self.next_due_ms() {
            return;
        }
        if now_ms >= self.deadline_ms {
            out.signal(Signal::GaveUp(GiveUp::Deadline));
            self.routed_live = false;
            self.hedge_at_ms = None;
            self.finish_failed(env, GiveUp::Deadline, out);
            return;
        }
        if self.routed_live && now_ms >= self.routed_deadline_ms {
            self.routed_live = false;
            self.hedge_at_ms = None;
            let first = self.first;
            if let After::GaveUp(reason) = self.fail(env, first, Failure::Timeout, now_ms, out) {
                self.finish_failed(env, reason, out);
            }
            return;
        }
        if self.hedge_at_ms.is_some_and(|at| now_ms >= at) {
            self.hedge_at_ms = None;
            let next = self.attempts.on_hedge_due(env.cfg, now_ms, env.healthy);
            if let Next::ReplayTo { .. } = next {
                // Being slower than the delay is not counted as a failure:
                // when the proxy itself stalls, every cloud is late, and
                // ejecting them one after another would cascade. A hung
                // cloud goes out by its try timeout and its probes; until
                // then hedges hide it. A hedge that cannot go out is not a
                // request giving up.
                self.act(next, TryKind::Hedge, now_ms, out);
            }
        }
    }

    // ---- inside ---------------------------------------------------------

    fn set_body(&mut self, state: Body) {
        self.body_state = state;
        self.attempts.set_body(state);
    }

    /// The whole request went upstream at `now`: the total deadline, the
    /// routed try's timeout and the hedge delay start here.
    fn complete(&mut self, env: &Env, now: u64) {
        let cfg = env.cfg;
        self.request_complete = true;
        self.attempts.start_clock(now);
        self.started_ms = now;
        self.deadline_ms = self.attempts.deadline_ms(cfg);
        if self.routed_live {
            self.routed_deadline_ms = now
                .saturating_add(cfg.replay.per_try_timeout_ms)
                .min(self.deadline_ms);
            if let Some(policy) = &self.hedge_policy {
                let delay = env
                    .latency
                    .get(self.first)
                    .map_or(0, |t| hedge_delay_ms(policy, t));
                self.hedge_delay_ms = delay;
                self.hedge_at_ms = Some(now.saturating_add(delay));
            }
        }
    }

    /// A try to `cloud` failed: record it, then replay, wait or give up.
    fn fail(
        &mut self,
        env: &Env,
        cloud: usize,
        failure: Failure,
        now: u64,
        out: &mut Out,
    ) -> After {
        out.signal(Signal::Failed { cloud, failure });
        out.signal(Signal::Live { cloud, ok: false });
        self.failures.push((cloud, failure));
        let next =
            self.attempts
                .on_upstream_failure(env.cfg, now, cloud, failure, false, env.healthy);
        self.act(next, TryKind::Replay, now, out)
    }

    fn act(&mut self, next: Next, kind: TryKind, now: u64, out: &mut Out) -> After {
        match next {
            Next::ReplayTo { cloud, timeout_ms } => {
                out.effect(Effect::Dispatch(Try {
                    cloud,
                    kind,
                    started_ms: now,
                    timeout_ms,
                }));
                After::Trying
            }
            Next::Wait => After::Trying,
            Next::GiveUp(reason) => {
                out.signal(Signal::GaveUp(reason));
                After::GaveUp(reason)
            }
        }
    }

    /// Answers the request with a callout's answer.
    fn reply_from_callout(&mut self, try_: &Try, status: u32, out: &mut Out) {
        self.held = false;
        if try_.kind == TryKind::Hedge {
            // The slow cloud took longer than the delay this request
            // waited for it, by an unknown amount: the sample is censored.
            // It records the delay used, not the time elapsed. The elapsed
            // time (delay + tick lag + the hedge's own answer time) is
            // always above the delay, so on a hung cloud each round of
            // hedged requests raised the percentile that set the next
            // round's delay: a ratchet from `min_delay_ms` to over 100 ms
            // within half a second, until probes ejected the cloud. The
            // delay used is a fixed point: it keeps the delay where it was
            // (no ratchet), and neither does it drop samples (which would
            // let only fast answers in and shrink the delay). The price:
            // a cloud that became slow for good, but answers, keeps being
            // hedged at its old delay (a duplicate request each, latency
            // of the faster cloud) as long as the hedged cloud answers
            // first; the delay does not learn the new slowness from
            // answers it never sees. When the other cloud is no faster,
            // the routed answers win their races, their real times enter
            // the ring and the delay rises: hedging goes on only while it
            // pays.
            out.signal(Signal::Latency {
                cloud: self.first,
                ms: self.hedge_delay_ms,
            });
        }
        let outcome = self.attempts.outcome();
        self.end(
            outcome,
            try_.cloud,
            Effect::Reply {
                cloud: try_.cloud,
                kind: try_.kind,
                status,
            },
            out,
        );
    }

    /// No try succeeded: pass the held failure on, or answer with an
    /// error; while the routed try still runs and nothing is held, its
    /// answer decides.
    fn finish_failed(&mut self, env: &Env, reason: GiveUp, out: &mut Out) {
        if self.routed_live && !self.held {
            return;
        }
        let first = self.first;
        let end = if self.held {
            self.held = false;
            Effect::Resume { cloud: first }
        } else {
            let (status, body) =
                give_up_response(env.cfg, self.model.as_deref(), &self.failures, reason);
            Effect::ReplyError { status, body }
        };
        self.end(Outcome::Failed, first, end, out);
    }

    fn end(&mut self, outcome: Outcome, cloud: usize, effect: Effect, out: &mut Out) {
        self.done = true;
        self.routed_live = false;
        self.hedge_at_ms = None;
        out.signal(Signal::Finished { cloud, outcome });
        out.effect(effect);
    }
}

/// A callout answered after its flight ended (or its stream is gone): only
/// its health signal and latency are kept.
pub fn orphan_answer(now_ms: u64, try_: &Try, answer: Answer, out: &mut Out) {
    match classify_answer(now_ms, try_, answer) {
        Ok(_) => record_answer(now_ms, try_, out),
        Err(failure) => {
            out.signal(Signal::Failed {
                cloud: try_.cloud,
                failure,
            });
            out.signal(Signal::Live {
                cloud: try_.cloud,
                ok: false,
            });
        }
    }
}

fn record_answer(now_ms: u64, try_: &Try, out: &mut Out) {
    out.signal(Signal::Live {
        cloud: try_.cloud,
        ok: true,
    });
    out.signal(Signal::Latency {
        cloud: try_.cloud,
        ms: now_ms.saturating_sub(try_.started_ms),
    });
}

/// `Ok(status)` for an answer below 500, else the failure.
fn classify_answer(now_ms: u64, try_: &Try, answer: Answer) -> Result<u32, Failure> {
    match answer {
        Answer::Status { status, .. } if status < 500 => Ok(status),
        Answer::Status { head, .. } => Err(Failure::from_callout_body(head)),
        Answer::None
            if now_ms
                .saturating_sub(try_.started_ms)
                .saturating_add(TIMEOUT_SLACK_MS)
                >= try_.timeout_ms =>
        {
            Err(Failure::Timeout)
        }
        Answer::None => Err(Failure::Reset),
    }
}

/// The request's OIP `path` with `version` (the one canary or
/// model-router chose) written into it, so a replay or hedge reaches that
/// version on a cloud whose routing does not look at the header; `None`
/// to send the path unchanged.
pub fn pinned_path(path: &[u8], version: Option<&[u8]>) -> Option<String> {
    let version = std::str::from_utf8(version?).ok()?;
    let parsed = oip::parse_path(path)?;
    oip::with_version(path, &parsed, version)
}

#[cfg(test)]
mod tests;
