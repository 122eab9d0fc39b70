//! A model repository in object storage (S3, GCS, Azure Blob), mirrored
//! into a local cache directory that the ordinary loader
//! ([`crate::registry`]) reads. The layout under the URL's prefix is the
//! local one: `<model>/config.json`, `<model>/<version>/<file>`.
//!
//! A sync pass lists the prefix, checks the limits, downloads what changed
//! (temp file, size and ETag checked, then renamed into place; a bounded
//! number in parallel), deletes what left the store, and says which models
//! changed. Errors name the URL and never carry credentials.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme, RetryConfig};
use tokio::io::AsyncWriteExt;
use url::Url;

use crate::api::AppState;
use crate::metrics::Metrics;
use crate::model_repo;
use crate::registry::Registry;

/// Marks a directory as a cache this sidecar may prune.
pub const CACHE_MARKER: &str = ".infermesh-cache";
use crate::model_repo::UNAVAILABLE_MARKER;
const PARTIAL_DIR: &str = ".partial";
/// Downloads running at once.
pub const PARALLEL_DOWNLOADS: usize = 4;

/// Which cloud a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    S3,
    Gcs,
    Azure,
}

/// A parsed repository URL.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreUrl {
    pub cloud: Cloud,
    /// What the builder is given (GCS https forms become `gs://`).
    target: String,
    /// The URL without query string or user info: safe to log.
    pub display: String,
    /// Objects under this prefix form the repository.
    pub prefix: StorePath,
    /// Query pairs of a pasted Azure SAS URL.
    sas: Vec<(String, String)>,
}

/// Whether a `--model-repository` value is a URL rather than a path.
pub fn is_url(value: &str) -> bool {
    value.contains("://")
}

/// `value` without query string and user info, for messages.
pub fn shown(value: &str) -> String {
    let no_query = value.split(['?', '#']).next().unwrap_or_default();
    match no_query.split_once("://") {
        Some((scheme, rest)) => {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = host.rsplit('@').next().unwrap_or_default();
            let sep = if rest.contains('/') { "/" } else { "" };
            format!("{scheme}://{host}{sep}{path}")
        }
        None => no_query.to_string(),
    }
}

/// Parses `s3://`, `gs://`, `az://` URLs and the clouds' https forms.
pub fn parse_url(value: &str) -> Result<StoreUrl, String> {
    const EXPECTED: &str = "use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX \
         or the cloud's https URL";
    let mut url = Url::parse(value).map_err(|e| format!("is not a URL ({e})"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials (use the environment)".into());
    }
    let sas: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.set_query(None);
    url.set_fragment(None);
    let display = url.to_string();
    // GCS's https forms are not known to the library: rewrite them.
    if url.scheme() == "https"
        && matches!(
            url.host_str(),
            Some("storage.googleapis.com" | "storage.cloud.google.com")
        )
    {
        let path = url.path().trim_start_matches('/').to_string();
        url = Url::parse(&format!("gs://{path}")).map_err(|_| EXPECTED.to_string())?;
    }
    let (scheme, prefix) = ObjectStoreScheme::parse(&url).map_err(|_| EXPECTED.to_string())?;
    let cloud = match scheme {
        ObjectStoreScheme::AmazonS3 => Cloud::S3,
        ObjectStoreScheme::GoogleCloudStorage => Cloud::Gcs,
        ObjectStoreScheme::MicrosoftAzure => Cloud::Azure,
        _ => return Err(EXPECTED.into()),
    };
    if !sas.is_empty() && cloud != Cloud::Azure {
        return Err("must not carry a query string".into());
    }
    Ok(StoreUrl {
        cloud,
        target: url.to_string(),
        display,
        prefix,
        sas,
    })
}

/// Limits of one mirror.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncLimits {
    /// An object above this is not downloaded; its version is unavailable.
    pub max_object_bytes: u64,
    /// A repository above this is not synced at all.
    pub max_total_bytes: u64,
}

