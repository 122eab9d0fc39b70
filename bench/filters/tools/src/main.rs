//! Benchmark tools for `bench/filters.sh`:
//!
//! - `bench-tools upstream --listen ADDR [--listen ADDR ...]`: a small hyper
//!   HTTP/1.1 server that answers every request with a fixed OIP-shaped JSON
//!   body and counts hits per listener; `GET /__hits` on any listener
//!   returns the counts (and is not counted).
//! - `bench-tools paced --addr ADDR --rate N ...`: an open-loop load
//!   generator with a fixed send schedule; latency runs from the scheduled
//!   send time, so a slow response delays no measurement (no coordinated
//!   omission). Prints one JSON object. `--requests FILE` sends the
//!   methods, paths and JSON bodies listed in FILE, one per key, instead of
//!   `GET --path`.

mod paced;
mod upstream;

use anyhow::{bail, Context as _};

const USAGE: &str = "usage:
  bench-tools upstream --listen ADDR [--listen ADDR ...]
  bench-tools paced --addr ADDR --rate REQ_PER_S --duration S [--warmup S]
                    [--connections N] [--key-header NAME]
                    [--path PATH] [--keys N] | [--requests FILE]
    FILE: one request per line, METHOD<TAB>PATH[<TAB>JSON BODY];
    line K is sent with header NAME: user-K";

/// Largest requests file read.
const MAX_REQUESTS_FILE: u64 = 64 << 20;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    match cmd.as_str() {
        "upstream" => {
            let mut listen = Vec::new();
            for (flag, value) in pairs(rest)? {
                match flag {
                    "--listen" => listen.push(
                        value
                            .parse()
                            .with_context(|| format!("--listen {value:?}"))?,
                    ),
                    _ => bail!("unknown flag {flag:?}\n{USAGE}"),
                }
            }
            if listen.is_empty() {
                bail!("upstream needs at least one --listen\n{USAGE}");
            }
            upstream::run(&listen)
        }
        "paced" => {
            let mut cfg = paced::Config::default();
            let mut addr = None;
            let mut path_or_keys = false;
            for (flag, value) in pairs(rest)? {
                let num = || -> anyhow::Result<f64> {
                    value
                        .parse::<f64>()
                        .with_context(|| format!("{flag} {value:?} is not a number"))
                };
                match flag {
                    "--addr" => {
                        addr = Some(value.parse().with_context(|| format!("--addr {value:?}"))?)
                    }
                    "--rate" => cfg.rate = num()?,
                    "--duration" => cfg.duration_s = num()?,
                    "--warmup" => cfg.warmup_s = num()?,
                    "--connections" => {
                        cfg.connections = value
                            .parse()
                            .with_context(|| format!("--connections {value:?}"))?
                    }
                    "--path" => {
                        cfg.path = value.to_owned();
                        path_or_keys = true;
                    }
                    "--requests" => cfg.requests = read_requests(value)?,
                    "--key-header" => cfg.key_header = value.to_owned(),
                    "--keys" => {
                        cfg.keys = value.parse().with_context(|| format!("--keys {value:?}"))?;
                        path_or_keys = true;
                    }
                    _ => bail!("unknown flag {flag:?}\n{USAGE}"),
                }
            }
            if path_or_keys && !cfg.requests.is_empty() {
                bail!("--requests replaces --path and --keys; give one or the other\n{USAGE}");
            }
            let Some(addr) = addr else {
                bail!("paced needs --addr\n{USAGE}");
            };
            cfg.addr = addr;
            let report = paced::run(&cfg)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        _ => bail!("unknown command {cmd:?}\n{USAGE}"),
    }
}

/// Reads and parses a `--requests` file.
fn read_requests(file: &str) -> anyhow::Result<Vec<paced::Spec>> {
    let len = std::fs::metadata(file)
        .with_context(|| format!("--requests {file:?}"))?
        .len();
    if len > MAX_REQUESTS_FILE {
        bail!("--requests {file:?}: {len} bytes, the limit is {MAX_REQUESTS_FILE}");
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("--requests {file:?}"))?;
    paced::parse_requests(&text).with_context(|| format!("--requests {file:?}"))
}

/// Splits `--flag value` pairs.
fn pairs(args: &[String]) -> anyhow::Result<Vec<(&str, &str)>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            bail!("{flag} needs a value\n{USAGE}");
        };
        out.push((flag.as_str(), value.as_str()));
    }
    Ok(out)
}
