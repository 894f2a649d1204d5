//! The one application builder, used by `main` and by the tests (on port 0).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::DefaultHeaders;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use mail_core::egress::EgressPolicy;
use mail_core::smtp::{Mailer, MailerConfig};
use secrecy::{ExposeSecret as _, SecretSlice};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::api_key::LocalApiKey;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::config_source::{ConfigHandle, ConfigSource};
use crate::management_api::ManagementClient;
use crate::metrics::Metrics;
use crate::routes;
use crate::state_crypto::StateCipher;
use crate::store::Store;
use crate::store::writer::{SentWriter, Writer};
use crate::tokens::TokenProvider;
use crate::worker::Worker;

/// How long start-up waits for the first configuration fetch.
const INITIAL_FETCH: Duration = Duration::from_secs(5);

/// Shared by every request handler.
pub struct AppState {
    pub store: Store,
    pub writer: Writer,
    pub config: ConfigHandle,
    pub source: Arc<ConfigSource>,
    pub tokens: Arc<TokenProvider>,
    pub api_key: LocalApiKey,
    pub clock: Arc<dyn Clock>,
    /// Wakes the outbox worker when a message was accepted.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
    stopper: Stopper,
}

/// Stops the HTTP server and the background tasks (the worker lets deliveries in flight
/// finish for a few seconds). Cheap to clone.
#[derive(Clone)]
pub struct Stopper {
    server: ServerHandle,
    shutdown: Arc<watch::Sender<bool>>,
    tasks: Arc<tokio::sync::Mutex<Vec<JoinHandle<()>>>>,
    /// The data-dir lock, released once everything has stopped.
    lock: Arc<std::sync::Mutex<Option<std::fs::File>>>,
}

impl Stopper {
    pub async fn stop(&self) {
        self.shutdown.send_replace(true);
        self.server.stop(false).await;
        self.join_tasks().await;
    }

    async fn join_tasks(&self) {
        self.shutdown.send_replace(true);
        // Held while joining: a second caller returns only once everything has stopped.
        let mut tasks = self.tasks.lock().await;
        for t in tasks.drain(..) {
            let _ = t.await;
        }
        if let Ok(mut l) = self.lock.lock() {
            l.take();
        }
    }
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        mail_core::config::warn_unknown_env(&config.unknown_env);
        create_private_dir(&config.data_dir)?;
        let lock = lock_data_dir(&config.data_dir)?;
        let api_key = LocalApiKey::load(&config)?;
        let cipher = StateCipher::from_site_secret(&config.site_id, &config.site_secret)
            .map_err(|m| anyhow::anyhow!("deriving the local state key: {m}"))?;
        let store = Store::open(&config.data_dir)
            .await?
            .seal_state(cipher)
            .await
            .context("encrypting the local state")?;

        let mut egress = EgressPolicy::parse(&config.egress_allow)
            .map_err(|m| anyhow::anyhow!("POSTWIRE_EGRESS_ALLOW: {m}"))?;
        if let Some(r) = &config.egress_resolver {
            egress = egress.with_resolver(r.clone());
        }
        let mut mailer_config =
            MailerConfig::new(Arc::new(egress)).extra_ca_file(config.extra_ca_file.as_deref());
        mailer_config.connect_timeout = config.connect_timeout;
        mailer_config.send_timeout = config.send_timeout;
        // Up to `send_concurrency` sends run at once, all to the tenant's one server: keep as
        // many connections between messages (a smaller pool closes and reopens the surplus).
        mailer_config.pool_max_size = u32::try_from(config.send_concurrency)
            .unwrap_or(u32::MAX)
            .max(mailer_config.pool_max_size);
        let mailer = Mailer::new(mailer_config).map_err(|m| anyhow::anyhow!(m))?;