/// Why a sync pass failed. Messages name the URL, never a secret.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SyncError {
    #[error("model repository {url}: {reason}")]
    Store { url: String, reason: String },
    #[error("model repository {0}: no model directories under this prefix")]
    Empty(String),
    #[error(
        "model repository {url}: {total} bytes in total, over the limit of {limit} \
         (--repository-max-bytes)"
    )]
    TooLarge { url: String, total: u64, limit: u64 },
    #[error("model repository cache {0}: {1}")]
    Cache(String, String),
}

/// What a successful pass changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SyncReport {
    /// Models whose files changed, appeared, or got a new problem.
    pub changed: BTreeSet<String>,
    /// Models that left the store.
    pub removed: BTreeSet<String>,
    /// Per changed model: versions whose files changed (`None`: the config
    /// changed, every version must reload).
    pub versions: BTreeMap<String, Option<BTreeSet<u64>>>,
    pub downloaded_bytes: u64,
    pub models: usize,
}

#[derive(Debug, Clone, PartialEq)]
struct Stamp {
    size: u64,
    e_tag: Option<String>,
}

/// One object of the repository, relative to the prefix.
#[derive(Debug, Clone)]
struct Entry {
    location: StorePath,
    /// `<model>/config.json` or `<model>/<version>/<file>`.
    rel: String,
    model: String,
    version: Option<u64>,
    stamp: Stamp,
}

/// Mirrors a bucket prefix into a cache directory.
pub struct Mirror {
    url: StoreUrl,
    store: Arc<dyn ObjectStore>,
    cache: PathBuf,
    limits: SyncLimits,
    /// What the cache holds, as the store described it.
    known: HashMap<String, Stamp>,
    /// Problem markers written, by `<model>/<version>`.
    problems: HashMap<String, String>,
    /// Changes of failed passes, reported by the next good one.
    pending: SyncReport,
    seq: AtomicU64,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("url", &self.url.display)
            .finish()
    }
}

impl Mirror {
    /// Builds the store client from the environment and prepares `cache`
    /// (created if missing; must be empty or a cache of ours).
    pub fn new(url: StoreUrl, cache: PathBuf, limits: SyncLimits) -> Result<Mirror, SyncError> {
        let store =
            build_store(&url, |k| std::env::var(k).ok()).map_err(|reason| SyncError::Store {
                url: url.display.clone(),
                reason,
            })?;
        prepare_cache(&cache)?;
        Ok(Mirror {
            url,
            store,
            cache,
            limits,
            known: HashMap::new(),
            problems: HashMap::new(),
            pending: SyncReport::default(),
            seq: AtomicU64::new(0),
        })
    }

    pub fn url(&self) -> &str {
        &self.url.display
    }

    pub fn cache(&self) -> &FsPath {
        &self.cache
    }

    fn store_error(&self, e: &object_store::Error) -> SyncError {
        SyncError::Store {
            url: self.url.display.clone(),
            reason: describe(e),
        }
    }

