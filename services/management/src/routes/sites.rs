//! Sites of a tenant: each runs a site mailer and authenticates with a secret shown once.

use actix_web::{HttpResponse, web};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use mail_core::crypto::{random_bytes, sha256};
use mail_core::domain::{Port, SmtpHost, header_text};
use mail_core::problem::{FieldErrors, Problem};
use mail_core::secret::WireSecret;
use mail_core::settings::{
    Auth, AuthMethod, Encryption, SecretPatch, Server, ServerRequest, ServerView,
};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::TenantScope;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::routes::method_not_allowed;
use crate::startup::AppState;
use crate::store::{Site, SiteOverride, SitePassword};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/tenants/{tenant_id}/sites")
            .route(web::post().to(create_site))
            .route(web::get().to(list_sites))
            .default_service(web::to(method_not_allowed("GET, POST"))),
    )
    .service(
        web::resource("/api/v1/tenants/{tenant_id}/sites/{site_id}")
            .route(web::put().to(update_site))
            .route(web::delete().to(delete_site))
            .default_service(web::to(method_not_allowed("PUT, DELETE"))),
    );
}

/// Body of `POST .../sites`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteCreateRequest {
    #[schema(example = "Brno office")]
    pub name: String,
    /// Overrides server and authorization for this site (no auth or username and password
    /// only; OAuth 2.0 cannot be overridden).
    #[serde(rename = "override")]
    pub override_: Option<SiteOverrideRequest>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteOverrideRequest {
    pub server: ServerRequest,
    pub auth: SiteAuthRequest,
}

/// Body of `PUT .../sites/{site_id}`: the site's name and override, replaced.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteUpdateRequest {
    #[schema(example = "Brno office")]
    pub name: String,
    /// The new override; omitted or `null` removes it (the site then uses the tenant's
    /// settings).
    #[serde(rename = "override")]
    pub override_: Option<SiteOverrideRequest>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteAuthRequest {
    /// `none` or `password`; `oauth2` is refused.
    pub method: AuthMethod,
    pub username: Option<String>,
    /// Write-only. When updating a site, omit it to keep the stored password (only while
    /// the host stays the same: a stored password never goes to a new host).
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    pub password: SecretPatch,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SiteOverrideView {
    pub server: ServerView,
    pub method: AuthMethod,
    pub username: Option<String>,
    pub password_set: bool,
}

/// A site.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SiteView {
    #[schema(example = "site_3f2a9c4e0b1d4e7a8c6b5a4f3e2d1c0b")]
    pub site_id: String,
    pub name: String,
    #[serde(rename = "override")]
    pub override_: Option<SiteOverrideView>,
    pub created_at: DateTime<Utc>,
}

/// A created site, with its secret: shown only in this response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SiteCreated {
    pub site_id: String,
    pub name: String,
    /// The site's secret for `POST /api/v1/site-auth/token`. Shown only once; store it in
    /// the site mailer's configuration.
    #[schema(value_type = String, format = Password)]
    pub secret: WireSecret,
    #[serde(rename = "override")]
    pub override_: Option<SiteOverrideView>,
    pub created_at: DateTime<Utc>,
}

fn view(s: Site) -> SiteView {
    SiteView {
        override_: override_view(&s),
        site_id: s.id,
        name: s.name,
        created_at: s.created_at,
    }
}

fn override_view(s: &Site) -> Option<SiteOverrideView> {
    s.override_.as_ref().map(|o| SiteOverrideView {
        server: ServerView {
            host: o.server.host.as_str().to_owned(),
            port: o.server.port.get(),
            encryption: o.server.encryption,
        },
        method: o.auth.method(),
        username: match &o.auth {
            Auth::Password { username } => Some(username.clone()),
            _ => None,
        },
        password_set: s.override_password_set,
    })
}

type ParsedOverride = (SiteOverride, SitePassword);

