//! The injected container: injector defaults, per-pod overrides from
//! annotations, and the Kubernetes container spec they make.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{
    InjectError, ARGS, CPU, CPU_LIMIT, IMAGE, MEMORY, MEMORY_LIMIT, MODE, MODEL_VOLUME, PORT,
    STARTUP_SECONDS, VERSION,
};

/// The injected container's name.
pub const CONTAINER: &str = "infermesh-sidecar";
/// Where the model repository volume is mounted in the sidecar.
pub const MODEL_MOUNT: &str = "/models";
/// The sidecar image's non-root user (and group).
pub const USER_ID: u32 = 65532;
/// Ports Istio's sidecar uses in the pod's network namespace.
const ISTIO_PORTS: [u16; 7] = [15000, 15001, 15004, 15006, 15020, 15021, 15090];
/// Flags the injector sets itself (through [`PORT`] and [`MODEL_VOLUME`]).
const OWNED_FLAGS: [&str; 2] = ["--listen", "--model-repository"];
/// Readiness polls during model loading, in seconds.
const STARTUP_PERIOD_S: u64 = 2;

/// How the sidecar joins the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A native sidecar: an init container with `restartPolicy: Always`
    /// (Kubernetes >= 1.29). Starts before, and stops after, the app.
    Native,
    /// A plain container, for clusters without native sidecars.
    Container,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "native" => Some(Mode::Native),
            "container" => Some(Mode::Container),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Container => "container",
        }
    }

    /// Native sidecars are on by default from Kubernetes 1.29 (beta; GA in
    /// 1.33). `version` is `MAJOR.MINOR` (a `v` prefix and a patch or
    /// build suffix such as `1.30.2-gke.1` are accepted).
    pub fn for_kube_version(version: &str) -> Option<Mode> {
        let v = version.trim().trim_start_matches('v');
        let mut parts = v.split(['.', '-', '+']);
        let major: u32 = parts.next()?.parse().ok()?;
        let minor: u32 = parts.next()?.trim_end_matches('+').parse().ok()?;
        Some(if (major, minor) >= (1, 29) {
            Mode::Native
        } else {
            Mode::Container
        })
    }
}

/// Requests and limits of the sidecar container (Kubernetes quantities).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpu: String,
    pub memory: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

/// Injector-wide defaults; each has a per-pod annotation override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub image: String,
    pub mode: Mode,
    pub port: u16,
    pub model_volume: String,
    pub resources: Resources,
    pub startup_timeout_s: u64,
    /// Namespaces never injected, whatever the pod says.
    pub excluded_namespaces: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: format!(
                "registry.example.com/infermesh/sidecar:{}",
                env!("CARGO_PKG_VERSION")
            ),
            mode: Mode::Native,
            port: 8000,
            model_volume: "models".into(),
            resources: Resources {
                cpu: "500m".into(),
                memory: "512Mi".into(),
                cpu_limit: None,
                memory_limit: Some("2Gi".into()),
            },
            startup_timeout_s: 300,
            excluded_namespaces: [
                "kube-system",
                "kube-public",
                "kube-node-lease",
                "infermesh-system",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// The sidecar for one pod: defaults with the pod's overrides applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sidecar {
    pub o: Options,
    pub extra_args: Vec<String>,
    pub version: Option<String>,
}

