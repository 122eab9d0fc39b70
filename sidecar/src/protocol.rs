//! OIP v2 inference request decoding and response encoding, JSON tensors
//! and the binary tensor data extension (`Inference-Header-Content-Length`,
//! `binary_data_size`, `binary_data`, `binary_data_output`), plus the
//! classification extension (`parameters.classification` on an output).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::engine::{Signature, Tensor};
use crate::json::{self, JsonError, Reader};
use crate::tensor::{Data, DataType};

/// The request is malformed or does not fit the model; the text is for
/// the client.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad(msg: impl Into<String>) -> BadRequest {
    BadRequest(msg.into())
}

/// A requested output.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRequest {
    /// Index into `Signature::outputs`.
    pub index: usize,
    pub binary: bool,
    pub classification: Option<usize>,
}

/// A decoded, validated inference request.
#[derive(Debug)]
pub struct InferRequest {
    pub id: Option<String>,
    /// In `Signature::inputs` order.
    pub inputs: Vec<Tensor>,
    /// Batch rows (1 for models without a batch dimension).
    pub rows: usize,
    pub outputs: Vec<OutputRequest>,
}

/// The request body's fields, before they are checked against the model.
#[derive(Default)]
struct RawRequest<'a> {
    id: Option<String>,
    parameters: Option<Map<String, Value>>,
    inputs: Vec<RawInput<'a>>,
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Default)]
struct RawInput<'a> {
    name: Option<String>,
    shape: Option<Vec<i64>>,
    datatype: Option<String>,
    parameters: Option<Map<String, Value>>,
    data: Option<InputData<'a>>,
}

/// Tensor data: read in place when the name, datatype and shape came
/// first (every client we know sends them first), else kept as text and
/// read once the input's object ends.
enum InputData<'a> {
    Read(Data),
    Later(&'a [u8]),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// Fields that OIP clients send and the server does not need: the KServe
/// client repeats the URL's model name and version in the body.
const IGNORED_STRING_FIELDS: [&str; 2] = ["model_name", "model_version"];

fn json_bad(e: JsonError) -> BadRequest {
    bad(format!("invalid inference request JSON: {e}"))
}

impl From<JsonError> for BadRequest {
    fn from(e: JsonError) -> Self {
        json_bad(e)
    }
}

/// Refuses a key that an object already had (keys are borrowed from the
/// body unless they had escapes).
fn first_time<'a>(
    seen: &mut Vec<Cow<'a, str>>,
    key: Cow<'a, str>,
    at: impl FnOnce() -> String,
) -> Result<(), BadRequest> {
    if seen.contains(&key) {
        return Err(bad(format!(
            "{}invalid inference request JSON: duplicate field {:?}",
            at(),
            truncate(&key)
        )));
    }
    seen.push(key);
    Ok(())
}

fn field_error(at: &str, field: &str, e: JsonError) -> BadRequest {
    bad(format!("{at}invalid inference request JSON: {field}: {e}"))
}

/// Reads the request header's JSON, tensor data straight into typed
/// buffers where the input's name, datatype and shape came before it.
fn read_request<'a>(
    json: &'a [u8],
    sig: &Signature,
    max_depth: usize,
) -> Result<RawRequest<'a>, BadRequest> {
    let mut r = Reader::new(json, max_depth);
    let mut req = RawRequest::default();
    let mut seen = Vec::new();
    r.object(|r, key| -> Result<(), BadRequest> {
        first_time(&mut seen, key.clone(), String::new)?;
        let field = |e| field_error("", &key, e);
        match &*key {
            "id" => req.id = r.value().map_err(field)?,
            "parameters" => req.parameters = r.value().map_err(field)?,
            "outputs" => req.outputs = r.value().map_err(field)?,
            "inputs" => r.array(|r| {
                let input = read_input(r, sig)?;
                req.inputs.push(input);
                Ok::<_, BadRequest>(())
            })?,
            k if IGNORED_STRING_FIELDS.contains(&k) => {
                r.value::<Option<String>>().map_err(field)?;
            }
            k => {
                return Err(bad(format!(
                    "invalid inference request JSON: unknown field {:?}",
                    truncate(k)
                )))
            }
        }
        Ok(())
    })?;
    r.end()?;
    if !seen.iter().any(|k| k == "inputs") {
        return Err(bad(
            "invalid inference request JSON: missing field \"inputs\"",
        ));
    }
    Ok(req)
}

