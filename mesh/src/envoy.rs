//! A real Envoy process: started on a [`Bootstrap`], polled until ready,
//! killed on drop.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::bootstrap::Bootstrap;
use crate::client::{Client, Req, Resp};
use crate::stats::Stats;

/// How long Envoy may take to become ready (V8 compiles the filters on
/// every worker; slow on a loaded 2-core machine).
pub const START_DEADLINE: Duration = Duration::from_secs(45);
/// Lines of Envoy's log printed when a test fails.
const TAIL_LINES: usize = 80;
/// Readiness poll interval.
const POLL: Duration = Duration::from_millis(25);

/// Why Envoy did not become ready.
#[derive(Debug)]
pub struct StartFailure {
    pub reason: String,
    /// Envoy's exit status, if it exited.
    pub exited: Option<ExitStatus>,
    /// Envoy's whole log (stdout and stderr).
    pub log: String,
}

/// A running Envoy with its temp dir (bootstrap, log, admin address file).
pub struct Envoy {
    child: Child,
    dir: TempDir,
    log_path: PathBuf,
    /// Admin API address.
    pub admin: SocketAddr,
    /// The outbound listener's address.
    pub listener: SocketAddr,
}

impl Envoy {
    /// Starts Envoy and waits until it serves; panics with its log if not.
    pub async fn start(bootstrap: &Bootstrap) -> Envoy {
        match Envoy::try_start(bootstrap).await {
            Ok(e) => e,
            Err(f) => panic!(
                "Envoy did not start: {} (exit: {:?})\n--- Envoy log (tail) ---\n{}",
                f.reason,
                f.exited,
                tail(&f.log, TAIL_LINES)
            ),
        }
    }

    /// Starts Envoy with `--concurrency 2` (two workers, so two Wasm VMs per
    /// plugin) and waits until the admin API says ready and the listener
    /// accepts connections, or the process exits, or [`START_DEADLINE`].
    pub async fn try_start(bootstrap: &Bootstrap) -> Result<Envoy, StartFailure> {
        Envoy::try_start_json(&bootstrap.to_json()).await
    }

    /// Starts Envoy on any bootstrap JSON, as [`Envoy::try_start`] does.
    /// The admin address must be on loopback and the listener to wait for
    /// must be named `outbound`.
    pub async fn try_start_json(bootstrap: &serde_json::Value) -> Result<Envoy, StartFailure> {
        Envoy::try_start_json_on(bootstrap, "outbound").await
    }

    /// Starts Envoy on any bootstrap JSON and waits for the listener named
    /// `listener` (its address becomes [`Envoy::listener`]).
    pub async fn try_start_json_on(
        bootstrap: &serde_json::Value,
        listener: &str,
    ) -> Result<Envoy, StartFailure> {
        let bin = crate::envoy_bin().unwrap_or_else(|| {
            panic!("no Envoy binary: call require_envoy! at the top of the test")
        });
        let dir = tempfile::Builder::new()
            .prefix("infermesh-e2e-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let config = dir.path().join("envoy.json");
        let text = serde_json::to_string_pretty(bootstrap)
            .unwrap_or_else(|e| panic!("cannot serialise the bootstrap: {e}"));
        std::fs::write(&config, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let admin_file = dir.path().join("admin-address");
        let log_path = dir.path().join("envoy.log");
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone the log handle: {e}"));
        let level = std::env::var("INFERMESH_E2E_ENVOY_LOG").unwrap_or_else(|_| "info".to_owned());
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "2",
                "--disable-hot-restart",
                "--use-dynamic-base-id",
            ])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--log-level", &level])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut envoy = Envoy {
            child,
            dir,
            log_path,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            listener: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        match envoy.wait_ready(&admin_file, listener).await {
            Ok(()) => Ok(envoy),
            Err(reason) => {
                let exited = envoy.child.try_wait().ok().flatten();
                let _ = envoy.child.kill();
                let _ = envoy.child.wait();
                Err(StartFailure {
                    reason,
                    exited,
                    log: envoy.log(),
                })
            }
        }
    }

    async fn wait_ready(
        &mut self,
        admin_file: &std::path::Path,
        listener: &str,
    ) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        let mut stage = "admin address file";
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "Envoy exited with {status} while waiting for the {stage}"
                ));
            }
            if self.admin.port() == 0 {
                if let Some(addr) = std::fs::read_to_string(admin_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<SocketAddr>().ok())
                {
                    self.admin = addr;
                    stage = "admin /ready";
                }
            } else if self.listener.port() == 0 {
                let ready = Client::new(self.admin).try_send(Req::get("/ready")).await;
                if ready.is_ok_and(|r| r.status == 200) {
                    stage = "listener";
                    self.listener = self.listener_named(listener).await?;
                }
            } else if tokio::net::TcpStream::connect(self.listener).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        Err(format!(
            "not ready within {START_DEADLINE:?} (waiting for the {stage})"
        ))
    }

    /// The address of the listener named `name`, from
    /// `/listeners?format=json`.
    pub async fn listener_named(&self, name: &str) -> Result<SocketAddr, String> {
        let resp = Client::new(self.admin)
            .try_send(Req::get("/listeners?format=json"))
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&resp.body)
            .map_err(|e| format!("/listeners is not JSON ({e}): {}", resp.text()))?;
        let sock = v["listener_statuses"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["name"] == name))
            .map(|l| &l["local_address"]["socket_address"])
            .ok_or_else(|| format!("no {name} listener in /listeners: {v}"))?;
        let port = sock["port_value"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{name} listener has no port yet: {sock}"))?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// A client for the outbound listener.
    pub fn client(&self) -> Client {
        Client::new(self.listener)
    }

    /// GET on the admin API.
    pub async fn admin_get(&self, path: &str) -> Resp {
        Client::new(self.admin).send(Req::get(path)).await
    }

    /// A `/stats/prometheus` snapshot that includes every request answered
    /// before the call: the module publishes its counters on its tick
    /// (`COUNTER_FLUSH_MS`), so this waits out two of them first.
    pub async fn stats(&self) -> Stats {
        tokio::time::sleep(std::time::Duration::from_millis(
            2 * filter_core::stats::COUNTER_FLUSH_MS + 50,
        ))
        .await;
        let resp = self.admin_get("/stats/prometheus").await;
        assert_eq!(resp.status, 200, "/stats/prometheus: {}", resp.text());
        Stats::parse(&resp.text())
    }

    /// Envoy's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The temp dir holding the bootstrap (`envoy.json`) and the log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- Envoy log (last {TAIL_LINES} lines of {}) ---\n{}\n--- end of Envoy log ---",
                self.log_path.display(),
                tail(&self.log(), TAIL_LINES)
            );
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
