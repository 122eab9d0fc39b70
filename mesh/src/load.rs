//! An open-loop HTTP/1.1 load generator and the summaries of what it saw.
//!
//! Request `i` is due at `i / rate` seconds after the start and is sent at
//! that moment whatever happened to earlier ones: a hung request never
//! holds back the next (no coordinated omission). Each request takes an
//! idle keep-alive connection from a pool or opens a new one, so a
//! connection stuck behind a hung upstream only costs one connection.
//! Latency runs from the request's *scheduled* time to the last byte of the
//! response. Every request leaves a [`Record`]; the functions below it
//! ([`summarize`], [`settle_ms`], [`switches`], [`per_second`]) are pure,
//! so the numbers a benchmark reports are tested on hand-made records.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::{connect, exchange, Req, Sender};

/// How to tell, from the "served by" response header, which cloud answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudOf {
    /// The text after the last `@` (`x-infermesh-served-by: m@2@aws`).
    AfterLastAt,
    /// The header holds `ip:port` (Envoy's `%UPSTREAM_HOST%`); each `ip` is
    /// mapped to a cloud name. An unknown ip is kept as the cloud name.
    ByHost(Vec<(String, String)>),
}

impl CloudOf {
    /// The cloud named by header value `value`.
    pub fn cloud(&self, value: &str) -> String {
        match self {
            CloudOf::AfterLastAt => value.rsplit('@').next().unwrap_or(value).to_owned(),
            CloudOf::ByHost(hosts) => {
                let ip = value.rsplit_once(':').map_or(value, |(ip, _)| ip);
                hosts
                    .iter()
                    .find(|(h, _)| h == ip)
                    .map_or_else(|| value.to_owned(), |(_, c)| c.clone())
            }
        }
    }
}

/// What to send, how fast, for how long.
#[derive(Debug, Clone)]
pub struct Plan {
    pub addr: SocketAddr,
    /// Requests per second; must be > 0.
    pub rate: f64,
    pub duration: Duration,
    /// A request not answered within this is recorded as an error.
    pub timeout: Duration,
    /// The response header naming who served the request.
    pub served_by_header: String,
    pub cloud_of: CloudOf,
    /// Requests in flight beyond this are not sent but recorded as errors,
    /// which bounds connections and memory when the target hangs.
    pub max_in_flight: usize,
}

impl Plan {
    /// `rate` req/s for `duration` to `addr`, 30 s timeout, at most 4,096
    /// in flight, cloud after the last `@` of `x-infermesh-served-by`.
    pub fn new(addr: SocketAddr, rate: f64, duration: Duration) -> Plan {
        Plan {
            addr,
            rate,
            duration,
            timeout: Duration::from_secs(30),
            served_by_header: filter_core::headers::SERVED_BY.to_owned(),
            cloud_of: CloudOf::AfterLastAt,
            max_in_flight: 4_096,
        }
    }

    /// How many requests the plan sends.
    pub fn requests(&self) -> u64 {
        // Bounded by the caller's rate × duration; saturates on nonsense.
        (self.rate * self.duration.as_secs_f64()).max(0.0) as u64
    }
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    /// When it was due, ms after the start of the run.
    pub start_ms: f64,
    /// How late the client actually sent it, ms (client-side lag).
    pub late_ms: f64,
    /// From `start_ms` to the end of the response (or of the failure).
    pub latency_ms: f64,
    /// HTTP status, or `None` on a transport error or timeout.
    pub status: Option<u16>,
    /// Transport error or timeout text.
    pub error: Option<String>,
    /// The raw "served by" header value.
    pub served_by: Option<String>,
    /// The cloud derived from `served_by`.
    pub cloud: Option<String>,
    /// The start of the body of a non-2xx answer (who refused, and why).
    pub error_body: Option<String>,
}

impl Record {
    /// A 2xx answer.
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// A 2xx answer served by `cloud`.
    pub fn served_by_cloud(&self, cloud: &str) -> bool {
        self.ok() && self.cloud.as_deref() == Some(cloud)
    }

