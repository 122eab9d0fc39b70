//! Replay and hedging: the tries of one request.
//!
//! **Replay.** When a try fails (connect failure, reset, timeout, 5xx)
//! before any response byte reached the client, the buffered request is
//! sent to the next healthy allowed cloud it has not tried — only if the
//! request never reached the failed upstream or is idempotent, its body
//! was buffered whole within `max_body_bytes`, the attempt limit is not
//! reached and the total deadline leaves time for a try.
//!
//! **Hedging.** For OIP infer requests of models with hedging on, when the
//! chosen cloud has not answered within the hedge delay (see
//! [`super::latency::hedge_delay_ms`]) the same request also goes to the
//! next cloud; the first answer wins, later ones are discarded. A hedge is
//! a try: it counts against `max_attempts` and needs the buffered body.
//! At most one hedge per request.

use crate::config::failover::{FailoverConfig, HedgeDelay};
use crate::oip;

use super::{pick, CloudSet, Failure, Outcome};

/// Shortest try worth starting: less time than this before the deadline
/// and the request gives up instead.
pub const MIN_TRY_MS: u64 = 10;

/// What the request allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    /// May be sent more than once: GET, HEAD, OPTIONS, and OIP infer when
    /// `replay.infer_idempotent` (the default).
    pub idempotent: bool,
    /// The model, from the OIP path or else model-router's header.
    pub model: Option<String>,
    /// Hedge policy: only for idempotent OIP infer requests of models with
    /// hedging on.
    pub hedge: Option<HedgeDelay>,
}

/// Classifies a request from its method, `:path` and (trusted)
/// `x-infermesh-model` header.
pub fn classify(
    cfg: &FailoverConfig,
    method: &[u8],
    path: &[u8],
    model_header: Option<&[u8]>,
) -> Class {
    let oip = oip::parse_path(path);
    let model = oip.as_ref().map(|p| p.model.clone()).or_else(|| {
        model_header
            .and_then(|m| std::str::from_utf8(m).ok())
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
    });
    let infer = method == b"POST" && oip.is_some_and(|p| p.action == oip::Action::Infer);
    let idempotent =
        matches!(method, b"GET" | b"HEAD" | b"OPTIONS") || (infer && cfg.replay.infer_idempotent);
    let hedge = match (&model, infer && idempotent) {
        (Some(m), true) => cfg.hedge.for_model(m).cloned(),
        _ => None,
    };
    Class {
        idempotent,
        model,
        hedge,
    }
}

/// How much of the request body the shim holds for a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Still arriving.
    Incomplete,
    /// All of it, `len` bytes (0 for none).
    Complete(usize),
    /// Over `max_body_bytes`: not buffered.
    TooLarge,
}

/// Whether a body of `len` bytes (from `content-length`, or counted so
/// far) may still be buffered for replay.
pub fn may_buffer(cfg: &FailoverConfig, len: usize) -> bool {
    len <= cfg.replay.max_body_bytes
}

/// The next step after a failed try or a due hedge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send the buffered request to `cloud`, with this try timeout.
    ReplayTo { cloud: usize, timeout_ms: u64 },
    /// Another try is still in flight; its result decides.
    Wait,
    /// Send nothing more; let the failure (or the running try) stand.
    GiveUp(GiveUp),
}

/// Why no further try is made; also a metric tag (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Part of the response already went to the client.
    ResponseStarted,
    /// The failed upstream may have acted on a non-idempotent request.
    NotIdempotent,
    /// The body was larger than `max_body_bytes` or is not complete.
    BodyNotBuffered,
    AttemptsExhausted,
    Deadline,
    /// Every healthy allowed cloud was tried.
    NoCloudLeft,
    /// A try already answered.
    Answered,
    /// Hedging is off for this request.
    NotHedgeable,
    /// The request was already hedged once.
    AlreadyHedged,
    /// No try is running (a hedge only joins a running try).
    NothingInFlight,
}

impl GiveUp {
    pub const ALL: [GiveUp; 10] = [
        GiveUp::ResponseStarted,
        GiveUp::NotIdempotent,
        GiveUp::BodyNotBuffered,
        GiveUp::AttemptsExhausted,
        GiveUp::Deadline,
        GiveUp::NoCloudLeft,
        GiveUp::Answered,
        GiveUp::NotHedgeable,
        GiveUp::AlreadyHedged,
        GiveUp::NothingInFlight,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GiveUp::ResponseStarted => "response_started",
            GiveUp::NotIdempotent => "not_idempotent",
            GiveUp::BodyNotBuffered => "body_not_buffered",
            GiveUp::AttemptsExhausted => "attempts_exhausted",
            GiveUp::Deadline => "deadline",
            GiveUp::NoCloudLeft => "no_cloud_left",
            GiveUp::Answered => "answered",
            GiveUp::NotHedgeable => "not_hedgeable",
            GiveUp::AlreadyHedged => "already_hedged",
            GiveUp::NothingInFlight => "nothing_in_flight",
        }
    }
}

/// Whether an answer (status < 500) is the one to send downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Use,
    Discard,
}

