//! A strict, allocation-light JSON reader and writer for inference bodies.
//!
//! Tensor `data` goes in one pass from the request bytes into the typed
//! buffer (no `serde_json::Value` per element) and back out with a
//! shortest round-trip float printer. Floats also take Triton's `NaN`,
//! `Infinity` and `-Infinity` literals, in both directions (Python's `json`
//! and tritonclient send them). Small values (names, parameters) are
//! handed to serde_json as byte slices, so their rules stay serde_json's.

use std::borrow::Cow;
use std::fmt;

use half::f16;
use serde::de::DeserializeOwned;

use crate::tensor::{Data, DataType};

/// A syntax error at a byte offset of the document.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonError {
    pub msg: String,
    pub at: usize,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.msg, self.at)
    }
}

/// Why tensor data could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum DataError {
    /// The document is not JSON.
    Syntax(JsonError),
    /// Element `index` (row-major, counted from 0) is not a value of the
    /// datatype.
    Element { index: usize, msg: String },
    /// More elements than the shape holds.
    TooMany(usize),
}

impl From<JsonError> for DataError {
    fn from(e: JsonError) -> Self {
        DataError::Syntax(e)
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Syntax(e) => write!(f, "invalid JSON in data: {e}"),
            DataError::Element { index, msg } => write!(f, "element {index}: {msg}"),
            DataError::TooMany(n) => write!(f, "more data elements than the shape holds ({n})"),
        }
    }
}

