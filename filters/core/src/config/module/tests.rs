use super::*;

const CANARY: &str =
    r#"{"splits":[{"model":"m","versions":[{"name":"1","weight":90},{"name":"2","weight":10}]}]}"#;
const ROUTER: &str = r#"{"models":[{"name":"m","versions":["1","2"],"aliases":{"stable":"1"}}]}"#;
const FAILOVER: &str = r#"{"clouds":[
    {"name":"aws","cluster":"c-aws","authority":"aws.example","tags":["eu"]},
    {"name":"gcp","cluster":"c-gcp","authority":"gcp.example","tags":["eu"]}],
  "residency":{"header":"x-data-residency","rules":{"eu":["eu"]},"default":["eu"]}}"#;

fn module(sections: &[(&str, &str)]) -> String {
    let body: Vec<String> = sections
        .iter()
        .map(|(name, cfg)| format!("{name:?}: {cfg}"))
        .collect();
    format!("{{{}}}", body.join(","))
}

#[test]
fn each_section_is_parsed_by_its_stage_parser() {
    let cfg = parse(module(&[("canary", CANARY)]).as_bytes()).unwrap();
    assert_eq!(
        cfg.canary,
        Some(super::super::canary::parse(CANARY.as_bytes()).unwrap())
    );
    assert!(cfg.router.is_none() && cfg.failover.is_none());
    assert_eq!(cfg.stages(), vec!["canary"]);

    let all = parse(
        module(&[
            ("failover", FAILOVER),
            ("router", ROUTER),
            ("canary", CANARY),
        ])
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(
        all.stages(),
        vec!["router", "canary", "failover"],
        "stage order is fixed"
    );
    assert_eq!(
        all.router,
        Some(super::super::router::parse(ROUTER.as_bytes()).unwrap())
    );
    assert_eq!(
        all.failover,
        Some(super::super::failover::parse(FAILOVER.as_bytes()).unwrap())
    );
}

#[test]
fn an_empty_config_is_an_error_not_a_no_op() {
    for empty in ["", "  ", "{}"] {
        let err = parse(empty.as_bytes()).unwrap_err();
        assert_eq!(err.path, ".", "{empty:?}");
        assert!(err.message.contains("no stage is configured"), "{err}");
    }
}

#[test]
fn errors_name_the_field_with_its_section() {
    let bad_cloud = FAILOVER.replace(r#""cluster":"c-gcp","#, r#""cluster":"","#);
    let err =
        parse(module(&[("canary", CANARY), ("failover", &bad_cloud)]).as_bytes()).unwrap_err();
    assert_eq!(err.path, "failover.clouds[1].cluster", "{err}");

    let bad_weight = CANARY.replace("90", "80");
    let err = parse(module(&[("canary", &bad_weight)]).as_bytes()).unwrap_err();
    assert!(err.path.starts_with("canary.splits[0]"), "{err}");

    let err = parse(module(&[("router", r#"{"models":[]}"#)]).as_bytes()).unwrap_err();
    assert_eq!(err.path, "router.models", "{err}");

    // A section's own unknown field, and a type error of the whole section.
    let err = parse(module(&[("router", r#"{"models":[],"modles":1}"#)]).as_bytes()).unwrap_err();
    assert!(err.path.starts_with("router"), "{err}");
    let err = parse(module(&[("canary", "[1]")]).as_bytes()).unwrap_err();
    assert_eq!(err.path, "canary", "{err}");
    let err = parse(module(&[("canary", "null")]).as_bytes()).unwrap_err();
    assert_eq!(err.path, "canary", "{err}");
    assert!(err.message.contains("leave the section out"), "{err}");
}

#[test]
fn unknown_sections_and_non_objects_are_refused() {
    let err = parse(module(&[("canary", CANARY), ("canery", "{}")]).as_bytes()).unwrap_err();
    assert!(err.message.contains("canery"), "{err}");
    assert!(parse(b"[]").is_err());
    assert!(parse(b"{\"canary\":").is_err());
    // Today's single-stage configs are not module configs: the error says
    // which field is unexpected.
    let err = parse(CANARY.as_bytes()).unwrap_err();
    assert!(err.message.contains("splits"), "{err}");
}

#[test]
fn strip_unless_every_stage_trusts_downstream_headers() {
    let trusting = CANARY.replacen('{', r#"{"trust_downstream_headers":true,"#, 1);
    let only_trusting = parse(module(&[("canary", &trusting)]).as_bytes()).unwrap();
    assert!(!only_trusting.strips_downstream_headers());
    let only_default = parse(module(&[("canary", CANARY)]).as_bytes()).unwrap();
    assert!(only_default.strips_downstream_headers());
    // The router strips by default; a trusting canary behind it changes nothing.
    let chain = parse(module(&[("router", ROUTER), ("canary", &trusting)]).as_bytes()).unwrap();
    assert!(chain.strips_downstream_headers());
}

#[test]
fn served_by_when_any_stage_asks() {
    let quiet_canary = CANARY.replacen('{', r#"{"served_by_header":false,"#, 1);
    let quiet = parse(module(&[("canary", &quiet_canary)]).as_bytes()).unwrap();
    assert!(!quiet.served_by_header());
    let loud = parse(module(&[("canary", &quiet_canary), ("router", ROUTER)]).as_bytes()).unwrap();
    assert!(loud.served_by_header());
}

#[test]
fn hosts_scope_the_module_by_authority() {
    let cfg = parse(
        module(&[
            (
                "hosts",
                r#"["digits-mlp.models.svc.cluster.local", "Digits-MLP", "*.models.example.com"]"#,
            ),
            ("canary", CANARY),
        ])
        .as_bytes(),
    )
    .unwrap();
    for yes in [
        &b"digits-mlp.models.svc.cluster.local"[..],
        b"digits-mlp.models.svc.cluster.local:8000",
        b"DIGITS-MLP:8000",
        b"digits-mlp",
        b"a.models.example.com",
        b"a.b.models.example.com:443",
    ] {
        assert!(cfg.concerns(yes), "{}", String::from_utf8_lossy(yes));
    }
    for no in [
        &b"other.models.svc.cluster.local"[..],
        b"digits-mlp.models",
        b"models.example.com",
        b"xmodels.example.com",
        b"",
        b":8000",
        b"[::1]:8000",
        b"\xff\xfe",
    ] {
        assert!(!cfg.concerns(no), "{}", String::from_utf8_lossy(no));
    }
    let all = parse(module(&[("canary", CANARY)]).as_bytes()).unwrap();
    assert!(all.concerns(b"anything:1") && all.concerns(b""));
}

#[test]
fn bad_hosts_are_named() {
    for (hosts, path) in [
        (r#"[]"#, "hosts"),
        (r#""digits""#, "hosts"),
        (r#"["ok", "http://x"]"#, "hosts[1]"),
        (r#"["x:8000"]"#, "hosts[0]"),
        (r#"["*."]"#, "hosts[0]"),
        (r#"["a..b"]"#, "hosts[0]"),
    ] {
        let err = parse(module(&[("hosts", hosts), ("canary", CANARY)]).as_bytes()).unwrap_err();
        assert_eq!(err.path, path, "{hosts}: {err}");
    }
    let err = parse(module(&[("hosts", r#"["a"]"#)]).as_bytes()).unwrap_err();
    assert!(err.message.contains("no stage is configured"), "{err}");
}
