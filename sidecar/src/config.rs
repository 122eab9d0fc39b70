//! Command-line flags and `INFERMESH_*` environment variables. Flags win
//! over the environment, the environment over defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything the server needs to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// A local directory; unused when `repository_url` is set.
    pub model_repository: PathBuf,
    /// `s3://`, `gs://`, `az://` (or https) URL of the repository.
    pub repository_url: Option<String>,
    /// Where an object store repository is mirrored (default: a directory
    /// per process under the system temp dir).
    pub repository_cache: Option<PathBuf>,
    pub repository_poll: Duration,
    pub repository_max_object_bytes: u64,
    pub repository_max_bytes: u64,
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub queue_capacity: usize,
    pub instances: usize,
    pub grace_period: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_json_depth: usize,
    pub log_format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            model_repository: PathBuf::from("./models"),
            repository_url: None,
            repository_cache: None,
            repository_poll: Duration::from_secs(30),
            // protobuf (so ONNX without external data) stops at 2 GiB.
            repository_max_object_bytes: 2 << 30,
            repository_max_bytes: 16 << 30,
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_body_bytes: 64 << 20,
            request_timeout: Duration::from_secs(30),
            queue_capacity: 1024,
            instances: std::thread::available_parallelism().map_or(1, |n| n.get()),
            grace_period: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_json_depth: 32,
            log_format: LogFormat::Text,
        }
    }
}

/// What the command line asks for.
// Built once at startup: boxing the settings would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Serve(Settings),
    Help,
    Version,
}

/// A flag or variable has a bad value; the message names it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("unknown flag {0}")]
    UnknownFlag(String),
    #[error("flag {0} needs a value")]
    MissingValue(String),
    #[error("{name}: {value:?} {reason}")]
    BadValue {
        name: String,
        value: String,
        reason: &'static str,
    },
    #[error("{name}: {value:?} {reason}")]
    BadRepository {
        name: String,
        value: String,
        reason: String,
    },
}

/// Usage text for `--help`.
pub const USAGE: &str = "\
infermesh-sidecar: serves ONNX models over the Open Inference Protocol v2

Usage: infermesh-sidecar [FLAGS]

