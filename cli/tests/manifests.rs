//! Every `pluginConfig` in istio/ and examples/config/ must pass the
//! filter's own parser, so a broken manifest fails `cargo test`, not a
//! rollout.

use std::path::Path;

use infermesh::manifest::{wasm_plugins, yaml_files, Filter};
use infermesh::validate::check_path;

fn repo(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

#[test]
fn every_wasmplugin_in_istio_parses() {
    let findings = check_path(&repo("istio"), None);
    let bad: Vec<_> = findings.iter().filter(|f| !f.ok()).collect();
    assert!(bad.is_empty(), "{bad:#?}");
    // Each shipped filter has a WasmPlugin, so the loop above checked it.
    for filter in Filter::ALL {
        assert!(
            findings.iter().any(|f| f.filter == Some(filter.name())),
            "no WasmPlugin for {} in istio/: {findings:#?}",
            filter.name()
        );
    }
}

#[test]
fn every_example_config_parses() {
    for filter in Filter::ALL {
        let path = repo(&format!("examples/config/{}.json", filter.name()));
        let findings = check_path(&path, None);
        assert_eq!(findings.len(), 1);
        assert!(findings[0].ok(), "{findings:#?}");
    }
}

#[test]
fn a_broken_pluginconfig_in_a_manifest_is_named() {
    let dir = std::env::temp_dir().join(format!("infermesh-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(repo("istio/canary-wasmplugin.yaml")).unwrap();
    // Break the first split's weights: 90/10 -> 90/20.
    let broken = text.replacen("weight: 10\n", "weight: 20\n", 1);
    assert_ne!(broken, text, "the manifest changed shape; update this test");
    let file = dir.join("broken.yaml");
    std::fs::write(&file, broken).unwrap();
    let findings = check_path(&dir, None);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let err = findings[0].error.as_deref().unwrap_or("");
    assert_eq!(
        err,
        "pluginConfig.splits[0].versions: weights sum to 110%, not 100%"
    );
}

#[test]
fn yaml_files_are_found_recursively() {
    let files = yaml_files(&repo("istio")).unwrap();
    assert!(files.iter().any(|f| f.ends_with("canary-wasmplugin.yaml")));
    let plugins = wasm_plugins(&repo("istio/canary-wasmplugin.yaml")).unwrap();
    assert_eq!(plugins.len(), 1);
    assert_eq!(plugins[0].component.as_deref(), Some("canary"));
}

#[test]
fn a_broken_config_in_an_envoyfilter_is_named() {
    let dir = std::env::temp_dir().join(format!("infermesh-envoyfilter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(repo("istio/model-router-body-envoyfilter.yaml")).unwrap();
    let broken = text.replacen("\"max_bytes\": 262144", "\"max_bytes\": 0", 1);
    assert_ne!(broken, text, "the manifest changed shape; update this test");
    std::fs::write(dir.join("broken.yaml"), broken).unwrap();
    let findings = check_path(&dir, None);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert!(
        findings[0]
            .what
            .ends_with("EnvoyFilter/infermesh-model-router-body#configPatches[0]"),
        "{findings:#?}"
    );
    assert_eq!(
        findings[0].error.as_deref(),
        Some("pluginConfig.body.max_bytes: 0: must be between 1 and 16777216")
    );
}

#[test]
fn istio_readme_declares_every_stat_tag() {
    // Istio extracts a tag only if meshConfig lists it in extraStatTags;
    // the documented snippet must carry every tag the filters emit.
    let text = std::fs::read_to_string(repo("istio/README.md")).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("extraStatTags:"))
        .expect("istio/README.md has an extraStatTags line");
    for tag in filter_core::stats::TAGS {
        assert!(
            line.contains(tag),
            "extraStatTags in istio/README.md lacks {tag:?}: {line}"
        );
    }
}
