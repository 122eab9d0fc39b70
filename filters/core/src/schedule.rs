//! Scheduled weight steps: the weight is a function of wall-clock time.
//!
//! A schedule has an absolute start (RFC 3339) and steps at offsets from it.
//! Every proxy evaluates the same function of `now_ms`, so all of them move
//! to the next step at the same moment with no controller; clock skew
//! between proxies (NTP: milliseconds) is the only disagreement.

use crate::weights::Weights;

/// Validated schedule. Invariant: steps are sorted by strictly increasing
/// `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    steps: Vec<Step>,
}

/// From `at_ms` (Unix milliseconds) on, `weights` apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub at_ms: u64,
    pub weights: Weights,
}

impl Schedule {
    /// `steps` must be sorted by strictly increasing `at_ms` (the config
    /// parser checks and names the offending step).
    pub fn new(steps: Vec<Step>) -> Option<Self> {
        let sorted = steps.windows(2).all(|w| match w {
            [a, b] => a.at_ms < b.at_ms,
            _ => true,
        });
        (sorted && !steps.is_empty()).then_some(Self { steps })
    }

    /// The step in force at `now_ms`: the last one whose time has come, or
    /// `None` before the first step (the base weights apply then).
    pub fn active(&self, now_ms: u64) -> Option<(usize, &Step)> {
        let n = self.steps.partition_point(|s| s.at_ms <= now_ms);
        let i = n.checked_sub(1)?;
        self.steps.get(i).map(|s| (i, s))
    }

    /// The weights in force at `now_ms`, or `base` before the first step.
    pub fn weights_at<'a>(&'a self, base: &'a Weights, now_ms: u64) -> &'a Weights {
        self.active(now_ms).map_or(base, |(_, s)| &s.weights)
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }
}

/// Parses an RFC 3339 timestamp (`2026-11-23T12:00:00Z`,
/// `2026-11-23T13:00:00.5+01:00`) into Unix milliseconds. Times before 1970
/// are rejected: a rollout does not start then.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        digits.iter().try_fold(0i64, |acc, d| {
            acc.checked_mul(10)?.checked_add(i64::from(d - b'0'))
        })
    };
    let sep = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if sep(i, b".") {
        let start = i + 1;
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        if end == start {
            return None;
        }
        // Keep millisecond precision; further digits are truncated.
        let take = (end - start).min(3);
        let frac = num(start..start + take)?;
        millis = frac * 10i64.pow(3 - u32::try_from(take).ok()?);
        i = end;
    }
    let offset_s = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let h = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let m = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 3600 + m * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_s;
    let ms = secs.checked_mul(1000)?.checked_add(millis)?;
    u64::try_from(ms).ok()
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_rfc3339() {
        let cases: &[(&str, Option<u64>)] = &[
            ("1970-01-01T00:00:00Z", Some(0)),
            ("2026-11-23T12:00:00Z", Some(1_795_435_200_000)),
            ("2026-11-23T13:00:00+01:00", Some(1_795_435_200_000)),
            ("2026-11-23T11:30:00-00:30", Some(1_795_435_200_000)),
            ("2026-11-23T12:00:00.250Z", Some(1_795_435_200_250)),
            ("2026-11-23T12:00:00.2Z", Some(1_795_435_200_200)),
            ("2026-11-23t12:00:00.123456789z", Some(1_795_435_200_123)),
            ("2024-02-29T00:00:00Z", Some(1_709_164_800_000)),
            ("2000-03-01T00:00:00Z", Some(951_868_800_000)),
            ("2023-02-29T00:00:00Z", None),
            ("2026-13-01T00:00:00Z", None),
            ("2026-11-23T24:00:00Z", None),
            ("2026-11-23T12:00:00", None),
            ("2026-11-23 12:00Z", None),
            ("2026-11-23T12:00:00.Z", None),
            ("2026-11-23T12:00:00+1:00", None),
            ("1969-12-31T23:59:59Z", None),
            ("", None),
            ("not a time", None),
            ("2026-11-23T12:00:00Zjunk", None),
            ("٢٠٢٦-11-23T12:00:00Z", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_rfc3339(s), *want, "{s:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse_rfc3339(&s);
        }

        #[test]
        fn round_trips_through_civil_dates(days in 0i64..200_000, secs in 0i64..86_400) {
            // Rebuild the date with the inverse algorithm and parse it back.
            let (y, m, d) = civil_from_days(days);
            let s = format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
                secs / 3600, secs / 60 % 60, secs % 60
            );
            if y <= 9999 {
                prop_assert_eq!(parse_rfc3339(&s), Some(((days * 86_400 + secs) * 1000) as u64));
            }
        }
    }

    fn civil_from_days(z: i64) -> (i64, i64, i64) {
        let z = z + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        (if m <= 2 { y + 1 } else { y }, m, d)
    }

    fn weights(canary: u32) -> Weights {
        Weights::new(vec![10_000 - canary, canary]).unwrap()
    }

    #[test]
    fn active_step_is_a_function_of_time() {
        let base = weights(0);
        let s = Schedule::new(vec![
            Step {
                at_ms: 1_000,
                weights: weights(100),
            },
            Step {
                at_ms: 2_000,
                weights: weights(500),
            },
            Step {
                at_ms: 5_000,
                weights: weights(2_500),
            },
        ])
        .unwrap();
        let canary_at = |t| s.weights_at(&base, t).as_bp()[1];
        assert_eq!(canary_at(0), 0);
        assert_eq!(canary_at(999), 0);
        assert_eq!(canary_at(1_000), 100);
        assert_eq!(canary_at(1_999), 100);
        assert_eq!(canary_at(2_000), 500);
        assert_eq!(canary_at(4_999), 500);
        assert_eq!(canary_at(5_000), 2_500);
        assert_eq!(canary_at(u64::MAX), 2_500);
        assert_eq!(s.active(1_500).map(|(i, _)| i), Some(0));
        assert_eq!(s.active(10).map(|(i, _)| i), None);
    }

    #[test]
    fn unsorted_or_empty_steps_are_refused() {
        assert!(Schedule::new(vec![]).is_none());
        let dup = vec![
            Step {
                at_ms: 1,
                weights: weights(1),
            },
            Step {
                at_ms: 1,
                weights: weights(2),
            },
        ];
        assert!(Schedule::new(dup).is_none());
    }
}
