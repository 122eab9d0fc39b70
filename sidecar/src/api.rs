//! The hyper service: routing, body limits, and the one place where errors
//! become HTTP statuses. Error bodies are `{"error": "..."}` and never
//! carry engine internals or file paths.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::batching::BatchError;
use crate::config::Settings;
use crate::metrics::{Metrics, Outcome, UNKNOWN};
use crate::model_repo::{self, RepoError};
use crate::protocol;
use crate::registry::{LoadError, LoadedVersion, Registry};

pub const REQUEST_ID: &str = "x-request-id";
pub const INFERENCE_HEADER_LEN: &str = "inference-header-content-length";
/// Bodies above this size are decoded on a blocking thread.
const INLINE_DECODE_BYTES: usize = 256 << 10;
/// Body limit of the small repository endpoints.
const SMALL_BODY_BYTES: usize = 64 << 10;

/// Shared server state.
pub struct AppState {
    pub settings: Settings,
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    /// Set once the startup load pass is over.
    pub loaded: AtomicBool,
    /// Set on SIGTERM/SIGINT: readiness goes false.
    pub draining: AtomicBool,
    /// Why the first object store sync has not succeeded yet.
    pub repository_error: std::sync::Mutex<Option<String>>,
    request_seq: AtomicU64,
    id_seed: u64,
}

impl AppState {
    pub fn new(settings: Settings, registry: Arc<Registry>, metrics: Metrics) -> AppState {
        use std::hash::{BuildHasher, Hasher};
        let id_seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        AppState {
            settings,
            registry,
            metrics,
            loaded: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            repository_error: std::sync::Mutex::new(None),
            request_seq: AtomicU64::new(0),
            id_seed,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }

    fn new_request_id(&self) -> String {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:08x}", self.id_seed, n)
    }
}

/// Everything that can go wrong, by status.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("request body timed out")]
    BodyTimeout,
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    QueueFull(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("inference timed out")]
    Timeout,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn outcome(&self) -> Outcome {
        match self {
            ApiError::NotFound(_) => Outcome::NotFound,
            ApiError::QueueFull(_) => Outcome::QueueFull,
            ApiError::Timeout => Outcome::Timeout,
            ApiError::Internal | ApiError::Unavailable(_) => Outcome::Error,
            _ => Outcome::BadRequest,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        let mut resp = json_response(status, &json!({ "error": self.to_string() }));
        match self {
            ApiError::MethodNotAllowed(allow) => {
                resp.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
            }
            // The rest of the body is still on the wire: do not reuse.
            ApiError::TooLarge(_) | ApiError::BodyTimeout => {
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::NotFound(_) => ApiError::NotFound(e.to_string()),
            RepoError::Unreadable => ApiError::Internal,
            other => ApiError::BadRequest(other.to_string()),
        }
    }
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn ok_json(v: serde_json::Value) -> Result<Response<Full<Bytes>>, ApiError> {
    Ok(json_response(StatusCode::OK, &v))
}

/// Entry point for every request.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| state.new_request_id());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let result = route(&state, req).await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if let ApiError::Internal = e {
                tracing::error!(request_id = %request_id, path = %path, "internal error");
            }
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    let status = resp.status().as_u16();
    state
        .metrics
        .http_responses
        .with_label_values(&[status_label(status)])
        .inc();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::warn!(request_id = %request_id, method = %method, path = %path, status, latency_ms, "request");
    } else {
        tracing::info!(request_id = %request_id, method = %method, path = %path, status, latency_ms, "request");
    }
    Ok(resp)
}

/// Status codes as static labels (bounded).
fn status_label(code: u16) -> &'static str {
    match code {
        200 => "200",
        400 => "400",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        429 => "429",
        500 => "500",
        503 => "503",
        504 => "504",
        _ => "other",
    }
}