    /// One pass: list, check, download, prune. On error the cache keeps
    /// whole files only and the changes are reported by the next good pass.
    pub async fn sync(&mut self) -> Result<SyncReport, SyncError> {
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&self.url.prefix))
            .try_collect()
            .await
            .map_err(|e| self.store_error(&e))?;
        let entries: Vec<Entry> = listed
            .into_iter()
            .filter_map(|m| classify(&self.url.prefix, m))
            .collect();
        let models: BTreeSet<String> = entries.iter().map(|e| e.model.clone()).collect();
        if models.is_empty() {
            return Err(SyncError::Empty(self.url.display.clone()));
        }
        // Objects over the per-object limit are never downloaded: they do
        // not count (their version is reported unavailable instead).
        let total: u64 = entries
            .iter()
            .map(|e| e.stamp.size)
            .filter(|size| *size <= self.limits.max_object_bytes)
            .sum();
        if total > self.limits.max_total_bytes {
            return Err(SyncError::TooLarge {
                url: self.url.display.clone(),
                total,
                limit: self.limits.max_total_bytes,
            });
        }
        let mut report = std::mem::take(&mut self.pending);
        let result = self.apply(&entries, &mut report).await;
        report.models = models.len();
        for m in &models {
            report.removed.remove(m);
        }
        match result {
            Ok(()) => Ok(report),
            Err(e) => {
                report.downloaded_bytes = 0;
                self.pending = report;
                Err(e)
            }
        }
    }

    async fn apply(&mut self, entries: &[Entry], report: &mut SyncReport) -> Result<(), SyncError> {
        let changed_version = |report: &mut SyncReport, model: &str, v: Option<u64>| {
            report.changed.insert(model.to_string());
            let slot = report
                .versions
                .entry(model.to_string())
                .or_insert_with(|| Some(BTreeSet::new()));
            match (slot.as_mut(), v) {
                (Some(set), Some(v)) => {
                    set.insert(v);
                }
                (_, None) => *slot = None,
                (None, Some(_)) => {}
            }
        };
        // Over-limit objects make their version (or model) unavailable.
        let mut problems: HashMap<String, String> = HashMap::new();
        for e in entries {
            if e.stamp.size > self.limits.max_object_bytes {
                let unit = match e.version {
                    Some(v) => format!("{}/{v}", e.model),
                    None => e.model.clone(),
                };
                problems.entry(unit).or_insert_with(|| {
                    format!(
                        "object {}{} is {} bytes, over the limit of {} (--repository-max-object-bytes)",
                        self.url.display.trim_end_matches('/').to_string() + "/",
                        e.rel,
                        e.stamp.size,
                        self.limits.max_object_bytes
                    )
                });
            }
        }
        let blocked = |e: &Entry| {
            problems.contains_key(&e.model)
                || e.version
                    .is_some_and(|v| problems.contains_key(&format!("{}/{v}", e.model)))
        };
        let todo: Vec<&Entry> = entries
            .iter()
            .filter(|e| !blocked(e))
            .filter(|e| {
                self.known.get(&e.rel) != Some(&e.stamp) || !self.cache.join(&e.rel).is_file()
            })
            .collect();
        let partial = self.cache.join(PARTIAL_DIR);
        let fetch = Fetch {
            store: self.store.clone(),
            display: self.url.display.clone(),
            cache: self.cache.clone(),
        };
        let jobs: Vec<_> = todo
            .iter()
            .map(|e| {
                let tmp = partial.join(format!("{}", self.seq.fetch_add(1, Ordering::Relaxed)));
                fetch.clone().download((*e).clone(), tmp)
            })
            .collect();
        let results: Vec<Result<u64, SyncError>> = futures::stream::iter(jobs)
            .buffer_unordered(PARALLEL_DOWNLOADS)
            .collect()
            .await;
        // Record what did land before reporting a failure.
        let mut first_error = None;
        for (e, r) in todo.iter().zip(results) {
            match r {
                Ok(bytes) => {
                    report.downloaded_bytes += bytes;
                    self.known.insert(e.rel.clone(), e.stamp.clone());
                    changed_version(report, &e.model, e.version);
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        // Problem markers: the loader shows them as the reason.
        for (unit, reason) in &problems {
            if self.problems.get(unit) != Some(reason) {
                let dir = self.cache.join(unit);
                if unit.contains('/') {
                    let _ = std::fs::remove_dir_all(&dir);
                } else {
                    let _ = std::fs::remove_file(dir.join("config.json"));
                }
                std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(dir.join(UNAVAILABLE_MARKER), reason))
                    .map_err(|e| self.cache_error(e))?;
                if unit.contains('/') {
                    self.known
                        .retain(|k, _| !k.starts_with(&format!("{unit}/")));
                } else {
                    self.known.remove(&format!("{unit}/config.json"));
                }
                let (model, v) = split_unit(unit);
                changed_version(report, &model, v);
            }
        }
        for unit in self.problems.keys() {
            if !problems.contains_key(unit) {
                let _ = std::fs::remove_file(self.cache.join(unit).join(UNAVAILABLE_MARKER));
                let (model, v) = split_unit(unit);
                changed_version(report, &model, v);
            }
        }
        self.problems = problems;
        if let Some(e) = first_error {
            return Err(e);
        }
        // Prune what left the store.
        let wanted: BTreeSet<&str> = entries.iter().map(|e| e.rel.as_str()).collect();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|k| !wanted.contains(k.as_str()))
            .cloned()
            .collect();
        for rel in gone {
            self.known.remove(&rel);
            let _ = std::fs::remove_file(self.cache.join(&rel));
            let mut parts = rel.split('/');
            let model = parts.next().unwrap_or_default().to_string();
            let version = parts.next().and_then(model_repo::parse_version);
            let version = if rel.ends_with("/config.json") && rel.matches('/').count() == 1 {
                None
            } else {
                version
            };
            changed_version(report, &model, version);
        }
        let present: BTreeSet<String> = entries.iter().map(|e| e.model.clone()).collect();
        self.prune(&wanted, &present, report)
    }

    /// Removes files and directories of the cache that the store no longer
    /// has (also leftovers of an earlier run).
    fn prune(
        &self,
        wanted: &BTreeSet<&str>,
        present: &BTreeSet<String>,
        report: &mut SyncReport,
    ) -> Result<(), SyncError> {
        let read = |dir: &FsPath| -> Vec<(String, PathBuf, bool)> {
            std::fs::read_dir(dir)
                .map(|it| {
                    it.filter_map(Result::ok)
                        .filter_map(|e| {
                            let name = e.file_name().into_string().ok()?;
                            let dir = e.file_type().ok()?.is_dir();
                            Some((name, e.path(), dir))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        for (model, path, is_dir) in read(&self.cache) {
            if model == CACHE_MARKER || model == PARTIAL_DIR {
                continue;
            }
            if !is_dir || !present.contains(&model) {
                remove_any(&path, is_dir);
                if is_dir {
                    report.removed.insert(model.clone());
                }
                continue;
            }
            for (name, path, is_dir) in read(&path) {
                let rel = format!("{model}/{name}");
                if !is_dir {
                    let marker = name == UNAVAILABLE_MARKER && self.problems.contains_key(&model);
                    if !marker && !wanted.contains(rel.as_str()) {
                        remove_any(&path, false);
                    }
                    continue;
                }
                let marked = self.problems.contains_key(&rel);
                let mut keep = 0;
                for (file, fpath, fdir) in read(&path) {
                    let frel = format!("{rel}/{file}");
                    if (marked && file == UNAVAILABLE_MARKER)
                        || (!fdir && wanted.contains(frel.as_str()))
                    {
                        keep += 1;
                    } else {
                        remove_any(&fpath, fdir);
                    }
                }
                if keep == 0 {
                    remove_any(&path, true);
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.cache.join(PARTIAL_DIR));
        Ok(())
    }

    fn cache_error(&self, e: std::io::Error) -> SyncError {
        cache_error(&self.cache, e)
    }
}

fn cache_error(cache: &FsPath, e: std::io::Error) -> SyncError {
    SyncError::Cache(cache.display().to_string(), e.to_string())
}

/// Where and how to fetch: owned, so downloads run as `'static` futures.
#[derive(Clone)]
struct Fetch {
    store: Arc<dyn ObjectStore>,
    display: String,
    cache: PathBuf,
}

impl Fetch {
    fn cache_error(&self, e: std::io::Error) -> SyncError {
        cache_error(&self.cache, e)
    }

    /// Streams one object to `tmp`, checks it, renames it into place.
    async fn download(self, e: Entry, tmp: PathBuf) -> Result<u64, SyncError> {
        let result = self.download_inner(&e, &tmp).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn download_inner(&self, e: &Entry, tmp: &FsPath) -> Result<u64, SyncError> {
        let at = |reason: String| SyncError::Store {
            url: format!("{}/{}", self.display.trim_end_matches('/'), e.rel),
            reason,
        };
        if let Some(dir) = tmp.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|err| self.cache_error(err))?;
        }
        let got = self
            .store
            .get(&e.location)
            .await
            .map_err(|err| at(describe(&err)))?;
        // Lists and GETs quote ETags differently on some stores.
        let tag = |t: &Option<String>| {
            t.as_deref()
                .map(|t| t.trim_start_matches("W/").trim_matches('"').to_string())
        };
        if let (Some(listed), Some(now)) = (tag(&e.stamp.e_tag), tag(&got.meta.e_tag)) {
            if listed != now {
                return Err(at("changed while syncing; retried on the next poll".into()));
            }
        }
        let mut file = tokio::fs::File::create(tmp)
            .await
            .map_err(|err| self.cache_error(err))?;
        let mut stream = got.into_stream();
        let mut written: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| at(describe(&err)))?;
            written += chunk.len() as u64;
            if written > e.stamp.size {
                return Err(at(format!("longer than the {} bytes listed", e.stamp.size)));
            }
            file.write_all(&chunk)
                .await
                .map_err(|err| self.cache_error(err))?;
        }
        if written != e.stamp.size {
            return Err(at(format!(
                "{written} bytes received, {} listed",
                e.stamp.size
            )));
        }
        file.sync_all().await.map_err(|err| self.cache_error(err))?;
        drop(file);
        let dest = self.cache.join(&e.rel);
        if let Some(dir) = dest.parent() {
            // A problem marker of an earlier pass goes with the problem.
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|err| self.cache_error(err))?;
        }
        tokio::fs::rename(tmp, &dest)
            .await
            .map_err(|err| self.cache_error(err))?;
        Ok(written)
    }
}

fn split_unit(unit: &str) -> (String, Option<u64>) {
    match unit.split_once('/') {
        Some((m, v)) => (m.to_string(), model_repo::parse_version(v)),
        None => (unit.to_string(), None),
    }
}

fn remove_any(path: &FsPath, is_dir: bool) {
    let _ = if is_dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}

/// Keeps `<model>/config.json` and `<model>/<version>/<file>` with safe
/// names; everything else under the prefix is ignored.
fn classify(prefix: &StorePath, meta: object_store::ObjectMeta) -> Option<Entry> {
    let parts: Vec<String> = meta
        .location
        .prefix_match(prefix)?
        .map(|p| p.as_ref().to_string())
        .collect();
    let safe = |s: &str| model_repo::validate_name(s).is_ok();
    let (model, version) = match parts.as_slice() {
        [m, f] if f == "config.json" && safe(m) => (m.clone(), None),
        [m, v, f] if safe(m) && safe(f) => (m.clone(), Some(model_repo::parse_version(v)?)),
        _ => return None,
    };
    Some(Entry {
        rel: parts.join("/"),
        location: meta.location,
        model,
        version,
        stamp: Stamp {
            size: meta.size,
            e_tag: meta.e_tag,
        },
    })
}

/// The cache must be empty or carry our marker: pruning never touches a
/// directory the user cared about.
fn prepare_cache(cache: &FsPath) -> Result<(), SyncError> {
    let err = |reason: String| SyncError::Cache(cache.display().to_string(), reason);
    std::fs::create_dir_all(cache).map_err(|e| err(e.to_string()))?;
    let marker = cache.join(CACHE_MARKER);
    if !marker.is_file() {
        let mut entries = std::fs::read_dir(cache).map_err(|e| err(e.to_string()))?;
        if entries.next().is_some() {
            return Err(err(format!(
                "is not empty and not a model cache (no {CACHE_MARKER} file)"
            )));
        }
        std::fs::write(&marker, b"infermesh-sidecar model repository cache\n")
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

/// A short reason for a store error: the HTTP status and the store's own
/// error code and message when there is one, with a hint; never a query
/// string (Azure SAS) or a secret.
fn describe(e: &object_store::Error) -> String {
    let mut text = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        source = s.source();
    }
    let text = redact(&text);
    let between = |open: &str, close: &str| -> Option<String> {
        let start = text.find(open)? + open.len();
        let end = text[start..].find(close)? + start;
        Some(
            text[start..end]
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
        )
    };
    let status: Option<u16> = text
        .find("status code: ")
        .and_then(|i| text[i + 13..].get(..3))
        .and_then(|s| s.parse().ok());
    let hint = match status {
        Some(404) => "not found (check the bucket or container name)",
        Some(401) => "not authenticated (check the credentials)",
        Some(403) => "access denied (check the credentials and their permissions)",
        Some(_) => "the store refused the request",
        None if matches!(e, object_store::Error::NotFound { .. }) => "not found",
        None => "",
    };
    let detail = match (
        between("<Code>", "</Code>"),
        between("<Message>", "</Message>"),
    ) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code,
        _ => between("\"message\":\"", "\"").unwrap_or_default(),
    };
    match status {
        Some(code) => format!("{hint}: HTTP {code} {detail}")
            .trim_end()
            .to_string(),
        None if hint.is_empty() => text.chars().take(400).collect(),
        None => format!("{hint}: {}", text.chars().take(400).collect::<String>()),
    }
}

/// Environment variables whose values must never reach a log line.
const SECRET_VARS: &[&str] = &[
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
];

/// Drops query strings of URLs in `text` and any secret variable's value.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_url = false;
    let mut in_query = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_url && (rest.starts_with("http://") || rest.starts_with("https://")) {
            in_url = true;
        }
        if in_url && (c.is_whitespace() || c == '"' || c == '\'' || c == ')') {
            in_url = false;
            in_query = false;
        }
        if in_url && c == '?' && !in_query {
            in_query = true;
            out.push_str("?<redacted>");
        }
        if !in_query {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    for var in SECRET_VARS {
        if let Ok(v) = std::env::var(var) {
            if v.len() >= 4 {
                out = out.replace(&v, "<redacted>");
            }
        }
    }
    out
}

/// Retries within one request stay short: the poll loop retries passes.
fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

fn build_store<F>(url: &StoreUrl, env: F) -> Result<Arc<dyn ObjectStore>, String>
where
    F: Fn(&str) -> Option<String>,
{
    let http = |endpoint: Option<String>| endpoint.is_some_and(|e| e.starts_with("http://"));
    let store: Arc<dyn ObjectStore> = match url.cloud {
        Cloud::S3 => {
            let mut b = AmazonS3Builder::from_env().with_url(&url.target);
            if let Some(region) = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")) {
                b = b.with_region(region);
            }
            if http(b.get_config_value(&AmazonS3ConfigKey::Endpoint)) {
                b = b.with_allow_http(true);
            }
            Arc::new(b.with_retry(retry()).build().map_err(|e| describe(&e))?)
        }
        Cloud::Gcs => {
            let mut b = GoogleCloudStorageBuilder::from_env().with_url(&url.target);
            // The variable Google's own clients honour for emulators.
            if let Some(host) = env("STORAGE_EMULATOR_HOST") {
                let base = if host.contains("://") {
                    host
                } else {
                    format!("http://{host}")
                };
                // No OAuth towards an emulator (and no metadata server).
                let key = serde_json::json!({
                    "gcs_base_url": base.trim_end_matches('/'),
                    "disable_oauth": true,
                    "client_email": "",
                    "private_key": "",
                    "private_key_id": "",
                });
                b = b
                    .with_service_account_key(key.to_string())
                    .with_client_options(object_store::ClientOptions::new().with_allow_http(true));
            }
            Arc::new(b.with_retry(retry()).build().map_err(|e| describe(&e))?)
        }
        Cloud::Azure => {
            let mut b = MicrosoftAzureBuilder::from_env().with_url(&url.target);
            if let Some(cs) = env("AZURE_STORAGE_CONNECTION_STRING") {
                b = apply_connection_string(b, &cs)?;
            }
            if !url.sas.is_empty() {
                b = b.with_sas_authorization(url.sas.clone());
            }
            Arc::new(b.with_retry(retry()).build().map_err(|e| describe(&e))?)
        }
    };
    Ok(store)
}

/// `AccountName=..;AccountKey=..;BlobEndpoint=..;SharedAccessSignature=..`
fn apply_connection_string(
    mut b: MicrosoftAzureBuilder,
    cs: &str,
) -> Result<MicrosoftAzureBuilder, String> {
    use object_store::azure::AzureConfigKey as K;
    for part in cs.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err("AZURE_STORAGE_CONNECTION_STRING: a part is not KEY=VALUE".into());
        };
        b = match key {
            "AccountName" => b.with_account(value),
            "AccountKey" => b.with_access_key(value),
            "SharedAccessSignature" => b.with_config(K::SasKey, value),
            "BlobEndpoint" => {
                let b = b.with_endpoint(value.trim_end_matches('/').to_string());
                if value.starts_with("http://") {
                    b.with_allow_http(true)
                } else {
                    b
                }
            }
            "UseDevelopmentStorage" if value.eq_ignore_ascii_case("true") => {
                b.with_use_emulator(true)
            }
            _ => b,
        };
    }
    Ok(b)
}