/// Validates an override; `stored`: the site being updated (an omitted password keeps its
/// stored one while the host stays the same).
fn parse_override(
    o: SiteOverrideRequest,
    stored: Option<&Site>,
) -> Result<ParsedOverride, Vec<mail_core::problem::FieldError>> {
    let mut e = FieldErrors::new();
    let host = e.check("override.server.host", SmtpHost::parse(&o.server.host));
    let encryption = o.server.encryption.unwrap_or(Encryption::Starttls);
    let port = e.check(
        "override.server.port",
        Port::parse(
            o.server
                .port
                .unwrap_or(i64::from(encryption.default_port())),
        ),
    );
    let (auth, password) = match o.auth.method {
        AuthMethod::Oauth2 => {
            e.push(
                "override.auth.method",
                "OAuth 2.0 is not supported for a site override: it supports username and password authentication only",
            );
            (None, SitePassword::None)
        }
        AuthMethod::None => (Some(Auth::None), SitePassword::None),
        AuthMethod::Password => {
            let username = match o
                .auth
                .username
                .as_deref()
                .map(mail_core::domain::trim_blanks)
            {
                None | Some("") => {
                    e.push("override.auth.username", "is required for password auth");
                    None
                }
                Some(u) => e.check("override.auth.username", header_text(u, 256)),
            };
            let stored_host = stored
                .filter(|s| s.override_password_set)
                .and_then(|s| s.override_.as_ref())
                .map(|o| o.server.host.as_str().to_owned());
            let password = match o.auth.password {
                SecretPatch::Set(p) if p.expose_secret().is_empty() => {
                    e.push("override.auth.password", "must not be empty");
                    SitePassword::None
                }
                SecretPatch::Set(p) => SitePassword::Set(p),
                SecretPatch::Keep
                    if stored_host
                        .as_deref()
                        .is_some_and(|h| host.as_ref().is_none_or(|new| new.as_str() == h)) =>
                {
                    SitePassword::Keep
                }
                SecretPatch::Keep if stored_host.is_some() => {
                    e.push(
                        "override.auth.password",
                        "must be sent again because override.server.host changed: a stored password is never sent to a new host",
                    );
                    SitePassword::None
                }
                SecretPatch::Keep | SecretPatch::Clear => {
                    e.push("override.auth.password", "is required for password auth");
                    SitePassword::None
                }
            };
            (
                username.map(|username| Auth::Password { username }),
                password,
            )
        }
    };
    if !e.is_empty() {
        return Err(e.into_vec());
    }
    match (host, port, auth) {
        (Some(host), Some(port), Some(auth)) => Ok((
            SiteOverride {
                server: Server {
                    host,
                    port,
                    encryption,
                },
                auth,
            },
            password,
        )),
        _ => Err(vec![mail_core::problem::FieldError {
            field: "override".into(),
            message: "is invalid".into(),
        }]),
    }
}

/// Create a site
///
/// Returns the site's secret once; only its hash is stored. A site may override the server
/// and authorization with no auth or username and password (OAuth 2.0 is refused).
#[utoipa::path(post, path = "/api/v1/tenants/{tenant_id}/sites", tag = "sites",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme")),
    request_body(content = SiteCreateRequest, example = json!({"name": "Brno office"})),
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 201, description = "Created; the secret is shown only here", body = SiteCreated,
            example = json!({"site_id": "site_3f2a9c4e0b1d4e7a8c6b5a4f3e2d1c0b", "name": "Brno office", "secret": "FP_HNzovYS6_ak7ZgA_0Np6Brdr0ZhKG96TYGdqqbAk", "override": null, "created_at": "2026-11-28T09:30:00Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field(s)", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "override.auth.password: is required for password auth", "errors": [{"field": "override.auth.password", "message": "is required for password auth"}]}))))]