async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let path = req.uri().path().to_string();
    if path == "/metrics" {
        expect(&req, Method::GET, "GET")?;
        let body = state.metrics.render().map_err(|_| ApiError::Internal)?;
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        return Ok(resp);
    }
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let Some((&"v2", rest)) = segs.split_first() else {
        return Err(ApiError::NotFound("not found".into()));
    };
    let rest: Vec<&str> = rest.iter().copied().filter(|s| !s.is_empty()).collect();
    match rest.as_slice() {
        [] => {
            expect(&req, Method::GET, "GET")?;
            ok_json(json!({
                "name": "infermesh-sidecar",
                "version": env!("CARGO_PKG_VERSION"),
                "extensions": ["binary_tensor_data", "classification", "model_repository"],
            }))
        }
        ["health", "live"] => {
            expect(&req, Method::GET, "GET")?;
            ok_json(json!({ "live": true }))
        }
        ["health", "ready"] => {
            expect(&req, Method::GET, "GET")?;
            if state.is_ready() {
                ok_json(json!({ "ready": true }))
            } else {
                let pending = state
                    .repository_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let why = if state.draining.load(Ordering::SeqCst) {
                    "server is shutting down".to_string()
                } else {
                    pending.unwrap_or_else(|| "models are loading".to_string())
                };
                Ok(json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "ready": false, "error": why }),
                ))
            }
        }
        ["models", m, tail @ ..] => {
            model_repo::validate_name(m)?;
            let (version, action) = match tail {
                [] => (None, None),
                [a] => (None, Some(*a)),
                ["versions", v] => (Some(*v), None),
                ["versions", v, a] => (Some(*v), Some(*a)),
                _ => return Err(ApiError::NotFound("not found".into())),
            };
            if let Some(v) = version {
                if model_repo::parse_version(v).is_none() {
                    return Err(ApiError::BadRequest(format!(
                        "invalid version {:?}: versions are decimal numbers",
                        v.chars().take(32).collect::<String>()
                    )));
                }
            }
            match action {
                None => {
                    expect(&req, Method::GET, "GET")?;
                    model_metadata(state, m, version)
                }
                Some("ready") => {
                    expect(&req, Method::GET, "GET")?;
                    model_ready(state, m, version)
                }
                Some("config") => {
                    expect(&req, Method::GET, "GET")?;
                    model_config(state, m, version)
                }
                Some("infer") => {
                    expect(&req, Method::POST, "POST")?;
                    infer(state, m, version, req).await
                }
                Some(_) => Err(ApiError::NotFound("not found".into())),
            }
        }
        ["repository", "index"] => {
            expect(&req, Method::POST, "POST")?;
            let body = read_body(state, req, SMALL_BODY_BYTES).await?;
            let ready_only = if body.iter().all(u8::is_ascii_whitespace) {
                false
            } else {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct IndexRequest {
                    #[serde(default)]
                    ready: bool,
                }
                let r: IndexRequest = parse_small_json(state, &body)?;
                r.ready
            };
            let index: Vec<_> = state
                .registry
                .index()
                .into_iter()
                .filter(|e| !ready_only || e.state == "READY")
                .collect();
            ok_json(serde_json::to_value(index).map_err(|_| ApiError::Internal)?)
        }
        ["repository", "models", m, action @ ("load" | "unload")] => {
            expect(&req, Method::POST, "POST")?;
            model_repo::validate_name(m)?;
            let body = read_body(state, req, SMALL_BODY_BYTES).await?;
            if !body.iter().all(u8::is_ascii_whitespace) {
                // Parameters (config overrides, files) are not supported.
                let v: serde_json::Value = parse_small_json(state, &body)?;
                if v.as_object().is_some_and(|o| !o.is_empty()) {
                    return Err(ApiError::BadRequest(
                        "load/unload parameters are not supported".into(),
                    ));
                }
            }
            if *action == "load" {
                match state.registry.load(m).await {
                    Ok(_) => ok_json(json!({})),
                    Err(LoadError::Repo(e)) => Err(e.into()),
                    Err(e @ LoadError::Failed(..)) => Err(ApiError::BadRequest(e.to_string())),
                }
            } else {
                state.registry.unload(m).await?;
                ok_json(json!({}))
            }
        }
        _ => Err(ApiError::NotFound("not found".into())),
    }
}

