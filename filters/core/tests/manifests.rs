//! Every `pluginConfig` in istio/ must pass the filter's own parser, so a
//! broken manifest fails `cargo test`, not a rollout. The filter is named by
//! the WasmPlugin's `app.kubernetes.io/component` label.

use std::path::{Path, PathBuf};

use serde_json::{Map, Number, Value};
use yaml_rust2::{Yaml, YamlLoader};

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Yaml::Integer(i) => Value::Number((*i).into()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().map_or_else(|| format!("{k:?}"), str::to_owned),
                        to_json(v),
                    )
                })
                .collect::<Map<_, _>>(),
        ),
        Yaml::Null | Yaml::BadValue | Yaml::Alias(_) => Value::Null,
    }
}

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../istio");
    let mut out = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_wasmplugin_config_parses() {
    let mut checked = Vec::new();
    for path in manifests() {
        let text = std::fs::read_to_string(&path).unwrap();
        let docs =
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for doc in docs {
            let doc = to_json(&doc);
            if doc["kind"] != "WasmPlugin" {
                continue;
            }
            let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_owned();
            let component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .unwrap_or_else(|| {
                    panic!(
                        "{}: WasmPlugin {name} has no app.kubernetes.io/component label",
                        path.display()
                    )
                });
            let config = serde_json::to_vec(&doc["spec"]["pluginConfig"]).unwrap();
            let result = match component {
                "canary" => filter_core::config::canary::parse(&config).map(drop),
                other => panic!("{}: no parser for component {other:?}", path.display()),
            };
            if let Err(e) = result {
                panic!("{}: WasmPlugin {name}: {e}", path.display());
            }
            checked.push(name);
        }
    }
    assert!(
        checked.contains(&"infermesh-canary".to_owned()),
        "checked {checked:?}"
    );
}

#[test]
fn example_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/config");
    let canary = std::fs::read(dir.join("canary.json")).unwrap();
    filter_core::config::canary::parse(&canary).unwrap();
}

#[test]
fn a_broken_manifest_config_is_caught() {
    // The same conversion path must reject a bad config, or the test above
    // proves nothing.
    let text = "pluginConfig:\n  splits:\n  - model: m\n    versions:\n    - {name: a, weight: 90}\n    - {name: b, weight: 20}\n";
    let doc = to_json(&YamlLoader::load_from_str(text).unwrap()[0]);
    let config = serde_json::to_vec(&doc["pluginConfig"]).unwrap();
    let err = filter_core::config::canary::parse(&config).unwrap_err();
    assert_eq!(err.path, "splits[0].versions");
}
