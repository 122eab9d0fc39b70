//! `infermesh validate istio/`: the cross-resource rules, each shown on a
//! copy of the shipped istio/ with one mistake put in. Every failure names
//! the resource and the field, and the command exits 1.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// A copy of istio/ in a temp dir.
fn copy_istio() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for rel in mesh::istio::yaml_files(&repo("istio")).unwrap() {
        let to = tmp.path().join(rel.strip_prefix(repo("istio")).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&rel, &to).unwrap();
    }
    tmp
}

/// Replaces `from` (which must be there) with `to` in `file` of the copy.
fn edit(tmp: &Path, file: &str, from: &str, to: &str) {
    let path = tmp.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains(from),
        "{file} no longer contains {from:?}; update this test"
    );
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

/// Runs `infermesh validate ARGS`: exit code and stdout.
fn validate(args: &[&Path]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_infermesh"))
        .arg("validate")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Asserts exit 1 and a FAIL line naming `resource` and `field`.
fn fails_with(tmp: &Path, resource: &str, field: &str, words: &str) {
    let (code, out) = validate(&[tmp]);
    assert_eq!(code, Some(1), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains(resource) && l.contains(field))
        .unwrap_or_else(|| panic!("no FAIL for {resource} {field}:\n{out}"));
    assert!(line.contains(words), "{line}");
}

const WASMPLUGIN: &str = "path-routing/infermesh-wasmplugin.yaml";
const ENVOYFILTER: &str = "body-routing/infermesh-envoyfilter.yaml";
const ROUTING: &str = "base/digits-mlp-routing.yaml";
const PORTS: &str = "    ports:\n    - number: 8000\n";

#[test]
fn the_shipped_istio_passes_both_installs() {
    let (code, out) = validate(&[&repo("istio")]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("path-routing (applied together)"), "{out}");
    assert!(out.contains("body-routing (applied together)"), "{out}");
}

#[test]
fn a_plugin_without_ports() {
    let tmp = copy_istio();
    edit(tmp.path(), WASMPLUGIN, PORTS, "");
    fails_with(
        tmp.path(),
        "WasmPlugin models/infermesh",
        "spec.match[0].ports",
        "every outbound HTTP port",
    );
}

#[test]
fn an_envoyfilter_without_a_port() {
    let tmp = copy_istio();
    edit(tmp.path(), ENVOYFILTER, "        portNumber: 8000\n", "");
    fails_with(
        tmp.path(),
        "EnvoyFilter models/infermesh-body",
        "spec.configPatches[0].match.listener.portNumber",
        "every outbound HTTP port",
    );
}

#[test]
fn both_variants_on_one_workload() {
    let tmp = copy_istio();
    let t = tmp.path();
    let (code, out) = validate(&[
        &t.join("base"),
        &t.join("path-routing"),
        &t.join("body-routing"),
    ]);
    assert_eq!(code, Some(1), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .unwrap_or_default();
    assert!(
        line.contains("EnvoyFilter models/infermesh-body: spec.workloadSelector")
            && line.contains("WasmPlugin models/infermesh")
            && line.contains("router, canary, failover stage(s) would run twice"),
        "{out}"
    );
}

#[test]
fn fail_close_on_a_broad_match() {
    let tmp = copy_istio();
    edit(
        tmp.path(),
        WASMPLUGIN,
        "failStrategy: FAIL_OPEN",
        "failStrategy: FAIL_CLOSE",
    );
    // Scoped to the inference port, FAIL_CLOSE is a choice, not a mistake.
    let (code, out) = validate(&[tmp.path()]);
    assert_eq!(code, Some(0), "{out}");
    edit(tmp.path(), WASMPLUGIN, PORTS, "");
    fails_with(
        tmp.path(),
        "WasmPlugin models/infermesh",
        "spec.failStrategy",
        "deny-all",
    );
}

#[test]
fn sha256_missing_with_if_not_present() {
    let tmp = copy_istio();
    edit(
        tmp.path(),
        WASMPLUGIN,
        "imagePullPolicy: Always",
        "imagePullPolicy: IfNotPresent",
    );
    fails_with(
        tmp.path(),
        "WasmPlugin models/infermesh",
        "spec.sha256",
        "never pulled again",
    );
    edit(
        tmp.path(),
        WASMPLUGIN,
        "  # sha256: <contents of dist/oci/infermesh.manifest.sha256>",
        "  sha256: 8c5e3f1b2a0d4e6f8c5e3f1b2a0d4e6f8c5e3f1b2a0d4e6f8c5e3f1b2a0d4e6f",
    );
    let (code, out) = validate(&[tmp.path()]);
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn default_retries_on_a_route_failover_replays() {
    let tmp = copy_istio();
    // version-2 is http[2]: drop its `retries: {attempts: 0}`.
    let path = tmp.path().join(ROUTING);
    let text = std::fs::read_to_string(&path).unwrap();
    let at = text.find("  - name: version-2").unwrap();
    let (head, tail) = text.split_at(at);
    let tail = tail.replacen("    retries:\n      attempts: 0\n", "", 1);
    std::fs::write(&path, format!("{head}{tail}")).unwrap();
    fails_with(
        tmp.path(),
        "VirtualService models/digits-mlp",
        "spec.http[2] (version-2).retries",
        "default retry policy",
    );
}

#[test]
fn a_failover_cluster_without_a_serviceentry() {
    let tmp = copy_istio();
    edit(
        tmp.path(),
        "base/failover-serviceentries.yaml",
        "  - inference.gcp-eu.example.com\n  location",
        "  - inference.gcp-west.example.com\n  location",
    );
    fails_with(
        tmp.path(),
        "WasmPlugin models/infermesh",
        "spec.pluginConfig.failover.clouds[1].cluster",
        "no ServiceEntry or Service defines host inference.gcp-eu.example.com port 8000",
    );
    fails_with(
        tmp.path(),
        "EnvoyFilter models/infermesh-body",
        "failover.clouds[1].cluster",
        "inference.gcp-eu.example.com",
    );
}

#[test]
fn a_non_http_model_port() {
    let tmp = copy_istio();
    edit(
        tmp.path(),
        "base/digits-mlp-service.yaml",
        "  - name: http-oip\n    port: 8000\n    targetPort: 8000\n    appProtocol: http\n",
        "  - name: oip\n    port: 8000\n    targetPort: 8000\n",
    );
    fails_with(
        tmp.path(),
        "Service models/digits-mlp",
        "spec.ports[0]",
        "not HTTP to Istio",
    );
}
