//! The digits test images (`tests/fixtures/shadow/digits-mlp.json`, made
//! with onnxruntime by `make_digits_cases.py`): inputs for digits-mlp and
//! how its two example versions label each, for shadow agreement.

use std::path::Path;

use serde_json::{json, Value};

/// The 450 test images of digits-mlp's training split.
#[derive(Debug, Clone)]
pub struct Cases {
    /// 8x8 images, 64 integers 0..16 each.
    pub pixels: Vec<Vec<u8>>,
    /// onnxruntime's label per image for version 1.
    pub labels_v1: Vec<i64>,
    /// Images on which versions 1 and 2 give different labels.
    pub disagree: usize,
}

impl Cases {
    /// Reads the fixture from the checkout at `root`.
    pub fn load(root: &Path) -> Result<Cases, String> {
        let path = root.join("tests/fixtures/shadow/digits-mlp.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let doc: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let field = |name: &str| format!("{}: no valid {name:?}", path.display());
        let pixels: Vec<Vec<u8>> =
            serde_json::from_value(doc["pixels"].clone()).map_err(|_| field("pixels"))?;
        let labels_v1: Vec<i64> =
            serde_json::from_value(doc["labels"]["1"].clone()).map_err(|_| field("labels"))?;
        let disagree = doc["disagree"].as_u64().ok_or_else(|| field("disagree"))? as usize;
        if pixels.len() != labels_v1.len() || pixels.iter().any(|p| p.len() != 64) {
            return Err(format!("{}: rows and labels do not match", path.display()));
        }
        Ok(Cases {
            pixels,
            labels_v1,
            disagree,
        })
    }

    /// onnxruntime's agreement of version 2 with version 1, percent.
    pub fn agreement_pct(&self) -> f64 {
        let n = self.pixels.len().max(1);
        100.0 * n.saturating_sub(self.disagree) as f64 / n as f64
    }
}

/// The OIP infer body for an 8x8 image: nearest-neighbour 28x28 (row or
/// column `i` takes `i * 8 / 28`), divided by 16, as FP32 `[1, 784]`:
/// what the model was trained on.
pub fn infer_body(pixels: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(784);
    for r in 0..28 {
        for c in 0..28 {
            let v = pixels
                .get((r * 8 / 28) * 8 + c * 8 / 28)
                .copied()
                .unwrap_or(0);
            data.push(f32::from(v) / 16.0);
        }
    }
    serde_json::to_vec(&json!({"inputs": [{
        "name": "input", "shape": [1, 784], "datatype": "FP32", "data": data
    }]}))
    .unwrap_or_default()
}
