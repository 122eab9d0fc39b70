//! The shared-data encoding of a [`Record`]: fixed 56 bytes, little-endian.
//!
//! ```text
//! offset size field
//!      0    1 format (= FORMAT)
//!      1    1 state            0 healthy, 1 unhealthy
//!      2    1 cause            0 initial, 1 probe, 2 live failures, 3 live rate
//!      3    1 flags            bit 0: probe in flight; other bits 0
//!      4    4 fingerprint      see `fingerprint`
//!      8    8 changed_at_ms
//!     16    8 probe_started_ms
//!     24    4 probe_seq
//!     28    2 probe_successes
//!     30    2 probe_failures
//!     32    2 live_failures
//!     34    2 reserved (0)
//!     36    4 window_requests
//!     40    4 window_failures  ≤ window_requests
//!     44    8 window_start_ms
//!     52    4 check            upper half of key_hash("failover-record", bytes 0..52)
//! ```
//!
//! Decoding checks everything (length, format, enum values, reserved bits,
//! the check word), so stray or truncated bytes read as an error, which
//! callers treat as a fresh record.

use super::{Cause, Record, State};
use crate::le::Reader;

/// Version of the layout; bump it (and the key) on any change.
pub const FORMAT: u8 = 1;
/// Encoded size.
pub const RECORD_BYTES: usize = 56;
const BODY: usize = RECORD_BYTES - 4;

/// Why bytes are not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is {0} bytes, expected {RECORD_BYTES}")]
    Length(usize),
    #[error("record format {0}, expected {FORMAT}")]
    Format(u8),
    #[error("record check word does not match")]
    Check,
    #[error("record field {0} is out of range")]
    Field(&'static str),
    #[error("record belongs to another config of this cloud")]
    Fingerprint,
}

fn check(body: &[u8]) -> u32 {
    (crate::hash::key_hash("failover-record", body) >> 32) as u32
}

/// A cursor writing into a fixed buffer; writes past the end are dropped
/// (the layout above fills exactly `BODY` bytes; the round-trip property
/// test would fail otherwise).
struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.at.saturating_add(bytes.len());
        if let Some(dst) = self.buf.get_mut(self.at..end) {
            dst.copy_from_slice(bytes);
        }
        self.at = end;
    }
}

impl Record {
    /// The record's bytes, for `set_shared_data`.
    pub fn encode(&self, fingerprint: u32) -> [u8; RECORD_BYTES] {
        let mut out = [0u8; RECORD_BYTES];
        let mut w = Writer {
            buf: &mut out,
            at: 0,
        };
        w.put(&[FORMAT]);
        w.put(&[match self.state {
            State::Healthy => 0,
            State::Unhealthy => 1,
        }]);
        w.put(&[match self.cause {
            Cause::Initial => 0,
            Cause::Probe => 1,
            Cause::LiveFailures => 2,
            Cause::LiveFailureRate => 3,
        }]);
        w.put(&[u8::from(self.probe_in_flight)]);
        w.put(&fingerprint.to_le_bytes());
        w.put(&self.changed_at_ms.to_le_bytes());
        w.put(&self.probe_started_ms.to_le_bytes());
        w.put(&self.probe_seq.to_le_bytes());
        w.put(&self.probe_successes.to_le_bytes());
        w.put(&self.probe_failures.to_le_bytes());
        w.put(&self.live_failures.to_le_bytes());
        w.put(&0u16.to_le_bytes());
        w.put(&self.window_requests.to_le_bytes());
        // Keep the invariant the decoder checks even for a hand-made record.
        w.put(&self.window_failures.min(self.window_requests).to_le_bytes());
        w.put(&self.window_start_ms.to_le_bytes());
        let c = check(out.get(..BODY).unwrap_or_default());
        if let Some(tail) = out.get_mut(BODY..) {
            tail.copy_from_slice(&c.to_le_bytes());
        }
        out
    }

    /// Decodes bytes written by [`Record::encode`] with the same
    /// `fingerprint`.
    pub fn decode(bytes: &[u8], fingerprint: u32) -> Result<Record, DecodeError> {
        if bytes.len() != RECORD_BYTES {
            return Err(DecodeError::Length(bytes.len()));
        }
        let (body, tail) = bytes.split_at(BODY);
        let mut r = Reader(body);
        let format = r.u8();
        if format != FORMAT {
            return Err(DecodeError::Format(format));
        }
        if Reader(tail).u32() != check(body) {
            return Err(DecodeError::Check);
        }
        let state = match r.u8() {
            0 => State::Healthy,
            1 => State::Unhealthy,
            _ => return Err(DecodeError::Field("state")),
        };
        let cause = match r.u8() {
            0 => Cause::Initial,
            1 => Cause::Probe,
            2 => Cause::LiveFailures,
            3 => Cause::LiveFailureRate,
            _ => return Err(DecodeError::Field("cause")),
        };
        let flags = r.u8();
        if flags & !1 != 0 {
            return Err(DecodeError::Field("flags"));
        }
        if r.u32() != fingerprint {
            return Err(DecodeError::Fingerprint);
        }
        let changed_at_ms = r.u64();
        let probe_started_ms = r.u64();
        let probe_seq = r.u32();
        let probe_successes = r.u16();
        let probe_failures = r.u16();
        let live_failures = r.u16();
        if r.u16() != 0 {
            return Err(DecodeError::Field("reserved"));
        }
        let window_requests = r.u32();
        let window_failures = r.u32();
        if window_failures > window_requests {
            return Err(DecodeError::Field("window_failures"));
        }
        let window_start_ms = r.u64();
        Ok(Record {
            state,
            cause,
            changed_at_ms,
            probe_successes,
            probe_failures,
            probe_seq,
            probe_started_ms,
            probe_in_flight: flags & 1 != 0,
            live_failures,
            window_start_ms,
            window_requests,
            window_failures,
        })
    }
}

#[cfg(test)]
mod tests;