    /// The record as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.seq,
            "start_ms": round3(self.start_ms),
            "late_ms": round3(self.late_ms),
            "latency_ms": round3(self.latency_ms),
            "status": self.status,
            "error": self.error,
            "served_by": self.served_by,
            "cloud": self.cloud,
            "error_body": self.error_body,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A run in progress.
pub struct Running {
    /// The instant request 0 was due; fault times are offsets from it.
    pub started: Instant,
    handle: tokio::task::JoinHandle<Vec<Record>>,
}

impl Running {
    /// Milliseconds since the start.
    pub fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    /// Sleeps until `offset` after the start.
    pub async fn sleep_until(&self, offset: Duration) {
        tokio::time::sleep_until((self.started + offset).into()).await;
    }

    /// Waits for every request to finish; records in `seq` order.
    pub async fn finish(self) -> Result<Vec<Record>, String> {
        self.handle
            .await
            .map_err(|e| format!("load generator failed: {e}"))
    }
}

/// Starts the run; `make(seq)` builds request `seq`.
pub fn start<F>(plan: Plan, make: F) -> Result<Running, String>
where
    F: Fn(u64) -> Req + Send + Sync + 'static,
{
    if !(plan.rate.is_finite() && plan.rate > 0.0) {
        return Err(format!("rate {} req/s: must be > 0", plan.rate));
    }
    // A short head start so request 0 is not already late.
    let started = Instant::now() + Duration::from_millis(20);
    let handle = tokio::spawn(drive(plan, make, started));
    Ok(Running { started, handle })
}

async fn drive<F>(plan: Plan, make: F, started: Instant) -> Vec<Record>
where
    F: Fn(u64) -> Req + Send + Sync + 'static,
{
    let plan = Arc::new(plan);
    let pool: Arc<Mutex<Vec<Sender>>> = Arc::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let n = plan.requests();
    let mut tasks = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for seq in 0..n {
        let due = started + Duration::from_secs_f64(seq as f64 / plan.rate);
        tokio::time::sleep_until(due.into()).await;
        let start_ms = (due - started).as_secs_f64() * 1e3;
        let req = make(seq);
        let (plan, pool, in_flight) = (plan.clone(), pool.clone(), in_flight.clone());
        tasks.push(tokio::spawn(async move {
            let late_ms = due.elapsed().as_secs_f64() * 1e3;
            let mut rec = Record {
                seq,
                start_ms,
                late_ms,
                latency_ms: 0.0,
                status: None,
                error: None,
                served_by: None,
                cloud: None,
                error_body: None,
            };
            if in_flight.fetch_add(1, Ordering::AcqRel) >= plan.max_in_flight {
                rec.error = Some(format!(
                    "not sent: {} requests already in flight",
                    plan.max_in_flight
                ));
            } else {
                match tokio::time::timeout(plan.timeout, send(&plan, &pool, req)).await {
                    Ok(Ok((status, served_by, error_body))) => {
                        rec.status = Some(status);
                        rec.error_body = error_body;
                        rec.cloud = served_by.as_deref().map(|v| plan.cloud_of.cloud(v));
                        rec.served_by = served_by;
                    }
                    Ok(Err(e)) => rec.error = Some(e),
                    Err(_) => rec.error = Some(format!("no answer within {:?}", plan.timeout)),
                }
            }
            in_flight.fetch_sub(1, Ordering::AcqRel);
            rec.latency_ms = due.elapsed().as_secs_f64() * 1e3;
            rec
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for (seq, t) in (0u64..).zip(tasks) {
        match t.await {
            Ok(r) => out.push(r),
            Err(e) => out.push(Record {
                seq,
                start_ms: seq as f64 * 1e3 / plan.rate,
                late_ms: 0.0,
                latency_ms: f64::NAN,
                status: None,
                error: Some(format!("request task failed: {e}")),
                served_by: None,
                cloud: None,
                error_body: None,
            }),
        }
    }
    out
}

/// Bytes of a non-2xx body kept in its record.
const ERROR_BODY_BYTES: usize = 256;

/// Sends `req` on a pooled connection (or a new one); returns the status,
/// the served-by header value and, for a non-2xx answer, the start of its
/// body. The connection goes back to the pool only after a complete answer
/// that does not close it.
async fn send(
    plan: &Plan,
    pool: &Mutex<Vec<Sender>>,
    req: Req,
) -> Result<(u16, Option<String>, Option<String>), String> {
    let idle = loop {
        let Some(s) = pool.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
            break None;
        };
        if s.is_ready() {
            break Some(s);
        }
    };
    let mut sender = match idle {
        Some(s) => s,
        None => connect(plan.addr).await?,
    };
    sender
        .ready()
        .await
        .map_err(|e| format!("connection to {} closed: {e}", plan.addr))?;
    let (parts, body, reusable) = exchange(&mut sender, plan.addr, req).await?;
    let error_body = (!parts.status.is_success()).then(|| {
        String::from_utf8_lossy(body.get(..ERROR_BODY_BYTES).unwrap_or(&body)).into_owned()
    });
    let served_by = parts
        .headers
        .get(plan.served_by_header.as_str())
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if reusable {
        pool.lock().unwrap_or_else(|e| e.into_inner()).push(sender);
    }
    Ok((parts.status.as_u16(), served_by, error_body))
}

/// Counts and latency figures over a set of records.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub requests: usize,
    /// Non-2xx answers plus transport errors and timeouts.
    pub errors: usize,
    pub over_100ms: usize,
    pub over_250ms: usize,
    pub max_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Summary of `records` (every request counts toward the latency figures,
/// failed ones with the time they took to fail). Empty input: all zeros.
pub fn summarize<'a>(records: impl IntoIterator<Item = &'a Record>) -> Summary {
    let mut lat = Vec::new();
    let mut errors = 0;
    for r in records {
        if !r.ok() {
            errors += 1;
        }
        lat.push(r.latency_ms);
    }
    lat.sort_by(f64::total_cmp);
    Summary {
        requests: lat.len(),
        errors,
        over_100ms: lat.iter().filter(|&&l| l > 100.0).count(),
        over_250ms: lat.iter().filter(|&&l| l > 250.0).count(),
        max_ms: lat.last().copied().unwrap_or(0.0),
        p50_ms: percentile(&lat, 50.0),
        p99_ms: percentile(&lat, 99.0),
    }
}

/// Nearest-rank percentile of sorted values; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(0.0)
}

/// Records due in `[from_ms, to_ms)`, in the order given.
pub fn window(records: &[Record], from_ms: f64, to_ms: f64) -> Vec<&Record> {
    records
        .iter()
        .filter(|r| r.start_ms >= from_ms && r.start_ms < to_ms)
        .collect()
}

/// Time from `from_ms` until the traffic settles: the start of the first
/// request due in `[from_ms, to_ms)` after which every request in that
/// window satisfies `good`, minus `from_ms`. `Some(0)` when every request
/// is good, `None` when the last one is not (never settled) or the window
/// is empty.
///
/// Switch time after a fault on cloud `p`: `good` = a 2xx from another
/// cloud. Return time: `good` = a 2xx from `p`.
pub fn settle_ms(
    records: &[Record],
    from_ms: f64,
    to_ms: f64,
    good: impl Fn(&Record) -> bool,
) -> Option<f64> {
    let mut win = window(records, from_ms, to_ms);
    win.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    match win.iter().rposition(|r| !good(r)) {
        None if win.is_empty() => None,
        None => Some(0.0),
        Some(last_bad) => win.get(last_bad + 1).map(|r| r.start_ms - from_ms),
    }
}

/// How often the serving cloud changes between consecutive (by due time)
/// successful requests in `[from_ms, to_ms)`: 1 for a clean switch, more
/// when traffic flaps.
pub fn switches(records: &[Record], from_ms: f64, to_ms: f64) -> usize {
    let mut win: Vec<&Record> = window(records, from_ms, to_ms)
        .into_iter()
        .filter(|r| r.ok() && r.cloud.is_some())
        .collect();
    win.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    win.windows(2)
        .filter(|w| matches!(w, [a, b] if a.cloud != b.cloud))
        .count()
}

/// Requests per second of due time, per cloud (`error` for failures,
/// `unknown` for a 2xx without the served-by header).
pub fn per_second(records: &[Record]) -> BTreeMap<u64, BTreeMap<String, usize>> {
    let mut out: BTreeMap<u64, BTreeMap<String, usize>> = BTreeMap::new();
    for r in records {
        let cloud = if !r.ok() {
            "error".to_owned()
        } else {
            r.cloud.clone().unwrap_or_else(|| "unknown".to_owned())
        };
        let sec = (r.start_ms.max(0.0) / 1e3) as u64;
        *out.entry(sec).or_default().entry(cloud).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests;
