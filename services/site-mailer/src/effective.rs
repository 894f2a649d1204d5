//! The site's effective email configuration: what `GET /api/v1/site/email-config` answers
//! (the wire shape, [`SiteEmailConfig`]), converted once into [`EffectiveConfig`], whose
//! values cannot be bad. Knows nothing of HTTP or storage.

use chrono::{DateTime, Utc};
use mail_core::domain::{EmailAddress, Port, SmtpHost};
use mail_core::secret::WireSecret;
use mail_core::settings::{
    AuthMethod, FeatureKind, FeatureSenders, FeatureSendersView, ProviderId, Receiver,
    ReceiverView, Sender, SenderView, Server, ServerView,
};
use mail_core::smtp::SmtpAuth;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// `GET /api/v1/site/email-config`, as the Management Service sends it. Unknown fields are
/// ignored (a newer Management Service may add some).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteEmailConfig {
    pub tenant_id: String,
    pub site_id: String,
    pub provider: ProviderId,
    pub server: ServerView,
    pub auth: SiteAuthConfig,
    #[serde(default)]
    pub senders: Vec<SenderView>,
    #[serde(default)]
    pub receivers: Vec<ReceiverView>,
    #[serde(default)]
    pub feature_senders: FeatureSendersView,
    #[serde(default)]
    pub override_applied: bool,
    #[serde(default)]
    pub token_cache: Option<TokenCacheInfo>,
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteAuthConfig {
    pub method: AuthMethod,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<WireSecret>,
    #[serde(default)]
    pub authorization_username: Option<String>,
}

/// Where the tenant's access token is shared (Redis) and the key that opens only this
/// tenant's entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCacheInfo {
    pub redis_key: String,
    pub key: WireSecret,
}

/// The validated configuration the outbox sends with.
#[derive(Debug, Clone)]
pub struct EffectiveConfig {
    pub tenant_id: String,
    pub site_id: String,
    pub provider: ProviderId,
    pub server: Server,
    pub auth: EffectiveAuth,
    pub senders: Vec<Sender>,
    pub receivers: Vec<Receiver>,
    pub feature_senders: FeatureSenders,
    pub token_cache: Option<TokenCacheInfo>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// How the SMTP session is authorized. `Debug` never shows the password.
#[derive(Clone)]
pub enum EffectiveAuth {
    None,
    Password {
        username: String,
        password: SecretString,
    },
    /// XOAUTH2 with an access token from the Management Service.
    Oauth2 {
        /// The authorized user: the XOAUTH2 user, and with Microsoft 365 the only sender.
        authorization_username: Option<EmailAddress>,
    },
}

impl std::fmt::Debug for EffectiveAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EffectiveAuth::None => f.write_str("None"),
            EffectiveAuth::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .field("password", &"[REDACTED]")
                .finish(),
            EffectiveAuth::Oauth2 {
                authorization_username,
            } => f
                .debug_struct("Oauth2")
                .field("authorization_username", authorization_username)
                .finish(),
        }
    }
}

impl EffectiveAuth {
    pub fn method(&self) -> &'static str {
        match self {
            EffectiveAuth::None => "none",
            EffectiveAuth::Password { .. } => "password",
            EffectiveAuth::Oauth2 { .. } => "oauth2",
        }
    }

    /// The SMTP credentials, for the methods that need no token.
    pub fn smtp_auth(&self) -> Option<SmtpAuth> {
        match self {
            EffectiveAuth::None => Some(SmtpAuth::None),
            EffectiveAuth::Password { username, password } => Some(SmtpAuth::Password {
                username: username.clone(),
                password: password.clone(),
            }),
            EffectiveAuth::Oauth2 { .. } => None,
        }
    }
}

impl EffectiveConfig {
    /// The only allowed sender when the provider is Microsoft 365 with OAuth 2.0: the user
    /// who authorized (sending on behalf of another user is not supported there).
    pub fn required_sender(&self) -> Option<Option<&EmailAddress>> {
        match (&self.provider, &self.auth) {
            (
                ProviderId::Microsoft365,
                EffectiveAuth::Oauth2 {
                    authorization_username,
                },
            ) => Some(authorization_username.as_ref()),
            _ => None,
        }
    }

