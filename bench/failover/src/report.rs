//! Figures, JSON and markdown tables from the runs' records.

use std::fmt::Write as _;

use mesh::load::{self, Record, Summary};
use serde_json::{json, Value};

use crate::{Outcome, PRIMARY};

/// The window right after the fault, and the one 30–60 s later (where
/// Envoy's outlier detection lets live traffic re-probe an ejected host).
const AT_FAULT_MS: f64 = 30_000.0;
const LATER_END_MS: f64 = 60_000.0;
/// "Clean" = answered by another cloud within this, as before the fault.
const CLEAN_MS: f64 = 100.0;

struct Figures {
    all: Summary,
    at_fault: Summary,
    later: Option<Summary>,
    switch_ms: Option<f64>,
    clean_ms: Option<f64>,
    fault_switches: usize,
    return_ms: Option<f64>,
    return_switches: usize,
    client_lag_max_ms: f64,
}

fn figures(o: &Outcome) -> Figures {
    let r = &o.records;
    let fault_end = (o.fault_ms + AT_FAULT_MS).min(o.back_ms);
    let later_end = (o.fault_ms + LATER_END_MS).min(o.back_ms);
    Figures {
        all: load::summarize(load::window(r, o.warmup_ms, o.end_ms)),
        at_fault: load::summarize(load::window(r, o.fault_ms, fault_end)),
        later: (later_end > fault_end)
            .then(|| load::summarize(load::window(r, fault_end, later_end))),
        switch_ms: load::settle_ms(r, o.fault_ms, o.back_ms, |x: &Record| {
            x.ok() && x.cloud.as_deref().is_some_and(|c| c != PRIMARY)
        }),
        clean_ms: load::settle_ms(r, o.fault_ms, o.back_ms, |x: &Record| {
            x.ok() && x.latency_ms <= CLEAN_MS && x.cloud.as_deref().is_some_and(|c| c != PRIMARY)
        }),
        fault_switches: load::switches(r, o.fault_ms, o.back_ms),
        return_ms: load::settle_ms(r, o.back_ready_ms, o.end_ms, |x: &Record| {
            x.served_by_cloud(PRIMARY)
        }),
        return_switches: load::switches(r, o.back_ms, o.end_ms),
        client_lag_max_ms: r.iter().map(|x| x.late_ms).fold(0.0, f64::max),
    }
}

fn summary_json(s: &Summary) -> Value {
    json!({
        "requests": s.requests, "errors": s.errors,
        "over_100ms": s.over_100ms, "over_250ms": s.over_250ms,
        "max_ms": s.max_ms, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms,
    })
}

pub(crate) fn to_json(o: &Outcome) -> Value {
    let f = figures(o);
    let per_second: Vec<Value> = load::per_second(&o.records)
        .into_iter()
        .map(|(s, m)| json!({"second": s, "served": m}))
        .collect();
    json!({
        "variant": o.variant.name(),
        "scenario": o.scenario.name(),
        "primary": PRIMARY,
        "events_ms": {
            "warmup_end": o.warmup_ms, "fault": o.fault_ms, "back": o.back_ms,
            "back_ready": o.back_ready_ms, "end": o.end_ms,
        },
        "loadavg": {"before": o.loadavg_before, "after": o.loadavg_after},
        "summary": summary_json(&f.all),
        "at_fault": summary_json(&f.at_fault),
        "later": f.later.as_ref().map(summary_json),
        "switch_ms": f.switch_ms,
        "clean_ms": f.clean_ms,
        "fault_switches": f.fault_switches,
        "return_ms": f.return_ms,
        "return_switches": f.return_switches,
        "client_lag_max_ms": f.client_lag_max_ms,
        "per_second": per_second,
        "records": o.records.iter().map(Record::to_json).collect::<Vec<_>>(),
    })
}

fn secs(ms: Option<f64>) -> String {
    ms.map_or_else(|| "never".to_owned(), |ms| format!("{:.2} s", ms / 1e3))
}

/// One line for the progress log.
pub(crate) fn row(o: &Outcome) -> String {
    let f = figures(o);
    format!(
        "  {} {}: {} requests, {} errors, {} >100ms, {} >250ms, max {:.0} ms; switch {}, clean {}, return {} ({} switches); load {} -> {}",
        o.variant.name(),
        o.scenario.name(),
        f.all.requests,
        f.all.errors,
        f.all.over_100ms,
        f.all.over_250ms,
        f.all.max_ms,
        secs(f.switch_ms),
        secs(f.clean_ms),
        secs(f.return_ms),
        f.return_switches,
        o.loadavg_before,
        o.loadavg_after,
    )
}

/// The markdown tables: one row per run, then the fault windows.
pub(crate) fn table(outcomes: &[Outcome]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| variant | scenario | requests | errors | >100 ms | >250 ms | max ms | p50 / p99 ms | switch time | clean after | switches during fault | return time | switches after return | client lag max ms | load avg before → after |"
    );
    let _ = writeln!(
        t,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for o in outcomes {
        let f = figures(o);
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {:.0} | {:.1} / {:.1} | {} | {} | {} | {} | {} | {:.1} | {} → {} |",
            o.variant.name(),
            o.scenario.name(),
            f.all.requests,
            f.all.errors,
            f.all.over_100ms,
            f.all.over_250ms,
            f.all.max_ms,
            f.all.p50_ms,
            f.all.p99_ms,
            secs(f.switch_ms),
            secs(f.clean_ms),
            f.fault_switches,
            secs(f.return_ms),
            f.return_switches,
            f.client_lag_max_ms,
            o.loadavg_before,
            o.loadavg_after,
        );
    }
    let _ = writeln!(
        t,
        "\n| variant | scenario | window | requests | errors | >100 ms | >250 ms | max ms |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
    for o in outcomes {
        let f = figures(o);
        let mut rows = vec![("fault +0–30 s", &f.at_fault)];
        if let Some(l) = &f.later {
            rows.push(("fault +30–60 s", l));
        }
        for (name, s) in rows {
            let _ = writeln!(
                t,
                "| {} | {} | {name} | {} | {} | {} | {} | {:.0} |",
                o.variant.name(),
                o.scenario.name(),
                s.requests,
                s.errors,
                s.over_100ms,
                s.over_250ms,
                s.max_ms,
            );
        }
    }
    t
}
