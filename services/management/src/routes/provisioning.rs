//! Cloud Central's provisioning contract beyond tenants: cluster email settings, invitations,
//! and the tenant test email.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use mail_core::domain::EmailAddress;
use mail_core::problem::Problem;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{ClusterAdmin, TenantScope, tenant_not_found};
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::mail::cluster::{ClusterSettingsRequest, ClusterSettingsView};
use crate::mail::invitations::{self, AcceptError, AcceptedInvitation, InvitationView};
use crate::mail::{self, TestResult};
use crate::routes::method_not_allowed;
use crate::startup::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/cluster/email-settings")
            .route(web::get().to(get_cluster_settings))
            .route(web::put().to(put_cluster_settings))
            .default_service(web::to(method_not_allowed("GET, PUT"))),
    )
    .service(
        web::resource("/api/v1/tenants/{tenant_id}/invitations")
            .route(web::get().to(list_invitations))
            .default_service(web::to(method_not_allowed("GET"))),
    )
    .service(
        web::resource("/api/v1/tenants/{tenant_id}/invitations/{invitation_id}/resend")
            .route(web::post().to(resend_invitation))
            .default_service(web::to(method_not_allowed("POST"))),
    )
    .service(
        web::resource("/api/v1/invitations/accept")
            .route(web::post().to(accept_invitation))
            .default_service(web::to(method_not_allowed("POST"))),
    )
    .service(
        web::resource("/api/v1/tenants/{tenant_id}/email-settings/test")
            .route(web::post().to(send_test_email))
            .default_service(web::to(method_not_allowed("POST"))),
    );
}

/// Read the cluster email settings
///
/// The settings invitation emails are sent with. Secrets are never returned.
#[utoipa::path(get, path = "/api/v1/cluster/email-settings", tag = "cluster",
    security(("bearer" = ["cluster_admin"])),
    responses(
        (status = 200, description = "The settings", body = ClusterSettingsView,
            example = json!({"server": {"host": "smtp.example.com", "port": 587, "encryption": "starttls"}, "auth": {"method": "password", "username": "invitations@example.com", "password_set": true}, "senders": [{"address": "invitations@example.com", "name": "Print Cloud", "default": true}], "updated_at": "2026-11-28T09:30:00Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a cluster admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not configured yet", body = Problem, content_type = "application/problem+json")))]
pub async fn get_cluster_settings(
    state: web::Data<AppState>,
    _a: ClusterAdmin,
) -> ApiResult<HttpResponse> {
    let c = state.store.cluster_settings().await?.ok_or_else(|| {
        ApiError::NotFound("cluster email settings are not configured yet".into())
    })?;
    Ok(HttpResponse::Ok().json(c.view()))
}

