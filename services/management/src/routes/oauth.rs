//! The OAuth 2.0 authorization-code flow: authorize (admin), the provider's callback (no
//! bearer: the one-time state authenticates it) and forgetting the grant.

use std::collections::HashMap;

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use mail_core::problem::Problem;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::TenantScope;
use crate::error::{ApiError, ApiResult};
use crate::oauth::grants::CallbackOutcome;
use crate::routes::method_not_allowed;
use crate::startup::AppState;

/// Where the provider sends the admin back after authorization.
pub const CALLBACK_PATH: &str = "/oauth2/client/smtp/authorize-callback";
const CALLBACK_JS_PATH: &str = "/oauth2/client/smtp/callback.js";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/tenants/{tenant_id}/email-settings/oauth/authorize")
            .route(web::post().to(authorize))
            .default_service(web::to(method_not_allowed("POST"))),
    )
    .service(
        web::resource("/api/v1/tenants/{tenant_id}/email-settings/oauth")
            .route(web::delete().to(forget))
            .default_service(web::to(method_not_allowed("DELETE"))),
    )
    .route(CALLBACK_PATH, web::get().to(callback))
    .route(CALLBACK_JS_PATH, web::get().to(callback_js));
}

/// Where to send the admin's browser.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuthorizeResponse {
    /// Open this URL in a popup; the provider comes back to the redirect URI.
    pub authorization_url: String,
    /// The redirect URI this authorization uses (`{POSTWIRE_PUBLIC_URL}` + callback path).
    pub redirect_uri: String,
    /// The authorization must complete before this time (10 minutes).
    pub expires_at: DateTime<Utc>,
}

/// Start an OAuth 2.0 authorization
///
/// Stores a pending authorization (one-time state, PKCE S256 verifier, nonce; valid 10
/// minutes) and returns the provider URL to open in a popup. The stored settings must use
/// `oauth2` with a client secret. The redirect URI is fixed by `POSTWIRE_PUBLIC_URL`; callers
/// cannot choose it.
#[utoipa::path(post, path = "/api/v1/tenants/{tenant_id}/email-settings/oauth/authorize", tag = "email settings",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme")),
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 200, description = "The provider URL", body = AuthorizeResponse,
            example = json!({"authorization_url": "https://login.microsoftonline.com/acme.example/oauth2/v2.0/authorize?response_type=code&client_id=0f8e5c1a-2b3d-4e5f-8a9b-1c2d3e4f5a6b&state=q8Zk3vT0cW9bYx1mN4pR7s&code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM&code_challenge_method=S256&redirect_uri=https%3A%2F%2Fpostwire.example.com%2Foauth2%2Fclient%2Fsmtp%2Fauthorize-callback&scope=https%3A%2F%2Foutlook.office.com%2FSMTP.Send+openid+profile+offline_access&nonce=Jx2c9QeL0aVt", "redirect_uri": "https://postwire.example.com/oauth2/client/smtp/authorize-callback", "expires_at": "2026-11-28T09:40:00Z"})),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The settings do not use OAuth 2.0 with a client secret", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:validation", "title": "Validation failed", "status": 422, "detail": "auth.method: store OAuth 2.0 settings with a client secret before authorizing", "errors": [{"field": "auth.method", "message": "store OAuth 2.0 settings with a client secret before authorizing"}]}))))]
pub async fn authorize(state: web::Data<AppState>, scope: TenantScope) -> ApiResult<HttpResponse> {
    // 404 for a missing tenant, as everywhere.
    state.store.settings(&scope).await?;
    let (url, expires_at) = state
        .grants
        .authorize(scope.tenant(), &scope.principal().actor())
        .await?;
    Ok(HttpResponse::Ok().json(AuthorizeResponse {
        authorization_url: url,
        redirect_uri: state.grants.redirect_uri().to_owned(),
        expires_at,
    }))
}

