//! What sites call: token exchange and their effective email configuration.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use mail_core::crypto::sha256;
use mail_core::problem::Problem;
use mail_core::secret::WireSecret;
use mail_core::settings::{
    Auth, AuthMethod, FeatureSendersView, ProviderId, ReceiverView, SenderView, ServerView,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Role, SiteIdentity};
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::routes::method_not_allowed;
use crate::routes::sites::hex;
use crate::startup::AppState;
use crate::store::TenantStatus;

/// Lifetime of a site token.
pub const SITE_TOKEN_TTL_SECS: i64 = 3600;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/site-auth/token")
            .route(web::post().to(site_token))
            .default_service(web::to(method_not_allowed("POST"))),
    )
    .service(
        web::resource("/api/v1/site/email-config")
            .route(web::get().to(email_config))
            .default_service(web::to(method_not_allowed("GET"))),
    )
    .service(
        web::resource("/api/v1/site/smtp-access-token")
            .route(web::get().to(smtp_access_token))
            .default_service(web::to(method_not_allowed("GET"))),
    );
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokenQuery {
    /// Seconds the token must still be valid; a cached token with less left is refreshed.
    /// Default: min(300, half the token's lifetime).
    #[param(minimum = 0, maximum = 86400)]
    pub min_validity: Option<i64>,
}

/// An access token for SMTP XOAUTH2.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SiteAccessToken {
    #[schema(value_type = String, format = Password)]
    pub access_token: WireSecret,
    pub expires_at: DateTime<Utc>,
    /// The XOAUTH2 user (the authorization username).
    pub username: Option<String>,
}

