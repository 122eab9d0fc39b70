//! The shared-data encoding of a guard [`Record`], little-endian:
//!
//! ```text
//! header   1 format (= FORMAT), 1 version count, 1 gate (bit 0 held, bit 1 proven),
//!          1 reserved (0),
//!          4 fingerprint, 8 held_at_ms, 8 compared, 8 agreed
//! version  1 state (0 normal, 1 tripped, 2 probing)
//!          1 rule (0 none, 1 error_rate, 2 error_rate_over_baseline, 3 p99)
//!          2 reserved (0), 8 since_ms, 8 tripped_at_ms
//!          SLOTS × (8 epoch, 4 requests, 4 errors, LATENCY_BUCKETS × 4)
//! trailer  4 check: upper half of key_hash("canary-guard-record", all before)
//! ```
//!
//! Decoding checks the length, format, enum values, reserved bytes,
//! `errors <= requests`, `agreed <= compared` and the check word, so stray bytes read as an
//! error, which callers treat as a fresh record.

use super::{Agreement, Record, Rule, Slot, State, Tally, Version, LATENCY_BUCKETS, SLOTS};
use crate::le::Reader;

/// Version of the layout; bump it (and so the key) on any change.
pub const FORMAT: u8 = 2;
const HEADER: usize = 32;
const SLOT_BYTES: usize = 16 + 4 * LATENCY_BUCKETS;
const VERSION_BYTES: usize = 20 + SLOTS * SLOT_BYTES;

/// Why bytes are not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is {0} bytes, which fits no version count")]
    Length(usize),
    #[error("record format {0}, expected {FORMAT}")]
    Format(u8),
    #[error("record check word does not match")]
    Check,
    #[error("record field {0} is out of range")]
    Field(&'static str),
    #[error("record belongs to another config of this split")]
    Fingerprint,
}

fn check(body: &[u8]) -> u32 {
    (crate::hash::key_hash("canary-guard-record", body) >> 32) as u32
}

fn state_byte(s: State) -> u8 {
    match s {
        State::Normal => 0,
        State::Tripped => 1,
        State::Probing => 2,
    }
}

fn rule_byte(r: Option<Rule>) -> u8 {
    match r {
        None => 0,
        Some(Rule::ErrorRate) => 1,
        Some(Rule::ErrorRateOverBaseline) => 2,
        Some(Rule::P99OverBaseline) => 3,
    }
}

impl Record {
    /// The record's bytes, for `set_shared_data`.
    pub fn encode(&self, fingerprint: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.versions.len() * VERSION_BYTES + 4);
        out.push(FORMAT);
        out.push(u8::try_from(self.versions.len()).unwrap_or(u8::MAX));
        out.push(u8::from(self.held_at_ms.is_some()) | u8::from(self.proven) << 1);
        out.push(0);
        out.extend_from_slice(&fingerprint.to_le_bytes());
        out.extend_from_slice(&self.held_at_ms.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.agreement.compared.to_le_bytes());
        out.extend_from_slice(&self.agreement.agreed.to_le_bytes());
        for v in &self.versions {
            out.push(state_byte(v.state));
            out.push(rule_byte(v.rule));
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&v.since_ms.to_le_bytes());
            out.extend_from_slice(&v.tripped_at_ms.to_le_bytes());
            for s in &v.slots {
                out.extend_from_slice(&s.epoch.to_le_bytes());
                out.extend_from_slice(&s.tally.requests.to_le_bytes());
                out.extend_from_slice(&s.tally.errors.to_le_bytes());
                for n in &s.tally.latency {
                    out.extend_from_slice(&n.to_le_bytes());
                }
            }
        }
        let c = check(&out);
        out.extend_from_slice(&c.to_le_bytes());
        out
    }

    /// Decodes bytes written by [`Record::encode`] under `fingerprint`.
    pub fn decode(bytes: &[u8], fingerprint: u32) -> Result<Record, DecodeError> {
        let n = usize::from(*bytes.get(1).ok_or(DecodeError::Length(bytes.len()))?);
        if bytes.len() != HEADER + n * VERSION_BYTES + 4 {
            return Err(DecodeError::Length(bytes.len()));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let mut r = Reader(body);
        let format = r.u8();
        if format != FORMAT {
            return Err(DecodeError::Format(format));
        }
        let mut t = Reader(tail);
        if t.u32() != check(body) {
            return Err(DecodeError::Check);
        }
        let _count = r.u8();
        let gate = r.u8();
        if gate > 3 {
            return Err(DecodeError::Field("gate"));
        }
        let (held, proven) = (gate & 1 != 0, gate & 2 != 0);
        if r.u8() != 0 {
            return Err(DecodeError::Field("reserved"));
        }
        if r.u32() != fingerprint {
            return Err(DecodeError::Fingerprint);
        }
        let held_at_ms = r.u64();
        let agreement = Agreement {
            compared: r.u64(),
            agreed: r.u64(),
        };
        if agreement.agreed > agreement.compared {
            return Err(DecodeError::Field("agreed"));
        }
        let mut versions = Vec::with_capacity(n);
        for _ in 0..n {
            let state = match r.u8() {
                0 => State::Normal,
                1 => State::Tripped,
                2 => State::Probing,
                _ => return Err(DecodeError::Field("state")),
            };
            let rule = match r.u8() {
                0 => None,
                1 => Some(Rule::ErrorRate),
                2 => Some(Rule::ErrorRateOverBaseline),
                3 => Some(Rule::P99OverBaseline),
                _ => return Err(DecodeError::Field("rule")),
            };
            if r.u16() != 0 {
                return Err(DecodeError::Field("reserved"));
            }
            let since_ms = r.u64();
            let tripped_at_ms = r.u64();
            let mut slots = [Slot::default(); SLOTS];
            for s in &mut slots {
                s.epoch = r.u64();
                let mut tally = Tally {
                    requests: r.u32(),
                    errors: r.u32(),
                    ..Tally::default()
                };
                if tally.errors > tally.requests {
                    return Err(DecodeError::Field("errors"));
                }
                for l in &mut tally.latency {
                    *l = r.u32();
                }
                s.tally = tally;
            }
            versions.push(Version {
                state,
                rule,
                since_ms,
                tripped_at_ms,
                slots,
            });
        }
        Ok(Record {
            versions,
            agreement,
            held_at_ms: held.then_some(held_at_ms),
            proven,
        })
    }
}
