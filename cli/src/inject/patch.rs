//! RFC 6902 JSON Patch between two JSON values: what the webhook returns
//! so that the API server turns the object it sent into the injected one.

use serde_json::{json, Value};

/// The operations that turn `old` into `new`. Objects are compared key by
/// key and arrays element by element, so the patch only touches what
/// changed (an appended container is one `add`, not a new list): another
/// mutating webhook's changes made in between survive.
pub fn diff(old: &Value, new: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    walk(&mut String::new(), old, new, &mut ops);
    ops
}

/// `~` and `/` escaped as in RFC 6901 (annotation keys contain `/`).
pub fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn walk(path: &mut String, old: &Value, new: &Value, ops: &mut Vec<Value>) {
    if old == new {
        return;
    }
    let len = path.len();
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for k in a.keys().filter(|k| !b.contains_key(*k)) {
                path.push('/');
                path.push_str(&escape(k));
                ops.push(json!({"op": "remove", "path": path}));
                path.truncate(len);
            }
            for (k, v) in b {
                path.push('/');
                path.push_str(&escape(k));
                match a.get(k) {
                    Some(old_v) => walk(path, old_v, v, ops),
                    None => ops.push(json!({"op": "add", "path": path, "value": v})),
                }
                path.truncate(len);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                path.push_str(&format!("/{i}"));
                walk(path, x, y, ops);
                path.truncate(len);
            }
            for (i, y) in b.iter().enumerate().skip(a.len()) {
                ops.push(json!({"op": "add", "path": format!("{path}/{i}"), "value": y}));
            }
            for i in (b.len()..a.len()).rev() {
                ops.push(json!({"op": "remove", "path": format!("{path}/{i}")}));
            }
        }
        _ if path.is_empty() => ops.push(json!({"op": "replace", "path": "", "value": new})),
        _ => ops.push(json!({"op": "replace", "path": path, "value": new})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal RFC 6902 applier for add/remove/replace, enough to check
    /// that `diff` round-trips (the Python test applies the patches with
    /// the independent `jsonpatch` package).
    fn apply(doc: &Value, ops: &[Value]) -> Value {
        let mut doc = doc.clone();
        for op in ops {
            let path = op["path"].as_str().unwrap();
            if path.is_empty() {
                doc = op["value"].clone();
                continue;
            }
            let (parent, last) = path.rsplit_once('/').unwrap();
            let last = last.replace("~1", "/").replace("~0", "~");
            let target = doc.pointer_mut(parent).unwrap();
            match (op["op"].as_str().unwrap(), target) {
                ("add", Value::Array(a)) => a.insert(last.parse().unwrap(), op["value"].clone()),
                ("remove", Value::Array(a)) => drop(a.remove(last.parse().unwrap())),
                ("replace", Value::Array(a)) => {
                    a[last.parse::<usize>().unwrap()] = op["value"].clone()
                }
                ("add" | "replace", Value::Object(m)) => drop(m.insert(last, op["value"].clone())),
                ("remove", Value::Object(m)) => drop(m.remove(&last)),
                (o, t) => panic!("cannot {o} at {path} in {t}"),
            }
        }
        doc
    }

    #[test]
    fn diff_round_trips_and_stays_small() {
        let cases = [
            (json!({}), json!({"a": 1})),
            (json!({"a": {"b/c": 1, "d~e": 2}}), json!({"a": {"b/c": 3}})),
            (json!({"l": [1, 2]}), json!({"l": [1, 2, 3, 4]})),
            (json!({"l": [1, 2, 3, 4]}), json!({"l": [1, 9]})),
            (
                json!({"l": [{"x": 1}]}),
                json!({"l": [{"x": 1, "y": [true]}]}),
            ),
            (json!({"t": "s"}), json!({"t": {"now": "object"}})),
            (json!([1]), json!("whole")),
            (
                json!({"same": [1, {"a": null}]}),
                json!({"same": [1, {"a": null}]}),
            ),
        ];
        for (old, new) in cases {
            let ops = diff(&old, &new);
            assert_eq!(apply(&old, &ops), new, "{old} -> {new}: {ops:?}");
        }
        assert!(diff(&json!({"a": [1]}), &json!({"a": [1]})).is_empty());
        // An appended element is one add at its index, keys are escaped.
        assert_eq!(
            diff(&json!({"l": [1]}), &json!({"l": [1, 2]})),
            vec![json!({"op": "add", "path": "/l/1", "value": 2})]
        );
        assert_eq!(
            diff(&json!({"m": {}}), &json!({"m": {"infermesh.io/x": "1"}})),
            vec![json!({"op": "add", "path": "/m/infermesh.io~1x", "value": "1"})]
        );
    }
}