/// A cursor over one JSON document with a nesting limit.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    depth: usize,
    max_depth: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], max_depth: usize) -> Self {
        Reader {
            buf,
            pos: 0,
            depth: 0,
            max_depth,
        }
    }

    /// A reader positioned at `span`, a slice previously returned by
    /// [`Reader::skip`] on this document (so offsets in errors stay
    /// document offsets).
    pub fn at_span(&self, span: &'a [u8]) -> Self {
        let start = (span.as_ptr() as usize).saturating_sub(self.buf.as_ptr() as usize);
        Reader {
            buf: self.buf,
            pos: start.min(self.buf.len()),
            depth: self.depth,
            max_depth: self.max_depth,
        }
    }

    pub fn error(&self, msg: impl Into<String>) -> JsonError {
        JsonError {
            msg: msg.into(),
            at: self.pos,
        }
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.buf.get(self.pos) {
            self.pos += 1;
        }
    }

    #[inline]
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.buf.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> Result<(), JsonError> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(&format!("expected `{}`", c as char)))
        }
    }

    fn unexpected(&self, want: &str) -> JsonError {
        match self.buf.get(self.pos) {
            None => self.error(format!("{want}, found the end of the document")),
            Some(_) => self.error(want),
        }
    }

    /// Checks that only whitespace is left.
    pub fn end(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("trailing characters")),
        }
    }

    fn enter(&mut self) -> Result<(), JsonError> {
        self.depth += 1;
        if self.depth > self.max_depth {
            return Err(self.error(format!("JSON nesting deeper than {}", self.max_depth)));
        }
        Ok(())
    }

    /// Opens a container at `open`; `true` if it is empty (its `close`
    /// already read and the depth restored).
    fn open(&mut self, open: u8, close: u8) -> Result<bool, JsonError> {
        self.eat(open)?;
        self.enter()?;
        if self.peek() == Some(close) {
            self.pos += 1;
            self.depth -= 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// Reads an object, calling `member` with each key; `member` must
    /// consume the value.
    pub fn object<E: From<JsonError>>(
        &mut self,
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.open(b'{', b'}')? {
            return Ok(());
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.unexpected("expected a string key").into());
            }
            let key = self.string()?;
            self.eat(b':')?;
            member(self, key)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(self.unexpected("expected `,` or `}`").into()),
            }
        }
    }

    /// Reads an array, calling `item` for each element; `item` must
    /// consume it.
    pub fn array<E: From<JsonError>>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.open(b'[', b']')? {
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(self.unexpected("expected `,` or `]`").into()),
            }
        }
    }

    /// The raw bytes of a string, quotes included, and whether it has
    /// escapes.
    fn string_span(&mut self) -> Result<(&'a [u8], bool), JsonError> {
        self.eat(b'"')?;
        let start = self.pos - 1;
        let mut escaped = false;
        loop {
            let rest = self.buf.get(self.pos..).unwrap_or_default();
            let Some(i) = rest
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            else {
                self.pos = self.buf.len();
                return Err(self.error("unterminated string"));
            };
            self.pos += i;
            match rest[i] {
                b'"' => {
                    self.pos += 1;
                    return Ok((&self.buf[start..self.pos], escaped));
                }
                b'\\' => {
                    escaped = true;
                    self.pos += 2;
                }
                _ => return Err(self.error("control character in string")),
            }
        }
    }

    /// Reads a string.
    pub fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        let at = self.pos;
        let (span, escaped) = self.string_span()?;
        let inner = &span[1..span.len() - 1];
        let fail = |msg: String| JsonError { msg, at };
        if escaped {
            serde_json::from_slice::<String>(span)
                .map(Cow::Owned)
                .map_err(|e| fail(format!("invalid string: {e}")))
        } else {
            std::str::from_utf8(inner)
                .map(Cow::Borrowed)
                .map_err(|_| fail("string is not UTF-8".into()))
        }
    }

    /// Skips one value (validating it; floats may be `NaN` or
    /// `±Infinity`) and returns its bytes.
    pub fn skip(&mut self) -> Result<&'a [u8], JsonError> {
        self.ws();
        let start = self.pos;
        match self.buf.get(self.pos) {
            Some(b'{') => self.object(|r, _| r.skip().map(drop))?,
            Some(b'[') => self.array(|r| r.skip().map(drop))?,
            Some(b'"') => {
                self.string_span()?;
            }
            Some(b't') => self.literal("true")?,
            Some(b'f') => self.literal("false")?,
            Some(b'n') => self.literal("null")?,
            Some(b'N' | b'I') => {
                self.special_float()?;
            }
            Some(b'-' | b'0'..=b'9') => {
                if self.buf.get(self.pos + 1) == Some(&b'I') {
                    self.special_float()?;
                } else {
                    self.number()?;
                }
            }
            _ => return Err(self.unexpected("expected a value")),
        }
        Ok(&self.buf[start..self.pos])
    }

    /// Finds the end of a value by its brackets and strings alone; its
    /// scalars are checked when it is read with [`Reader::at_span`].
    pub fn skip_raw(&mut self) -> Result<&'a [u8], JsonError> {
        self.ws();
        let start = self.pos;
        let mut open = 0usize;
        loop {
            match self.buf.get(self.pos) {
                None if open == 0 && self.pos > start => break,
                None => return Err(self.unexpected("expected a value")),
                Some(b'"') => {
                    self.string_span()?;
                    if open == 0 {
                        break;
                    }
                }
                Some(b'[' | b'{') => {
                    open += 1;
                    if self.depth + open > self.max_depth {
                        return Err(
                            self.error(format!("JSON nesting deeper than {}", self.max_depth))
                        );
                    }
                    self.pos += 1;
                }
                Some(b']' | b'}') if open > 0 => {
                    open -= 1;
                    self.pos += 1;
                    if open == 0 {
                        break;
                    }
                }
                Some(b',' | b']' | b'}' | b' ' | b'\n' | b'\r' | b'\t') if open == 0 => {
                    if self.pos == start {
                        return Err(self.error("expected a value"));
                    }
                    break;
                }
                Some(_) => self.pos += 1,
            }
        }
        Ok(&self.buf[start..self.pos])
    }

    /// Reads a small value with serde_json (so `T`'s serde rules apply).
    pub fn value<T: DeserializeOwned>(&mut self) -> Result<T, JsonError> {
        self.ws();
        let at = self.pos;
        let span = self.skip()?;
        serde_json::from_slice(span).map_err(|e| JsonError {
            msg: strip_position(&e.to_string()),
            at,
        })
    }

    fn literal(&mut self, word: &str) -> Result<(), JsonError> {
        if self.buf.get(self.pos..self.pos + word.len()) == Some(word.as_bytes()) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.error("expected a value"))
        }
    }

    /// `NaN`, `Infinity` or `-Infinity`.
    fn special_float(&mut self) -> Result<f64, JsonError> {
        for (word, v) in [
            ("NaN", f64::NAN),
            ("Infinity", f64::INFINITY),
            ("-Infinity", f64::NEG_INFINITY),
        ] {
            if self.buf.get(self.pos..self.pos + word.len()) == Some(word.as_bytes()) {
                self.pos += word.len();
                return Ok(v);
            }
        }
        Err(self.error("expected a value"))
    }

    /// Scans a JSON number (`-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?`);
    /// returns its text and whether it is an integer.
    #[inline]
    fn number(&mut self) -> Result<(&'a [u8], bool), JsonError> {
        self.decimal().map(|d| (d.text, d.int))
    }

    /// Scans a JSON number and collects its value on the way: its leading
    /// digits as an integer (as many as a u64 holds) and the power of ten
    /// that scales them.
    #[inline]
    fn decimal(&mut self) -> Result<Decimal<'a>, JsonError> {
        let b = self.buf;
        let start = self.pos;
        let mut i = start;
        let neg = b.get(i) == Some(&b'-');
        if neg {
            i += 1;
        }
        let mut d = Decimal {
            text: &[],
            neg,
            mantissa: 0,
            exp10: 0,
            exact: true,
            int: true,
        };
        match b.get(i) {
            Some(b'0') => {
                i += 1;
                if b.get(i).is_some_and(u8::is_ascii_digit) {
                    self.pos = i;
                    return Err(self.error("invalid number: leading zero"));
                }
            }
            Some(b'1'..=b'9') => i = digits(b, i, &mut d, false),
            _ => {
                self.pos = i;
                return Err(self.error("invalid number"));
            }
        }
        if b.get(i) == Some(&b'.') {
            d.int = false;
            let first = i + 1;
            i = digits(b, first, &mut d, true);
            if i == first {
                self.pos = i;
                return Err(self.error("invalid number: no digit after `.`"));
            }
        }
        if let Some(b'e' | b'E') = b.get(i) {
            d.int = false;
            i += 1;
            let negative = match b.get(i) {
                Some(b'-') => {
                    i += 1;
                    true
                }
                Some(b'+') => {
                    i += 1;
                    false
                }
                _ => false,
            };
            let first = i;
            // Saturates far beyond any float's range.
            let mut e: i64 = 0;
            while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
                e = (e * 10 + i64::from(c - b'0')).min(1 << 40);
                i += 1;
            }
            if i == first {
                self.pos = i;
                return Err(self.error("invalid number: no digit in the exponent"));
            }
            d.exp10 += if negative { -e } else { e };
        }
        self.pos = i;
        d.text = &b[start..i];
        Ok(d)
    }

    /// The text of the token at the cursor, for error messages.
    fn token_here(&self) -> String {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let end = rest
            .iter()
            .position(|b| matches!(b, b',' | b']' | b'}' | b' ' | b'\n' | b'\r' | b'\t'))
            .unwrap_or(rest.len());
        snippet(&rest[..end])
    }
}

