use serde_json::{json, Value};

use super::review::{self, API_VERSION, KIND};
use super::*;

fn pod(labels: Value, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "digits", "namespace": "models", "labels": labels, "annotations": annotations},
        "spec": {
            "containers": [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}]}],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "digits-models"}}],
        },
    })
}

fn opted_in() -> Value {
    pod(json!({"app": "digits", INJECT: "true"}), json!({}))
}

fn injected(obj: &Value, scope: Scope, opts: &Options) -> Value {
    match inject(obj, None, scope, opts) {
        Ok(Outcome::Injected(v)) => v,
        other => panic!("not injected: {other:?}"),
    }
}

fn sidecar_of(pod_spec: &Value, list: &str) -> Value {
    pod_spec[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == CONTAINER)
        .cloned()
        .unwrap_or_else(|| panic!("no sidecar in {list}: {pod_spec}"))
}

#[test]
fn opted_in_pod_gets_a_native_sidecar() {
    let out = injected(&opted_in(), Scope::OptIn, &Options::default());
    let c = sidecar_of(&out["spec"], "initContainers");
    assert_eq!(c["restartPolicy"], "Always");
    assert_eq!(
        c["args"],
        json!(["--model-repository", "/models", "--listen", "0.0.0.0:8000"])
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/v2/health/ready");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/v2/health/live");
    assert_eq!(c["startupProbe"]["httpGet"]["path"], "/v2/health/ready");
    // 300 s of model loading at one poll every 2 s.
    assert_eq!(c["startupProbe"]["failureThreshold"], 150);
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "models", "mountPath": "/models", "readOnly": true}])
    );
    assert_eq!(c["resources"]["limits"], json!({"memory": "2Gi"}));
    // The app container is untouched, nothing else was added.
    assert_eq!(out["spec"]["containers"], opted_in()["spec"]["containers"]);
    let status: Value =
        serde_json::from_str(out["metadata"]["annotations"][STATUS].as_str().unwrap()).unwrap();
    assert_eq!(status["mode"], "native");
    assert_eq!(status["port"], 8000);
    assert!(out["metadata"]["annotations"]
        .get(DEFAULT_CONTAINER)
        .is_none());
}

#[test]
fn container_mode_appends_a_container() {
    let opts = Options {
        mode: Mode::Container,
        ..Options::default()
    };
    let out = injected(&opted_in(), Scope::OptIn, &opts);
    let c = sidecar_of(&out["spec"], "containers");
    assert!(c.get("restartPolicy").is_none());
    assert!(out["spec"].get("initContainers").is_none());
    assert_eq!(out["spec"]["containers"][0]["name"], "app");
    assert_eq!(out["metadata"]["annotations"][DEFAULT_CONTAINER], "app");
}

#[test]
fn a_second_pass_changes_nothing() {
    for mode in [Mode::Native, Mode::Container] {
        let opts = Options {
            mode,
            ..Options::default()
        };
        let once = injected(&opted_in(), Scope::OptIn, &opts);
        assert_eq!(
            inject(&once, None, Scope::Namespace, &opts),
            Ok(Outcome::Skipped(Skip::AlreadyInjected))
        );
    }
}

#[test]
fn who_gets_injected() {
    let opts = Options::default();
    let plain = pod(json!({"app": "digits"}), json!({}));
    let out_label = pod(json!({INJECT: "false"}), json!({}));
    let out_note = pod(json!({}), json!({INJECT: "false"}));
    let in_note = pod(json!({}), json!({INJECT: "true"}));
    let cases = [
        (&plain, Scope::OptIn, Some(Skip::NotOptedIn)),
        (&plain, Scope::Namespace, None),
        (&out_label, Scope::Namespace, Some(Skip::OptedOut)),
        (&out_note, Scope::Namespace, Some(Skip::OptedOut)),
        (&in_note, Scope::OptIn, None),
    ];
    for (obj, scope, want) in cases {
        let got = match inject(obj, None, scope, &opts).unwrap() {
            Outcome::Injected(_) => None,
            Outcome::Skipped(s) => Some(s),
        };
        assert_eq!(got, want, "{obj} in {scope:?}");
    }
    // The label wins over the annotation.
    let both = pod(json!({INJECT: "false"}), json!({INJECT: "true"}));
    assert_eq!(
        inject(&both, None, Scope::OptIn, &opts),
        Ok(Outcome::Skipped(Skip::OptedOut))
    );
    for ns in ["kube-system", "infermesh-system"] {
        assert_eq!(
            inject(&opted_in(), Some(ns), Scope::Namespace, &opts),
            Ok(Outcome::Skipped(Skip::ExcludedNamespace(ns.into())))
        );
    }
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}});
    assert_eq!(
        inject(&svc, None, Scope::Namespace, &opts),
        Ok(Outcome::Skipped(Skip::NoPodTemplate("Service".into())))
    );
}

