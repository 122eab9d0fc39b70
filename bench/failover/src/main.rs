//! `failover-bench`: three real inference sidecars on 127.0.0.2/3/4 stand
//! for three clouds behind a real Envoy; an open-loop client POSTs OIP infer
//! requests while the primary cloud is killed (and restarted) or hung (and
//! continued). Each variant is one way of failing over: Envoy's native
//! priority levels or aggregate cluster with outlier detection and retries
//! (optionally with active health checks), or the failover Wasm filter.
//!
//! Usage: failover-bench --sidecar BIN --out DIR [--wasm FILE]
//!   [--variants native-priority,native-aggregate,native-priority-hc,infermesh]
//!   [--scenarios kill,hang] [--rate 200] [--warmup-s 5] [--fault-s 10]
//!   [--kill-back-s 25] [--kill-end-s 60] [--hang-back-s 80] [--hang-end-s 110]
//!
//! Writes `<out>/<variant>-<scenario>.json` (events, summaries, per-second
//! counts, every request) and `<out>/table.md`, and prints the table.

mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use mesh::load::{self, CloudOf, Plan, Record};
use mesh::native::{HealthCheck, Layout, Native, UPSTREAM_HOST_HEADER};
use mesh::sidecar::Sidecar;
use mesh::{Bootstrap, Envoy, Req, WasmFilter};
use serde_json::{json, Value};

/// The three clouds, highest priority first.
const CLOUDS: [(&str, [u8; 4]); 3] = [
    ("aws", [127, 0, 0, 2]),
    ("gcp", [127, 0, 0, 3]),
    ("azure", [127, 0, 0, 4]),
];
const PRIMARY: &str = "aws";
const MODEL: &str = "digits-mlp";
const INFER_PATH: &str = "/v2/models/digits-mlp/infer";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    NativePriority,
    NativeAggregate,
    NativePriorityHc,
    Infermesh,
}