/// How many of the 8 bytes of `v` (little-endian), from the first, are
/// ASCII digits. A byte's high bit in `flags` is set when the byte is below
/// `0` (the subtraction) or above `9` (the addition); carries and borrows
/// only start at such bytes and only move up, so the lowest flag is exact.
#[inline]
fn leading_digits(v: u64) -> usize {
    let flags = v.wrapping_sub(0x3030_3030_3030_3030) | v.wrapping_add(0x4646_4646_4646_4646);
    ((flags & 0x8080_8080_8080_8080).trailing_zeros() / 8) as usize
}

/// The value of the first `n` (1..=8) ASCII digits of `v` (little-endian):
/// the digits move to the top bytes (zeros below are leading zeros), then
/// three multiplications combine them.
#[inline]
fn digits_value(v: u64, n: usize) -> u64 {
    let mask = 0x0000_00FF_0000_00FF;
    // No borrow crosses the n digit bytes; the bytes above are shifted out.
    let v = v.wrapping_sub(0x3030_3030_3030_3030) << (64 - 8 * n);
    let v = v.wrapping_mul(10).wrapping_add(v >> 8);
    let hi = (v & mask).wrapping_mul(0x000F_4240_0000_0064);
    let lo = ((v >> 16) & mask).wrapping_mul(0x0000_2710_0000_0001);
    hi.wrapping_add(lo) >> 32
}

/// 10^n for n in 0..=8.
const POW10_U64: [u64; 9] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
];

/// Reads the digits at `i` into `d` (up to eight per step while they fit);
/// returns the index past them. Digits beyond what a u64 holds scale
/// the exponent (integer part) or are dropped (fraction); a nonzero one
/// makes the value inexact.
#[inline]
fn digits(b: &[u8], mut i: usize, d: &mut Decimal<'_>, fraction: bool) -> usize {
    // Below this, `mantissa * 10^8 + 99_999_999` fits in a u64.
    const ROOM_8: u64 = (u64::MAX - 99_999_999) / 100_000_000;
    const ROOM_1: u64 = (u64::MAX - 9) / 10;
    while d.mantissa < ROOM_8 {
        let Some(chunk) = b.get(i..i + 8) else { break };
        let v = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        let n = leading_digits(v);
        if n == 0 {
            return i;
        }
        d.mantissa = d.mantissa * POW10_U64[n] + digits_value(v, n);
        if fraction {
            d.exp10 -= n as i64;
        }
        i += n;
        if n < 8 {
            return i;
        }
    }
    while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
        if d.mantissa < ROOM_1 {
            d.mantissa = d.mantissa * 10 + u64::from(c - b'0');
            if fraction {
                d.exp10 -= 1;
            }
        } else {
            if !fraction {
                d.exp10 += 1;
            }
            d.exact &= c == b'0';
        }
        i += 1;
    }
    i
}

/// A JSON number as the validating scan saw it: `±mantissa × 10^exp10`,
/// exactly when `exact` (no nonzero digit beyond what the u64 holds).
#[derive(Debug, Clone, Copy)]
struct Decimal<'a> {
    text: &'a [u8],
    neg: bool,
    mantissa: u64,
    exp10: i64,
    exact: bool,
    int: bool,
}

/// Powers of ten that f64 holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

impl Decimal<'_> {
    /// `mantissa × 10^exp10` in f64 with at most two roundings (the
    /// mantissa's and the product's or quotient's): within 2 ulp of the
    /// true value, and exact (Clinger's fast path) when the mantissa fits
    /// in 53 bits. `None` when the power of ten is not exact in f64.
    #[inline]
    fn approx(&self) -> Option<f64> {
        let p = *POW10.get(usize::try_from(self.exp10.unsigned_abs()).ok()?)?;
        let m = self.mantissa as f64;
        Some(if self.exp10 < 0 { m / p } else { m * p })
    }

    /// The nearest f32, `None` when it overflows. Most numbers take the
    /// f64 estimate: it is within 2 ulp (of f64) of the true value, so it
    /// rounds to the same f32 unless it lies that close to a halfway
    /// point between two f32s (or outside f32's normal range); those, and
    /// numbers with more than 19 digits, go to the standard library's
    /// exact parser.
    #[inline]
    fn to_f32(self) -> Option<f32> {
        if self.exact {
            if self.mantissa == 0 {
                return Some(if self.neg { -0.0 } else { 0.0 });
            }
            if let Some(x) = self.approx() {
                let bits = x.to_bits();
                let exp = (bits >> 52) & 0x7ff;
                // The 29 bits f32 drops from f64's 52-bit fraction.
                let dropped = bits & ((1 << 29) - 1);
                // f32's normal range is 2^-126 ..< 2^128 (biased f64
                // exponents 897 ..= 1150).
                if (897..=1150).contains(&exp) && dropped.abs_diff(1 << 28) > 8 {
                    let v = x as f32;
                    return v.is_finite().then_some(if self.neg { -v } else { v });
                }
            }
        }
        self.parse_exact()
    }

    /// The nearest f64, `None` when it overflows: Clinger's exact fast
    /// path, else the standard library's exact parser.
    #[inline]
    fn to_f64(self) -> Option<f64> {
        if self.exact && self.mantissa <= 1 << 53 {
            if let Some(x) = self.approx() {
                return Some(if self.neg { -x } else { x });
            }
        }
        self.parse_exact()
    }

    /// Correctly rounded parse of the text (Eisel-Lemire, then big
    /// decimals), for numbers the fast paths do not decide.
    #[cold]
    fn parse_exact<T: std::str::FromStr + Finite>(self) -> Option<T> {
        // The scan admitted only ASCII.
        let text = std::str::from_utf8(self.text).ok()?;
        text.parse::<T>().ok().filter(Finite::finite)
    }
}

