use super::*;

fn err(json: &str) -> ConfigError {
    match parse(json.as_bytes()) {
        Ok(c) => panic!("accepted {json}: {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn parses_a_full_config() {
    let c = parse(
        br#"{"models":[{"name":"digits-mlp","versions":["1","2"],"aliases":{"stable":"1","canary":"2"}},
                       {"name":"tiny-cnn","versions":["a"]}],
             "model_header":"x-model-name","version_header":"x-model-version",
             "body":{"model_pointer":"/model","version_pointer":"/parameters/model_version","max_bytes":4096},
             "rewrite_path":true,"on_unknown":"pass","on_non_oip":"reject","default_model":"tiny-cnn"}"#,
    )
    .unwrap();
    let m = &c.models[0];
    assert_eq!(m.resolve(b"1"), Some(0));
    assert_eq!(m.resolve(b"stable"), Some(0));
    assert_eq!(m.resolve(b"canary"), Some(1));
    assert_eq!(m.resolve(b"latest"), Some(1));
    assert_eq!(m.resolve(b"3"), None);
    assert_eq!(c.models[1].resolve(b"latest"), Some(0));
    assert_eq!(c.default_model, Some(1));
    assert_eq!(c.on_unknown, Unknown::Pass);
    assert_eq!(c.on_non_oip, Unknown::Reject);
    let body = c.body.unwrap();
    assert_eq!(body.max_bytes, 4096);
    assert_eq!(body.model.unwrap().tokens(), ["model"]);
}

#[test]
fn defaults() {
    let c =
        parse(br#"{"models":[{"name":"m","versions":["1"],"aliases":{"latest":"1"}}]}"#).unwrap();
    assert_eq!(c.on_unknown, Unknown::Reject);
    assert_eq!(c.on_non_oip, Unknown::Pass);
    assert!(
        c.body.is_none() && !c.rewrite_path && !c.trust_downstream_headers && c.served_by_header
    );
    assert_eq!(c.models[0].aliases, [("latest".to_owned(), 0)]);
    let b = parse(br#"{"models":[{"name":"m","versions":["1"]}],"body":{"model_pointer":"/m"}}"#)
        .unwrap();
    assert_eq!(b.body.unwrap().max_bytes, DEFAULT_BODY_BYTES);
}

#[test]
fn every_bad_field_is_named() {
    let cases: &[(&str, &str, &str)] = &[
        (r#"{}"#, ".", "missing field `models`"),
        (r#"{"models":[]}"#, "models", "at least one"),
        (
            r#"{"models":[{"name":"m","versions":[]}]}"#,
            "models[0].versions",
            "list 1 to",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1","1"]}]}"#,
            "models[0].versions[1]",
            "listed twice",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]},{"name":"m","versions":["1"]}]}"#,
            "models[1].name",
            "listed twice",
        ),
        (
            r#"{"models":[{"name":"m/x","versions":["1"]}]}"#,
            "models[0].name",
            "not a valid name",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"],"aliases":{"stable":"9"}}]}"#,
            "models[0].aliases.stable",
            "not one of",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1","2"],"aliases":{"2":"1"}}]}"#,
            "models[0].aliases.2",
            "shadow",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"],"tags":[]}]}"#,
            "models[0].tags",
            "unknown field",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]}],"model_header":"X-Model"}"#,
            "model_header",
            "lower-case",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]}],"version_header":"x-infermesh-version"}"#,
            "version_header",
            "removed from downstream",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]}],"body":{}}"#,
            "body",
            "model_pointer",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]}],"body":{"model_pointer":"model"}}"#,
            "body.model_pointer",
            "JSON pointer",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]}],"body":{"model_pointer":"/m","max_bytes":0}}"#,
            "body.max_bytes",
            "between 1",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]}],"body":{"model_pointer":"/m","max_bytes":99999999}}"#,
            "body.max_bytes",
            "between 1",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]}],"body":{"model_pointer":"/m","max_bytes":-1}}"#,
            "body.max_bytes",
            "invalid value",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]}],"on_unknown":"drop"}"#,
            "on_unknown",
            "unknown variant `drop`",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]}],"default_model":"x"}"#,
            "default_model",
            "not one of",
        ),
        (
            r#"{"models":[{"name":"m","versions":["1"]}],"rewrite_path":1}"#,
            "rewrite_path",
            "invalid type",
        ),
    ];
    for (json, path, needle) in cases {
        let e = err(json);
        assert_eq!(e.path, *path, "{json}\n=> {e}");
        assert!(
            e.to_string().contains(needle),
            "{json}\n=> {e} (wanted {needle:?})"
        );
    }
}
