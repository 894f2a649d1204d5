//! Process start-up shared by the Postwire services: load the configuration, start logging
//! and the async runtime, run, and map the outcome to the exit code.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogFormat};

/// Logging: text or JSON (`POSTWIRE_LOG_FORMAT`) to stderr, filtered by `RUST_LOG`.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Installs the TLS crypto provider, loads the configuration (a bad one: exit code 2), starts
/// logging in its format and runs `run` on a new Tokio runtime (an error: exit code 1).
pub fn run<C, F, E>(
    load: impl FnOnce() -> Result<C, ConfigError>,
    log_format: impl FnOnce(&C) -> LogFormat,
    run: impl FnOnce(C) -> F,
) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: Display,
{
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = match load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(log_format(&config));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