        let client = Arc::new(
            ManagementClient::new(
                &config.management_url,
                &config.site_id,
                config.site_secret.clone(),
                config.connect_timeout,
                config.extra_ca_file.as_deref(),
                clock.clone(),
            )
            .map_err(|m| anyhow::anyhow!(m))?,
        );
        let (source, handle) = ConfigSource::new(client.clone(), store.clone(), clock.clone())
            .await
            .context("loading the stored email configuration")?;
        // One fetch before serving, so a fresh site mailer can accept at once; a Management
        // Service that is down is no reason not to start (the stored configuration serves).
        let first_wait = match tokio::time::timeout(INITIAL_FETCH, source.refresh()).await {
            Ok(Ok(_)) => config.config_refresh,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot fetch the email configuration at start; retrying");
                Duration::from_secs(1)
            }
            Err(_) => {
                tracing::warn!("the Management Service did not answer at start; retrying");
                Duration::from_secs(1)
            }
        };

        let redis = match &config.redis_url {
            Some(url) => Some(
                mail_core::token_cache::RedisTokenCache::connect(url.expose_secret())
                    .await
                    .map_err(|m| anyhow::anyhow!(m))?,
            ),
            None => None,
        };
        let cache_root = match &config.cache_key {
            Some(k) => Some(
                mail_core::crypto::decode_key(k.expose_secret()).map_err(|n| {
                    anyhow::anyhow!("POSTWIRE_CACHE_KEY: must be 32 bytes of base64, got {n}")
                })?,
            ),
            None => None::<SecretSlice<u8>>,
        };
        let metrics = Arc::new(Metrics::new()?);
        let tokens = Arc::new(TokenProvider::new(
            client,
            store.clone(),
            clock.clone(),
            redis,
            cache_root,
            metrics.clone(),
        ));
        let writer = Writer::spawn(store.clone());
        let wake = Arc::new(Notify::new());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);

        // The outbox worker runs on a thread of its own, on a single-threaded runtime: its
        // deliveries wake each other many times per message (SMTP replies, the shared `sent`
        // commit), and on the multi-threaded runtime each wake could hand a task to the
        // other core and wake that thread. Measured in the `site_mailer_send` bench (filled
        // outbox, 10 SMTP connections, 2 cores, medians of 3 rounds): 180 and 184 us of CPU
        // per message against 208 and 217 us, at the same rate (about 5,800 msg/s). Two such
        // threads (5 connections each) took 204 and 222 us, no faster. The HTTP server keeps
        // its own threads, so accepting is not slowed by sending.
        let worker_runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the outbox worker's runtime")?;
        // Its `sent` group commit lives on that runtime too.
        let sent = {
            let _on_worker = worker_runtime.enter();
            SentWriter::spawn(store.clone())
        };
        let worker = Arc::new(Worker {
            store: store.clone(),
            config: handle.clone(),
            source: source.clone(),
            mailer,
            tokens: tokens.clone(),
            clock: clock.clone(),
            retry: config.retry,
            concurrency: config.send_concurrency,
            hello_name: config.hello_name.clone(),
            wake: wake.clone(),
            metrics: metrics.clone(),
            sent,
        });
        let (worker_done, worker_stopped) = tokio::sync::oneshot::channel::<()>();
        let worker_rx = shutdown_rx.clone();
        std::thread::Builder::new()
            .name("outbox-worker".into())
            .spawn(move || {
                worker_runtime.block_on(worker.run(worker_rx));
                // The worker's own tasks (the group commit, closing idle SMTP connections)
                // end with its runtime, before the application counts it as stopped.
                drop(worker_runtime);
                let _ = worker_done.send(());
            })
            .context("starting the outbox worker's thread")?;
        let tasks = vec![
            source
                .clone()
                .spawn(config.config_refresh, first_wait, shutdown_rx.clone()),
            tokens
                .clone()
                .spawn_refresh(handle.clone(), config.token_refresh, shutdown_rx.clone()),
            crate::retention::spawn(
                store.clone(),
                clock.clone(),
                metrics.clone(),
                config.outbox_retention,
                shutdown_rx.clone(),
            ),
            tokio::spawn(async move {
                let _ = worker_stopped.await;
            }),
        ];

        let state = web::Data::new(AppState {
            store,
            writer,
            config: handle,
            source,
            tokens,
            api_key,
            clock,
            wake,
            metrics,
        });
        let listener = TcpListener::bind(config.listen)
            .with_context(|| format!("POSTWIRE_LISTEN: cannot bind {}", config.listen))?;
        let port = listener.local_addr()?.port();
        let data = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .wrap(
                    DefaultHeaders::new()
                        .add(("X-Content-Type-Options", "nosniff"))
                        .add(("Cache-Control", "no-store")),
                )
                // Inside the tracing middleware, which puts the request id in the extensions.
                .wrap(actix_web::middleware::from_fn(
                    mail_core::http::request_id_header,
                ))
                .wrap(tracing_actix_web::TracingLogger::<mail_core::http::RootSpan>::new())
                .app_data(data.clone())
                .configure(routes::configure)
        })
        .shutdown_timeout(10)
        .listen(listener)?
        .run();
        let stopper = Stopper {
            server: server.handle(),
            shutdown: Arc::new(shutdown_tx),
            tasks: Arc::new(tokio::sync::Mutex::new(tasks)),
            lock: Arc::new(std::sync::Mutex::new(Some(lock))),
        };
        Ok(Self {
            port,
            server,
            state,
            stopper,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Stops the server and the background tasks from another task.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Serves until stopped (SIGINT/SIGTERM or [`Stopper::stop`]), then stops the outbox
    /// worker (deliveries in flight may finish) and the other background tasks.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.stopper.join_tasks().await;
        result
    }
}

/// One site mailer per data dir: two would deliver the same outbox twice.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("site-mailer.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("POSTWIRE_DATA_DIR: cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "POSTWIRE_DATA_DIR: {} is in use by another site mailer",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("POSTWIRE_DATA_DIR: cannot lock {}", path.display()))
        }
    }
}

/// The data dir, readable by the owner only (it holds the API key, and the site's SMTP
/// password and access tokens, those sealed with a key derived from the site secret).
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("POSTWIRE_DATA_DIR: cannot create {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mut perms = std::fs::metadata(dir)
            .with_context(|| format!("POSTWIRE_DATA_DIR: {}", dir.display()))?
            .permissions();
        if perms.mode() & 0o077 != 0 {
            perms.set_mode(0o700);
            if let Err(e) = std::fs::set_permissions(dir, perms) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot restrict the data dir to its owner");
            }
        }
    }
    Ok(())
}
