//! OAuth 2.0 access tokens for XOAUTH2: kept in memory, when `REDIS_URL` is set in the
//! tenant's shared Redis entry (encrypted with the tenant's derived key), and in the local
//! state (survives a restart, so the site keeps sending while the Management Service is down
//! until the token expires); looked up in that order. A token is fetched from the Management Service when none of
//! those has one with enough validity left, and every cached token is refreshed preemptively
//! (`POSTWIRE_TOKEN_REFRESH`, default hourly).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use mail_core::smtp::SmtpAuth;
use mail_core::token_cache::{CachedToken, RedisTokenCache, derive_tenant_key};
use secrecy::{ExposeSecret as _, SecretSlice, SecretString};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config_source::ConfigHandle;
use crate::effective::{EffectiveAuth, EffectiveConfig};
use crate::management_api::{ManagementClient, ManagementError};
use crate::metrics::{Metrics, TokenSource};
use crate::store::Store;

/// A token with less than this left is not used for a new delivery (a quarter of the
/// lifetime for short-lived tokens).
const MIN_LEFT_SECS: i64 = 60;

/// Seconds a token must have left to be used for a new delivery: 60, or a quarter of its
/// lifetime when that is shorter (a 60 s token is usable for 45 s).
fn min_left(t: &CachedToken) -> i64 {
    let lifetime = (t.expires_at - t.issued_at).num_seconds().max(0);
    MIN_LEFT_SECS.min(lifetime / 4)
}

/// How long a refusal of the Management Service (409: not authorized, reauthorization
/// required) is remembered before it is asked again: a queue of thousands of messages waiting
/// for a tenant admin asks once per period, not once per message.
const REFUSAL_TTL: Duration = Duration::from_secs(10);
/// The same for a Management Service that cannot be reached (every message would otherwise
/// wait for its own connect timeout, one after another).
const UNREACHABLE_TTL: Duration = Duration::from_secs(2);

/// Why no access token can be had now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// The tenant's grant was revoked or has expired: a tenant admin must authorize OAuth 2.0
    /// again (the Management Service answered 409 `reauthorization-required`).
    ReauthorizationRequired(String),
    /// The tenant has not authorized OAuth 2.0 yet (409 `oauth-not-authorized`).
    NotAuthorized(String),
    /// Anything else: the Management Service cannot be reached, the configuration is not
    /// OAuth 2.0 (any more), ...; try again later.
    Unavailable(String),
}

impl TokenError {
    /// The `reason` of a message that waits for this.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::ReauthorizationRequired(_) => REAUTHORIZATION_REQUIRED,
            TokenError::NotAuthorized(_) => OAUTH_NOT_AUTHORIZED,
            TokenError::Unavailable(_) => WAITING_FOR_TOKEN,
        }
    }

    /// Only a tenant admin can end it (by authorizing in the email settings).
    pub fn needs_admin(&self) -> bool {
        !matches!(self, TokenError::Unavailable(_))
    }

    fn from_management(e: &ManagementError) -> Self {
        let text = format!("cannot get an access token from the Management Service: {e}");
        match (e.status(), e.problem()) {
            (Some(409), Some("reauthorization-required")) => {
                TokenError::ReauthorizationRequired(format!(
                    "{text}; a tenant admin must authorize OAuth 2.0 again in the email settings"
                ))
            }
            (Some(409), Some("oauth-not-authorized")) => TokenError::NotAuthorized(format!(
                "{text}; a tenant admin must authorize OAuth 2.0 in the email settings"
            )),
            _ => TokenError::Unavailable(text),
        }
    }
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::ReauthorizationRequired(m)
            | TokenError::NotAuthorized(m)
            | TokenError::Unavailable(m) => f.write_str(m),
        }
    }
}

/// `reason` of a message held while no access token can be had (the Management Service is
/// unreachable and the cached token has expired); the cause is in `last_error`.
pub const WAITING_FOR_TOKEN: &str = "waiting for access token";
/// `reason` of a message held because the tenant's OAuth 2.0 grant was revoked or expired
/// (the grant's status in the Management Service has the same name); `last_error` says what
/// the provider answered. The message goes out once a tenant admin authorizes again.
pub const REAUTHORIZATION_REQUIRED: &str = "reauthorization_required";
/// `reason` of a message held because the tenant has not authorized OAuth 2.0 yet.
pub const OAUTH_NOT_AUTHORIZED: &str = "oauth_not_authorized";

fn state_key(tenant: &str) -> String {
    format!("smtp_access_token:{tenant}")
}

