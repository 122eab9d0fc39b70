//! Dynamic batching for one model version: admit up to `capacity`
//! outstanding requests, coalesce queued requests into one engine run (up
//! to the preferred batch size or until the batching delay ends), run it
//! (inline when it is known to be short, else on a blocking thread) and
//! hand each request its own rows back.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::engine::{Engine, EngineError, Tensor};
use crate::metrics::Metrics;
use crate::model_repo::Batching;
use crate::tensor::Data;

/// Engine runs expected to take at most this long run on the async worker
/// that formed the batch instead of a blocking thread: the hand-off to a
/// blocking thread and back costs two context switches and two wake-ups,
/// more than a small model's whole run (BENCHMARKS.md, "Short runs
/// inline"). Within tokio's guidance for work between two awaits.
const INLINE_MAX: Duration = Duration::from_micros(100);

/// What one row of this version has cost the engine lately (an
/// exponentially weighted mean, in nanoseconds; 0 until the first run).
/// Shared by the version's batches; a lost update between two of them only
/// skews the mean by one sample.
#[derive(Debug, Default)]
struct RowCost(AtomicU64);

impl RowCost {
    /// Whether a run of `rows` rows is expected to be short enough to run
    /// inline. Unknown until a run was timed: the first run goes to a
    /// blocking thread.
    fn inline(&self, rows: usize) -> bool {
        let per_row = self.0.load(Ordering::Relaxed);
        per_row > 0 && per_row.saturating_mul(rows.max(1) as u64) <= INLINE_MAX.as_nanos() as u64
    }

    fn observe(&self, rows: usize, took: Duration) {
        let sample = (took.as_nanos() / rows.max(1) as u128).clamp(1, u64::MAX as u128) as u64;
        let old = self.0.load(Ordering::Relaxed);
        // Never 0 again once a run was timed: sample and old - old/8 are >= 1.
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.0.store(new, Ordering::Relaxed);
    }
}

/// Why a submitted request got no result.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("queue of model {model} version {version} is full")]
    QueueFull { model: String, version: String },
    #[error("model version was unloaded before the request ran")]
    Closed,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// One request's inputs: all share `rows` as their first dimension when
/// the model batches.
struct Job {
    inputs: Vec<Tensor>,
    rows: usize,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Vec<Tensor>, BatchError>>,
    _admission: OwnedSemaphorePermit,
}

/// Handle to a model version's batcher. Dropping every handle lets the
/// batcher finish what is queued and stop.
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    admission: Arc<Semaphore>,
    model: String,
    version: String,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("model", &self.model)
            .finish()
    }
}

/// How one version's requests are grouped.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// 0: the model has no batch dimension; every request runs alone.
    pub max_batch_size: usize,
    pub batching: Option<Batching>,
    /// Requests admitted (queued or running) at most.
    pub capacity: usize,
    /// Engine runs of this version at the same time.
    pub instances: usize,
}

impl Batcher {
    /// Starts the batcher task on the current runtime.
    pub fn spawn(
        engine: Arc<Engine>,
        policy: Policy,
        metrics: Metrics,
        model: &str,
        version: &str,
    ) -> Batcher {
        let capacity = policy.capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let labels = [model.to_string(), version.to_string()];
        tokio::spawn(run_loop(engine, policy, metrics, labels, rx));
        Batcher {
            tx,
            admission: Arc::new(Semaphore::new(capacity)),
            model: model.to_string(),
            version: version.to_string(),
        }
    }

    /// Queues a request and waits for its outputs. Fails at once with
    /// `QueueFull` when `capacity` requests are outstanding.
    pub async fn submit(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
    ) -> Result<Vec<Tensor>, BatchError> {
        let permit =
            self.admission
                .clone()
                .try_acquire_owned()
                .map_err(|_| BatchError::QueueFull {
                    model: self.model.clone(),
                    version: self.version.clone(),
                })?;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            inputs,
            rows,
            enqueued: Instant::now(),
            reply,
            _admission: permit,
        };
        // The channel holds as many jobs as there are permits, so this only
        // fails when the batcher is gone.
        self.tx.try_send(job).map_err(|_| BatchError::Closed)?;
        rx.await.map_err(|_| BatchError::Closed)?
    }
}

