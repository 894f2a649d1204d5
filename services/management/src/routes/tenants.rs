//! Cloud Central provisioning: tenants (role cluster_admin).

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use mail_core::domain::{EmailAddress, TenantId, header_text};
use mail_core::problem::{FieldErrors, Problem};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{ClusterAdmin, tenant_not_found};
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::routes::method_not_allowed;
use crate::startup::AppState;
use crate::store::{Tenant, TenantInput, TenantStatus};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/tenants")
            .route(web::get().to(list_tenants))
            .default_service(web::to(method_not_allowed("GET"))),
    )
    .service(
        web::resource("/api/v1/tenants/{tenant_id}")
            .route(web::put().to(put_tenant))
            .route(web::get().to(get_tenant))
            .route(web::delete().to(delete_tenant))
            .default_service(web::to(method_not_allowed("GET, PUT, DELETE"))),
    );
}

/// Body of `PUT /api/v1/tenants/{tenant_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantRequest {
    /// Display name of the tenant.
    #[schema(example = "Acme Corporation")]
    pub name: String,
    /// Addresses of the tenant's administrators; each new one is invited.
    #[serde(default)]
    #[schema(example = json!(["admin@acme.example"]))]
    pub admin_emails: Vec<String>,
    /// Defaults to `active` on creation; unchanged when omitted on update.
    pub status: Option<TenantStatus>,
    #[serde(default)]
    #[schema(ignore)]
    pub tenant_id: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub created_at: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub updated_at: Option<serde::de::IgnoredAny>,
}

/// A tenant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    #[schema(example = "acme")]
    pub tenant_id: String,
    #[schema(example = "Acme Corporation")]
    pub name: String,
    pub admin_emails: Vec<String>,
    pub status: TenantStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Tenant> for TenantView {
    fn from(t: Tenant) -> Self {
        TenantView {
            tenant_id: t.id.as_str().to_owned(),
            name: t.name,
            admin_emails: t
                .admin_emails
                .iter()
                .map(|a| a.as_str().to_owned())
                .collect(),
            status: t.status,
            created_at: t.created_at,
            updated_at: t.updated_at,
        }
    }
}

/// A page of tenants, ordered by id.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantList {
    pub tenants: Vec<TenantView>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_after: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Return tenants whose id sorts after this one.
    pub after: Option<String>,
    /// Page size, 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
}

fn parse_tenant_request(
    req: TenantRequest,
) -> Result<TenantInput, Vec<mail_core::problem::FieldError>> {
    let mut e = FieldErrors::new();
    let name = match mail_core::domain::trim_blanks(&req.name) {
        "" => {
            e.push("name", "is required");
            None
        }
        n => e.check("name", header_text(n, 200)),
    };
    if req.admin_emails.len() > 50 {
        e.push("admin_emails", "at most 50 addresses");
    }
    let mut admin_emails: Vec<EmailAddress> = Vec::new();
    for (i, a) in req.admin_emails.iter().enumerate() {
        if let Some(addr) = e.check(format!("admin_emails[{i}]"), EmailAddress::parse(a))
            && !admin_emails.iter().any(|x| x.same_mailbox(&addr))
        {
            admin_emails.push(addr);
        }
    }
    e.into_result(|| TenantInput {
        name: name.unwrap_or_default(),
        admin_emails,
        status: req.status,
    })
}

