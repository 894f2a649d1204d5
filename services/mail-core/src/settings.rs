//! Email settings: the request shape (`EmailSettingsRequest`), the validated domain
//! (`EmailSettings`, stored as a JSON document with the secrets kept apart), and the GET shape
//! (`EmailSettingsView`).

use chrono::NaiveDate;
use secrecy::SecretString;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::domain::{EmailAddress, OAuthUrl, Port, SmtpHost, header_text, trim_blanks};
use crate::presets::{self, with_directory};
use crate::problem::{FieldError, FieldErrors};

/// Connection provider preset the settings were made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderId {
    Microsoft365,
    Google,
    Custom,
}

/// Transport encryption: `starttls` upgrades a plain connection (port 587), `tls` is
/// implicit TLS (port 465), `none` is unencrypted (LAN relays only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    None,
    Starttls,
    Tls,
}

impl Encryption {
    pub fn default_port(self) -> u16 {
        match self {
            Encryption::None => 25,
            Encryption::Starttls => 587,
            Encryption::Tls => 465,
        }
    }
}

/// How the SMTP session is authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    None,
    Password,
    Oauth2,
}

/// The features that send mail; a receiver's `purpose` and the keys of `feature_senders`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    ScanToEmail,
    PaymentQuota,
    Notification,
    Report,
}

/// A write-only secret in a request: omitted keeps the stored value, `null` clears it, a
/// string replaces it.
#[derive(Default)]
pub enum SecretPatch {
    #[default]
    Keep,
    Clear,
    Set(SecretString),
}

impl std::fmt::Debug for SecretPatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SecretPatch::Keep => "Keep",
            SecretPatch::Clear => "Clear",
            SecretPatch::Set(_) => "Set([REDACTED])",
        })
    }
}

impl<'de> Deserialize<'de> for SecretPatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<String>::deserialize(d)? {
            None => SecretPatch::Clear,
            Some(s) => SecretPatch::Set(SecretString::from(s)),
        })
    }
}

// ---------------------------------------------------------------- request