async fn run_loop(
    engine: Arc<Engine>,
    policy: Policy,
    metrics: Metrics,
    labels: [String; 2],
    mut rx: mpsc::Receiver<Job>,
) {
    let instances = Arc::new(Semaphore::new(policy.instances.max(1)));
    let cost = Arc::new(RowCost::default());
    let max_rows = policy.max_batch_size.max(1);
    let (preferred, delay) = match (policy.max_batch_size, policy.batching) {
        (0, _) => (1, Duration::ZERO),
        (_, Some(b)) => (b.preferred_batch_size.max(1), b.max_delay),
        // Batching without a delay still coalesces what is already queued.
        (max, None) => (max, Duration::ZERO),
    };
    let mut carry: Option<Job> = None;
    // Set when a batching window closed without a single other request:
    // traffic is sparse, and until then batches start at once instead of
    // making every request wait out the window for nothing.
    let mut sparse_until: Option<Instant> = None;
    loop {
        // Wait for a free engine slot first so that, under load, requests
        // pile up in the queue and form larger batches.
        let Ok(permit) = instances.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        if first.reply.is_closed() {
            continue; // timed out while queued
        }
        let mut rows = first.rows;
        let mut batch = vec![first];
        let mut window = Window::new(delay);
        let (mut waited, mut gained) = (false, false);
        while rows < preferred && policy.max_batch_size > 0 {
            let next = match rx.try_recv() {
                Ok(j) => Some(j),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) if delay.is_zero() => None,
                Err(mpsc::error::TryRecvError::Empty)
                    if sparse_until.is_some_and(|t| Instant::now() < t) =>
                {
                    None
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    waited = true;
                    let j = window.recv(&mut rx).await;
                    gained |= j.is_some();
                    j
                }
            };
            let Some(job) = next else { break };
            if job.reply.is_closed() {
                continue;
            }
            if rows + job.rows > max_rows {
                carry = Some(job);
                break;
            }
            rows += job.rows;
            batch.push(job);
        }
        if waited {
            sparse_until = (!gained).then(|| Instant::now() + SPARSE_PROBE);
        } else if batch.len() > 1 {
            // Requests were already queued together: traffic is dense.
            sparse_until = None;
        }
        let engine = engine.clone();
        let metrics = metrics.clone();
        let labels = labels.clone();
        let batched = policy.max_batch_size > 0;
        let cost = cost.clone();
        tokio::spawn(async move {
            run_batch(engine, batch, rows, batched, &cost, &metrics, &labels).await;
            drop(permit);
        });
    }
}

/// How long a window that caught nothing keeps batches from waiting; the
/// first batch after it waits again, so a traffic change is noticed.
const SPARSE_PROBE: Duration = Duration::from_secs(1);

/// tokio's timer has a resolution of one millisecond: a 200 µs
/// `timeout_at` lasts 1 to 2 ms. Windows shorter than this are timed by a
/// sleeping blocking thread instead (about 50 µs late at worst).
const COARSE_TIMER: Duration = Duration::from_millis(2);

/// The batching window of one batch: ends at `deadline`.
struct Window {
    deadline: Instant,
    delay: Duration,
    /// The precise timer of a short window, started on first use.
    sleeper: Option<tokio::task::JoinHandle<()>>,
}

impl Window {
    fn new(delay: Duration) -> Window {
        Window {
            deadline: Instant::now() + delay,
            delay,
            sleeper: None,
        }
    }

    /// The next job, or `None` once the window is over (or the channel
    /// closed).
    async fn recv(&mut self, rx: &mut mpsc::Receiver<Job>) -> Option<Job> {
        if self.delay >= COARSE_TIMER {
            return tokio::time::timeout_at(self.deadline, rx.recv())
                .await
                .ok()
                .flatten();
        }
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return None;
        }
        let sleeper = self.sleeper.get_or_insert_with(|| {
            tokio::task::spawn_blocking(move || std::thread::sleep(remaining))
        });
        tokio::select! {
            biased;
            j = rx.recv() => j,
            _ = sleeper => {
                // Done: later calls see a zero `remaining` and stop.
                self.deadline = Instant::now();
                None
            }
        }
    }
}