fn bad(key: &'static str, value: &str, reason: &str) -> InjectError {
    InjectError::BadAnnotation {
        key,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

/// A Kubernetes resource quantity: a decimal number with an optional
/// binary or decimal suffix (`500m`, `1.5`, `512Mi`, `2G`, `1e3`).
pub fn is_quantity(s: &str) -> bool {
    const SUFFIXES: [&str; 14] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P",
    ];
    let num = SUFFIXES
        .iter()
        .find_map(|suf| s.strip_suffix(suf))
        .or_else(|| s.strip_suffix('E'))
        .unwrap_or(s);
    let (mantissa, exp) = match num.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (num, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((a, b)) => (digits(a) || a.is_empty()) && digits(b),
        None => digits(mantissa),
    };
    let exp_ok = exp.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    s.len() <= 32 && mantissa_ok && exp_ok
}

/// A label value: at most 63 characters, alphanumerics with `-_.` inside.
fn is_label_value(s: &str) -> bool {
    let inner = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    s.len() <= 63
        && s.bytes().all(inner)
        && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

impl Sidecar {
    pub fn resolve(opts: &Options, notes: &BTreeMap<String, String>) -> Result<Self, InjectError> {
        let get = |k: &str| notes.get(k).map(String::as_str);
        let mut s = Sidecar {
            o: opts.clone(),
            extra_args: Vec::new(),
            version: None,
        };
        if let Some(v) = get(IMAGE) {
            if v.is_empty() || v.len() > 512 || v.chars().any(|c| c.is_whitespace()) {
                return Err(bad(IMAGE, v, "is not an image reference"));
            }
            s.o.image = v.to_owned();
        }
        if let Some(v) = get(MODE) {
            s.o.mode = Mode::parse(v).ok_or_else(|| bad(MODE, v, "is not native or container"))?;
        }
        if let Some(v) = get(PORT) {
            s.o.port = v
                .parse()
                .ok()
                .filter(|p| *p >= 1)
                .ok_or_else(|| bad(PORT, v, "is not a port number"))?;
        }
        if ISTIO_PORTS.contains(&s.o.port) {
            let key = if get(PORT).is_some() { PORT } else { "--port" };
            return Err(bad(
                key,
                &s.o.port.to_string(),
                "is a port Istio's sidecar uses",
            ));
        }
        if let Some(v) = get(MODEL_VOLUME) {
            if v.is_empty() || v.len() > 63 {
                return Err(bad(MODEL_VOLUME, v, "is not a volume name"));
            }
            s.o.model_volume = v.to_owned();
        }
        let quantity = |key: &'static str, slot: &mut String| -> Result<(), InjectError> {
            if let Some(v) = get(key) {
                if !is_quantity(v) {
                    return Err(bad(key, v, "is not a Kubernetes quantity"));
                }
                *slot = v.to_owned();
            }
            Ok(())
        };
        quantity(CPU, &mut s.o.resources.cpu)?;
        quantity(MEMORY, &mut s.o.resources.memory)?;
        for (key, slot) in [
            (CPU_LIMIT, &mut s.o.resources.cpu_limit),
            (MEMORY_LIMIT, &mut s.o.resources.memory_limit),
        ] {
            let mut v = slot.clone().unwrap_or_default();
            quantity(key, &mut v)?;
            *slot = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = get(STARTUP_SECONDS) {
            s.o.startup_timeout_s = v
                .parse()
                .ok()
                .filter(|n| (STARTUP_PERIOD_S..=86_400).contains(n))
                .ok_or_else(|| {
                    bad(
                        STARTUP_SECONDS,
                        v,
                        "is not a number of seconds in 2..=86400",
                    )
                })?;
        }
        if let Some(v) = get(ARGS) {
            s.extra_args = v.split_whitespace().map(str::to_owned).collect();
            let first = s.extra_args.first();
            if first.is_some_and(|a| !a.starts_with("--")) {
                return Err(bad(ARGS, v, "must start with a --flag"));
            }
            for a in &s.extra_args {
                let flag = a.split_once('=').map_or(a.as_str(), |(f, _)| f);
                if OWNED_FLAGS.contains(&flag) {
                    return Err(bad(
                        ARGS,
                        v,
                        &format!("sets {flag}, which the injector owns ({PORT}, {MODEL_VOLUME})"),
                    ));
                }
            }
        }
        if let Some(v) = get(VERSION) {
            if v.is_empty() || !is_label_value(v) {
                return Err(bad(VERSION, v, "is not a label value"));
            }
            s.version = Some(v.to_owned());
        }
        Ok(s)
    }

    /// The sidecar's command-line arguments (the image's entrypoint is the
    /// binary).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--model-repository".to_owned(),
            MODEL_MOUNT.to_owned(),
            "--listen".to_owned(),
            format!("0.0.0.0:{}", self.o.port),
        ];
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// The container spec, for `containers` or `initContainers`.
    pub fn container(&self) -> Value {
        let probe = |path: &str, period: u64, failures: u64| {
            json!({
                "httpGet": {"path": path, "port": self.o.port},
                "periodSeconds": period,
                "timeoutSeconds": 1,
                "failureThreshold": failures,
            })
        };
        let mut limits = serde_json::Map::new();
        if let Some(c) = &self.o.resources.cpu_limit {
            limits.insert("cpu".into(), json!(c));
        }
        if let Some(m) = &self.o.resources.memory_limit {
            limits.insert("memory".into(), json!(m));
        }
        let mut resources = json!({
            "requests": {"cpu": self.o.resources.cpu, "memory": self.o.resources.memory},
        });
        if !limits.is_empty() {
            resources["limits"] = limits.into();
        }
        let mut c = json!({
            "name": CONTAINER,
            "image": self.o.image,
            "args": self.args(),
            "env": [{"name": "INFERMESH_LOG_FORMAT", "value": "json"}],
            "ports": [{"name": "http-infermesh", "containerPort": self.o.port, "protocol": "TCP"}],
            // Until the models are loaded; for a native sidecar the app
            // containers only start once this passes.
            "startupProbe": probe(
                "/v2/health/ready",
                STARTUP_PERIOD_S,
                self.o.startup_timeout_s.div_ceil(STARTUP_PERIOD_S),
            ),
            "readinessProbe": probe("/v2/health/ready", 5, 3),
            "livenessProbe": probe("/v2/health/live", 10, 3),
            "resources": resources,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": USER_ID,
                "runAsGroup": USER_ID,
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [{"name": self.o.model_volume, "mountPath": MODEL_MOUNT, "readOnly": true}],
        });
        if self.o.mode == Mode::Native {
            c["restartPolicy"] = json!("Always");
        }
        c
    }

    /// The [`super::STATUS`] annotation: what was injected, as JSON.
    pub fn status(&self) -> String {
        json!({
            "container": CONTAINER,
            "image": self.o.image,
            "mode": self.o.mode.name(),
            "port": self.o.port,
            "injector": env!("CARGO_PKG_VERSION"),
        })
        .to_string()
    }
}