/// Store the cluster email settings
///
/// Server, encryption, authorization (`none` or `password`; `oauth2` is refused: OAuth 2.0
/// is not supported in the cluster-admin context) and senders. The password is write-only,
/// as in tenant settings. Invitations waiting for settings go out right after.
#[utoipa::path(put, path = "/api/v1/cluster/email-settings", tag = "cluster",
    request_body(content = ClusterSettingsRequest, example = json!({
        "server": {"host": "smtp.example.com", "port": 587, "encryption": "starttls"},
        "auth": {"method": "password", "username": "invitations@example.com", "password": "app-password"},
        "senders": [{"address": "invitations@example.com", "name": "Print Cloud", "default": true}]
    })),
    security(("bearer" = ["cluster_admin"])),
    responses(
        (status = 200, description = "Stored", body = ClusterSettingsView,
            example = json!({"server": {"host": "smtp.example.com", "port": 587, "encryption": "starttls"}, "auth": {"method": "password", "username": "invitations@example.com", "password_set": true}, "senders": [{"address": "invitations@example.com", "name": "Print Cloud", "default": true}], "updated_at": "2026-11-28T09:30:00Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a cluster admin", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field(s), e.g. auth.method oauth2", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "auth.method: OAuth 2.0 is not supported in the cluster-admin context: invitation emails can use no authentication or username and password only", "errors": [{"field": "auth.method", "message": "OAuth 2.0 is not supported in the cluster-admin context: invitation emails can use no authentication or username and password only"}]}))))]
pub async fn put_cluster_settings(
    state: web::Data<AppState>,
    _a: ClusterAdmin,
    body: ApiJson<ClusterSettingsRequest>,
) -> ApiResult<HttpResponse> {
    let c = state
        .store
        .put_cluster_settings(body.0, state.clock.now())
        .await?;
    mail::nudge_invitations(&state).await?;
    Ok(HttpResponse::Ok().json(c.view()))
}

/// List a tenant's invitations
///
/// Each admin email's invitation with its status: `queued` (with the reason it waits),
/// `sent`, `failed` (with the SMTP reply), `accepted` or `expired`.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant_id}/invitations", tag = "tenants",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme")),
    security(("bearer" = ["cluster_admin", "tenant_admin"])),
    responses(
        (status = 200, description = "The invitations", body = Vec<InvitationView>,
            example = json!([{"id": "695b17e8-9b84-41dc-9682-986fcd799ddc", "email": "admin@acme.example", "status": "sent", "reason": null, "last_error": null, "smtp_reply": "250 2.0.0 OK queued as 4Xk2pQ", "attempts": 1, "created_at": "2026-11-28T09:30:00Z", "expires_at": "2026-12-05T09:30:00Z", "sent_at": "2026-11-28T09:30:02Z", "accepted_at": null}, {"id": "1c0a4e2b-7d3f-4a8e-9b6c-5e4d3c2b1a09", "email": "it@acme.example", "status": "queued", "reason": "cluster email settings missing", "last_error": null, "smtp_reply": null, "attempts": 0, "created_at": "2026-11-28T10:05:12Z", "expires_at": "2026-12-05T10:05:12Z", "sent_at": null, "accepted_at": null}])),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json")))]
pub async fn list_invitations(
    state: web::Data<AppState>,
    scope: TenantScope,
) -> ApiResult<HttpResponse> {
    state
        .store
        .tenant(scope.tenant())
        .await?
        .ok_or_else(tenant_not_found)?;
    let list = invitations::list(&state.store, scope.tenant(), state.clock.now()).await?;
    Ok(HttpResponse::Ok().json(list))
}

/// Resend an invitation
///
/// Issues a new one-time link with a new expiry and sends it; the previous link stops working.
#[utoipa::path(post, path = "/api/v1/tenants/{tenant_id}/invitations/{invitation_id}/resend", tag = "tenants",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme"),
           ("invitation_id" = String, Path, description = "Invitation id")),
    security(("bearer" = ["cluster_admin", "tenant_admin"])),
    responses(
        (status = 202, description = "Queued for sending"),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant or invitation", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already accepted", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:conflict", "title": "Conflict", "status": 409, "detail": "the invitation was already accepted"}))))]
pub async fn resend_invitation(
    state: web::Data<AppState>,
    scope: TenantScope,
    path: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    let (_, id) = path.into_inner();
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(ApiError::NotFound("no such invitation".into()));
    }
    let tenant = state
        .store
        .tenant(scope.tenant())
        .await?
        .ok_or_else(tenant_not_found)?;
    invitations::resend(
        &state.store,
        scope.tenant(),
        &tenant.name,
        &id,
        &state.config.invitation_url_template,
        state.clock.now(),
    )
    .await?;
    state.outbox_wakeup.notify_one();
    Ok(HttpResponse::Accepted().finish())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptRequest {
    /// The token from the invitation link.
    #[schema(value_type = String, format = Password)]
    pub token: SecretString,
}

/// Accept an invitation
///
/// No bearer token: the one-time invitation token authenticates the call. A token works once;
/// an expired one gets 410.
#[utoipa::path(post, path = "/api/v1/invitations/accept", tag = "tenants",
    request_body(content = AcceptRequest, example = json!({"token": "k3J9xQ2vLw8nR5tY1bC7dF0gH4jM6pS"})),
    responses(
        (status = 200, description = "Accepted", body = AcceptedInvitation,
            example = json!({"tenant_id": "acme", "email": "admin@acme.example", "accepted_at": "2026-11-28T10:05:12Z"})),
        (status = 404, description = "Unknown token", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:not-found", "title": "Not found", "status": 404, "detail": "unknown invitation token"})),
        (status = 409, description = "Already accepted", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:conflict", "title": "Conflict", "status": 409, "detail": "this invitation was already accepted; the link works once"})),
        (status = 410, description = "Expired", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:gone", "title": "Gone", "status": 410, "detail": "this invitation expired; ask for a new one"})),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field(s)", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "token: is not an invitation token", "errors": [{"field": "token", "message": "is not an invitation token"}]}))))]
pub async fn accept_invitation(
    state: web::Data<AppState>,
    body: ApiJson<AcceptRequest>,
) -> ApiResult<HttpResponse> {
    let token = body.0.token;
    if token.expose_secret().is_empty() || token.expose_secret().len() > 200 {
        return Err(ApiError::field("token", "is not an invitation token"));
    }
    match invitations::accept(&state.store, token.expose_secret(), state.clock.now()).await? {
        Ok(a) => Ok(HttpResponse::Ok().json(a)),
        Err(AcceptError::Unknown) => Err(ApiError::NotFound("unknown invitation token".into())),
        Err(AcceptError::AlreadyAccepted) => Err(ApiError::Conflict(
            "this invitation was already accepted; the link works once".into(),
        )),
        Err(AcceptError::Expired) => Err(ApiError::Gone(
            "this invitation expired; ask for a new one".into(),
        )),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestEmailRequest {
    /// Where to send the test email.
    #[schema(example = "it@acme.example")]
    pub to: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TestEmailResult {
    #[schema(example = "sent")]
    pub status: String,
    /// The SMTP server's final reply.
    #[schema(example = "250 2.0.0 OK queued")]
    pub smtp_reply: String,
    pub message_id: String,
    pub sent_at: DateTime<Utc>,
}

/// Send a test email
///
/// Sends a real message now with the tenant's settings (with OAuth 2.0, the grant's access
/// token). Answers with the server's final reply, or 502 with the SMTP reply and, for the
/// well-known failures (`535 5.7.139`, `535 5.7.3`), a hint in `detail`. When the OAuth 2.0
/// token endpoint refuses the refresh with a well-known error (`invalid_grant` with
/// `AADSTS700082`, `AADSTS50076`, `AADSTS65001`...), the answer is 502 too, with the
/// provider's error and the advice in `detail`; the grant then shows
/// `reauthorization_required` with the same advice in `oauth.warnings`.
#[utoipa::path(post, path = "/api/v1/tenants/{tenant_id}/email-settings/test", tag = "email settings",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme")),
    request_body(content = TestEmailRequest, example = json!({"to": "it@acme.example"})),
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 200, description = "Sent; the server's reply", body = TestEmailResult,
            example = json!({"status": "sent", "smtp_reply": "250 2.0.0 OK <20261128093000.4f2a@postwire> [Hostname=AM0PR01MB1234.eurprd01.prod.outlook.com]", "message_id": "<20261128093000.4f2a@postwire>", "sent_at": "2026-11-28T09:30:00Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant, or no settings", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:not-found", "title": "Not found", "status": 404, "detail": "no email settings are stored for this tenant yet"})),
        (status = 409, description = "OAuth 2.0 not authorized (again) yet", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:oauth-not-authorized", "title": "OAuth 2.0 not authorized", "status": 409, "detail": "the tenant has not authorized OAuth 2.0 yet"})),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field(s)", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "to: is not a valid email address (Missing domain or user)", "errors": [{"field": "to", "message": "is not a valid email address (Missing domain or user)"}]})),
        (status = 502, description = "The SMTP server or the OAuth 2.0 token endpoint refused; the reply and a hint", body = Problem, content_type = "application/problem+json",
            examples(
                ("smtp" = (summary = "The SMTP server refused the credentials", value = json!({"type": "urn:postwire:problem:smtp-refused", "title": "The mail server refused", "status": 502, "detail": "the SMTP server rejected the credentials: 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Hint: SMTP AUTH is disabled for this mailbox or the organization, or Security Defaults are on: enable Authenticated SMTP for the sending user (Microsoft 365 admin center > Users > Mail > Manage email apps) and turn off Security Defaults in Azure Active Directory."}))),
                ("token_endpoint" = (summary = "The token endpoint refused the refresh (AADSTS)", value = json!({"type": "urn:postwire:problem:smtp-refused", "title": "The mail server refused", "status": 502, "detail": "reauthorization required: invalid_grant: AADSTS700082: The refresh token has expired due to inactivity. Hint: The refresh token expired after a long inactivity: authorize again."}))))),
        (status = 503, description = "The OAuth provider cannot be reached", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:unavailable", "title": "Temporarily unavailable", "status": 503, "detail": "the provider cannot be reached: token endpoint unreachable: connection timed out"}))))]
pub async fn send_test_email(
    state: web::Data<AppState>,
    scope: TenantScope,
    body: ApiJson<TestEmailRequest>,
) -> ApiResult<HttpResponse> {
    let to = EmailAddress::parse(&body.0.to).map_err(|m| ApiError::field("to", m))?;
    state
        .store
        .tenant(scope.tenant())
        .await?
        .ok_or_else(tenant_not_found)?;
    let result = match mail::send_test(&state, scope.tenant(), &to).await {
        // The token endpoint refused with a well-known error (AADSTS700082, AADSTS50076,
        // AADSTS65001, invalid_grant...): the upstream refused, as an SMTP server can; the
        // answer carries the provider's words and the plain advice.
        Err(ApiError::ReauthorizationRequired(d))
        | Err(ApiError::OauthNotAuthorized(d))
        | Err(ApiError::Unavailable(d))
            if mail_core::hints::hint(&d).is_some() =>
        {
            let hint = mail_core::hints::hint(&d).unwrap_or_default();
            return Err(ApiError::BadGateway(format!("{d}. Hint: {hint}")));
        }
        other => other?,
    };
    match result {
        TestResult::Sent { reply, message_id } => Ok(HttpResponse::Ok().json(TestEmailResult {
            status: "sent".into(),
            smtp_reply: reply.to_string(),
            message_id,
            sent_at: state.clock.now(),
        })),
        TestResult::Failed(e) => {
            let text = e.to_string();
            let detail = match mail_core::hints::hint(&text) {
                Some(h) => format!("{text}. Hint: {h}"),
                None => text,
            };
            Err(ApiError::BadGateway(detail))
        }
    }
}
