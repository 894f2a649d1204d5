//! The one application builder, used by `main` and by the tests (on port 0).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::middleware::DefaultHeaders;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use secrecy::ExposeSecret;
use tracing_actix_web::TracingLogger;

use crate::auth::Jwt;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::keys::Keys;
use crate::oauth::grants::Grants;
use crate::routes;
use crate::store::Store;

/// Shared by every request handler.
pub struct AppState {
    pub store: Store,
    pub grants: Grants,
    pub site_gate: crate::routes::site_api::SiteGate,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub mailer: mail_core::smtp::Mailer,
    /// Wakes the outbox worker when a message is queued.
    pub outbox_wakeup: tokio::sync::Notify,
    /// This replica's id (outbox claims, refresh leases).
    pub instance: String,
    pub jwt: Jwt,
    pub clock: Arc<dyn Clock>,
    pub config: Arc<Config>,
}

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let state = web::Data::new(prepare(config, clock).await?);
        spawn_keeper(state.clone());
        crate::mail::spawn_worker(state.clone());
        spawn_jwks_refresh(state.clone()).await;
        let listener = TcpListener::bind(state.config.listen)
            .with_context(|| format!("POSTWIRE_LISTEN: cannot bind {}", state.config.listen))?;
        let port = listener.local_addr()?.port();
        let data = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .wrap(
                    DefaultHeaders::new()
                        .add(("X-Content-Type-Options", "nosniff"))
                        .add(("Referrer-Policy", "no-referrer"))
                        .add(("Cache-Control", "no-store")),
                )
                .wrap_fn({
                    let metrics = data.metrics.clone();
                    move |req, srv| {
                        use actix_web::dev::Service as _;
                        let started = std::time::Instant::now();
                        let method = req.method().to_string();
                        let metrics = metrics.clone();
                        let fut = srv.call(req);
                        async move {
                            let res = fut.await?;
                            // The route pattern, never the concrete path: bounded series.
                            let route = res
                                .request()
                                .match_pattern()
                                .unwrap_or_else(|| "unmatched".to_owned());
                            let status = res.status().as_u16().to_string();
                            metrics
                                .http_requests
                                .with_label_values(&[&route, &method, &status])
                                .inc();
                            metrics
                                .http_duration
                                .with_label_values(&[&route, &method])
                                .observe(started.elapsed().as_secs_f64());
                            Ok(res)
                        }
                    }
                })
                // Inside the tracing middleware, which puts the request id in the extensions.
                .wrap(actix_web::middleware::from_fn(
                    mail_core::http::request_id_header,
                ))
                .wrap(TracingLogger::<mail_core::http::RootSpan>::new())
                .app_data(data.clone())
                .configure(routes::configure)
        })
        .shutdown_timeout(10)
        .listen(listener)?
        .run();
        Ok(Self {
            port,
            server,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server from another task.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// Keeps every OAuth grant fresh (`POSTWIRE_GRANT_KEEPALIVE`), so rolling inactivity windows
/// (Microsoft: 90 days) never lapse even when no mail is sent.
fn spawn_keeper(state: web::Data<AppState>) {
    let period = crate::oauth::grants::keeper_tick(state.config.grant_keepalive);
    tokio::spawn(async move {
        loop {
            let jitter = u64::from(mail_core::crypto::random_bytes::<1>()[0]) % 10;
            tokio::time::sleep(period + Duration::from_secs(jitter)).await;
            let n = state
                .grants
                .keepalive_once(crate::oauth::grants::KEEPER_CONCURRENCY)
                .await;
            if n > 0 {
                tracing::info!(refreshed = n, "grant keep-alive");
            }
        }
    });
}

/// Fetches an external issuer's JWKS now and every 5 minutes (key rotation at the identity
/// provider). A failed fetch is retried every 30 s and never stops the service; tokens of that
/// issuer are refused until its keys are known.
async fn spawn_jwks_refresh(state: web::Data<AppState>) {
    let Some(crate::config::ExternalIssuer {
        keys: crate::config::ExternalKeys::JwksUrl(url),
        ..
    }) = state.config.external_issuer.clone()
    else {
        return;
    };
    let fetch = {
        let state = state.clone();
        let url = url.clone();
        move || {
            let state = state.clone();
            let url = url.clone();
            async move {
                match state
                    .grants
                    .http()
                    .get_json::<jsonwebtoken::jwk::JwkSet>(&url)
                    .await
                {
                    Ok(set) => {
                        let n = state.jwt.set_jwks(set);
                        tracing::debug!(keys = n, %url, "external issuer keys loaded");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "cannot fetch the external issuer's JWKS");
                        false
                    }
                }
            }
        }
    };
    let mut ok = fetch().await;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(if ok { 300 } else { 30 })).await;
            ok = fetch().await;
        }
    });
}

