//! `site-mailer`: serve the local send API and deliver the outbox.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use site_mailer::config::Config;
use site_mailer::startup::Application;

#[derive(Parser)]
#[command(name = "site-mailer", version, about = "Postwire site mailer")]
struct Cli {
    /// TOML configuration file (also POSTWIRE_CONFIG); environment variables win over it.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    mail_core::service::run(
        || Config::load(cli.config.as_deref()),
        |c| c.log_format,
        |config| async move {
            let listen = config.listen;
            let app = Application::build(config).await?;
            tracing::info!(%listen, port = app.port(), "site mailer listening");
            app.run_until_stopped().await?;
            Ok::<(), anyhow::Error>(())
        },
    )
}