/// `PUT .../email-settings` body. Read-only fields of the GET shape (`oauth`, `*_set`) are
/// accepted and ignored, so a GET → edit → PUT round trip works; any other unknown field is
/// refused.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailSettingsRequest {
    pub provider: ProviderId,
    pub server: ServerRequest,
    pub auth: AuthRequest,
    /// Addresses that may appear as senders (From:). Exactly one is the default when any exist.
    #[serde(default)]
    pub senders: Vec<SenderRequest>,
    /// Predefined receivers of notifications and reports.
    #[serde(default)]
    pub receivers: Vec<ReceiverRequest>,
    /// Per-feature sender override; each value must be one of `senders`.
    #[serde(default)]
    pub feature_senders: FeatureSendersRequest,
    #[serde(default)]
    #[schema(ignore)]
    pub oauth: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub updated_at: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerRequest {
    /// SMTP server host name or IP address (no scheme, no port).
    #[schema(example = "smtp.office365.com")]
    pub host: String,
    /// 1–65535; defaults to 587 for `starttls`, 465 for `tls`, 25 for `none`.
    #[schema(example = 587)]
    pub port: Option<i64>,
    /// Defaults to `starttls`.
    pub encryption: Option<Encryption>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthRequest {
    pub method: AuthMethod,
    /// Username for `password` auth.
    pub username: Option<String>,
    /// Write-only. Omit to keep the stored password, `null` to clear it.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    pub password: SecretPatch,
    /// OAuth 2.0 application (client) id.
    pub client_id: Option<String>,
    /// Write-only. Omit to keep the stored secret, `null` to clear it.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    pub client_secret: SecretPatch,
    /// When the client secret expires (for early warnings), `YYYY-MM-DD`.
    pub client_secret_expires_at: Option<NaiveDate>,
    /// OAuth 2.0 authorization endpoint; a preset fills it when omitted.
    pub authorization_url: Option<String>,
    /// OAuth 2.0 token endpoint; a preset fills it when omitted.
    pub token_url: Option<String>,
    /// OpenID issuer, used to discover the ID-token signing keys of a custom provider.
    pub issuer: Option<String>,
    /// Microsoft directory (tenant) id or domain; default `organizations`.
    pub microsoft_directory: Option<String>,
    /// Scopes to request; a preset fills them when omitted.
    pub scopes: Option<Vec<String>>,
    /// The user the OAuth grant sends as; filled from the ID token after authorization.
    pub authorization_username: Option<String>,
    #[serde(default)]
    #[schema(ignore)]
    pub password_set: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub client_secret_set: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SenderRequest {
    #[schema(example = "scans@acme.example")]
    pub address: String,
    /// Display name.
    #[schema(example = "Acme Scans")]
    pub name: Option<String>,
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiverRequest {
    #[schema(example = "it@acme.example")]
    pub address: String,
    /// The message kind this receiver gets; absent: every kind.
    pub purpose: Option<FeatureKind>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeatureSendersRequest {
    pub scan_to_email: Option<String>,
    pub payment_quota: Option<String>,
    pub notification: Option<String>,
    pub report: Option<String>,
}

// ---------------------------------------------------------------- domain

/// Validated settings (without secrets), stored as a JSON document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmailSettings {
    pub provider: ProviderId,
    pub server: Server,
    pub auth: Auth,
    pub senders: Vec<Sender>,
    pub receivers: Vec<Receiver>,
    pub feature_senders: FeatureSenders,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    pub host: SmtpHost,
    pub port: Port,
    pub encryption: Encryption,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Auth {
    None,
    Password { username: String },
    Oauth2(Box<OAuthSettings>),
}

impl Auth {
    pub fn method(&self) -> AuthMethod {
        match self {
            Auth::None => AuthMethod::None,
            Auth::Password { .. } => AuthMethod::Password,
            Auth::Oauth2(_) => AuthMethod::Oauth2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OAuthSettings {
    pub client_id: String,
    pub client_secret_expires_at: Option<NaiveDate>,
    pub authorization_url: OAuthUrl,
    pub token_url: OAuthUrl,
    pub issuer: Option<OAuthUrl>,
    pub microsoft_directory: Option<String>,
    pub scopes: Vec<String>,
    pub authorization_username: Option<EmailAddress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sender {
    pub address: EmailAddress,
    pub name: Option<String>,
    pub default: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receiver {
    pub address: EmailAddress,
    pub purpose: Option<FeatureKind>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeatureSenders {
    pub scan_to_email: Option<EmailAddress>,
    pub payment_quota: Option<EmailAddress>,
    pub notification: Option<EmailAddress>,
    pub report: Option<EmailAddress>,
}

impl FeatureSenders {
    pub fn get(&self, kind: FeatureKind) -> Option<&EmailAddress> {
        match kind {
            FeatureKind::ScanToEmail => self.scan_to_email.as_ref(),
            FeatureKind::PaymentQuota => self.payment_quota.as_ref(),
            FeatureKind::Notification => self.notification.as_ref(),
            FeatureKind::Report => self.report.as_ref(),
        }
    }
}

/// What a PUT asks for the two secrets.
#[derive(Debug, Default)]
pub struct SecretChanges {
    pub password: SecretPatch,
    pub client_secret: SecretPatch,
}

/// What is stored now, as far as validating a change needs to know.
#[derive(Debug, Default)]
pub struct StoredState<'a> {
    pub settings: Option<&'a EmailSettings>,
    pub password_set: bool,
    pub client_secret_set: bool,
}

/// What to do with a stored secret column.
#[derive(Debug)]
pub enum SecretAction {
    Keep,
    Clear,
    Set(SecretString),
}

/// A validated change, ready to store.
#[derive(Debug)]
pub struct SettingsChange {
    pub settings: EmailSettings,
    pub password: SecretAction,
    pub client_secret: SecretAction,
}

const MAX_TEXT: usize = 256;
const MAX_LIST: usize = 100;

fn required_text(s: Option<&str>, max: usize) -> Result<String, String> {
    match s.map(trim_blanks) {
        None | Some("") => Err("is required".into()),
        Some(v) => header_text(v, max),
    }
}

impl EmailSettingsRequest {
    /// Converts the request into validated settings, given what is stored now. Every refused
    /// field is reported, not only the first.
    pub fn validate(self, stored: &StoredState<'_>) -> Result<SettingsChange, Vec<FieldError>> {
        let mut e = FieldErrors::new();
        let preset = presets::preset(self.provider);

        // server
        let host = e.check("server.host", SmtpHost::parse(&self.server.host));
        let encryption = self.server.encryption.unwrap_or(Encryption::Starttls);
        let port = e.check(
            "server.port",
            Port::parse(
                self.server
                    .port
                    .unwrap_or(i64::from(encryption.default_port())),
            ),
        );

        // auth
        let a = self.auth;
        let auth = match a.method {
            AuthMethod::None => Some(Auth::None),
            AuthMethod::Password => e
                .check(
                    "auth.username",
                    required_text(a.username.as_deref(), MAX_TEXT),
                )
                .map(|username| Auth::Password { username }),
            AuthMethod::Oauth2 => {
                let directory = match a.microsoft_directory.as_deref().map(str::trim) {
                    None | Some("") => None,
                    Some(d) => e.check("auth.microsoft_directory", directory_name(d)),
                };
                let url = |given: Option<String>, preset_url: Option<String>| {
                    given
                        .filter(|u| !u.trim().is_empty())
                        .or(preset_url)
                        .map(|u| with_directory(&u, directory.as_deref()))
                };
                let client_id = e.check(
                    "auth.client_id",
                    required_text(a.client_id.as_deref(), MAX_TEXT),
                );
                let authorization_url =
                    match url(a.authorization_url, preset.auth.authorization_url) {
                        Some(u) => {
                            e.check("auth.authorization_url", OAuthUrl::parse_authorization(&u))
                        }
                        None => {
                            e.push("auth.authorization_url", "is required for OAuth 2.0");
                            None
                        }
                    };
                let token_url = match url(a.token_url, preset.auth.token_url) {
                    Some(u) => e.check("auth.token_url", OAuthUrl::parse(&u)),
                    None => {
                        e.push("auth.token_url", "is required for OAuth 2.0");
                        None
                    }
                };
                let issuer = match url(a.issuer, preset.auth.issuer) {
                    Some(u) => e.check("auth.issuer", OAuthUrl::parse(&u)),
                    None => None,
                };
                let scopes = a.scopes.unwrap_or(preset.auth.scopes);
                if scopes.is_empty() {
                    e.push(
                        "auth.scopes",
                        "at least one scope is required for OAuth 2.0",
                    );
                }
                if scopes.len() > MAX_LIST {
                    e.push("auth.scopes", format!("at most {MAX_LIST} scopes"));
                }
                for (i, s) in scopes.iter().enumerate() {
                    if s.is_empty()
                        || s.len() > MAX_TEXT
                        || s.chars()
                            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\')
                    {
                        e.push(
                            format!("auth.scopes[{i}]"),
                            "must be a non-empty scope token without spaces, quotes or control characters",
                        );
                    }
                }
                let authorization_username =
                    match a.authorization_username.as_deref().map(trim_blanks) {
                        None | Some("") => None,
                        Some(u) => e.check("auth.authorization_username", EmailAddress::parse(u)),
                    };
                match (client_id, authorization_url, token_url) {
                    (Some(client_id), Some(authorization_url), Some(token_url)) => {
                        Some(Auth::Oauth2(Box::new(OAuthSettings {
                            client_id,
                            client_secret_expires_at: a.client_secret_expires_at,
                            authorization_url,
                            token_url,
                            issuer,
                            microsoft_directory: directory,
                            scopes,
                            authorization_username,
                        })))
                    }
                    _ => None,
                }
            }
        };

        // secrets: a stored secret is never sent to a new host
        let prev = stored.settings;
        let password = secret_action(
            &mut e,
            "auth.password",
            a.password,
            a.method == AuthMethod::Password,
            stored.password_set,
            prev.zip(host.as_ref())
                .is_some_and(|(p, h)| &p.server.host != h)
                .then_some("server.host"),
        );
        let new_token_url = match &auth {
            Some(Auth::Oauth2(o)) => Some(&o.token_url),
            _ => None,
        };
        let token_url_changed = match (prev.map(|p| &p.auth), new_token_url) {
            (Some(Auth::Oauth2(old)), Some(new)) => &old.token_url != new,
            _ => false,
        };
        let client_secret = secret_action(
            &mut e,
            "auth.client_secret",
            a.client_secret,
            a.method == AuthMethod::Oauth2,
            stored.client_secret_set,
            token_url_changed.then_some("auth.token_url"),
        );

        // senders
        if self.senders.len() > MAX_LIST {
            e.push("senders", format!("at most {MAX_LIST} senders"));
        }
        let mut senders: Vec<Sender> = Vec::new();
        for (i, s) in self.senders.into_iter().enumerate() {
            let address = e.check(
                format!("senders[{i}].address"),
                EmailAddress::parse(&s.address),
            );
            let name = match s.name.as_deref().map(trim_blanks) {
                None | Some("") => None,
                Some(n) => e.check(format!("senders[{i}].name"), header_text(n, MAX_TEXT)),
            };
            if let Some(address) = address {
                if senders.iter().any(|x| x.address.same_mailbox(&address)) {
                    e.push(format!("senders[{i}].address"), "is listed twice");
                }
                senders.push(Sender {
                    address,
                    name,
                    default: s.default,
                });
            }
        }
        let defaults = senders.iter().filter(|s| s.default).count();
        if !senders.is_empty() && defaults != 1 {
            e.push(
                "senders",
                format!("exactly one sender must be the default, found {defaults}"),
            );
        }

        // receivers
        if self.receivers.len() > MAX_LIST {
            e.push("receivers", format!("at most {MAX_LIST} receivers"));
        }
        let mut receivers = Vec::new();
        for (i, r) in self.receivers.into_iter().enumerate() {
            if let Some(address) = e.check(
                format!("receivers[{i}].address"),
                EmailAddress::parse(&r.address),
            ) {
                receivers.push(Receiver {
                    address,
                    purpose: r.purpose,
                });
            }
        }

        // feature senders: each one of the senders
        let fs = self.feature_senders;
        let mut feature = |name: &str, v: Option<String>| -> Option<EmailAddress> {
            let v = v.filter(|s| !s.trim().is_empty())?;
            let field = format!("feature_senders.{name}");
            let addr = e.check(field.clone(), EmailAddress::parse(&v))?;
            match senders.iter().find(|s| s.address.same_mailbox(&addr)) {
                Some(s) => Some(s.address.clone()),
                None => {
                    e.push(field, format!("{addr} is not one of the senders"));
                    None
                }
            }
        };
        let feature_senders = FeatureSenders {
            scan_to_email: feature("scan_to_email", fs.scan_to_email),
            payment_quota: feature("payment_quota", fs.payment_quota),
            notification: feature("notification", fs.notification),
            report: feature("report", fs.report),
        };

        if !e.is_empty() {
            return Err(e.into_vec());
        }
        match (host, port, auth) {
            (Some(host), Some(port), Some(auth)) => Ok(SettingsChange {
                settings: EmailSettings {
                    provider: self.provider,
                    server: Server {
                        host,
                        port,
                        encryption,
                    },
                    auth,
                    senders,
                    receivers,
                    feature_senders,
                },
                password,
                client_secret,
            }),
            // Every None above recorded an error, so this is unreachable in practice; answer
            // with a field error rather than panic.
            _ => Err(vec![FieldError {
                field: "server".into(),
                message: "is invalid".into(),
            }]),
        }
    }
}

fn directory_name(d: &str) -> Result<String, String> {
    if d.len() <= 253
        && d.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        Ok(d.to_owned())
    } else {
        Err("must be a directory (tenant) id, a domain, `organizations` or `common`".into())
    }
}

/// Decides what happens to one stored secret. `used` tells whether the chosen method needs it;
/// `moved` names the field whose change forbids keeping the stored value.
fn secret_action(
    e: &mut FieldErrors,
    field: &str,
    patch: SecretPatch,
    used: bool,
    stored: bool,
    moved: Option<&str>,
) -> SecretAction {
    if !used {
        // A method that does not use the secret keeps none of it.
        return SecretAction::Clear;
    }
    match patch {
        SecretPatch::Set(s) => {
            use secrecy::ExposeSecret;
            let v = s.expose_secret();
            if v.is_empty() {
                e.push(field, "must not be empty: omit it to keep the stored value");
            } else if v.len() > 4096 {
                e.push(field, "must be at most 4096 characters");
            }
            SecretAction::Set(s)
        }
        SecretPatch::Clear => {
            e.push(field, "is required by the chosen auth method");
            SecretAction::Clear
        }
        SecretPatch::Keep if !stored => {
            e.push(field, "is required by the chosen auth method");
            SecretAction::Keep
        }
        SecretPatch::Keep => {
            if let Some(moved) = moved {
                e.push(
                    field,
                    format!(
                        "must be sent again because {moved} changed: a stored secret is never sent to a new host"
                    ),
                );
            }
            SecretAction::Keep
        }
    }
}

// ---------------------------------------------------------------- view

/// The stored settings as `GET .../email-settings` shows them. Secrets are never shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EmailSettingsView {
    pub provider: ProviderId,
    pub server: ServerView,
    pub auth: AuthView,
    pub senders: Vec<SenderView>,
    pub receivers: Vec<ReceiverView>,
    pub feature_senders: FeatureSendersView,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerView {
    #[schema(example = "smtp.office365.com")]
    pub host: String,
    #[schema(example = 587)]
    pub port: u16,
    pub encryption: Encryption,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuthView {
    pub method: AuthMethod,
    pub username: Option<String>,
    /// True when a password is stored (it is never shown).
    pub password_set: bool,
    pub client_id: Option<String>,
    /// True when a client secret is stored (it is never shown).
    pub client_secret_set: bool,
    pub client_secret_expires_at: Option<NaiveDate>,
    pub authorization_url: Option<String>,
    pub token_url: Option<String>,
    pub issuer: Option<String>,
    pub microsoft_directory: Option<String>,
    pub scopes: Vec<String>,
    pub authorization_username: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SenderView {
    pub address: String,
    pub name: Option<String>,
    pub default: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReceiverView {
    pub address: String,
    pub purpose: Option<FeatureKind>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct FeatureSendersView {
    pub scan_to_email: Option<String>,
    pub payment_quota: Option<String>,
    pub notification: Option<String>,
    pub report: Option<String>,
}

impl EmailSettings {
    pub fn view(&self, password_set: bool, client_secret_set: bool) -> EmailSettingsView {
        let s = |a: &Option<EmailAddress>| a.as_ref().map(|a| a.as_str().to_owned());
        let (username, oauth) = match &self.auth {
            Auth::None => (None, None),
            Auth::Password { username } => (Some(username.clone()), None),
            Auth::Oauth2(o) => (None, Some(o)),
        };
        EmailSettingsView {
            provider: self.provider,
            server: ServerView {
                host: self.server.host.as_str().to_owned(),
                port: self.server.port.get(),
                encryption: self.server.encryption,
            },
            auth: AuthView {
                method: self.auth.method(),
                username,
                password_set,
                client_id: oauth.map(|o| o.client_id.clone()),
                client_secret_set,
                client_secret_expires_at: oauth.and_then(|o| o.client_secret_expires_at),
                authorization_url: oauth.map(|o| o.authorization_url.as_str().to_owned()),
                token_url: oauth.map(|o| o.token_url.as_str().to_owned()),
                issuer: oauth.and_then(|o| o.issuer.as_ref().map(|u| u.as_str().to_owned())),
                microsoft_directory: oauth.and_then(|o| o.microsoft_directory.clone()),
                scopes: oauth.map(|o| o.scopes.clone()).unwrap_or_default(),
                authorization_username: oauth.and_then(|o| s(&o.authorization_username)),
            },
            senders: self
                .senders
                .iter()
                .map(|x| SenderView {
                    address: x.address.as_str().to_owned(),
                    name: x.name.clone(),
                    default: x.default,
                })
                .collect(),
            receivers: self
                .receivers
                .iter()
                .map(|r| ReceiverView {
                    address: r.address.as_str().to_owned(),
                    purpose: r.purpose,
                })
                .collect(),
            feature_senders: FeatureSendersView {
                scan_to_email: s(&self.feature_senders.scan_to_email),
                payment_quota: s(&self.feature_senders.payment_quota),
                notification: s(&self.feature_senders.notification),
                report: s(&self.feature_senders.report),
            },
        }
    }

    /// Names of the top-level and auth fields that differ: what the audit log records
    /// (never the values).
    pub fn changed_fields(old: Option<&EmailSettings>, new: &EmailSettings) -> Vec<String> {
        let (Some(old), new) = (old, new) else {
            return vec!["*".into()];
        };
        let ov = serde_json::to_value(old.view(false, false)).unwrap_or_default();
        let nv = serde_json::to_value(new.view(false, false)).unwrap_or_default();
        let mut out = Vec::new();
        diff_paths("", &ov, &nv, &mut out);
        out
    }
}

fn diff_paths(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => diff_paths(&p, va, vb, out),
                    _ => out.push(p),
                }
            }
        }
        _ if a != b => out.push(prefix.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: serde_json::Value) -> EmailSettingsRequest {
        serde_json::from_value(v).unwrap()
    }

    fn fields(r: Result<SettingsChange, Vec<FieldError>>) -> Vec<String> {
        r.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    fn m365_password() -> serde_json::Value {
        json!({
            "provider": "microsoft365",
            "server": {"host": "smtp.office365.com", "port": 587, "encryption": "starttls"},
            "auth": {"method": "password", "username": "scan@acme.example", "password": "pw"},
            "senders": [{"address": "scan@acme.example", "name": "Scans", "default": true}],
            "feature_senders": {"scan_to_email": "scan@acme.example"}
        })
    }

    #[test]
    fn valid_password_settings() {
        let c = req(m365_password())
            .validate(&StoredState::default())
            .unwrap();
        assert_eq!(c.settings.server.port.get(), 587);
        assert!(matches!(c.password, SecretAction::Set(_)));
        assert!(matches!(c.client_secret, SecretAction::Clear));
    }

    #[test]
    fn oauth_fills_microsoft_urls_with_directory() {
        let c = req(json!({
            "provider": "microsoft365",
            "server": {"host": "smtp.office365.com"},
            "auth": {"method": "oauth2", "client_id": "abc", "client_secret": "s", "microsoft_directory": "contoso.onmicrosoft.com"}
        }))
        .validate(&StoredState::default())
        .unwrap();
        let Auth::Oauth2(o) = c.settings.auth else {
            panic!()
        };
        assert_eq!(
            o.token_url.as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert!(o.scopes.contains(&"offline_access".to_owned()));
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let f = fields(
            req(json!({
                "provider": "custom",
                "server": {"host": "bad host", "port": 70000},
                "auth": {"method": "oauth2", "token_url": "http://example.com/t"},
                "senders": [{"address": "nope"}, {"address": "a@b.c"}],
                "receivers": [{"address": "x"}],
                "feature_senders": {"report": "z@b.c"}
            }))
            .validate(&StoredState::default()),
        );
        for want in [
            "server.host",
            "server.port",
            "auth.client_id",
            "auth.authorization_url",
            "auth.token_url",
            "auth.scopes",
            "auth.client_secret",
            "senders[0].address",
            "senders",
            "receivers[0].address",
            "feature_senders.report",
        ] {
            assert!(f.contains(&want.to_owned()), "{want} missing from {f:?}");
        }
    }

    #[test]
    fn exactly_one_default_sender() {
        let mut v = m365_password();
        v["senders"] =
            json!([{"address": "a@b.c", "default": true}, {"address": "d@b.c", "default": true}]);
        v["feature_senders"] = json!({});
        assert_eq!(
            fields(req(v.clone()).validate(&StoredState::default())),
            vec!["senders"]
        );
        v["senders"] = json!([{"address": "a@b.c"}]);
        assert_eq!(
            fields(req(v).validate(&StoredState::default())),
            vec!["senders"]
        );
    }

    #[test]
    fn stored_secret_is_not_sent_to_a_new_host() {
        let first = req(m365_password())
            .validate(&StoredState::default())
            .unwrap();
        let stored = StoredState {
            settings: Some(&first.settings),
            password_set: true,
            client_secret_set: false,
        };
        let mut v = m365_password();
        v["auth"].as_object_mut().unwrap().remove("password");
        // same host: the stored password is kept
        let kept = req(v.clone()).validate(&stored).unwrap();
        assert!(matches!(kept.password, SecretAction::Keep));
        // new host without the password: refused
        v["server"]["host"] = json!("evil.example.net");
        assert_eq!(
            fields(req(v.clone()).validate(&stored)),
            vec!["auth.password"]
        );
        // new host with the password: fine
        v["auth"]["password"] = json!("pw2");
        assert!(req(v).validate(&stored).is_ok());
    }

    #[test]
    fn null_clears_and_is_refused_when_required() {
        let mut v = m365_password();
        v["auth"]["password"] = serde_json::Value::Null;
        assert_eq!(
            fields(req(v).validate(&StoredState::default())),
            vec!["auth.password"]
        );
    }

    #[test]
    fn header_injection_in_sender_name() {
        let mut v = m365_password();
        v["senders"][0]["name"] = json!("Scans\r\nBcc: x@evil.example");
        assert_eq!(
            fields(req(v).validate(&StoredState::default())),
            vec!["senders[0].name"]
        );
    }

    #[test]
    fn unknown_fields_are_refused_but_read_only_ones_ignored() {
        let mut v = m365_password();
        v["oauth"] = json!({"status": "authorized"});
        v["auth"]["password_set"] = json!(true);
        assert!(serde_json::from_value::<EmailSettingsRequest>(v.clone()).is_ok());
        v["auth"]["pasword"] = json!("typo");
        let err = serde_json::from_value::<EmailSettingsRequest>(v).unwrap_err();
        assert!(err.to_string().contains("unknown field `pasword`"));
    }

    #[test]
    fn changed_fields_name_paths_not_values() {
        let a = req(m365_password())
            .validate(&StoredState::default())
            .unwrap()
            .settings;
        let mut v = m365_password();
        v["server"]["port"] = json!(25);
        let b = req(v).validate(&StoredState::default()).unwrap().settings;
        assert_eq!(
            EmailSettings::changed_fields(Some(&a), &b),
            vec!["server.port"]
        );
    }
}
