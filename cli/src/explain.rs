//! `infermesh explain`: the decision a filter would take for a request,
//! computed by the same core code the filter runs in Envoy.

use std::fmt::Write as _;

use filter_core::canary::{self, Decision, Request};
use filter_core::config::canary::{CanaryConfig, Split};
use filter_core::config::module::ModuleConfig;
use filter_core::config::router::RouterConfig;
use filter_core::hash::{bucket, BUCKETS};
use filter_core::router;
use filter_core::stats::canary::{GUARD_STATE, GUARD_TRIPS, PROMOTION_HELD, WEIGHT};
use filter_core::stats::shadow::{AGREEMENTS, DISAGREEMENTS, ERRORS as SHADOW_ERRORS};
use filter_core::weights::Weights;
use filter_core::{headers, oip};

mod failover;

pub use failover::failover;

/// A request as a client would send it.
#[derive(Debug, Clone, Default)]
pub struct ExplainRequest {
    pub path: String,
    /// Header names lower-cased; values as bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Evaluation time (Unix ms) for schedules.
    pub now_ms: u64,
    /// Request body, for body routing and the failover replay buffer.
    pub body: Option<Vec<u8>>,
    /// HTTP method; `None`: POST with a body or on an OIP infer path, else
    /// GET.
    pub method: Option<String>,
    /// Cloud names to treat as unhealthy (failover).
    pub down: Vec<String>,
    /// One proxy's `/stats/prometheus`, for the canary guard's state.
    pub stats: Option<mesh::Stats>,
}

