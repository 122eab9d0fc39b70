//! OIP tensors: datatypes, typed element buffers and their little-endian
//! binary encoding (JSON is in `json`). No tract here: the engine converts.

use std::fmt;

use half::f16;

/// An OIP v2 tensor datatype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    Bytes,
}

impl DataType {
    /// Parses an OIP datatype name (`FP32`, `INT64`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BOOL" => Self::Bool,
            "UINT8" => Self::U8,
            "UINT16" => Self::U16,
            "UINT32" => Self::U32,
            "UINT64" => Self::U64,
            "INT8" => Self::I8,
            "INT16" => Self::I16,
            "INT32" => Self::I32,
            "INT64" => Self::I64,
            "FP16" => Self::F16,
            "FP32" => Self::F32,
            "FP64" => Self::F64,
            "BYTES" => Self::Bytes,
            _ => return None,
        })
    }

    /// The OIP name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "UINT8",
            Self::U16 => "UINT16",
            Self::U32 => "UINT32",
            Self::U64 => "UINT64",
            Self::I8 => "INT8",
            Self::I16 => "INT16",
            Self::I32 => "INT32",
            Self::I64 => "INT64",
            Self::F16 => "FP16",
            Self::F32 => "FP32",
            Self::F64 => "FP64",
            Self::Bytes => "BYTES",
        }
    }

    /// Bytes per element in the binary encoding; `None` for BYTES, whose
    /// elements are length-prefixed.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 | Self::F16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            Self::Bytes => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Flat, row-major tensor elements of one datatype.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<f16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

/// Applies `$body` to the inner vector of every variant.
macro_rules! each_variant {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            Data::Bool($v) => $body,
            Data::U8($v) => $body,
            Data::U16($v) => $body,
            Data::U32($v) => $body,
            Data::U64($v) => $body,
            Data::I8($v) => $body,
            Data::I16($v) => $body,
            Data::I32($v) => $body,
            Data::I64($v) => $body,
            Data::F16($v) => $body,
            Data::F32($v) => $body,
            Data::F64($v) => $body,
            Data::Bytes($v) => $body,
        }
    };
}

/// Maps every variant to the same variant holding `$body`.
macro_rules! map_variant {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            Data::Bool($v) => Data::Bool($body),
            Data::U8($v) => Data::U8($body),
            Data::U16($v) => Data::U16($body),
            Data::U32($v) => Data::U32($body),
            Data::U64($v) => Data::U64($body),
            Data::I8($v) => Data::I8($body),
            Data::I16($v) => Data::I16($body),
            Data::I32($v) => Data::I32($body),
            Data::I64($v) => Data::I64($body),
            Data::F16($v) => Data::F16($body),
            Data::F32($v) => Data::F32($body),
            Data::F64($v) => Data::F64($body),
            Data::Bytes($v) => Data::Bytes($body),
        }
    };
}

/// A tensor's data could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error("binary data of {got} bytes is not a whole number of {datatype} elements")]
    BinaryLength { datatype: DataType, got: usize },
    #[error("binary BYTES element is truncated")]
    BinaryBytesTruncated,
    #[error("cannot concatenate tensors of different datatypes")]
    Mixed,
}

impl Data {
    /// An empty buffer of `dt` with room for `cap` elements.
    pub fn with_capacity(dt: DataType, cap: usize) -> Self {
        match dt {
            DataType::Bool => Data::Bool(Vec::with_capacity(cap)),
            DataType::U8 => Data::U8(Vec::with_capacity(cap)),
            DataType::U16 => Data::U16(Vec::with_capacity(cap)),
            DataType::U32 => Data::U32(Vec::with_capacity(cap)),
            DataType::U64 => Data::U64(Vec::with_capacity(cap)),
            DataType::I8 => Data::I8(Vec::with_capacity(cap)),
            DataType::I16 => Data::I16(Vec::with_capacity(cap)),
            DataType::I32 => Data::I32(Vec::with_capacity(cap)),
            DataType::I64 => Data::I64(Vec::with_capacity(cap)),
            DataType::F16 => Data::F16(Vec::with_capacity(cap)),
            DataType::F32 => Data::F32(Vec::with_capacity(cap)),
            DataType::F64 => Data::F64(Vec::with_capacity(cap)),
            DataType::Bytes => Data::Bytes(Vec::with_capacity(cap)),
        }
    }