fn parse_small_json<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: &[u8],
) -> Result<T, ApiError> {
    if crate::tensor::json_depth_exceeds(body, state.settings.max_json_depth) {
        return Err(ApiError::BadRequest("JSON nested too deep".into()));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))
}

fn expect(req: &Request<Incoming>, method: Method, allow: &'static str) -> Result<(), ApiError> {
    if req.method() == method {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed(allow))
    }
}

fn not_loaded(m: &str, v: Option<&str>) -> ApiError {
    match v {
        Some(v) => ApiError::NotFound(format!("model {m} version {v} is not loaded")),
        None => ApiError::NotFound(format!("model {m} is not loaded")),
    }
}

fn model_metadata(
    state: &AppState,
    m: &str,
    v: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let loaded = state.registry.get(m, v).ok_or_else(|| not_loaded(m, v))?;
    let versions = match v {
        Some(_) => vec![loaded.version.clone()],
        None => state.registry.versions(m),
    };
    let tensors = |specs: &[model_repo::TensorSpec]| -> Vec<serde_json::Value> {
        specs
            .iter()
            .map(|s| json!({ "name": s.name, "datatype": s.datatype.as_str(), "shape": s.shape }))
            .collect()
    };
    ok_json(json!({
        "name": m,
        "versions": versions,
        "platform": "onnx",
        "inputs": tensors(&loaded.signature.inputs),
        "outputs": tensors(&loaded.signature.outputs),
    }))
}

/// The model's configuration in Triton's shape (what Triton clients such
/// as perf_analyzer read before they send load): `max_batch_size`, and
/// per tensor `data_type` (`TYPE_FP32`, ..., `TYPE_STRING` for BYTES) and
/// `dims`, without the batch dimension when the model batches.
fn model_config(
    state: &AppState,
    m: &str,
    v: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let loaded = state.registry.get(m, v).ok_or_else(|| not_loaded(m, v))?;
    let batched = loaded.signature.max_batch_size > 0;
    let tensors = |specs: &[model_repo::TensorSpec]| -> Vec<serde_json::Value> {
        specs
            .iter()
            .map(|s| {
                let data_type = match s.datatype.as_str() {
                    "BYTES" => "TYPE_STRING".to_string(),
                    other => format!("TYPE_{other}"),
                };
                let dims = if batched {
                    s.shape.get(1..).unwrap_or_default()
                } else {
                    &s.shape[..]
                };
                json!({ "name": s.name, "data_type": data_type, "dims": dims })
            })
            .collect()
    };
    ok_json(json!({
        "name": m,
        "platform": "onnx",
        "max_batch_size": loaded.signature.max_batch_size,
        "input": tensors(&loaded.signature.inputs),
        "output": tensors(&loaded.signature.outputs),
    }))
}

fn model_ready(
    state: &AppState,
    m: &str,
    v: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    match state.registry.get(m, v) {
        Some(loaded) => ok_json(json!({ "name": m, "version": loaded.version, "ready": true })),
        None if state.registry.knows(m, v) => Err(ApiError::Unavailable(match v {
            Some(v) => format!("model {m} version {v} is not ready"),
            None => format!("model {m} is not ready"),
        })),
        None => Err(not_loaded(m, v)),
    }
}

/// Reads the body: 413 from Content-Length before reading, or as soon as
/// the streamed size passes `max`; 408 when it takes longer than the body
/// read timeout.
async fn read_body(
    state: &AppState,
    req: Request<Incoming>,
    max: usize,
) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::TooLarge(max));
    }
    let mut body = req.into_body();
    let collect = async {
        let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(max));
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| ApiError::BadRequest("request body could not be read".into()))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > max {
                    return Err(ApiError::TooLarge(max));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(state.settings.body_read_timeout, collect)
        .await
        .map_err(|_| ApiError::BodyTimeout)?
}

/// Counts one inference outcome and keeps the in-flight gauge honest even
/// when the client goes away mid-request (the future is dropped).
struct InferGuard<'a> {
    state: &'a AppState,
    labels: [String; 2],
    started: Instant,
    outcome: Outcome,
    pending: bool,
}

