use super::*;
use proptest::prelude::*;

fn p(s: &str) -> Pointer {
    Pointer::parse(s).unwrap()
}

fn s(v: &str) -> Result<Found, ScanError> {
    Ok(Found::String(v.into()))
}

#[test]
fn pointers() {
    assert_eq!(p("/a/b").tokens(), ["a", "b"]);
    assert_eq!(p("/a~1b/c~0d").tokens(), ["a/b", "c~d"]);
    assert_eq!(p("/").tokens(), [""]);
    assert!(Pointer::parse("").is_none());
    assert!(Pointer::parse("a").is_none());
    assert!(Pointer::parse("/a~2").is_none());
    assert!(Pointer::parse("/a~").is_none());
}

#[test]
fn finds_fields() {
    let doc = br#"{"id":"r1","model":"digits-mlp","parameters":{"model_version":"2","n":3,"f":1.5,"b":true},
                  "inputs":[{"name":"input","data":[1,2,3]},{"name":"x\"y","v":"second"}],
                  "esc":"a\u00e9\ud83d\ude00\n"}"#;
    let cases: &[(&str, Result<Found, ScanError>)] = &[
        ("/model", s("digits-mlp")),
        ("/parameters/model_version", s("2")),
        ("/parameters/n", Ok(Found::Integer("3".into()))),
        ("/parameters/f", Ok(Found::OtherType)),
        ("/parameters/b", Ok(Found::OtherType)),
        ("/parameters", Ok(Found::OtherType)),
        ("/inputs", Ok(Found::OtherType)),
        ("/inputs/0/name", s("input")),
        ("/inputs/1/v", s("second")),
        ("/inputs/1/name", s("x\"y")),
        ("/inputs/2/name", Err(ScanError::Missing)),
        ("/inputs/01/name", Err(ScanError::Missing)),
        ("/inputs/x", Err(ScanError::Missing)),
        ("/esc", s("aé😀\n")),
        ("/nope", Err(ScanError::Missing)),
        ("/model/x", Err(ScanError::Missing)),
        ("/id/0", Err(ScanError::Missing)),
    ];
    for (ptr, want) in cases {
        assert_eq!(&find(doc, &p(ptr)), want, "{ptr}");
    }
}

#[test]
fn escaped_keys_match_and_first_duplicate_wins() {
    assert_eq!(find(br#"{"mo\u0064el":"m"}"#, &p("/model")), s("m"));
    assert_eq!(find(br#"{"model":"a","model":"b"}"#, &p("/model")), s("a"));
    assert_eq!(
        find(br#"{"modelx":"a","mode":"b"}"#, &p("/model")),
        Err(ScanError::Missing)
    );
}

#[test]
fn rejects_invalid_json_anywhere() {
    let ptr = p("/model");
    let bad: &[&[u8]] = &[
        b"",
        b"not json",
        br#"{"model":"m""#,
        br#"{"model":"m",}"#,
        br#"{"model":"m"} x"#,
        br#"{"model":"m","x":[1,2,}"#,
        br#"{"model":"m","x":01}"#,
        br#"{"model":"m","x":1.}"#,
        br#"{"model":"m","x":"\q"}"#,
        br#"{"model":"m","x":"a
b"}"#,
        br#"{"model":"\ud800"}"#,
        b"{\"model\":\"\xff\"}",
        br#"{"model":tru}"#,
        br#"{model:"m"}"#,
        br#"{"model" "m"}"#,
    ];
    for doc in bad {
        assert_eq!(
            find(doc, &ptr),
            Err(ScanError::Invalid),
            "{}",
            String::from_utf8_lossy(doc)
        );
    }
}

#[test]
fn depth_is_capped() {
    let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
    assert_eq!(find(deep.as_bytes(), &p("/0")), Err(ScanError::Invalid));
    let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
    assert_eq!(find(ok.as_bytes(), &p("/0")), Ok(Found::OtherType));
    let huge = "[".repeat(1_000_000);
    assert_eq!(find(huge.as_bytes(), &p("/0")), Err(ScanError::Invalid));
}

proptest! {
    #[test]
    fn never_panics(doc in proptest::collection::vec(any::<u8>(), 0..300), ptr in "(/[a-z0-9~]{0,3}){1,3}") {
        if let Some(ptr) = Pointer::parse(&ptr) {
            let _ = find(&doc, &ptr);
        }
    }

    #[test]
    fn agrees_with_serde_json(v in json_value(), key in "[a-c]{1,2}") {
        let text = serde_json::to_vec(&v).unwrap();
        let ptr = Pointer::parse(&format!("/{key}")).unwrap();
        let want = match v.pointer(&format!("/{key}")) {
            None => Err(ScanError::Missing),
            Some(serde_json::Value::String(s)) => Ok(Found::String(s.clone())),
            Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Found::Integer(n.to_string())),
            Some(_) => Ok(Found::OtherType),
        };
        prop_assert_eq!(find(&text, &ptr), want);
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        (-1e6f64..1e6)
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-c]{1,2}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