/// The tries of one request. Bounded: a few words, no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempts {
    started_ms: u64,
    allowed: CloudSet,
    idempotent: bool,
    hedgeable: bool,
    body: Body,
    first: usize,
    tried: CloudSet,
    in_flight: CloudSet,
    count: u8,
    hedge: Option<usize>,
    winner: Option<usize>,
}

impl Attempts {
    /// The first try, to `first` (from [`pick`]), starts at `now_ms`.
    pub fn start(now_ms: u64, first: usize, allowed: CloudSet, class: &Class) -> Attempts {
        let one: CloudSet = [first].into_iter().collect();
        Attempts {
            started_ms: now_ms,
            allowed,
            idempotent: class.idempotent,
            hedgeable: class.hedge.is_some(),
            body: Body::Incomplete,
            first,
            tried: one,
            in_flight: one,
            count: 1,
            hedge: None,
            winner: None,
        }
    }

    /// Records how much body is buffered.
    pub fn set_body(&mut self, body: Body) {
        self.body = body;
    }

    pub fn tried(&self) -> CloudSet {
        self.tried
    }

    pub fn count(&self) -> u8 {
        self.count
    }

    /// Restarts the clock at `now_ms`: the shim calls this when the
    /// request's body is complete, so a slow upload does not eat into the
    /// total deadline (Envoy's own try timeouts also start there).
    pub fn start_clock(&mut self, now_ms: u64) {
        self.started_ms = now_ms;
    }

    /// When the request must be finished, Unix ms.
    pub fn deadline_ms(&self, cfg: &FailoverConfig) -> u64 {
        self.started_ms.saturating_add(cfg.replay.total_deadline_ms)
    }

    /// A try to `cloud` failed at `now_ms`. `response_started`: some of
    /// its response already went downstream. `healthy` is read after the
    /// failure was recorded in the cloud's health record.
    pub fn on_upstream_failure(
        &mut self,
        cfg: &FailoverConfig,
        now_ms: u64,
        cloud: usize,
        failure: Failure,
        response_started: bool,
        healthy: CloudSet,
    ) -> Next {
        self.in_flight.remove(cloud);
        if self.winner.is_some() {
            return Next::GiveUp(GiveUp::Answered);
        }
        if !self.in_flight.is_empty() {
            return Next::Wait;
        }
        if response_started {
            return Next::GiveUp(GiveUp::ResponseStarted);
        }
        if failure.reached_upstream() && !self.idempotent {
            return Next::GiveUp(GiveUp::NotIdempotent);
        }
        self.send_next(cfg, now_ms, healthy)
    }

    /// The hedge delay has passed at `now_ms` with no answer yet.
    pub fn on_hedge_due(&mut self, cfg: &FailoverConfig, now_ms: u64, healthy: CloudSet) -> Next {
        if self.winner.is_some() {
            return Next::GiveUp(GiveUp::Answered);
        }
        if !self.hedgeable {
            return Next::GiveUp(GiveUp::NotHedgeable);
        }
        if self.hedge.is_some() {
            return Next::GiveUp(GiveUp::AlreadyHedged);
        }
        if self.in_flight.is_empty() {
            return Next::GiveUp(GiveUp::NothingInFlight);
        }
        let next = self.send_next(cfg, now_ms, healthy);
        if let Next::ReplayTo { cloud, .. } = next {
            self.hedge = Some(cloud);
        }
        next
    }

    /// `cloud` answered (status < 500). The first answer wins; later ones
    /// and answers from clouds never tried are discarded.
    pub fn on_answer(&mut self, cloud: usize) -> Answer {
        self.in_flight.remove(cloud);
        if self.winner.is_some() || !self.tried.contains(cloud) {
            return Answer::Discard;
        }
        self.winner = Some(cloud);
        Answer::Use
    }

    /// The cloud whose answer was used, if any.
    pub fn winner(&self) -> Option<usize> {
        self.winner
    }

    /// How the request ended, for the outcome metric.
    pub fn outcome(&self) -> Outcome {
        match self.winner {
            None => Outcome::Failed,
            Some(w) if w == self.first => Outcome::Served,
            Some(w) if Some(w) == self.hedge => Outcome::Hedged,
            Some(_) => Outcome::Replayed,
        }
    }

    fn send_next(&mut self, cfg: &FailoverConfig, now_ms: u64, healthy: CloudSet) -> Next {
        match self.body {
            Body::Complete(len) if may_buffer(cfg, len) => {}
            _ => return Next::GiveUp(GiveUp::BodyNotBuffered),
        }
        if self.count >= cfg.replay.max_attempts {
            return Next::GiveUp(GiveUp::AttemptsExhausted);
        }
        let remaining = self.deadline_ms(cfg).saturating_sub(now_ms);
        if remaining < MIN_TRY_MS {
            return Next::GiveUp(GiveUp::Deadline);
        }
        let Some(cloud) = pick(cfg, self.allowed, healthy, self.tried) else {
            return Next::GiveUp(GiveUp::NoCloudLeft);
        };
        self.tried.insert(cloud);
        self.in_flight.insert(cloud);
        self.count = self.count.saturating_add(1);
        Next::ReplayTo {
            cloud,
            timeout_ms: remaining.min(cfg.replay.per_try_timeout_ms),
        }
    }
}

#[cfg(test)]
mod tests;
