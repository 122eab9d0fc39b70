//! The local mesh: on loopback, a real Envoy running the built filters
//! (model-router, canary, failover) in front of three clouds, each one
//! inference sidecar serving the example repository in both versions.
//! Routing is Istio's: a route per (cloud, version) matches
//! `x-infermesh-cloud` and `x-infermesh-version` and rewrites the OIP path
//! to name the version (a VirtualService `rewrite.uriRegexRewrite`), so the
//! sidecar serves exactly the version canary picked; a route per cloud
//! without a version; a default route to the first cloud.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use filter_core::headers::{CLOUD, VERSION};
use mesh::bootstrap::Route;
use mesh::sidecar::Sidecar;
use mesh::{Bootstrap, Envoy, WasmFilter};
use serde_json::json;

/// Models the filters route and split, each in versions 1 and 2.
pub const MODELS: [&str; 3] = ["digits-mlp", "tiny-cnn", "digits-forest"];
/// The versions every cloud serves.
pub const VERSIONS: [&str; 2] = ["1", "2"];

/// One cloud of the local mesh: a sidecar on its own loopback address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cloud {
    pub name: &'static str,
    pub ip: [u8; 4],
    /// The residency tag (`eu`, `us`).
    pub region: &'static str,
}

impl Cloud {
    /// The Envoy cluster of the cloud.
    pub fn cluster(&self) -> String {
        format!("cloud-{}", self.name)
    }
}

/// The clouds in failover pick order.
pub const CLOUDS: [Cloud; 3] = [
    Cloud {
        name: "aws",
        ip: [127, 0, 0, 2],
        region: "eu",
    },
    Cloud {
        name: "gcp",
        ip: [127, 0, 0, 3],
        region: "eu",
    },
    Cloud {
        name: "azure",
        ip: [127, 0, 0, 4],
        region: "us",
    },
];

/// The request header naming the data residency (`eu`, `us`).
pub const RESIDENCY_HEADER: &str = "x-data-residency";

/// The OIP paths without a version; the per-version routes rewrite them.
const UNVERSIONED: &str = "^/v2/models/([^/]+)/(infer|ready)$";

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
    /// The `--model-repository` of a cloud's sidecar (a directory or a
    /// bucket URL), by cloud name; a cloud not named serves
    /// `examples/models`.
    pub repositories: BTreeMap<String, String>,
    /// The sidecars' `--repository-poll-s` (their default when `None`).
    pub poll_s: Option<u32>,
}

impl Options {
    /// Options for the example repository on every cloud.
    pub fn new(root: PathBuf, port: u16, canary_percent: f64) -> Options {
        Options {
            root,
            port,
            canary_percent,
            step: None,
            repositories: BTreeMap::new(),
            poll_s: None,
        }
    }

    /// The model repository cloud `name` serves.
    pub fn repository(&self, name: &str) -> OsString {
        match self.repositories.get(name) {
            Some(r) => OsString::from(r),
            None => self.root.join("examples/models").into_os_string(),
        }
    }
}

/// Reads one `--model-repository` value of `infermesh up` into `into`:
/// `CLOUD=DIR|URL` for one cloud, `DIR|URL` for every cloud. A directory
/// is made absolute (the sidecars run from the checkout).
pub fn add_repository(into: &mut BTreeMap<String, String>, value: &str) -> Result<(), String> {
    let (clouds, repo): (Vec<&str>, &str) = match value.split_once('=') {
        Some((name, repo)) if CLOUDS.iter().any(|c| c.name == name) => (vec![name], repo),
        Some((name, _))
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            return Err(format!(
                "--model-repository {value:?}: no cloud {name:?} (clouds: {})",
                cloud_names()
            ));
        }
        _ => (CLOUDS.iter().map(|c| c.name).collect(), value),
    };
    if repo.is_empty() {
        return Err(format!(
            "--model-repository {value:?}: empty repository (a directory or s3://, gs://, az:// URL)"
        ));
    }
    let repo = if repo.contains("://") {
        repo.to_owned()
    } else {
        let dir = Path::new(repo);
        if !dir.is_dir() {
            return Err(format!(
                "--model-repository {value:?}: {repo} is not a directory (nor a bucket URL)"
            ));
        }
        std::path::absolute(dir)
            .map_err(|e| format!("--model-repository {value:?}: {e}"))?
            .display()
            .to_string()
    };
    for c in clouds {
        into.insert(c.to_owned(), repo.clone());
    }
    Ok(())
}

