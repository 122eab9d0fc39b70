//! A real `infermesh-sidecar` process serving a model repository on
//! loopback: started, polled until ready, killed on drop. Fault controls
//! (stop, continue, kill, restart on the same address) let benchmarks and
//! tests stand a hung or dead cloud in for a real one.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::{Client, Req};

/// How long loading the models may take.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A running sidecar.
pub struct Sidecar {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    log_path: PathBuf,
    bin: PathBuf,
    repo: OsString,
    args: Vec<String>,
}

/// The debug sidecar binary `cargo test --workspace` builds; built here
/// (`cargo build -p sidecar`) when a package is tested alone. Panics if
/// the build fails.
pub fn debug_bin() -> PathBuf {
    let root = crate::repo_root();
    let bin = root.join("target/debug/infermesh-sidecar");
    if !bin.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", "sidecar", "--bin", "infermesh-sidecar"])
            .current_dir(&root)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot build the sidecar");
    }
    bin
}

impl Sidecar {
    /// Starts `bin --model-repository repo --listen ip:0` with JSON logs
    /// into `log_dir/<name>.log`, learns the port from the `listening` log
    /// line, and waits for `/v2/health/ready`.
    pub async fn start(
        bin: &Path,
        name: &str,
        repo: &Path,
        ip: [u8; 4],
        log_dir: &Path,
    ) -> Result<Sidecar, String> {
        Sidecar::start_on(bin, name, repo, SocketAddr::from((ip, 0)), log_dir).await
    }

    /// Like [`Sidecar::start`] but listens on `addr`; a port of 0 lets the
    /// kernel pick one.
    pub async fn start_on(
        bin: &Path,
        name: &str,
        repo: &Path,
        addr: SocketAddr,
        log_dir: &Path,
    ) -> Result<Sidecar, String> {
        Sidecar::start_with(bin, name, repo.as_os_str(), &[], addr, log_dir).await
    }

    /// Like [`Sidecar::start_on`] with `repo` any `--model-repository`
    /// value (a directory or a bucket URL) and more sidecar flags in
    /// `args`. The process inherits this one's environment (a bucket's
    /// credentials and endpoint).
    pub async fn start_with(
        bin: &Path,
        name: &str,
        repo: &OsStr,
        args: &[String],
        addr: SocketAddr,
        log_dir: &Path,
    ) -> Result<Sidecar, String> {
        let log_path = log_dir.join(format!("{name}.log"));
        let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let child = spawn(bin, repo, args, addr, log)?;
        let mut sidecar = Sidecar {
            name: name.to_owned(),
            addr,
            child,
            log_path,
            bin: bin.to_owned(),
            repo: repo.to_owned(),
            args: args.to_vec(),
        };
        sidecar.wait_ready().await?;
        Ok(sidecar)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let name = &self.name;
        let deadline = Instant::now() + READY_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "sidecar {name} exited with {status}: {}",
                    self.log()
                ));
            }
            if self.addr.port() == 0 {
                if let Some(addr) = listening_addr(&self.log()) {
                    self.addr = addr;
                }
            } else {
                let ready = Client::new(self.addr)
                    .try_send(Req::get("/v2/health/ready"))
                    .await;
                if ready.is_ok_and(|r| r.status == 200) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "sidecar {name} not ready within {READY_DEADLINE:?}: {}",
            self.log()
        ))
    }

    /// The process id of the current process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes the process (SIGSTOP): the kernel still accepts connections
    /// on its socket, but nothing answers, like a hung server.
    pub fn stop(&self) -> Result<(), String> {
        self.signal("STOP")
    }

    /// Resumes a stopped process (SIGCONT).
    pub fn cont(&self) -> Result<(), String> {
        self.signal("CONT")
    }

    fn signal(&self, sig: &str) -> Result<(), String> {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .map_err(|e| format!("cannot run kill -{sig} {pid}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{sig} {pid} failed with {status}"))
        }
    }

    /// Kills the process if it still runs and starts a new one on the same
    /// address (the port learned at the first start), appending to the
    /// same log; waits until it is ready.
    pub async fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let log = OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("{}: {e}", self.log_path.display()))?;
        self.child = spawn(&self.bin, &self.repo, &self.args, self.addr, log)?;
        self.wait_ready().await
    }

    /// The sidecar's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the sidecar on `listen` with its stdout and stderr into `log`.
fn spawn(
    bin: &Path,
    repo: &OsStr,
    args: &[String],
    listen: SocketAddr,
    log: File,
) -> Result<Child, String> {
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    Command::new(bin)
        .arg("--model-repository")
        .arg(repo)
        .args([
            "--listen",
            &listen.to_string(),
            "--log-format",
            "json",
            "--grace-period-ms",
            "2000",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))
}

/// The address in the sidecar's JSON `listening` log line.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        // Fields at the top level (flattened) or under "fields".
        let fields = v.get("fields").unwrap_or(&v);
        if fields.get("message")?.as_str()? != "listening" {
            return None;
        }
        fields.get("addr")?.as_str()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_listening_line() {
        let log = "{\"fields\":{\"message\":\"loading\"}}\nnot json\n{\"timestamp\":\"x\",\"level\":\"INFO\",\"fields\":{\"message\":\"listening\",\"addr\":\"127.0.0.2:4321\"}}\n";
        assert_eq!(
            listening_addr(log),
            Some(SocketAddr::from(([127, 0, 0, 2], 4321)))
        );
        let flat = r#"{"timestamp":"t","level":"INFO","message":"listening","addr":"127.0.0.1:39557","target":"sidecar::server"}"#;
        assert_eq!(
            listening_addr(flat),
            Some(SocketAddr::from(([127, 0, 0, 1], 39557)))
        );
        assert_eq!(listening_addr("{}"), None);
    }
}
