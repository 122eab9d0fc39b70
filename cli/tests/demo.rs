//! `infermesh demo`, the README's main command, run as a user runs it: a
//! real Envoy with the built filters in front of two real sidecars. Every
//! check it prints must pass.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The sidecar binary: the debug build `cargo test --workspace` makes
/// (built here if this package is tested alone).
fn sidecar() -> PathBuf {
    let bin = repo().join("target/debug/infermesh-sidecar");
    if !bin.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", "sidecar"])
            .current_dir(repo())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot build the sidecar");
    }
    bin
}

#[test]
fn demo_passes_its_checks() {
    if mesh::envoy_bin().is_none() {
        eprintln!(
            "skipped demo_passes_its_checks: no Envoy and {}=1",
            mesh::SKIP_ENV
        );
        return;
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infermesh"));
    cmd.args(["demo", "--port", "0"])
        .env("INFERMESH_SIDECAR_BIN", sidecar());
    // Use the shipped modules when the test command built them.
    if let Some(dir) = std::env::var_os("INFERMESH_WASM_DIR") {
        cmd.env("INFERMESH_WASM_DIR", dir);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for line in [
        "-> 200 served by digits-mlp/1",
        "-> 200 served by digits-mlp/2",
        "-> 404 {\"error\":\"model \\\"resnet50\\\" is not served here\"}",
        "2000/2000 users got the version `infermesh explain` predicts",
        "400/400 users saw the same version on all of 5 more requests",
        "moved canary -> stable: 0",
        "weight now 50%",
        "demo: all checks passed",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}