/// Connects, migrates, loads keys and checks the master key: everything but serving.
pub async fn prepare(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<AppState> {
    mail_core::config::warn_unknown_env(&config.unknown_env);
    let keys = Keys::load(&config)?;
    let db = connect_db(&config).await?;
    Migrator::up(&db, None)
        .await
        .context("running database migrations")?;
    let master = Arc::new(keys.master);
    let store = Store::new(db.clone(), master.clone());
    store.verify_master_key().await?;
    let jwt = Jwt::new(&keys.jwt_secret, config.external_issuer.as_ref())?;
    let mut policy = mail_core::egress::EgressPolicy::parse(&config.egress_allow)
        .map_err(|m| anyhow::anyhow!("POSTWIRE_EGRESS_ALLOW: {m}"))?;
    if let Some(r) = &config.egress_resolver {
        policy = policy.with_resolver(r.clone());
    }
    let http = mail_core::egress::EgressClient::new(
        Arc::new(policy.clone()),
        config.connect_timeout,
        config.extra_ca_file.as_deref(),
    )
    .map_err(|m| anyhow::anyhow!(m))?;
    let redis = match &config.redis_url {
        Some(url) => Some(
            mail_core::token_cache::RedisTokenCache::connect(url.expose_secret())
                .await
                .map_err(|m| anyhow::anyhow!(m))?,
        ),
        None => None,
    };
    let redirect_uri = format!(
        "{}{}",
        config.public_url.as_str().trim_end_matches('/'),
        crate::routes::oauth::CALLBACK_PATH
    );
    let metrics = Arc::new(crate::metrics::Metrics::new()?);
    let mut mailer_config = mail_core::smtp::MailerConfig::new(Arc::new(policy.clone()))
        .extra_ca_file(config.extra_ca_file.as_deref());
    mailer_config.connect_timeout = config.connect_timeout;
    let mailer = mail_core::smtp::Mailer::new(mailer_config).map_err(|m| anyhow::anyhow!(m))?;
    let grants = Grants::new(
        db,
        master,
        keys.cache_root,
        redis,
        http,
        redirect_uri,
        clock.clone(),
        config.grant_keepalive,
        metrics.clone(),
    );
    Ok(AppState {
        store,
        grants,
        site_gate: Default::default(),
        metrics,
        mailer,
        outbox_wakeup: tokio::sync::Notify::new(),
        instance: uuid::Uuid::new_v4().to_string(),
        jwt,
        clock,
        config: Arc::new(config),
    })
}

/// Opens the database: `DATABASE_URL`, or the SQLite file in the data directory.
pub async fn connect_db(config: &Config) -> anyhow::Result<DatabaseConnection> {
    let url = match &config.database_url {
        Some(u) => u.expose_secret().to_owned(),
        None => {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!(
                    "POSTWIRE_DATA_DIR: cannot create {}",
                    config.data_dir.display()
                )
            })?;
            format!(
                "sqlite://{}?mode=rwc",
                config.data_dir.join("postwire.db").display()
            )
        }
    };
    let sqlite = url.starts_with("sqlite:");
    let mut opt = ConnectOptions::new(url);
    opt.sqlx_logging(false)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30));
    if sqlite {
        // One connection: SQLite serializes writers anyway, and a single connection avoids
        // lock-upgrade failures between concurrent transactions.
        opt.max_connections(1).min_connections(1);
        opt.map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                .create_if_missing(true)
        });
    } else {
        opt.max_connections(20).min_connections(1);
    }
    Database::connect(opt)
        .await
        .context("DATABASE_URL: cannot connect to the database")
}
