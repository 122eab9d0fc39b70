//! infermesh-sidecar: serves ONNX models over the Open Inference Protocol v2.
//! Wiring only: config (exit 64 if bad), tracing, serve, drain on signal.

use std::process::ExitCode;

use anyhow::Context;
use sidecar::config::{self, Command, LogFormat, Settings};
use sidecar::server::{self, ServeError};

/// BSD `EX_USAGE`: bad flags, variables or repository.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let settings = match config::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(Command::Serve(s)) => s,
        Ok(Command::Help) => {
            print!("{}", config::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("infermesh-sidecar {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("infermesh-sidecar: {e}\n\n{}", config::USAGE);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_tracing(settings.log_format);
    match run(settings) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "sidecar failed");
            let usage = e
                .downcast_ref::<ServeError>()
                .is_some_and(|e| matches!(e, ServeError::Repository(_) | ServeError::Remote(_)));
            ExitCode::from(if usage { EXIT_USAGE } else { 1 })
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Serves until SIGTERM or SIGINT; `Ok(false)` if the drain overran the
/// grace period.
fn run(settings: Settings) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let grace = settings.grace_period;
        let server = server::start(settings).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "draining"),
        }
        let drained = server.shutdown(grace).await;
        if drained {
            tracing::info!("drained, exiting");
        } else {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "grace period over, in-flight requests cut"
            );
        }
        Ok(drained)
    })
}
