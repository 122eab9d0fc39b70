//! The real binary: exit codes and the SIGTERM drain under load.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_infermesh-sidecar");

/// Kills the child if the test fails half-way.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bad_flags_and_config_exit_64() {
    let cases: &[&[&str]] = &[
        &["--bogus"],
        &["--listen", "not-an-address"],
        &["--queue-capacity", "0"],
        &["--log-format", "xml"],
        &[
            "--model-repository",
            "/nonexistent/infermesh-models",
            "--listen",
            "127.0.0.1:0",
        ],
    ];
    for args in cases {
        let out = Command::new(BIN).args(*args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(BIN)
        .env("INFERMESH_MAX_BODY_BYTES", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("INFERMESH_MAX_BODY_BYTES"));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--model-repository"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let repo = temp_dir("sigterm");
    let config = json!({
        "max_batch_size": 32, "dynamic_batching": {"max_delay_us": 600_000, "preferred_batch_size": 32},
        "version_policy": {"latest": 2},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    });
    copy_model(&repo, "digits-mlp", Some(&config.to_string()));
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--grace-period-ms",
            "5000",
        ])
        .arg("--model-repository")
        .arg(&repo)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut guard = Guard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "listening" {
                        let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                        sent = true;
                    }
                }
            }
        }
    });
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .parse()
        .unwrap();
    wait_ready(addr).await.unwrap();

    let case = reference("digits-mlp", "2")["cases"][1].clone();
    let n = 6;
    let flows: Vec<_> = (0..n)
        .map(|_| {
            let case = case.clone();
            tokio::spawn(async move {
                let r = post_json(addr, "/v2/models/digits-mlp/infer", &case_request(&case))
                    .await
                    .unwrap();
                (r, case)
            })
        })
        .collect();
    // All requests are inside the server (held by the batching delay).
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &metrics(addr).await,
        "infermesh_sidecar_pending_requests",
        &[("model", "digits-mlp")],
    ) < n as f64
    {
        assert!(Instant::now() < deadline, "requests never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &guard.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    for f in flows {
        let (r, case) = f.await.unwrap();
        assert_eq!(
            r.status,
            200,
            "in-flight request cut by SIGTERM: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_matches(
            &r.json(),
            &case,
            &reference("digits-mlp", "2")["tolerance"],
            "drained request",
        );
    }
    let status = loop {
        if let Some(s) = guard.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(6),
            "did not exit within the grace period"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
