//! The OpenAPI document, generated from the code (utoipa) and checked in at
//! `openapi/openapi.json`; a test fails when the two differ.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{audit, health, oauth, provisioning, settings, site_api, sites, tenants};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Postwire Management API",
        description = "Tenant-scoped email settings for the print-management cloud: Cloud Central provisions tenants (role `cluster_admin`), tenant admins configure email (role `tenant_admin`), and sites fetch their effective configuration (role `site`).\n\nEvery `/api` operation needs `Authorization: Bearer <JWT>` except `POST /api/v1/site-auth/token`. Errors are `application/problem+json` (RFC 9457); validation errors are 422 with `errors: [{field, message}]`, `field` being a dotted JSON path. A tenant admin of another tenant gets 404, exactly as for a missing tenant."
    ),
    paths(
        health::healthz,
        health::readyz,
        tenants::put_tenant,
        tenants::get_tenant,
        tenants::list_tenants,
        tenants::delete_tenant,
        settings::list_providers,
        settings::get_settings,
        settings::put_settings,
        oauth::authorize,
        oauth::forget,
        provisioning::get_cluster_settings,
        provisioning::put_cluster_settings,
        provisioning::list_invitations,
        provisioning::resend_invitation,
        provisioning::accept_invitation,
        provisioning::send_test_email,
        sites::create_site,
        sites::list_sites,
        sites::delete_site,
        audit::get_audit,
        site_api::site_token,
        site_api::email_config,
        site_api::smtp_access_token,
    ),
    components(schemas(mail_core::problem::Problem, mail_core::problem::FieldError)),
    modifiers(&Security),
    tags(
        (name = "tenants", description = "Cloud Central provisioning (role cluster_admin)"),
        (name = "cluster", description = "The cluster-admin context: settings for invitation emails"),
        (name = "email settings", description = "A tenant's email configuration (role tenant_admin; cluster_admin may act)"),
        (name = "sites", description = "Sites of a tenant and their credentials"),
        (name = "site", description = "Operations sites call (role site)"),
        (name = "operations", description = "Health and readiness"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT with `role` cluster_admin, tenant_admin (with `tenant`) or site (with `tenant` and `site`). The scopes listed on an operation are the roles it accepts.",
                    ))
                    .build(),
            ),
        );
    }
}

pub fn spec() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as checked in: pretty JSON with a trailing newline.
pub fn json() -> String {
    let mut s = spec()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}
