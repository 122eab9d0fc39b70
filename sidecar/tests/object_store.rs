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
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(child.wait().unwrap().success());
    assert!(!cache.exists(), "{} left behind", cache.display());
}
