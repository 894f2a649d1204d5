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
        sites::update_site,
        sites::delete_site,
        audit::get_audit,
        site_api::site_token,
        site_api::email_config,
        site_api::smtp_access_token,
    ),
    components(schemas(mail_core::problem::Problem, mail_core::problem::FieldError)),
    modifiers(&Security, &ProblemExamples),
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

/// Fills the example of every problem+json error response that has no explicit one, with the
/// body the server really sends (built by the one error catalogue, `ApiProblem`). Validation
/// errors (422) and upstream failures carry hand-written examples in their annotations: they
/// name fields and replies only the operation knows.
struct ProblemExamples;

impl Modify for ProblemExamples {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let roles = operation_roles(op);
                for (status, response) in op.responses.responses.iter_mut() {
                    let utoipa::openapi::RefOr::T(response) = response else {
                        continue;
                    };
                    let description = response.description.clone();
                    let Some(content) = response.content.get_mut("application/problem+json") else {
                        continue;
                    };
                    if content.example.is_some() || !content.examples.is_empty() {
                        continue;
                    }
                    if let Some(problem) = problem_example(status, &description, &roles) {
                        content.example = serde_json::to_value(problem).ok();
                    }
                }
            }
        }
    }
}

/// The roles an operation's bearer security requirement lists (empty when public).
fn operation_roles(op: &utoipa::openapi::path::Operation) -> Vec<String> {
    let security = serde_json::to_value(&op.security).unwrap_or_default();
    security[0]["bearer"]
        .as_array()
        .map(|roles| {
            roles
                .iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What the server answers with `status` for an operation accepting `roles`; `None` for the
/// statuses whose example must be written by hand (422: the refused fields).
fn problem_example(
    status: &str,
    description: &str,
    roles: &[String],
) -> Option<mail_core::problem::Problem> {
    use mail_core::http::ApiProblem;
    // The description, as a detail sentence: "No such tenant" -> "no such tenant".
    let mut chars = description.chars();
    let detail: String = chars
        .next()
        .map(|c| c.to_lowercase().chain(chars).collect())
        .unwrap_or_default();
    let forbidden = match roles {
        [only] if only == "cluster_admin" => "this operation needs the cluster_admin role",
        [only] if only == "site" => "this operation needs a site token",
        [] => detail.as_str(),
        _ => "site tokens cannot call admin operations",
    };
    let problem = match status {
        "401" => ApiProblem::Unauthorized("a bearer token is required"),
        "403" => ApiProblem::Forbidden(forbidden),
        "404" => ApiProblem::NotFound(&detail),
        "409" => ApiProblem::Conflict(&detail),
        "410" => ApiProblem::Gone(&detail),
        "413" => ApiProblem::PayloadTooLarge(crate::extract::MAX_BODY),
        "415" => ApiProblem::UnsupportedMediaType,
        "502" => ApiProblem::BadGateway(&detail),
        "503" => ApiProblem::Unavailable(&detail),
        _ => return None,
    };
    Some(problem.to_problem())
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
