//! `infermesh`: validate and explain filter configs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use infermesh::explain::{self, ExplainRequest};
use infermesh::inject::{self, Mode, Options, Scope};
use infermesh::manifest::Filter;
use infermesh::validate;

const USAGE: &str = "\
infermesh: ML model rollout and failover in the service mesh

USAGE:
  infermesh demo [--port PORT]
      Start the local mesh and drive traffic through it: routing on OIP
      paths and aliases, the sticky 90/10 canary, a cloud killed under
      load and the failover (no client-visible errors, eu traffic kept
      off the us cloud, the cloud readmitted after it restarts), a
      scheduled step to 50%, and what Envoy counted. Exit 1 if a check
      fails.
  infermesh up [--port PORT] [--canary PERCENT]
               [--model-repository [CLOUD=]DIR|URL]... [--repository-poll-s N]
      Start the local mesh and keep it running until Ctrl-C: a real Envoy
      (V8) with model-router, canary and failover in front of three
      clouds on loopback (aws 127.0.0.2 and gcp 127.0.0.3 in the eu,
      azure 127.0.0.4 in the us), each an inference sidecar serving
      versions 1 and 2 of the example models. --model-repository gives
      every cloud, or one (aws=s3://bucket/models, gcp=gs://...,
      azure=az://...), its own repository: a directory or a bucket the
      sidecar syncs and hot-rolls out (credentials and endpoints from the
      environment, as in sidecar/README.md); repeat it per cloud.
      --repository-poll-s sets the sidecars' bucket poll interval.
  infermesh validate [--filter NAME] PATH...
      Check pluginConfig files (*.json; the filter is taken from the file
      name, e.g. canary.json or failover-eu.json, or --filter) and the
      pluginConfig of every WasmPlugin in YAML manifests or directories of
      them, with the filters' own parsers; then the manifests together,
      as Istio applies them (a directory with base/ is checked as base/
      plus each sibling folder; several paths as one install): plugins
      without ports, FAIL_CLOSE on a broad match, sha256 unset with
      IfNotPresent, two module filters on one workload, Istio retries on
      routes failover replays, failover clusters without a ServiceEntry,
      non-HTTP model Service ports. Exit 1 if anything fails.
  infermesh explain --config FILE [--filter NAME] --path PATH
                    [-X METHOD] [-H 'name: value']...
                    [--body JSON | --body-file FILE]
                    [--at RFC3339 | --at-ms MS] [--down CLOUD[,CLOUD]...]
                    [--stats FILE]
      Print the decision the filter would take for that request
      (--body for model-router body routing and the failover replay
      buffer, --at for canary schedules, --down for failover: clouds to
      treat as unhealthy, --stats for the canary guard: a proxy's
      /stats/prometheus, whose guard state and weights in force the
      decision then uses). The method defaults to POST with a body or on
      an OIP infer path, else GET.

  infermesh inject -f FILE|- [--namespace-enabled] [-o yaml|json] [OPTIONS]
      Print FILE (YAML or JSON, multi-document) with the inference
      sidecar injected into each Pod, Deployment, StatefulSet, DaemonSet,
      ReplicaSet, Job and CronJob whose pod template opts in
      (label or annotation infermesh.io/inject=true; with
      --namespace-enabled, every one that does not opt out). A summary
      goes to stderr. Exit 1 if an opted-in object cannot be injected.
  infermesh inject serve --tls-cert FILE --tls-key FILE
                         [--listen ADDR:PORT] [OPTIONS]
      The mutating admission webhook (HTTPS, admission.k8s.io/v1):
      POST /inject (pods that opt in), POST /inject/namespace (pods of an
      opted-in namespace that do not opt out), GET /healthz. Listens on
      0.0.0.0:9443 by default; stops on SIGTERM or Ctrl-C.
      Both modes compute the same injection. OPTIONS (defaults; each has
      a per-pod annotation, see istio/README.md):
        --image REF               sidecar image (registry.example.com/infermesh/sidecar:VERSION)
        --mode native|container   native sidecar (init container with
                                  restartPolicy Always) or plain container (native)
        --kube-version X.Y        pick the mode: native from 1.29 on
        --port N                  sidecar port (8000)
        --model-volume NAME       pod volume holding the model repository (models)
        --cpu Q --memory Q        requests (500m, 512Mi)
        --cpu-limit Q --memory-limit Q   limits (none, 2Gi; empty: none)
        --startup-timeout-seconds N      model loading allowance (300)
        --exclude-namespaces NS,...      never injected (kube-system,
                                  kube-public, kube-node-lease, infermesh-system)

FILTERS (in the order they run): model-router, canary, failover
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("validate") => run_validate(args.get(1..).unwrap_or_default()),
        Some("up") => run_up(args.get(1..).unwrap_or_default()),
        Some("demo") => run_demo(args.get(1..).unwrap_or_default()),
        Some("explain") => run_explain(args.get(1..).unwrap_or_default()),
        Some("inject") => run_inject(args.get(1..).unwrap_or_default()),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(format!("expected a command\n\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("infermesh: {msg}");
            ExitCode::from(64)
        }
    }
}

