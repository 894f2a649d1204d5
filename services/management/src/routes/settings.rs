//! Tenant email settings and the provider presets (role tenant_admin; cluster_admin may act).

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use mail_core::presets::{ProviderPreset, presets};
use mail_core::problem::Problem;
use mail_core::settings::{
    Auth, EmailSettings, EmailSettingsRequest, EmailSettingsView, SecretPatch,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{AnyAdmin, TenantScope};
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::routes::method_not_allowed;
use crate::startup::AppState;
use crate::store::StoredSettings;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/email/providers")
            .route(web::get().to(list_providers))
            .default_service(web::to(method_not_allowed("GET"))),
    )
    .service(
        web::resource("/api/v1/tenants/{tenant_id}/email-settings")
            .route(web::get().to(get_settings))
            .route(web::put().to(put_settings))
            .default_service(web::to(method_not_allowed("GET, PUT"))),
    );
}

/// OAuth 2.0 grant status of the tenant.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    NotAuthorized,
    Authorized,
    ReauthorizationRequired,
}

/// OAuth 2.0 state as the Management Service sees it (read-only).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OAuthStatusView {
    pub status: GrantStatus,
    /// The user the grant belongs to.
    pub username: Option<String>,
    /// The exact redirect URI to register with the provider.
    #[schema(example = "https://postwire.example.com/oauth2/client/smtp/authorize-callback")]
    pub redirect_uri: String,
    pub access_token_expires_at: Option<DateTime<Utc>>,
    pub refreshed_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// Early warnings (refresh failing, client secret expiring, ...).
    pub warnings: Vec<String>,
}

/// `GET .../email-settings`: the stored settings, secrets shown only as `*_set`, plus the
/// read-only OAuth status.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EmailSettingsResponse {
    #[serde(flatten)]
    pub settings: EmailSettingsView,
    pub oauth: OAuthStatusView,
    pub updated_at: DateTime<Utc>,
}

async fn response(
    state: &AppState,
    scope: &TenantScope,
    s: StoredSettings,
) -> ApiResult<EmailSettingsResponse> {
    let grant = state
        .grants
        .status(scope.tenant(), Some(&s.settings))
        .await?;
    let oauth = match grant {
        Some(g) => OAuthStatusView {
            status: if g.status == crate::oauth::grants::STATUS_AUTHORIZED {
                GrantStatus::Authorized
            } else {
                GrantStatus::ReauthorizationRequired
            },
            username: g.username,
            redirect_uri: state.grants.redirect_uri().to_owned(),
            access_token_expires_at: g.access_token_expires_at,
            refreshed_at: g.refreshed_at,
            last_error: g.last_error,
            warnings: g.warnings,
        },
        None => OAuthStatusView {
            status: GrantStatus::NotAuthorized,
            username: None,
            redirect_uri: state.grants.redirect_uri().to_owned(),
            access_token_expires_at: None,
            refreshed_at: None,
            last_error: None,
            warnings: Vec::new(),
        },
    };
    Ok(EmailSettingsResponse {
        settings: s.settings.view(s.password_set, s.client_secret_set),
        oauth,
        updated_at: s.updated_at,
    })
}

/// Why a settings change invalidates the OAuth 2.0 grant, if it does.
fn grant_invalidation(
    old: Option<&EmailSettings>,
    new: &EmailSettings,
    secret_replaced: bool,
) -> Option<String> {
    let Some(Auth::Oauth2(old)) = old.map(|o| &o.auth) else {
        return None;
    };
    let Auth::Oauth2(new) = &new.auth else {
        return Some("OAuth 2.0 was switched off in the settings".into());
    };
    let mut changed = Vec::new();
    if old.client_id != new.client_id {
        changed.push("client id");
    }
    if secret_replaced {
        changed.push("client secret");
    }
    if old.token_url != new.token_url {
        changed.push("token URL");
    }
    if old.scopes != new.scopes {
        changed.push("scopes");
    }
    (!changed.is_empty()).then(|| format!("the {} changed: authorize again", changed.join(", ")))
}

/// List connection provider presets
///
/// Presets for Microsoft 365, Google and Custom. A preset only fills fields: every field it
/// fills stays editable in the settings. Microsoft URLs contain `{directory}`, replaced by
/// `auth.microsoft_directory` (default `organizations`).
#[utoipa::path(get, path = "/api/v1/email/providers", tag = "email settings",
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 200, description = "The presets", body = Vec<ProviderPreset>,
            example = json!([{"id": "microsoft365", "name": "Microsoft 365", "experimental": false, "server": {"host": "smtp.office365.com", "port": 587, "encryption": "starttls"}, "auth": {"methods": ["oauth2", "password"], "recommended_method": "oauth2", "authorization_url": "https://login.microsoftonline.com/{directory}/oauth2/v2.0/authorize", "token_url": "https://login.microsoftonline.com/{directory}/oauth2/v2.0/token", "scopes": ["https://outlook.office.com/SMTP.Send", "openid", "profile", "offline_access"], "authorization_params": {}, "issuer": "https://login.microsoftonline.com/{directory}/v2.0", "jwks_uri": "https://login.microsoftonline.com/{directory}/discovery/v2.0/keys"}, "notes": ["SMTP AUTH must be enabled for the organization and for the sending user, and Security Defaults must be off.", "Register a Web redirect URI equal to oauth.redirect_uri in the app registration.", "Only the user who performed the authorization can be the sender (From:).", "Single-tenant app registrations need the directory (tenant) id or domain in auth.microsoft_directory."]}, {"id": "custom", "name": "Custom", "experimental": false, "server": {"host": null, "port": 587, "encryption": "starttls"}, "auth": {"methods": ["none", "password", "oauth2"], "recommended_method": "password", "authorization_url": null, "token_url": null, "scopes": [], "authorization_params": {}, "issuer": null, "jwks_uri": null}, "notes": []}])),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json")))]
