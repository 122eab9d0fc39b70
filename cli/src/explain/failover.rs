//! `infermesh explain` for the failover filter: the residency scope, the
//! pick (or the 503), how the request may be replayed or hedged, and where
//! replays would go, all from `filter_core::failover`.

use std::fmt::Write as _;

use filter_core::config::failover::{FailoverConfig, HedgeDelay};
use filter_core::failover::attempts::{self, Attempts, Body, Class, Next};
use filter_core::failover::flight::{Env, Flight, Out, Request, Start};
use filter_core::failover::latency::{self, LatencyTracker};
use filter_core::failover::{Applied, CloudSet, Failure, Scope};
use filter_core::{headers, oip};

use super::ExplainRequest;

/// Explains the failover filter's decision, as text. Clouds in
/// `req.down` count as unhealthy; every other cloud as healthy. Errors
/// name a `--down` cloud the config does not list.
pub fn failover(cfg: &FailoverConfig, req: &ExplainRequest) -> Result<String, String> {
    let mut healthy = CloudSet::all(cfg.clouds.len());
    for name in &req.down {
        let i = cfg.cloud_index(name.as_bytes()).ok_or_else(|| {
            let known: Vec<&str> = cfg.clouds.iter().map(|c| c.name.as_str()).collect();
            format!(
                "--down: unknown cloud {name:?} (clouds: {})",
                known.join(", ")
            )
        })?;
        healthy.remove(i);
    }
    let mut out = String::new();
    let path = req.path.as_bytes();
    let oip_path = oip::parse_path(path);
    let infer_path = oip_path
        .as_ref()
        .is_some_and(|p| p.action == oip::Action::Infer);

    let owned: Vec<&str> = req
        .headers
        .iter()
        .filter(|(k, _)| headers::is_owned(k))
        .map(|(k, _)| k.as_str())
        .collect();
    if !cfg.trust_downstream_headers && !owned.is_empty() {
        let _ = writeln!(
            out,
            "stripped:  {} (downstream x-infermesh-* headers are not trusted)",
            owned.join(", ")
        );
    } else if owned.contains(&headers::CLOUD) {
        let _ = writeln!(
            out,
            "ignored:   {} from downstream: the filter always sets it",
            headers::CLOUD
        );
    }
    let (method, why) = match &req.method {
        Some(m) => (m.to_ascii_uppercase(), "-X"),
        None if req.body.is_some() => ("POST".to_owned(), "default with a body"),
        None if infer_path => ("POST".to_owned(), "default for an OIP infer path"),
        None => ("GET".to_owned(), "default; -X to change"),
    };
    // The headers as the filter reads them; method, path and body come
    // from the command line.
    let find = |name: &str| {
        req.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    };
    let request = Request {
        method: method.as_bytes(),
        path,
        content_length: req.body.as_ref().map(Vec::len),
        ..Request::from_headers(cfg, find, req.body.is_none())
    };
    let class = request.class(cfg);
    let model = match (&class.model, &oip_path) {
        (None, _) => "none named".to_owned(),
        (Some(m), Some(_)) => format!("{m} (OIP path)"),
        (Some(m), None) => format!("{m} (trusted {} header)", headers::MODEL),
    };
    let _ = writeln!(out, "request:   {method} ({why}); model {model}");

    let scope = request.scope(cfg);
    let _ = writeln!(
        out,
        "residency: {}",
        describe_scope(cfg, &scope, request.residency)
    );
    let names = |set: CloudSet| -> Vec<&str> {
        cfg.order
            .iter()
            .copied()
            .filter(|&c| set.contains(c))
            .map(|c| cfg.cloud_name(c))
            .collect()
    };
    let allowed = names(scope.allowed);
    let _ = writeln!(
        out,
        "allowed:   {} (pick order: priority, then cost, then name)",
        if allowed.is_empty() {
            "none".to_owned()
        } else {
            allowed.join(", ")
        }
    );
    let down = names(complement(cfg, healthy));
    if !down.is_empty() {
        let _ = writeln!(
            out,
            "down:      {} (--down: treated as unhealthy)",
            down.join(", ")
        );
    }

    let env = Env {
        cfg,
        healthy,
        latency: &[],
    };
    let first = match Flight::start(&env, &request, req.now_ms, &mut Out::default()) {
        Start::Routed(flight) => flight.first(),
        Start::NoCloud {
            reason,
            status,
            body,
        } => {
            let _ = writeln!(
                out,
                "decision:  {status} from the filter ({}): {}",
                reason.as_str(),
                String::from_utf8_lossy(&body)
            );
            return Ok(out);
        }
    };
    let cloud = cfg.clouds.get(first);
    let _ = writeln!(
        out,
        "pick:      {} (priority {}, cost {}; probes and replays use {})",
        cfg.cloud_name(first),
        cloud.map_or(0, |c| c.priority),
        cloud.map_or(0.0, |c| c.cost),
        cloud.map_or("?", |c| c.cluster.as_str())
    );
    let _ = writeln!(
        out,
        "sets:      {}: {} (route cache cleared: the VirtualService routes on it)",
        headers::CLOUD,
        cfg.cloud_name(first)
    );

    let body = match &req.body {
        None => Body::Complete(0),
        Some(b) if attempts::may_buffer(cfg, b.len()) => Body::Complete(b.len()),
        Some(_) => Body::TooLarge,
    };
    if let (Some(b), Body::TooLarge) = (&req.body, body) {
        let _ = writeln!(
            out,
            "body:      {} bytes, over replay.max_body_bytes {}: not buffered, never replayed or hedged",
            b.len(),
            cfg.replay.max_body_bytes
        );
    }
    let idempotent = if !class.idempotent {
        "not idempotent: may be replayed only when the upstream never saw it (connect failure)"
    } else if matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS") {
        "idempotent (safe method): may be replayed after any failure"
    } else {
        "idempotent (OIP infer, replay.infer_idempotent): may be replayed after any failure"
    };
    let _ = writeln!(out, "replay:    {idempotent}");
    let start = |b: Body| {
        let mut a = Attempts::start(req.now_ms, first, scope.allowed, &class);
        a.set_body(b);
        a
    };
    let _ = writeln!(
        out,
        "hedge:     {}",
        describe_hedge(cfg, &class, infer_path, start(body), req.now_ms, healthy)
    );
    let mut a = start(body);
    let mut order = Vec::new();
    let mut at = first;
    let stop = loop {
        match a.on_upstream_failure(cfg, req.now_ms, at, Failure::ConnectFailure, false, healthy) {
            Next::ReplayTo { cloud, .. } => {
                order.push(cfg.cloud_name(cloud));
                at = cloud;
            }
            Next::GiveUp(reason) => break reason.as_str(),
            // Only one try is ever in flight here.
            Next::Wait => break "wait",
        }
    };
    let _ = writeln!(
        out,
        "replay to: {} (then give up: {stop}); at most {} tries in all, {}ms per try, {}ms in total, before any response byte reached the client",
        if order.is_empty() {
            "none".to_owned()
        } else {
            order.join(" -> ")
        },
        cfg.replay.max_attempts,
        cfg.replay.per_try_timeout_ms,
        cfg.replay.total_deadline_ms
    );
    if let Next::GiveUp(reason) =
        start(body).on_upstream_failure(cfg, req.now_ms, first, Failure::Reset, false, healthy)
    {
        let _ = writeln!(
            out,
            "           after a reset, timeout or 5xx: none ({})",
            reason.as_str()
        );
    }
    if cfg.served_by_header {
        let _ = writeln!(
            out,
            "response:  {}: ...@{} (the cloud whose answer is used)",
            headers::SERVED_BY,
            cfg.cloud_name(first)
        );
    }
    Ok(out)
}