fn filter_arg(name: &str) -> Result<Filter, String> {
    Filter::from_name(name)
        .ok_or_else(|| format!("unknown filter {name:?} (known: {})", Filter::names()))
}

fn run_validate(args: &[String]) -> Result<ExitCode, String> {
    let mut filter = None;
    let mut paths = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--filter" => filter = Some(filter_arg(it.next().ok_or("--filter needs a value")?)?),
            p => paths.push(PathBuf::from(p)),
        }
    }
    if paths.is_empty() {
        return Err(format!("validate needs at least one path\n\n{USAGE}"));
    }
    let mut findings: Vec<_> = paths
        .iter()
        .flat_map(|p| validate::check_path(p, filter))
        .collect();
    // Manifests are also checked together, as Istio applies them.
    let manifests: Vec<PathBuf> = paths
        .iter()
        .filter(|p| p.is_dir() || p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .cloned()
        .collect();
    findings.extend(validate::check_installs(&manifests));
    let mut bad = 0;
    for f in &findings {
        match &f.error {
            None => println!("ok    {} ({})", f.what, f.filter.unwrap_or("?")),
            Some(e) => {
                bad += 1;
                println!("FAIL  {}: {e}", f.what);
            }
        }
    }
    println!("validate: {} passed, {bad} failed", findings.len() - bad);
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_explain(args: &[String]) -> Result<ExitCode, String> {
    let mut config = None;
    let mut filter = None;
    let mut req = ExplainRequest::default();
    let mut at_ms = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--config" => config = Some(PathBuf::from(value()?)),
            "--filter" => filter = Some(filter_arg(value()?)?),
            "--path" => req.path = value()?.clone(),
            "-X" | "--method" => req.method = Some(value()?.clone()),
            "--stats" => {
                let f = value()?;
                let text = std::fs::read_to_string(f).map_err(|e| format!("{f}: {e}"))?;
                req.stats = Some(mesh::Stats::try_parse(&text).map_err(|e| format!("{f}: {e}"))?);
            }
            "--down" => req.down.extend(
                value()?
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned),
            ),
            "-H" | "--header" => {
                let h = value()?;
                let (k, v) = h
                    .split_once(':')
                    .ok_or_else(|| format!("header {h:?} is not 'name: value'"))?;
                req.headers
                    .push((k.trim().to_ascii_lowercase(), v.trim().as_bytes().to_vec()));
            }
            "--body" => req.body = Some(value()?.as_bytes().to_vec()),
            "--body-file" => {
                let f = value()?;
                req.body = Some(std::fs::read(f).map_err(|e| format!("{f}: {e}"))?);
            }
            "--at" => {
                let t = value()?;
                at_ms = Some(
                    filter_core::schedule::parse_rfc3339(t)
                        .ok_or_else(|| format!("--at {t:?} is not RFC 3339"))?,
                );
            }
            "--at-ms" => {
                let t = value()?;
                at_ms = Some(
                    t.parse()
                        .map_err(|_| format!("--at-ms {t:?} is not a number"))?,
                );
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    let config = config.ok_or("explain needs --config FILE")?;
    let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let filter = filter
        .or_else(|| Filter::from_file_stem(stem))
        .ok_or("cannot tell the filter from the file name: pass --filter")?;
    if req.path.is_empty() {
        return Err("explain needs --path".into());
    }
    req.now_ms = match at_ms {
        Some(t) => t,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    };
    let bytes = std::fs::read(&config).map_err(|e| format!("{}: {e}", config.display()))?;
    match filter {
        Filter::Module => {
            let cfg = filter_core::config::module::parse(&bytes)
                .map_err(|e| format!("{}: invalid pluginConfig: {e}", config.display()))?;
            print!("{}", explain::module(&cfg, &req)?);
        }
        Filter::Canary => {
            let cfg = filter_core::config::canary::parse(&bytes)
                .map_err(|e| format!("{}: invalid pluginConfig: {e}", config.display()))?;
            print!("{}", explain::canary(&cfg, &req));
        }
        Filter::ModelRouter => {
            let cfg = filter_core::config::router::parse(&bytes)
                .map_err(|e| format!("{}: invalid pluginConfig: {e}", config.display()))?;
            print!("{}", explain::router(&cfg, &req));
        }
        Filter::Failover => {
            let cfg = filter_core::config::failover::parse(&bytes)
                .map_err(|e| format!("{}: invalid pluginConfig: {e}", config.display()))?;
            print!("{}", explain::failover(&cfg, &req)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Options of `up` and `demo`.
struct MeshArgs {
    port: u16,
    canary: f64,
    repositories: BTreeMap<String, String>,
    poll_s: Option<u32>,
}

/// Options shared by `up` and `demo` (`demo` refuses the repository ones).
fn mesh_args(args: &[String]) -> Result<MeshArgs, String> {
    let mut out = MeshArgs {
        port: 18080,
        canary: 10.0,
        repositories: BTreeMap::new(),
        poll_s: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--port" => {
                let v = value()?;
                out.port = v
                    .parse()
                    .map_err(|_| format!("--port {v:?} is not a port"))?;
            }
            "--canary" => {
                let v = value()?;
                out.canary = v
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=100.0).contains(p))
                    .ok_or_else(|| format!("--canary {v:?} is not a percentage"))?;
            }
            "--model-repository" => {
                infermesh::local::add_repository(&mut out.repositories, value()?)?;
            }
            "--repository-poll-s" => {
                let v = value()?;
                out.poll_s = Some(
                    v.parse::<u32>()
                        .ok()
                        .filter(|s| (1..=86_400).contains(s))
                        .ok_or_else(|| {
                            format!(
                                "--repository-poll-s {v:?} is not a number of seconds in 1..=86400"
                            )
                        })?,
                );
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(out)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn run_demo(args: &[String]) -> Result<ExitCode, String> {
    let MeshArgs {
        port,
        repositories,
        poll_s,
        ..
    } = mesh_args(args)?;
    if !repositories.is_empty() || poll_s.is_some() {
        return Err(
            "demo runs on the example models; --model-repository and --repository-poll-s are for `infermesh up`"
                .into(),
        );
    }
    let root = mesh::repo_root();
    match runtime()?.block_on(infermesh::demo::run(&root, port)) {
        Ok(report) => {
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Err(report) => {
            print!("{report}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run_up(args: &[String]) -> Result<ExitCode, String> {
    let a = mesh_args(args)?;
    let opts = infermesh::local::Options {
        repositories: a.repositories,
        poll_s: a.poll_s,
        ..infermesh::local::Options::new(mesh::repo_root(), a.port, a.canary)
    };
    runtime()?.block_on(async {
        let mesh = match infermesh::local::LocalMesh::start(&opts).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("infermesh: {e}");
                return Ok(ExitCode::FAILURE);
            }
        };
        println!("infermesh local mesh is up\n{}", mesh.describe());
        println!(
            "try:\n  curl -s -i http://{0}/v2/models/digits-mlp/versions/canary/ready\n  curl -s -i -H 'x-user-id: alice' http://{0}/v2/models/digits-mlp/ready\n  curl -s -i -H 'x-data-residency: us' http://{0}/v2/models/digits-mlp/ready\n  curl -s http://{1}/stats/prometheus | grep infermesh_\nkill a cloud (kill -9 PID of its sidecar, pids above) and watch x-infermesh-served-by move.\nCtrl-C stops everything.",
            mesh.envoy.listener, mesh.envoy.admin
        );
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("infermesh: stopping");
        drop(mesh);
        Ok(ExitCode::SUCCESS)
    })
}

/// Parses an injector option into `opts`; `Ok(false)` if `flag` is not one.
fn inject_option(
    opts: &mut Options,
    flag: &str,
    value: &mut dyn FnMut() -> Result<String, String>,
) -> Result<bool, String> {
    let quantity = |v: String| {
        if v.is_empty() || inject::is_quantity(&v) {
            Ok(v)
        } else {
            Err(format!("{flag} {v:?} is not a Kubernetes quantity"))
        }
    };
    match flag {
        "--image" => opts.image = value()?,
        "--mode" => {
            let v = value()?;
            opts.mode =
                Mode::parse(&v).ok_or(format!("--mode {v:?} is not native or container"))?;
        }
        "--kube-version" => {
            let v = value()?;
            opts.mode = Mode::for_kube_version(&v)
                .ok_or(format!("--kube-version {v:?} is not MAJOR.MINOR"))?;
        }
        "--port" => {
            let v = value()?;
            opts.port = v
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or(format!("--port {v:?} is not a port"))?;
        }
        "--model-volume" => opts.model_volume = value()?,
        "--cpu" => opts.resources.cpu = quantity(value()?)?,
        "--memory" => opts.resources.memory = quantity(value()?)?,
        "--cpu-limit" => {
            opts.resources.cpu_limit = Some(quantity(value()?)?).filter(|q| !q.is_empty())
        }
        "--memory-limit" => {
            opts.resources.memory_limit = Some(quantity(value()?)?).filter(|q| !q.is_empty())
        }
        "--startup-timeout-seconds" => {
            let v = value()?;
            opts.startup_timeout_s =
                v.parse()
                    .ok()
                    .filter(|n| (2..=86_400).contains(n))
                    .ok_or(format!(
                        "--startup-timeout-seconds {v:?} is not in 2..=86400"
                    ))?;
        }
        "--exclude-namespaces" => {
            opts.excluded_namespaces = value()?
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
        }
        _ => return Ok(false),
    }
    if opts.resources.cpu.is_empty() || opts.resources.memory.is_empty() {
        return Err("--cpu and --memory cannot be empty".into());
    }
    Ok(true)
}

fn run_inject(args: &[String]) -> Result<ExitCode, String> {
    let serve = args.first().is_some_and(|a| a == "serve");
    let args = if serve { &args[1..] } else { args };
    let mut opts = Options::default();
    let (mut file, mut cert, mut key) = (None, None, None);
    let mut listen: std::net::SocketAddr = ([0, 0, 0, 0], 9443).into();
    let mut scope = Scope::OptIn;
    let mut json = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        if inject_option(&mut opts, a, &mut value)? {
            continue;
        }
        match a.as_str() {
            "-f" | "--filename" if !serve => file = Some(value()?),
            "--namespace-enabled" if !serve => scope = Scope::Namespace,
            "-o" | "--output" if !serve => {
                json = match value()?.as_str() {
                    "json" => true,
                    "yaml" => false,
                    o => return Err(format!("-o {o:?} is not yaml or json")),
                }
            }
            "--tls-cert" if serve => cert = Some(value()?),
            "--tls-key" if serve => key = Some(value()?),
            "--listen" if serve => {
                let v = value()?;
                listen = v
                    .parse()
                    .map_err(|_| format!("--listen {v:?} is not ADDR:PORT"))?;
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    if serve {
        let read = |flag: &str, path: Option<String>| {
            let path = path.ok_or(format!("inject serve needs {flag} FILE"))?;
            std::fs::read(&path).map_err(|e| format!("{flag} {path}: {e}"))
        };
        let cfg = inject::server::ServerConfig::new(
            listen,
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
            opts,
        );
        return runtime()?.block_on(serve_webhook(cfg));
    }
    let file = file.ok_or("inject needs -f FILE (or -f - for stdin)")?;
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("stdin: {e}"))?
    } else {
        std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?
    };
    let (docs, notes) = match inject::offline::inject_text(&text, scope, &opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("infermesh inject: {file}: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    for n in &notes {
        match &n.skipped {
            None => eprintln!("injected  {}", n.what),
            Some(why) => eprintln!("skipped   {} ({why})", n.what),
        }
    }
    if json {
        let out = match docs.as_slice() {
            [one] => one.clone(),
            many => serde_json::json!({"apiVersion": "v1", "kind": "List", "items": many}),
        };
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        print!("{}", inject::offline::emit_yaml(&docs));
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve_webhook(cfg: inject::server::ServerConfig) -> Result<ExitCode, String> {
    let server = inject::server::start(cfg)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!("infermesh inject: listening on https://{}", server.addr);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("infermesh inject: stopping");
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
