//! The OAuth 2.0 grant of each tenant: pending authorizations, the encrypted refresh-token
//! vault, access tokens (memory → Redis → database row → provider), single-flight refresh
//! across replicas, keep-alive and early warnings.
//!
//! Refresh is single-flight twice over: a per-tenant mutex inside the process, and a lease on
//! the grant row across replicas (a conditional UPDATE, so it works on SQLite and PostgreSQL
//! and holds no connection). The provider call runs under the lease but outside any
//! transaction; the result is written fenced on the generation read before the call. If that
//! write fails, the rotated refresh token is kept in memory and the write retried; the old
//! token is never used again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use mail_core::crypto::{Binding, KeyRing, random_bytes};
use mail_core::egress::EgressClient;
use mail_core::secret::WireSecret;
use mail_core::settings::{Auth, EmailSettings, OAuthSettings, ProviderId};
use mail_core::token_cache::{CachedToken, MemoryTokenCache, RedisTokenCache, derive_tenant_key};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder,
};
use secrecy::{ExposeSecret, SecretSlice, SecretString};

use super::provider::{self, ProviderError};
use crate::clock::Clock;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::COL_CLIENT_SECRET;
use crate::store::entities::{email_settings, oauth_grant, oauth_pending};
use mail_core::domain::TenantId;

pub const STATUS_AUTHORIZED: &str = "authorized";
pub const STATUS_REAUTH: &str = "reauthorization_required";
/// The refresh-token column binding (what its ciphertext is bound to, with the tenant).
pub const COL_REFRESH: &str = "oauth_grants.refresh_token";
const COL_ACCESS: &str = "oauth_grants.access_token";
const COL_VERIFIER: &str = "oauth_pending.verifier";
const LEASE: chrono::Duration = chrono::Duration::seconds(60);
const PENDING_TTL: chrono::Duration = chrono::Duration::minutes(10);

/// How many grants the keeper refreshes at once.
pub const KEEPER_CONCURRENCY: usize = 4;

/// How often the keeper looks for grants due for keep-alive: a 24th of the keep-alive period,
/// between 10 s and 15 minutes, so a grant is refreshed within one tick of falling due.
pub fn keeper_tick(keepalive: Duration) -> Duration {
    (keepalive / 24).clamp(Duration::from_secs(10), Duration::from_secs(900))
}

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("OAuth 2.0 is not configured for this tenant")]
    NotConfigured,
    #[error("the tenant has not authorized OAuth 2.0 yet")]
    NotAuthorized,
    #[error("reauthorization required: {0}")]
    ReauthorizationRequired(String),
    #[error("the provider cannot be reached: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<sea_orm::DbErr> for GrantError {
    fn from(e: sea_orm::DbErr) -> Self {
        GrantError::Api(e.into())
    }
}

impl From<GrantError> for ApiError {
    fn from(e: GrantError) -> Self {
        match e {
            GrantError::NotConfigured => ApiError::Conflict(e.to_string()),
            GrantError::NotAuthorized => ApiError::OauthNotAuthorized(e.to_string()),
            GrantError::ReauthorizationRequired(_) => {
                ApiError::ReauthorizationRequired(e.to_string())
            }
            GrantError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            GrantError::Api(a) => a,
        }
    }
}

/// What the callback page reports.
#[derive(Debug)]
pub enum CallbackOutcome {
    Authorized {
        tenant: String,
        username: Option<String>,
    },
    ProviderError {
        error: String,
        description: String,
    },
    Failed {
        status: u16,
        error: String,
        description: String,
    },
}

pub struct Grants {
    db: DatabaseConnection,
    keys: Arc<KeyRing>,
    cache_root: SecretSlice<u8>,
    memory: MemoryTokenCache,
    redis: Option<RedisTokenCache>,
    http: EgressClient,
    instance: String,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Rotated refresh tokens whose write has not succeeded yet: (generation, token).
    unsaved: Mutex<HashMap<String, (i64, SecretString)>>,
    redirect_uri: String,
    clock: Arc<dyn Clock>,
    keepalive: chrono::Duration,
    /// Counts provider token calls (for tests and metrics).
    provider_calls: std::sync::atomic::AtomicU64,
    metrics: Arc<Metrics>,
}

pub struct GrantStatusView {
    pub status: &'static str,
    pub username: Option<String>,
    pub access_token_expires_at: Option<DateTime<Utc>>,
    pub refreshed_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub warnings: Vec<String>,
}