/// Every cloud not in `set`.
fn complement(cfg: &FailoverConfig, set: CloudSet) -> CloudSet {
    (0..cfg.clouds.len())
        .filter(|&c| !set.contains(c))
        .collect()
}

fn describe_scope(cfg: &FailoverConfig, scope: &Scope, value: Option<&[u8]>) -> String {
    let r = &cfg.residency;
    let header = r.header.as_deref().unwrap_or("?");
    let shown = || String::from_utf8_lossy(value.unwrap_or_default().trim_ascii()).into_owned();
    match scope.applied {
        Applied::Unrestricted => "no residency block: every cloud is allowed".to_owned(),
        Applied::Rule(i) => match r.rules.get(i) {
            Some(rule) => format!(
                "{header}={:?} -> rules.{}: tags {:?}",
                shown(),
                rule.value,
                rule.allowed.tags
            ),
            None => format!("{header}={:?} -> rules[{i}]", shown()),
        },
        Applied::Default => format!("no {header} header -> default: tags {:?}", r.default.tags),
        Applied::Unknown { fell_back: true } => format!(
            "{header}={:?} matches no rule; on_unknown: default -> tags {:?}",
            shown(),
            r.default.tags
        ),
        Applied::Unknown { fell_back: false } => format!(
            "{header}={:?} matches no rule; on_unknown: reject -> no cloud",
            shown()
        ),
    }
}

/// The hedge policy and, from a fresh `attempts`, where a hedge would go.
fn describe_hedge(
    cfg: &FailoverConfig,
    class: &Class,
    infer_path: bool,
    mut attempts: Attempts,
    now_ms: u64,
    healthy: CloudSet,
) -> String {
    let Some(policy) = &class.hedge else {
        return match &class.model {
            _ if !infer_path || !class.idempotent => {
                "off: only idempotent OIP infer requests (POST .../infer) are hedged".to_owned()
            }
            Some(m) if cfg.hedge.models.iter().any(|(n, _)| n == m) => {
                format!("off for this model (hedge.models.{m}.enabled)")
            }
            _ => "off (hedge.enabled is false)".to_owned(),
        };
    };
    let model = class.model.as_deref().unwrap_or("?");
    let source = if cfg.hedge.models.iter().any(|(n, _)| n == model) {
        format!("hedge.models.{model}")
    } else {
        "the hedge defaults".to_owned()
    };
    let delay = match policy {
        HedgeDelay::Fixed { ms } => format!("if no answer within {ms}ms (fixed, {source})"),
        HedgeDelay::Derived {
            percentile,
            min_ms,
            max_ms,
        } => format!(
            "if no answer within the cloud's p{percentile} latency, clamped to {min_ms}-{max_ms}ms ({source}; {}ms until {} answers are in)",
            latency::hedge_delay_ms(policy, &LatencyTracker::default()),
            latency::MIN_SAMPLES
        ),
    };
    match attempts.on_hedge_due(cfg, now_ms, healthy) {
        Next::ReplayTo { cloud, .. } => {
            format!("{delay}: also to {}", cfg.cloud_name(cloud))
        }
        Next::GiveUp(reason) => format!("{delay}: none would go out ({})", reason.as_str()),
        Next::Wait => delay,
    }
}