fn cloud_names() -> String {
    CLOUDS.map(|c| c.name).join(", ")
}

/// A running local mesh; everything stops when it is dropped.
pub struct LocalMesh {
    pub envoy: Envoy,
    /// One per cloud, in the order of [`CLOUDS`], named after the cloud.
    pub sidecars: Vec<Sidecar>,
    pub router_config: serde_json::Value,
    pub canary_config: serde_json::Value,
    pub failover_config: serde_json::Value,
    /// Each sidecar's `--model-repository`, in the order of [`CLOUDS`].
    pub repositories: Vec<OsString>,
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
    if !dist.join("infermesh.wasm").is_file() {
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

/// The model whose canary the guard watches, and the fault knob can fail.
pub const GUARDED_MODEL: &str = "digits-forest";
/// The model whose canary gets a shadow copy of baseline requests.
pub const SHADOWED_MODEL: &str = "digits-mlp";
/// Envoy runtime key of the fault knob: percent of `GUARDED_MODEL`'s
/// version-2 requests that Envoy's fault filter fails with a 500 (0 at
/// start; set with the admin API's `/runtime_modify`).
pub const FAULT_RUNTIME_KEY: &str = "infermesh.local.canary_fault_percent";

pub fn canary_config(percent: f64, step: Option<(u64, f64)>) -> serde_json::Value {
    let splits: Vec<_> = MODELS
        .iter()
        .map(|m| {
            let mut split = json!({
                "model": m,
                "versions": [{"name": "1", "weight": 100.0 - percent}, {"name": "2", "weight": percent}],
            });
            if *m == GUARDED_MODEL {
                split["guard"] = json!({"window_s": 2, "min_requests": 10, "max_error_rate": 10});
            }
            if *m == SHADOWED_MODEL {
                split["shadow"] = json!({
                    "version": "2", "fraction": 0.5, "cluster": CLOUDS[2].cluster(),
                    "compare": {"outputs": {"probabilities": "argmax"}},
                });
            }
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

/// Envoy's fault filter behind the module: fails [`FAULT_RUNTIME_KEY`]
/// percent (0 until set) of the requests the module sent to version 2 of
/// [`GUARDED_MODEL`], with a 500: a canary that goes bad, for the guard.
fn fault_filter() -> serde_json::Value {
    json!({
        "name": "envoy.filters.http.fault",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "abort": {"http_status": 500, "percentage": {"numerator": 0, "denominator": "HUNDRED"}},
            "abort_percent_runtime": FAULT_RUNTIME_KEY,
            "headers": [
                {"name": filter_core::headers::MODEL, "string_match": {"exact": GUARDED_MODEL}},
                {"name": VERSION, "string_match": {"exact": "2"}},
            ],
        },
    })
}

/// aws and gcp in the eu, azure in the us, picked in that order; requests
/// tagged `eu` stay on eu clouds, `us` on us clouds, untagged go anywhere.
pub fn failover_config() -> serde_json::Value {
    let clouds: Vec<_> = (0u32..)
        .zip(CLOUDS)
        .map(|(priority, c)| {
            json!({"name": c.name, "cluster": c.cluster(), "tags": [c.region], "priority": priority})
        })
        .collect();
    json!({
        "clouds": clouds,
        "residency": {
            "header": RESIDENCY_HEADER,
            "rules": {"eu": ["eu"], "us": ["us"]},
            "default": ["*"],
            "on_unknown": "reject"
        },
        "health": {
            "probe": {"interval_ms": 500, "timeout_ms": 200,
                      "unhealthy_threshold": 2, "healthy_threshold": 3},
            "passive": {"consecutive_failures": 3}
        },
        "replay": {"per_try_timeout_ms": 1000},
        "hedge": {"delay_ms": 50},
        // model-router runs first and removes client-sent x-infermesh-*.
        "trust_downstream_headers": true
    })
}

/// The Envoy routes: per (cloud, version), per cloud, default first cloud.
fn routes(mut b: Bootstrap) -> Bootstrap {
    for c in CLOUDS {
        for v in VERSIONS {
            b = b.route(
                Route::new(&c.cluster())
                    .header(CLOUD, c.name)
                    .header(VERSION, v)
                    .regex_rewrite(UNVERSIONED, &format!("/v2/models/\\1/versions/{v}/\\2")),
            );
        }
    }
    for c in CLOUDS {
        b = b.route_header(CLOUD, c.name, &c.cluster());
    }
    b.default_route(&CLOUDS[0].cluster())
}

impl LocalMesh {
    /// Starts a sidecar per cloud and Envoy; returns when all are ready.
    pub async fn start(opts: &Options) -> Result<LocalMesh, String> {
        let (dist, sidecar_bin) = prepare(&opts.root)?;
        let router_config = router_config();
        let canary_config = canary_config(opts.canary_percent, opts.step);
        let failover_config = failover_config();
        let dir = tempfile::Builder::new()
            .prefix("infermesh-local-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let args: Vec<String> = match opts.poll_s {
            Some(s) => vec!["--repository-poll-s".into(), s.to_string()],
            None => Vec::new(),
        };
        let repositories: Vec<OsString> = CLOUDS.iter().map(|c| opts.repository(c.name)).collect();
        let mut sidecars = Vec::new();
        for (c, repo) in CLOUDS.iter().zip(&repositories) {
            let addr = SocketAddr::from((c.ip, 0));
            let s = Sidecar::start_with(&sidecar_bin, c.name, repo, &args, addr, dir.path())
                .await
                .map_err(|e| format!("cloud {}: {e}", c.name))?;
            sidecars.push(s);
        }
        let mut b = Bootstrap::new().listener_port(opts.port);
        for (c, s) in CLOUDS.iter().zip(&sidecars) {
            b = b.cluster(&c.cluster(), s.addr);
        }
        let module = serde_json::json!({
            "router": router_config,
            "canary": canary_config,
            "failover": failover_config,
        });
        filter_core::config::module::parse(module.to_string().as_bytes())
            .map_err(|e| format!("the local mesh's module config: {e}"))?;
        b = routes(b)
            .wasm(
                WasmFilter::new(
                    "infermesh",
                    &dist.join("infermesh.wasm"),
                    module.to_string(),
                )
                .allow_on_headers_stop_iteration(true),
            )
            .filter_behind(fault_filter());
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
            failover_config,
            repositories,
            _dir: dir,
        })
    }

    /// The sidecar standing for cloud `name`.
    pub fn cloud(&mut self, name: &str) -> Result<&mut Sidecar, String> {
        self.sidecars
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("no cloud {name:?}"))
    }

    /// A summary of what runs where.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "  envoy  http://{}   (admin http://{}; infermesh.wasm: router -> canary -> failover, V8)\n",
            self.envoy.listener, self.envoy.admin
        );
        let examples = self
            .repositories
            .iter()
            .all(|r| Path::new(r).ends_with("examples/models"));
        for (priority, ((c, s), repo)) in CLOUDS
            .iter()
            .zip(&self.sidecars)
            .zip(&self.repositories)
            .enumerate()
        {
            let serves = if examples {
                format!("every example model, versions {}", VERSIONS.join(" and "))
            } else {
                format!("models from {}", repo.to_string_lossy())
            };
            out.push_str(&format!(
                "  {:<6} http://{:<16} (pid {}; cluster {}, region {}, pick order {}; {serves})\n",
                c.name,
                s.addr.to_string(),
                s.pid(),
                c.cluster(),
                c.region,
                priority + 1,
            ));
        }
        out
    }
}
