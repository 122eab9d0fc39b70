//! The model repository in object storage, against the emulators a user
//! would test with (moto for S3, fake-gcs-server, Azurite), started here on
//! 127.0.0.1 from `.tools/bin` (`scripts/tools.sh objectstores`). Everything
//! is observed through the real sidecar binary's HTTP API and logs: a
//! version uploaded under load, a deleted version, a truncated and an
//! over-limit upload, the store going away and coming back, and the
//! configuration errors.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_infermesh-sidecar");
const POLL_S: u64 = 1;
const BUCKET: &str = "infermesh-models";
const PREFIX: &str = "repo";
const MODEL: &str = "wine";
/// Given to the sidecars as their secret; must never show in a log line.
const SECRET: &str = "Zm9vYmFyLXNlY3JldC1rZXktdmFsdWUtMTIzNA==";
/// Azurite's well-known development account.
const AZ_ACCOUNT: &str = "devstoreaccount1";
const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const SYNC_FAILURES: &str = "infermesh_sidecar_repository_sync_failures_total";
const LAST_SUCCESS: &str = "infermesh_sidecar_repository_last_sync_success_timestamp_seconds";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    S3,
    Gcs,
    Azure,
}

fn tool(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} not found: run `scripts/tools.sh objectstores`",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An emulator process on a fixed loopback port (kept across restarts).
struct Emulator {
    kind: Kind,
    port: u16,
    data: PathBuf,
    child: Option<Child>,
}

impl Emulator {
    fn start(kind: Kind) -> Emulator {
        let mut e = Emulator {
            kind,
            port: free_port(),
            data: temp_dir(&format!("{kind:?}-store").to_lowercase()),
            child: None,
        };
        e.launch();
        e
    }