async fn run_batch(
    engine: Arc<Engine>,
    batch: Vec<Job>,
    rows: usize,
    batched: bool,
    cost: &RowCost,
    metrics: &Metrics,
    labels: &[String; 2],
) {
    let labels = [labels[0].as_str(), labels[1].as_str()];
    let now = Instant::now();
    for job in &batch {
        metrics
            .queue_duration
            .with_label_values(&labels)
            .observe(now.duration_since(job.enqueued).as_secs_f64());
    }
    metrics
        .batch_size
        .with_label_values(&labels)
        .observe(rows as f64);

    let mut replies = Vec::with_capacity(batch.len());
    let mut row_counts = Vec::with_capacity(batch.len());
    let inputs = if batch.len() == 1 {
        let mut batch = batch;
        let Some(job) = batch.pop() else { return };
        replies.push(job.reply);
        row_counts.push(job.rows);
        job.inputs
    } else {
        let n_inputs = batch.first().map_or(0, |j| j.inputs.len());
        let mut merged = Vec::with_capacity(n_inputs);
        for i in 0..n_inputs {
            let parts: Vec<&Data> = batch
                .iter()
                .filter_map(|j| j.inputs.get(i))
                .map(|t| &t.data)
                .collect();
            let Some(first) = batch.first().and_then(|j| j.inputs.get(i)) else {
                return;
            };
            let mut shape = first.shape.clone();
            if let Some(d0) = shape.first_mut() {
                *d0 = rows;
            }
            match Data::concat(&parts) {
                Ok(data) => merged.push(Tensor { shape, data }),
                Err(e) => {
                    let msg = e.to_string();
                    for job in batch {
                        let _ = job.reply.send(Err(EngineError::Output(msg.clone()).into()));
                    }
                    return;
                }
            }
        }
        for job in batch {
            replies.push(job.reply);
            row_counts.push(job.rows);
        }
        merged
    };

    let started = std::time::Instant::now();
    let result = if cost.inline(rows) {
        std::panic::catch_unwind(AssertUnwindSafe(|| engine.run(inputs))).map_err(|_| ())
    } else {
        tokio::task::spawn_blocking(move || engine.run(inputs))
            .await
            .map_err(|_| ())
    };
    let took = started.elapsed();
    if matches!(result, Ok(Ok(_))) {
        cost.observe(rows, took);
    }
    metrics
        .compute_duration
        .with_label_values(&labels)
        .observe(took.as_secs_f64());
    let outputs = match result {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            let msg = e.to_string();
            tracing::warn!(model = labels[0], version = labels[1], error = ?e, "engine run failed");
            for r in replies {
                let _ = r.send(Err(EngineError::Output(msg.clone()).into()));
            }
            return;
        }
        Err(_) => {
            tracing::error!(
                model = labels[0],
                version = labels[1],
                "engine run panicked"
            );
            for r in replies {
                let _ = r.send(Err(EngineError::Output("engine run panicked".into()).into()));
            }
            return;
        }
    };
    if replies.len() == 1 && !batched {
        if let Some(r) = replies.pop() {
            let _ = r.send(Ok(outputs));
        }
        return;
    }
    let split = split_rows(&outputs, &row_counts, rows);
    match split {
        Ok(per_job) => {
            for (r, out) in replies.into_iter().zip(per_job) {
                let _ = r.send(Ok(out));
            }
        }
        Err(msg) => {
            tracing::error!(model = labels[0], version = labels[1], reason = %msg, "cannot split batch");
            for r in replies {
                let _ = r.send(Err(EngineError::Output(msg.clone()).into()));
            }
        }
    }
}

/// Splits batched outputs by rows; every output must have `rows` as its
/// first dimension.
fn split_rows(
    outputs: &[Tensor],
    row_counts: &[usize],
    rows: usize,
) -> Result<Vec<Vec<Tensor>>, String> {
    let mut per_job: Vec<Vec<Tensor>> = row_counts
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for out in outputs {
        if out.shape.first() != Some(&rows) {
            return Err(format!(
                "output shape {:?} does not start with the batch size {rows}",
                out.shape
            ));
        }
        let row_len: usize = out.shape.iter().skip(1).product();
        let mut start = 0;
        for (job, n) in per_job.iter_mut().zip(row_counts) {
            let end = start + n * row_len;
            let mut shape = out.shape.clone();
            if let Some(d0) = shape.first_mut() {
                *d0 = *n;
            }
            job.push(Tensor {
                shape,
                data: out.data.slice(start, end),
            });
            start = end;
        }
    }
    Ok(per_job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_runs_known_to_be_short_go_inline() {
        let cost = RowCost::default();
        assert!(!cost.inline(1), "no run timed yet: blocking thread");
        cost.observe(4, Duration::from_micros(40)); // 10 us a row
        assert!(cost.inline(1));
        assert!(cost.inline(10));
        assert!(!cost.inline(11), "11 rows x 10 us is over the inline limit");
        // A slow run moves the mean an eighth of the way: 10 -> ~134 us a
        // row, and nothing goes inline any more.
        cost.observe(1, Duration::from_millis(1));
        assert!(!cost.inline(1));
        // Fast runs bring it back down.
        for _ in 0..40 {
            cost.observe(1, Duration::from_micros(5));
        }
        assert!(cost.inline(1));
    }

    #[test]
    fn split_rows_hands_each_request_its_rows() {
        let out = Tensor {
            shape: vec![3, 2],
            data: Data::F32(vec![0., 1., 2., 3., 4., 5.]),
        };
        let label = Tensor {
            shape: vec![3],
            data: Data::I64(vec![7, 8, 9]),
        };
        let split = split_rows(&[out, label], &[1, 2], 3).unwrap();
        assert_eq!(split[0][0].data, Data::F32(vec![0., 1.]));
        assert_eq!(split[1][0].shape, vec![2, 2]);
        assert_eq!(split[1][0].data, Data::F32(vec![2., 3., 4., 5.]));
        assert_eq!(split[1][1].data, Data::I64(vec![8, 9]));
        let bad = Tensor {
            shape: vec![1, 2],
            data: Data::F32(vec![0., 1.]),
        };
        assert!(split_rows(&[bad], &[1, 2], 3).is_err());
    }
}
