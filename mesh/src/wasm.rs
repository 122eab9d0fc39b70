//! Builds the filters' `.wasm` once per test binary.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Directory with prebuilt modules, as `wasm-build.sh` writes them
/// (`canary.wasm` for `filter-canary`); when set, no build is run.
pub const WASM_DIR_ENV: &str = "INFERMESH_WASM_DIR";

/// The crate of the one shipped module, `infermesh.wasm`.
pub const MODULE: &str = "filter-infermesh";

/// Path of the built `infermesh.wasm` (see [`build`]).
pub fn module() -> PathBuf {
    build(MODULE)
}

static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();

/// Path of the built `.wasm` of filter crate `krate` (e.g. `filter-canary`).
///
/// The first call per crate runs
/// `cargo build -p <krate> --target wasm32-wasip1 --profile wasm` (a no-op
/// when fresh); later calls return the cached path. With
/// `INFERMESH_WASM_DIR` set, the file is taken from there instead. Panics
/// with the build output when the build fails.
pub fn build(krate: &str) -> PathBuf {
    let file = format!("{}.wasm", krate.replace('-', "_"));
    if let Some(dir) = std::env::var_os(WASM_DIR_ENV) {
        let shipped = format!("{}.wasm", krate.strip_prefix("filter-").unwrap_or(krate));
        let path = PathBuf::from(dir).join(shipped);
        assert!(
            path.is_file(),
            "{WASM_DIR_ENV} is set but {} does not exist",
            path.display()
        );
        return path;
    }
    let built = BUILT.get_or_init(Mutex::default);
    // A panic while building poisons the lock; later tests should still
    // report the build failure, not a poison error, so take the guard.
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(krate) {
        return path.clone();
    }
    let root = crate::repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "-p",
            krate,
            "--target",
            "wasm32-wasip1",
            "--profile",
            "wasm",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {krate}: {e}"));
    assert!(
        out.status.success(),
        "building {krate} for wasm32-wasip1 failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let path = target.join("wasm32-wasip1/wasm").join(&file);
    assert!(
        path.is_file(),
        "cargo built {krate} but {} is missing",
        path.display()
    );
    built.insert(krate.to_owned(), path.clone());
    path
}
