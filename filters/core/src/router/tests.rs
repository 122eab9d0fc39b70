use super::*;
use crate::config::router::parse;
use proptest::prelude::*;

fn cfg(extra: &str) -> RouterConfig {
    let json = format!(
        r#"{{"models":[{{"name":"mlp","versions":["1","2"],"aliases":{{"stable":"1","canary":"2"}}}},
                       {{"name":"cnn","versions":["a","b"]}}],
             "model_header":"x-model","version_header":"x-model-version",
             "body":{{"model_pointer":"/model","version_pointer":"/parameters/model_version"}}{extra}}}"#
    );
    parse(json.as_bytes()).unwrap()
}

fn req<'a>(path: &'a str, hm: Option<&'a str>, hv: Option<&'a str>, body: Body<'a>) -> Request<'a> {
    Request {
        path: path.as_bytes(),
        header_model: hm.map(str::as_bytes),
        header_version: hv.map(str::as_bytes),
        body,
    }
}

fn route(model: usize, version: Option<usize>, source: Source) -> Decision {
    Decision::Route {
        model,
        version,
        source,
        rewrite: None,
    }
}

fn decide(c: &RouterConfig, r: &Request<'_>) -> Decision {
    super::decide(c, r).0
}

#[test]
fn sources_and_precedence() {
    let c = cfg("");
    let b = |s: &'static str| Body::Complete(s.as_bytes());
    let cases: Vec<(Request<'_>, Decision)> = vec![
        (
            req("/v2/models/mlp/infer", None, None, Body::None),
            route(0, None, Source::Path),
        ),
        (
            req("/v2/models/mlp/versions/2/infer", None, None, Body::None),
            route(0, Some(1), Source::Path),
        ),
        (
            req(
                "/v2/models/mlp/versions/stable/infer",
                None,
                None,
                Body::None,
            ),
            route(0, Some(0), Source::Path),
        ),
        (
            req(
                "/v2/models/mlp/versions/canary/ready",
                None,
                None,
                Body::None,
            ),
            route(0, Some(1), Source::Path),
        ),
        (
            req("/v2/models/mlp/versions/latest", None, None, Body::None),
            route(0, Some(1), Source::Path),
        ),
        // Path beats header for the model, header fills the version.
        (
            req(
                "/v2/models/mlp/infer",
                Some("cnn"),
                Some("stable"),
                Body::None,
            ),
            route(0, Some(0), Source::Header),
        ),
        (
            req(
                "/v2/models/mlp/versions/2/infer",
                None,
                Some("1"),
                Body::None,
            ),
            route(0, Some(1), Source::Path),
        ),
        (
            req("/predict", Some("cnn"), None, Body::None),
            route(1, None, Source::Header),
        ),
        (
            req("/predict", Some("cnn"), Some("b"), Body::None),
            route(1, Some(1), Source::Header),
        ),
        (
            req(
                "/predict",
                None,
                None,
                b(r#"{"model":"cnn","parameters":{"model_version":"a"}}"#),
            ),
            route(1, Some(0), Source::Body),
        ),
        (
            req(
                "/predict",
                None,
                None,
                b(r#"{"model":"mlp","parameters":{"model_version":2}}"#),
            ),
            route(0, Some(1), Source::Body),
        ),
        (
            req(
                "/predict",
                Some("mlp"),
                None,
                b(r#"{"model":"cnn","parameters":{"model_version":"canary"}}"#),
            ),
            route(0, Some(1), Source::Body),
        ),
        // Header version beats the body's.
        (
            req(
                "/v2/models/mlp/infer",
                None,
                Some("1"),
                b(r#"{"parameters":{"model_version":"2"}}"#),
            ),
            route(0, Some(0), Source::Header),
        ),
    ];
    for (r, want) in cases {
        assert_eq!(decide(&c, &r), want, "{r:?}");
    }
}

#[test]
fn body_fallbacks_are_reported() {
    let c = cfg(r#","default_model":"cnn""#);
    let cases: &[(Body<'_>, BodyFallback)] = &[
        (Body::TooLarge, BodyFallback::TooLarge),
        (Body::Complete(b"{not json"), BodyFallback::InvalidJson),
        (
            Body::Complete(br#"{"other":1}"#),
            BodyFallback::MissingField,
        ),
        (
            Body::Complete(br#"{"model":["mlp"]}"#),
            BodyFallback::WrongType,
        ),
        (Body::Complete(br#"{"model":1.5}"#), BodyFallback::WrongType),
    ];
    for (body, reason) in cases {
        let got = super::decide(&c, &req("/predict", None, None, body.clone()));
        assert_eq!(
            got,
            (route(1, None, Source::Default), Some(*reason)),
            "{body:?}"
        );
    }
    // Over the cap with the path naming the model: path routing still works.
    let got = super::decide(&c, &req("/v2/models/mlp/infer", None, None, Body::TooLarge));
    assert_eq!(
        got,
        (route(0, None, Source::Path), Some(BodyFallback::TooLarge))
    );
    // No default model: the fallback is still reported with the pass.
    let no_default = cfg("");
    let got = super::decide(
        &no_default,
        &req("/predict", None, None, Body::Complete(b"{x")),
    );
    assert_eq!(
        got,
        (
            Decision::Pass { miss: Miss::NotOip },
            Some(BodyFallback::InvalidJson)
        )
    );
    // Not consulted, not reported.
    let got = super::decide(
        &no_default,
        &req(
            "/v2/models/mlp/versions/1/infer",
            None,
            None,
            Body::TooLarge,
        ),
    );
    assert_eq!(got.1, None);
}

#[test]
fn unknown_and_non_oip() {
    let reject = cfg("");
    let pass = cfg(r#","on_unknown":"pass","on_non_oip":"reject""#);
    let d = decide(
        &reject,
        &req("/v2/models/nope/infer", None, None, Body::None),
    );
    assert_eq!(
        d,
        Decision::Reject {
            miss: Miss::UnknownModel,
            message: r#"model "nope" is not served here"#.into()
        }
    );
    let d = decide(
        &reject,
        &req("/v2/models/mlp/versions/9/infer", None, None, Body::None),
    );
    assert_eq!(
        d,
        Decision::Reject {
            miss: Miss::UnknownVersion,
            message: r#"model "mlp" has no version "9""#.into()
        }
    );
    assert_eq!(
        decide(&reject, &req("/healthz", None, None, Body::None)),
        Decision::Pass { miss: Miss::NotOip }
    );
    assert_eq!(
        decide(&pass, &req("/v2/models/nope/infer", None, None, Body::None)),
        Decision::Pass {
            miss: Miss::UnknownModel
        }
    );
    assert_eq!(
        decide(
            &pass,
            &req("/v2/models/mlp/versions/x/infer", None, None, Body::None)
        ),
        Decision::Pass {
            miss: Miss::UnknownVersion
        }
    );
    assert!(matches!(
        decide(&pass, &req("/healthz", None, None, Body::None)),
        Decision::Reject {
            miss: Miss::NotOip,
            ..
        }
    ));
    // Header names a model we don't serve.
    assert!(matches!(
        decide(&reject, &req("/predict", Some("zzz"), None, Body::None)),
        Decision::Reject {
            miss: Miss::UnknownModel,
            ..
        }
    ));
    assert_eq!(
        error_body("model \"x\" is not served here"),
        br#"{"error":"model \"x\" is not served here"}"#
    );
}

#[test]
fn rewrite_to_the_concrete_version() {
    let c = cfg(r#","rewrite_path":true"#);
    let cases: &[(&str, Option<&str>, Option<&str>)] = &[
        (
            "/v2/models/mlp/versions/stable/infer",
            None,
            Some("/v2/models/mlp/versions/1/infer"),
        ),
        (
            "/v2/models/mlp/versions/canary/infer?trace=1",
            None,
            Some("/v2/models/mlp/versions/2/infer?trace=1"),
        ),
        (
            "/v2/models/mlp/infer",
            Some("latest"),
            Some("/v2/models/mlp/versions/2/infer"),
        ),
        (
            "/v2/models/mlp/ready",
            Some("1"),
            Some("/v2/models/mlp/versions/1/ready"),
        ),
        (
            "/v2/models/mlp",
            Some("1"),
            Some("/v2/models/mlp/versions/1"),
        ),
        ("/v2/models/mlp/versions/1/infer", None, None),
        ("/v2/models/mlp/infer", None, None),
        ("/predict", Some("1"), None),
    ];
    for (path, hv, want) in cases {
        let hm = path.starts_with("/predict").then_some("mlp");
        match decide(&c, &req(path, hm, *hv, Body::None)) {
            Decision::Route { rewrite, .. } => assert_eq!(rewrite.as_deref(), *want, "{path}"),
            other => panic!("{path}: {other:?}"),
        }
    }
    // Off: never rewritten.
    match decide(
        &cfg(""),
        &req(
            "/v2/models/mlp/versions/stable/infer",
            None,
            None,
            Body::None,
        ),
    ) {
        Decision::Route { rewrite, .. } => assert_eq!(rewrite, None),
        other => panic!("{other:?}"),
    }
}

#[test]
fn body_is_only_wanted_when_it_can_help() {
    let c = cfg("");
    assert!(needs_body(&c, b"/predict", None, false));
    assert!(
        needs_body(&c, b"/v2/models/mlp/infer", None, false),
        "version may be in the body"
    );
    assert!(!needs_body(
        &c,
        b"/v2/models/mlp/versions/1/infer",
        None,
        false
    ));
    assert!(!needs_body(&c, b"/v2/models/mlp/infer", None, true));
    assert!(!needs_body(&c, b"/predict", Some(b"mlp"), true));
    assert!(needs_body(&c, b"/predict", Some(b"mlp"), false));
    let no_body = parse(br#"{"models":[{"name":"m","versions":["1"]}]}"#).unwrap();
    assert!(!needs_body(&no_body, b"/predict", None, false));
}

#[test]
fn an_unknown_model_is_decided_without_the_body() {
    let c = cfg("");
    // The path (or header) already names a model the router does not
    // serve: no body can change the 404, so none is waited for.
    assert!(!needs_body(
        &c,
        b"/v2/models/no-such-model-zz/infer",
        None,
        false
    ));
    assert!(!needs_body(
        &c,
        b"/predict",
        Some(b"no-such-model-zz"),
        false
    ));
    let req = Request {
        path: b"/v2/models/no-such-model-zz/infer",
        header_model: None,
        header_version: None,
        body: Body::None,
    };
    assert!(matches!(
        crate::router::decide(&c, &req).0,
        Decision::Reject {
            miss: Miss::UnknownModel,
            ..
        }
    ));
}

#[test]
fn a_body_not_delivered_falls_back_and_says_why() {
    let c = cfg("");
    let req = Request {
        path: b"/v2/models/mlp/infer",
        header_model: None,
        header_version: None,
        body: Body::NotDelivered,
    };
    let (decision, fallback) = crate::router::decide(&c, &req);
    assert_eq!(fallback, Some(BodyFallback::NotDelivered));
    assert!(
        matches!(decision, Decision::Route { version: None, .. }),
        "routed on the path alone: {decision:?}"
    );
}

proptest! {
    #[test]
    fn never_panics(
        path in proptest::collection::vec(any::<u8>(), 0..80),
        hm in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..12)),
        hv in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..12)),
        body in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let c = cfg(r#","rewrite_path":true"#);
        let mut p = b"/v2/models/".to_vec();
        p.extend(path);
        let r = Request { path: &p, header_model: hm.as_deref(), header_version: hv.as_deref(), body: Body::Complete(&body) };
        if let Decision::Route { model, version, .. } = decide(&c, &r) {
            prop_assert!(model < c.models.len());
            prop_assert!(version.is_none_or(|v| v < c.models[model].versions.len()));
        }
    }
}
