//! `infermesh inject -f` as a user runs it: output, summary, exit codes,
//! and the same result as the injector's code path.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use infermesh::inject::{self, Mode, Options, Outcome, Scope};
use infermesh::manifest::to_json;
use serde_json::{json, Value};

const EXAMPLE: &str = "examples/k8s/digits-mlp.yaml";

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_infermesh"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn docs(yaml: &str) -> Vec<Value> {
    yaml_rust2::YamlLoader::load_from_str(yaml)
        .unwrap_or_else(|e| panic!("output is not YAML ({e}): {yaml}"))
        .iter()
        .map(to_json)
        .collect()
}

fn example() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/k8s/digits-mlp.yaml"
    );
    docs(&std::fs::read_to_string(path).unwrap())
}

#[test]
fn injects_the_example_like_the_webhook_and_only_once() {
    let out = run(&["inject", "-f", EXAMPLE], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "injected  Deployment/digits-mlp-v2\n");
    let got = docs(&text(&out.stdout));
    let input = example();
    assert_eq!(got.len(), 2);
    let Outcome::Injected(want) =
        inject::inject(&input[0], None, Scope::OptIn, &Options::default()).unwrap()
    else {
        panic!("example not injected");
    };
    assert_eq!(got[0], want);
    assert_eq!(got[1], input[1], "the Service is untouched");
    let sidecar = &got[0]["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], inject::CONTAINER);
    assert_eq!(sidecar["restartPolicy"], "Always");

    // Its own output again, from stdin: nothing changes.
    let again = run(&["inject", "-f", "-"], Some(&text(&out.stdout)));
    assert!(again.status.success());
    assert!(
        text(&again.stderr).contains("skipped   Deployment/digits-mlp-v2 (already injected"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(docs(&text(&again.stdout)), got);
}

#[test]
fn flags_pick_the_mode_and_the_output() {
    let out = run(
        &[
            "inject",
            "-f",
            EXAMPLE,
            "--kube-version",
            "1.28",
            "-o",
            "json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["kind"], "List");
    let opts = Options {
        mode: Mode::Container,
        ..Options::default()
    };
    let Outcome::Injected(want) = inject::inject(&example()[0], None, Scope::OptIn, &opts).unwrap()
    else {
        panic!("not injected");
    };
    assert_eq!(list["items"][0], want);
    let containers = &list["items"][0]["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers[1]["name"], inject::CONTAINER);

    let out = run(
        &[
            "inject",
            "-f",
            EXAMPLE,
            "--image",
            "reg.local/s:1",
            "--port",
            "9100",
        ],
        None,
    );
    let d = docs(&text(&out.stdout));
    let c = &d[0]["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(c["image"], "reg.local/s:1");
    assert_eq!(c["ports"][0]["containerPort"], 9100);
}

#[test]
fn namespace_scope_and_opt_out() {
    let pod = |labels: Value| {
        serde_json::to_string(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": labels},
            "spec": {"containers": [{"name": "a", "image": "x"}], "volumes": [{"name": "models", "emptyDir": {}}]},
        }))
        .unwrap()
    };
    let plain = pod(json!({}));
    let out = run(&["inject", "-f", "-"], Some(&plain));
    assert!(text(&out.stderr).contains("skipped   Pod/p (no infermesh.io/inject"));
    let out = run(&["inject", "-f", "-", "--namespace-enabled"], Some(&plain));
    assert_eq!(text(&out.stderr), "injected  Pod/p\n");
    let opted_out = pod(json!({"infermesh.io/inject": "false"}));
    let out = run(
        &["inject", "-f", "-", "--namespace-enabled"],
        Some(&opted_out),
    );
    assert!(text(&out.stderr).contains("skipped   Pod/p (infermesh.io/inject is false)"));
    assert_eq!(docs(&text(&out.stdout))[0], docs(&opted_out)[0]);
}

#[test]
fn errors_name_the_object_and_exit_nonzero() {
    let clash = serde_json::to_string(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "busy", "labels": {"infermesh.io/inject": "true"}},
        "spec": {"containers": [{"name": "a", "image": "x", "ports": [{"containerPort": 8000}]}],
                 "volumes": [{"name": "models", "emptyDir": {}}]},
    }))
    .unwrap();
    let out = run(&["inject", "-f", "-"], Some(&clash));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing half-written");
    assert!(
        text(&out.stderr).contains("Pod/busy: port 8000 is already taken by container \"a\""),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["inject", "-f", "-"], Some("a: [unclosed"));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("invalid YAML"));

    for args in [
        &["inject"][..],
        &["inject", "-f", "/nonexistent.yaml"],
        &["inject", "-f", EXAMPLE, "--bogus"],
        &["inject", "-f", EXAMPLE, "--kube-version", "new"],
        &["inject", "-f", EXAMPLE, "--memory", "lots"],
        &["inject", "-f", EXAMPLE, "-o", "xml"],
        &["inject", "serve", "--tls-key", "k.pem"],
        &[
            "inject",
            "serve",
            "--tls-cert",
            "/nonexistent",
            "--tls-key",
            "/nonexistent",
        ],
        &["inject", "serve", "-f", EXAMPLE],
    ] {
        let out = run(args, None);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stderr).starts_with("infermesh: "), "{args:?}");
    }
}
