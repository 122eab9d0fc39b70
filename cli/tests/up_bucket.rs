//! `infermesh up` with the aws cloud's models in an S3 bucket (moto's S3
//! server, started here on loopback), the other clouds on the example
//! directory: the bucket's models are served through Envoy, a version
//! pushed to the bucket rolls out on that cloud alone, and Ctrl-C stops
//! every process.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mesh::{Client, Req};

const BUCKET: &str = "infermesh-aws";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when the test ends, pass or fail.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto(port: u16) -> Proc {
    let bin = mesh::repo_root().join(".tools/bin/moto_server");
    assert!(
        bin.exists(),
        "{} not found: run `scripts/tools.sh objectstores`",
        bin.display()
    );
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Proc(child)
}

async fn put(s3: &Client, key: &str, body: Vec<u8>) {
    let req = Req {
        method: "PUT".parse().unwrap(),
        ..Req::post(format!("/{BUCKET}/{key}").trim_end_matches('/'), body)
    }
    // Path-style addressing: moto reads a bucket from a dotted Host.
    .header("host", "127.0.0.1");
    let r = s3.send(req).await;
    assert_eq!(r.status, 200, "PUT {key}: {}", r.text());
}

/// Uploads `dir` (a model version or a model) under `key_prefix`.
async fn upload(s3: &Client, dir: &Path, key_prefix: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let key = format!(
            "{key_prefix}/{}",
            path.file_name().unwrap().to_str().unwrap()
        );
        if path.is_dir() {
            Box::pin(upload(s3, &path, &key)).await;
        } else {
            put(s3, &key, std::fs::read(&path).unwrap()).await;
        }
    }
}

/// The `http://ADDR` of the describe line starting with `label`.
fn addr_of(lines: &[String], label: &str) -> SocketAddr {
    let line = lines
        .iter()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line in {lines:#?}"));
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap();
    url.trim_start_matches("http://").parse().unwrap()
}

fn infer_body(model_dir: &Path) -> String {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir.join("1/reference.json")).unwrap())
            .unwrap();
    let case = &reference["cases"][0]["inputs"];
    let inputs: Vec<serde_json::Value> = case
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            serde_json::json!({"name": name, "datatype": t["datatype"], "shape": t["shape"], "data": t["data"]})
        })
        .collect();
    serde_json::json!({ "inputs": inputs }).to_string()
}

async fn status(c: &Client, path: &str) -> u16 {
    c.send(Req::get(path)).await.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_a_cloud_from_its_bucket_and_rolls_out_a_pushed_version() {
    if mesh::envoy_bin().is_none() {
        eprintln!("skipped: no Envoy and {}=1", mesh::SKIP_ENV);
        return;
    }
    let models: PathBuf = mesh::repo_root().join("examples/models");
    let model = models.join("digits-mlp");
    let moto_port = free_port();
    let _moto = moto(moto_port);
    let s3 = Client::new(SocketAddr::from(([127, 0, 0, 1], moto_port)));
    put(&s3, "", Vec::new()).await; // the bucket
    for v in ["1", "2"] {
        upload(&s3, &model.join(v), &format!("models/digits-mlp/{v}")).await;
    }
    put(
        &s3,
        "models/digits-mlp/config.json",
        std::fs::read(model.join("config.json")).unwrap(),
    )
    .await;

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infermesh"));
    cmd.args(["up", "--port", "0", "--repository-poll-s", "1"])
        .args(["--model-repository", &format!("aws=s3://{BUCKET}/models")])
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{moto_port}"))
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("INFERMESH_SIDECAR_BIN", mesh::sidecar::debug_bin())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(dir) = std::env::var_os("INFERMESH_WASM_DIR") {
        cmd.env("INFERMESH_WASM_DIR", dir);
    }
    let mut up = Proc(cmd.spawn().unwrap());
    let stdout = up.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !lines.iter().any(|l: &String| l.starts_with("try:")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(e) => panic!("infermesh up did not come up ({e}); printed {lines:#?}"),
        }
    }
    let aws_line = lines
        .iter()
        .find(|l| l.trim_start().starts_with("aws"))
        .unwrap();
    assert!(
        aws_line.contains(&format!("models from s3://{BUCKET}/models")),
        "{aws_line}"
    );
    let gcp_line = lines
        .iter()
        .find(|l| l.trim_start().starts_with("gcp"))
        .unwrap();
    assert!(gcp_line.contains("examples/models"), "{gcp_line}");

    let envoy = Client::new(addr_of(&lines, "envoy"));
    let aws = Client::new(addr_of(&lines, "aws"));
    let gcp = Client::new(addr_of(&lines, "gcp"));

    // Through Envoy: aws is first in pick order and serves the bucket's model.
    let r = envoy
        .send(Req::post("/v2/models/digits-mlp/infer", infer_body(&model)))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let served = r.header("x-infermesh-served-by").unwrap_or_default();
    assert!(served.ends_with("@aws"), "served by {served:?}");
    // The bucket holds digits-mlp only; gcp has every example model.
    assert_eq!(status(&aws, "/v2/models/tiny-cnn/ready").await, 404);
    assert_eq!(status(&gcp, "/v2/models/tiny-cnn/ready").await, 200);

    // Push version 3: aws rolls it out (policy latest 2: 2 and 3), gcp not.
    assert_eq!(
        status(&aws, "/v2/models/digits-mlp/versions/3/ready").await,
        404
    );
    upload(&s3, &model.join("2"), "models/digits-mlp/3").await;
    let pushed = Instant::now();
    loop {
        if status(&aws, "/v2/models/digits-mlp/versions/3/ready").await == 200 {
            break;
        }
        assert!(
            pushed.elapsed() < Duration::from_secs(30),
            "version 3 not served by aws 30 s after the push (poll 1 s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "version 3 served by aws {:?} after the push",
        pushed.elapsed()
    );
    assert_eq!(
        status(&gcp, "/v2/models/digits-mlp/versions/3/ready").await,
        404
    );
    assert_eq!(
        status(&gcp, "/v2/models/digits-mlp/versions/1/ready").await,
        200
    );

    // Ctrl-C stops Envoy and every sidecar.
    let pids: Vec<u32> = lines
        .iter()
        .filter_map(|l| {
            let rest = l.split("(pid ").nth(1)?;
            rest.split(';').next()?.parse().ok()
        })
        .collect();
    assert_eq!(pids.len(), 3, "{lines:#?}");
    let ok = Command::new("kill")
        .args(["-INT", &up.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = up.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "infermesh up ignored Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "sidecar {pid} outlived infermesh up"
        );
    }
}