    fn launch(&mut self) {
        let port = self.port.to_string();
        let data = self.data.to_str().unwrap().to_string();
        let mut cmd = match self.kind {
            Kind::S3 => {
                let mut c = Command::new(tool("moto_server"));
                c.args(["-H", "127.0.0.1", "-p", &port]);
                c
            }
            Kind::Gcs => {
                let mut c = Command::new(tool("fake-gcs-server"));
                let public = format!("127.0.0.1:{port}");
                c.args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port])
                    .args(["-public-host", &public])
                    .args(["-backend", "filesystem", "-filesystem-root", &data])
                    .args(["-log-level", "error"]);
                c
            }
            Kind::Azure => {
                let mut c = Command::new(tool("azurite-blob"));
                c.args(["--blobHost", "127.0.0.1", "--blobPort", &port])
                    .args(["--location", &data])
                    .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"]);
                c
            }
        };
        let log = std::fs::File::create(self.data.with_extension("log")).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{:?} emulator did not listen",
                self.kind
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn url(&self, bucket: &str, prefix: &str) -> String {
        let scheme = match self.kind {
            Kind::S3 => "s3",
            Kind::Gcs => "gs",
            Kind::Azure => "az",
        };
        format!("{scheme}://{bucket}/{prefix}")
    }

    /// What a user of this emulator puts in the sidecar's environment.
    fn sidecar_env(&self) -> Vec<(&'static str, String)> {
        match self.kind {
            Kind::S3 => vec![
                ("AWS_ENDPOINT_URL", self.endpoint()),
                ("AWS_ACCESS_KEY_ID", "testing".into()),
                ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
                ("AWS_REGION", "us-east-1".into()),
            ],
            Kind::Gcs => vec![("STORAGE_EMULATOR_HOST", self.endpoint())],
            Kind::Azure => vec![(
                "AZURE_STORAGE_CONNECTION_STRING",
                format!(
                    "DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={AZ_KEY};\
                     BlobEndpoint={}/{AZ_ACCOUNT};",
                    self.endpoint()
                ),
            )],
        }
    }

    /// A client for the test's own uploads and deletions.
    fn client(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        let http = ClientOptions::new().with_allow_http(true);
        match self.kind {
            Kind::S3 => Arc::new(
                AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_endpoint(self.endpoint())
                    .with_access_key_id("testing")
                    .with_secret_access_key("testing")
                    .with_region("us-east-1")
                    .with_client_options(http)
                    .build()
                    .unwrap(),
            ),
            Kind::Gcs => Arc::new(
                GoogleCloudStorageBuilder::new()
                    .with_bucket_name(bucket)
                    .with_service_account_key(
                        json!({
                            "gcs_base_url": self.endpoint(),
                            "disable_oauth": true,
                            "client_email": "",
                            "private_key": "",
                            "private_key_id": "",
                        })
                        .to_string(),
                    )
                    .with_client_options(http)
                    .build()
                    .unwrap(),
            ),
            Kind::Azure => Arc::new(
                MicrosoftAzureBuilder::new()
                    .with_container_name(bucket)
                    .with_account(AZ_ACCOUNT)
                    .with_access_key(AZ_KEY)
                    .with_endpoint(format!("{}/{AZ_ACCOUNT}", self.endpoint()))
                    .with_client_options(http)
                    .build()
                    .unwrap(),
            ),
        }
    }

    /// Creates a bucket (container) with the emulator's own API.
    async fn create_bucket(&self, bucket: &str) {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let r = match self.kind {
            Kind::S3 => request(addr, "PUT", &format!("/{bucket}"), &[], b"").await,
            Kind::Gcs => {
                let body = json!({ "name": bucket }).to_string();
                request(
                    addr,
                    "POST",
                    "/storage/v1/b?project=test",
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                )
                .await
            }
            Kind::Azure => {
                let date = httpdate::fmt_http_date(std::time::SystemTime::now());
                let version = "2021-08-06";
                let to_sign = format!(
                    "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n\
                     /{AZ_ACCOUNT}/{AZ_ACCOUNT}/{bucket}\nrestype:container"
                );
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD;
                let key =
                    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(AZ_KEY).unwrap());
                let sig = b64.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
                let auth = format!("SharedKey {AZ_ACCOUNT}:{sig}");
                request(
                    addr,
                    "PUT",
                    &format!("/{AZ_ACCOUNT}/{bucket}?restype=container"),
                    &[
                        ("x-ms-date", &date),
                        ("x-ms-version", version),
                        ("Authorization", &auth),
                    ],
                    b"",
                )
                .await
            }
        }
        .unwrap();
        assert!(
            r.status < 300 || r.status == 409,
            "{:?} create bucket: {} {}",
            self.kind,
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sidecar binary, its address and everything it logged.
struct Sidecar {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    fn spawn(url: &str, env: &[(&str, String)], args: &[&str]) -> Sidecar {
        let cache = temp_dir("cache");
        let mut cmd = Command::new(BIN);
        cmd.args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--repository-poll-s", &POLL_S.to_string()])
            .arg("--repository-cache")
            .arg(&cache)
            .arg("--model-repository")
            .arg(url)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["message"] == "listening" {
                            let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("sidecar did not listen")
            .parse()
            .unwrap();
        Sidecar { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn metric(&self, name: &str) -> f64 {
        metric(&metrics(self.addr).await, name, &[])
    }

    async fn index(&self) -> Vec<Value> {
        let r = post_json(self.addr, "/v2/repository/index", &json!({}))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        r.json().as_array().unwrap().clone()
    }

    async fn version_status(&self, v: &str) -> u16 {
        get(self.addr, &format!("/v2/models/{MODEL}/versions/{v}/ready"))
            .await
            .unwrap()
            .status
    }
}

/// Polls `check` every 100 ms until it is true; panics with `what` after
/// `limit`. Returns how long it took.
async fn until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn model_bytes(version: &str) -> Bytes {
    Bytes::from(
        std::fs::read(
            examples()
                .join("wine-forest")
                .join(version)
                .join("model.onnx"),
        )
        .unwrap(),
    )
}

fn config_bytes() -> Bytes {
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(examples().join("wine-forest/config.json")).unwrap())
            .unwrap();
    config["version_policy"] = json!("all");
    Bytes::from(config.to_string())
}

/// What the test put in the bucket, to put back after an emulator that
/// keeps nothing (moto) restarts.
struct Bucket {
    kind: Kind,
    addr: SocketAddr,
    name: String,
    store: Arc<dyn ObjectStore>,
    objects: BTreeMap<String, Bytes>,
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Bucket {
    fn new(emu: &Emulator, name: &str) -> Bucket {
        Bucket {
            kind: emu.kind,
            addr: format!("127.0.0.1:{}", emu.port).parse().unwrap(),
            name: name.to_string(),
            store: emu.client(name),
            objects: BTreeMap::new(),
        }
    }

    async fn put(&mut self, rel: &str, bytes: Bytes) {
        let key = format!("{PREFIX}/{rel}");
        if self.kind == Kind::Gcs {
            // fake-gcs-server takes uploads on the JSON API only.
            let path = format!(
                "/upload/storage/v1/b/{}/o?uploadType=media&name={}",
                self.name,
                encode(&key)
            );
            let r = request(self.addr, "POST", &path, &[], &bytes)
                .await
                .unwrap();
            assert_eq!(
                r.status,
                200,
                "put {rel}: {}",
                String::from_utf8_lossy(&r.body)
            );
        } else {
            self.store
                .put(&StorePath::from(key), PutPayload::from_bytes(bytes.clone()))
                .await
                .unwrap_or_else(|e| panic!("put {rel}: {e}"));
        }
        self.objects.insert(rel.to_string(), bytes);
    }

    async fn delete(&mut self, rel: &str) {
        let key = format!("{PREFIX}/{rel}");
        if self.kind == Kind::Gcs {
            let path = format!("/storage/v1/b/{}/o/{}", self.name, encode(&key));
            let r = request(self.addr, "DELETE", &path, &[], b"").await.unwrap();
            assert!(r.status < 300, "delete {rel}: {}", r.status);
        } else {
            self.store.delete(&StorePath::from(key)).await.unwrap();
        }
        self.objects.remove(rel);
    }

    async fn put_all_again(&mut self) {
        for (rel, bytes) in self.objects.clone() {
            self.put(&rel, bytes).await;
        }
    }
}

/// The reference's labels exactly, its probabilities within tolerance.
fn same_answer(resp: &Value, case: &Value, tol: &Value, what: &str) {
    let out = |name: &str| -> Vec<Value> {
        resp["outputs"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no outputs in {resp}"))
            .iter()
            .find(|o| o["name"] == name)
            .unwrap_or_else(|| panic!("{what}: no {name} in {resp}"))["data"]
            .as_array()
            .unwrap()
            .clone()
    };
    let want = |name: &str| case["outputs"][name]["data"].as_array().unwrap().clone();
    assert_eq!(out("label"), want("label"), "{what}: labels");
    let atol = tol["atol"].as_f64().unwrap();
    let (got, exp) = (out("probabilities"), want("probabilities"));
    assert_eq!(got.len(), exp.len(), "{what}: probabilities");
    for (g, e) in got.iter().zip(&exp) {
        let (g, e) = (g.as_f64().unwrap(), e.as_f64().unwrap());
        assert!((g - e).abs() <= atol * 10.0, "{what}: {g} vs {e}");
    }
}

async fn infer(addr: SocketAddr, version: Option<&str>, case: &Value) -> Resp {
    let path = match version {
        Some(v) => format!("/v2/models/{MODEL}/versions/{v}/infer"),
        None => format!("/v2/models/{MODEL}/infer"),
    };
    post_json(addr, &path, &case_request(case)).await.unwrap()
}

/// The whole life of a bucket-backed model, for one cloud.
async fn rollout(kind: Kind) {
    let mut emu = Emulator::start(kind);
    emu.create_bucket(BUCKET).await;
    let mut bucket = Bucket::new(&emu, BUCKET);
    bucket
        .put(&format!("{MODEL}/config.json"), config_bytes())
        .await;
    bucket
        .put(&format!("{MODEL}/1/model.onnx"), model_bytes("1"))
        .await;
    bucket
        .put(&format!("{MODEL}/2/model.onnx"), model_bytes("2"))
        .await;
    // Ignored: not the repository layout.
    bucket.put("README.md", Bytes::from_static(b"models")).await;

    let url = emu.url(BUCKET, PREFIX);
    let max_object = 100_000;
    let sc = Sidecar::spawn(
        &url,
        &emu.sidecar_env(),
        &["--repository-max-object-bytes", &max_object.to_string()],
    );
    wait_ready(sc.addr).await.unwrap();
    let reference = reference("wine-forest", "2");
    let case = reference["cases"][0].clone();
    let tol = reference["tolerance"].clone();
    for v in ["1", "2"] {
        let r = infer(sc.addr, Some(v), &case).await;
        assert_eq!(r.status, 200, "{kind:?} v{v}: {}", r.error());
        same_answer(&r.json(), &case, &tol, &format!("{kind:?} v{v}"));
    }
    assert!(sc.metric(LAST_SUCCESS).await > 0.0);
    assert!(
        sc.metric("infermesh_sidecar_repository_sync_bytes_total")
            .await
            >= 18_000.0
    );

    // Load on the unversioned model while versions come and go.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    // Two flows on the unversioned model, one on version 1 (which will be
    // deleted: its requests answer 200 until it is gone, then 404).
    let load: Vec<_> = [None, None, Some("1")]
        .into_iter()
        .map(|version| {
            let (stop, ok, failed, case, addr) = (
                stop.clone(),
                ok.clone(),
                failed.clone(),
                case.clone(),
                sc.addr,
            );
            tokio::spawn(async move {
                let mut gone = false;
                while !stop.load(Ordering::SeqCst) {
                    let r = infer(addr, version, &case).await;
                    if r.status == 200 && !gone {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else if r.status == 404 && version.is_some() {
                        gone = true;
                    } else {
                        failed
                            .lock()
                            .unwrap()
                            .push(format!("{} {}", r.status, r.error()));
                    }
                }
            })
        })
        .collect();

    // A new version is served within a poll interval (plus its load).
    bucket
        .put(&format!("{MODEL}/3/model.onnx"), model_bytes("2"))
        .await;
    let took = until(Duration::from_secs(30), "version 3 ready", || async {
        sc.version_status("3").await == 200
    })
    .await;
    eprintln!("{kind:?}: version 3 served {took:?} after its upload (poll {POLL_S} s)");
    assert!(
        took <= Duration::from_secs(POLL_S + 4),
        "{kind:?}: version 3 took {took:?}"
    );
    let r = infer(sc.addr, None, &case).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["model_version"], "3");
    same_answer(&r.json(), &case, &tol, "v3");

    // A deleted version goes away: 404 once its requests are done.
    bucket.delete(&format!("{MODEL}/1/model.onnx")).await;
    until(Duration::from_secs(30), "version 1 gone", || async {
        sc.version_status("1").await == 404
    })
    .await;
    assert_eq!(infer(sc.addr, Some("1"), &case).await.status, 404);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{kind:?}: failed during the swap: {failed:?}"
    );
    assert!(ok.load(Ordering::SeqCst) > 10, "{kind:?}: too little load");

    // A truncated model stays unavailable, with the reason; others serve.
    let full = model_bytes("2");
    bucket
        .put(
            &format!("{MODEL}/4/model.onnx"),
            full.slice(..full.len() / 2),
        )
        .await;
    // An object over --repository-max-object-bytes is not downloaded.
    bucket
        .put(
            &format!("{MODEL}/5/model.onnx"),
            Bytes::from(vec![0u8; max_object + 1]),
        )
        .await;
    until(
        Duration::from_secs(30),
        "versions 4 and 5 in the index",
        || async {
            let index = sc.index().await;
            ["4", "5"]
                .iter()
                .all(|v| index.iter().any(|e| e["version"] == *v))
        },
    )
    .await;
    let index = sc.index().await;
    let entry = |v: &str| index.iter().find(|e| e["version"] == v).unwrap().clone();
    for v in ["4", "5"] {
        assert_eq!(entry(v)["state"], "UNAVAILABLE", "{kind:?} v{v}: {index:?}");
        assert_eq!(sc.version_status(v).await, 503);
    }
    assert!(!entry("4")["reason"].as_str().unwrap().is_empty());
    let reason5 = entry("5")["reason"].as_str().unwrap().to_string();
    assert!(reason5.contains("over the limit"), "{reason5}");
    assert!(
        reason5.contains(&format!("{url}/{MODEL}/5/model.onnx")),
        "{reason5}"
    );
    for v in ["2", "3"] {
        assert_eq!(entry(v)["state"], "READY", "{kind:?}: {index:?}");
        assert_eq!(infer(sc.addr, Some(v), &case).await.status, 200);
    }
    assert_eq!(
        infer(sc.addr, None, &case).await.json()["model_version"],
        "3"
    );

    // The store goes away: serving goes on, failures are counted.
    let failures = sc.metric(SYNC_FAILURES).await;
    emu.stop();
    until(
        Duration::from_secs(60),
        "a counted sync failure",
        || async { sc.metric(SYNC_FAILURES).await > failures },
    )
    .await;
    assert_eq!(infer(sc.addr, None, &case).await.status, 200);
    assert_eq!(get(sc.addr, "/v2/health/ready").await.unwrap().status, 200);

    // It comes back: syncing resumes and picks up a new version.
    let last = sc.metric(LAST_SUCCESS).await;
    emu.launch();
    // moto keeps nothing across a restart, nor Azurite across a kill.
    emu.create_bucket(BUCKET).await;
    bucket.put_all_again().await;
    bucket
        .put(&format!("{MODEL}/6/model.onnx"), model_bytes("1"))
        .await;
    until(
        Duration::from_secs(60),
        "a sync after the restart",
        || async { sc.metric(LAST_SUCCESS).await > last },
    )
    .await;
    until(Duration::from_secs(30), "version 6 ready", || async {
        sc.version_status("6").await == 200
    })
    .await;
    assert_eq!(infer(sc.addr, Some("6"), &case).await.status, 200);
    assert_eq!(sc.version_status("3").await, 200);

    let log = sc.log();
    assert!(log.contains("model repository sync failed"), "{log}");
    assert!(!log.contains(SECRET), "a secret reached the log");
    assert!(!log.contains(AZ_KEY), "a secret reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_rollout_on_moto() {
    rollout(Kind::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_rollout_on_fake_gcs_server() {
    rollout(Kind::Gcs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_rollout_on_azurite() {
    rollout(Kind::Azure).await;
}

/// Readiness stays false and says why; the log says it too; nothing is
/// served.
async fn refused(sc: &Sidecar, wants: &[&str]) {
    let start = Instant::now();
    loop {
        let r = get(sc.addr, "/v2/health/ready").await.unwrap();
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(r.status, 503, "became ready: {body}");
        if wants.iter().all(|w| body.contains(w)) {
            eprintln!("readiness: {body}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "readiness never said {wants:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sc.index().await.is_empty());
    assert_eq!(
        get(sc.addr, &format!("/v2/models/{MODEL}/ready"))
            .await
            .unwrap()
            .status,
        404
    );
    assert!(sc.metric(SYNC_FAILURES).await >= 1.0);
    let log = sc.log();
    assert!(
        wants.iter().all(|w| log.contains(w)),
        "{wants:?} not in {log}"
    );
    assert!(!log.contains(SECRET), "a secret reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_name_the_url_and_serve_nothing() {
    let emu = Emulator::start(Kind::S3);
    emu.create_bucket(BUCKET).await;
    let mut bucket = Bucket::new(&emu, BUCKET);
    bucket
        .put(&format!("{MODEL}/config.json"), config_bytes())
        .await;
    bucket
        .put(&format!("{MODEL}/1/model.onnx"), model_bytes("1"))
        .await;
    let env = emu.sidecar_env();

    let missing = emu.url("no-such-bucket", PREFIX);
    let sc = Sidecar::spawn(&missing, &env, &[]);
    refused(&sc, &[&missing, "not found"]).await;

    let empty = emu.url(BUCKET, "nothing-here");
    let sc = Sidecar::spawn(&empty, &env, &[]);
    refused(&sc, &[&empty, "no model directories"]).await;

    let url = emu.url(BUCKET, PREFIX);
    let sc = Sidecar::spawn(&url, &env, &["--repository-max-bytes", "1000"]);
    refused(&sc, &[&url, "over the limit of 1000"]).await;

    // Nothing listens: retried with backoff, one log line per attempt.
    let mut down = env.clone();
    down.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    down.push((
        "AWS_ENDPOINT_URL",
        format!("http://127.0.0.1:{}", free_port()),
    ));
    let sc = Sidecar::spawn(&url, &down, &[]);
    refused(&sc, &[&url]).await;
    until(Duration::from_secs(30), "a second attempt", || async {
        sc.log().contains("\"attempt\":2")
    })
    .await;

    // Wrong credentials: Azurite checks the account key's signatures.
    let az = Emulator::start(Kind::Azure);
    az.create_bucket(BUCKET).await;
    let wrong = format!(
        "DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={SECRET};\
         BlobEndpoint={}/{AZ_ACCOUNT};",
        az.endpoint()
    );
    let az_url = az.url(BUCKET, PREFIX);
    let sc = Sidecar::spawn(&az_url, &[("AZURE_STORAGE_CONNECTION_STRING", wrong)], &[]);
    refused(&sc, &[&az_url, "403"]).await;
}

#[test]
fn bad_urls_and_foreign_caches_exit_64() {
    let foreign = temp_dir("foreign-cache");
    std::fs::write(foreign.join("notes.txt"), b"keep me").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--model-repository", "ftp://host/models"], "s3://"),
        (
            &["--model-repository", "s3://user:pw@bucket/models"],
            "credentials",
        ),
        (
            &[
                "--model-repository",
                "s3://bucket/models",
                "--repository-cache",
                foreign.to_str().unwrap(),
            ],
            "not a model cache",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0"])
            .args(*args)
            .env("AWS_REGION", "us-east-1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("pw@"), "{err}");
    }
    assert!(foreign.join("notes.txt").is_file());
}

#[test]
fn default_cache_is_removed_on_shutdown() {
    // Nothing listens at the endpoint: the sidecar keeps retrying, not ready.
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--model-repository",
            "s3://bucket/models",
        ])
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cache = std::env::temp_dir().join(format!("infermesh-sidecar-cache-{}", child.id()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cache.join(".infermesh-cache").is_file() {
        assert!(Instant::now() < deadline, "no cache at {}", cache.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the server reach its signal handlers.
    std::thread::sleep(Duration::from_millis(300));
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(child.wait().unwrap().success());
    assert!(!cache.exists(), "{} left behind", cache.display());
}
