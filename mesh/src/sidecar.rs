//! A real `infermesh-sidecar` process serving a model repository on
//! loopback: started, polled until ready, killed on drop.

use std::fs::File;
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
        let log_path = log_dir.join(format!("{name}.log"));
        let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let listen = SocketAddr::from((ip, 0));
        let child = Command::new(bin)
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
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let mut sidecar = Sidecar {
            name: name.to_owned(),
            addr: listen,
            child,
            log_path,
        };
        let deadline = Instant::now() + READY_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = sidecar.child.try_wait() {
                return Err(format!(
                    "sidecar {name} exited with {status}: {}",
                    sidecar.log()
                ));
            }
            if sidecar.addr.port() == 0 {
                if let Some(addr) = listening_addr(&sidecar.log()) {
                    sidecar.addr = addr;
                }
            } else {
                let ready = Client::new(sidecar.addr)
                    .try_send(Req::get("/v2/health/ready"))
                    .await;
                if ready.is_ok_and(|r| r.status == 200) {
                    return Ok(sidecar);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "sidecar {name} not ready within {READY_DEADLINE:?}: {}",
            sidecar.log()
        ))
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