impl Grants {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: DatabaseConnection,
        keys: Arc<KeyRing>,
        cache_root: SecretSlice<u8>,
        redis: Option<RedisTokenCache>,
        http: EgressClient,
        redirect_uri: String,
        clock: Arc<dyn Clock>,
        keepalive: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            db,
            keys,
            cache_root,
            // Trusted for 5 s, then confirmed with Redis or the grant row: a grant forgotten
            // on another replica stops being served within that time.
            memory: MemoryTokenCache::with_max_age(Duration::from_secs(5)),
            redis,
            http,
            instance: uuid::Uuid::new_v4().to_string(),
            locks: Mutex::new(HashMap::new()),
            unsaved: Mutex::new(HashMap::new()),
            redirect_uri,
            clock,
            keepalive: chrono::Duration::from_std(keepalive).unwrap_or(chrono::Duration::hours(24)),
            provider_calls: std::sync::atomic::AtomicU64::new(0),
            metrics,
        }
    }

    /// The egress-checked HTTP client for outbound calls.
    pub fn http(&self) -> &EgressClient {
        &self.http
    }

    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    pub fn provider_calls(&self) -> u64 {
        self.provider_calls
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The tenant's derived cache key (what its sites receive).
    pub fn tenant_cache_key(&self, tenant: &str) -> SecretSlice<u8> {
        derive_tenant_key(&self.cache_root, tenant)
    }

    fn seal(&self, tenant: &str, column: &str, plain: &[u8]) -> Vec<u8> {
        self.keys.encrypt(
            Binding {
                owner: tenant,
                column,
            },
            plain,
        )
    }

    fn open(&self, tenant: &str, column: &str, ct: &[u8]) -> Result<SecretString, ApiError> {
        self.keys
            .decrypt_string(
                Binding {
                    owner: tenant,
                    column,
                },
                ct,
            )
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("{column} of {tenant}: {e}")))
    }

    async fn oauth_settings(
        &self,
        tenant: &TenantId,
    ) -> Result<(ProviderId, OAuthSettings, SecretString), GrantError> {
        let row = email_settings::Entity::find_by_id(tenant.as_str().to_owned())
            .one(&self.db)
            .await?
            .ok_or(GrantError::NotConfigured)?;
        let settings: EmailSettings = serde_json::from_str(&row.document)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored settings: {e}")))?;
        let Auth::Oauth2(o) = settings.auth else {
            return Err(GrantError::NotConfigured);
        };
        let ct = row.client_secret_ct.ok_or(GrantError::NotConfigured)?;
        let secret = self.open(tenant.as_str(), COL_CLIENT_SECRET, &ct)?;
        Ok((settings.provider, *o, secret))
    }

    // ---------------------------------------------------------------- authorize

    /// Stores a pending authorization and returns the provider URL for the popup.
    pub async fn authorize(
        &self,
        tenant: &TenantId,
        requested_by: &str,
    ) -> Result<(String, DateTime<Utc>), ApiError> {
        let (provider_id, o, _secret) = match self.oauth_settings(tenant).await {
            Ok(v) => v,
            Err(GrantError::NotConfigured) => {
                return Err(ApiError::field(
                    "auth.method",
                    "store OAuth 2.0 settings with a client secret before authorizing",
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let now = self.clock.now();
        let state = URL_SAFE_NO_PAD.encode(random_bytes::<32>());
        let nonce = URL_SAFE_NO_PAD.encode(random_bytes::<24>());
        let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
        let url = provider::authorization_url(
            provider_id,
            &o,
            &self.redirect_uri,
            &state,
            &challenge,
            &nonce,
        )
        .map_err(|e| ApiError::field("auth.authorization_url", e.to_string()))?;
        let expires_at = now + PENDING_TTL;
        oauth_pending::Entity::insert(oauth_pending::ActiveModel {
            state: Set(state.clone()),
            tenant_id: Set(tenant.as_str().to_owned()),
            verifier_ct: Set(self.seal(
                tenant.as_str(),
                COL_VERIFIER,
                verifier.secret().as_bytes(),
            )),
            nonce: Set(nonce),
            requested_by: Set(requested_by.to_owned()),
            redirect_uri: Set(self.redirect_uri.clone()),
            created_at: Set(now),
            expires_at: Set(expires_at),
            used_at: Set(None),
        })
        .exec(&self.db)
        .await?;
        // Old pending rows are useless: drop the expired ones while we are here.
        oauth_pending::Entity::delete_many()
            .filter(oauth_pending::Column::ExpiresAt.lt(now - chrono::Duration::hours(1)))
            .exec(&self.db)
            .await?;
        Ok((url, expires_at))
    }

    // ---------------------------------------------------------------- callback

    /// Completes an authorization. The state is consumed first and exactly once.
    pub async fn callback(
        &self,
        state: Option<&str>,
        code: Option<&str>,
        error: Option<&str>,
        error_description: Option<&str>,
        iss: Option<&str>,
    ) -> CallbackOutcome {
        let fail = |status: u16, error: &str, description: String| CallbackOutcome::Failed {
            status,
            error: error.to_owned(),
            description,
        };
        // States are base64url (see `authorize`); anything else is no state of ours and never
        // reaches the database (PostgreSQL refuses NUL in text: a 503 for garbage input).
        let Some(state) = state.filter(|s| {
            !s.is_empty()
                && s.len() <= 200
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }) else {
            return fail(
                400,
                "invalid_request",
                "the authorization response has no state".into(),
            );
        };
        let now = self.clock.now();
        // Consume the state: one conditional UPDATE decides, so a replay loses even when it
        // races the first use on another replica.
        let consumed = oauth_pending::Entity::update_many()
            .col_expr(oauth_pending::Column::UsedAt, Expr::value(now))
            .filter(oauth_pending::Column::State.eq(state))
            .filter(oauth_pending::Column::UsedAt.is_null())
            .filter(oauth_pending::Column::ExpiresAt.gt(now))
            .exec(&self.db)
            .await;
        match consumed {
            Ok(r) if r.rows_affected == 1 => {}
            Ok(_) => {
                return fail(
                    400,
                    "invalid_state",
                    "this authorization link is unknown, expired (10 minutes) or already used; start again with Authorize".into(),
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "oauth callback: database");
                return fail(
                    503,
                    "temporarily_unavailable",
                    "the service cannot complete the authorization right now; try again".into(),
                );
            }
        }
        let pending = match oauth_pending::Entity::find_by_id(state.to_owned())
            .one(&self.db)
            .await
        {
            Ok(Some(p)) => p,
            _ => return fail(503, "temporarily_unavailable", "try again".into()),
        };
        let Ok(tenant) = TenantId::parse(&pending.tenant_id) else {
            return fail(400, "invalid_state", "unknown tenant".into());
        };
        tracing::Span::current().record("tenant_id", tenant.as_str());
        if let Some(err) = error {
            return CallbackOutcome::ProviderError {
                error: err.chars().take(200).collect(),
                description: error_description
                    .unwrap_or_default()
                    .chars()
                    .take(1000)
                    .collect(),
            };
        }
        let Some(code) = code.filter(|c| !c.is_empty()) else {
            return fail(
                400,
                "invalid_request",
                "the authorization response has no code".into(),
            );
        };
        let (provider_id, o, secret) = match self.oauth_settings(&tenant).await {
            Ok(v) => v,
            Err(e) => return fail(409, "not_configured", e.to_string()),
        };
        let keys = match provider::id_token_keys(&self.http, provider_id, &o).await {
            Ok(k) => k,
            Err(e) => return fail(502, "discovery_failed", e),
        };
        // RFC 9207: when the provider names itself, it must be the one we expect.
        if let (Some(iss), Some(expected)) = (iss, &keys.issuer)
            && iss != expected
        {
            return fail(
                400,
                "invalid_issuer",
                format!("the response comes from issuer {iss}, expected {expected}"),
            );
        }
        let verifier = match self.open(tenant.as_str(), COL_VERIFIER, &pending.verifier_ct) {
            Ok(v) => v,
            Err(_) => {
                return fail(
                    500,
                    "server_error",
                    "the stored verifier cannot be read".into(),
                );
            }
        };
        self.provider_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tokens = match provider::exchange_code(
            &self.http,
            &o,
            &secret,
            &pending.redirect_uri,
            code,
            verifier.expose_secret(),
        )
        .await
        {
            Ok(t) => t,
            Err(e) => return fail(502, "token_exchange_failed", e.summary()),
        };
        let Some(refresh) = tokens.refresh_token.clone() else {
            return fail(
                502,
                "no_refresh_token",
                "the provider returned no refresh token: request offline access (Microsoft: the offline_access scope; Google: access_type=offline&prompt=consent)".into(),
            );
        };
        let mut username = None;
        if let Some(id) = &tokens.id_token {
            match provider::verify_id_token(&self.http, &keys, &o.client_id, id, &pending.nonce)
                .await
            {
                Ok(claims) => username = claims.username(),
                Err(e) => return fail(400, "invalid_id_token", e),
            }
        }
        let now = self.clock.now();
        let cached = CachedToken {
            access_token: WireSecret::from(tokens.access_token.clone()),
            expires_at: now
                + chrono::Duration::from_std(tokens.expires_in)
                    .unwrap_or(chrono::Duration::hours(1)),
            issued_at: now,
            username: username.as_ref().map(|u| u.as_str().to_owned()),
        };
        if let Err(e) = self.store_new_grant(&tenant, &refresh, &cached, now).await {
            tracing::error!(error = %e, "oauth callback: storing the grant");
            return fail(
                503,
                "temporarily_unavailable",
                "the grant could not be stored; authorize again".into(),
            );
        }
        if let Some(u) = &username
            && let Err(e) = set_authorization_username(&self.db, &tenant, u).await
        {
            tracing::warn!(error = %e, "could not prefill the authorization username");
        }
        self.cache_put(tenant.as_str(), &cached).await;
        tracing::info!(tenant = %tenant, "OAuth 2.0 grant authorized");
        CallbackOutcome::Authorized {
            tenant: tenant.as_str().to_owned(),
            username: username.map(|u| u.as_str().to_owned()),
        }
    }

    async fn store_new_grant(
        &self,
        tenant: &TenantId,
        refresh: &SecretString,
        token: &CachedToken,
        now: DateTime<Utc>,
    ) -> Result<(), sea_orm::DbErr> {
        let t = tenant.as_str();
        let am = oauth_grant::ActiveModel {
            tenant_id: Set(t.to_owned()),
            status: Set(STATUS_AUTHORIZED.to_owned()),
            refresh_token_ct: Set(Some(self.seal(
                t,
                COL_REFRESH,
                refresh.expose_secret().as_bytes(),
            ))),
            access_token_ct: Set(Some(self.seal(
                t,
                COL_ACCESS,
                token.access_token.expose().as_bytes(),
            ))),
            access_expires_at: Set(Some(token.expires_at)),
            access_issued_at: Set(Some(token.issued_at)),
            username: Set(token.username.clone()),
            obtained_at: Set(now),
            refreshed_at: Set(Some(now)),
            last_error: Set(None),
            failing_since: Set(None),
            lease_owner: Set(None),
            lease_until: Set(None),
            generation: Set(1),
            updated_at: Set(now),
        };
        oauth_grant::Entity::insert(am)
            .on_conflict(
                OnConflict::column(oauth_grant::Column::TenantId)
                    .update_columns([
                        oauth_grant::Column::Status,
                        oauth_grant::Column::RefreshTokenCt,
                        oauth_grant::Column::AccessTokenCt,
                        oauth_grant::Column::AccessExpiresAt,
                        oauth_grant::Column::AccessIssuedAt,
                        oauth_grant::Column::Username,
                        oauth_grant::Column::ObtainedAt,
                        oauth_grant::Column::RefreshedAt,
                        oauth_grant::Column::LastError,
                        oauth_grant::Column::FailingSince,
                        oauth_grant::Column::LeaseOwner,
                        oauth_grant::Column::LeaseUntil,
                        oauth_grant::Column::UpdatedAt,
                    ])
                    .value(
                        oauth_grant::Column::Generation,
                        Expr::col((oauth_grant::Entity, oauth_grant::Column::Generation)).add(1),
                    )
                    .to_owned(),
            )
            .exec(&self.db)
            .await?;
        if let Ok(mut u) = self.unsaved.lock() {
            u.remove(t);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- cache layers

    async fn cache_put(&self, tenant: &str, token: &CachedToken) {
        self.memory.put(tenant, token.clone());
        if let Some(r) = &self.redis
            && let Err(e) = r
                .put(
                    &self.tenant_cache_key(tenant),
                    tenant,
                    token,
                    self.clock.now(),
                )
                .await
        {
            tracing::warn!(tenant, error = %e, "Redis unavailable: token kept in memory and the database");
        }
    }

    async fn cache_drop(&self, tenant: &str) {
        self.memory.delete(tenant);
        if let Some(r) = &self.redis
            && let Err(e) = r.delete(tenant).await
        {
            tracing::warn!(tenant, error = %e, "Redis unavailable: could not drop the cached token");
        }
    }

    fn acceptable(
        token: &CachedToken,
        min_validity: Option<i64>,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> bool {
        let want = min_validity.unwrap_or_else(|| token.default_min_validity());
        // A token issued since the request began is as fresh as it gets.
        token.remaining(now) >= want || (token.issued_at >= since && token.remaining(now) > 0)
    }

    /// Memory, then Redis, then the grant row.
    async fn cached(
        &self,
        tenant: &str,
        min_validity: Option<i64>,
        since: DateTime<Utc>,
    ) -> Result<Option<CachedToken>, GrantError> {
        let now = self.clock.now();
        if let Some(t) = self.memory.get(tenant, now)
            && Self::acceptable(&t, min_validity, since, now)
        {
            self.metrics
                .token_source
                .with_label_values(&["memory"])
                .inc();
            return Ok(Some(t));
        }
        if let Some(r) = &self.redis {
            match r.get(&self.tenant_cache_key(tenant), tenant).await {
                Ok(Some(t)) if Self::acceptable(&t, min_validity, since, now) => {
                    self.memory.put(tenant, t.clone());
                    self.metrics
                        .token_source
                        .with_label_values(&["redis"])
                        .inc();
                    return Ok(Some(t));
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(tenant, error = %e, "Redis unavailable: falling back"),
            }
        }
        let Some(g) = oauth_grant::Entity::find_by_id(tenant.to_owned())
            .one(&self.db)
            .await?
        else {
            return Err(GrantError::NotAuthorized);
        };
        if g.status != STATUS_AUTHORIZED {
            return Err(GrantError::ReauthorizationRequired(
                g.last_error.unwrap_or_else(|| "authorize again".into()),
            ));
        }
        if let (Some(ct), Some(exp), Some(iss)) =
            (&g.access_token_ct, g.access_expires_at, g.access_issued_at)
        {
            let t = CachedToken {
                access_token: WireSecret::from(self.open(tenant, COL_ACCESS, ct)?),
                expires_at: exp,
                issued_at: iss,
                username: g.username.clone(),
            };
            if Self::acceptable(&t, min_validity, since, now) {
                self.cache_put(tenant, &t).await;
                self.metrics
                    .token_source
                    .with_label_values(&["database"])
                    .inc();
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    fn lock_for(&self, tenant: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = match self.locks.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(tenant.to_owned()).or_default().clone()
    }

    // ---------------------------------------------------------------- access tokens

    /// An access token with at least `min_validity` seconds left (default: min(5 min, half its
    /// lifetime)), from the cache layers or by a single-flight refresh.
    #[tracing::instrument(name = "oauth.access_token", skip_all, fields(tenant_id = %tenant.as_str()))]
    pub async fn access_token(
        &self,
        tenant: &TenantId,
        min_validity: Option<i64>,
    ) -> Result<CachedToken, GrantError> {
        let since = self.clock.now();
        if let Some(t) = self.cached(tenant.as_str(), min_validity, since).await? {
            return Ok(t);
        }
        self.refresh_single_flight(tenant, min_validity, since, false)
            .await
    }

    async fn refresh_single_flight(
        &self,
        tenant: &TenantId,
        min_validity: Option<i64>,
        since: DateTime<Utc>,
        force: bool,
    ) -> Result<CachedToken, GrantError> {
        let t = tenant.as_str();
        let lock = self.lock_for(t);
        let _guard = lock.lock().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if !force && let Some(tok) = self.cached(t, min_validity, since).await? {
                return Ok(tok);
            }
            if self.try_lease(t).await? {
                let result = self.refresh_under_lease(tenant).await;
                self.release_lease(t).await;
                return result;
            }
            if std::time::Instant::now() > deadline {
                return Err(GrantError::Unavailable(
                    "another replica holds the refresh lease for too long".into(),
                ));
            }
            // Another replica is refreshing: wait for its token to appear.
            let jitter = u64::from(random_bytes::<1>()[0]) % 100;
            tokio::time::sleep(Duration::from_millis(50 + jitter)).await;
            if force {
                // The keeper only needs *a* recent refresh.
                if let Some(tok) = self.cached(t, None, since).await?
                    && tok.issued_at >= since
                {
                    return Ok(tok);
                }
            }
        }
    }

    #[tracing::instrument(name = "db.try_lease", skip_all, fields(otel.kind = "client", tenant_id = %tenant))]
    async fn try_lease(&self, tenant: &str) -> Result<bool, GrantError> {
        let now = self.clock.now();
        let r = oauth_grant::Entity::update_many()
            .col_expr(
                oauth_grant::Column::LeaseOwner,
                Expr::value(self.instance.clone()),
            )
            .col_expr(oauth_grant::Column::LeaseUntil, Expr::value(now + LEASE))
            .filter(oauth_grant::Column::TenantId.eq(tenant))
            .filter(oauth_grant::Column::Status.eq(STATUS_AUTHORIZED))
            .filter(
                Condition::any()
                    .add(oauth_grant::Column::LeaseUntil.is_null())
                    .add(oauth_grant::Column::LeaseUntil.lt(now))
                    .add(oauth_grant::Column::LeaseOwner.eq(self.instance.clone())),
            )
            .exec(&self.db)
            .await?;
        if r.rows_affected == 1 {
            return Ok(true);
        }
        // Not leased: either another replica holds it, or the grant is gone or dead.
        match oauth_grant::Entity::find_by_id(tenant.to_owned())
            .one(&self.db)
            .await?
        {
            None => Err(GrantError::NotAuthorized),
            Some(g) if g.status != STATUS_AUTHORIZED => Err(GrantError::ReauthorizationRequired(
                g.last_error.unwrap_or_else(|| "authorize again".into()),
            )),
            Some(_) => Ok(false),
        }
    }

    #[tracing::instrument(name = "db.release_lease", skip_all, fields(otel.kind = "client", tenant_id = %tenant))]
    async fn release_lease(&self, tenant: &str) {
        let r = oauth_grant::Entity::update_many()
            .col_expr(
                oauth_grant::Column::LeaseOwner,
                Expr::value(Option::<String>::None),
            )
            .col_expr(
                oauth_grant::Column::LeaseUntil,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(oauth_grant::Column::TenantId.eq(tenant))
            .filter(oauth_grant::Column::LeaseOwner.eq(self.instance.clone()))
            .exec(&self.db)
            .await;
        if let Err(e) = r {
            tracing::warn!(tenant, error = %e, "could not release the refresh lease (it expires by itself)");
        }
    }

    #[tracing::instrument(name = "oauth.refresh", skip_all, fields(tenant_id = %tenant.as_str(), result = tracing::field::Empty))]
    async fn refresh_under_lease(&self, tenant: &TenantId) -> Result<CachedToken, GrantError> {
        let t = tenant.as_str();
        let g = oauth_grant::Entity::find_by_id(t.to_owned())
            .one(&self.db)
            .await?
            .ok_or(GrantError::NotAuthorized)?;
        let (_, o, secret) = self.oauth_settings(tenant).await?;
        // A rotated token whose write failed earlier is newer than the row.
        let unsaved = self.unsaved.lock().ok().and_then(|u| u.get(t).cloned());
        let (generation, refresh) = match unsaved {
            Some((generation, tok)) if generation > g.generation => (generation, tok),
            _ => {
                let ct = g
                    .refresh_token_ct
                    .as_ref()
                    .ok_or(GrantError::NotAuthorized)?;
                (g.generation, self.open(t, COL_REFRESH, ct)?)
            }
        };
        let mut attempt = 0;
        let tokens = loop {
            self.provider_calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match provider::refresh(&self.http, &o, &secret, &self.redirect_uri, &refresh).await {
                Ok(tokens) => {
                    self.metrics
                        .token_refreshes
                        .with_label_values(&["success"])
                        .inc();
                    tracing::Span::current().record("result", "success");
                    break tokens;
                }
                Err(ProviderError::InvalidGrant { code, description }) => {
                    self.metrics
                        .token_refreshes
                        .with_label_values(&["invalid_grant"])
                        .inc();
                    tracing::Span::current().record("result", "invalid_grant");
                    let why = format!("{code}: {description}");
                    self.mark(t, generation, STATUS_REAUTH, &why).await;
                    self.cache_drop(t).await;
                    tracing::warn!(tenant = t, reason = %why, "OAuth 2.0 grant needs reauthorization");
                    return Err(GrantError::ReauthorizationRequired(why));
                }
                Err(ProviderError::Rejected { code, description }) => {
                    self.metrics
                        .token_refreshes
                        .with_label_values(&["rejected"])
                        .inc();
                    tracing::Span::current().record("result", "rejected");
                    let why = format!("{code}: {description}");
                    self.mark(t, generation, STATUS_AUTHORIZED, &why).await;
                    return Err(GrantError::Unavailable(why));
                }
                Err(ProviderError::Transient(why)) => {
                    self.metrics
                        .token_refreshes
                        .with_label_values(&["transient"])
                        .inc();
                    tracing::Span::current().record("result", "transient");
                    attempt += 1;
                    if attempt >= 3 {
                        self.mark(t, generation, STATUS_AUTHORIZED, &why).await;
                        tracing::warn!(tenant = t, error = %why, "token refresh failing");
                        return Err(GrantError::Unavailable(why));
                    }
                    let jitter = u64::from(random_bytes::<1>()[0]) * 2;
                    tokio::time::sleep(Duration::from_millis(200 * (1 << attempt) + jitter)).await;
                }
            }
        };
        let now = self.clock.now();
        let cached = CachedToken {
            access_token: WireSecret::from(tokens.access_token.clone()),
            expires_at: now
                + chrono::Duration::from_std(tokens.expires_in)
                    .unwrap_or(chrono::Duration::hours(1)),
            issued_at: now,
            username: g.username.clone(),
        };
        // A response without a refresh token keeps the old one.
        let new_refresh = tokens.refresh_token.unwrap_or(refresh);
        self.store_refreshed(t, generation, &new_refresh, &cached)
            .await;
        self.cache_put(t, &cached).await;
        Ok(cached)
    }

    /// Writes a refresh result fenced on the generation read before the provider call. A failed
    /// write keeps the rotated token in memory and retries in the background.
    async fn store_refreshed(
        &self,
        tenant: &str,
        generation: i64,
        refresh: &SecretString,
        token: &CachedToken,
    ) {
        if let Ok(mut u) = self.unsaved.lock() {
            u.insert(tenant.to_owned(), (generation + 1, refresh.clone()));
        }
        for attempt in 0..5u32 {
            match self
                .write_refreshed(tenant, generation, refresh, token)
                .await
            {
                Ok(true) => {
                    if let Ok(mut u) = self.unsaved.lock()
                        && u.get(tenant).is_some_and(|(g, _)| *g == generation + 1)
                    {
                        u.remove(tenant);
                    }
                    return;
                }
                Ok(false) => {
                    tracing::error!(
                        tenant,
                        generation,
                        "grant changed during refresh; the newer grant wins"
                    );
                    if let Ok(mut u) = self.unsaved.lock() {
                        u.remove(tenant);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(tenant, attempt, error = %e, "storing the rotated refresh token failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * (1 << attempt))).await;
                }
            }
        }
        tracing::error!(
            tenant,
            "the rotated refresh token is kept in memory until the database accepts it"
        );
    }

    #[tracing::instrument(name = "db.write_refreshed", skip_all, fields(otel.kind = "client", tenant_id = %tenant))]
    async fn write_refreshed(
        &self,
        tenant: &str,
        generation: i64,
        refresh: &SecretString,
        token: &CachedToken,
    ) -> Result<bool, sea_orm::DbErr> {
        let now = self.clock.now();
        let r = oauth_grant::Entity::update_many()
            .col_expr(
                oauth_grant::Column::RefreshTokenCt,
                Expr::value(Some(self.seal(
                    tenant,
                    COL_REFRESH,
                    refresh.expose_secret().as_bytes(),
                ))),
            )
            .col_expr(
                oauth_grant::Column::AccessTokenCt,
                Expr::value(Some(self.seal(
                    tenant,
                    COL_ACCESS,
                    token.access_token.expose().as_bytes(),
                ))),
            )
            .col_expr(
                oauth_grant::Column::AccessExpiresAt,
                Expr::value(Some(token.expires_at)),
            )
            .col_expr(
                oauth_grant::Column::AccessIssuedAt,
                Expr::value(Some(token.issued_at)),
            )
            .col_expr(oauth_grant::Column::RefreshedAt, Expr::value(Some(now)))
            .col_expr(
                oauth_grant::Column::LastError,
                Expr::value(Option::<String>::None),
            )
            .col_expr(
                oauth_grant::Column::FailingSince,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .col_expr(oauth_grant::Column::Generation, Expr::value(generation + 1))
            .col_expr(oauth_grant::Column::UpdatedAt, Expr::value(now))
            .filter(oauth_grant::Column::TenantId.eq(tenant))
            .filter(oauth_grant::Column::Generation.eq(generation))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected == 1)
    }

    /// Records a failure (fenced on the generation, so a stale failure never overrides a newer
    /// success).
    async fn mark(&self, tenant: &str, generation: i64, status: &str, why: &str) {
        let now = self.clock.now();
        let mut q = oauth_grant::Entity::update_many()
            .col_expr(oauth_grant::Column::Status, Expr::value(status.to_owned()))
            .col_expr(
                oauth_grant::Column::LastError,
                Expr::value(Some(why.chars().take(500).collect::<String>())),
            )
            .col_expr(oauth_grant::Column::UpdatedAt, Expr::value(now))
            .filter(oauth_grant::Column::TenantId.eq(tenant))
            .filter(oauth_grant::Column::Generation.eq(generation));
        if status == STATUS_REAUTH {
            q = q
                .col_expr(
                    oauth_grant::Column::RefreshTokenCt,
                    Expr::value(Option::<Vec<u8>>::None),
                )
                .col_expr(
                    oauth_grant::Column::AccessTokenCt,
                    Expr::value(Option::<Vec<u8>>::None),
                );
        }
        if let Err(e) = q.exec(&self.db).await {
            tracing::error!(tenant, error = %e, "could not record the grant's failure");
        }
        let _ = oauth_grant::Entity::update_many()
            .col_expr(oauth_grant::Column::FailingSince, Expr::value(Some(now)))
            .filter(oauth_grant::Column::TenantId.eq(tenant))
            .filter(oauth_grant::Column::FailingSince.is_null())
            .exec(&self.db)
            .await;
    }

    // ---------------------------------------------------------------- lifecycle

    /// Forgets the grant and its cached token.
    pub async fn forget(&self, tenant: &TenantId) -> Result<bool, ApiError> {
        let gone = oauth_grant::Entity::delete_by_id(tenant.as_str().to_owned())
            .exec(&self.db)
            .await?
            .rows_affected
            > 0;
        self.cache_drop(tenant.as_str()).await;
        Ok(gone)
    }

    /// After a settings change that invalidates the grant (client id or secret, token URL,
    /// scopes, or leaving OAuth 2.0): the refresh token is dropped and the reason recorded.
    pub async fn invalidate(&self, tenant: &TenantId, reason: &str) -> Result<(), ApiError> {
        let now = self.clock.now();
        oauth_grant::Entity::update_many()
            .col_expr(oauth_grant::Column::Status, Expr::value(STATUS_REAUTH))
            .col_expr(
                oauth_grant::Column::LastError,
                Expr::value(Some(reason.to_owned())),
            )
            .col_expr(
                oauth_grant::Column::RefreshTokenCt,
                Expr::value(Option::<Vec<u8>>::None),
            )
            .col_expr(
                oauth_grant::Column::AccessTokenCt,
                Expr::value(Option::<Vec<u8>>::None),
            )
            .col_expr(oauth_grant::Column::UpdatedAt, Expr::value(now))
            .col_expr(
                oauth_grant::Column::Generation,
                Expr::col(oauth_grant::Column::Generation).add(1),
            )
            .filter(oauth_grant::Column::TenantId.eq(tenant.as_str()))
            .exec(&self.db)
            .await?;
        self.cache_drop(tenant.as_str()).await;
        Ok(())
    }

    pub async fn status(
        &self,
        tenant: &TenantId,
        settings: Option<&EmailSettings>,
    ) -> Result<Option<GrantStatusView>, ApiError> {
        let Some(g) = oauth_grant::Entity::find_by_id(tenant.as_str().to_owned())
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let now = self.clock.now();
        let mut warnings = Vec::new();
        if g.status == STATUS_AUTHORIZED
            && let (Some(since), Some(err)) = (g.failing_since, &g.last_error)
        {
            warnings.push(format!(
                "token refresh failing since {}: {err}",
                since.to_rfc3339()
            ));
        }
        // The provider's last refusal, in plain words (AADSTS700082, AADSTS50076, ...).
        if let Some(advice) = g.last_error.as_deref().and_then(mail_core::hints::hint) {
            warnings.push(advice.to_owned());
        }
        if let Some(Auth::Oauth2(o)) = settings.map(|s| &s.auth)
            && let Some(d) = o.client_secret_expires_at
        {
            let days = (d - now.date_naive()).num_days();
            if days < 0 {
                warnings.push(format!(
                    "the client secret expired on {d}: create a new one and store it"
                ));
            } else if days <= 30 {
                warnings.push(format!(
                    "the client secret expires on {d} ({days} days): create a new one before then"
                ));
            }
        }
        if settings.is_some_and(|s| s.provider == ProviderId::Google) {
            let age = (now - g.obtained_at).num_days();
            if age >= 6 {
                warnings.push(format!(
                    "this Google grant is {age} days old: apps in testing mode lose their refresh tokens after 7 days"
                ));
            }
        }
        Ok(Some(GrantStatusView {
            status: if g.status == STATUS_AUTHORIZED {
                STATUS_AUTHORIZED
            } else {
                STATUS_REAUTH
            },
            username: g.username,
            access_token_expires_at: g.access_expires_at,
            refreshed_at: g.refreshed_at,
            last_error: g.last_error,
            warnings,
        }))
    }

    /// Updates the grant gauges (by status, oldest successful refresh): at scrape time, one
    /// aggregate query.
    pub async fn update_gauges(&self) {
        use sea_orm::{FromQueryResult, QuerySelect};
        #[derive(FromQueryResult)]
        struct Row {
            status: String,
            n: i64,
        }
        let rows = oauth_grant::Entity::find()
            .select_only()
            .column(oauth_grant::Column::Status)
            .column_as(oauth_grant::Column::TenantId.count(), "n")
            .group_by(oauth_grant::Column::Status)
            .into_model::<Row>()
            .all(&self.db)
            .await;
        if let Ok(rows) = rows {
            for s in [STATUS_AUTHORIZED, STATUS_REAUTH] {
                let n = rows
                    .iter()
                    .find(|r| r.status == s)
                    .map(|r| r.n)
                    .unwrap_or(0);
                self.metrics.grants.with_label_values(&[s]).set(n);
            }
        }
        let oldest = oauth_grant::Entity::find()
            .filter(oauth_grant::Column::Status.eq(STATUS_AUTHORIZED))
            .order_by_asc(oauth_grant::Column::RefreshedAt)
            .one(&self.db)
            .await;
        let age = match oldest {
            Ok(Some(g)) => g
                .refreshed_at
                .map(|t| (self.clock.now() - t).num_milliseconds() as f64 / 1000.0)
                .unwrap_or(0.0),
            _ => 0.0,
        };
        self.metrics.oldest_refresh_age.set(age.max(0.0));
    }

    /// Refreshes every authorized grant not refreshed within the keep-alive period, at most
    /// `concurrency` at a time. Returns how many were refreshed.
    pub async fn keepalive_once(&self, concurrency: usize) -> usize {
        let now = self.clock.now();
        let due = match oauth_grant::Entity::find()
            .filter(oauth_grant::Column::Status.eq(STATUS_AUTHORIZED))
            .filter(
                Condition::any()
                    .add(oauth_grant::Column::RefreshedAt.is_null())
                    .add(oauth_grant::Column::RefreshedAt.lt(now - self.keepalive)),
            )
            .all(&self.db)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "keep-alive: cannot list grants");
                return 0;
            }
        };
        use futures_util::StreamExt as _;
        futures_util::stream::iter(due)
            .map(|g| async move {
                let Ok(tenant) = TenantId::parse(&g.tenant_id) else {
                    return false;
                };
                match self.refresh_single_flight(&tenant, None, now, true).await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(tenant = %tenant, error = %e, "keep-alive refresh failed");
                        false
                    }
                }
            })
            .buffer_unordered(concurrency.max(1))
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await
    }
}

async fn set_authorization_username(
    db: &DatabaseConnection,
    tenant: &TenantId,
    username: &mail_core::domain::EmailAddress,
) -> Result<(), ApiError> {
    let Some(row) = email_settings::Entity::find_by_id(tenant.as_str().to_owned())
        .one(db)
        .await?
    else {
        return Ok(());
    };
    let mut s: EmailSettings = serde_json::from_str(&row.document)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored settings: {e}")))?;
    if let Auth::Oauth2(o) = &mut s.auth {
        o.authorization_username = Some(username.clone());
    }
    let doc = serde_json::to_string(&s).map_err(|e| ApiError::Internal(e.into()))?;
    email_settings::Entity::update_many()
        .col_expr(email_settings::Column::Document, Expr::value(doc))
        .filter(email_settings::Column::TenantId.eq(tenant.as_str()))
        .exec(db)
        .await?;
    Ok(())
}
