//! Per-cloud health: a state machine with hysteresis, fed by active probes
//! and live traffic, stored as one small record per cloud that every Envoy
//! worker shares.
//!
//! **States.** A cloud is `Healthy` or `Unhealthy`; it starts healthy (a
//! freshly started proxy must not refuse traffic until the first probes
//! return). A healthy cloud goes out after `unhealthy_threshold`
//! consecutive failed probe rounds, or on live traffic after
//! `consecutive_failures` consecutive failures or a failure rate at or
//! above `percent` over at least `min_requests` in a window. Only probes
//! bring it back: `healthy_threshold` consecutive successful rounds. The
//! thresholds are the hysteresis: results that alternate more often than
//! a threshold never change the state.
//!
//! **Sharing.** The shim keeps each cloud's [`Record`] in proxy-wasm shared
//! data under [`shared_key`], and updates it read–modify–write with the
//! CAS token (retry on mismatch, a few times at most):
//!
//! ```text
//! let (bytes, cas) = get_shared_data(key);
//! let mut rec = Record::decode_or_fresh(bytes, fingerprint);
//! if rec.<update>(…) == Update::Unchanged { done }
//! set_shared_data(key, rec.encode(fingerprint), cas)  // mismatch: start over
//! ```
//!
//! **Probe slots.** Every worker ticks; [`Record::claim_probe`] says
//! whether a round is due and, if so, marks it in flight with a new `seq`.
//! Only the worker whose CAS write succeeds probes; a loser re-reads,
//! recomputes, sees the round in flight and does nothing. So each process
//! probes each cloud about once per interval. Envoy skips the CAS check
//! when a key does not exist yet, so the very first write of a key can
//! race; the cost is one duplicate probe or one lost update at start-up. A round whose owner
//! vanished (VM restart) is reclaimed after `timeout_ms` plus a grace.
//! Results carry the `seq`, so a late result of a reclaimed round is
//! ignored instead of counted twice.

mod codec;

pub use codec::{DecodeError, FORMAT, RECORD_BYTES};

use crate::config::failover::{FailoverConfig, Passive, Probe};

/// Health of one cloud; also a metric tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Healthy,
    Unhealthy,
}

impl State {
    pub const ALL: [State; 2] = [State::Healthy, State::Unhealthy];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Unhealthy => "unhealthy",
        }
    }
}

/// What last set the state; also a metric tag (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Never changed since the record was created.
    Initial,
    Probe,
    /// Live traffic: consecutive failures.
    LiveFailures,
    /// Live traffic: failure rate in the window.
    LiveFailureRate,
}

impl Cause {
    pub const ALL: [Cause; 4] = [
        Cause::Initial,
        Cause::Probe,
        Cause::LiveFailures,
        Cause::LiveFailureRate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Initial => "initial",
            Cause::Probe => "probe",
            Cause::LiveFailures => "live_failures",
            Cause::LiveFailureRate => "live_failure_rate",
        }
    }
}

/// What an update did; the shim writes the record back unless
/// `Unchanged`, and logs and counts a `Transition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    Unchanged,
    Changed,
    Transition { to: State, cause: Cause },
}

/// A round that ran past `timeout_ms` by this much is presumed lost (its
/// owner's VM went away) and may be claimed again.
pub const PROBE_GRACE_MS: u64 = 1_000;

/// One cloud's shared health record. `Record::default()` is a fresh,
/// healthy cloud with a probe due at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub state: State,
    pub cause: Cause,
    pub changed_at_ms: u64,
    /// Consecutive successful / failed probe rounds (one is always 0).
    pub probe_successes: u16,
    pub probe_failures: u16,
    /// Sequence number of the last claimed round; results must match it.
    pub probe_seq: u32,
    /// When the last round was claimed (0: never).
    pub probe_started_ms: u64,
    pub probe_in_flight: bool,
    /// Consecutive live failures since the last live success.
    pub live_failures: u16,
    /// Failure-rate window: start, requests and failures seen in it.
    pub window_start_ms: u64,
    pub window_requests: u32,
    pub window_failures: u32,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            state: State::Healthy,
            cause: Cause::Initial,
            changed_at_ms: 0,
            probe_successes: 0,
            probe_failures: 0,
            probe_seq: 0,
            probe_started_ms: 0,
            probe_in_flight: false,
            live_failures: 0,
            window_start_ms: 0,
            window_requests: 0,
            window_failures: 0,
        }
    }
}

/// The shared-data key of a cloud's record. The format version is part
/// of the key, so proxies running another format never read it.
pub fn shared_key(cloud_name: &str) -> String {
    format!("infermesh.failover.health.v{FORMAT}.{cloud_name}")
}

/// Identity of what a cloud's health means: its cluster, authority and
/// probe paths. A record written under another fingerprint (the config
/// changed) decodes as fresh instead of carrying stale health over.
pub fn fingerprint(cfg: &FailoverConfig, cloud: usize) -> u32 {
    let mut id = Vec::new();
    if let Some(c) = cfg.clouds.get(cloud) {
        for part in [&c.name, &c.cluster, &c.authority] {
            id.extend_from_slice(part.as_bytes());
            id.push(0);
        }
    }
    for p in &cfg.health.probe.paths {
        id.extend_from_slice(p.as_bytes());
        id.push(0);
    }
    // The upper half of a 64-bit hash; the truncation is the point.
    (crate::hash::key_hash("failover-fingerprint", &id) >> 32) as u32
}

