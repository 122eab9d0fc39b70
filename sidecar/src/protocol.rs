//! OIP v2 inference request decoding and response encoding, JSON tensors
//! and the binary tensor data extension (`Inference-Header-Content-Length`,
//! `binary_data_size`, `binary_data`, `binary_data_output`), plus the
//! classification extension (`parameters.classification` on an output).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::engine::{Signature, Tensor};
use crate::tensor::{self, Data, DataType};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<RawInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
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
    if tensor::json_depth_exceeds(json, max_depth) {
        return Err(bad(format!("JSON nesting deeper than {max_depth}")));
    }
    let raw: RawRequest<'_> = serde_json::from_slice(json)
        .map_err(|e| bad(format!("invalid inference request JSON: {e}")))?;
    if let Some(id) = &raw.id {
        if id.len() > 256 {
            return Err(bad("id is longer than 256 bytes"));
        }
    }

    let mut slots: Vec<Option<Tensor>> = vec![None; sig.inputs.len()];
    let mut rows: Option<usize> = None;
    let batched = sig.max_batch_size > 0;
    for input in &raw.inputs {
        let name = &input.name;
        let Some(idx) = sig.inputs.iter().position(|s| &s.name == name) else {
            return Err(bad(format!("unknown input {:?}", truncate(name))));
        };
        let spec = &sig.inputs[idx];
        if slots[idx].is_some() {
            return Err(bad(format!("input {name:?} is given twice")));
        }
        let dt = DataType::parse(&input.datatype).ok_or_else(|| {
            bad(format!(
                "input {name:?}: unknown datatype {:?}",
                truncate(&input.datatype)
            ))
        })?;
        if dt != spec.datatype {
            return Err(bad(format!(
                "input {name:?}: datatype {dt}, the model expects {}",
                spec.datatype
            )));
        }
        if input.shape.len() != spec.shape.len() {
            return Err(bad(format!(
                "input {name:?}: shape {:?}, the model expects {:?}",
                input.shape, spec.shape
            )));
        }
        let mut shape = Vec::with_capacity(input.shape.len());
        for (j, (&got, &want)) in input.shape.iter().zip(&spec.shape).enumerate() {
            let ok = if want < 0 {
                got >= 1 && got as u64 <= sig.max_batch_size as u64
            } else {
                got == want
            };
            if !ok {
                return Err(bad(if want < 0 {
                    format!(
                        "input {name:?}: batch dimension {got} is not in 1..={}",
                        sig.max_batch_size
                    )
                } else {
                    format!(
                        "input {name:?}: shape {:?}, the model expects {:?} (dimension {j})",
                        input.shape, spec.shape
                    )
                }));
            }
            shape.push(got as usize);
        }
        let r = if batched {
            shape.first().copied().unwrap_or(1)
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
        // Dimensions are fixed by the model and the batch is bounded, so
        // this product cannot overflow; checked anyway.
        let elements = shape
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| bad(format!("input {name:?}: shape is too large")))?;
        let at = format!("input {name:?}: ");
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
                Data::from_le_bytes(dt, chunk).map_err(|e| bad(format!("{at}{e}")))?
            }
            None => {
                let Some(raw_data) = input.data else {
                    return Err(bad(format!("{at}has no data")));
                };
                tensor::data_from_json(raw_data, dt, elements)
                    .map_err(|e| bad(format!("{at}{e}")))?
            }
        };
        if data.len() != elements {
            return Err(bad(format!(
                "{at}shape {:?} holds {elements} elements, data has {}",
                input.shape,
                data.len()
            )));
        }
        slots[idx] = Some(Tensor { shape, data });
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

#[derive(Serialize)]
struct OutTensor<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BTreeMap<&'static str, usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Data>,
}

#[derive(Serialize)]
struct Response<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutTensor<'a>>,
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
    let mut binary = Vec::new();
    let mut tensors = Vec::with_capacity(wanted.len());
    for (w, class) in wanted.iter().zip(&classified) {
        let (Some(spec), Some(t)) = (sig.outputs.get(w.index), outputs.get(w.index)) else {
            return Err(bad("output missing from the engine result"));
        };
        let t = class.as_ref().unwrap_or(t);
        let (parameters, data) = if w.binary {
            let before = binary.len();
            t.data.write_le_bytes(&mut binary);
            (
                Some(BTreeMap::from([(
                    "binary_data_size",
                    binary.len() - before,
                )])),
                None,
            )
        } else {
            (None, Some(&t.data))
        };
        tensors.push(OutTensor {
            name: &spec.name,
            datatype: t.data.datatype().as_str(),
            shape: t.shape.clone(),
            parameters,
            data,
        });
    }
    let resp = Response {
        model_name: model,
        model_version: version,
        id,
        outputs: tensors,
    };
    let mut body = serde_json::to_vec(&resp).map_err(|_| bad("response cannot be encoded"))?;
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
