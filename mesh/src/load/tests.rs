use super::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

/// A record due at `start_ms` that took `latency_ms`, answered `status`
/// by `cloud` (`None`: a transport error).
fn rec(seq: u64, start_ms: f64, latency_ms: f64, status: Option<u16>, cloud: &str) -> Record {
    Record {
        seq,
        start_ms,
        late_ms: 0.0,
        latency_ms,
        status,
        error: status.is_none().then(|| "reset".to_owned()),
        served_by: status.map(|_| format!("digits-mlp@2@{cloud}")),
        cloud: status.map(|_| cloud.to_owned()),
        error_body: None,
    }
}

/// 10 req/s for `secs` seconds, every request served by `cloud_at(ms)`.
fn timeline(secs: u64, cloud_at: impl Fn(f64) -> Option<&'static str>) -> Vec<Record> {
    (0..secs * 10)
        .map(|i| {
            let t = i as f64 * 100.0;
            match cloud_at(t) {
                Some(c) => rec(i, t, 2.0, Some(200), c),
                None => rec(i, t, 2.0, None, ""),
            }
        })
        .collect()
}

#[test]
fn cloud_names_from_headers() {
    assert_eq!(CloudOf::AfterLastAt.cloud("digits-mlp@2@gcp"), "gcp");
    assert_eq!(CloudOf::AfterLastAt.cloud("aws"), "aws");
    let hosts = CloudOf::ByHost(vec![
        ("127.0.0.2".into(), "aws".into()),
        ("127.0.0.3".into(), "gcp".into()),
    ]);
    assert_eq!(hosts.cloud("127.0.0.3:41234"), "gcp");
    assert_eq!(hosts.cloud("127.0.0.9:1"), "127.0.0.9:1");
}

#[test]
fn summary_counts_errors_and_thresholds() {
    let recs = vec![
        rec(0, 0.0, 5.0, Some(200), "aws"),
        rec(1, 10.0, 100.0, Some(200), "aws"), // exactly 100: not over
        rec(2, 20.0, 100.5, Some(200), "gcp"),
        rec(3, 30.0, 260.0, Some(503), "gcp"),
        rec(4, 40.0, 1_050.0, None, ""),
    ];
    let s = summarize(&recs);
    assert_eq!(s.requests, 5);
    assert_eq!(s.errors, 2, "a 503 and a transport error");
    assert_eq!(s.over_100ms, 3);
    assert_eq!(s.over_250ms, 2);
    assert_eq!(s.max_ms, 1_050.0);
    assert_eq!(s.p50_ms, 100.5);
    assert_eq!(s.p99_ms, 1_050.0);
    assert_eq!(summarize(&[]).requests, 0);
    assert_eq!(summarize(&[]).max_ms, 0.0);
}

#[test]
fn percentiles_are_nearest_rank() {
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(percentile(&v, 50.0), 50.0);
    assert_eq!(percentile(&v, 99.0), 99.0);
    assert_eq!(percentile(&v, 100.0), 100.0);
    assert_eq!(percentile(&v, 0.0), 1.0);
    assert_eq!(percentile(&[], 50.0), 0.0);
}

#[test]
fn switch_time_ends_at_the_last_request_on_the_failed_cloud() {
    // Fault at 10 s; aws still answers until 10.3 s, errors at 10.4 and
    // 10.5 s, then gcp, with one straggler on aws at 11.2 s.
    let recs = timeline(20, |t| match t {
        t if t < 10_400.0 => Some("aws"),
        t if t < 10_600.0 => None,
        t if (11_200.0..11_300.0).contains(&t) => Some("aws"),
        _ => Some("gcp"),
    });
    let other = |r: &Record| r.ok() && r.cloud.as_deref() != Some("aws");
    let got = settle_ms(&recs, 10_000.0, 20_000.0, other);
    assert_eq!(
        got,
        Some(1_300.0),
        "first request after the 11.2 s straggler"
    );
    // Without the straggler it settles right after the errors.
    let clean = timeline(20, |t| match t {
        t if t < 10_400.0 => Some("aws"),
        t if t < 10_600.0 => None,
        _ => Some("gcp"),
    });
    assert_eq!(settle_ms(&clean, 10_000.0, 20_000.0, other), Some(600.0));
}

#[test]
fn settle_edge_cases() {
    let all_gcp = timeline(5, |_| Some("gcp"));
    let on_gcp = |r: &Record| r.served_by_cloud("gcp");
    assert_eq!(settle_ms(&all_gcp, 1_000.0, 5_000.0, on_gcp), Some(0.0));
    assert_eq!(
        settle_ms(&all_gcp, 9_000.0, 10_000.0, on_gcp),
        None,
        "empty"
    );
    // Never settles: the last request in the window is bad.
    let flaky = timeline(5, |t| if t >= 4_900.0 { None } else { Some("gcp") });
    assert_eq!(settle_ms(&flaky, 0.0, 5_000.0, on_gcp), None);
    // The window end bounds it: bad requests after `to_ms` do not count.
    assert_eq!(settle_ms(&flaky, 0.0, 4_900.0, on_gcp), Some(0.0));
}