/// How often the shim's root context should tick to claim probes: often
/// enough that a round starts within a fifth of the interval of its time.
pub fn tick_ms(probe: &Probe) -> u64 {
    (probe.interval_ms / 5).clamp(50, 1_000)
}

impl Record {
    pub fn is_healthy(&self) -> bool {
        self.state == State::Healthy
    }

    /// Decodes shared bytes; anything missing, malformed or written for
    /// another fingerprint is a fresh record. Never panics.
    pub fn decode_or_fresh(bytes: Option<&[u8]>, fingerprint: u32) -> Record {
        bytes
            .and_then(|b| Record::decode(b, fingerprint).ok())
            .unwrap_or_default()
    }

    /// Claims a probe round if one is due at `now_ms`: marks it in flight
    /// and returns its `seq`. `None`: not due, or another worker runs it.
    pub fn claim_probe(&mut self, probe: &Probe, now_ms: u64) -> Option<u32> {
        let since = now_ms.checked_sub(self.probe_started_ms);
        let due = match since {
            // Workers' clocks differ by a few ms; a start far in the
            // future means the clock went back: start afresh.
            None => self.probe_started_ms.saturating_sub(now_ms) > probe.interval_ms,
            Some(_) if self.probe_started_ms == 0 => true,
            Some(elapsed) if self.probe_in_flight => {
                elapsed >= probe.timeout_ms.saturating_add(PROBE_GRACE_MS)
            }
            Some(elapsed) => elapsed >= probe.interval_ms,
        };
        if !due {
            return None;
        }
        self.probe_seq = self.probe_seq.wrapping_add(1);
        self.probe_started_ms = now_ms.max(1);
        self.probe_in_flight = true;
        Some(self.probe_seq)
    }

    /// Applies the result of probe round `seq` (`ok`: every probe path
    /// answered 200 in time). A result for another round is ignored.
    pub fn on_probe_result(&mut self, probe: &Probe, now_ms: u64, seq: u32, ok: bool) -> Update {
        if !self.probe_in_flight || seq != self.probe_seq {
            return Update::Unchanged;
        }
        self.probe_in_flight = false;
        if ok {
            self.probe_successes = self.probe_successes.saturating_add(1);
            self.probe_failures = 0;
            if self.state == State::Unhealthy && self.probe_successes >= probe.healthy_threshold {
                return self.become_(State::Healthy, Cause::Probe, now_ms);
            }
        } else {
            self.probe_failures = self.probe_failures.saturating_add(1);
            self.probe_successes = 0;
            if self.state == State::Healthy && self.probe_failures >= probe.unhealthy_threshold {
                return self.become_(State::Unhealthy, Cause::Probe, now_ms);
            }
        }
        Update::Changed
    }

    /// Applies a live request's outcome (`ok`: the cloud answered below
    /// 500). Ignored while unhealthy: only probes readmit a cloud.
    pub fn on_live_result(&mut self, passive: &Passive, now_ms: u64, ok: bool) -> Update {
        if self.state == State::Unhealthy {
            return Update::Unchanged;
        }
        let before = *self;
        if let Some(rate) = &passive.failure_rate {
            let elapsed = now_ms.checked_sub(self.window_start_ms);
            if elapsed.is_none_or(|e| e >= rate.window_ms) {
                self.window_start_ms = now_ms;
                self.window_requests = 0;
                self.window_failures = 0;
            }
            self.window_requests = self.window_requests.saturating_add(1);
            if !ok {
                self.window_failures = self.window_failures.saturating_add(1);
            }
        }
        if ok {
            self.live_failures = 0;
        } else {
            self.live_failures = self.live_failures.saturating_add(1);
            if self.live_failures >= passive.consecutive_failures {
                return self.become_(State::Unhealthy, Cause::LiveFailures, now_ms);
            }
            if let Some(rate) = &passive.failure_rate {
                let failures = u64::from(self.window_failures) * 100;
                let limit = u64::from(self.window_requests) * u64::from(rate.percent);
                if self.window_requests >= rate.min_requests && failures >= limit {
                    return self.become_(State::Unhealthy, Cause::LiveFailureRate, now_ms);
                }
            }
        }
        if *self == before {
            Update::Unchanged
        } else {
            Update::Changed
        }
    }

    fn become_(&mut self, to: State, cause: Cause, now_ms: u64) -> Update {
        self.state = to;
        self.cause = cause;
        self.changed_at_ms = now_ms;
        // A fresh start on both sides: a readmitted cloud is judged on new
        // traffic, an ejected one needs a full run of good probes.
        self.probe_successes = 0;
        self.probe_failures = 0;
        self.live_failures = 0;
        self.window_start_ms = now_ms;
        self.window_requests = 0;
        self.window_failures = 0;
        Update::Transition { to, cause }
    }
}

#[cfg(test)]
mod tests;
