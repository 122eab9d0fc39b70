//! The local mesh on loopback: a real Envoy running the filters, stub
//! upstreams, and a client. The e2e tests and `infermesh up` both use it.
//!
//! A test builds the filter (`wasm::build`, once per test binary), starts
//! stub upstreams ([`Upstream`]), writes an Istio-shaped bootstrap
//! ([`Bootstrap`]) and starts Envoy on it ([`Envoy`]), then drives traffic
//! with [`Client`] and reads `/stats/prometheus` ([`Stats`]). Every port is
//! ephemeral and every child process is killed on drop, so tests run in
//! parallel.
//!
//! Envoy is found through `ENVOY_BIN`, else `<repo>/.tools/bin/envoy`
//! (installed by `scripts/tools.sh envoy`). Without it tests fail loudly,
//! unless `INFERMESH_E2E_SKIP=1`, in which case [`require_envoy!`] prints a
//! skip line and returns.

pub mod bootstrap;
pub mod client;
pub mod digits;
pub mod envoy;
pub mod istio;
pub mod load;
pub mod native;
pub mod sidecar;
pub mod stats;
pub mod upstream;
pub mod wasm;

use std::path::PathBuf;

pub use bootstrap::{Bootstrap, FailurePolicy, WasmFilter};
pub use client::{Client, Req, Resp};
pub use envoy::{Envoy, StartFailure};
pub use stats::{Sample, Stats};
pub use upstream::{Seen, Upstream};

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Set to `1` to turn a missing Envoy into a printed skip.
pub const SKIP_ENV: &str = "INFERMESH_E2E_SKIP";

/// The Envoy binary: `ENVOY_BIN`, else `<repo>/.tools/bin/envoy`.
///
/// Returns `None` only when it is missing and `INFERMESH_E2E_SKIP=1`;
/// panics with instructions when it is missing otherwise.
pub fn envoy_bin() -> Option<PathBuf> {
    let path = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/bin/envoy"));
    if path.is_file() {
        return Some(path);
    }
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        return None;
    }
    panic!(
        "Envoy not found at {} (set ENVOY_BIN or run `scripts/tools.sh envoy`; \
         set {SKIP_ENV}=1 to skip the e2e tests instead)",
        path.display()
    );
}

/// Returns the Envoy binary, or prints a skip line and returns from the
/// calling test when Envoy is absent and `INFERMESH_E2E_SKIP=1`.
#[macro_export]
macro_rules! require_envoy {
    ($test:expr) => {
        match $crate::envoy_bin() {
            Some(bin) => bin,
            None => {
                eprintln!("skipped {}: no Envoy and {}=1", $test, $crate::SKIP_ENV);
                return;
            }
        }
    };
}

/// Unix seconds as an RFC 3339 UTC timestamp (`2026-12-01T09:00:00Z`), for
/// schedule starts relative to now.
pub fn rfc3339_utc(unix_s: u64) -> String {
    let days = unix_s / 86_400;
    let rem = unix_s % 86_400;
    // Civil-from-days (H. Hinnant), for days since 1970-01-01 ≥ 0.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Asserts no response is the reply Envoy gives when a Wasm VM failed, and
/// that the log shows no failed hook or panic.
pub fn assert_vm_healthy(resps: &[Resp], log: &str) {
    for (i, r) in resps.iter().enumerate() {
        let details = r
            .header("x-envoy-response-code-details")
            .unwrap_or_default();
        assert!(
            !(r.text().contains("wasm_fail_stream") || details.contains("wasm_fail_stream")),
            "#{i}: the Wasm VM failed: {} {}",
            r.status,
            r.text()
        );
    }
    for bad in [
        "wasm_fail_stream",
        "Function: proxy_on_request_headers failed",
        "panicked",
        "wasm trap",
        "Wasm VM failed",
    ] {
        assert!(!log.contains(bad), "Envoy's log contains {bad:?}");
    }
}