pub struct TokenProvider {
    client: Arc<ManagementClient>,
    store: Store,
    clock: Arc<dyn Clock>,
    redis: Option<RedisTokenCache>,
    /// `POSTWIRE_CACHE_KEY`: the root the tenant keys derive from, when the configuration
    /// does not carry the tenant's key.
    cache_root: Option<SecretSlice<u8>>,
    memory: Mutex<Option<(String, CachedToken)>>,
    metrics: Arc<Metrics>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    /// The last refusal: (tenant, asked again after, why).
    refused: Mutex<Option<(String, std::time::Instant, TokenError)>>,
}

impl TokenProvider {
    pub fn new(
        client: Arc<ManagementClient>,
        store: Store,
        clock: Arc<dyn Clock>,
        redis: Option<RedisTokenCache>,
        cache_root: Option<SecretSlice<u8>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        TokenProvider {
            client,
            store,
            clock,
            redis,
            cache_root,
            memory: Mutex::new(None),
            metrics,
            fetching: tokio::sync::Mutex::new(()),
            refused: Mutex::new(None),
        }
    }

    /// XOAUTH2 credentials for `cfg` (which uses OAuth 2.0). `rejected`: the token the SMTP
    /// server just refused, which must not be returned again.
    pub async fn smtp_auth(
        &self,
        cfg: &EffectiveConfig,
        rejected: Option<&SecretString>,
    ) -> Result<SmtpAuth, TokenError> {
        let EffectiveAuth::Oauth2 {
            authorization_username,
        } = &cfg.auth
        else {
            return Err(TokenError::Unavailable(
                "the configuration does not use OAuth 2.0".into(),
            ));
        };
        let token = self.token(cfg, rejected).await?;
        let username = token
            .username
            .clone()
            .or_else(|| {
                authorization_username
                    .as_ref()
                    .map(|u| u.as_str().to_owned())
            })
            .ok_or_else(|| {
                TokenError::Unavailable("the OAuth 2.0 authorization has no username yet".into())
            })?;
        Ok(SmtpAuth::Xoauth2 {
            username,
            access_token: SecretString::from(token.access_token.expose().to_owned()),
        })
    }

    fn tenant_key(&self, cfg: &EffectiveConfig) -> Option<SecretSlice<u8>> {
        if let Some(info) = &cfg.token_cache
            && let Ok(k) = base64::engine::general_purpose::STANDARD.decode(info.key.expose())
            && k.len() == 32
        {
            return Some(SecretSlice::from(k));
        }
        self.cache_root
            .as_ref()
            .map(|root| derive_tenant_key(root, &cfg.tenant_id))
    }

    fn usable(t: &CachedToken, now: DateTime<Utc>, rejected: Option<&SecretString>) -> bool {
        t.remaining(now) > min_left(t)
            && rejected.is_none_or(|r| r.expose_secret() != t.access_token.expose())
    }

    async fn token(
        &self,
        cfg: &EffectiveConfig,
        rejected: Option<&SecretString>,
    ) -> Result<CachedToken, TokenError> {
        let tenant = cfg.tenant_id.as_str();
        let _one = self.fetching.lock().await;
        let now = self.clock.now();
        // memory
        if let Ok(m) = self.memory.lock()
            && let Some((t, tok)) = m.as_ref()
            && t == tenant
            && Self::usable(tok, now, rejected)
        {
            self.metrics.token(TokenSource::Memory);
            return Ok(tok.clone());
        }
        // shared cache (another site mailer of the tenant may have a fresher token)
        if let (Some(redis), Some(key)) = (&self.redis, self.tenant_key(cfg)) {
            match redis.get(&key, tenant).await {
                Ok(Some(tok)) if Self::usable(&tok, now, rejected) => {
                    self.remember(tenant, &tok);
                    self.save_local(tenant, &tok).await;
                    self.metrics.token(TokenSource::Redis);
                    return Ok(tok);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "Redis token cache unavailable"),
            }
        }
        // local state
        if let Ok(Some(text)) = self.store.state(&state_key(tenant)).await
            && let Ok(tok) = serde_json::from_str::<CachedToken>(&text)
            && Self::usable(&tok, now, rejected)
        {
            self.remember(tenant, &tok);
            self.metrics.token(TokenSource::Local);
            return Ok(tok);
        }
        // the Management Service, unless it refused a moment ago
        if let Ok(r) = self.refused.lock()
            && let Some((t, until, why)) = r.as_ref()
            && t == tenant
            && std::time::Instant::now() < *until
        {
            return Err(why.clone());
        }
        let min_validity = rejected.map(|_| 86_400);
        let tok = self.fetch(cfg, min_validity).await?;
        self.metrics.token(TokenSource::Management);
        Ok(tok)
    }

