//! Reads one field of a JSON document without building the document.
//!
//! [`find`] walks the bytes once, validating the whole document (RFC 8259
//! grammar, nesting capped at [`MAX_DEPTH`]) and capturing the value at a
//! JSON pointer (RFC 6901). No allocation except for the answer. Routing on
//! a body field then costs one linear scan, not a `serde_json::Value`.

/// Deepest nesting accepted; deeper documents are refused, not recursed.
pub const MAX_DEPTH: usize = 64;

/// What the pointer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A JSON string, unescaped.
    String(String),
    /// An integer (no fraction or exponent) as written, e.g. `"2"`.
    Integer(String),
    /// Any other value: float, bool, null, object or array.
    OtherType,
}

/// Why no value was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    /// Not valid JSON (or nested deeper than [`MAX_DEPTH`]).
    Invalid,
    /// Valid JSON without that field.
    Missing,
    /// The pointer itself is malformed.
    BadPointer,
}

/// A parsed JSON pointer: `/a/b/0` → `["a", "b", "0"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    tokens: Vec<String>,
}

impl Pointer {
    /// Parses an RFC 6901 pointer. The empty pointer (whole document) is
    /// refused: routing needs a field.
    pub fn parse(s: &str) -> Option<Pointer> {
        let rest = s.strip_prefix('/')?;
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut t = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => t.push('~'),
                        Some('1') => t.push('/'),
                        _ => return None,
                    }
                } else {
                    t.push(c);
                }
            }
            tokens.push(t);
        }
        Some(Pointer { tokens })
    }

    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }
}

/// Finds `pointer` in `doc`, validating the whole document.
pub fn find(doc: &[u8], pointer: &Pointer) -> Result<Found, ScanError> {
    let mut s = Scanner {
        b: doc,
        i: 0,
        depth: 0,
        ptr: pointer.tokens(),
        found: None,
    };
    s.ws();
    s.value(Some(0))?;
    s.ws();
    if s.i != s.b.len() {
        return Err(ScanError::Invalid);
    }
    s.found.ok_or(ScanError::Missing)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    depth: usize,
    ptr: &'a [String],
    found: Option<Found>,
}