    pub fn default_sender(&self) -> Option<&Sender> {
        self.senders.iter().find(|s| s.default)
    }

    pub fn sender(&self, address: &EmailAddress) -> Option<&Sender> {
        self.senders
            .iter()
            .find(|s| s.address.same_mailbox(address))
    }

    /// The predefined receivers of a kind: those whose purpose is the kind or absent.
    pub fn receivers_for(&self, kind: FeatureKind) -> Vec<EmailAddress> {
        self.receivers
            .iter()
            .filter(|r| r.purpose.is_none_or(|p| p == kind))
            .map(|r| r.address.clone())
            .collect()
    }
}

impl TryFrom<&SiteEmailConfig> for EffectiveConfig {
    type Error = String;

    fn try_from(c: &SiteEmailConfig) -> Result<Self, String> {
        let server = Server {
            host: SmtpHost::parse(&c.server.host).map_err(|m| format!("server.host {m}"))?,
            port: Port::parse(i64::from(c.server.port)).map_err(|m| format!("server.port {m}"))?,
            encryption: c.server.encryption,
        };
        let auth = match c.auth.method {
            AuthMethod::None => EffectiveAuth::None,
            AuthMethod::Password => EffectiveAuth::Password {
                username: c
                    .auth
                    .username
                    .clone()
                    .ok_or("auth.username is missing for password auth")?,
                password: SecretString::from(
                    c.auth
                        .password
                        .as_ref()
                        .ok_or("auth.password is missing for password auth")?
                        .expose()
                        .to_owned(),
                ),
            },
            AuthMethod::Oauth2 => EffectiveAuth::Oauth2 {
                authorization_username: match c.auth.authorization_username.as_deref() {
                    None | Some("") => None,
                    Some(u) => Some(
                        EmailAddress::parse(u)
                            .map_err(|m| format!("auth.authorization_username {m}"))?,
                    ),
                },
            },
        };
        let mut senders = Vec::with_capacity(c.senders.len());
        for (i, s) in c.senders.iter().enumerate() {
            senders.push(Sender {
                address: EmailAddress::parse(&s.address)
                    .map_err(|m| format!("senders[{i}].address {m}"))?,
                name: match &s.name {
                    Some(n) => Some(
                        mail_core::domain::header_text(n, mail_core::smtp::MAX_NAME_CHARS)
                            .map_err(|m| format!("senders[{i}].name {m}"))?,
                    )
                    .filter(|n| !n.is_empty()),
                    None => None,
                },
                default: s.default,
            });
        }
        let mut receivers = Vec::with_capacity(c.receivers.len());
        for (i, r) in c.receivers.iter().enumerate() {
            receivers.push(Receiver {
                address: EmailAddress::parse(&r.address)
                    .map_err(|m| format!("receivers[{i}].address {m}"))?,
                purpose: r.purpose,
            });
        }
        let feature = |name: &str, v: &Option<String>| -> Result<Option<EmailAddress>, String> {
            v.as_deref()
                .map(|a| EmailAddress::parse(a).map_err(|m| format!("feature_senders.{name} {m}")))
                .transpose()
        };
        let fs = &c.feature_senders;
        Ok(EffectiveConfig {
            tenant_id: c.tenant_id.clone(),
            site_id: c.site_id.clone(),
            provider: c.provider,
            server,
            auth,
            senders,
            receivers,
            feature_senders: FeatureSenders {
                scan_to_email: feature("scan_to_email", &fs.scan_to_email)?,
                payment_quota: feature("payment_quota", &fs.payment_quota)?,
                notification: feature("notification", &fs.notification)?,
                report: feature("report", &fs.report)?,
            },
            token_cache: c.token_cache.clone(),
            updated_at: c.updated_at,
        })
    }
}