fn read_input<'a>(r: &mut Reader<'a>, sig: &Signature) -> Result<RawInput<'a>, BadRequest> {
    let mut input = RawInput::default();
    let mut seen = Vec::new();
    // The error prefix, built only on errors: "input: " until the name
    // is known.
    fn at(name: &Option<String>) -> String {
        match name {
            Some(n) => format!("input {:?}: ", truncate(n)),
            None => "input: ".to_string(),
        }
    }
    r.object(|r, key| -> Result<(), BadRequest> {
        first_time(&mut seen, key.clone(), || at(&input.name))?;
        let field = |e| field_error(&at(&input.name), &key, e);
        match &*key {
            // No name yet: a second one is refused above.
            "name" => input.name = Some(r.value().map_err(|e| field_error("input: ", &key, e))?),
            "shape" => input.shape = Some(r.value().map_err(field)?),
            "datatype" => input.datatype = Some(r.value().map_err(field)?),
            "parameters" => input.parameters = r.value().map_err(field)?,
            "data" => {
                input.data = Some(match (&input.name, &input.datatype, &input.shape) {
                    (Some(name), Some(dt), Some(shape)) => {
                        let target = check_input(name, dt, shape, sig)?;
                        InputData::Read(read_tensor_data(r, name, &target)?)
                    }
                    _ => InputData::Later(r.skip_raw()?),
                })
            }
            k => {
                return Err(bad(format!(
                    "{}invalid inference request JSON: unknown field {:?}",
                    at(&input.name),
                    truncate(k)
                )))
            }
        }
        Ok(())
    })?;
    Ok(input)
}

/// Where an input's data goes: its signature slot, datatype, shape and
/// element count.
struct Target {
    index: usize,
    datatype: DataType,
    shape: Vec<usize>,
    elements: usize,
}

/// Reads one tensor's JSON data; errors name the input.
fn read_tensor_data(r: &mut Reader<'_>, name: &str, t: &Target) -> Result<Data, BadRequest> {
    json::read_data(r, t.datatype, t.elements)
        .map_err(|e| bad(format!("input {:?}: {e}", truncate(name))))
}

/// Checks an input's name, datatype and shape against the model.
fn check_input(
    name: &str,
    datatype: &str,
    got: &[i64],
    sig: &Signature,
) -> Result<Target, BadRequest> {
    let Some(index) = sig.inputs.iter().position(|s| s.name == name) else {
        return Err(bad(format!("unknown input {:?}", truncate(name))));
    };
    let spec = &sig.inputs[index];
    let dt = DataType::parse(datatype).ok_or_else(|| {
        bad(format!(
            "input {name:?}: unknown datatype {:?}",
            truncate(datatype)
        ))
    })?;
    if dt != spec.datatype {
        return Err(bad(format!(
            "input {name:?}: datatype {dt}, the model expects {}",
            spec.datatype
        )));
    }
    if got.len() != spec.shape.len() {
        return Err(bad(format!(
            "input {name:?}: shape {got:?}, the model expects {:?}",
            spec.shape
        )));
    }
    let mut shape = Vec::with_capacity(got.len());
    for (j, (&g, &want)) in got.iter().zip(&spec.shape).enumerate() {
        let ok = if want < 0 {
            g >= 1 && g as u64 <= sig.max_batch_size as u64
        } else {
            g == want
        };
        if !ok {
            return Err(bad(if want < 0 {
                format!(
                    "input {name:?}: batch dimension {g} is not in 1..={}",
                    sig.max_batch_size
                )
            } else {
                format!(
                    "input {name:?}: shape {got:?}, the model expects {:?} (dimension {j})",
                    spec.shape
                )
            }));
        }
        shape.push(g as usize);
    }
    // Dimensions are fixed by the model and the batch is bounded, so this
    // product cannot overflow; checked anyway.
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| bad(format!("input {name:?}: shape is too large")))?;
    Ok(Target {
        index,
        datatype: dt,
        shape,
        elements,
    })
}

