//! Prometheus metrics: one registry per server, served at `/metrics`.
//! Labels are bounded: model and version only take values of models that
//! exist in the repository, outcome is a fixed set.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const REQUESTS_TOTAL: &str = "infermesh_sidecar_requests_total";
pub const REQUEST_DURATION: &str = "infermesh_sidecar_request_duration_seconds";
pub const QUEUE_DURATION: &str = "infermesh_sidecar_queue_duration_seconds";
pub const COMPUTE_DURATION: &str = "infermesh_sidecar_compute_duration_seconds";
pub const BATCH_SIZE: &str = "infermesh_sidecar_batch_size";
pub const PENDING_REQUESTS: &str = "infermesh_sidecar_pending_requests";
pub const MODELS_LOADED: &str = "infermesh_sidecar_models_loaded";
pub const HTTP_RESPONSES_TOTAL: &str = "infermesh_sidecar_http_responses_total";
pub const SYNC_FAILURES_TOTAL: &str = "infermesh_sidecar_repository_sync_failures_total";
pub const SYNC_DURATION: &str = "infermesh_sidecar_repository_sync_duration_seconds";
pub const SYNC_BYTES_TOTAL: &str = "infermesh_sidecar_repository_sync_bytes_total";
pub const SYNC_LAST_SUCCESS: &str =
    "infermesh_sidecar_repository_last_sync_success_timestamp_seconds";

/// Label for requests whose model is not in the repository (keeps label
/// values bounded whatever clients send).
pub const UNKNOWN: &str = "_unknown";

/// Fixed set of inference outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    BadRequest,
    NotFound,
    QueueFull,
    Timeout,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::BadRequest => "bad_request",
            Outcome::NotFound => "not_found",
            Outcome::QueueFull => "queue_full",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
        }
    }
}

/// All metrics of one server.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_duration: HistogramVec,
    pub compute_duration: HistogramVec,
    pub batch_size: HistogramVec,
    pub pending: IntGaugeVec,
    pub models_loaded: IntGauge,
    pub http_responses: IntCounterVec,
    /// Object store repositories only (zero for a local directory).
    pub sync_failures: IntCounter,
    pub sync_duration: Histogram,
    pub sync_bytes: IntCounter,
    pub sync_last_success: Gauge,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let mv = &["model", "version"];
        let requests = IntCounterVec::new(
            Opts::new(
                REQUESTS_TOTAL,
                "Inference requests by model, version and outcome.",
            ),
            &["model", "version", "outcome"],
        )?;
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), mv)
        };
        let request_duration = hist(
            REQUEST_DURATION,
            "Inference request latency from body read to response, in seconds.",
            LATENCY_BUCKETS,
        )?;
        let queue_duration = hist(
            QUEUE_DURATION,
            "Time a request waited for its batch to start, in seconds.",
            LATENCY_BUCKETS,
        )?;
        let compute_duration = hist(
            COMPUTE_DURATION,
            "Engine run time per batch, in seconds.",
            LATENCY_BUCKETS,
        )?;
        let batch_size = hist(
            BATCH_SIZE,
            "Rows per engine run (dynamic batching).",
            &[
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
            ],
        )?;
        let pending = IntGaugeVec::new(
            Opts::new(
                PENDING_REQUESTS,
                "Inference requests admitted and not yet answered.",
            ),
            mv,
        )?;
        let models_loaded = IntGauge::new(MODELS_LOADED, "Model versions loaded and serving.")?;
        let http_responses = IntCounterVec::new(
            Opts::new(HTTP_RESPONSES_TOTAL, "HTTP responses by status code."),
            &["code"],
        )?;
        let sync_failures = IntCounter::new(
            SYNC_FAILURES_TOTAL,
            "Object store repository sync passes that failed.",
        )?;
        let sync_duration = Histogram::with_opts(
            HistogramOpts::new(
                SYNC_DURATION,
                "Object store repository sync pass duration, in seconds.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 120.0, 600.0,
            ]),
        )?;
        let sync_bytes = IntCounter::new(
            SYNC_BYTES_TOTAL,
            "Bytes downloaded from the object store repository.",
        )?;
        let sync_last_success = Gauge::new(
            SYNC_LAST_SUCCESS,
            "Unix time of the last successful repository sync pass (0: none yet).",
        )?;
        registry.register(Box::new(sync_failures.clone()))?;
        registry.register(Box::new(sync_duration.clone()))?;
        registry.register(Box::new(sync_bytes.clone()))?;
        registry.register(Box::new(sync_last_success.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(queue_duration.clone()))?;
        registry.register(Box::new(compute_duration.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(models_loaded.clone()))?;
        registry.register(Box::new(http_responses.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            queue_duration,
            compute_duration,
            batch_size,
            pending,
            models_loaded,
            http_responses,
            sync_failures,
            sync_duration,
            sync_bytes,
            sync_last_success,
        })
    }

    /// Text exposition format.
    pub fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(buf)
    }
}
