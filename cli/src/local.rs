//! The local mesh: on loopback, a real Envoy running the built filters
//! (model-router, then canary) in front of two inference sidecars, one per
//! model version, routed the way Istio routes (a header match on
//! `x-infermesh-version` → the version's cluster; default → stable).

use std::path::{Path, PathBuf};
use std::process::Command;

use mesh::sidecar::Sidecar;
use mesh::{Bootstrap, Envoy, WasmFilter};
use serde_json::json;

/// Models the local mesh serves, each in versions 1 and 2.
pub const MODELS: [&str; 3] = ["digits-mlp", "tiny-cnn", "digits-forest"];
/// The versions, one sidecar each.
pub const VERSIONS: [&str; 2] = ["1", "2"];

/// What `up` and `demo` are started with.
#[derive(Debug, Clone)]
pub struct Options {
    /// The repository checkout (scripts, examples, dist).
    pub root: PathBuf,
    /// Listener port on 127.0.0.1 (0: any free port).
    pub port: u16,
    /// Canary weight of version 2, percent.
    pub canary_percent: f64,
    /// Optional schedule step: `(start_unix_s, percent)`.
    pub step: Option<(u64, f64)>,
}

/// A running local mesh; everything stops when it is dropped.
pub struct LocalMesh {
    pub envoy: Envoy,
    pub sidecars: Vec<Sidecar>,
    pub router_config: serde_json::Value,
    pub canary_config: serde_json::Value,
    _dir: tempfile::TempDir,
}

fn run(root: &Path, program: &str, args: &[&str]) -> Result<(), String> {
    eprintln!("infermesh: running {program} {}", args.join(" "));
    let status = Command::new(root.join(program))
        .args(args)
        .current_dir(root)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {} failed: {status}", args.join(" ")))
    }
}

/// Installs what is missing: Envoy (into .tools), the wasm target and the
/// filter modules (dist/), and the release sidecar.
pub fn prepare(root: &Path) -> Result<(PathBuf, PathBuf), String> {
    let envoy = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".tools/bin/envoy"));
    if !envoy.is_file() {
        run(root, "scripts/tools.sh", &["wasm", "envoy"])?;
    }
    let dist = std::env::var_os(mesh::wasm::WASM_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("dist"));
    if !dist.join("canary.wasm").is_file() || !dist.join("model-router.wasm").is_file() {
        run(root, "wasm-build.sh", &[])?;
    }
    let sidecar = std::env::var_os("INFERMESH_SIDECAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/infermesh-sidecar"));
    if !sidecar.is_file() {
        eprintln!("infermesh: building the sidecar (cargo build --release -p sidecar)");
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "--release", "-p", "sidecar"])
            .current_dir(root)
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building the sidecar failed: {status}"));
        }
    }
    Ok((dist, sidecar))
}

/// A model repository holding only `version` of each model, as the pods of
/// one DestinationRule subset would: config.json copied, the version
/// directory linked.
fn version_repo(examples: &Path, dir: &Path, version: &str) -> Result<PathBuf, String> {
    let repo = dir.join(format!("v{version}"));
    for model in MODELS {
        let src = examples.join(model);
        let dst = repo.join(model);
        std::fs::create_dir_all(&dst).map_err(|e| format!("{}: {e}", dst.display()))?;
        std::fs::copy(src.join("config.json"), dst.join("config.json"))
            .map_err(|e| format!("{}: {e}", src.display()))?;
        std::os::unix::fs::symlink(src.join(version), dst.join(version))
            .map_err(|e| format!("{}: {e}", dst.display()))?;
    }
    Ok(repo)
}

pub fn router_config() -> serde_json::Value {
    let models: Vec<_> = MODELS
        .iter()
        .map(
            |m| json!({"name": m, "versions": VERSIONS, "aliases": {"stable": "1", "canary": "2"}}),
        )
        .collect();
    json!({
        "models": models,
        "model_header": "x-model-name",
        "version_header": "x-model-version",
        "rewrite_path": true,
        "on_unknown": "reject",
        "on_non_oip": "pass"
    })
}

pub fn canary_config(percent: f64, step: Option<(u64, f64)>) -> serde_json::Value {
    let splits: Vec<_> = MODELS
        .iter()
        .map(|m| {
            let mut split = json!({
                "model": m,
                "versions": [{"name": "1", "weight": 100.0 - percent}, {"name": "2", "weight": percent}],
            });
            if let Some((start, p)) = step {
                split["schedule"] = json!({
                    "start": mesh::rfc3339_utc(start),
                    "steps": [{"after_s": 0, "weights": {"2": p}}],
                });
            }
            split
        })
        .collect();
    json!({
        "splits": splits,
        "sticky_key": [{"header": "x-user-id"}, {"cookie": "session"}],
        "override_header": "x-canary-version",
        // model-router runs first and removes client-sent x-infermesh-*.
        "trust_downstream_headers": true
    })
}

impl LocalMesh {
    /// Starts two sidecars and Envoy; returns when all are ready.
    pub async fn start(opts: &Options) -> Result<LocalMesh, String> {
        let (dist, sidecar_bin) = prepare(&opts.root)?;
        let dir = tempfile::Builder::new()
            .prefix("infermesh-local-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let examples = opts.root.join("examples/models");
        let mut sidecars = Vec::new();
        for v in VERSIONS {
            let repo = version_repo(&examples, dir.path(), v)?;
            sidecars.push(
                Sidecar::start(
                    &sidecar_bin,
                    &format!("sidecar-v{v}"),
                    &repo,
                    [127, 0, 0, 1],
                    dir.path(),
                )
                .await?,
            );
        }
        let router_config = router_config();
        let canary_config = canary_config(opts.canary_percent, opts.step);
        let mut b = Bootstrap::new().listener_port(opts.port);
        for (v, s) in VERSIONS.iter().zip(&sidecars) {
            let cluster = format!("v{v}");
            b = b.cluster(&cluster, s.addr).route_header(
                filter_core::headers::VERSION,
                v,
                &cluster,
            );
        }
        b = b
            .default_route("v1")
            .wasm(
                WasmFilter::new(
                    "infermesh-model-router",
                    &dist.join("model-router.wasm"),
                    router_config.to_string(),
                )
                .allow_on_headers_stop_iteration(true),
            )
            .wasm(WasmFilter::new(
                "infermesh-canary",
                &dist.join("canary.wasm"),
                canary_config.to_string(),
            ));
        let envoy = Envoy::try_start(&b).await.map_err(|f| {
            format!(
                "Envoy did not start: {}\n{}",
                f.reason,
                mesh::envoy::tail(&f.log, 30)
            )
        })?;
        Ok(LocalMesh {
            envoy,
            sidecars,
            router_config,
            canary_config,
            _dir: dir,
        })
    }

    /// A summary of what runs where.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "  envoy     http://{}   (admin http://{}; filters: model-router -> canary, V8)\n",
            self.envoy.listener, self.envoy.admin
        );
        for s in &self.sidecars {
            out.push_str(&format!(
                "  {:<9} http://{}   ({})\n",
                s.name,
                s.addr,
                MODELS.join(", ")
            ));
        }
        out
    }
}