trait Finite {
    fn finite(&self) -> bool;
}

impl Finite for f32 {
    fn finite(&self) -> bool {
        self.is_finite()
    }
}

impl Finite for f64 {
    fn finite(&self) -> bool {
        self.is_finite()
    }
}

/// At most 32 characters of `bytes`, with the full length when cut.
fn snippet(bytes: &[u8]) -> String {
    const MAX: usize = 32;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    if bytes.len() > MAX {
        format!("{text}... ({} bytes)", bytes.len())
    } else if bytes.is_empty() {
        "nothing".to_string()
    } else {
        text.into_owned()
    }
}

/// serde_json appends "at line L column C" relative to the slice it saw;
/// our offsets are document offsets, so drop theirs.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// One tensor element read straight from JSON text.
trait Element: Sized {
    const DT: DataType;
    fn read(r: &mut Reader<'_>) -> Result<Self, String>;
}

fn not_valid(r: &Reader<'_>, dt: DataType) -> String {
    match r.buf.get(r.pos) {
        Some(b'"') => format!("a string is not a valid {dt}"),
        Some(b'{') => format!("an object is not a valid {dt}"),
        _ => format!("{} is not a valid {dt}", r.token_here()),
    }
}

/// Reads a float element: a JSON number (converted by `convert`, `None`
/// when out of range) or a non-finite literal.
#[inline]
fn read_float<T>(
    r: &mut Reader<'_>,
    dt: DataType,
    convert: impl Fn(Decimal<'_>) -> Option<T>,
    special: impl Fn(f64) -> T,
) -> Result<T, String> {
    let start = r.pos;
    match r.buf.get(r.pos) {
        Some(b'N' | b'I') => {}
        Some(b'-') if r.buf.get(r.pos + 1) == Some(&b'I') => {}
        Some(b'-' | b'0'..=b'9') => {
            let d = r.decimal().map_err(|e| {
                r.pos = start;
                format!("{}: {}", r.token_here(), e.msg)
            })?;
            return convert(d)
                .ok_or_else(|| format!("{} is out of range for {dt}", snippet(d.text)));
        }
        _ => return Err(not_valid(r, dt)),
    }
    match r.special_float() {
        Ok(v) => Ok(special(v)),
        Err(_) => Err(not_valid(r, dt)),
    }
}

impl Element for f32 {
    const DT: DataType = DataType::F32;
    #[inline]
    fn read(r: &mut Reader<'_>) -> Result<Self, String> {
        read_float(r, Self::DT, |d| d.to_f32(), |v| v as f32)
    }
}

impl Element for f64 {
    const DT: DataType = DataType::F64;
    #[inline]
    fn read(r: &mut Reader<'_>) -> Result<Self, String> {
        read_float(r, Self::DT, |d| d.to_f64(), |v| v)
    }
}

impl Element for f16 {
    const DT: DataType = DataType::F16;
    fn read(r: &mut Reader<'_>) -> Result<Self, String> {
        read_float(
            r,
            Self::DT,
            |d| {
                let x = f16::from_f64(d.parse_exact::<f64>()?);
                x.is_finite().then_some(x)
            },
            f16::from_f64,
        )
    }
}

impl Element for bool {
    const DT: DataType = DataType::Bool;
    fn read(r: &mut Reader<'_>) -> Result<Self, String> {
        if r.literal("true").is_ok() {
            Ok(true)
        } else if r.literal("false").is_ok() {
            Ok(false)
        } else {
            Err(not_valid(r, Self::DT))
        }
    }
}

impl Element for Vec<u8> {
    const DT: DataType = DataType::Bytes;
    fn read(r: &mut Reader<'_>) -> Result<Self, String> {
        if r.buf.get(r.pos) != Some(&b'"') {
            return Err(not_valid(r, Self::DT));
        }
        match r.string() {
            Ok(s) => Ok(s.into_owned().into_bytes()),
            Err(e) => Err(e.msg),
        }
    }
}

/// Reads an integer element: digits only (no fraction, exponent or
/// non-finite literal), in range.
fn read_int<T: TryFrom<i128>>(r: &mut Reader<'_>, dt: DataType) -> Result<T, String> {
    let start = r.pos;
    let (text, int) = match r.buf.get(r.pos) {
        Some(b'-') if r.buf.get(r.pos + 1) == Some(&b'I') => return Err(not_valid(r, dt)),
        Some(b'-' | b'0'..=b'9') => r.number().map_err(|e| {
            r.pos = start;
            format!("{}: {}", r.token_here(), e.msg)
        })?,
        _ => return Err(not_valid(r, dt)),
    };
    let out_of_range = || format!("{} is not a valid {dt}", snippet(text));
    // 20 digits hold every 64-bit value and cannot overflow i128.
    if !int || text.len() > 21 {
        return Err(out_of_range());
    }
    let (neg, digits) = match text.split_first() {
        Some((b'-', d)) => (true, d),
        _ => (false, text),
    };
    let mut v: i128 = 0;
    for d in digits {
        v = v * 10 + i128::from(d - b'0');
    }
    T::try_from(if neg { -v } else { v }).map_err(|_| out_of_range())
}

macro_rules! int_element {
    ($($t:ty => $dt:ident),*) => {$(
        impl Element for $t {
            const DT: DataType = DataType::$dt;
            #[inline]
            fn read(r: &mut Reader<'_>) -> Result<Self, String> {
                read_int(r, Self::DT)
            }
        }
    )*};
}
int_element!(u8 => U8, u16 => U16, u32 => U32, u64 => U64, i8 => I8, i16 => I16, i32 => I32, i64 => I64);

/// Reads a `data` value (flat or nested arrays, or a single scalar) into
/// `out`, refusing more than `limit` elements.
fn read_elements<T: Element>(
    r: &mut Reader<'_>,
    out: &mut Vec<T>,
    limit: usize,
) -> Result<(), DataError> {
    if r.peek() != Some(b'[') {
        if out.len() >= limit {
            return Err(DataError::TooMany(limit));
        }
        let v = T::read(r).map_err(|msg| DataError::Element {
            index: out.len(),
            msg,
        })?;
        out.push(v);
        return Ok(());
    }
    // `Reader::array` with the scalar item read in place (the common,
    // flat case costs no call per element); nested arrays recurse.
    if r.open(b'[', b']')? {
        return Ok(());
    }
    loop {
        if r.buf.get(r.pos) == Some(&b'[') {
            read_elements(r, out, limit)?;
        } else {
            if out.len() >= limit {
                return Err(DataError::TooMany(limit));
            }
            let v = T::read(r).map_err(|msg| DataError::Element {
                index: out.len(),
                msg,
            })?;
            out.push(v);
        }
        match r.peek() {
            Some(b',') => {
                r.pos += 1;
                r.ws();
            }
            Some(b']') => {
                r.pos += 1;
                r.depth -= 1;
                return Ok(());
            }
            _ => return Err(r.unexpected("expected `,` or `]`").into()),
        }
    }
}

/// Reads a tensor's `data` of datatype `dt` at the reader's position into
/// a flat row-major buffer, refusing more than `limit` elements so that a
/// lying shape cannot make the server allocate more than it must.
pub fn read_data(r: &mut Reader<'_>, dt: DataType, limit: usize) -> Result<Data, DataError> {
    fn go<T: Element>(r: &mut Reader<'_>, limit: usize) -> Result<Vec<T>, DataError> {
        let mut v = Vec::with_capacity(limit.min(1 << 20));
        read_elements(r, &mut v, limit)?;
        Ok(v)
    }
    Ok(match dt {
        DataType::Bool => Data::Bool(go(r, limit)?),
        DataType::U8 => Data::U8(go(r, limit)?),
        DataType::U16 => Data::U16(go(r, limit)?),
        DataType::U32 => Data::U32(go(r, limit)?),
        DataType::U64 => Data::U64(go(r, limit)?),
        DataType::I8 => Data::I8(go(r, limit)?),
        DataType::I16 => Data::I16(go(r, limit)?),
        DataType::I32 => Data::I32(go(r, limit)?),
        DataType::I64 => Data::I64(go(r, limit)?),
        DataType::F16 => Data::F16(go(r, limit)?),
        DataType::F32 => Data::F32(go(r, limit)?),
        DataType::F64 => Data::F64(go(r, limit)?),
        DataType::Bytes => Data::Bytes(go(r, limit)?),
    })
}

/// Decodes a whole document holding only tensor data.
pub fn data_from_slice(
    bytes: &[u8],
    dt: DataType,
    limit: usize,
    max_depth: usize,
) -> Result<Data, DataError> {
    let mut r = Reader::new(bytes, max_depth);
    let d = read_data(&mut r, dt, limit)?;
    r.end()?;
    Ok(d)
}

/// Appends a float as JSON: shortest round-trip digits, or Triton's
/// `NaN` / `Infinity` / `-Infinity`.
fn write_float<F: zmij::Float + Copy>(out: &mut Vec<u8>, x: F, nan: bool, inf: Option<bool>) {
    match (nan, inf) {
        (true, _) => out.extend_from_slice(b"NaN"),
        (_, Some(true)) => out.extend_from_slice(b"Infinity"),
        (_, Some(false)) => out.extend_from_slice(b"-Infinity"),
        _ => out.extend_from_slice(zmij::Buffer::new().format_finite(x).as_bytes()),
    }
}

fn write_seq<T>(out: &mut Vec<u8>, v: &[T], mut one: impl FnMut(&mut Vec<u8>, &T)) {
    out.push(b'[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        one(out, x);
    }
    out.push(b']');
}

fn write_int<I: itoa::Integer + Copy>(out: &mut Vec<u8>, x: I) {
    out.extend_from_slice(itoa::Buffer::new().format(x).as_bytes());
}

fn inf_sign(is_inf: bool, neg: bool) -> Option<bool> {
    is_inf.then_some(!neg)
}

/// Appends `data` as a flat JSON array (BYTES as strings, lossily when
/// not UTF-8).
pub fn write_data(out: &mut Vec<u8>, data: &Data) {
    match data {
        Data::F32(v) => write_seq(out, v, |o, x| {
            write_float(
                o,
                *x,
                x.is_nan(),
                inf_sign(x.is_infinite(), x.is_sign_negative()),
            )
        }),
        Data::F64(v) => write_seq(out, v, |o, x| {
            write_float(
                o,
                *x,
                x.is_nan(),
                inf_sign(x.is_infinite(), x.is_sign_negative()),
            )
        }),
        Data::F16(v) => write_seq(out, v, |o, x| {
            let x = f32::from(*x);
            write_float(
                o,
                x,
                x.is_nan(),
                inf_sign(x.is_infinite(), x.is_sign_negative()),
            )
        }),
        Data::Bool(v) => write_seq(out, v, |o, x| {
            o.extend_from_slice(if *x { b"true" } else { b"false" })
        }),
        Data::U8(v) => write_seq(out, v, |o, x| write_int(o, *x)),
        Data::U16(v) => write_seq(out, v, |o, x| write_int(o, *x)),
        Data::U32(v) => write_seq(out, v, |o, x| write_int(o, *x)),
        Data::U64(v) => write_seq(out, v, |o, x| write_int(o, *x)),
        Data::I8(v) => write_seq(out, v, |o, x| write_int(o, *x)),
        Data::I16(v) => write_seq(out, v, |o, x| write_int(o, *x)),
        Data::I32(v) => write_seq(out, v, |o, x| write_int(o, *x)),
        Data::I64(v) => write_seq(out, v, |o, x| write_int(o, *x)),
        Data::Bytes(v) => write_seq(out, v, |o, x| write_str(o, &String::from_utf8_lossy(x))),
    }
}

/// Appends a shape as a JSON array.
pub fn write_dims(out: &mut Vec<u8>, dims: &[usize]) {
    write_seq(out, dims, |o, x| write_int(o, *x));
}

/// Appends a JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str, dt: DataType, limit: usize) -> Result<Data, DataError> {
        data_from_slice(s.as_bytes(), dt, limit, 32)
    }