/// Get an SMTP access token
///
/// Served from the cache when it has at least `min_validity` seconds left, otherwise
/// refreshed (single-flight across replicas). The refresh token never leaves the Management
/// Service. 409 when the tenant must authorize (again); 503 with `Retry-After` when the
/// provider cannot be reached.
#[utoipa::path(get, path = "/api/v1/site/smtp-access-token", tag = "site",
    params(TokenQuery),
    security(("bearer" = ["site"])),
    responses(
        (status = 200, description = "An access token", body = SiteAccessToken,
            example = json!({"access_token": "eyJ0eXAiOiJKV1QiLCJub25jZSI6Ik...redacted-example...", "expires_at": "2026-11-28T10:35:12Z", "username": "scanner@acme.example"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a site token, or the tenant is suspended", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The site was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "OAuth 2.0 not configured (`conflict`), not authorized yet (`oauth-not-authorized`), or the grant was revoked or expired (`reauthorization-required`: site mailers keep their messages queued with the reason `reauthorization_required`)", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:reauthorization-required", "title": "Reauthorization required", "status": 409, "detail": "reauthorization required: invalid_grant: AADSTS700082: The refresh token has expired due to inactivity."})),
        (status = 422, description = "Invalid query", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "min_validity: must be between 0 and 86400 seconds", "errors": [{"field": "min_validity", "message": "must be between 0 and 86400 seconds"}]})),
        (status = 503, description = "The provider cannot be reached now", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:unavailable", "title": "Temporarily unavailable", "status": 503, "detail": "the provider cannot be reached: temporarily_unavailable: AADSTS50196: The server terminated an operation because it encountered a client request loop."}))))]
pub async fn smtp_access_token(
    state: web::Data<AppState>,
    site: SiteIdentity,
    q: web::Query<TokenQuery>,
) -> ApiResult<HttpResponse> {
    if let Some(v) = q.min_validity
        && !(0..=86_400).contains(&v)
    {
        return Err(ApiError::field(
            "min_validity",
            "must be between 0 and 86400 seconds",
        ));
    }
    check_site(&state, &site).await?;
    let token = state
        .grants
        .access_token(&site.tenant, q.min_validity)
        .await?;
    Ok(HttpResponse::Ok().json(SiteAccessToken {
        access_token: token.access_token,
        expires_at: token.expires_at,
        username: token.username,
    }))
}

/// The site still exists and its tenant is active. A positive answer is remembered for
/// [`SiteGate::TTL`], so the token endpoint's cache hits touch no database; deleting a site
/// or suspending its tenant takes effect within that time.
async fn check_site(state: &AppState, site: &SiteIdentity) -> ApiResult<()> {
    if state.site_gate.is_open(&site.tenant, &site.site_id) {
        return Ok(());
    }
    check_site_uncached(state, site).await?;
    state.site_gate.open(&site.tenant, &site.site_id);
    Ok(())
}

async fn check_site_uncached(state: &AppState, site: &SiteIdentity) -> ApiResult<()> {
    let tenant = state
        .store
        .tenant(&site.tenant)
        .await?
        .ok_or_else(|| ApiError::NotFound("the tenant no longer exists".into()))?;
    if tenant.status == TenantStatus::Suspended {
        return Err(ApiError::Forbidden("the tenant is suspended".into()));
    }
    if !state.store.site_exists(&site.tenant, &site.site_id).await? {
        return Err(ApiError::NotFound("the site no longer exists".into()));
    }
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteTokenRequest {
    pub site_id: String,
    /// The secret shown when the site was created.
    #[schema(value_type = String, format = Password)]
    pub secret: SecretString,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SiteTokenResponse {
    /// A site JWT for the `/api/v1/site/*` operations.
    pub access_token: String,
    #[schema(example = "Bearer")]
    pub token_type: String,
    /// Seconds until it expires.
    #[schema(example = 3600)]
    pub expires_in: i64,
}

/// Exchange site credentials for a site token
///
/// The only `/api` operation without a bearer token: the site secret authenticates it.
#[utoipa::path(post, path = "/api/v1/site-auth/token", tag = "site",
    request_body(content = SiteTokenRequest, example = json!({"site_id": "site_3f2a9c4e0b1d4e7a8c6b5a4f3e2d1c0b", "secret": "FP_HNzovYS6_ak7ZgA_0Np6Brdr0ZhKG96TYGdqqbAk"})),
    responses(
        (status = 200, description = "A site token", body = SiteTokenResponse,
            example = json!({"access_token": "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzaXRlXzNmMmE5YzRlMGIxZDRlN2E4YzZiNWE0ZjNlMmQxYzBiIiwicm9sZSI6InNpdGUiLCJ0ZW5hbnQiOiJhY21lIn0.reNQgmGmzx7XQybdl1LtkUpfm-iAa5NZCHQMNinZi48", "token_type": "Bearer", "expires_in": 3600})),
        (status = 401, description = "Unknown site or wrong secret", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:unauthorized", "title": "Authentication required", "status": 401, "detail": "unknown site or wrong secret"})),
        (status = 403, description = "The tenant is suspended", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:forbidden", "title": "Forbidden", "status": 403, "detail": "the tenant is suspended"})),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field(s)", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "site_id: missing field `site_id`", "errors": [{"field": "site_id", "message": "missing field `site_id`"}]}))))]
pub async fn site_token(
    state: web::Data<AppState>,
    body: ApiJson<SiteTokenRequest>,
) -> ApiResult<HttpResponse> {
    let req = body.0;
    let denied = || ApiError::Unauthorized("unknown site or wrong secret");
    let known = crate::routes::sites::is_site_id(&req.site_id);
    let found = if known {
        state.store.site_for_auth(&req.site_id).await?
    } else {
        None
    };
    let Some((site, tenant)) = found else {
        // Spend the same work as a real check, so timing does not reveal which ids exist.
        let _ = sha256(req.secret.expose_secret().as_bytes());
        return Err(denied());
    };
    let given = hex(&sha256(req.secret.expose_secret().as_bytes()));
    let same = given.len() == site.secret_hash.len()
        && aws_lc_rs::constant_time::verify_slices_are_equal(
            given.as_bytes(),
            site.secret_hash.as_bytes(),
        )
        .is_ok();
    if !same {
        return Err(denied());
    }
    if tenant.status == TenantStatus::Suspended {
        return Err(ApiError::Forbidden("the tenant is suspended".into()));
    }
    let now = state.clock.now().timestamp();
    let token = state.jwt.issue(
        Role::Site,
        Some(tenant.id.as_str()),
        Some(&site.id),
        &site.id,
        now,
        SITE_TOKEN_TTL_SECS,
    )?;
    Ok(HttpResponse::Ok().json(SiteTokenResponse {
        access_token: token,
        token_type: "Bearer".into(),
        expires_in: SITE_TOKEN_TTL_SECS,
    }))
}