fn param_bool(
    p: &Option<Map<String, Value>>,
    key: &str,
    at: &str,
) -> Result<Option<bool>, BadRequest> {
    match p.as_ref().and_then(|m| m.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(format!("{at}parameters.{key} must be a boolean"))),
    }
}

fn param_uint(
    p: &Option<Map<String, Value>>,
    key: &str,
    at: &str,
) -> Result<Option<u64>, BadRequest> {
    match p.as_ref().and_then(|m| m.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            bad(format!(
                "{at}parameters.{key} must be a non-negative integer"
            ))
        }),
    }
}

/// Decodes `body`. With `header_len` (the `Inference-Header-Content-Length`
/// header) the first `header_len` bytes are the JSON header and the rest
/// are binary tensors in input order.
pub fn decode(
    body: &[u8],
    header_len: Option<usize>,
    sig: &Signature,
    max_depth: usize,
) -> Result<InferRequest, BadRequest> {
    let (json, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(bad(format!(
                "Inference-Header-Content-Length {n} exceeds the body size {}",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let raw = read_request(json, sig, max_depth)?;
    if let Some(id) = &raw.id {
        if id.len() > 256 {
            return Err(bad("id is longer than 256 bytes"));
        }
    }

    let mut slots: Vec<Option<Tensor>> = vec![None; sig.inputs.len()];
    let mut rows: Option<usize> = None;
    let batched = sig.max_batch_size > 0;
    for input in raw.inputs {
        let missing = |field: &str| {
            bad(format!(
                "invalid inference request JSON: an input has no {field:?}"
            ))
        };
        let name = input.name.ok_or_else(|| missing("name"))?;
        let datatype = input.datatype.ok_or_else(|| missing("datatype"))?;
        let got = input.shape.ok_or_else(|| missing("shape"))?;
        let target = check_input(&name, &datatype, &got, sig)?;
        if slots[target.index].is_some() {
            return Err(bad(format!("input {name:?} is given twice")));
        }
        let r = if batched {
            target.shape.first().copied().unwrap_or(1)
        } else {
            1
        };
        match rows {
            None => rows = Some(r),
            Some(prev) if prev != r => {
                return Err(bad(format!(
                    "input {name:?}: batch size {r} differs from other inputs ({prev})"
                )))
            }
            Some(_) => {}
        }
        let at = format!("input {name:?}: ");
        let elements = target.elements;
        let data = match param_uint(&input.parameters, "binary_data_size", &at)? {
            Some(size) => {
                if header_len.is_none() {
                    return Err(bad(format!(
                        "{at}binary_data_size given without an Inference-Header-Content-Length header"
                    )));
                }
                if input.data.is_some() {
                    return Err(bad(format!("{at}has both data and binary_data_size")));
                }
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                if size > binary.len() {
                    return Err(bad(format!(
                        "{at}binary_data_size {size} exceeds the {} binary bytes left",
                        binary.len()
                    )));
                }
                let (chunk, rest) = binary.split_at(size);
                binary = rest;
                Data::from_le_bytes(target.datatype, chunk).map_err(|e| bad(format!("{at}{e}")))?
            }
            None => match input.data {
                None => return Err(bad(format!("{at}has no data"))),
                Some(InputData::Read(d)) => d,
                Some(InputData::Later(span)) => {
                    let mut r = Reader::new(json, max_depth).at_span(span);
                    read_tensor_data(&mut r, &name, &target)?
                }
            },
        };
        if data.len() != elements {
            return Err(bad(format!(
                "{at}shape {got:?} holds {elements} elements, data has {}",
                data.len()
            )));
        }
        slots[target.index] = Some(Tensor {
            shape: target.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }
    let mut inputs = Vec::with_capacity(slots.len());
    for (slot, spec) in slots.into_iter().zip(&sig.inputs) {
        inputs.push(slot.ok_or_else(|| bad(format!("missing input {:?}", spec.name)))?);
    }

    let binary_default = param_bool(&raw.parameters, "binary_data_output", "")?.unwrap_or(false);
    let outputs = match raw.outputs {
        None => (0..sig.outputs.len())
            .map(|index| OutputRequest {
                index,
                binary: binary_default,
                classification: None,
            })
            .collect(),
        Some(list) => {
            let mut seen = BTreeSet::new();
            let mut out = Vec::with_capacity(list.len());
            for o in list {
                let Some(index) = sig.outputs.iter().position(|s| s.name == o.name) else {
                    return Err(bad(format!("unknown output {:?}", truncate(&o.name))));
                };
                if !seen.insert(index) {
                    return Err(bad(format!("output {:?} is requested twice", o.name)));
                }
                let at = format!("output {:?}: ", o.name);
                let binary =
                    param_bool(&o.parameters, "binary_data", &at)?.unwrap_or(binary_default);
                let classification = match param_uint(&o.parameters, "classification", &at)? {
                    None | Some(0) => None,
                    Some(k) => Some(usize::try_from(k).unwrap_or(usize::MAX)),
                };
                out.push(OutputRequest {
                    index,
                    binary,
                    classification,
                });
            }
            out
        }
    };
    Ok(InferRequest {
        id: raw.id,
        inputs,
        rows: rows.unwrap_or(1),
        outputs,
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// An encoded response body; `header_len` is set when binary outputs follow
/// the JSON header.
#[derive(Debug)]
pub struct Encoded {
    pub body: Vec<u8>,
    pub header_len: Option<usize>,
}

/// Encodes the outputs the request asked for.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
pub fn encode(
    model: &str,
    version: &str,
    id: Option<&str>,
    sig: &Signature,
    labels: &BTreeMap<String, Vec<String>>,
    wanted: &[OutputRequest],
    outputs: &[Tensor],
) -> Result<Encoded, BadRequest> {
    let mut classified: Vec<Option<Tensor>> = Vec::with_capacity(wanted.len());
    for w in wanted {
        let (Some(spec), Some(t)) = (sig.outputs.get(w.index), outputs.get(w.index)) else {
            return Err(bad("output missing from the engine result"));
        };
        classified.push(match w.classification {
            None => None,
            Some(k) => Some(classify(t, k, labels.get(&spec.name)).ok_or_else(|| {
                bad(format!(
                    "output {:?} cannot be classified (not numeric)",
                    spec.name
                ))
            })?),
        });
    }
    // The header is written by hand: tensor data goes straight from the
    // typed buffers to text, and non-finite floats as NaN / Infinity.
    let mut binary = Vec::new();
    let json_bytes: usize = wanted
        .iter()
        .filter(|w| !w.binary)
        .filter_map(|w| outputs.get(w.index))
        .map(|t| t.data.len() * 16)
        .sum();
    let mut body = Vec::with_capacity(256 + json_bytes);
    body.extend_from_slice(b"{\"model_name\":");
    json::write_str(&mut body, model);
    body.extend_from_slice(b",\"model_version\":");
    json::write_str(&mut body, version);
    if let Some(id) = id {
        body.extend_from_slice(b",\"id\":");
        json::write_str(&mut body, id);
    }
    body.extend_from_slice(b",\"outputs\":[");
    for (i, (w, class)) in wanted.iter().zip(&classified).enumerate() {
        let (Some(spec), Some(t)) = (sig.outputs.get(w.index), outputs.get(w.index)) else {
            return Err(bad("output missing from the engine result"));
        };
        let t = class.as_ref().unwrap_or(t);
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"name\":");
        json::write_str(&mut body, &spec.name);
        body.extend_from_slice(b",\"datatype\":\"");
        body.extend_from_slice(t.data.datatype().as_str().as_bytes());
        body.extend_from_slice(b"\",\"shape\":");
        json::write_dims(&mut body, &t.shape);
        if w.binary {
            let before = binary.len();
            t.data.write_le_bytes(&mut binary);
            body.extend_from_slice(b",\"parameters\":{\"binary_data_size\":");
            body.extend_from_slice(itoa::Buffer::new().format(binary.len() - before).as_bytes());
            body.push(b'}');
        } else {
            body.extend_from_slice(b",\"data\":");
            json::write_data(&mut body, &t.data);
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    if binary.is_empty() && !wanted.iter().any(|w| w.binary) {
        return Ok(Encoded {
            body,
            header_len: None,
        });
    }
    let header_len = body.len();
    body.extend_from_slice(&binary);
    Ok(Encoded {
        body,
        header_len: Some(header_len),
    })
}

/// Top-`k` per row as Triton's `"value:index[:label]"` strings.
fn classify(t: &Tensor, k: usize, labels: Option<&Vec<String>>) -> Option<Tensor> {
    let values = t.data.to_f64()?;
    let classes = *t.shape.last()?;
    if classes == 0 {
        return None;
    }
    let k = k.min(classes);
    let rows = values.len() / classes;
    let mut out = Vec::with_capacity(rows * k);
    for row in values.chunks(classes) {
        let mut idx: Vec<usize> = (0..classes).collect();
        idx.sort_by(|a, b| {
            row[*b]
                .partial_cmp(&row[*a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        for &i in idx.iter().take(k) {
            let s = match labels.and_then(|l| l.get(i)) {
                Some(label) => format!("{}:{i}:{label}", row[i]),
                None => format!("{}:{i}", row[i]),
            };
            out.push(s.into_bytes());
        }
    }
    let mut shape = t.shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = k;
    }
    Some(Tensor {
        shape,
        data: Data::Bytes(out),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_repo::TensorSpec;

    fn sig() -> Signature {
        Signature {
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::F32,
                shape: vec![-1, 2],
            }],
            outputs: vec![
                TensorSpec {
                    name: "p".into(),
                    datatype: DataType::F32,
                    shape: vec![-1, 3],
                },
                TensorSpec {
                    name: "l".into(),
                    datatype: DataType::I64,
                    shape: vec![-1],
                },
            ],
            max_batch_size: 4,
        }
    }

    #[test]
    fn json_request_decodes() {
        let body = br#"{"id":"a","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4]]}],
            "outputs":[{"name":"l"}]}"#;
        let r = decode(body, None, &sig(), 32).unwrap();
        assert_eq!(r.rows, 2);
        assert_eq!(r.inputs[0].data, Data::F32(vec![1., 2., 3., 4.]));
        assert_eq!(
            r.outputs,
            vec![OutputRequest {
                index: 1,
                binary: false,
                classification: None
            }]
        );
    }

    #[test]
    fn binary_request_decodes_and_checks_sizes() {
        let header = br#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}],
            "parameters":{"binary_data_output":true}}"#;
        let mut body = header.to_vec();
        body.extend(1f32.to_le_bytes());
        body.extend(2f32.to_le_bytes());
        let r = decode(&body, Some(header.len()), &sig(), 32).unwrap();
        assert_eq!(r.inputs[0].data, Data::F32(vec![1., 2.]));
        assert!(r.outputs.iter().all(|o| o.binary));
        // trailing bytes, short data, header length past the body
        let mut extra = body.clone();
        extra.push(0);
        assert!(decode(&extra, Some(header.len()), &sig(), 32).is_err());
        assert!(decode(&body[..body.len() - 4], Some(header.len()), &sig(), 32).is_err());
        assert!(decode(&body, Some(body.len() + 1), &sig(), 32).is_err());
    }

    #[test]
    fn bad_shapes_and_types_are_rejected() {
        let cases = [
            r#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}"#,
            r#"{"inputs":[{"name":"x","shape":[5,2],"datatype":"FP32","data":[1,2,3,4,5,6,7,8,9,10]}]}"#,
            r#"{"inputs":[{"name":"x","shape":[-1,2],"datatype":"FP32","data":[1,2]}]}"#,
            r#"{"inputs":[{"name":"x","shape":[9223372036854775807,2],"datatype":"FP32","data":[1,2]}]}"#,
            r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"INT64","data":[1,2]}]}"#,
            r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1]}]}"#,
            r#"{"inputs":[{"name":"y","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#,
            r#"{"inputs":[]}"#,
            r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}],"outputs":[{"name":"q"}]}"#,
            r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}],"extra":1}"#,
        ];
        for c in cases {
            assert!(decode(c.as_bytes(), None, &sig(), 32).is_err(), "{c}");
        }
    }

    #[test]
    fn data_before_its_shape_and_non_finite_literals() {
        // Members in any order: data first is read once the object ends.
        let body = br#"{"inputs":[{"data":[[NaN,Infinity],[-Infinity,1e-3]],"datatype":"FP32","shape":[2,2],"name":"x"}]}"#;
        let r = decode(body, None, &sig(), 32).unwrap();
        let Data::F32(v) = &r.inputs[0].data else {
            panic!()
        };
        assert!(v[0].is_nan() && v[1] == f32::INFINITY && v[2] == f32::NEG_INFINITY);
        assert_eq!(v[3], 1e-3);
        let late_bad =
            br#"{"inputs":[{"data":[1,.5],"datatype":"FP32","shape":[1,2],"name":"x"}]}"#;
        let e = decode(late_bad, None, &sig(), 32).unwrap_err();
        assert_eq!(e.0, r#"input "x": element 1: .5 is not a valid FP32"#);
        let late_bad =
            br#"{"inputs":[{"data":[1,"a"],"datatype":"FP32","shape":[1,2],"name":"x"}]}"#;
        let e = decode(late_bad, None, &sig(), 32).unwrap_err();
        assert_eq!(e.0, r#"input "x": element 1: a string is not a valid FP32"#);
    }

    #[test]
    fn integer_inputs_refuse_non_finite_literals() {
        let mut sig = sig();
        sig.inputs[0].datatype = DataType::I64;
        let body = br#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"INT64","data":[1,NaN]}]}"#;
        let e = decode(body, None, &sig, 32).unwrap_err();
        assert_eq!(e.0, r#"input "x": element 1: NaN is not a valid INT64"#);
        let body =
            br#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"INT64","data":[-Infinity,1]}]}"#;
        let e = decode(body, None, &sig, 32).unwrap_err();
        assert_eq!(
            e.0,
            r#"input "x": element 0: -Infinity is not a valid INT64"#
        );
    }

    #[test]
    fn what_real_clients_send_decodes() {
        // The OIP spec's example (pretty-printed, input1's data made to fit
        // its shape).
        let spec_sig = Signature {
            inputs: vec![
                TensorSpec {
                    name: "input0".into(),
                    datatype: DataType::U32,
                    shape: vec![2, 2],
                },
                TensorSpec {
                    name: "input1".into(),
                    datatype: DataType::Bool,
                    shape: vec![3],
                },
            ],
            outputs: vec![TensorSpec {
                name: "output0".into(),
                datatype: DataType::F32,
                shape: vec![2],
            }],
            max_batch_size: 0,
        };
        let body = br#"{
          "id" : "42",
          "inputs" : [
            { "name" : "input0", "shape" : [ 2, 2 ], "datatype" : "UINT32", "data" : [ 1, 2, 3, 4 ] },
            { "name" : "input1", "shape" : [ 3 ], "datatype" : "BOOL", "data" : [ true, false, true ] }
          ],
          "outputs" : [ { "name" : "output0" } ]
        }"#;
        let r = decode(body, None, &spec_sig, 32).unwrap();
        assert_eq!(r.id.as_deref(), Some("42"));
        assert_eq!(r.inputs[0].data, Data::U32(vec![1, 2, 3, 4]));
        assert_eq!(r.inputs[1].data, Data::Bool(vec![true, false, true]));
        // KServe's InferRequest.to_rest(): a uuid id, model_name (null when
        // unset), input parameters, then data.
        let body = br#"{"id":"5f0c","model_name":"m","inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"content_type":"np"},"data":[0.5,1.0]}],"outputs":[{"name":"p","parameters":{"binary_data":false}}]}"#;
        let r = decode(body, None, &sig(), 32).unwrap();
        assert_eq!(r.inputs[0].data, Data::F32(vec![0.5, 1.0]));
        let body = br#"{"model_name":null,"model_version":"1","inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[0,1]}]}"#;
        assert!(decode(body, None, &sig(), 32).is_ok());
        // tritonclient: NaN bare, parameters at both levels.
        let body = br#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":null},"data":[NaN,1.0]}],"parameters":{"binary_data_output":false}}"#;
        assert!(decode(body, None, &sig(), 32).is_ok());
    }

    #[test]
    fn duplicate_and_unknown_members_are_refused() {
        let cases = [
            (r#"{"inputs":[],"inputs":[]}"#, "duplicate field \"inputs\""),
            (
                r#"{"id":"a","id":"b","inputs":[]}"#,
                "duplicate field \"id\"",
            ),
            (
                r#"{"inputs":[{"name":"x","name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#,
                "duplicate field \"name\"",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2],"data":[1,2]}]}"#,
                "duplicate field \"data\"",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2],"extra":1}]}"#,
                "unknown field \"extra\"",
            ),
            (
                r#"{"inputs":[{"shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#,
                "an input has no \"name\"",
            ),
            (r#"{"model_name":7,"inputs":[]}"#, "model_name"),
            (r#"{"id":"a"}"#, "missing field \"inputs\""),
            (r#"{"inputs":[]} x"#, "trailing characters"),
            (
                r#"{"inputs":[{"data":[1,2},"name":"x","shape":[1,2],"datatype":"FP32"}]}"#,
                "expected `,` or `]`",
            ),
            (r#"{"inputs":[{"data":[[1,2]"#, "expected a value"),
        ];
        for (body, want) in cases {
            let e = decode(body.as_bytes(), None, &sig(), 32).unwrap_err();
            assert!(e.0.contains(want), "{body}: {}", e.0);
        }
    }

    #[test]
    fn encode_mixes_json_and_binary_and_classifies() {
        let outs = vec![
            Tensor {
                shape: vec![1, 3],
                data: Data::F32(vec![0.1, 0.7, 0.2]),
            },
            Tensor {
                shape: vec![1],
                data: Data::I64(vec![1]),
            },
        ];
        let labels = BTreeMap::from([("p".to_string(), vec!["a".into(), "b".into(), "c".into()])]);
        let wanted = [
            OutputRequest {
                index: 0,
                binary: false,
                classification: Some(2),
            },
            OutputRequest {
                index: 1,
                binary: true,
                classification: None,
            },
        ];
        let e = encode("m", "1", Some("r"), &sig(), &labels, &wanted, &outs).unwrap();
        let n = e.header_len.unwrap();
        let header: Value = serde_json::from_slice(&e.body[..n]).unwrap();
        assert_eq!(header["outputs"][0]["data"][0], "0.699999988079071:1:b");
        assert_eq!(header["outputs"][0]["shape"], serde_json::json!([1, 2]));
        assert_eq!(header["outputs"][1]["parameters"]["binary_data_size"], 8);
        assert_eq!(&e.body[n..], &1i64.to_le_bytes());
    }
}