    fn err(s: &str, dt: DataType, limit: usize) -> String {
        data(s, dt, limit).unwrap_err().to_string()
    }

    #[test]
    fn nested_json_flattens_row_major() {
        let d = data("[[1, 2.5], [3, 4]]", DataType::F32, 4).unwrap();
        assert_eq!(d, Data::F32(vec![1.0, 2.5, 3.0, 4.0]));
        assert_eq!(data(" 7 ", DataType::I32, 1).unwrap(), Data::I32(vec![7]));
        assert_eq!(data("[]", DataType::I32, 1).unwrap(), Data::I32(vec![]));
        // Scalars and arrays may mix at any level; empty ones add nothing.
        let d = data(" [ 1 ,[2, [3]] , [ ] ,4 ] ", DataType::F32, 9).unwrap();
        assert_eq!(d, Data::F32(vec![1.0, 2.0, 3.0, 4.0]));
        assert!(matches!(
            data("[[1, 2], 3]", DataType::F32, 2),
            Err(DataError::TooMany(2))
        ));
    }

    #[test]
    fn non_finite_literals_are_floats_only() {
        let d = data("[NaN, Infinity, -Infinity, -0.0]", DataType::F32, 4).unwrap();
        let Data::F32(v) = d else { panic!() };
        assert!(v[0].is_nan());
        assert_eq!(&v[1..3], &[f32::INFINITY, f32::NEG_INFINITY]);
        assert!(v[3] == 0.0 && v[3].is_sign_negative());
        let Data::F64(v) = data("[NaN, -Infinity]", DataType::F64, 2).unwrap() else {
            panic!()
        };
        assert!(v[0].is_nan() && v[1] == f64::NEG_INFINITY);
        let Data::F16(v) = data("[Infinity]", DataType::F16, 1).unwrap() else {
            panic!()
        };
        assert!(v[0].is_infinite());
        assert_eq!(
            err("[1, NaN]", DataType::I64, 2),
            "element 1: NaN is not a valid INT64"
        );
        assert_eq!(
            err("[[1], [2, -Infinity]]", DataType::U8, 3),
            "element 2: -Infinity is not a valid UINT8"
        );
        assert_eq!(
            err("[Infinity]", DataType::Bool, 1),
            "element 0: Infinity is not a valid BOOL"
        );
        // Not Triton's spelling.
        assert!(data("[nan]", DataType::F32, 1).is_err());
        assert!(data("[inf]", DataType::F32, 1).is_err());
        assert!(data("[+Infinity]", DataType::F32, 1).is_err());
        assert!(data("[NaNa]", DataType::F32, 1).is_err());
    }