/// Remembers, for a few seconds, which sites passed the existence and suspension checks.
#[derive(Default)]
pub struct SiteGate {
    open: std::sync::Mutex<std::collections::HashMap<(String, String), std::time::Instant>>,
}

impl SiteGate {
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(5);

    fn is_open(&self, tenant: &mail_core::domain::TenantId, site: &str) -> bool {
        let Ok(m) = self.open.lock() else {
            return false;
        };
        m.get(&(tenant.as_str().to_owned(), site.to_owned()))
            .is_some_and(|at| at.elapsed() < Self::TTL)
    }

    fn open(&self, tenant: &mail_core::domain::TenantId, site: &str) {
        if let Ok(mut m) = self.open.lock() {
            if m.len() > 100_000 {
                m.retain(|_, at| at.elapsed() < Self::TTL);
            }
            m.insert(
                (tenant.as_str().to_owned(), site.to_owned()),
                std::time::Instant::now(),
            );
        }
    }
}

/// The effective authorization a site uses.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SiteAuthConfig {
    pub method: AuthMethod,
    /// Username for password auth.
    pub username: Option<String>,
    /// Password for password auth (sites need it to send).
    #[schema(value_type = Option<String>, format = Password)]
    pub password: Option<WireSecret>,
    /// For OAuth 2.0: the user the access token belongs to (the XOAUTH2 user and the only
    /// allowed sender with Microsoft 365).
    pub authorization_username: Option<String>,
}

/// The shared access-token cache entry of the site's tenant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenCacheInfo {
    /// Redis key of the tenant's access token.
    #[schema(example = "postwire:v1:token:acme")]
    pub redis_key: String,
    /// The tenant's derived cache key (base64): decrypts only this tenant's entry.
    #[schema(value_type = String, format = Password)]
    pub key: WireSecret,
}

/// `GET /api/v1/site/email-config`: what a site needs to send. Never a refresh token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SiteEmailConfig {
    pub tenant_id: String,
    pub site_id: String,
    pub provider: ProviderId,
    pub server: ServerView,
    pub auth: SiteAuthConfig,
    pub senders: Vec<SenderView>,
    pub receivers: Vec<ReceiverView>,
    pub feature_senders: FeatureSendersView,
    /// True when the site's override replaced server and authorization.
    pub override_applied: bool,
    /// For OAuth 2.0: how to read the shared access-token cache (this tenant's key only).
    pub token_cache: Option<TokenCacheInfo>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// Read this site's effective email configuration