impl ExplainRequest {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

fn pct(bp: u32) -> String {
    format!("{:.2}%", f64::from(bp) / 100.0)
}

/// Explains every configured stage of the module, in the order they run;
/// each stage sees the request as the stages ahead left it (their
/// headers set, the path rewritten), as in the filter, and trusts what
/// they wrote.
pub fn module(cfg: &ModuleConfig, req: &ExplainRequest) -> Result<String, String> {
    let mut out = String::new();
    let mut req = req.clone();
    if cfg.strips_downstream_headers() {
        let before = req.headers.len();
        req.headers.retain(|(name, _)| !headers::is_owned(name));
        if req.headers.len() < before {
            let _ = writeln!(
                out,
                "module:    removed {} client x-infermesh-* header(s) (not every stage trusts them)",
                before - req.headers.len()
            );
        }
    }
    if let Some(router_cfg) = &cfg.router {
        let _ = writeln!(out, "== router");
        let mut stage = router_cfg.clone();
        stage.trust_downstream_headers = true;
        out.push_str(&router(&stage, &req));
        let Some(set) = router_outcome(&stage, &req) else {
            return Ok(out); // the router answered
        };
        for (name, value) in set {
            set_header(&mut req, &name, value);
        }
    }
    if let Some(canary_cfg) = &cfg.canary {
        let _ = writeln!(out, "== canary");
        let mut stage = canary_cfg.clone();
        stage.trust_downstream_headers = true;
        out.push_str(&canary(&stage, &req));
        if let Some(v) = canary_version(&stage, &req) {
            set_header(&mut req, headers::VERSION, v.into_bytes());
        }
    }
    if let Some(failover_cfg) = &cfg.failover {
        let _ = writeln!(out, "== failover");
        let mut stage = failover_cfg.clone();
        stage.trust_downstream_headers = true;
        out.push_str(&failover(&stage, &req)?);
    }
    Ok(out)
}

fn set_header(req: &mut ExplainRequest, name: &str, value: Vec<u8>) {
    if name == ":path" {
        req.path = String::from_utf8_lossy(&value).into_owned();
        return;
    }
    req.headers.retain(|(n, _)| n != name);
    req.headers.push((name.to_owned(), value));
}

/// The headers the router stage writes, or `None` when it answers the
/// request itself.
fn router_outcome(cfg: &RouterConfig, req: &ExplainRequest) -> Option<Vec<(String, Vec<u8>)>> {
    match router_decide(cfg, req, None).0 {
        router::Decision::Route {
            model,
            version,
            rewrite,
            ..
        } => {
            let m = cfg.models.get(model)?;
            let mut set = vec![(headers::MODEL.to_owned(), m.name.clone().into_bytes())];
            if let Some(v) = version.and_then(|i| m.versions.get(i)) {
                set.push((headers::VERSION.to_owned(), v.clone().into_bytes()));
            }
            if let Some(p) = rewrite {
                set.push((":path".to_owned(), p.into_bytes()));
            }
            Some(set)
        }
        router::Decision::Reject { .. } => None,
        router::Decision::Pass { .. } => Some(Vec::new()),
    }
}

/// The version the canary stage writes, if any.
fn canary_version(cfg: &CanaryConfig, req: &ExplainRequest) -> Option<String> {
    let key = canary::sticky_key(&cfg.sticky_key, |h| req.header(h));
    let overridden = cfg.override_header.as_deref().and_then(|h| req.header(h));
    let model = req.header(headers::MODEL);
    let version = req.header(headers::VERSION);
    let r = Request {
        path: req.path.as_bytes(),
        trusted_model: model.as_deref(),
        trusted_version: version.as_deref(),
        override_version: overridden.as_deref(),
        sticky_key: key.as_deref(),
    };
    // Unkeyed requests get a random bucket in the filter; 0 here, as the
    // canary explanation says.
    let guarded = guarded_weights(cfg, req);
    let (split, version) = match canary::decide_guarded(cfg, &r, req.now_ms, 0, &guarded) {
        Decision::Unmatched => return None,
        Decision::Pinned { split, version } => (split, version?),
        Decision::Split { split, version, .. } => (split, version),
    };
    cfg.splits.get(split)?.versions.get(version).cloned()
}

/// Explains the canary filter's decision, as text.
pub fn canary(cfg: &CanaryConfig, req: &ExplainRequest) -> String {
    let mut out = String::new();
    let path = req.path.as_bytes();
    let stripped: Vec<&str> = if cfg.trust_downstream_headers {
        Vec::new()
    } else {
        req.headers
            .iter()
            .filter(|(k, _)| headers::is_owned(k))
            .map(|(k, _)| k.as_str())
            .collect()
    };
    let trusted = |name: &str| {
        if cfg.trust_downstream_headers {
            req.header(name)
        } else {
            None
        }
    };
    let (trusted_model, trusted_version) = (trusted(headers::MODEL), trusted(headers::VERSION));
    let override_version = cfg.override_header.as_deref().and_then(|h| req.header(h));
    let key = canary::sticky_key(&cfg.sticky_key, |h| req.header(h));
    let creq = Request {
        path,
        trusted_model: trusted_model.as_deref(),
        trusted_version: trusted_version.as_deref(),
        override_version: override_version.as_deref(),
        sticky_key: key.as_deref(),
    };
    // The random word only matters for unkeyed requests, which are
    // explained as probabilities below.
    let guarded = guarded_weights(cfg, req);
    let decision = canary::decide_guarded(cfg, &creq, req.now_ms, 0, &guarded);

    if !stripped.is_empty() {
        let _ = writeln!(
            out,
            "stripped:  {} (downstream x-infermesh-* headers are not trusted)",
            stripped.join(", ")
        );
    }
    let model = match (&trusted_model, oip::parse_path(path)) {
        (Some(m), _) => format!(
            "{} (trusted {} header)",
            String::from_utf8_lossy(m),
            headers::MODEL
        ),
        (None, Some(p)) => format!("{} (OIP path)", p.model),
        (None, None) => "none (not an OIP model path)".to_owned(),
    };
    let _ = writeln!(out, "model:     {model}");

    let split = match &decision {
        Decision::Unmatched => {
            let _ = writeln!(
                out,
                "decision:  untouched: no split for this model; the default route applies"
            );
            return out;
        }
        Decision::Pinned { split, .. } | Decision::Split { split, .. } => *split,
    };
    let Some(s) = cfg.splits.get(split) else {
        return out;
    };
    let configured = s.weights_at(req.now_ms);
    let in_force = guarded.get(split).and_then(Option::as_ref);
    let weights = in_force.unwrap_or(configured);
    let shares: Vec<String> = s
        .versions
        .iter()
        .zip(weights.as_bp())
        .map(|(v, w)| format!("{v}={}", pct(*w)))
        .collect();
    let step = match s.schedule.as_ref().map(|sc| sc.active(req.now_ms)) {
        None => "no schedule".to_owned(),
        Some(None) => "base weights: the schedule has not started".to_owned(),
        Some(Some((i, _))) => format!("schedule step {i}"),
    };
    let _ = writeln!(
        out,
        "split:     splits[{split}]: {} ({step}{})",
        shares.join(" "),
        if in_force.is_some() {
            "; the guard's weights, from the stats"
        } else {
            ""
        }
    );
    out.push_str(&guard_lines(s, req));

    let version_name = |i: usize| s.versions.get(i).map_or("?", String::as_str);
    let chosen = match decision {
        Decision::Unmatched => None,
        Decision::Pinned {
            version: Some(v), ..
        } => {
            let _ = writeln!(
                out,
                "decision:  pinned to version {} by the request; never split",
                version_name(v)
            );
            Some(v)
        }
        Decision::Pinned { version: None, .. } => {
            let _ = writeln!(
                out,
                "decision:  the request names a version the split does not list; header left unset, default route"
            );
            None
        }
        Decision::Split {
            version,
            how,
            override_rejected,
            ..
        } => {
            if override_rejected {
                let _ = writeln!(
                    out,
                    "override:  ignored: {:?} is not a listed version",
                    String::from_utf8_lossy(override_version.as_deref().unwrap_or_default())
                );
            }
            match how {
                canary::How::Override => {
                    let _ = writeln!(
                        out,
                        "decision:  version {} (override header)",
                        version_name(version)
                    );
                    Some(version)
                }
                canary::How::Keyed => {
                    let k = key.as_deref().unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "key:       {:?} -> bucket {} of {BUCKETS}",
                        String::from_utf8_lossy(k),
                        bucket(&s.model, k)
                    );
                    let _ = writeln!(
                        out,
                        "decision:  version {} (sticky key)",
                        version_name(version)
                    );
                    Some(version)
                }
                canary::How::Unkeyed => {
                    let _ = writeln!(
                        out,
                        "decision:  no sticky key: a random version per request, with the split's weights"
                    );
                    None
                }
            }
        }
    };
    if let Some(v) = chosen {
        let _ = writeln!(out, "sets:      {}: {}", headers::VERSION, version_name(v));
        if cfg.served_by_header {
            let _ = writeln!(
                out,
                "response:  {}: {}/{}",
                headers::SERVED_BY,
                s.model,
                version_name(v)
            );
        }
    }
    out
}