    #[test]
    fn malformed_numbers_name_the_element() {
        let cases = [
            (
                "[0, 1e999]",
                DataType::F32,
                "element 1: 1e999 is out of range for FP32",
            ),
            (
                "[0, 1e999]",
                DataType::F64,
                "element 1: 1e999 is out of range for FP64",
            ),
            (
                "[1e300]",
                DataType::F32,
                "element 0: 1e300 is out of range for FP32",
            ),
            ("[1, -]", DataType::F32, "element 1: -: invalid number"),
            ("[.5]", DataType::F32, "element 0: .5 is not a valid FP32"),
            (
                "[1, 01]",
                DataType::F32,
                "element 1: 01: invalid number: leading zero",
            ),
            (
                "[1.]",
                DataType::F32,
                "element 0: 1.: invalid number: no digit after `.`",
            ),
            (
                "[1e]",
                DataType::F64,
                "element 0: 1e: invalid number: no digit in the exponent",
            ),
            ("[+1]", DataType::I32, "element 0: +1 is not a valid INT32"),
            (
                "[1, \"a\"]",
                DataType::F32,
                "element 1: a string is not a valid FP32",
            ),
            (
                "[true]",
                DataType::F32,
                "element 0: true is not a valid FP32",
            ),
            (
                "[null]",
                DataType::F32,
                "element 0: null is not a valid FP32",
            ),
            (
                "[1.5]",
                DataType::I64,
                "element 0: 1.5 is not a valid INT64",
            ),
            (
                "[1e2]",
                DataType::I64,
                "element 0: 1e2 is not a valid INT64",
            ),
            ("[256]", DataType::U8, "element 0: 256 is not a valid UINT8"),
            ("[-1]", DataType::U32, "element 0: -1 is not a valid UINT32"),
            ("[1]", DataType::Bool, "element 0: 1 is not a valid BOOL"),
            ("[1]", DataType::Bytes, "element 0: 1 is not a valid BYTES"),
            (
                "[{}]",
                DataType::F32,
                "element 0: an object is not a valid FP32",
            ),
            (
                "[1, 2, 3]",
                DataType::F32,
                "more data elements than the shape holds (2)",
            ),
        ];
        for (doc, dt, want) in cases {
            assert_eq!(err(doc, dt, 2), want, "{doc} as {dt}");
        }
        // A million digits: refused for integers, parsed exactly (and found
        // out of range) for floats, the message cut short.
        let huge = format!("[{}]", "9".repeat(1_000_000));
        let e = err(&huge, DataType::I64, 1);
        assert!(
            e.starts_with("element 0: 999") && e.ends_with("(1000000 bytes) is not a valid INT64"),
            "{e}"
        );
        assert!(e.len() < 100);
        let e = err(&huge, DataType::F32, 1);
        assert!(e.contains("out of range for FP32") && e.len() < 100, "{e}");
        let tiny = format!("[0.{}1]", "0".repeat(1_000_000));
        assert_eq!(data(&tiny, DataType::F64, 1).unwrap(), Data::F64(vec![0.0]));
        let long = format!("[1.{}]", "0".repeat(1_000_000));
        assert_eq!(data(&long, DataType::F32, 1).unwrap(), Data::F32(vec![1.0]));
    }