pub async fn create_site(
    state: web::Data<AppState>,
    scope: TenantScope,
    body: ApiJson<SiteCreateRequest>,
) -> ApiResult<HttpResponse> {
    let req = body.0;
    let mut errors = Vec::new();
    let name = site_name(&req.name, &mut errors);
    let override_ = match req.override_.map(|o| parse_override(o, None)).transpose() {
        Ok(o) => o,
        Err(mut e) => {
            errors.append(&mut e);
            None
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let secret = WireSecret::new(URL_SAFE_NO_PAD.encode(random_bytes::<32>()));
    let hash = hex(&sha256(secret.expose().as_bytes()));
    let site = state
        .store
        .create_site(&scope, name, override_, hash, state.clock.now())
        .await?;
    Ok(HttpResponse::Created().json(SiteCreated {
        override_: override_view(&site),
        site_id: site.id,
        name: site.name,
        secret,
        created_at: site.created_at,
    }))
}

fn site_name(name: &str, errors: &mut Vec<mail_core::problem::FieldError>) -> String {
    match mail_core::domain::trim_blanks(name) {
        "" => {
            errors.push(mail_core::problem::FieldError {
                field: "name".into(),
                message: "is required".into(),
            });
            String::new()
        }
        n => header_text(n, 200).unwrap_or_else(|m| {
            errors.push(mail_core::problem::FieldError {
                field: "name".into(),
                message: m,
            });
            String::new()
        }),
    }
}

/// Change a site
///
/// Replaces the site's name and override (omitted or `null`: no override). Its id and secret
/// stay, so its site mailer keeps running and picks the change up at its next configuration
/// fetch. In the override, omit `auth.password` to keep the stored password; a change of
/// `override.server.host` requires sending it again, so a stored password never goes to a
/// new host.
#[utoipa::path(put, path = "/api/v1/tenants/{tenant_id}/sites/{site_id}", tag = "sites",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme"),
           ("site_id" = String, Path, description = "Site id", example = "site_9d8c7b6a5f4e4d3c8b2a1f0e9d8c7b6a")),
    request_body(content = SiteUpdateRequest, example = json!({"name": "Prague warehouse", "override": {"server": {"host": "mail.lan.acme.example", "port": 587, "encryption": "starttls"}, "auth": {"method": "password", "username": "warehouse@acme.example"}}})),
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 200, description = "Changed", body = SiteView,
            example = json!({"site_id": "site_9d8c7b6a5f4e4d3c8b2a1f0e9d8c7b6a", "name": "Prague warehouse", "override": {"server": {"host": "mail.lan.acme.example", "port": 587, "encryption": "starttls"}, "method": "password", "username": "warehouse@acme.example", "password_set": true}, "created_at": "2026-11-28T10:05:12Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant or site", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field(s)", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "override.auth.password: must be sent again because override.server.host changed: a stored password is never sent to a new host", "errors": [{"field": "override.auth.password", "message": "must be sent again because override.server.host changed: a stored password is never sent to a new host"}]}))))]
pub async fn update_site(
    state: web::Data<AppState>,
    scope: TenantScope,
    path: web::Path<(String, String)>,
    body: ApiJson<SiteUpdateRequest>,
) -> ApiResult<HttpResponse> {
    let (_, site_id) = path.into_inner();
    let not_found = || ApiError::NotFound("no such site".into());
    if !is_site_id(&site_id) {
        return Err(not_found());
    }
    let stored = state
        .store
        .site_of_tenant(scope.tenant(), &site_id)
        .await?
        .ok_or_else(not_found)?
        .0;
    let req = body.0;
    let mut errors = Vec::new();
    let name = site_name(&req.name, &mut errors);
    let override_ = match req
        .override_
        .map(|o| parse_override(o, Some(&stored)))
        .transpose()
    {
        Ok(o) => o,
        Err(mut e) => {
            errors.append(&mut e);
            None
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let site = state
        .store
        .update_site(&scope, &site_id, name, override_, state.clock.now())
        .await?
        .ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(view(site)))
}

/// Whether `s` has the shape of a site id (`site_` and 32 hex digits). Anything else names no
/// site, and never reaches the database (PostgreSQL refuses NUL bytes, for one).
pub fn is_site_id(s: &str) -> bool {
    s.len() == 37 && s.starts_with("site_") && s[5..].bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// List sites
///
/// Every site of the tenant with its override (passwords shown only as `password_set`);
/// site secrets are never shown again after creation.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant_id}/sites", tag = "sites",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme")),
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 200, description = "The tenant's sites (never their secrets)", body = Vec<SiteView>,
            example = json!([{"site_id": "site_3f2a9c4e0b1d4e7a8c6b5a4f3e2d1c0b", "name": "Brno office", "override": null, "created_at": "2026-11-28T09:30:00Z"}, {"site_id": "site_9d8c7b6a5f4e4d3c8b2a1f0e9d8c7b6a", "name": "Prague warehouse", "override": {"server": {"host": "mail.lan.acme.example", "port": 25, "encryption": "none"}, "method": "password", "username": "warehouse@acme.example", "password_set": true}, "created_at": "2026-11-28T10:05:12Z"}])),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json")))]
pub async fn list_sites(state: web::Data<AppState>, scope: TenantScope) -> ApiResult<HttpResponse> {
    let sites = state.store.sites(&scope).await?;
    Ok(HttpResponse::Ok().json(sites.into_iter().map(view).collect::<Vec<_>>()))
}

/// Delete a site
///
/// Its secret stops working at once; tokens it already holds expire on their own.
#[utoipa::path(delete, path = "/api/v1/tenants/{tenant_id}/sites/{site_id}", tag = "sites",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme"),
           ("site_id" = String, Path, description = "Site id")),
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant or site", body = Problem, content_type = "application/problem+json")))]
pub async fn delete_site(
    state: web::Data<AppState>,
    scope: TenantScope,
    path: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    let (_, site_id) = path.into_inner();
    if !is_site_id(&site_id) {
        return Err(ApiError::NotFound("no such site".into()));
    }
    if state
        .store
        .delete_site(&scope, &site_id, state.clock.now())
        .await?
    {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::NotFound("no such site".into()))
    }
}
