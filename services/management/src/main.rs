//! `management-service`: serve (default), migrate, token, openapi, rotate-keys.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use management::auth::Role;
use management::clock::{Clock, SystemClock};
use management::config::{Config, parse_duration};
use management::keys::Keys;
use management::openapi;
use management::startup::{self, Application};

#[derive(Parser)]
#[command(
    name = "management-service",
    version,
    about = "Postwire Management Service"
)]
struct Cli {
    /// TOML configuration file (also POSTWIRE_CONFIG); environment variables win over it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (the default).
    Serve,
    /// Run the database migrations and exit.
    Migrate,
    /// Print a JWT signed with the instance key (only the token on stdout).
    Token {
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Tenant id (tenant_admin, site).
        #[arg(long)]
        tenant: Option<String>,
        /// Site id (site).
        #[arg(long)]
        site: Option<String>,
        /// Lifetime, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Subject recorded in the audit log.
        #[arg(long, default_value = "cli")]
        sub: String,
        /// Print the admin page's sign-in link (`{POSTWIRE_PUBLIC_URL}/admin/#token=...`)
        /// instead of the bare token.
        #[arg(long)]
        open_url: bool,
        /// Create the tenant (named after its id, no admin emails) when it does not exist yet:
        /// for trying the admin page out. In production Cloud Central provisions tenants.
        #[arg(long)]
        create_tenant: bool,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Re-encrypt every stored secret under the first configured master key.
    RotateKeys,
}

#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "snake_case")]
enum RoleArg {
    ClusterAdmin,
    TenantAdmin,
    Site,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Openapi) = cli.command {
        print!("{}", openapi::json());
        return ExitCode::SUCCESS;
    }
    let command = cli.command.unwrap_or(Command::Serve);
    mail_core::service::run(
        || Config::load(cli.config.as_deref()),
        |c| c.log_format,
        |config| run(command, config),
    )
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let listen = config.listen;
            let public = config.public_url.clone();
            let app = Application::build(config).await?;
            tracing::info!(%listen, port = app.port(), public_url = %public, "Management Service listening");
            app.run_until_stopped().await?;
        }
        Command::Migrate => {
            let db = startup::connect_db(&config).await?;
            use migration::MigratorTrait as _;
            migration::Migrator::up(&db, None).await?;
            eprintln!("migrations applied");
        }
        Command::Token {
            role,
            tenant,
            site,
            ttl,
            sub,
            open_url,
            create_tenant,
        } => {
            let role = match role {
                RoleArg::ClusterAdmin => Role::ClusterAdmin,
                RoleArg::TenantAdmin => Role::TenantAdmin,
                RoleArg::Site => Role::Site,
            };
            if matches!(role, Role::TenantAdmin | Role::Site) && tenant.is_none() {
                anyhow::bail!("--tenant is required for role {}", role.as_str());
            }
            if role == Role::Site && site.is_none() {
                anyhow::bail!("--site is required for role site");
            }
            if let Some(t) = &tenant {
                mail_core::domain::TenantId::parse(t)
                    .map_err(|m| anyhow::anyhow!("--tenant {m}"))?;
            }
            let ttl = parse_duration(&ttl).map_err(|m| anyhow::anyhow!("--ttl: {m}"))?;
            if create_tenant && tenant.is_none() {
                anyhow::bail!("--create-tenant needs --tenant");
            }
            let keys = Keys::load(&config)?;
            let jwt = management::auth::Jwt::new(&keys.jwt_secret, None)?;
            let token = jwt.issue(
                role,
                tenant.as_deref(),
                site.as_deref(),
                &sub,
                SystemClock.now().timestamp(),
                i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
            )?;
            let out = if open_url {
                management::routes::admin::sign_in_url(&config.public_url, &token)
            } else {
                token
            };
            if let (true, Some(t)) = (create_tenant, &tenant) {
                ensure_tenant(config, t, &sub).await?;
            }
            println!("{out}");
        }
        Command::Openapi => print!("{}", openapi::json()),
        Command::RotateKeys => {
            let state = startup::prepare(config, Arc::new(SystemClock)).await?;
            let n = state.store.rotate_keys().await?;
            eprintln!(
                "re-encrypted {n} secret(s) under key {}",
                state.store.keys.primary_id()
            );
        }
    }
    Ok(())
}

/// Creates tenant `id` unless it exists (`token --create-tenant`).
async fn ensure_tenant(config: Config, id: &str, sub: &str) -> anyhow::Result<()> {
    let id = mail_core::domain::TenantId::parse(id).map_err(|m| anyhow::anyhow!("--tenant {m}"))?;
    let state = startup::prepare(config, Arc::new(SystemClock)).await?;
    if state.store.tenant(&id).await.map_err(api_error)?.is_some() {
        return Ok(());
    }
    let now = SystemClock.now();
    let actor = management::auth::Principal(management::auth::Claims {
        sub: sub.to_owned(),
        role: Role::ClusterAdmin,
        tenant: None,
        site: None,
        iss: "management-service token".to_owned(),
        aud: String::new(),
        exp: now.timestamp(),
        iat: now.timestamp(),
    });
    let input = management::store::TenantInput {
        name: id.as_str().to_owned(),
        admin_emails: Vec::new(),
        status: None,
    };
    state
        .store
        .put_tenant(&actor, &id, input, now)
        .await
        .map_err(api_error)?;
    eprintln!("created tenant {}", id.as_str());
    Ok(())
}

fn api_error(e: management::error::ApiError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}