    #[test]
    fn syntax_errors_are_reported() {
        for doc in ["[1 2]", "[1,]", "[", "[1", "1 2", "[[1]", "[\"a]"] {
            assert!(data(doc, DataType::F32, 9).is_err(), "{doc}");
        }
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        assert!(err(&deep, DataType::F32, 9).contains("nesting deeper than 32"));
    }

    #[test]
    fn integers_cover_their_whole_range() {
        let d = data(
            "[-9223372036854775808, 9223372036854775807]",
            DataType::I64,
            2,
        )
        .unwrap();
        assert_eq!(d, Data::I64(vec![i64::MIN, i64::MAX]));
        let d = data("[18446744073709551615, 0]", DataType::U64, 2).unwrap();
        assert_eq!(d, Data::U64(vec![u64::MAX, 0]));
        assert!(data("[18446744073709551616]", DataType::U64, 1).is_err());
        assert!(data("[-9223372036854775809]", DataType::I64, 1).is_err());
        assert_eq!(data("[-0]", DataType::U8, 1).unwrap(), Data::U8(vec![0]));
    }

    #[test]
    fn floats_parse_exactly_at_their_precision() {
        // Python's repr of float32 values, and values where parsing via
        // f64 would round twice.
        let cases: [(&str, f32); 4] = [
            ("0.30000001192092896", 0.3),
            ("3.4028234663852886e38", f32::MAX),
            ("1.00000005960464477539062500000001", 1.0000001),
            ("1e-45", 1e-45),
        ];
        for (text, want) in cases {
            let d = data(text, DataType::F32, 1).unwrap();
            assert_eq!(d, Data::F32(vec![want]), "{text}");
        }
        let d = data(
            "[0.1, 2.2250738585072014e-308, 1.7976931348623157e308]",
            DataType::F64,
            3,
        );
        assert_eq!(
            d.unwrap(),
            Data::F64(vec![0.1, f64::MIN_POSITIVE, f64::MAX])
        );
    }

