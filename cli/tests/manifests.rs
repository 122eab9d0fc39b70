//! Every `pluginConfig` in istio/ and examples/config/ must pass the
//! filter's own parser, so a broken manifest fails `cargo test`, not a
//! rollout.

use std::path::Path;

use infermesh::manifest::{to_json, wasm_plugins, yaml_files, Filter};
use infermesh::validate::check_path;
use serde_json::Value;

fn repo(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

#[test]
fn every_wasmplugin_in_istio_parses() {
    let findings = check_path(&repo("istio"), None);
    let bad: Vec<_> = findings.iter().filter(|f| !f.ok()).collect();
    assert!(bad.is_empty(), "{bad:#?}");
    // The module has a WasmPlugin with every stage, so the loop above
    // checked each section.
    let plugins = wasm_plugins(&repo("istio/path-routing/infermesh-wasmplugin.yaml")).unwrap();
    assert_eq!(plugins.len(), 1);
    assert_eq!(plugins[0].component.as_deref(), Some(Filter::Module.name()));
    let cfg = filter_core::config::module::parse(&plugins[0].plugin_config).unwrap();
    assert_eq!(cfg.stages(), ["router", "canary", "failover"]);
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
    let text =
        std::fs::read_to_string(repo("istio/path-routing/infermesh-wasmplugin.yaml")).unwrap();
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
        "pluginConfig.canary.splits[0].versions: weights sum to 110%, not 100%"
    );
}

#[test]
fn yaml_files_are_found_recursively() {
    let files = yaml_files(&repo("istio")).unwrap();
    assert!(files
        .iter()
        .any(|f| f.ends_with("infermesh-wasmplugin.yaml")));
    let plugins = wasm_plugins(&repo("istio/path-routing/infermesh-wasmplugin.yaml")).unwrap();
    assert_eq!(plugins.len(), 1);
    assert_eq!(plugins[0].component.as_deref(), Some("infermesh"));
}

#[test]
fn a_broken_config_in_an_envoyfilter_is_named() {
    let dir = std::env::temp_dir().join(format!("infermesh-envoyfilter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text =
        std::fs::read_to_string(repo("istio/body-routing/infermesh-envoyfilter.yaml")).unwrap();
    let broken = text.replacen("\"max_bytes\": 262144", "\"max_bytes\": 0", 1);
    assert_ne!(broken, text, "the manifest changed shape; update this test");
    std::fs::write(dir.join("broken.yaml"), broken).unwrap();
    let findings = check_path(&dir, None);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert!(
        findings[0]
            .what
            .ends_with("EnvoyFilter/infermesh-body#configPatches[0]"),
        "{findings:#?}"
    );
    assert_eq!(
        findings[0].error.as_deref(),
        Some("pluginConfig.router.body.max_bytes: 0: must be between 1 and 16777216")
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

#[test]
fn a_broken_failover_pluginconfig_is_named() {
    let dir = std::env::temp_dir().join(format!("infermesh-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text =
        std::fs::read_to_string(repo("istio/path-routing/infermesh-wasmplugin.yaml")).unwrap();
    // A probe timeout longer than the interval would let rounds overlap.
    let broken = text.replacen("timeout_ms: 1000\n", "timeout_ms: 6000\n", 1);
    assert_ne!(broken, text, "the manifest changed shape; update this test");
    std::fs::write(dir.join("broken.yaml"), broken).unwrap();
    let findings = check_path(&dir, None);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0].filter, Some("infermesh"));
    assert_eq!(
        findings[0].error.as_deref(),
        Some("pluginConfig.failover.health.probe.timeout_ms: 6000ms is longer than interval_ms (5000ms): probes would overlap")
    );
}

/// Every YAML document in istio/ as JSON.
fn istio_docs() -> Vec<Value> {
    yaml_files(&repo("istio"))
        .unwrap()
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            yaml_rust2::YamlLoader::load_from_str(&text)
                .unwrap()
                .iter()
                .map(to_json)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn kind<'a>(docs: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| d["kind"] == k)
}

#[test]
fn failover_clouds_match_the_serviceentries_and_routes() {
    let docs = istio_docs();
    let plugin = kind(&docs, "WasmPlugin")
        .find(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "infermesh")
        .expect("the infermesh WasmPlugin in istio/");
    let cfg = filter_core::config::failover::parse(
        &serde_json::to_vec(&plugin["spec"]["pluginConfig"]["failover"]).unwrap(),
    )
    .unwrap();
    // host -> ports of every ServiceEntry.
    let entries: Vec<(String, Vec<i64>)> = kind(&docs, "ServiceEntry")
        .flat_map(|se| {
            let ports: Vec<i64> = se["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["number"].as_i64().unwrap())
                .collect();
            se["spec"]["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |h| (h.as_str().unwrap().to_owned(), ports.clone()))
        })
        .collect();
    // cloud name -> destination host of the VirtualService route on it.
    let mut routed = Vec::new();
    for vs in kind(&docs, "VirtualService") {
        for route in vs["spec"]["http"].as_array().unwrap() {
            let Some(cloud) = route["match"][0]["headers"]["x-infermesh-cloud"]["exact"].as_str()
            else {
                continue;
            };
            let host = route["route"][0]["destination"]["host"].as_str().unwrap();
            assert_eq!(
                route["rewrite"]["authority"], host,
                "route for {cloud} keeps the caller's authority"
            );
            routed.push((cloud.to_owned(), host.to_owned()));
        }
    }
    let mut local = Vec::new();
    for c in &cfg.clouds {
        // Istio's outbound cluster: outbound|PORT|SUBSET|HOST.
        let parts: Vec<&str> = c.cluster.split('|').collect();
        assert_eq!(parts.len(), 4, "{}: cluster {:?}", c.name, c.cluster);
        let (port, host) = (parts[1].parse::<i64>().unwrap(), parts[3]);
        assert_eq!(parts[0], "outbound", "{}", c.name);
        assert!(
            entries
                .iter()
                .any(|(h, ports)| h == host && ports.contains(&port)),
            "{}: no ServiceEntry for {host}:{port} ({entries:?})",
            c.name
        );
        assert_eq!(c.authority, host, "{}: callouts must name the host", c.name);
        match routed.iter().find(|(name, _)| *name == c.name) {
            Some((_, dest)) => assert_eq!(dest, host, "{}: routed elsewhere", c.name),
            None => local.push(c.name.clone()),
        }
    }
    // Exactly one cloud, the one the mesh runs in, takes the default route.
    assert_eq!(local, ["aws-eu"], "clouds without a route: {local:?}");
    for (name, _) in &routed {
        assert!(
            cfg.cloud_index(name.as_bytes()).is_some(),
            "route for unknown cloud {name}"
        );
    }
}