    async fn fetch(
        &self,
        cfg: &EffectiveConfig,
        min_validity: Option<i64>,
    ) -> Result<CachedToken, TokenError> {
        let tenant = cfg.tenant_id.as_str();
        let got = match self.client.smtp_access_token(min_validity).await {
            Ok(got) => got,
            Err(e) => {
                let why = TokenError::from_management(&e);
                let ttl = if why.needs_admin() {
                    REFUSAL_TTL
                } else {
                    UNREACHABLE_TTL
                };
                if let Ok(mut r) = self.refused.lock() {
                    *r = Some((
                        tenant.to_owned(),
                        std::time::Instant::now() + ttl,
                        why.clone(),
                    ));
                }
                return Err(why);
            }
        };
        if let Ok(mut r) = self.refused.lock() {
            *r = None;
        }
        let now = self.clock.now();
        self.metrics.token_refreshed(now.timestamp_millis());
        let tok = CachedToken {
            access_token: got.access_token,
            expires_at: got.expires_at,
            issued_at: now,
            username: got.username,
        };
        self.remember(tenant, &tok);
        self.save_local(tenant, &tok).await;
        if let (Some(redis), Some(key)) = (&self.redis, self.tenant_key(cfg))
            && let Err(e) = redis.put(&key, tenant, &tok, now).await
        {
            tracing::warn!(error = %e, "cannot share the access token in Redis");
        }
        Ok(tok)
    }

    fn remember(&self, tenant: &str, tok: &CachedToken) {
        if let Ok(mut m) = self.memory.lock() {
            *m = Some((tenant.to_owned(), tok.clone()));
        }
    }

    async fn save_local(&self, tenant: &str, tok: &CachedToken) {
        let Ok(text) = serde_json::to_string(tok) else {
            return;
        };
        if let Err(e) = self
            .store
            .put_state(&state_key(tenant), &text, self.clock.now_ms())
            .await
        {
            tracing::warn!(error = %e, "cannot store the access token locally");
        }
    }

    /// Forgets the cached tokens (memory and local state) of `tenant`.
    pub async fn forget(&self, tenant: &str) {
        if let Ok(mut m) = self.memory.lock() {
            *m = None;
        }
        let _ = self.store.delete_state(&state_key(tenant)).await;
    }

    /// Refreshes the cached token every `period` while the configuration uses OAuth 2.0: asks
    /// the Management Service for a token valid longer than the cached one, so the provider
    /// issues a new one (the site then keeps sending for the token's lifetime without the
    /// Management Service).
    pub fn spawn_refresh(
        self: Arc<Self>,
        config: ConfigHandle,
        period: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    break;
                }
                let Some(current) = config.current() else {
                    continue;
                };
                let cfg = &current.config;
                if !matches!(cfg.auth, EffectiveAuth::Oauth2 { .. }) {
                    continue;
                }
                let cached = self
                    .memory
                    .lock()
                    .ok()
                    .and_then(|m| m.as_ref().map(|(_, t)| t.clone()));
                let now = self.clock.now();
                let min_validity = cached
                    .map(|t| (t.remaining(now) + 1).clamp(0, 86_400))
                    .unwrap_or(0);
                let _one = self.fetching.lock().await;
                match self.fetch(cfg, Some(min_validity)).await {
                    Ok(t) => tracing::info!(expires_at = %t.expires_at, "access token refreshed"),
                    Err(e) => tracing::warn!(error = %e, "preemptive access-token refresh failed"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(status: u16, problem: Option<&str>) -> ManagementError {
        ManagementError::Refused {
            status,
            detail: "reauthorization required: invalid_grant: revoked".into(),
            problem: problem.map(str::to_owned),
        }
    }

    #[test]
    fn refusals_become_reasons() {
        let e = TokenError::from_management(&refused(409, Some("reauthorization-required")));
        assert_eq!(e.reason(), REAUTHORIZATION_REQUIRED);
        assert!(e.needs_admin());
        assert!(e.to_string().contains("invalid_grant: revoked"), "{e}");
        assert!(e.to_string().contains("authorize OAuth 2.0 again"), "{e}");

        let e = TokenError::from_management(&refused(409, Some("oauth-not-authorized")));
        assert_eq!(e.reason(), OAUTH_NOT_AUTHORIZED);
        assert!(e.needs_admin());

        // OAuth 2.0 not configured, an unknown problem type, other statuses, no answer:
        // wait and ask again
        for e in [
            refused(409, Some("conflict")),
            refused(409, None),
            refused(403, Some("reauthorization-required")),
            ManagementError::Unreachable("connection refused".into()),
        ] {
            let t = TokenError::from_management(&e);
            assert_eq!(t.reason(), WAITING_FOR_TOKEN, "{e}");
            assert!(!t.needs_admin());
        }
    }
}