/// Create or update a tenant
///
/// Idempotent: repeating the same body changes nothing and answers 200. Cloud Central calls
/// this to provision a tenant; `admin_emails` lists the tenant's administrators.
#[utoipa::path(put, path = "/api/v1/tenants/{tenant_id}", tag = "tenants",
    params(("tenant_id" = String, Path, description = "Tenant id: 1–63 of a-z, 0-9 and '-'", example = "acme")),
    request_body(content = TenantRequest, example = json!({"name": "Acme Corporation", "admin_emails": ["admin@acme.example"]})),
    security(("bearer" = ["cluster_admin"])),
    responses(
        (status = 200, description = "Updated (or unchanged)", body = TenantView,
            example = json!({"tenant_id": "acme", "name": "Acme Corporation", "admin_emails": ["admin@acme.example", "it@acme.example"], "status": "active", "created_at": "2026-11-28T09:30:00Z", "updated_at": "2026-11-28T10:05:12Z"})),
        (status = 201, description = "Created", body = TenantView,
            example = json!({"tenant_id": "acme", "name": "Acme Corporation", "admin_emails": ["admin@acme.example"], "status": "active", "created_at": "2026-11-28T09:30:00Z", "updated_at": "2026-11-28T09:30:00Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a cluster admin", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field(s)", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "admin_emails[1]: is not a valid email address (Missing domain or user)", "errors": [{"field": "admin_emails[1]", "message": "is not a valid email address (Missing domain or user)"}]}))))]
pub async fn put_tenant(
    state: web::Data<AppState>,
    admin: ClusterAdmin,
    path: web::Path<String>,
    body: ApiJson<TenantRequest>,
) -> ApiResult<HttpResponse> {
    let id = TenantId::parse(&path).map_err(|m| ApiError::field("tenant_id", m))?;
    let input = parse_tenant_request(body.0).map_err(ApiError::Validation)?;
    let (tenant, created) = state
        .store
        .put_tenant(&admin.0, &id, input, state.clock.now())
        .await?;
    // One invitation per admin email that has none yet: repeating the PUT sends nothing new.
    let queued = crate::mail::invitations::ensure(
        &state.store,
        &tenant.id,
        &tenant.name,
        &tenant.admin_emails,
        &state.config.invitation_url_template,
        state.clock.now(),
    )
    .await?;
    if queued > 0 {
        state.outbox_wakeup.notify_one();
    }
    let view = TenantView::from(tenant);
    Ok(if created {
        HttpResponse::Created().json(view)
    } else {
        HttpResponse::Ok().json(view)
    })
}

/// Read a tenant
///
/// The tenant's name, admin emails, status and timestamps. 404 when it does not exist.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant_id}", tag = "tenants",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme")),
    security(("bearer" = ["cluster_admin"])),
    responses(
        (status = 200, description = "The tenant", body = TenantView,
            example = json!({"tenant_id": "acme", "name": "Acme Corporation", "admin_emails": ["admin@acme.example"], "status": "active", "created_at": "2026-11-28T09:30:00Z", "updated_at": "2026-11-28T09:30:00Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a cluster admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json")))]
pub async fn get_tenant(
    state: web::Data<AppState>,
    _admin: ClusterAdmin,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = TenantId::parse(&path).map_err(|_| tenant_not_found())?;
    let t = state
        .store
        .tenant(&id)
        .await?
        .ok_or_else(tenant_not_found)?;
    Ok(HttpResponse::Ok().json(TenantView::from(t)))
}

/// List tenants
///
/// Ordered by id, a page at a time: pass `next_after` as `after` for the next page.
#[utoipa::path(get, path = "/api/v1/tenants", tag = "tenants",
    params(ListQuery),
    security(("bearer" = ["cluster_admin"])),
    responses(
        (status = 200, description = "A page of tenants", body = TenantList,
            example = json!({"tenants": [{"tenant_id": "acme", "name": "Acme Corporation", "admin_emails": ["admin@acme.example"], "status": "active", "created_at": "2026-11-28T09:30:00Z", "updated_at": "2026-11-28T09:30:00Z"}, {"tenant_id": "globex", "name": "Globex", "admin_emails": ["ops@globex.example"], "status": "suspended", "created_at": "2026-11-28T09:30:00Z", "updated_at": "2026-11-28T10:05:12Z"}], "next_after": "globex"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a cluster admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid query", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "limit: must be between 1 and 1000", "errors": [{"field": "limit", "message": "must be between 1 and 1000"}]}))))]
pub async fn list_tenants(
    state: web::Data<AppState>,
    _admin: ClusterAdmin,
    q: web::Query<ListQuery>,
) -> ApiResult<HttpResponse> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 1000"));
    }
    let after = q
        .after
        .as_deref()
        .map(|a| TenantId::parse(a).map_err(|m| ApiError::field("after", m)))
        .transpose()?;
    let tenants = state
        .store
        .list_tenants(after.as_ref().map(TenantId::as_str), limit)
        .await?;
    let next_after = (tenants.len() as u64 == limit)
        .then(|| tenants.last().map(|t| t.id.as_str().to_owned()))
        .flatten();
    Ok(HttpResponse::Ok().json(TenantList {
        tenants: tenants.into_iter().map(TenantView::from).collect(),
        next_after,
    }))
}

/// Delete a tenant
///
/// Wipes the tenant's settings, secrets, OAuth grant, cached access tokens and sites. The
/// audit log keeps the deletion.
#[utoipa::path(delete, path = "/api/v1/tenants/{tenant_id}", tag = "tenants",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme")),
    security(("bearer" = ["cluster_admin"])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a cluster admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json")))]
pub async fn delete_tenant(
    state: web::Data<AppState>,
    admin: ClusterAdmin,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = TenantId::parse(&path).map_err(|_| tenant_not_found())?;
    // The grant and its cached access token (memory and Redis) go first; the database
    // rows of settings, secrets, grants and sites go with the tenant.
    state.grants.forget(&id).await?;
    if state
        .store
        .delete_tenant(&admin.0, &id, state.clock.now())
        .await?
    {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(tenant_not_found())
    }
}
