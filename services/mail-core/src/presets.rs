//! Connection provider presets. A preset only fills fields; every field stays editable.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::settings::{AuthMethod, Encryption, ProviderId};

/// The directory Microsoft URLs use when `auth.microsoft_directory` is not given.
pub const DEFAULT_MICROSOFT_DIRECTORY: &str = "organizations";

/// What a preset fills in the connection.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PresetServer {
    /// SMTP host; absent for `custom`.
    pub host: Option<String>,
    pub port: u16,
    pub encryption: Encryption,
}

/// What a preset fills in the authorization.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PresetAuth {
    /// Authorization methods the provider accepts.
    pub methods: Vec<AuthMethod>,
    /// The method to pre-select.
    pub recommended_method: AuthMethod,
    /// OAuth 2.0 authorization endpoint. Microsoft's contains `{directory}`, replaced by
    /// `auth.microsoft_directory` (default `organizations`).
    pub authorization_url: Option<String>,
    /// OAuth 2.0 token endpoint (same `{directory}` rule).
    pub token_url: Option<String>,
    /// Scopes to request.
    pub scopes: Vec<String>,
    /// Extra query parameters added to the authorization URL.
    pub authorization_params: BTreeMap<String, String>,
    /// OpenID issuer of the ID token (same `{directory}` rule).
    pub issuer: Option<String>,
    /// Where the ID-token signing keys are published.
    pub jwks_uri: Option<String>,
}

/// A connection provider preset.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderPreset {
    pub id: ProviderId,
    /// Name to show.
    #[schema(example = "Microsoft 365")]
    pub name: String,
    /// True when support is experimental (Google).
    pub experimental: bool,
    pub server: PresetServer,
    pub auth: PresetAuth,
    /// What the admin must know about this provider.
    pub notes: Vec<String>,
}

fn s(v: &str) -> String {
    v.to_owned()
}

/// All presets, in display order.
pub fn presets() -> Vec<ProviderPreset> {
    vec![microsoft365(), google(), custom()]
}

pub fn preset(id: ProviderId) -> ProviderPreset {
    match id {
        ProviderId::Microsoft365 => microsoft365(),
        ProviderId::Google => google(),
        ProviderId::Custom => custom(),
    }
}

fn microsoft365() -> ProviderPreset {
    ProviderPreset {
        id: ProviderId::Microsoft365,
        name: s("Microsoft 365"),
        experimental: false,
        server: PresetServer {
            host: Some(s("smtp.office365.com")),
            port: 587,
            encryption: Encryption::Starttls,
        },
        auth: PresetAuth {
            methods: vec![AuthMethod::Oauth2, AuthMethod::Password],
            recommended_method: AuthMethod::Oauth2,
            authorization_url: Some(s(
                "https://login.microsoftonline.com/{directory}/oauth2/v2.0/authorize",
            )),
            token_url: Some(s(
                "https://login.microsoftonline.com/{directory}/oauth2/v2.0/token",
            )),
            scopes: vec![
                s("https://outlook.office.com/SMTP.Send"),
                s("openid"),
                s("profile"),
                s("offline_access"),
            ],
            authorization_params: BTreeMap::new(),
            issuer: Some(s("https://login.microsoftonline.com/{directory}/v2.0")),
            jwks_uri: Some(s(
                "https://login.microsoftonline.com/{directory}/discovery/v2.0/keys",
            )),
        },
        notes: vec![
            s(
                "SMTP AUTH must be enabled for the organization and for the sending user, and Security Defaults must be off.",
            ),
            s("Register a Web redirect URI equal to oauth.redirect_uri in the app registration."),
            s("Only the user who performed the authorization can be the sender (From:)."),
            s(
                "Single-tenant app registrations need the directory (tenant) id or domain in auth.microsoft_directory.",
            ),
        ],
    }
}

fn google() -> ProviderPreset {
    let mut params = BTreeMap::new();
    params.insert(s("access_type"), s("offline"));
    params.insert(s("prompt"), s("consent"));
    ProviderPreset {
        id: ProviderId::Google,
        name: s("Google"),
        experimental: true,
        server: PresetServer {
            host: Some(s("smtp.gmail.com")),
            port: 587,
            encryption: Encryption::Starttls,
        },
        auth: PresetAuth {
            methods: vec![AuthMethod::Oauth2, AuthMethod::Password],
            recommended_method: AuthMethod::Oauth2,
            authorization_url: Some(s("https://accounts.google.com/o/oauth2/v2/auth")),
            token_url: Some(s("https://oauth2.googleapis.com/token")),
            scopes: vec![
                s("openid"),
                s("profile"),
                s("email"),
                s("https://mail.google.com/"),
            ],
            authorization_params: params,
            issuer: Some(s("https://accounts.google.com")),
            jwks_uri: Some(s("https://www.googleapis.com/oauth2/v3/certs")),
        },
        notes: vec![
            s("Support for Google OAuth 2.0 is experimental."),
            s(
                "Enable the Gmail API and add the sending users as test users of the OAuth consent screen.",
            ),
            s("Apps in testing mode get refresh tokens that expire after 7 days."),
        ],
    }
}

fn custom() -> ProviderPreset {
    ProviderPreset {
        id: ProviderId::Custom,
        name: s("Custom"),
        experimental: false,
        server: PresetServer {
            host: None,
            port: 587,
            encryption: Encryption::Starttls,
        },
        auth: PresetAuth {
            methods: vec![AuthMethod::None, AuthMethod::Password, AuthMethod::Oauth2],
            recommended_method: AuthMethod::Password,
            authorization_url: None,
            token_url: None,
            scopes: Vec::new(),
            authorization_params: BTreeMap::new(),
            issuer: None,
            jwks_uri: None,
        },
        notes: vec![s(
            "Enter the values from your email provider's manual. For OAuth 2.0, auth.issuer enables ID-token verification by discovery.",
        )],
    }
}

/// Replaces `{directory}` in a Microsoft URL.
pub fn with_directory(template: &str, directory: Option<&str>) -> String {
    template.replace(
        "{directory}",
        directory
            .filter(|d| !d.is_empty())
            .unwrap_or(DEFAULT_MICROSOFT_DIRECTORY),
    )
}
