//! Keeps the effective configuration: fetched from the Management Service at start and then
//! periodically (`POSTWIRE_CONFIG_REFRESH`) or on demand, stored in the local state so that it
//! survives a restart and serves while the Management Service is down. Subscribers see a new
//! configuration at once (no restart).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::clock::Clock;
use crate::effective::{EffectiveConfig, SiteEmailConfig};
use crate::management_api::{ManagementClient, ManagementError};
use crate::store::Store;

const STATE_KEY: &str = "effective_config";

/// The configuration in use, and when it was fetched.
#[derive(Debug)]
pub struct Current {
    pub config: EffectiveConfig,
    pub fetched_at: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    fetched_at: DateTime<Utc>,
    config: SiteEmailConfig,
}

/// Read side: the current configuration and change notifications. Cheap to clone.
#[derive(Clone)]
pub struct ConfigHandle {
    rx: watch::Receiver<Option<Arc<Current>>>,
}

impl ConfigHandle {
    pub fn current(&self) -> Option<Arc<Current>> {
        self.rx.borrow().clone()
    }

    /// Resolves when the configuration changes (never, once the source is gone).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Sending is held: the Management Service refused this site (401: its credentials, 403: the
/// tenant is suspended, 404: the site was deleted or the tenant has no email settings). The
/// outbox keeps every message queued until a fetch succeeds again.
#[derive(Debug, Clone)]
pub struct Held {
    pub status: u16,
    pub detail: String,
    pub since: DateTime<Utc>,
}

impl Held {
    /// The `reason` shown for queued messages meanwhile.
    pub fn reason(&self) -> String {
        let what = match self.status {
            401 => "the site's credentials are refused",
            403 => "the tenant is suspended or the site may not send",
            404 => "the site was deleted or the tenant has no email settings",
            _ => "the site is refused",
        };
        format!(
            "sending held: {what} (the Management Service answered {}: {}); kept queued until it allows sending again",
            self.status, self.detail
        )
    }
}

/// The last fetch, for readiness and logs.
#[derive(Debug, Clone, Default)]
pub struct FetchState {
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

pub struct ConfigSource {
    client: Arc<ManagementClient>,
    store: Store,
    clock: Arc<dyn Clock>,
    tx: watch::Sender<Option<Arc<Current>>>,
    /// The JSON of the configuration in use, to tell a change.
    raw: Mutex<Option<String>>,
    state: Mutex<FetchState>,
    held: Mutex<Option<Held>>,
    wake: Notify,
}

impl ConfigSource {
    /// Loads the stored configuration, if any (an unreadable one is ignored with a warning).
    pub async fn new(
        client: Arc<ManagementClient>,
        store: Store,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<(Arc<Self>, ConfigHandle)> {
        let (tx, rx) = watch::channel(None);
        let source = Arc::new(ConfigSource {
            client,
            store,
            clock,
            tx,
            raw: Mutex::new(None),
            state: Mutex::new(FetchState::default()),
            held: Mutex::new(None),
            wake: Notify::new(),
        });
        if let Some(text) = source.store.state(STATE_KEY).await? {
            match serde_json::from_str::<Stored>(&text) {
                Ok(stored) => match EffectiveConfig::try_from(&stored.config) {
                    Ok(config) => {
                        tracing::info!(fetched_at = %stored.fetched_at, "using the stored email configuration until the Management Service answers");
                        source.set_raw(serde_json::to_string(&stored.config).ok());
                        source.tx.send_replace(Some(Arc::new(Current {
                            config,
                            fetched_at: stored.fetched_at,
                        })));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the stored email configuration is invalid; ignored")
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "the stored email configuration is unreadable; ignored")
                }
            }
        }
        Ok((source, ConfigHandle { rx }))
    }

    fn set_raw(&self, raw: Option<String>) {
        if let Ok(mut r) = self.raw.lock() {
            *r = raw;
        }
    }

    pub fn fetch_state(&self) -> FetchState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Asks the refresh loop to fetch now (e.g. after the SMTP server refused the password).
    pub fn refresh_soon(&self) {
        self.wake.notify_one();
    }

    /// Whether sending is held, and why.
    pub fn held(&self) -> Option<Held> {
        self.held.lock().ok().and_then(|h| h.clone())
    }

    fn update_held(&self, result: &Result<bool, ManagementError>) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        match result {
            Ok(_) => {
                if let Some(h) = held.take() {
                    tracing::warn!(
                        status = h.status,
                        since = %h.since,
                        "the Management Service allows this site again: sending resumes"
                    );
                }
            }
            Err(ManagementError::Refused { status, detail, .. })
                if matches!(*status, 401 | 403 | 404) =>
            {
                let h = Held {
                    status: *status,
                    detail: detail.clone(),
                    since: self.clock.now(),
                };
                if held.as_ref().is_none_or(|old| old.status != h.status) {
                    tracing::error!(
                        status = h.status,
                        detail = %h.detail,
                        "SENDING HELD: {}",
                        h.reason()
                    );
                    *held = Some(h);
                }
            }
            // Unreachable or an odd answer: keep sending with the configuration in use.
            Err(_) => {}
        }
    }

    /// Fetches the configuration once; returns whether it changed.
    pub async fn refresh(&self) -> Result<bool, ManagementError> {
        let result = self.fetch().await;
        self.update_held(&result);
        if let Ok(mut s) = self.state.lock() {
            match &result {
                Ok(_) => {
                    s.last_success = Some(self.clock.now());
                    s.last_error = None;
                }
                Err(e) => s.last_error = Some(e.to_string()),
            }
        }
        result
    }

    async fn fetch(&self) -> Result<bool, ManagementError> {
        let fetched = self.client.email_config().await?;
        let config = EffectiveConfig::try_from(&fetched)
            .map_err(|m| ManagementError::Invalid(format!("email-config: {m}")))?;
        let raw = serde_json::to_string(&fetched)
            .map_err(|e| ManagementError::Invalid(format!("email-config: {e}")))?;
        let unchanged = self
            .raw
            .lock()
            .map(|r| r.as_deref() == Some(raw.as_str()))
            .unwrap_or(false);
        if unchanged {
            return Ok(false);
        }
        let now = self.clock.now();
        let stored = serde_json::to_string(&Stored {
            fetched_at: now,
            config: fetched,
        })
        .map_err(|e| ManagementError::Invalid(format!("email-config: {e}")))?;
        if let Err(e) = self
            .store
            .put_state(STATE_KEY, &stored, now.timestamp_millis())
            .await
        {
            // Still use it: only a restart without the Management Service would miss it.
            tracing::error!(error = %e, "cannot store the email configuration locally");
        }
        self.set_raw(Some(raw));
        tracing::info!(
            host = config.server.host.as_str(),
            port = config.server.port.get(),
            auth = config.auth.method(),
            "email configuration updated"
        );
        self.tx.send_replace(Some(Arc::new(Current {
            config,
            fetched_at: now,
        })));
        Ok(true)
    }

    /// Fetches every `period` (the first time after `first_wait`); after a failure sooner
    /// (1 s, doubling up to `period`). Ends when `shutdown` turns true.
    pub fn spawn(
        self: Arc<Self>,
        period: Duration,
        first_wait: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut failures: u32 = 0;
            let mut wait = first_wait;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.wake.notified() => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    break;
                }
                wait = match self.refresh().await {
                    Ok(_) => {
                        failures = 0;
                        period
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(error = %e, "cannot fetch the email configuration; keeping the current one");
                        Duration::from_secs(1u64 << failures.min(16)).min(period)
                    }
                };
            }
        })
    }
}
