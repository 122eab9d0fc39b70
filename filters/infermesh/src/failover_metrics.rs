//! The failover filter's metrics, defined once per VM at configure time.
//!
//! Names carry Istio-style tags (see `filter_core::stats`), so Prometheus
//! sees e.g. `infermesh_failover_requests_total{cloud,outcome}`. Every
//! tag value comes from the config or a closed enum, so the number of
//! series is bounded by the config.

use filter_core::config::failover::FailoverConfig;
use filter_core::failover::attempts::GiveUp;
pub use filter_core::failover::flight::TryKind;
use filter_core::failover::health::{Cause, State};
use filter_core::failover::{Failure, NoCloud, Outcome};
use filter_core::stats::failover::*;
use filter_core::stats::tagged;
use filter_shim::{bump, counter, gauge, set};
use proxy_wasm::types::Status;

/// Outcomes counted per cloud (`NoCloud` has its own counter).
const PER_CLOUD_OUTCOMES: [Outcome; 4] = [
    Outcome::Served,
    Outcome::Replayed,
    Outcome::Hedged,
    Outcome::Failed,
];

fn outcome_index(o: Outcome) -> Option<usize> {
    PER_CLOUD_OUTCOMES.iter().position(|&x| x == o)
}

struct PerCloud {
    requests: [u32; 4],
    tries: [u32; 3],
    failures: [u32; 4],
    probes_ok: u32,
    probes_failed: u32,
    /// `[state][cause]`; `None` for transitions that cannot happen.
    transitions: [[Option<u32>; 4]; 2],
    healthy: u32,
}

pub struct Metrics {
    clouds: Vec<PerCloud>,
    give_ups: [u32; GiveUp::ALL.len()],
    no_cloud: [u32; 2],
    not_buffered: u32,
    stripped: u32,
}

fn index<T: PartialEq>(all: &[T], x: &T) -> Option<usize> {
    all.iter().position(|a| a == x)
}

impl Metrics {
    pub fn define(cfg: &FailoverConfig) -> Result<Self, Status> {
        let mut clouds = Vec::with_capacity(cfg.clouds.len());
        for c in &cfg.clouds {
            let name = c.name.as_str();
            let mut requests = [0u32; 4];
            for (slot, o) in requests.iter_mut().zip(PER_CLOUD_OUTCOMES) {
                *slot = counter(&tagged(
                    REQUESTS,
                    &[("cloud", name), ("outcome", o.as_str())],
                ))?;
            }
            let mut tries = [0u32; 3];
            for (slot, k) in tries.iter_mut().zip(TryKind::ALL) {
                *slot = counter(&tagged(TRIES, &[("cloud", name), ("decision", k.as_str())]))?;
            }
            let mut failures = [0u32; 4];
            for (slot, f) in failures.iter_mut().zip(Failure::ALL) {
                *slot = counter(&tagged(
                    FAILURES,
                    &[("cloud", name), ("failure", f.as_str())],
                ))?;
            }
            let probe = |outcome| tagged(PROBES, &[("cloud", name), ("outcome", outcome)]);
            let mut transitions = [[None; 4]; 2];
            for (row, state) in transitions.iter_mut().zip(State::ALL) {
                for (slot, cause) in row.iter_mut().zip(Cause::ALL) {
                    // Only probes readmit a cloud; nothing changes to the
                    // initial state.
                    let possible = match (state, cause) {
                        (_, Cause::Initial) => false,
                        (State::Healthy, c) => c == Cause::Probe,
                        (State::Unhealthy, _) => true,
                    };
                    if !possible {
                        continue;
                    }
                    *slot = Some(counter(&tagged(
                        TRANSITIONS,
                        &[
                            ("cloud", name),
                            ("outcome", state.as_str()),
                            ("reason", cause.as_str()),
                        ],
                    ))?);
                }
            }
            clouds.push(PerCloud {
                requests,
                tries,
                failures,
                probes_ok: counter(&probe("ok"))?,
                probes_failed: counter(&probe("failed"))?,
                transitions,
                healthy: gauge(&tagged(HEALTHY, &[("cloud", name)]))?,
            });
        }
        let mut give_ups = [0u32; GiveUp::ALL.len()];
        for (slot, g) in give_ups.iter_mut().zip(GiveUp::ALL) {
            *slot = counter(&tagged(GIVE_UPS, &[("reason", g.as_str())]))?;
        }
        let mut no_cloud = [0u32; 2];
        for (slot, n) in no_cloud.iter_mut().zip(NoCloud::ALL) {
            *slot = counter(&tagged(NO_CLOUD, &[("reason", n.as_str())]))?;
        }
        Ok(Self {
            clouds,
            give_ups,
            no_cloud,
            not_buffered: counter(NOT_BUFFERED)?,
            stripped: counter(STRIPPED)?,
        })
    }

    pub fn request(&self, cloud: usize, outcome: Outcome) {
        let id = self
            .clouds
            .get(cloud)
            .zip(outcome_index(outcome))
            .and_then(|(c, i)| c.requests.get(i).copied());
        bump(id, 1);
    }

    pub fn try_(&self, cloud: usize, kind: TryKind) {
        let id = self
            .clouds
            .get(cloud)
            .zip(index(&TryKind::ALL, &kind))
            .and_then(|(c, i)| c.tries.get(i).copied());
        bump(id, 1);
    }

    pub fn failure(&self, cloud: usize, failure: Failure) {
        let id = self
            .clouds
            .get(cloud)
            .zip(index(&Failure::ALL, &failure))
            .and_then(|(c, i)| c.failures.get(i).copied());
        bump(id, 1);
    }

    pub fn give_up(&self, reason: GiveUp) {
        bump(
            index(&GiveUp::ALL, &reason).and_then(|i| self.give_ups.get(i).copied()),
            1,
        );
    }

    pub fn no_cloud(&self, reason: NoCloud) {
        bump(
            index(&NoCloud::ALL, &reason).and_then(|i| self.no_cloud.get(i).copied()),
            1,
        );
    }

    pub fn not_buffered(&self) {
        bump(Some(self.not_buffered), 1);
    }

    pub fn stripped(&self, n: usize) {
        if n > 0 {
            bump(Some(self.stripped), n as u64);
        }
    }

    pub fn probe(&self, cloud: usize, ok: bool) {
        let id = self
            .clouds
            .get(cloud)
            .map(|c| if ok { c.probes_ok } else { c.probes_failed });
        bump(id, 1);
    }

    pub fn transition(&self, cloud: usize, to: State, cause: Cause) {
        let id = self.clouds.get(cloud).and_then(|c| {
            let row = c.transitions.get(index(&State::ALL, &to)?)?;
            row.get(index(&Cause::ALL, &cause)?).copied().flatten()
        });
        bump(id, 1);
    }

    pub fn set_healthy(&self, cloud: usize, healthy: bool) {
        if let Some(c) = self.clouds.get(cloud) {
            set(c.healthy, u64::from(healthy));
        }
    }
}