    pub fn datatype(&self) -> DataType {
        match self {
            Data::Bool(_) => DataType::Bool,
            Data::U8(_) => DataType::U8,
            Data::U16(_) => DataType::U16,
            Data::U32(_) => DataType::U32,
            Data::U64(_) => DataType::U64,
            Data::I8(_) => DataType::I8,
            Data::I16(_) => DataType::I16,
            Data::I32(_) => DataType::I32,
            Data::I64(_) => DataType::I64,
            Data::F16(_) => DataType::F16,
            Data::F32(_) => DataType::F32,
            Data::F64(_) => DataType::F64,
            Data::Bytes(_) => DataType::Bytes,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        each_variant!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `start..end`; the caller guarantees the range is in bounds.
    pub fn slice(&self, start: usize, end: usize) -> Data {
        map_variant!(self, v => v.get(start..end).map(<[_]>::to_vec).unwrap_or_default())
    }

    /// Concatenates buffers of one datatype.
    pub fn concat(parts: &[&Data]) -> Result<Data, TensorError> {
        let Some(first) = parts.first() else {
            return Ok(Data::F32(Vec::new()));
        };
        let total = parts.iter().map(|p| p.len()).sum();
        let mut out = Data::with_capacity(first.datatype(), total);
        for part in parts {
            out.extend(part)?;
        }
        Ok(out)
    }

    fn extend(&mut self, other: &Data) -> Result<(), TensorError> {
        match (self, other) {
            (Data::Bool(a), Data::Bool(b)) => a.extend_from_slice(b),
            (Data::U8(a), Data::U8(b)) => a.extend_from_slice(b),
            (Data::U16(a), Data::U16(b)) => a.extend_from_slice(b),
            (Data::U32(a), Data::U32(b)) => a.extend_from_slice(b),
            (Data::U64(a), Data::U64(b)) => a.extend_from_slice(b),
            (Data::I8(a), Data::I8(b)) => a.extend_from_slice(b),
            (Data::I16(a), Data::I16(b)) => a.extend_from_slice(b),
            (Data::I32(a), Data::I32(b)) => a.extend_from_slice(b),
            (Data::I64(a), Data::I64(b)) => a.extend_from_slice(b),
            (Data::F16(a), Data::F16(b)) => a.extend_from_slice(b),
            (Data::F32(a), Data::F32(b)) => a.extend_from_slice(b),
            (Data::F64(a), Data::F64(b)) => a.extend_from_slice(b),
            (Data::Bytes(a), Data::Bytes(b)) => a.extend_from_slice(b),
            _ => return Err(TensorError::Mixed),
        }
        Ok(())
    }

    /// Decodes the binary tensor extension's little-endian encoding.
    pub fn from_le_bytes(dt: DataType, bytes: &[u8]) -> Result<Data, TensorError> {
        fn chunks<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        if let Some(size) = dt.element_size() {
            if !bytes.len().is_multiple_of(size) {
                return Err(TensorError::BinaryLength {
                    datatype: dt,
                    got: bytes.len(),
                });
            }
        }
        Ok(match dt {
            DataType::Bool => Data::Bool(bytes.iter().map(|b| *b != 0).collect()),
            DataType::U8 => Data::U8(bytes.to_vec()),
            DataType::I8 => Data::I8(chunks(bytes, i8::from_le_bytes)),
            DataType::U16 => Data::U16(chunks(bytes, u16::from_le_bytes)),
            DataType::I16 => Data::I16(chunks(bytes, i16::from_le_bytes)),
            DataType::F16 => Data::F16(chunks(bytes, f16::from_le_bytes)),
            DataType::U32 => Data::U32(chunks(bytes, u32::from_le_bytes)),
            DataType::I32 => Data::I32(chunks(bytes, i32::from_le_bytes)),
            DataType::F32 => Data::F32(chunks(bytes, f32::from_le_bytes)),
            DataType::U64 => Data::U64(chunks(bytes, u64::from_le_bytes)),
            DataType::I64 => Data::I64(chunks(bytes, i64::from_le_bytes)),
            DataType::F64 => Data::F64(chunks(bytes, f64::from_le_bytes)),
            DataType::Bytes => {
                let mut out = Vec::new();
                let mut rest = bytes;
                while !rest.is_empty() {
                    let (len, tail) = rest
                        .split_first_chunk::<4>()
                        .ok_or(TensorError::BinaryBytesTruncated)?;
                    let len = u32::from_le_bytes(*len) as usize;
                    if tail.len() < len {
                        return Err(TensorError::BinaryBytesTruncated);
                    }
                    let (item, tail) = tail.split_at(len);
                    out.push(item.to_vec());
                    rest = tail;
                }
                Data::Bytes(out)
            }
        })
    }

    /// Appends the binary tensor extension's little-endian encoding.
    pub fn write_le_bytes(&self, out: &mut Vec<u8>) {
        match self {
            Data::Bool(v) => out.extend(v.iter().map(|b| u8::from(*b))),
            Data::U8(v) => out.extend_from_slice(v),
            Data::I8(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Data::U16(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Data::I16(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Data::F16(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Data::U32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Data::I32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Data::F32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Data::U64(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Data::I64(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Data::F64(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Data::Bytes(v) => {
                for item in v {
                    // Elements larger than 4 GiB cannot come out of a model
                    // that fits the body limits; saturate rather than panic.
                    let len = u32::try_from(item.len()).unwrap_or(u32::MAX);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(item);
                }
            }
        }
    }

    /// Values as f64, for classification; `None` for non-numeric data.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        Some(match self {
            Data::U8(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Data::U16(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Data::U32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Data::U64(v) => v.iter().map(|x| *x as f64).collect(),
            Data::I8(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Data::I16(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Data::I32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Data::I64(v) => v.iter().map(|x| *x as f64).collect(),
            Data::F16(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Data::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Data::F64(v) => v.clone(),
            Data::Bool(_) | Data::Bytes(_) => return None,
        })
    }
}

/// Largest bracket/brace nesting in a JSON document, ignoring strings; a
/// cheap scan run before parsing so hostile nesting never reaches a
/// recursive parser.
pub fn json_depth_exceeds(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    for &b in bytes {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_round_trips_every_type() {
        let cases = [
            Data::Bool(vec![true, false]),
            Data::I8(vec![-1, 2]),
            Data::U16(vec![1, 65535]),
            Data::F16(vec![f16::from_f32(1.5)]),
            Data::I32(vec![-7]),
            Data::F32(vec![1.25, -3.0]),
            Data::U64(vec![u64::MAX]),
            Data::F64(vec![0.1]),
            Data::Bytes(vec![b"ab".to_vec(), Vec::new()]),
        ];
        for d in cases {
            let mut buf = Vec::new();
            d.write_le_bytes(&mut buf);
            assert_eq!(Data::from_le_bytes(d.datatype(), &buf).unwrap(), d);
        }
        assert!(Data::from_le_bytes(DataType::F32, &[0, 0, 0]).is_err());
        assert!(Data::from_le_bytes(DataType::Bytes, &[5, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn depth_scan_ignores_brackets_in_strings() {
        assert!(!json_depth_exceeds(br#"{"a": "[[[[[["}"#, 2));
        assert!(json_depth_exceeds(b"[[[", 2));
        assert!(!json_depth_exceeds(b"[[]]", 2));
    }
}