#[test]
fn workloads_are_injected_in_their_pod_template() {
    let p = opted_in();
    let template = json!({"metadata": p["metadata"], "spec": p["spec"]});
    let cases = [
        ("apps/v1", "Deployment", json!({"template": template})),
        ("apps/v1", "StatefulSet", json!({"template": template})),
        ("apps/v1", "DaemonSet", json!({"template": template})),
        ("apps/v1", "ReplicaSet", json!({"template": template})),
        ("batch/v1", "Job", json!({"template": template})),
        (
            "batch/v1",
            "CronJob",
            json!({"schedule": "@daily", "jobTemplate": {"spec": {"template": template}}}),
        ),
    ];
    for (api, kind, spec) in cases {
        let obj = json!({"apiVersion": api, "kind": kind, "metadata": {"name": "w"}, "spec": spec});
        let out = injected(&obj, Scope::OptIn, &Options::default());
        let tpl = out.pointer(template_pointer(kind).unwrap()).unwrap();
        sidecar_of(&tpl["spec"], "initContainers");
        assert!(
            tpl["metadata"]["annotations"].get(STATUS).is_some(),
            "{kind}"
        );
        // Only the template changed.
        assert_eq!(out["metadata"], obj["metadata"], "{kind}");
    }
}

#[test]
fn annotations_override_the_defaults() {
    let notes = json!({
        IMAGE: "registry.local/sidecar:dev",
        MODE: "container",
        PORT: "9000",
        MODEL_VOLUME: "repo",
        CPU: "2",
        MEMORY: "1Gi",
        CPU_LIMIT: "4",
        MEMORY_LIMIT: "4Gi",
        ARGS: "--instances 2 --max-body-bytes=1048576",
        STARTUP_SECONDS: "601",
        VERSION: "2",
    });
    let mut obj = pod(json!({INJECT: "true"}), notes);
    obj["spec"]["volumes"] = json!([{"name": "repo", "emptyDir": {}}]);
    let out = injected(&obj, Scope::OptIn, &Options::default());
    let c = sidecar_of(&out["spec"], "containers");
    assert_eq!(c["image"], "registry.local/sidecar:dev");
    assert_eq!(c["ports"][0]["containerPort"], 9000);
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 9000);
    assert_eq!(c["volumeMounts"][0]["name"], "repo");
    assert_eq!(
        c["resources"],
        json!({"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}})
    );
    assert_eq!(c["startupProbe"]["failureThreshold"], 301);
    assert_eq!(out["metadata"]["labels"][VERSION_LABEL], "2");

    // The sidecar itself accepts the flags the injector writes.
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let sidecar::config::Command::Serve(s) = sidecar::config::parse(args, |_| None).unwrap() else {
        panic!("not serve");
    };
    assert_eq!(s.listen, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(s.instances, 2);
    assert_eq!(s.max_body_bytes, 1 << 20);
    assert_eq!(s.model_repository, std::path::PathBuf::from("/models"));
}

#[test]
fn pods_the_sidecar_would_clash_with_are_refused() {
    let opts = Options::default();
    let err = |obj: &Value| {
        inject(obj, None, Scope::OptIn, &opts)
            .unwrap_err()
            .to_string()
    };

    let mut name = opted_in();
    name["spec"]["containers"][0]["name"] = json!(CONTAINER);
    assert!(err(&name).contains("container name \"infermesh-sidecar\" is already taken"));

    let mut port = opted_in();
    port["spec"]["initContainers"] =
        json!([{"name": "warm", "image": "x", "ports": [{"containerPort": 8000}]}]);
    assert_eq!(
        err(&port),
        "port 8000 is already taken by container \"warm\" (set infermesh.io/port)"
    );

    let mut vol = opted_in();
    vol["spec"]["volumes"] = json!([]);
    assert!(err(&vol).contains("no volume \"models\""), "{}", err(&vol));

    let bad = |key: &str, value: &str| {
        let mut o = opted_in();
        o["metadata"]["annotations"][key] = json!(value);
        err(&o)
    };
    for (key, value, reason) in [
        (PORT, "70000", "is not a port number"),
        (PORT, "15006", "is a port Istio's sidecar uses"),
        (MODE, "sidecar", "is not native or container"),
        (CPU, "lots", "is not a Kubernetes quantity"),
        (MEMORY_LIMIT, "1Gib", "is not a Kubernetes quantity"),
        (ARGS, "--listen 0.0.0.0:1", "the injector owns"),
        (ARGS, "instances 2", "must start with a --flag"),
        (STARTUP_SECONDS, "0", "is not a number of seconds"),
        (IMAGE, "a b", "is not an image reference"),
        (VERSION, "-v2-", "is not a label value"),
    ] {
        let e = bad(key, value);
        assert!(
            e.starts_with(&format!("annotation {key}: {value:?}")),
            "{e}"
        );
        assert!(e.contains(reason), "{e}");
    }
    let mut conflict = opted_in();
    conflict["metadata"]["labels"][VERSION_LABEL] = json!("1");
    conflict["metadata"]["annotations"][VERSION] = json!("2");
    assert!(err(&conflict).contains("conflicts with the label version=1"));

    let mut flag = opted_in();
    flag["metadata"]["labels"][INJECT] = json!("yes");
    assert!(err(&flag).contains("is not \"true\" or \"false\""));

    let mut shape = opted_in();
    shape["spec"]["containers"] = json!({"app": {}});
    assert_eq!(err(&shape), "/spec/containers is not a list");
    let mut labels = opted_in();
    labels["metadata"]["labels"]["n"] = json!(1);
    assert_eq!(err(&labels), "/metadata/labels/n is not a string");
}

#[test]
fn kube_version_picks_the_mode_and_quantities_parse() {
    for (v, want) in [
        ("1.28", Some(Mode::Container)),
        ("v1.29.3", Some(Mode::Native)),
        ("1.33", Some(Mode::Native)),
        ("1.30.2-gke.1", Some(Mode::Native)),
        ("2.0", Some(Mode::Native)),
        ("1", None),
        ("x.y", None),
    ] {
        assert_eq!(Mode::for_kube_version(v), want, "{v}");
    }
    for q in [
        "1", "500m", "0.5", ".5", "512Mi", "2Gi", "1e3", "1E3", "2G", "100k",
    ] {
        assert!(is_quantity(q), "{q}");
    }
    for q in ["", "m", "1.", "1Gib", "-1", "1 Gi", "one", "1e"] {
        assert!(!is_quantity(q), "{q}");
    }
}

fn admission(object: &Value, operation: &str, namespace: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": operation,
            "namespace": namespace,
            "object": object,
        },
    }))
    .unwrap()
}