/// The router's decision for `req`, as the filter takes it; notes on the
/// body go to `notes` when given.
fn router_decide(
    cfg: &RouterConfig,
    req: &ExplainRequest,
    mut notes: Option<&mut String>,
) -> (router::Decision, Option<router::BodyFallback>) {
    let mut note = |text: String| {
        if let Some(out) = notes.as_deref_mut() {
            let _ = writeln!(out, "body:      {text}");
        }
    };
    let header = |name: &Option<String>| name.as_deref().and_then(|h| req.header(h));
    let (hm, hv) = (header(&cfg.model_header), header(&cfg.version_header));
    let path = req.path.as_bytes();
    let body = match (&req.body, &cfg.body) {
        (Some(b), Some(src)) if router::needs_body(cfg, path, hm.as_deref(), hv.is_some()) => {
            if b.len() > src.max_bytes {
                note(format!(
                    "{} bytes, over max_bytes {}: not read",
                    b.len(),
                    src.max_bytes
                ));
                router::Body::TooLarge
            } else {
                note(format!("{} bytes, read for routing", b.len()));
                router::Body::Complete(b)
            }
        }
        (Some(_), Some(_)) => {
            note("not needed: the path and headers decide".to_owned());
            router::Body::None
        }
        _ => router::Body::None,
    };
    let r = router::Request {
        path,
        header_model: hm.as_deref(),
        header_version: hv.as_deref(),
        body,
    };
    router::decide(cfg, &r)
}

/// Explains the model-router's decision, as text.
pub fn router(cfg: &RouterConfig, req: &ExplainRequest) -> String {
    let mut out = String::new();
    let (decision, body_fallback) = router_decide(cfg, req, Some(&mut out));
    if let Some(f) = body_fallback {
        let _ = writeln!(
            out,
            "fallback:  body gave nothing ({}); other sources used",
            f.as_str()
        );
    }
    match decision {
        router::Decision::Route {
            model,
            version,
            source,
            rewrite,
        } => {
            let Some(m) = cfg.models.get(model) else {
                return out;
            };
            let _ = writeln!(out, "model:     {}", m.name);
            let _ = writeln!(out, "sets:      {}: {}", headers::MODEL, m.name);
            match version.and_then(|v| m.versions.get(v)) {
                Some(v) => {
                    let _ = writeln!(
                        out,
                        "version:   {v} (pinned, from the {}; never split by the canary)",
                        source.as_str()
                    );
                    let _ = writeln!(out, "sets:      {}: {v}", headers::VERSION);
                }
                None => {
                    let _ = writeln!(
                        out,
                        "version:   none named (model from the {}): the canary, if any, picks",
                        source.as_str()
                    );
                }
            }
            if let Some(p) = rewrite {
                let _ = writeln!(out, "rewrite:   :path -> {p}");
            }
        }
        router::Decision::Reject { miss, message } => {
            let _ = writeln!(
                out,
                "decision:  404 from the filter ({}): {}",
                miss.as_str(),
                String::from_utf8_lossy(&router::error_body(&message))
            );
        }
        router::Decision::Pass { miss } => {
            let _ = writeln!(
                out,
                "decision:  untouched ({}): the default route applies",
                miss.as_str()
            );
        }
    }
    out
}

/// The state gauge value of a guarded version in `stats`, as a word.
fn guard_state(stats: &mesh::Stats, model: &str, version: &str) -> Option<&'static str> {
    let v = stats.get(GUARD_STATE, &[("model", model), ("version", version)])?;
    Some(match v as u64 {
        0 => "normal",
        1 => "tripped",
        2 => "probing",
        _ => "unknown",
    })
}

