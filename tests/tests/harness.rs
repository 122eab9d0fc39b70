//! The harness itself, with no filter: Envoy starts, routes on headers, and
//! the helpers report what happened.

use e2e::{require_envoy, Bootstrap, Envoy, Req, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_on_headers_without_filters() {
    let _bin = require_envoy!("routes_on_headers_without_filters");
    let stable = Upstream::start("v1").await;
    let canary = Upstream::start("v2").await;
    let default = Upstream::start("default").await;
    let envoy = Envoy::start(
        &Bootstrap::new().version_subsets(&[("1", &stable), ("2", &canary)], &default),
    )
    .await;
    let client = envoy.client();

    let reqs: Vec<Req> = (0..300)
        .map(|i| match i % 3 {
            0 => Req::get("/a"),
            1 => Req::get("/b").header("x-infermesh-version", "1"),
            _ => Req::get("/c").header("x-infermesh-version", "2"),
        })
        .collect();
    let resps = client.send_all(reqs).await;
    for (i, r) in resps.iter().enumerate() {
        assert_eq!(r.status, 200, "#{i}: {}", r.text());
        let want = ["default", "v1", "v2"][i % 3];
        assert_eq!(r.text(), format!("upstream={want}\n"), "#{i}");
    }
    assert_eq!(
        (default.count(), stable.count(), canary.count()),
        (100, 100, 100)
    );
    assert!(canary.seen().iter().all(|s| s.path == "/c"));

    let stats = envoy.stats().await;
    assert_eq!(
        stats.get("cluster_upstream_rq_total", &[("envoy_cluster_name", "v2")]),
        Some(100.0),
        "{:?}",
        stats.names_like("cluster_upstream_rq_total")
    );
}

#[test]
fn rfc3339_round_trips_through_the_filter_parser() {
    for secs in [0, 951_782_400, 1_700_000_000, 1_798_761_599, 4_102_444_800] {
        let text = e2e::rfc3339_utc(secs);
        assert_eq!(
            filter_core::schedule::parse_rfc3339(&text),
            Some(secs * 1000),
            "{text}"
        );
    }
    assert_eq!(e2e::rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
}