#[test]
fn reviews_answer_with_a_patch_a_no_op_or_a_denial() {
    use base64::Engine;
    let opts = Options::default();
    let a = review::handle(
        &admission(&opted_in(), "CREATE", "models"),
        Scope::OptIn,
        &opts,
    );
    assert_eq!(a.status, 200);
    let r = &a.body["response"];
    assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    let ops: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let paths: Vec<&str> = ops
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/metadata/annotations/infermesh.io~1status",
            "/spec/initContainers"
        ]
    );

    let no_patch = |body: Vec<u8>, scope| {
        let a = review::handle(&body, scope, &opts);
        assert_eq!(a.status, 200);
        assert_eq!(a.body["response"]["allowed"], true);
        assert!(a.body["response"].get("patch").is_none(), "{}", a.body);
    };
    no_patch(admission(&opted_in(), "UPDATE", "models"), Scope::OptIn);
    no_patch(
        admission(&opted_in(), "CREATE", "kube-system"),
        Scope::Namespace,
    );
    no_patch(
        admission(&pod(json!({}), json!({})), "CREATE", "models"),
        Scope::OptIn,
    );
    let once = injected(&opted_in(), Scope::OptIn, &opts);
    no_patch(admission(&once, "CREATE", "models"), Scope::OptIn);

    let mut clash = opted_in();
    clash["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(8000);
    let a = review::handle(&admission(&clash, "CREATE", "models"), Scope::OptIn, &opts);
    assert_eq!(a.status, 200);
    assert_eq!(a.body["response"]["allowed"], false);
    assert_eq!(a.body["response"]["status"]["code"], 400);
    let msg = a.body["response"]["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("port 8000 is already taken by container \"app\""),
        "{msg}"
    );

    for (body, want) in [
        (b"{".to_vec(), "body is not JSON"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#.to_vec(),
            "expected apiVersion",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod"}"#.to_vec(),
            "expected apiVersion",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            "no request",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#
                .to_vec(),
            "uid",
        ),
    ] {
        let a = review::handle(&body, Scope::OptIn, &opts);
        assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&body));
        assert!(
            a.body["error"].as_str().unwrap().contains(want),
            "{}",
            a.body
        );
    }
}