/// Forget the OAuth 2.0 grant
///
/// Deletes the refresh token and the cached access token. Sending with OAuth 2.0 stops until
/// the tenant authorizes again.
#[utoipa::path(delete, path = "/api/v1/tenants/{tenant_id}/email-settings/oauth", tag = "email settings",
    params(("tenant_id" = String, Path, description = "Tenant id", example = "acme")),
    security(("bearer" = ["tenant_admin", "cluster_admin"])),
    responses(
        (status = 204, description = "Forgotten"),
        (status = 401, description = "Missing or invalid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A site token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant, or no grant", body = Problem, content_type = "application/problem+json")))]
pub async fn forget(state: web::Data<AppState>, scope: TenantScope) -> ApiResult<HttpResponse> {
    state.store.settings(&scope).await?;
    if state.grants.forget(scope.tenant()).await? {
        state
            .store
            .audit_event(&scope, "oauth.forgotten", &[], state.clock.now())
            .await?;
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::NotFound(
            "this tenant has no OAuth 2.0 grant".into(),
        ))
    }
}

/// The provider's redirect back to us. Unknown parameters are ignored.
pub async fn callback(
    state: web::Data<AppState>,
    q: web::Query<HashMap<String, String>>,
) -> HttpResponse {
    let get = |k: &str| q.get(k).map(String::as_str);
    let outcome = state
        .grants
        .callback(
            get("state"),
            get("code"),
            get("error"),
            get("error_description"),
            get("iss"),
        )
        .await;
    match outcome {
        CallbackOutcome::Authorized { tenant, username } => page(
            200,
            "Authorization complete",
            &[
                ("outcome", "authorized"),
                ("tenant", &tenant),
                ("username", username.as_deref().unwrap_or("")),
            ],
            &match &username {
                Some(u) => format!("Authorized as {u}. You can close this window."),
                None => "Authorized. Enter the authorization username by hand: the provider did not name the user. You can close this window.".to_owned(),
            },
        ),
        CallbackOutcome::ProviderError { error, description } => page(
            200,
            "Authorization refused",
            &[("outcome", "error"), ("error", &error), ("description", &description)],
            &format!(
                "The provider refused the authorization: {error}{}",
                if description.is_empty() { String::new() } else { format!(" ({description})") }
            ),
        ),
        CallbackOutcome::Failed { status, error, description } => page(
            status,
            "Authorization failed",
            &[("outcome", "error"), ("error", &error), ("description", &description)],
            &format!("The authorization failed: {description}"),
        ),
    }
}

/// HTML-escapes text for element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: u16, title: &str, data: &[(&str, &str)], message: &str) -> HttpResponse {
    let attrs: String = data
        .iter()
        .map(|(k, v)| format!(" data-{k}=\"{}\"", escape(v)))
        .collect();
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"></head>\
         <body><main id=\"outcome\"{attrs}><h1>{t}</h1><p>{m}</p></main>\
         <script src=\"{CALLBACK_JS_PATH}\"></script></body></html>\n",
        t = escape(title),
        m = escape(message),
    );
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .content_type("text/html; charset=utf-8")
    .insert_header((
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ))
    .insert_header(("X-Frame-Options", "DENY"))
    .body(body)
}

const CALLBACK_JS: &str = r#"// Reports the authorization outcome to the admin page that opened this popup (same origin
// only), then closes. Opened without an opener, the page itself shows the outcome.
(function () {
  var el = document.getElementById('outcome');
  if (!el) { return; }
  var d = el.dataset;
  var message = {
    type: 'postwire:oauth',
    outcome: d.outcome || 'error',
    tenant: d.tenant || null,
    username: d.username || null,
    error: d.error || null,
    description: d.description || null
  };
  if (window.opener && !window.opener.closed) {
    window.opener.postMessage(message, window.location.origin);
    window.close();
  }
})();
"#;

async fn callback_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .body(CALLBACK_JS)
}