#[test]
fn return_time_and_flapping() {
    // Primary back at 30 s: traffic alternates twice, then stays on aws.
    let recs = timeline(40, |t| match t {
        t if t < 31_000.0 => Some("gcp"),
        t if t < 31_500.0 => Some("aws"),
        t if t < 32_000.0 => Some("gcp"),
        _ => Some("aws"),
    });
    let on_aws = |r: &Record| r.served_by_cloud("aws");
    assert_eq!(settle_ms(&recs, 30_000.0, 40_000.0, on_aws), Some(2_000.0));
    assert_eq!(switches(&recs, 30_000.0, 40_000.0), 3);
    assert_eq!(switches(&recs, 32_000.0, 40_000.0), 0);
    // Errors between two requests on the same cloud are not a switch.
    let blip = timeline(3, |t| if t == 1_000.0 { None } else { Some("aws") });
    assert_eq!(switches(&blip, 0.0, 3_000.0), 0);
}

#[test]
fn per_second_buckets_by_cloud() {
    let recs = timeline(3, |t| match t {
        t if t < 1_500.0 => Some("aws"),
        t if t < 1_700.0 => None,
        _ => Some("gcp"),
    });
    let buckets = per_second(&recs);
    assert_eq!(buckets.len(), 3);
    assert_eq!(buckets[&0]["aws"], 10);
    assert_eq!(buckets[&1]["aws"], 5);
    assert_eq!(buckets[&1]["error"], 2);
    assert_eq!(buckets[&1]["gcp"], 3);
    assert_eq!(buckets[&2]["gcp"], 10);
}

/// A server answering `/slow` after 1 s, `/503` with a 503 and 1,000
/// bytes, anything else at once with 200; always with
/// `x-infermesh-served-by: m@1@local`.
async fn slow_server() -> SocketAddr {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    let (status, body) = match req.uri().path() {
                        "/503" => (503, Bytes::from(vec![b'x'; 1_000])),
                        _ => (200, Bytes::from_static(b"{}")),
                    };
                    hyper::Response::builder()
                        .status(status)
                        .header("x-infermesh-served-by", "m@1@local")
                        .body(Full::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_requests_do_not_queue_behind_a_slow_one() {
    let addr = slow_server().await;
    let plan = Plan::new(addr, 200.0, Duration::from_millis(500));
    assert_eq!(plan.requests(), 100);
    // Every 10th request hangs for 1 s.
    let run = start(plan, |i| {
        Req::get(if i % 10 == 0 { "/slow" } else { "/fast" })
    })
    .unwrap();
    let recs = run.finish().await.unwrap();
    assert_eq!(recs.len(), 100);
    assert!(
        recs.iter().all(Record::ok),
        "{:?}",
        recs.iter().find(|r| !r.ok())
    );
    assert!(recs.iter().all(|r| r.cloud.as_deref() == Some("local")));
    let slow = recs.iter().filter(|r| r.latency_ms >= 1_000.0).count();
    assert_eq!(slow, 10, "exactly the /slow requests take ≥ 1 s");
    // Due times are 5 ms apart, and fast requests did not wait for slow ones.
    assert_eq!(recs[3].start_ms, 15.0);
    let fast_max = recs
        .iter()
        .filter(|r| r.seq % 10 != 0)
        .map(|r| r.latency_ms)
        .fold(0.0, f64::max);
    assert!(fast_max < 500.0, "a fast request took {fast_max} ms");
}

#[tokio::test]
async fn transport_errors_and_timeouts_are_recorded() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let recs = start(Plan::new(addr, 100.0, Duration::from_millis(50)), |_| {
        Req::get("/")
    })
    .unwrap()
    .finish()
    .await
    .unwrap();
    assert_eq!(recs.len(), 5);
    assert!(recs
        .iter()
        .all(|r| r.status.is_none() && r.error.as_deref().is_some_and(|e| e.contains("connect"))));

    let slow = slow_server().await;
    let mut plan = Plan::new(slow, 100.0, Duration::from_millis(20));
    plan.timeout = Duration::from_millis(200);
    let recs = start(plan, |_| Req::get("/slow"))
        .unwrap()
        .finish()
        .await
        .unwrap();
    assert_eq!(summarize(&recs).errors, 2);
    assert!(recs[0]
        .error
        .as_deref()
        .unwrap()
        .contains("no answer within"));

    assert!(
        start(Plan::new(slow, 0.0, Duration::from_secs(1)), |_| Req::get(
            "/"
        ))
        .is_err()
    );
}