/// Runs a pass and records it in the metrics.
async fn timed_sync(mirror: &mut Mirror, metrics: &Metrics) -> Result<SyncReport, SyncError> {
    let start = std::time::Instant::now();
    let result = mirror.sync().await;
    metrics.sync_duration.observe(start.elapsed().as_secs_f64());
    match &result {
        Ok(report) => {
            metrics.sync_bytes.inc_by(report.downloaded_bytes);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            metrics.sync_last_success.set(now);
        }
        Err(_) => metrics.sync_failures.inc(),
    }
    result
}

/// First sync (retried with backoff; readiness stays false and says why),
/// then loads every model and polls, applying each change through the
/// registry: changed versions load and swap in, versions that left the
/// store or the policy are unloaded once their requests finish.
pub async fn run(mut mirror: Mirror, state: Arc<AppState>) {
    let poll = state.settings.repository_poll;
    let metrics = state.metrics.clone();
    let mut backoff = Duration::from_millis(500);
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        match timed_sync(&mut mirror, &metrics).await {
            Ok(report) => {
                tracing::info!(
                    url = %mirror.url(),
                    models = report.models,
                    bytes = report.downloaded_bytes,
                    "model repository synced"
                );
                break;
            }
            Err(e) => {
                tracing::warn!(
                    attempt,
                    retry_in_ms = backoff.as_millis() as u64,
                    error = %e,
                    "model repository sync failed"
                );
                *lock(&state.repository_error) = Some(e.to_string());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(poll).min(MAX_BACKOFF);
            }
        }
    }
    if let Err(e) = state.registry.load_all().await {
        tracing::error!(error = %e, "model repository cache scan failed");
    }
    *lock(&state.repository_error) = None;
    state.loaded.store(true, Ordering::SeqCst);
    tracing::info!("startup model load finished");
    loop {
        tokio::time::sleep(poll).await;
        match timed_sync(&mut mirror, &metrics).await {
            Ok(report) => apply_report(&state.registry, report).await,
            Err(e) => {
                tracing::warn!(error = %e, "model repository sync failed; serving what is loaded")
            }
        }
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn apply_report(registry: &Registry, report: SyncReport) {
    for model in &report.removed {
        if registry.unload(model).await.is_ok() {
            tracing::info!(model = %model, "model left the repository");
        }
    }
    for model in &report.changed {
        if report.removed.contains(model) {
            continue;
        }
        let keep: BTreeSet<u64> = match report.versions.get(model) {
            Some(Some(changed)) => registry
                .versions(model)
                .iter()
                .filter_map(|v| model_repo::parse_version(v))
                .filter(|v| !changed.contains(v))
                .collect(),
            _ => BTreeSet::new(),
        };
        match registry.load_keeping(model, &keep).await {
            Ok(versions) => {
                tracing::info!(model = %model, versions = ?versions, "model updated from the repository")
            }
            Err(e) => {
                tracing::warn!(model = %model, error = %e, "model update failed; serving what is loaded")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_cloud_and_its_https_forms() {
        let cases = [
            ("s3://bucket/models", Cloud::S3, "models"),
            ("s3://bucket", Cloud::S3, ""),
            (
                "https://bucket.s3.eu-west-1.amazonaws.com/a/b",
                Cloud::S3,
                "a/b",
            ),
            (
                "https://s3.eu-west-1.amazonaws.com/bucket/a/b",
                Cloud::S3,
                "a/b",
            ),
            ("gs://bucket/p", Cloud::Gcs, "p"),
            (
                "https://storage.googleapis.com/bucket/p/q",
                Cloud::Gcs,
                "p/q",
            ),
            ("az://container/p", Cloud::Azure, "p"),
            (
                "https://acct.blob.core.windows.net/container/p",
                Cloud::Azure,
                "p",
            ),
        ];
        for (url, cloud, prefix) in cases {
            let u = parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(u.cloud, cloud, "{url}");
            assert_eq!(u.prefix.as_ref(), prefix, "{url}");
        }
        let gcs = parse_url("https://storage.googleapis.com/bucket/p").unwrap();
        assert_eq!(gcs.target, "gs://bucket/p");
    }

    #[test]
    fn rejects_other_urls_and_hides_sas() {
        for bad in [
            "ftp://x/y",
            "http://example.com/x",
            "s3://key:secret@bucket/p",
            "s3://bucket/p?token=x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let u = parse_url("https://acct.blob.core.windows.net/c/p?sv=1&sig=SECRET").unwrap();
        assert!(!u.display.contains("SECRET"), "{}", u.display);
        assert_eq!(u.sas.len(), 2);
    }

    #[test]
    fn redacts_query_strings() {
        let s = redact("Error GET https://a.blob.core.windows.net/c/x?sig=SECRET&sv=2 failed");
        assert_eq!(
            s,
            "Error GET https://a.blob.core.windows.net/c/x?<redacted> failed"
        );
    }

    #[test]
    fn connection_string_parts_must_be_key_value() {
        let b = MicrosoftAzureBuilder::new();
        assert!(apply_connection_string(b, "AccountName=a;garbage").is_err());
        let b = MicrosoftAzureBuilder::new().with_container_name("c");
        let b = apply_connection_string(
            b,
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net",
        )
        .unwrap();
        assert!(b.build().is_ok());
    }

    #[test]
    fn keeps_only_repository_layout_objects() {
        let prefix = StorePath::from("p");
        let meta = |loc: &str| object_store::ObjectMeta {
            location: StorePath::from(loc),
            last_modified: Default::default(),
            size: 1,
            e_tag: None,
            version: None,
        };
        let kept: Vec<String> = [
            "p/m/config.json",
            "p/m/1/model.onnx",
            "p/m/01/model.onnx",
            "p/m/x/model.onnx",
            "p/m/1/deep/model.onnx",
            "p/readme.txt",
            "p/.hidden/1/model.onnx",
            "q/m/1/model.onnx",
        ]
        .iter()
        .filter_map(|l| classify(&prefix, meta(l)))
        .map(|e| e.rel)
        .collect();
        assert_eq!(kept, ["m/config.json", "m/1/model.onnx"]);
    }

    #[test]
    fn refuses_a_cache_dir_that_is_not_ours() {
        let dir = std::env::temp_dir().join(format!("infermesh-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("precious.txt"), b"x").unwrap();
        let e = prepare_cache(&dir).unwrap_err().to_string();
        assert!(e.contains("not a model cache"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        prepare_cache(&dir).unwrap();
        prepare_cache(&dir).unwrap();
        assert!(dir.join(CACHE_MARKER).is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