pub async fn list_providers(_admin: AnyAdmin) -> HttpResponse {
    HttpResponse::Ok().json(presets())
}

/// Read the email settings
///
/// Secrets are never returned: `password_set` and `client_secret_set` tell whether one is
/// stored. `oauth.redirect_uri` is the exact URI to register with the provider.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant_id}/email-settings", tag = "email settings",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme")),
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 200, description = "The settings", body = EmailSettingsResponse,
            example = json!({"provider": "microsoft365", "server": {"host": "smtp.office365.com", "port": 587, "encryption": "starttls"}, "auth": {"method": "oauth2", "username": null, "password_set": false, "client_id": "0f8e5c1a-2b3d-4e5f-8a9b-1c2d3e4f5a6b", "client_secret_set": true, "client_secret_expires_at": "2027-11-28", "authorization_url": "https://login.microsoftonline.com/acme.example/oauth2/v2.0/authorize", "token_url": "https://login.microsoftonline.com/acme.example/oauth2/v2.0/token", "issuer": "https://login.microsoftonline.com/acme.example/v2.0", "microsoft_directory": "acme.example", "scopes": ["https://outlook.office.com/SMTP.Send", "openid", "profile", "offline_access"], "authorization_username": "scanner@acme.example"}, "senders": [{"address": "scanner@acme.example", "name": "Acme Scanner", "default": true}], "receivers": [{"address": "it@acme.example", "purpose": "report"}], "feature_senders": {"scan_to_email": "scanner@acme.example", "payment_quota": null, "notification": null, "report": null}, "oauth": {"status": "authorized", "username": "scanner@acme.example", "redirect_uri": "https://postwire.example.com/oauth2/client/smtp/authorize-callback", "access_token_expires_at": "2026-11-28T10:35:12Z", "refreshed_at": "2026-11-28T10:05:12Z", "last_error": null, "warnings": []}, "updated_at": "2026-11-28T09:30:00Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant, or no settings stored yet", body = Problem, content_type = "application/problem+json")))]
pub async fn get_settings(
    state: web::Data<AppState>,
    scope: TenantScope,
) -> ApiResult<HttpResponse> {
    let s = state.store.settings(&scope).await?.ok_or_else(|| {
        ApiError::NotFound("no email settings are stored for this tenant yet".into())
    })?;
    Ok(HttpResponse::Ok().json(response(&state, &scope, s).await?))
}

/// Store the email settings
///
/// Replaces the settings. Secrets (`auth.password`, `auth.client_secret`) are write-only:
/// omit one to keep the stored value, send `null` to clear it. A change of `server.host` or
/// `auth.token_url` requires sending the secret again, so a stored secret never goes to a new
/// host. Read-only fields of the GET shape (`oauth`, `*_set`, `updated_at`) are ignored.
#[utoipa::path(put, path = "/api/v1/tenants/{tenant_id}/email-settings", tag = "email settings",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme")),
    request_body(content = EmailSettingsRequest, example = json!({
        "provider": "microsoft365",
        "server": {"host": "smtp.office365.com", "port": 587, "encryption": "starttls"},
        "auth": {"method": "password", "username": "scanner@acme.example", "password": "app-password"},
        "senders": [{"address": "scanner@acme.example", "name": "Acme Scanner", "default": true}],
        "receivers": [{"address": "it@acme.example", "purpose": "report"}],
        "feature_senders": {"scan_to_email": "scanner@acme.example"}
    })),
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 200, description = "Stored; the settings in the GET shape", body = EmailSettingsResponse,
            example = json!({"provider": "microsoft365", "server": {"host": "smtp.office365.com", "port": 587, "encryption": "starttls"}, "auth": {"method": "password", "username": "scanner@acme.example", "password_set": true, "client_id": null, "client_secret_set": false, "client_secret_expires_at": null, "authorization_url": null, "token_url": null, "issuer": null, "microsoft_directory": null, "scopes": [], "authorization_username": null}, "senders": [{"address": "scanner@acme.example", "name": "Acme Scanner", "default": true}], "receivers": [{"address": "it@acme.example", "purpose": "report"}], "feature_senders": {"scan_to_email": "scanner@acme.example", "payment_quota": null, "notification": null, "report": null}, "oauth": {"status": "not_authorized", "username": null, "redirect_uri": "https://postwire.example.com/oauth2/client/smtp/authorize-callback", "access_token_expires_at": null, "refreshed_at": null, "last_error": null, "warnings": []}, "updated_at": "2026-11-28T10:05:12Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field(s), each named by its path", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "senders[0].address: is not a valid email address (Missing domain or user)", "errors": [{"field": "senders[0].address", "message": "is not a valid email address (Missing domain or user)"}]}))))]
pub async fn put_settings(
    state: web::Data<AppState>,
    scope: TenantScope,
    body: ApiJson<EmailSettingsRequest>,
) -> ApiResult<HttpResponse> {
    let old = state.store.settings(&scope).await?.map(|o| o.settings);
    let secret_replaced = matches!(body.0.auth.client_secret, SecretPatch::Set(_));
    let s = state
        .store
        .put_settings(&scope, body.0, state.clock.now())
        .await?;
    if let Some(reason) = grant_invalidation(old.as_ref(), &s.settings, secret_replaced) {
        state.grants.invalidate(scope.tenant(), &reason).await?;
    }
    Ok(HttpResponse::Ok().json(response(&state, &scope, s).await?))
}
