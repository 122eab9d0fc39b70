//! `infermesh demo`, the README's main command, run as a user runs it: a
//! real Envoy with the built filters in front of three clouds, each a real
//! sidecar, one of them killed under load and started again. Every check
//! it prints must pass, and the numbers it prints must say so too.

use std::process::Command;

#[test]
fn demo_passes_its_checks() {
    if mesh::envoy_bin().is_none() {
        eprintln!(
            "skipped demo_passes_its_checks: no Envoy and {}=1",
            mesh::SKIP_ENV
        );
        return;
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infermesh"));
    cmd.args(["demo", "--port", "0"])
        .env("INFERMESH_SIDECAR_BIN", mesh::sidecar::debug_bin());
    // Use the shipped modules when the test command built them.
    if let Some(dir) = std::env::var_os("INFERMESH_WASM_DIR") {
        cmd.env("INFERMESH_WASM_DIR", dir);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for line in [
        "-> 200 served by digits-mlp/1@aws",
        "-> 200 served by digits-mlp/2@aws",
        "-> 404 {\"error\":\"model \\\"resnet50\\\" is not served here\"}",
        "2000/2000 users got the version `infermesh explain` predicts",
        "400/400 users saw the same version on all of 5 more requests",
        "moved canary -> stable: 0",
        "weight now 50%",
        "1100/1100 answers name model/version@cloud",
        "{cloud=\"aws\",outcome=\"healthy\",reason=\"probe\"} 1",
        "(limit 1000 ms: ok)",
        "Envoy's log: infermesh canary guard: model digits-forest version 2 rolled back",
        "450/450 answered; version 2 agreed with version 1 on",
        "demo: all checks passed",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    failover_act_holds(&stdout);
    guard_and_shadow_hold(&stdout);
}

/// Checks the guard and shadow acts from their printed numbers.
fn guard_and_shadow_hold(out: &str) {
    let rolled = line(out, "the last request it got came");
    let ms = number_after(rolled, "the last request it got came");
    assert!(ms <= 1_000.0, "{rolled}");
    let shadow = line(out, "agreed with version 1 on");
    let pct = number_after(shadow, "agreed with version 1 on");
    let compared = number_after(shadow, "% of");
    assert!(compared >= 40.0, "{shadow}");
    // A sample of the 450 images, whose full-set agreement is 97.56%.
    assert!((85.0..=100.0).contains(&pct), "{shadow}");
}

/// The first line of `out` holding `needle`, without its indentation.
fn line<'a>(out: &'a str, needle: &str) -> &'a str {
    out.lines()
        .map(str::trim_start)
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{out}"))
}

/// The number right after `label` in `line`.
fn number_after(line: &str, label: &str) -> f64 {
    let at = line
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {line:?}"));
    let rest = line[at + label.len()..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("no number after {label:?} in {line:?}"))
}

/// Checks the failover act from its printed numbers.
fn failover_act_holds(out: &str) {
    // 100 req/s for 11 s, not one error.
    let totals = line(out, "1100 requests,");
    assert_eq!(number_after(totals, "requests,"), 0.0, "{totals}");
    // Who served each second: aws until the kill (3 s), gcp while it is
    // down, aws again at the end.
    let mut rows = Vec::new();
    for l in out.lines() {
        let cols: Vec<u64> = l
            .split("<-")
            .next()
            .unwrap_or("")
            .split_whitespace()
            .map_while(|c| c.parse().ok())
            .collect();
        if let [sec, aws, gcp, azure, error] = cols[..] {
            rows.push((sec, aws, gcp, azure, error));
        }
    }
    assert_eq!(rows.len(), 11, "a row per second in:\n{out}");
    for &(sec, aws, gcp, azure, error) in &rows {
        assert_eq!(aws + gcp + azure, 100, "second {sec}: {out}");
        assert_eq!((azure, error), (0, 0), "second {sec}: {out}");
        // Before the kill and in the last second aws serves (a hedge to
        // gcp may win now and then); while it is down, gcp serves all.
        if sec < 3 || sec == 10 {
            assert!(aws >= 90, "second {sec} on aws:\n{out}");
        }
        if (4..6).contains(&sec) {
            assert_eq!(gcp, 100, "second {sec} on gcp:\n{out}");
        }
    }
    let switch = line(out, "kill -> all traffic on gcp:");
    assert!(number_after(switch, "gcp:") <= 2000.0, "{switch}");
    let back = line(out, "aws ready again");
    let after = number_after(back, "first answer from aws");
    assert!((800.0..=4000.0).contains(&after), "{back}");
    assert!(number_after(back, "on aws (") >= 90.0, "{back}");
    let eu = line(out, "requests tagged eu");
    assert_eq!(number_after(eu, "azure"), 0.0, "{eu}");
    assert_eq!(number_after(eu, ""), 275.0, "{eu}");
    // The filter's own counters: nothing failed, gcp took over by replay
    // or hedge, every request counted once.
    let mut counted = 0.0;
    for cloud in ["aws", "gcp", "azure"] {
        let l = line(out, &format!("{cloud:<6} served"));
        assert_eq!(number_after(l, "failed"), 0.0, "{l}");
        counted += ["served", "replayed", "hedged"]
            .iter()
            .map(|o| number_after(l, o))
            .sum::<f64>();
    }
    assert_eq!(
        counted, 1100.0,
        "every request of the act counted once:\n{out}"
    );
    let gcp = line(out, "gcp    served");
    assert!(
        number_after(gcp, "replayed") + number_after(gcp, "hedged") > 0.0,
        "{gcp}"
    );
    assert!(
        out.contains("{cloud=\"aws\",outcome=\"unhealthy\""),
        "aws taken out:\n{out}"
    );
}