    /// The one-pass conversion against the standard library's correctly
    /// rounded parser, on the texts clients send (Python's 17-digit repr
    /// of float32 values, shortest digits, 9 digits) and on the hard
    /// cases: halfway points between two f32s, exactly and a hair off,
    /// subnormals, overflow, long and exponent-heavy texts.
    #[test]
    fn fast_float_conversion_agrees_with_the_exact_parser() {
        let mut s: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        // Twice: the first copy has bytes after it (read eight at a
        // time), the second ends the document (read one by one).
        let check32 = |text: &str| {
            let want = text.parse::<f32>().ok().filter(|x| x.is_finite());
            let got = match data(&format!("[{text},{text}]"), DataType::F32, 2) {
                Ok(Data::F32(v)) => {
                    assert_eq!(v[0].to_bits(), v[1].to_bits(), "{text}");
                    Some(v[0])
                }
                Ok(other) => panic!("{other:?}"),
                Err(e) => {
                    assert!(e.to_string().contains("out of range"), "{text}: {e}");
                    None
                }
            };
            assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "{text}");
        };
        let check64 = |text: &str| {
            let want = text.parse::<f64>().ok().filter(|x| x.is_finite());
            let got = match data(&format!("[{text},{text}]"), DataType::F64, 2) {
                Ok(Data::F64(v)) => {
                    assert_eq!(v[0].to_bits(), v[1].to_bits(), "{text}");
                    Some(v[0])
                }
                Ok(other) => panic!("{other:?}"),
                Err(_) => None,
            };
            assert_eq!(got.map(f64::to_bits), want.map(f64::to_bits), "{text}");
        };
        for i in 0..40_000 {
            let bits = next() as u32;
            let x = f32::from_bits(bits);
            if !x.is_finite() {
                continue;
            }
            let wide = f64::from(x);
            check32(&format!("{wide}"));
            check32(&format!("{x}"));
            check32(&format!("{x:.8e}"));
            check32(&format!("{wide:.16e}"));
            check64(&format!("{wide}"));
            let any = f64::from_bits(next());
            if any.is_finite() {
                check64(&format!("{any}"));
                check64(&format!("{any:e}"));
            }
            // Halfway between x and its successor: exactly, a hair
            // either side, and cut to 17 and 19 digits.
            let up = f64::from(f32::from_bits(bits.wrapping_add(1)));
            if up.is_finite() {
                let mid = (wide + up) / 2.0;
                for t in [
                    format!("{mid:.40e}"),
                    format!("{mid:.16e}"),
                    format!("{mid:.18e}"),
                    format!("{}", f64::from_bits(mid.to_bits() + 1)),
                    format!("{}", f64::from_bits(mid.to_bits() - 1)),
                ] {
                    check32(t.trim_start_matches('+'));
                }
            }
            // Random digit strings with random exponents.
            let digits = 1 + (next() % 25) as usize;
            let t: String = (0..digits)
                .map(|_| char::from(b'0' + (next() % 10) as u8))
                .collect();
            let t = t.trim_start_matches('0').to_string();
            let t = if t.is_empty() { "0".to_string() } else { t };
            let e = (next() % 100) as i64 - 60;
            let text = if i % 2 == 0 {
                format!("{t}e{e}")
            } else {
                let (a, b) = t.split_at(t.len().div_ceil(2));
                format!("{a}.{}e{e}", if b.is_empty() { "0" } else { b })
            };
            check32(&text);
            check64(&text);
        }
        for text in [
            "16777217",
            "16777219",
            "0.1",
            "3.4028235e38",
            "3.4028236e38",
            "1.1754943e-38",
            "1.1754942e-38",
            "1e-46",
            "7e-46",
            "0.000000000000000000000000000000000000000000001",
            "9007199254740993",
            "123456789012345678901234567890",
            "1e22",
            "1e23",
            "-0",
            "-0.0e5",
        ] {
            check32(text);
            check64(text);
        }
    }

    /// The eight-bytes-at-a-time digit reader against a byte-by-byte
    /// one, on every mix of digits and the bytes around them.
    #[test]
    fn digit_runs_read_eight_at_a_time() {
        let others = [
            b'.', b'/', b':', b'e', b',', b']', b' ', b'-', 0x00, 0x80, 0xB9, 0xFF,
        ];
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        for case in 0..200_000u32 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let mut bytes = s.to_le_bytes();
            for (k, b) in bytes.iter_mut().enumerate() {
                let r = (s >> (k * 5)) as usize;
                *b = if (case as usize + r).is_multiple_of(3) {
                    others[r % others.len()]
                } else {
                    b'0' + (*b % 10)
                };
            }
            if case % 7 == 0 {
                bytes = *b"12345678";
            }
            let v = u64::from_le_bytes(bytes);
            let n = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
            assert_eq!(leading_digits(v), n, "{bytes:?}");
            if n > 0 {
                let want = bytes[..n]
                    .iter()
                    .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
                assert_eq!(digits_value(v, n), want, "{bytes:?}");
            }
        }
    }

    #[test]
    fn output_round_trips_and_writes_non_finite_literals() {
        let v = vec![
            0.1f32,
            -3.5,
            1e-45,
            f32::MAX,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            7.0,
        ];
        let mut out = Vec::new();
        write_data(&mut out, &Data::F32(v.clone()));
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            text,
            "[0.1,-3.5,1e-45,3.4028235e+38,NaN,Infinity,-Infinity,7.0]"
        );
        let Data::F32(back) = data_from_slice(&out, DataType::F32, 8, 4).unwrap() else {
            panic!()
        };
        for (a, b) in v.iter().zip(&back) {
            assert!(a.to_bits() == b.to_bits(), "{a} vs {b}");
        }
        let mut out = Vec::new();
        write_data(&mut out, &Data::F64(vec![0.1, f64::NAN, -f64::INFINITY]));
        assert_eq!(out, b"[0.1,NaN,-Infinity]");
        let mut out = Vec::new();
        write_data(&mut out, &Data::I64(vec![-1, i64::MAX]));
        assert_eq!(out, b"[-1,9223372036854775807]");
        let mut out = Vec::new();
        write_data(&mut out, &Data::Bytes(vec![b"a\"b".to_vec()]));
        assert_eq!(out, br#"["a\"b"]"#);
    }

    #[test]
    fn reader_reads_objects_and_strings() {
        let doc = br#" {"a": "x\u00e9", "b": [1, {"c": null}], "d": NaN} "#;
        let mut r = Reader::new(doc, 8);
        let mut seen = Vec::new();
        r.object(|r, key| -> Result<(), JsonError> {
            let span = r.skip()?;
            seen.push((key.into_owned(), String::from_utf8_lossy(span).into_owned()));
            Ok(())
        })
        .unwrap();
        r.end().unwrap();
        assert_eq!(seen[0], ("a".into(), r#""x\u00e9""#.into()));
        assert_eq!(seen[1].1, r#"[1, {"c": null}]"#);
        assert_eq!(seen[2].1, "NaN");
        let mut r = Reader::new(br#""x\u00e9\n""#, 8);
        assert_eq!(r.string().unwrap(), "x\u{e9}\n");
        for bad in [&br#""a"#[..], b"\"a\x01\"", br#""\x""#, b"\"\xff\""] {
            assert!(Reader::new(bad, 8).string().is_err());
        }
    }
}