///
/// The tenant's settings with the site's override applied. Includes the password when
/// password authentication is used; never a refresh token.
#[utoipa::path(get, path = "/api/v1/site/email-config", tag = "site",
    security(("bearer" = ["site"])),
    responses(
        (status = 200, description = "The effective configuration", body = SiteEmailConfig,
            example = json!({"tenant_id": "acme", "site_id": "site_3f2a9c4e0b1d4e7a8c6b5a4f3e2d1c0b", "provider": "microsoft365", "server": {"host": "smtp.office365.com", "port": 587, "encryption": "starttls"}, "auth": {"method": "password", "username": "scanner@acme.example", "password": "app-password", "authorization_username": null}, "senders": [{"address": "scanner@acme.example", "name": "Acme Scanner", "default": true}], "receivers": [{"address": "it@acme.example", "purpose": "report"}], "feature_senders": {"scan_to_email": "scanner@acme.example", "payment_quota": null, "notification": null, "report": null}, "override_applied": false, "token_cache": null, "updated_at": "2026-11-28T09:30:00Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a site token, or the tenant is suspended", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The site was deleted, or nothing is configured", body = Problem, content_type = "application/problem+json")))]
pub async fn email_config(
    state: web::Data<AppState>,
    site: SiteIdentity,
) -> ApiResult<HttpResponse> {
    let store = &state.store;
    let tenant = store
        .tenant(&site.tenant)
        .await?
        .ok_or_else(|| ApiError::NotFound("the tenant no longer exists".into()))?;
    if tenant.status == TenantStatus::Suspended {
        return Err(ApiError::Forbidden("the tenant is suspended".into()));
    }
    let (s, override_pw) = store
        .site_of_tenant(&site.tenant, &site.site_id)
        .await?
        .ok_or_else(|| ApiError::NotFound("the site no longer exists".into()))?;
    let settings = store.settings_for_site(&site.tenant).await?;
    let (provider, server, auth, override_applied) = match (&s.override_, &settings) {
        (Some(o), _) => {
            let auth = match &o.auth {
                Auth::Password { username } => SiteAuthConfig {
                    method: AuthMethod::Password,
                    username: Some(username.clone()),
                    password: override_pw.map(WireSecret::from),
                    authorization_username: None,
                },
                _ => SiteAuthConfig {
                    method: AuthMethod::None,
                    username: None,
                    password: None,
                    authorization_username: None,
                },
            };
            (ProviderId::Custom, o.server.clone(), auth, true)
        }
        (None, Some(st)) => {
            let auth = match &st.settings.auth {
                Auth::None => SiteAuthConfig {
                    method: AuthMethod::None,
                    username: None,
                    password: None,
                    authorization_username: None,
                },
                Auth::Password { username } => SiteAuthConfig {
                    method: AuthMethod::Password,
                    username: Some(username.clone()),
                    password: store
                        .settings_password(&site.tenant)
                        .await?
                        .map(WireSecret::from),
                    authorization_username: None,
                },
                Auth::Oauth2(o) => SiteAuthConfig {
                    method: AuthMethod::Oauth2,
                    username: None,
                    password: None,
                    authorization_username: o
                        .authorization_username
                        .as_ref()
                        .map(|a| a.as_str().to_owned()),
                },
            };
            (
                st.settings.provider,
                st.settings.server.clone(),
                auth,
                false,
            )
        }
        (None, None) => {
            return Err(ApiError::NotFound(
                "no email settings are configured for this tenant".into(),
            ));
        }
    };
    let token_cache = (auth.method == AuthMethod::Oauth2).then(|| {
        use base64::Engine as _;
        TokenCacheInfo {
            redis_key: mail_core::token_cache::redis_key(site.tenant.as_str()),
            key: WireSecret::new(
                base64::engine::general_purpose::STANDARD.encode(
                    state
                        .grants
                        .tenant_cache_key(site.tenant.as_str())
                        .expose_secret(),
                ),
            ),
        }
    });
    let view = settings.as_ref().map(|st| st.settings.view(false, false));
    Ok(HttpResponse::Ok().json(SiteEmailConfig {
        tenant_id: site.tenant.as_str().to_owned(),
        site_id: site.site_id,
        provider,
        server: ServerView {
            host: server.host.as_str().to_owned(),
            port: server.port.get(),
            encryption: server.encryption,
        },
        auth,
        senders: view.as_ref().map(|v| v.senders.clone()).unwrap_or_default(),
        receivers: view
            .as_ref()
            .map(|v| v.receivers.clone())
            .unwrap_or_default(),
        feature_senders: view.map(|v| v.feature_senders).unwrap_or_default(),
        override_applied,
        token_cache,
        updated_at: settings.map(|s| s.updated_at),
    }))
}
