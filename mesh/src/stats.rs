//! Reads Envoy's `/stats/prometheus` text.
//!
//! Envoy prints most stats with an `envoy_` prefix, but stats in a custom
//! namespace (Wasm metrics live in `wasmcustom`) without it; lookups here
//! accept either spelling so tests name metrics as the filters define them.

use std::collections::BTreeMap;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/stats/prometheus` snapshot.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub samples: Vec<Sample>,
}

impl Stats {
    /// Parses the Prometheus text format (comments and blank lines skipped).
    /// Panics on a line it cannot read, with the line.
    pub fn parse(text: &str) -> Stats {
        Stats::try_parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Stats::parse`], with an error naming the first unreadable line.
    pub fn try_parse(text: &str) -> Result<Stats, String> {
        let samples = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|(i, l)| {
                parse_line(l).ok_or_else(|| format!("unreadable stats line {}: {l:?}", i + 1))
            })
            .collect::<Result<_, _>>()?;
        Ok(Stats { samples })
    }

    /// Samples of metric `name` (with or without Envoy's `envoy_` prefix)
    /// whose labels include every pair in `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            (s.name == name || s.name.strip_prefix("envoy_") == Some(name))
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Sum over [`Stats::matching`] samples; 0 when none match.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The value of the single sample matching; `None` when none does.
    /// Panics when several do (the labels are not specific enough).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        match found.as_slice() {
            [] => None,
            [one] => Some(one.value),
            many => panic!(
                "{} samples of {name} match {labels:?}: {many:?}",
                many.len()
            ),
        }
    }

    /// Sample names starting with `prefix` (with or without `envoy_`), for
    /// error messages.
    pub fn names_like(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .samples
            .iter()
            .filter(|s| {
                s.name.starts_with(prefix)
                    || s.name
                        .strip_prefix("envoy_")
                        .is_some_and(|n| n.starts_with(prefix))
            })
            .map(|s| format!("{}{:?}", s.name, s.labels))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name_labels, value) = line.rsplit_once(' ')?;
    let value = match value {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match name_labels.split_once('{') {
        None => (name_labels, BTreeMap::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `k="v",k2="v2"` with `\"`, `\\` and `\n` escapes in values.
fn parse_labels(mut s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    while !s.is_empty() {
        let (k, rest) = s.split_once("=\"")?;
        let mut v = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => v.push('\n'),
                    other => v.push(other),
                },
                c => v.push(c),
            }
        };
        out.insert(k.trim_start_matches(',').to_owned(), v);
        s = rest.get(end + 1..)?;
        s = s.strip_prefix(',').unwrap_or(s);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_envoy_prometheus_text() {
        let text = "# TYPE envoy_cluster_upstream_rq counter\n\
            envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"a\"} 7\n\
            infermesh_canary_requests_total{model=\"m\",version=\"2\",decision=\"keyed\"} 12\n\
            infermesh_canary_requests_total{model=\"m\",version=\"1\",decision=\"keyed\"} 30\n\
            envoy_server_live 1\n\
            odd{v=\"a\\\"b,c\"} NaN\n";
        let s = Stats::parse(text);
        assert_eq!(s.samples.len(), 5);
        assert_eq!(s.get("server_live", &[]), Some(1.0));
        assert_eq!(
            s.get("cluster_upstream_rq", &[("envoy_cluster_name", "a")]),
            Some(7.0)
        );
        assert_eq!(
            s.sum("infermesh_canary_requests_total", &[("model", "m")]),
            42.0
        );
        assert_eq!(
            s.get("infermesh_canary_requests_total", &[("version", "2")]),
            Some(12.0)
        );
        assert_eq!(s.get("missing", &[]), None);
        assert_eq!(s.samples[4].labels["v"], "a\"b,c");
    }

    #[test]
    #[should_panic(expected = "unreadable stats line")]
    fn rejects_garbage() {
        Stats::parse("no_value_here\n");
    }
}