Flags (environment variable in brackets; flags win):
  --model-repository DIR|URL  model repository: a directory, or s3://, gs://, az:// URL
                              (or the cloud's https URL) [INFERMESH_MODEL_REPOSITORY] (./models)
  --repository-poll-s N       object store poll interval [INFERMESH_REPOSITORY_POLL_S] (30)
  --repository-cache DIR      object store mirror directory [INFERMESH_REPOSITORY_CACHE]
                              (a fresh directory under the system temp dir)
  --repository-max-object-bytes N  larger objects are not synced [INFERMESH_REPOSITORY_MAX_OBJECT_BYTES] (2147483648)
  --repository-max-bytes N    larger repositories are not synced [INFERMESH_REPOSITORY_MAX_BYTES] (17179869184)
  --listen ADDR:PORT          listen address [INFERMESH_LISTEN] (127.0.0.1:8000)
  --max-body-bytes N          request body limit, 413 above [INFERMESH_MAX_BODY_BYTES] (67108864)
  --request-timeout-ms N      per-inference deadline, 504 after [INFERMESH_REQUEST_TIMEOUT_MS] (30000)
  --queue-capacity N          outstanding requests per model version, 429 above [INFERMESH_QUEUE_CAPACITY] (1024)
  --instances N               concurrent engine runs per model version [INFERMESH_INSTANCES] (CPU count)
  --grace-period-ms N         drain time on SIGTERM/SIGINT [INFERMESH_GRACE_PERIOD_MS] (30000)
  --header-read-timeout-ms N  close connections whose headers are slower [INFERMESH_HEADER_READ_TIMEOUT_MS] (10000)
  --body-read-timeout-ms N    408 when a body takes longer [INFERMESH_BODY_READ_TIMEOUT_MS] (30000)
  --max-json-depth N          JSON nesting limit, 400 above [INFERMESH_MAX_JSON_DEPTH] (32)
  --log-format text|json      log format [INFERMESH_LOG_FORMAT] (text); level from RUST_LOG (info)
  -h, --help                  this text
  -V, --version               version
Exit codes: 0 clean stop, 1 runtime failure, 64 bad flags or config.
";

struct Spec {
    flag: &'static str,
    env: &'static str,
}

const FLAGS: &[Spec] = &[
    Spec {
        flag: "--model-repository",
        env: "INFERMESH_MODEL_REPOSITORY",
    },
    Spec {
        flag: "--repository-poll-s",
        env: "INFERMESH_REPOSITORY_POLL_S",
    },
    Spec {
        flag: "--repository-cache",
        env: "INFERMESH_REPOSITORY_CACHE",
    },
    Spec {
        flag: "--repository-max-object-bytes",
        env: "INFERMESH_REPOSITORY_MAX_OBJECT_BYTES",
    },
    Spec {
        flag: "--repository-max-bytes",
        env: "INFERMESH_REPOSITORY_MAX_BYTES",
    },
    Spec {
        flag: "--listen",
        env: "INFERMESH_LISTEN",
    },
    Spec {
        flag: "--max-body-bytes",
        env: "INFERMESH_MAX_BODY_BYTES",
    },
    Spec {
        flag: "--request-timeout-ms",
        env: "INFERMESH_REQUEST_TIMEOUT_MS",
    },
    Spec {
        flag: "--queue-capacity",
        env: "INFERMESH_QUEUE_CAPACITY",
    },
    Spec {
        flag: "--instances",
        env: "INFERMESH_INSTANCES",
    },
    Spec {
        flag: "--grace-period-ms",
        env: "INFERMESH_GRACE_PERIOD_MS",
    },
    Spec {
        flag: "--header-read-timeout-ms",
        env: "INFERMESH_HEADER_READ_TIMEOUT_MS",
    },
    Spec {
        flag: "--body-read-timeout-ms",
        env: "INFERMESH_BODY_READ_TIMEOUT_MS",
    },
    Spec {
        flag: "--max-json-depth",
        env: "INFERMESH_MAX_JSON_DEPTH",
    },
    Spec {
        flag: "--log-format",
        env: "INFERMESH_LOG_FORMAT",
    },
];

/// Parses `args` (without the program name), reading variables via `env`.
pub fn parse<I, F>(args: I, env: F) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = String>,
    F: Fn(&str) -> Option<String>,
{
    let mut given: Vec<(&'static str, String, String)> = Vec::new();
    for spec in FLAGS {
        if let Some(v) = env(spec.env) {
            given.push((spec.flag, spec.env.to_string(), v));
        }
    }
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            _ => {}
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let Some(spec) = FLAGS.iter().find(|s| s.flag == name) else {
            return Err(ConfigError::UnknownFlag(name));
        };
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or_else(|| ConfigError::MissingValue(name.clone()))?,
        };
        given.push((spec.flag, name, value));
    }
    let mut s = Settings::default();
    for (flag, name, value) in given {
        let bad = |reason| ConfigError::BadValue {
            name: name.clone(),
            value: value.clone(),
            reason,
        };
        let num = |min: u64, max: u64| -> Result<u64, ConfigError> {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| bad("is not a whole number in the allowed range"))
        };
        let ms = |min: u64| num(min, 86_400_000).map(Duration::from_millis);
        match flag {
            "--model-repository" => {
                if value.is_empty() {
                    return Err(bad("is empty"));
                }
                if crate::object_repo::is_url(&value) {
                    crate::object_repo::parse_url(&value).map_err(|reason| {
                        ConfigError::BadRepository {
                            name: name.clone(),
                            value: crate::object_repo::shown(&value),
                            reason,
                        }
                    })?;
                    s.repository_url = Some(value.clone());
                } else {
                    s.repository_url = None;
                    s.model_repository = PathBuf::from(&value);
                }
            }
            "--repository-poll-s" => {
                s.repository_poll = Duration::from_secs(num(1, 86_400)?);
            }
            "--repository-cache" => {
                if value.is_empty() {
                    return Err(bad("is empty"));
                }
                s.repository_cache = Some(PathBuf::from(&value));
            }
            "--repository-max-object-bytes" => s.repository_max_object_bytes = num(1, u64::MAX)?,
            "--repository-max-bytes" => s.repository_max_bytes = num(1, u64::MAX)?,
            "--listen" => {
                s.listen = value
                    .parse()
                    .map_err(|_| bad("is not an ADDR:PORT socket address"))?
            }
            "--max-body-bytes" => s.max_body_bytes = num(1024, 1 << 32)? as usize,
            "--request-timeout-ms" => s.request_timeout = ms(1)?,
            "--queue-capacity" => s.queue_capacity = num(1, 1 << 20)? as usize,
            "--instances" => s.instances = num(1, 1024)? as usize,
            "--grace-period-ms" => s.grace_period = ms(0)?,
            "--header-read-timeout-ms" => s.header_read_timeout = ms(1)?,
            "--body-read-timeout-ms" => s.body_read_timeout = ms(1)?,
            "--max-json-depth" => s.max_json_depth = num(4, 1024)? as usize,
            "--log-format" => {
                s.log_format = match value.as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(bad("is not text or json")),
                }
            }
            _ => return Err(ConfigError::UnknownFlag(name.clone())),
        }
    }
    Ok(Command::Serve(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_override_env_and_defaults() {
        let env = |k: &str| match k {
            "INFERMESH_LISTEN" => Some("127.0.0.1:9000".to_string()),
            "INFERMESH_QUEUE_CAPACITY" => Some("5".to_string()),
            _ => None,
        };
        let Command::Serve(s) = parse(
            args(&["--listen=127.0.0.1:7000", "--log-format", "json"]),
            env,
        )
        .unwrap() else {
            panic!("not serve");
        };
        assert_eq!(s.listen.port(), 7000);
        assert_eq!(s.queue_capacity, 5);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.model_repository, PathBuf::from("./models"));
    }

    #[test]
    fn bucket_urls_set_the_remote_repository() {
        let none = |_: &str| None;
        let Command::Serve(s) = parse(
            args(&[
                "--model-repository",
                "gs://bucket/models",
                "--repository-poll-s",
                "5",
                "--repository-max-object-bytes=1000",
            ]),
            none,
        )
        .unwrap() else {
            panic!("not serve");
        };
        assert_eq!(s.repository_url.as_deref(), Some("gs://bucket/models"));
        assert_eq!(s.repository_poll, Duration::from_secs(5));
        assert_eq!(s.repository_max_object_bytes, 1000);
        for (a, want) in [
            (
                &["--model-repository", "ftp://h/x"][..],
                "--model-repository",
            ),
            (
                &["--model-repository", "s3://u:SECRET@b/x"][..],
                "credentials",
            ),
            (&["--repository-poll-s", "0"][..], "--repository-poll-s"),
        ] {
            let e = parse(args(a), none).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
    }

    #[test]
    fn bad_values_name_the_flag() {
        let none = |_: &str| None;
        let cases: &[(&[&str], &str)] = &[
            (&["--listen", "nope"], "--listen"),
            (&["--queue-capacity", "0"], "--queue-capacity"),
            (&["--log-format", "xml"], "--log-format"),
            (&["--bogus"], "--bogus"),
            (&["--request-timeout-ms"], "--request-timeout-ms"),
        ];
        for (a, name) in cases {
            let e = parse(args(a), none).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        let env = |k: &str| (k == "INFERMESH_MAX_BODY_BYTES").then(|| "x".to_string());
        let e = parse(args(&[]), env).unwrap_err().to_string();
        assert!(e.contains("INFERMESH_MAX_BODY_BYTES"), "{e}");
        assert_eq!(parse(args(&["-h"]), none).unwrap(), Command::Help);
    }
}