impl Variant {
    fn parse(s: &str) -> Result<Variant> {
        Ok(match s {
            "native-priority" => Variant::NativePriority,
            "native-aggregate" => Variant::NativeAggregate,
            "native-priority-hc" => Variant::NativePriorityHc,
            "infermesh" => Variant::Infermesh,
            _ => bail!("unknown variant {s:?} (native-priority, native-aggregate, native-priority-hc, infermesh)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Variant::NativePriority => "native-priority",
            Variant::NativeAggregate => "native-aggregate",
            Variant::NativePriorityHc => "native-priority-hc",
            Variant::Infermesh => "infermesh",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// SIGKILL the primary at the fault, restart it on the same port later.
    Kill,
    /// SIGSTOP the primary at the fault, SIGCONT it later.
    Hang,
}

impl Scenario {
    fn parse(s: &str) -> Result<Scenario> {
        Ok(match s {
            "kill" => Scenario::Kill,
            "hang" => Scenario::Hang,
            _ => bail!("unknown scenario {s:?} (kill, hang)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "kill",
            Scenario::Hang => "hang",
        }
    }
}

#[derive(Debug, Clone)]
struct Args {
    sidecar: PathBuf,
    wasm: Option<PathBuf>,
    out: PathBuf,
    variants: Vec<Variant>,
    scenarios: Vec<Scenario>,
    rate: f64,
    warmup_s: f64,
    fault_s: f64,
    kill_back_s: f64,
    kill_end_s: f64,
    hang_back_s: f64,
    hang_end_s: f64,
}

impl Args {
    fn parse() -> Result<Args> {
        let mut a = Args {
            sidecar: PathBuf::new(),
            wasm: None,
            out: PathBuf::new(),
            variants: vec![
                Variant::NativePriority,
                Variant::NativeAggregate,
                Variant::NativePriorityHc,
                Variant::Infermesh,
            ],
            scenarios: vec![Scenario::Kill, Scenario::Hang],
            rate: 200.0,
            warmup_s: 5.0,
            fault_s: 10.0,
            kill_back_s: 25.0,
            kill_end_s: 60.0,
            hang_back_s: 80.0,
            hang_end_s: 110.0,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| anyhow!("{flag} needs a value"))?;
            let num = || -> Result<f64> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| anyhow!("{flag} {value:?}: not a non-negative number"))
            };
            match flag.as_str() {
                "--sidecar" => a.sidecar = value.into(),
                "--wasm" => a.wasm = Some(value.into()),
                "--out" => a.out = value.into(),
                "--variants" => {
                    a.variants = value
                        .split(',')
                        .map(Variant::parse)
                        .collect::<Result<_>>()?
                }
                "--scenarios" => {
                    a.scenarios = value
                        .split(',')
                        .map(Scenario::parse)
                        .collect::<Result<_>>()?
                }
                "--rate" => a.rate = num()?,
                "--warmup-s" => a.warmup_s = num()?,
                "--fault-s" => a.fault_s = num()?,
                "--kill-back-s" => a.kill_back_s = num()?,
                "--kill-end-s" => a.kill_end_s = num()?,
                "--hang-back-s" => a.hang_back_s = num()?,
                "--hang-end-s" => a.hang_end_s = num()?,
                _ => bail!("unknown flag {flag}"),
            }
        }
        if a.sidecar.as_os_str().is_empty() || a.out.as_os_str().is_empty() {
            bail!("--sidecar BIN and --out DIR are required");
        }
        if a.rate <= 0.0 {
            bail!("--rate must be > 0");
        }
        for (back, end, what) in [
            (a.kill_back_s, a.kill_end_s, "kill"),
            (a.hang_back_s, a.hang_end_s, "hang"),
        ] {
            if !(a.warmup_s <= a.fault_s && a.fault_s < back && back < end) {
                bail!("{what}: need warmup ≤ fault < back < end");
            }
        }
        if a.variants.contains(&Variant::Infermesh) && a.wasm.is_none() {
            bail!("the infermesh variant needs --wasm FILE (the built infermesh.wasm)");
        }
        Ok(a)
    }

    /// (fault, back, end) in seconds.
    fn times(&self, s: Scenario) -> (f64, f64, f64) {
        match s {
            Scenario::Kill => (self.fault_s, self.kill_back_s, self.kill_end_s),
            Scenario::Hang => (self.fault_s, self.hang_back_s, self.hang_end_s),
        }
    }
}

/// The module's pluginConfig for the runs: the failover section alone.
fn infermesh_config() -> String {
    let clouds: Vec<Value> = (0u32..)
        .zip(CLOUDS)
        .map(|(prio, (name, _))| json!({"name": name, "cluster": name, "priority": prio}))
        .collect();
    json!({"failover": {
        "clouds": clouds,
        "health": {
            "probe": {"interval_ms": 500, "timeout_ms": 200,
                      "unhealthy_threshold": 2, "healthy_threshold": 3},
            "passive": {"consecutive_failures": 3},
        },
        "replay": {"per_try_timeout_ms": 1000},
        "hedge": {"enabled": true, "min_delay_ms": 30},
    }})
    .to_string()
}

/// What one run saw.
struct Outcome {
    variant: Variant,
    scenario: Scenario,
    /// Offsets (ms after the load started) of the fault, of the start of
    /// the recovery (SIGCONT / restart) and of the primary being ready again.
    fault_ms: f64,
    back_ms: f64,
    back_ready_ms: f64,
    end_ms: f64,
    warmup_ms: f64,
    loadavg_before: String,
    loadavg_after: String,
    records: Vec<Record>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A repository with only the model under load (fast to start).
fn model_repo(root: &Path) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("failover-bench-repo-")
        .tempdir()?;
    let src = root.join("examples/models").join(MODEL);
    std::os::unix::fs::symlink(&src, dir.path().join(MODEL))
        .with_context(|| format!("cannot link {}", src.display()))?;
    Ok(dir)
}

/// The infer body: the first reference case of digits-mlp version 1.
fn infer_body(root: &Path) -> Result<Vec<u8>> {
    let path = root.join("examples/models/digits-mlp/1/reference.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let r: Value = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    let input = &r["cases"][0]["inputs"]["input"];
    if input["data"].as_array().is_none_or(|d| d.is_empty()) {
        bail!("{}: no cases[0].inputs.input.data", path.display());
    }
    Ok(serde_json::to_vec(&json!({"inputs": [{
        "name": "input",
        "datatype": input["datatype"],
        "shape": input["shape"],
        "data": input["data"],
    }]}))?)
}

async fn start_envoy(variant: Variant, sidecars: &[Sidecar], wasm: Option<&Path>) -> Result<Envoy> {
    let clouds: Vec<(String, SocketAddr)> =
        sidecars.iter().map(|s| (s.name.clone(), s.addr)).collect();
    let bootstrap = match variant {
        Variant::NativePriority => Native::new(Layout::Priority).bootstrap(&clouds),
        Variant::NativeAggregate => Native::new(Layout::Aggregate).bootstrap(&clouds),
        Variant::NativePriorityHc => Native::new(Layout::Priority)
            .health_check(HealthCheck {
                interval_ms: 500,
                timeout_ms: 200,
                unhealthy_threshold: 2,
                healthy_threshold: 3,
            })
            .bootstrap(&clouds),
        Variant::Infermesh => {
            let wasm = wasm.ok_or_else(|| anyhow!("no --wasm"))?;
            let config = infermesh_config();
            filter_core::config::module::parse(config.as_bytes())
                .map_err(|e| anyhow!("the module config does not parse: {e}"))?;
            let mut b = Bootstrap::new();
            for (name, addr) in &clouds {
                b = b
                    .cluster(name, *addr)
                    .route_header(filter_core::headers::CLOUD, name, name);
            }
            b.default_route(PRIMARY)
                .wasm(
                    WasmFilter::new("infermesh", wasm, config)
                        .allow_on_headers_stop_iteration(true),
                )
                .to_json()
        }
    };
    Envoy::try_start_json(&bootstrap).await.map_err(|f| {
        anyhow!(
            "Envoy did not start: {}\n{}",
            f.reason,
            mesh::envoy::tail(&f.log, 40)
        )
    })
}

async fn run_one(args: &Args, variant: Variant, scenario: Scenario) -> Result<Outcome> {
    let root = mesh::repo_root();
    let repo = model_repo(&root)?;
    let req = Req::post(INFER_PATH, infer_body(&root)?).header("content-type", "application/json");
    let logs = args
        .out
        .join(format!("{}-{}-logs", variant.name(), scenario.name()));
    std::fs::create_dir_all(&logs)?;
    let mut sidecars = Vec::new();
    for (name, ip) in CLOUDS {
        sidecars.push(
            Sidecar::start(&args.sidecar, name, repo.path(), ip, &logs)
                .await
                .map_err(|e| anyhow!(e))?,
        );
    }
    let envoy = start_envoy(variant, &sidecars, args.wasm.as_deref()).await?;
    let (fault_s, back_s, end_s) = args.times(scenario);
    let mut plan = Plan::new(envoy.listener, args.rate, Duration::from_secs_f64(end_s));
    if variant != Variant::Infermesh {
        plan.served_by_header = UPSTREAM_HOST_HEADER.to_owned();
        plan.cloud_of = CloudOf::ByHost(
            CLOUDS
                .iter()
                .map(|(n, ip)| (std::net::Ipv4Addr::from(*ip).to_string(), n.to_string()))
                .collect(),
        );
    }
    let loadavg_before = loadavg();
    eprintln!(
        "failover-bench: {} {}: {end_s} s at {} req/s (load {loadavg_before})",
        variant.name(),
        scenario.name(),
        args.rate
    );
    let run = load::start(plan, move |_| req.clone()).map_err(|e| anyhow!(e))?;

    run.sleep_until(Duration::from_secs_f64(fault_s)).await;
    let primary = sidecars
        .first_mut()
        .ok_or_else(|| anyhow!("no primary sidecar"))?;
    // Offsets are taken just before the signal: requests due after them
    // meet the fault (or the recovery).
    let fault_ms = run.elapsed_ms();
    match scenario {
        Scenario::Kill => primary.kill(),
        Scenario::Hang => primary.stop().map_err(|e| anyhow!(e))?,
    }
    // Envoy's view of the hosts (health flags, outlier ejections) while
    // the fault lasts, for reading the numbers afterwards.
    run.sleep_until(Duration::from_secs_f64((fault_s + back_s) / 2.0))
        .await;
    let clusters = envoy.admin_get("/clusters").await;
    std::fs::write(logs.join("clusters-during-fault.txt"), &clusters.body)?;
    let hc = envoy.admin_get("/stats?filter=health_check|outlier").await;
    std::fs::write(logs.join("stats-during-fault.txt"), &hc.body)?;
    run.sleep_until(Duration::from_secs_f64(back_s)).await;
    let back_ms = run.elapsed_ms();
    match scenario {
        Scenario::Kill => primary.restart().await.map_err(|e| anyhow!(e))?,
        Scenario::Hang => primary.cont().map_err(|e| anyhow!(e))?,
    }
    let back_ready_ms = run.elapsed_ms();
    let records = run.finish().await.map_err(|e| anyhow!(e))?;
    let loadavg_after = loadavg();
    std::fs::write(logs.join("envoy.log"), envoy.log())?;
    drop(envoy);
    drop(sidecars);
    Ok(Outcome {
        variant,
        scenario,
        fault_ms,
        back_ms,
        back_ready_ms,
        end_ms: end_s * 1e3,
        warmup_ms: args.warmup_s * 1e3,
        loadavg_before,
        loadavg_after,
        records,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse()?;
    std::fs::create_dir_all(&args.out)?;
    eprintln!(
        "failover-bench: {} cores, load {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let mut outcomes = Vec::new();
    // Ctrl-C drops the run in progress, and with it its sidecars and Envoy
    // (their guards kill the processes); finished runs are still reported.
    tokio::select! {
        r = run_all(&args, &mut outcomes) => r?,
        _ = tokio::signal::ctrl_c() => eprintln!("failover-bench: interrupted"),
    }
    let table = report::table(&outcomes);
    std::fs::write(args.out.join("table.md"), &table)?;
    println!("{table}");
    Ok(())
}

/// Every scenario × variant; a failed run is reported and skipped.
async fn run_all(args: &Args, outcomes: &mut Vec<Outcome>) -> Result<()> {
    for &scenario in &args.scenarios {
        for &variant in &args.variants {
            match run_one(args, variant, scenario).await {
                Ok(o) => {
                    let file =
                        args.out
                            .join(format!("{}-{}.json", variant.name(), scenario.name()));
                    std::fs::write(&file, serde_json::to_vec(&report::to_json(&o))?)?;
                    eprintln!("{}", report::row(&o));
                    outcomes.push(o);
                }
                Err(e) => eprintln!(
                    "failover-bench: {} {} failed: {e:#}",
                    variant.name(),
                    scenario.name()
                ),
            }
        }
    }
    Ok(())
}
