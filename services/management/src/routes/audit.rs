//! The audit log of a tenant: who changed which fields, when (never the values).

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use mail_core::problem::Problem;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::TenantScope;
use crate::error::{ApiError, ApiResult};
use crate::routes::method_not_allowed;
use crate::startup::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/tenants/{tenant_id}/audit")
            .route(web::get().to(get_audit))
            .default_service(web::to(method_not_allowed("GET"))),
    );
}

/// One audit record.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// Subject of the token that made the change.
    pub actor: String,
    pub role: String,
    #[schema(example = "email_settings.updated")]
    pub action: String,
    /// Paths of the fields that changed (`*` for a creation); never their values.
    #[schema(example = json!(["server.host", "auth.password"]))]
    pub fields: Vec<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Newest first; 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
}

/// Read the audit log
///
/// Newest first. Records who changed which settings fields, never the values.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant_id}/audit", tag = "email settings",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme"), AuditQuery),
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 200, description = "Audit records, newest first", body = Vec<AuditEntry>,
            example = json!([{"id": 3, "at": "2026-11-28T10:05:12Z", "actor": "cli", "role": "tenant_admin", "action": "site.created:site_3f2a9c4e0b1d4e7a8c6b5a4f3e2d1c0b", "fields": ["name"]}, {"id": 2, "at": "2026-11-28T09:30:00Z", "actor": "cli", "role": "tenant_admin", "action": "email_settings.updated", "fields": ["server.host", "auth.password"]}])),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid query", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "limit: must be between 1 and 1000", "errors": [{"field": "limit", "message": "must be between 1 and 1000"}]}))))]
pub async fn get_audit(
    state: web::Data<AppState>,
    scope: TenantScope,
    q: web::Query<AuditQuery>,
) -> ApiResult<HttpResponse> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 1000"));
    }
    let rows = state.store.audit(&scope, limit).await?;
    let entries: Vec<AuditEntry> = rows
        .into_iter()
        .map(|r| AuditEntry {
            id: r.id,
            at: r.at,
            actor: r.actor,
            role: r.role,
            action: r.action,
            fields: serde_json::from_str(&r.fields).unwrap_or_default(),
        })
        .collect();
    Ok(HttpResponse::Ok().json(entries))
}