/// Per split, the weights the proxy whose stats were given routes on,
/// when its guard took a canary out (`None`: the config's weights).
fn guarded_weights(cfg: &CanaryConfig, req: &ExplainRequest) -> Vec<Option<Weights>> {
    let Some(stats) = &req.stats else {
        return Vec::new();
    };
    cfg.splits
        .iter()
        .map(|s| {
            s.guard.as_ref()?;
            let held = stats.get(PROMOTION_HELD, &[("model", &s.model)]) == Some(1.0);
            let disturbed = held
                || s.versions
                    .iter()
                    .skip(1)
                    .any(|v| guard_state(stats, &s.model, v).is_some_and(|st| st != "normal"));
            if !disturbed {
                return None;
            }
            let bp: Option<Vec<u32>> = s
                .versions
                .iter()
                .map(|v| {
                    stats
                        .get(WEIGHT, &[("model", &s.model), ("version", v)])
                        .map(|w| w as u32)
                })
                .collect();
            Weights::new(bp?).ok()
        })
        .collect()
}

/// The guard's rules, and with stats its state per canary version; the
/// shadow, if any.
fn guard_lines(s: &Split, req: &ExplainRequest) -> String {
    let mut out = String::new();
    if let Some(sh) = &s.shadow {
        let _ = writeln!(
            out,
            "shadow:    {} of the baseline's split infer requests copied to version {} (cluster {}); its answers are never the client's",
            pct(sh.fraction_bp),
            s.versions.get(sh.version).map_or("?", String::as_str),
            sh.cluster
        );
        if let Some(stats) = &req.stats {
            let candidate = s.versions.get(sh.version).map_or("", String::as_str);
            let labels = [("model", s.model.as_str()), ("version", candidate)];
            let agreed = stats.sum(AGREEMENTS, &labels);
            let compared = agreed + stats.sum(DISAGREEMENTS, &labels);
            let rate = if compared > 0.0 {
                format!("{:.2}%", 100.0 * agreed / compared)
            } else {
                "-".to_owned()
            };
            let _ = writeln!(
                out,
                "shadow:    agreement {rate} ({agreed} of {compared} compared; {} copies failed)",
                stats.sum(SHADOW_ERRORS, &labels)
            );
        }
    }
    let Some(g) = &s.guard else {
        return out;
    };
    let mut rules = Vec::new();
    if let Some(bp) = g.max_error_rate_bp {
        rules.push(format!("error rate > {}", pct(bp)));
    }
    if let Some(bp) = g.max_error_rate_over_baseline_bp {
        rules.push(format!("error rate > baseline + {}", pct(bp)));
    }
    if let Some(ms) = g.max_p99_ms_over_baseline {
        rules.push(format!("p99 > baseline + {ms} ms"));
    }
    if let Some(gate) = g.promotion {
        rules.push(format!(
            "schedule held while shadow agreement < {} or < {} compared",
            pct(gate.min_agreement_bp),
            gate.min_samples
        ));
    }
    let after = match g.cool_off_ms {
        Some(ms) => format!(", probed at {} after {} s", pct(g.probe_bp), ms / 1000),
        None => " until the config changes".to_owned(),
    };
    let _ = writeln!(
        out,
        "guard:     {} over {} ms with >= {} requests; {}{after}",
        rules.join(", "),
        g.window_ms,
        g.min_requests,
        g.action.as_str()
    );
    let Some(stats) = &req.stats else {
        let _ = writeln!(
            out,
            "guard:     state unknown (pass --stats with a proxy's /stats/prometheus)"
        );
        return out;
    };
    if g.promotion.is_some() {
        let held = match stats.get(PROMOTION_HELD, &[("model", &s.model)]) {
            Some(1.0) => "held (the schedule does not step)",
            Some(_) => "released (the schedule applies)",
            None => "not in the stats",
        };
        let _ = writeln!(out, "guard:     promotion {held}");
    }
    for v in s.versions.iter().skip(1) {
        let labels = [("model", s.model.as_str()), ("version", v.as_str())];
        let state = guard_state(stats, &s.model, v).unwrap_or("not in the stats");
        let trips: Vec<String> = stats
            .matching(GUARD_TRIPS, &labels)
            .filter(|t| t.value > 0.0)
            .map(|t| {
                format!(
                    "{} x{}",
                    t.labels.get("reason").map_or("?", String::as_str),
                    t.value
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "guard:     version {v}: {state}{}",
            if trips.is_empty() {
                String::new()
            } else {
                format!(" (trips: {})", trips.join(", "))
            }
        );
    }
    out
}