impl InferGuard<'_> {
    fn labels(&self) -> [&str; 2] {
        [self.labels[0].as_str(), self.labels[1].as_str()]
    }
    fn admit(&mut self) {
        self.state
            .metrics
            .pending
            .with_label_values(&self.labels())
            .inc();
        self.pending = true;
    }
}

impl Drop for InferGuard<'_> {
    fn drop(&mut self) {
        let labels = self.labels();
        let m = &self.state.metrics;
        if self.pending {
            m.pending.with_label_values(&labels).dec();
        }
        m.requests
            .with_label_values(&[labels[0], labels[1], self.outcome.as_str()])
            .inc();
        m.request_duration
            .with_label_values(&labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

async fn infer(
    state: &Arc<AppState>,
    m: &str,
    v: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let loaded = state.registry.get(m, v);
    let labels = match &loaded {
        Some(l) => [l.name.clone(), l.version.clone()],
        None if state.registry.knows(m, None) => [m.to_string(), UNKNOWN.to_string()],
        None => [UNKNOWN.to_string(), UNKNOWN.to_string()],
    };
    let mut guard = InferGuard {
        state,
        labels,
        started: Instant::now(),
        outcome: Outcome::Error,
        pending: false,
    };
    let result = infer_inner(state, m, v, loaded, req, &mut guard).await;
    guard.outcome = match &result {
        Ok(_) => Outcome::Success,
        Err(e) => e.outcome(),
    };
    result
}

async fn infer_inner(
    state: &Arc<AppState>,
    m: &str,
    v: Option<&str>,
    loaded: Option<Arc<LoadedVersion>>,
    req: Request<Incoming>,
    guard: &mut InferGuard<'_>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let loaded = loaded.ok_or_else(|| not_loaded(m, v))?;
    let header_len = match req.headers().get(INFERENCE_HEADER_LEN) {
        None => None,
        Some(h) => Some(
            h.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Inference-Header-Content-Length is not a byte count".into(),
                    )
                })?,
        ),
    };
    let body = read_body(state, req, state.settings.max_body_bytes).await?;
    let depth = state.settings.max_json_depth;
    let decoded = if body.len() > INLINE_DECODE_BYTES {
        let l = loaded.clone();
        tokio::task::spawn_blocking(move || {
            protocol::decode(&body, header_len, &l.signature, depth)
        })
        .await
        .map_err(|_| ApiError::Internal)?
    } else {
        protocol::decode(&body, header_len, &loaded.signature, depth)
    }
    .map_err(|e| ApiError::BadRequest(e.0))?;

    guard.admit();
    let submit = loaded.batcher.submit(decoded.inputs, decoded.rows);
    let outputs = match tokio::time::timeout(state.settings.request_timeout, submit).await {
        Err(_) => return Err(ApiError::Timeout),
        Ok(Err(BatchError::QueueFull { .. })) => {
            return Err(ApiError::QueueFull(format!(
                "queue of model {m} version {} is full, retry later",
                loaded.version
            )))
        }
        Ok(Err(BatchError::Closed)) => {
            return Err(ApiError::Unavailable(format!("model {m} was unloaded")))
        }
        Ok(Err(BatchError::Engine(e))) => {
            tracing::error!(model = %m, version = %loaded.version, error = ?e, "inference failed");
            return Err(ApiError::Internal);
        }
        Ok(Ok(o)) => o,
    };
    let encoded = protocol::encode(
        &loaded.name,
        &loaded.version,
        decoded.id.as_deref(),
        &loaded.signature,
        &loaded.labels,
        &decoded.outputs,
        &outputs,
    )
    .map_err(|e| ApiError::BadRequest(e.0))?;
    let mut resp = Response::new(Full::new(Bytes::from(encoded.body)));
    match encoded.header_len {
        Some(n) => {
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            resp.headers_mut()
                .insert(INFERENCE_HEADER_LEN, HeaderValue::from(n));
        }
        None => {
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    Ok(resp)
}
