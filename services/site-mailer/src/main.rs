//! `site-mailer`: serve the local send API and deliver the outbox.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use site_mailer::config::Config;
use site_mailer::startup::Application;
use site_mailer::telemetry;

#[derive(Parser)]
#[command(name = "site-mailer", version, about = "Postwire site mailer")]
struct Cli {
    /// TOML configuration file (also POSTWIRE_CONFIG); environment variables win over it.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let listen = config.listen;
        let app = Application::build(config).await?;
        tracing::info!(%listen, port = app.port(), "site mailer listening");
        app.run_until_stopped().await?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