type R<T> = Result<T, ScanError>;

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn bump(&mut self) -> R<u8> {
        let c = self.peek().ok_or(ScanError::Invalid)?;
        self.i += 1;
        Ok(c)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, lit: &[u8]) -> R<()> {
        let end = self.i + lit.len();
        if self.b.get(self.i..end) == Some(lit) {
            self.i = end;
            Ok(())
        } else {
            Err(ScanError::Invalid)
        }
    }

    /// Scans one value. `level` is `Some(n)` while the path so far matches
    /// the first `n` pointer tokens; the value at `n == len` is captured.
    fn value(&mut self, level: Option<usize>) -> R<()> {
        let target = level == Some(self.ptr.len());
        match self.peek().ok_or(ScanError::Invalid)? {
            b'{' => {
                self.nest(|s| s.object(level.filter(|_| !target)))?;
                self.capture(target, Found::OtherType);
            }
            b'[' => {
                self.nest(|s| s.array(level.filter(|_| !target)))?;
                self.capture(target, Found::OtherType);
            }
            b'"' => {
                if target {
                    let v = self.string_owned()?;
                    self.capture(true, Found::String(v));
                } else {
                    self.string_skip()?;
                }
            }
            b't' => {
                self.expect(b"true")?;
                self.capture(target, Found::OtherType);
            }
            b'f' => {
                self.expect(b"false")?;
                self.capture(target, Found::OtherType);
            }
            b'n' => {
                self.expect(b"null")?;
                self.capture(target, Found::OtherType);
            }
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                let integer = self.number()?;
                if target {
                    let text = self.b.get(start..self.i).unwrap_or_default();
                    let found = match (integer, std::str::from_utf8(text)) {
                        (true, Ok(t)) => Found::Integer(t.to_owned()),
                        _ => Found::OtherType,
                    };
                    self.capture(true, found);
                }
            }
            _ => return Err(ScanError::Invalid),
        }
        Ok(())
    }

    fn capture(&mut self, target: bool, found: Found) {
        // Duplicate keys: the first occurrence wins, as in most parsers'
        // streaming mode; later duplicates are still validated.
        if target && self.found.is_none() {
            self.found = Some(found);
        }
    }

    fn nest(&mut self, f: impl FnOnce(&mut Self) -> R<()>) -> R<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ScanError::Invalid);
        }
        f(self)?;
        self.depth -= 1;
        Ok(())
    }

    fn object(&mut self, level: Option<usize>) -> R<()> {
        self.expect(b"{")?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            let want = level.and_then(|n| self.ptr.get(n));
            let matched = match want {
                Some(token) => self.key_equals(token)?,
                None => {
                    self.string_skip()?;
                    false
                }
            };
            self.ws();
            self.expect(b":")?;
            self.ws();
            let next = if matched { level.map(|n| n + 1) } else { None };
            self.value(next)?;
            self.ws();
            match self.bump()? {
                b',' => continue,
                b'}' => return Ok(()),
                _ => return Err(ScanError::Invalid),
            }
        }
    }

    fn array(&mut self, level: Option<usize>) -> R<()> {
        self.expect(b"[")?;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        let want: Option<usize> = level.and_then(|n| self.ptr.get(n)).and_then(|t| {
            if t == "0" || !t.starts_with('0') {
                t.parse().ok()
            } else {
                None
            }
        });
        let mut index = 0usize;
        loop {
            self.ws();
            let next = match (level, want) {
                (Some(n), Some(w)) if w == index => Some(n + 1),
                _ => None,
            };
            self.value(next)?;
            index += 1;
            self.ws();
            match self.bump()? {
                b',' => continue,
                b']' => return Ok(()),
                _ => return Err(ScanError::Invalid),
            }
        }
    }

    /// Reads a string (the opening quote is next), decoding escapes.
    fn string_owned(&mut self) -> R<String> {
        let mut out = Vec::new();
        self.string_with(|bytes| out.extend_from_slice(bytes))?;
        String::from_utf8(out).map_err(|_| ScanError::Invalid)
    }

    fn string_skip(&mut self) -> R<()> {
        self.string_with(|_| {})
    }

    /// Compares a key with `token` while scanning it.
    fn key_equals(&mut self, token: &str) -> R<bool> {
        let want = token.as_bytes();
        let mut at = 0usize;
        let mut equal = true;
        self.string_with(|bytes| {
            if equal {
                let end = at + bytes.len();
                equal = want.get(at..end) == Some(bytes);
                at = end;
            }
        })?;
        Ok(equal && at == want.len())
    }

    /// Scans a string, handing decoded pieces to `sink`.
    fn string_with(&mut self, mut sink: impl FnMut(&[u8])) -> R<()> {
        self.expect(b"\"")?;
        loop {
            let start = self.i;
            while let Some(c) = self.peek() {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.i += 1;
            }
            let run = self.b.get(start..self.i).ok_or(ScanError::Invalid)?;
            // Validate UTF-8 of raw runs: JSON text must be UTF-8.
            std::str::from_utf8(run).map_err(|_| ScanError::Invalid)?;
            sink(run);
            match self.bump()? {
                b'"' => return Ok(()),
                b'\\' => {
                    let e = self.bump()?;
                    let simple = match e {
                        b'"' => Some(b'"'),
                        b'\\' => Some(b'\\'),
                        b'/' => Some(b'/'),
                        b'b' => Some(8),
                        b'f' => Some(12),
                        b'n' => Some(b'\n'),
                        b'r' => Some(b'\r'),
                        b't' => Some(b'\t'),
                        b'u' => None,
                        _ => return Err(ScanError::Invalid),
                    };
                    match simple {
                        Some(c) => sink(&[c]),
                        None => {
                            let ch = self.unicode_escape()?;
                            let mut buf = [0u8; 4];
                            sink(ch.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                _ => return Err(ScanError::Invalid), // control character
            }
        }
    }

    fn hex4(&mut self) -> R<u32> {
        let mut v = 0u32;
        for _ in 0..4 {
            let c = self.bump()?;
            let d = char::from(c).to_digit(16).ok_or(ScanError::Invalid)?;
            v = v * 16 + d;
        }
        Ok(v)
    }

    fn unicode_escape(&mut self) -> R<char> {
        let hi = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&hi) {
            self.expect(b"\\u")?;
            let lo = self.hex4()?;
            if !(0xDC00..0xE000).contains(&lo) {
                return Err(ScanError::Invalid);
            }
            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
        } else {
            hi
        };
        char::from_u32(code).ok_or(ScanError::Invalid)
    }

    /// Scans a number; returns whether it is an integer.
    fn number(&mut self) -> R<bool> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.bump()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return Err(ScanError::Invalid),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            integer = false;
            self.digits1()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            integer = false;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            self.digits1()?;
        }
        Ok(integer)
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
    }

    fn digits1(&mut self) -> R<()> {
        if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
            return Err(ScanError::Invalid);
        }
        self.digits();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
