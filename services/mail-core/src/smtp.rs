//! SMTP delivery, shared by both services: a [`Mailer`] that sends through lettre's pooled
//! `AsyncSmtpTransport`, the MIME builder for [`OutgoingMessage`], and the classification of
//! what went wrong ([`SendError`]) into retryable and final outcomes.
//!
//! - Egress: the host is resolved and checked against `POSTWIRE_EGRESS_ALLOW` before every
//!   send; lettre connects to the allowed IP address while TLS still verifies the host name.
//! - TLS: `starttls` requires the upgrade (never silently plaintext), `tls` is implicit TLS,
//!   `none` is plaintext. Certificates are checked by the platform verifier plus the roots of
//!   `POSTWIRE_EXTRA_CA_FILE`.
//! - Credentials are fixed per lettre transport, so transports are cached per target (without
//!   secrets) and replaced when the resolved address or a hash of the credential changes: a new
//!   access token or password gets a new transport, and the old pool is dropped.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Attachment as MimeAttachment, Body, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::{AsyncSmtpTransport, PoolConfig};
use lettre::{AsyncTransport as _, Message, Tokio1Executor};
use secrecy::{ExposeSecret as _, SecretString};

use crate::domain::{EmailAddress, Port, SmtpHost, has_line_break_or_control, header_text};
use crate::egress::{EgressPolicy, ResolveError};
use crate::settings::{Encryption, Server};

/// How long establishing the TCP connection may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one whole send (connect, TLS, AUTH, the transaction) may take.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections kept open per transport.
pub const DEFAULT_POOL_SIZE: u32 = 4;
/// Transports (one per target and credential) kept at most; the least recently used goes.
pub const DEFAULT_MAX_TRANSPORTS: usize = 256;

/// The longest subject accepted, in characters.
pub const MAX_SUBJECT_CHARS: usize = 998;
/// The longest display name or attachment file name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 255;

// ------------------------------------------------------------------------------------------
// Target

/// Where and how to deliver: the SMTP server, its transport encryption and the credentials.
#[derive(Clone, Debug)]
pub struct SmtpTarget {
    pub host: SmtpHost,
    pub port: Port,
    pub encryption: Encryption,
    pub auth: SmtpAuth,
    /// The name sent with EHLO; default: this machine's host name.
    pub hello_name: Option<String>,
}

impl SmtpTarget {
    /// A target for validated server settings.
    pub fn new(server: &Server, auth: SmtpAuth) -> Self {
        SmtpTarget {
            host: server.host.clone(),
            port: server.port,
            encryption: server.encryption,
            auth,
            hello_name: None,
        }
    }
}

/// How the SMTP session is authenticated. `Debug` never shows the secrets.
#[derive(Clone)]
pub enum SmtpAuth {
    None,
    /// AUTH PLAIN (or LOGIN when the server offers only that).
    Password {
        username: String,
        password: SecretString,
    },
    /// AUTH XOAUTH2 with an OAuth 2.0 access token.
    Xoauth2 {
        username: String,
        access_token: SecretString,
    },
}

impl fmt::Debug for SmtpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmtpAuth::None => f.write_str("None"),
            SmtpAuth::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .field("password", &"[REDACTED]")
                .finish(),
            SmtpAuth::Xoauth2 { username, .. } => f
                .debug_struct("Xoauth2")
                .field("username", username)
                .field("access_token", &"[REDACTED]")
                .finish(),
        }
    }
}

impl SmtpAuth {
    fn kind(&self) -> AuthKind {
        match self {
            SmtpAuth::None => AuthKind::None,
            SmtpAuth::Password { .. } => AuthKind::Password,
            SmtpAuth::Xoauth2 { .. } => AuthKind::Xoauth2,
        }
    }

    fn username(&self) -> Option<&str> {
        match self {
            SmtpAuth::None => None,
            SmtpAuth::Password { username, .. } | SmtpAuth::Xoauth2 { username, .. } => {
                Some(username)
            }
        }
    }

    fn secret(&self) -> Option<&SecretString> {
        match self {
            SmtpAuth::None => None,
            SmtpAuth::Password { password, .. } => Some(password),
            SmtpAuth::Xoauth2 { access_token, .. } => Some(access_token),
        }
    }

    /// SHA-256 over the credential, so that a new password or token makes a new transport
    /// without keeping a second copy of the secret in the cache key.
    fn fingerprint(&self) -> Option<[u8; 32]> {
        let secret = self.secret()?;
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(self.username().unwrap_or_default().as_bytes());
        ctx.update(&[0]);
        ctx.update(secret.expose_secret().as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Some(out)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum AuthKind {
    None,
    Password,
    Xoauth2,
}

// ------------------------------------------------------------------------------------------
// Outcomes

/// The server's final reply to a delivered message (after the message data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpReply {
    pub code: u16,
    /// The reply's lines, joined with spaces.
    pub message: String,
}

impl SmtpReply {
    fn from_response(r: &Response) -> Self {
        SmtpReply {
            code: r.code().into(),
            message: r.message().collect::<Vec<_>>().join(" "),
        }
    }
}

impl fmt::Display for SmtpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.message)
    }
}

/// Why a message was not delivered. Only [`SendError::Transient`] is worth retrying as is;
/// [`SendError::AuthRejected`] with an OAuth token is worth one retry with a fresh token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// A 4xx reply, a timeout, a refused/reset/broken connection, a DNS failure: try later.
    #[error("temporary SMTP failure: {}", describe(*.code, .message))]
    Transient { code: Option<u16>, message: String },
    /// A 5xx reply (other than authentication): the message will not go through as is.
    #[error("the SMTP server refused the message: {code} {message}")]
    Permanent { code: u16, message: String },
    /// The server refused the credentials (535 and the like), or answered an XOAUTH2 token
    /// with a challenge (334, Gmail's way of saying the token was rejected).
    #[error("the SMTP server rejected the credentials: {code} {message}")]
    AuthRejected { code: u16, message: String },
    /// The TLS handshake failed (untrusted or mismatched certificate, no STARTTLS, ...).
    #[error("TLS failure: {description}")]
    Tls { description: String },
    /// `POSTWIRE_EGRESS_ALLOW` refused every address of the host; nothing was connected.
    #[error("{description}")]
    Egress { description: String },
    /// The target cannot work with this server as configured (no common AUTH mechanism, an
    /// invalid EHLO name, non-ASCII content without 8BITMIME, ...).
    #[error("SMTP configuration problem: {description}")]
    Config { description: String },
}

fn describe(code: Option<u16>, message: &str) -> String {
    match code {
        Some(c) => format!("{c} {message}"),
        None => message.to_owned(),
    }
}

impl SendError {
    /// Whether sending the same message later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SendError::Transient { .. })
    }

    /// Whether the credentials were refused (for OAuth: drop the token, fetch a new one once).
    pub fn is_auth_rejected(&self) -> bool {
        matches!(self, SendError::AuthRejected { .. })
    }

    /// The server's reply, when the failure is one.
    pub fn reply(&self) -> Option<(u16, &str)> {
        match self {
            SendError::Transient {
                code: Some(code),
                message,
            }
            | SendError::Permanent { code, message }
            | SendError::AuthRejected { code, message } => Some((*code, message)),
            _ => None,
        }
    }
}

/// Reply codes that mean "your credentials are not accepted" (RFC 4954): 530 authentication
/// required, 534 mechanism too weak, 535 credentials invalid, 538 encryption required.
fn is_auth_code(code: u16) -> bool {
    matches!(code, 530 | 534 | 535 | 538)
}

/// lettre's client error when the server answers an XOAUTH2 initial response with a 334
/// challenge: Gmail (and the test peer) do that to report a rejected token.
const XOAUTH2_CHALLENGE: &str = "This mechanism does not expect a challenge";

/// Sorts a lettre error into a [`SendError`] (after vaultwarden's `mail.rs`).
fn classify(err: &lettre::transport::smtp::Error, auth: AuthKind) -> SendError {
    let text = err.to_string();
    if let Some(code) = err.status() {
        let code = u16::from(code);
        let message = std::error::Error::source(err)
            .map(|s| s.to_string())
            .unwrap_or_default();
        return if err.is_transient() {
            SendError::Transient {
                code: Some(code),
                message,
            }
        } else if is_auth_code(code) {
            SendError::AuthRejected { code, message }
        } else {
            SendError::Permanent { code, message }
        };
    }
    if err.is_tls() || find_rustls_error(err).is_some() {
        return SendError::Tls { description: text };
    }
    if err.is_client() {
        if text.contains(XOAUTH2_CHALLENGE) && auth == AuthKind::Xoauth2 {
            return SendError::AuthRejected {
                code: 334,
                message: "the server answered the XOAUTH2 token with a challenge: token rejected"
                    .to_owned(),
            };
        }
        if text.contains("STARTTLS") {
            return SendError::Tls { description: text };
        }
        return SendError::Config { description: text };
    }
    // Connection, network and response errors, timeouts, a shut-down transport.
    SendError::Transient {
        code: None,
        message: text,
    }
}

/// The TCP connection could not be established (refused, unreachable, timed out): nothing
/// was sent, so another address of the host may be tried.
fn is_connect_failure(err: &lettre::transport::smtp::Error) -> bool {
    err.status().is_none()
        && find_rustls_error(err).is_none()
        && err.to_string().starts_with("Connection error")
}

/// A rustls error anywhere in the cause chain (lettre reports failed handshakes as connection
/// errors wrapping an `io::Error` that carries the rustls error).
fn find_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            if let Some(t) = inner.downcast_ref::<rustls::Error>() {
                return Some(t);
            }
            current = inner.source();
            continue;
        }
        current = e.source();
    }
    None
}

// ------------------------------------------------------------------------------------------
// Mailer

/// Settings of a [`Mailer`].
#[derive(Clone, Debug)]
pub struct MailerConfig {
    pub egress: Arc<EgressPolicy>,
    /// `POSTWIRE_EXTRA_CA_FILE`: PEM roots trusted in addition to the platform's.
    pub extra_ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub send_timeout: Duration,
    pub pool_max_size: u32,
    pub max_transports: usize,
}

impl MailerConfig {
    pub fn new(egress: Arc<EgressPolicy>) -> Self {
        MailerConfig {
            egress,
            extra_ca_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            pool_max_size: DEFAULT_POOL_SIZE,
            max_transports: DEFAULT_MAX_TRANSPORTS,
        }
    }

    pub fn extra_ca_file(mut self, path: Option<&Path>) -> Self {
        self.extra_ca_file = path.map(Path::to_path_buf);
        self
    }
}

/// Sends messages over SMTP with pooled, cached transports. Cheap to clone (shared cache).
#[derive(Clone)]
pub struct Mailer {
    inner: Arc<MailerInner>,
}

struct MailerInner {
    config: MailerConfig,
    extra_roots: Option<Certificate>,
    transports: Mutex<HashMap<TransportKey, CachedTransport>>,
    next_id: AtomicU64,
}

/// A target without its secrets.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TransportKey {
    host: String,
    port: u16,
    tls: TlsMode,
    auth: AuthKind,
    username: Option<String>,
    hello_name: Option<String>,
}

impl TransportKey {
    fn of(target: &SmtpTarget) -> Self {
        TransportKey {
            host: target.host.as_str().to_owned(),
            port: target.port.get(),
            tls: target.encryption.into(),
            auth: target.auth.kind(),
            username: target.auth.username().map(str::to_owned),
            hello_name: target.hello_name.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum TlsMode {
    None,
    StartTls,
    Implicit,
}

impl From<Encryption> for TlsMode {
    fn from(e: Encryption) -> Self {
        match e {
            Encryption::None => TlsMode::None,
            Encryption::Starttls => TlsMode::StartTls,
            Encryption::Tls => TlsMode::Implicit,
        }
    }
}

struct CachedTransport {
    /// Tells this transport apart from a later one for the same key.
    id: u64,
    addr: SocketAddr,
    credential: Option<[u8; 32]>,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    last_used: Instant,
}

impl fmt::Debug for Mailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cached = self
            .inner
            .transports
            .lock()
            .map(|t| t.len())
            .unwrap_or_default();
        f.debug_struct("Mailer")
            .field("config", &self.inner.config)
            .field("extra_roots", &self.inner.extra_roots.is_some())
            .field("cached_transports", &cached)
            .finish()
    }
}

impl Mailer {
    /// Reads the extra CA file, if any; an unreadable or empty file is an error naming it.
    pub fn new(config: MailerConfig) -> Result<Self, String> {
        let extra_roots = match &config.extra_ca_file {
            None => None,
            Some(path) => Some(load_extra_roots(path)?),
        };
        Ok(Mailer {
            inner: Arc::new(MailerInner {
                config,
                extra_roots,
                transports: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        })
    }

    pub fn config(&self) -> &MailerConfig {
        &self.inner.config
    }

    /// Sends a built message; returns the server's reply to the message data.
    pub async fn send(
        &self,
        target: &SmtpTarget,
        message: Message,
    ) -> Result<SmtpReply, SendError> {
        let envelope = message.envelope().clone();
        let raw = message.formatted();
        // Only the formatted bytes stay in memory while sending.
        drop(message);
        self.send_raw(target, &envelope, &raw).await
    }

    /// Sends an already formatted RFC 5322 message (e.g. one stored by an outbox).
    ///
    /// The host is resolved and checked against the egress policy first; when connecting to
    /// one allowed address fails, the next one is tried (nothing was sent to the first).
    #[tracing::instrument(
        name = "smtp.send",
        skip_all,
        fields(otel.kind = "client", host = %target.host.as_str(), port = target.port.get())
    )]
    pub async fn send_raw(
        &self,
        target: &SmtpTarget,
        envelope: &Envelope,
        raw: &[u8],
    ) -> Result<SmtpReply, SendError> {
        let hello = hello_name(target.hello_name.as_deref())?;
        let mut candidates = self.resolve(target).await?;
        let key = TransportKey::of(target);
        let credential = target.auth.fingerprint();
        let timeout = self.inner.config.send_timeout;
        loop {
            let (id, addr, transport) =
                self.transport(target, &key, credential, &hello, &candidates)?;
            match tokio::time::timeout(timeout, transport.send_raw(envelope, raw)).await {
                Ok(Ok(response)) => return Ok(SmtpReply::from_response(&response)),
                Ok(Err(e)) => {
                    if is_connect_failure(&e) && candidates.len() > 1 {
                        tracing::info!(%addr, error = %e, "cannot connect; trying the next address");
                        self.evict(&key, id);
                        candidates.retain(|a| *a != addr);
                        continue;
                    }
                    let err = classify(&e, target.auth.kind());
                    tracing::warn!(%addr, error = %err, "SMTP delivery failed");
                    return Err(err);
                }
                Err(_) => {
                    // A connection abandoned mid-command cannot be reused: drop the whole pool.
                    self.evict(&key, id);
                    tokio::spawn(async move { transport.shutdown().await });
                    let err = SendError::Transient {
                        code: None,
                        message: format!(
                            "no complete answer from {}:{} ({addr}) within {timeout:?}",
                            target.host.as_str(),
                            target.port.get()
                        ),
                    };
                    tracing::warn!(error = %err, "SMTP delivery timed out");
                    return Err(err);
                }
            }
        }
    }

    /// Number of cached transports (for tests and metrics).
    pub fn cached_transports(&self) -> usize {
        self.inner
            .transports
            .lock()
            .map(|t| t.len())
            .unwrap_or_default()
    }

    /// The target's addresses that the egress policy allows (none: an error, before any
    /// connection is made).
    async fn resolve(&self, target: &SmtpTarget) -> Result<Vec<SocketAddr>, SendError> {
        let host = target.host.as_str();
        let allowed = self
            .inner
            .config
            .egress
            .resolve(host, target.port.get())
            .await
            .map_err(|e| match e {
                ResolveError::Denied(d) => SendError::Egress {
                    description: d.to_string(),
                },
                dns @ ResolveError::Dns(..) => SendError::Transient {
                    code: None,
                    message: dns.to_string(),
                },
            })?;
        if allowed.is_empty() {
            return Err(SendError::Transient {
                code: None,
                message: format!("{host} resolves to no address"),
            });
        }
        Ok(allowed)
    }

    /// The cached transport for the target when its address is still a candidate and its
    /// credential unchanged; otherwise a new one (replacing the cached one).
    fn transport(
        &self,
        target: &SmtpTarget,
        key: &TransportKey,
        credential: Option<[u8; 32]>,
        hello: &ClientId,
        candidates: &[SocketAddr],
    ) -> Result<(u64, SocketAddr, AsyncSmtpTransport<Tokio1Executor>), SendError> {
        let cached = |cache: &mut HashMap<TransportKey, CachedTransport>| {
            cache
                .get_mut(key)
                .filter(|e| e.credential == credential && candidates.contains(&e.addr))
                .map(|e| {
                    e.last_used = Instant::now();
                    (e.id, e.addr, e.transport.clone())
                })
        };
        let addr = {
            let mut cache = self.lock_cache();
            if let Some(hit) = cached(&mut cache) {
                return Ok(hit);
            }
            // Keep the previous address while it is still allowed (its pool stays useful).
            cache
                .get(key)
                .map(|e| e.addr)
                .filter(|a| candidates.contains(a))
                .or_else(|| candidates.first().copied())
                .ok_or_else(|| SendError::Transient {
                    code: None,
                    message: format!("no address left to try for {}", target.host.as_str()),
                })?
        };
        // Outside the lock: building TLS parameters reads the platform's roots.
        let transport = self.build_transport(target, addr, hello.clone())?;
        let mut dropped = Vec::new();
        let result = {
            let mut cache = self.lock_cache();
            // Another send may have built one meanwhile: use it (ours is dropped unused).
            if let Some(hit) = cached(&mut cache) {
                return Ok(hit);
            }
            dropped.extend(cache.remove(key));
            if cache.len() >= self.inner.config.max_transports.max(1)
                && let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone())
            {
                dropped.extend(cache.remove(&oldest));
            }
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            cache.insert(
                key.clone(),
                CachedTransport {
                    id,
                    addr,
                    credential,
                    transport: transport.clone(),
                    last_used: Instant::now(),
                },
            );
            tracing::debug!(%addr, "new SMTP transport");
            (id, addr, transport)
        };
        // The replaced pools close their idle connections (QUIT) once no send uses them.
        drop(dropped);
        Ok(result)
    }

    fn build_transport(
        &self,
        target: &SmtpTarget,
        addr: SocketAddr,
        hello: ClientId,
    ) -> Result<AsyncSmtpTransport<Tokio1Executor>, SendError> {
        let tls_parameters = || {
            let mut b = TlsParameters::builder(target.host.as_str().to_owned());
            if let Some(roots) = &self.inner.extra_roots {
                b = b.add_root_certificate(roots.clone());
            }
            b.build().map_err(|e| SendError::Tls {
                description: e.to_string(),
            })
        };
        let tls = match target.encryption {
            Encryption::None => Tls::None,
            Encryption::Starttls => Tls::Required(tls_parameters()?),
            Encryption::Tls => Tls::Wrapper(tls_parameters()?),
        };
        let mut builder =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(addr.ip().to_string())
                .port(addr.port())
                .tls(tls)
                .hello_name(hello)
                .timeout(Some(self.inner.config.connect_timeout))
                .pool_config(PoolConfig::new().max_size(self.inner.config.pool_max_size.max(1)));
        match &target.auth {
            SmtpAuth::None => {}
            SmtpAuth::Password { username, password } => {
                builder = builder
                    .credentials(Credentials::new(
                        username.clone(),
                        password.expose_secret().to_owned(),
                    ))
                    .authentication(vec![Mechanism::Plain, Mechanism::Login]);
            }
            SmtpAuth::Xoauth2 {
                username,
                access_token,
            } => {
                builder = builder
                    .credentials(Credentials::new(
                        username.clone(),
                        access_token.expose_secret().to_owned(),
                    ))
                    .authentication(vec![Mechanism::Xoauth2]);
            }
        }
        Ok(builder.build())
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<TransportKey, CachedTransport>> {
        // The cache holds no invariant a panic could break: keep using it.
        self.inner
            .transports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn evict(&self, key: &TransportKey, id: u64) {
        let mut cache = self.lock_cache();
        // Only if it is still the same transport (not a newer one for the same target).
        if cache.get(key).is_some_and(|e| e.id == id) {
            cache.remove(key);
        }
    }
}

fn load_extra_roots(path: &Path) -> Result<Certificate, String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "POSTWIRE_EXTRA_CA_FILE: cannot read {}: {e}",
            path.display()
        )
    })?;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let count = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("POSTWIRE_EXTRA_CA_FILE: {}: {e}", path.display()))?
        .len();
    if count == 0 {
        return Err(format!(
            "POSTWIRE_EXTRA_CA_FILE: {} holds no PEM certificate",
            path.display()
        ));
    }
    Certificate::from_pem(&pem)
        .map_err(|e| format!("POSTWIRE_EXTRA_CA_FILE: {}: {e}", path.display()))
}

/// The EHLO name: a host name or an address literal (`[192.0.2.1]`), nothing else.
fn hello_name(name: Option<&str>) -> Result<ClientId, SendError> {
    let Some(name) = name else {
        return Ok(ClientId::default());
    };
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':'));
    if ok {
        Ok(ClientId::Domain(name.to_owned()))
    } else {
        Err(SendError::Config {
            description: format!(
                "hello_name `{}` is not a host name or address literal",
                name.escape_debug()
            ),
        })
    }
}

// ------------------------------------------------------------------------------------------
// MIME

/// A message to build with [`OutgoingMessage::into_message`].
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    /// The Message-ID header, `<unique@host>`, chosen by the caller and kept across retries.
    pub message_id: String,
    pub from: EmailAddress,
    pub from_name: Option<String>,
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    /// Envelope recipients only: no `Bcc` header is written.
    pub bcc: Vec<EmailAddress>,
    pub reply_to: Option<EmailAddress>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<Attachment>,
}

#[derive(Clone, Debug)]
pub struct Attachment {
    pub filename: String,
    /// A MIME type such as `application/pdf`.
    pub content_type: String,
    pub source: AttachmentSource,
}

#[derive(Clone)]
pub enum AttachmentSource {
    Bytes(Vec<u8>),
    /// Read when the message is built.
    File(PathBuf),
}

impl fmt::Debug for AttachmentSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachmentSource::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            AttachmentSource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// Why a message could not be built. `field` is the dotted path of the offending input
/// (`subject`, `attachments[0].filename`), as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{field}: cannot read {}: {source}", path.display())]
    Read {
        field: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl BuildError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The input field the error is about.
    pub fn field(&self) -> &str {
        match self {
            BuildError::Invalid { field, .. } | BuildError::Read { field, .. } => field,
        }
    }
}

impl OutgoingMessage {
    /// Checks everything that does not need the attachment files: header values (no CR/LF),
    /// the Message-ID, content types, file names, at least one recipient.
    pub fn validate(&self) -> Result<(), BuildError> {
        self.checked_headers().map(|_| ())
    }

    fn checked_headers(&self) -> Result<CheckedHeaders, BuildError> {
        check_message_id(&self.message_id)?;
        let from_name = match &self.from_name {
            Some(n) => {
                let n = header_text(n, MAX_NAME_CHARS)
                    .map_err(|m| BuildError::invalid("from_name", m))?;
                (!n.is_empty()).then_some(n)
            }
            None => None,
        };
        let subject = header_text(&self.subject, MAX_SUBJECT_CHARS)
            .map_err(|m| BuildError::invalid("subject", m))?;
        if self.to.is_empty() && self.cc.is_empty() && self.bcc.is_empty() {
            return Err(BuildError::invalid(
                "to",
                "at least one recipient (to, cc or bcc) is required",
            ));
        }
        let mut content_types = Vec::with_capacity(self.attachments.len());
        for (i, a) in self.attachments.iter().enumerate() {
            check_filename(&a.filename)
                .map_err(|m| BuildError::invalid(format!("attachments[{i}].filename"), m))?;
            content_types.push(
                parse_content_type(&a.content_type).map_err(|m| {
                    BuildError::invalid(format!("attachments[{i}].content_type"), m)
                })?,
            );
        }
        Ok(CheckedHeaders {
            from_name,
            subject,
            content_types,
        })
    }

    /// Builds the MIME message: text and HTML as `multipart/alternative`, attachments in
    /// `multipart/mixed`, the given Message-ID. File attachments are read here, one at a time,
    /// and each is encoded (base64) as soon as it is read, so no raw copy outlives its part.
    pub async fn into_message(self) -> Result<Message, BuildError> {
        let checked = self.checked_headers()?;
        let mut builder = Message::builder()
            .message_id(Some(self.message_id))
            .from(Mailbox::new(checked.from_name, self.from.address().clone()))
            .subject(checked.subject);
        for a in self.to {
            builder = builder.to(Mailbox::new(None, a.address().clone()));
        }
        for a in self.cc {
            builder = builder.cc(Mailbox::new(None, a.address().clone()));
        }
        for a in self.bcc {
            builder = builder.bcc(Mailbox::new(None, a.address().clone()));
        }
        if let Some(r) = self.reply_to {
            builder = builder.reply_to(Mailbox::new(None, r.address().clone()));
        }

        let body = match (self.text, self.html) {
            (Some(text), Some(html)) => Part::Multi(MultiPart::alternative_plain_html(text, html)),
            (None, Some(html)) => Part::Single(SinglePart::html(html)),
            (Some(text), None) => Part::Single(SinglePart::plain(text)),
            (None, None) => Part::Single(SinglePart::plain(String::new())),
        };

        let built = if self.attachments.is_empty() {
            match body {
                Part::Multi(m) => builder.multipart(m),
                Part::Single(s) => builder.singlepart(s),
            }
        } else {
            let mut mixed = match body {
                Part::Multi(m) => MultiPart::mixed().multipart(m),
                Part::Single(s) => MultiPart::mixed().singlepart(s),
            };
            for (i, (a, content_type)) in self
                .attachments
                .into_iter()
                .zip(checked.content_types)
                .enumerate()
            {
                let bytes = match a.source {
                    AttachmentSource::Bytes(b) => b,
                    AttachmentSource::File(path) => match tokio::fs::read(&path).await {
                        Ok(b) => b,
                        Err(source) => {
                            return Err(BuildError::Read {
                                field: format!("attachments[{i}]"),
                                path,
                                source,
                            });
                        }
                    },
                };
                // Base64 keeps any bytes intact; the raw buffer is consumed by the encoding.
                let body = Body::new_with_encoding(bytes, ContentTransferEncoding::Base64)
                    .map_err(|_| {
                        BuildError::invalid(format!("attachments[{i}]"), "cannot be encoded")
                    })?;
                mixed = mixed.singlepart(MimeAttachment::new(a.filename).body(body, content_type));
            }
            builder.multipart(mixed)
        };
        built.map_err(|e| BuildError::invalid("message", e.to_string()))
    }
}

struct CheckedHeaders {
    from_name: Option<String>,
    subject: String,
    content_types: Vec<ContentType>,
}

enum Part {
    Single(SinglePart),
    Multi(MultiPart),
}

/// `<id-left@id-right>`: printable ASCII without spaces or further angle brackets.
fn check_message_id(id: &str) -> Result<(), BuildError> {
    let inner = id
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .ok_or_else(|| BuildError::invalid("message_id", "must look like <unique@host>"))?;
    let ok = inner.len() <= 250
        && inner
            .split_once('@')
            .is_some_and(|(l, r)| !l.is_empty() && !r.is_empty() && !r.contains('@'))
        && inner
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>'));
    if ok {
        Ok(())
    } else {
        Err(BuildError::invalid(
            "message_id",
            "must look like <unique@host> (printable ASCII, no spaces or control characters)",
        ))
    }
}

fn check_filename(name: &str) -> Result<(), String> {
    if has_line_break_or_control(name) {
        return Err("must not contain control characters (CR/LF)".into());
    }
    if name.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!("must be at most {MAX_NAME_CHARS} characters"));
    }
    if name.contains(['/', '\\']) {
        return Err("must be a file name, not a path".into());
    }
    Ok(())
}

fn parse_content_type(s: &str) -> Result<ContentType, String> {
    if has_line_break_or_control(s) {
        return Err("must not contain control characters (CR/LF)".into());
    }
    let ct = ContentType::parse(s.trim())
        .map_err(|_| format!("`{s}` is not a MIME type such as application/pdf"))?;
    let essence = s.trim().to_ascii_lowercase();
    if essence.starts_with("multipart/") || essence.starts_with("message/") {
        return Err("must be a single-part type (not multipart/* or message/*)".into());
    }
    Ok(ct)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> EmailAddress {
        EmailAddress::parse(s).unwrap()
    }

    fn message() -> OutgoingMessage {
        OutgoingMessage {
            message_id: "<1234@postwire.test>".into(),
            from: addr("a@example.com"),
            from_name: None,
            to: vec![addr("b@example.com")],
            cc: vec![],
            bcc: vec![],
            reply_to: None,
            subject: "Hello".into(),
            text: Some("Hi".into()),
            html: None,
            attachments: vec![],
        }
    }

    #[test]
    fn secrets_are_not_in_debug() {
        let auth = SmtpAuth::Password {
            username: "u".into(),
            password: SecretString::from("hunter2".to_owned()),
        };
        let s = format!("{auth:?}");
        assert!(!s.contains("hunter2") && s.contains("REDACTED"), "{s}");
        let auth = SmtpAuth::Xoauth2 {
            username: "u".into(),
            access_token: SecretString::from("tok-123".to_owned()),
        };
        assert!(!format!("{auth:?}").contains("tok-123"));
    }

    #[test]
    fn fingerprints_follow_the_secret() {
        let p = |pw: &str| SmtpAuth::Password {
            username: "u".into(),
            password: SecretString::from(pw.to_owned()),
        };
        assert_eq!(p("a").fingerprint(), p("a").fingerprint());
        assert_ne!(p("a").fingerprint(), p("b").fingerprint());
        assert_eq!(SmtpAuth::None.fingerprint(), None);
    }

    #[test]
    fn message_ids() {
        assert!(check_message_id("<a@b>").is_ok());
        for bad in ["a@b", "<a b@c>", "<a@b>\r\nX: y", "<ab>", "<@b>", "<a@b@c>"] {
            assert!(check_message_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut m = message();
        m.subject = "Hi\r\nBcc: x@example.com".into();
        assert_eq!(m.validate().unwrap_err().field(), "subject");
        let mut m = message();
        m.from_name = Some("A\nB".into());
        assert_eq!(m.validate().unwrap_err().field(), "from_name");
        let mut m = message();
        m.to.clear();
        assert_eq!(m.validate().unwrap_err().field(), "to");
        let mut m = message();
        m.attachments.push(Attachment {
            filename: "x.pdf".into(),
            content_type: "application/pdf\r\nX-Evil: 1".into(),
            source: AttachmentSource::Bytes(vec![1]),
        });
        assert_eq!(
            m.validate().unwrap_err().field(),
            "attachments[0].content_type"
        );
        let mut m = message();
        m.attachments.push(Attachment {
            filename: "x.pdf".into(),
            content_type: "not a type".into(),
            source: AttachmentSource::Bytes(vec![1]),
        });
        assert_eq!(
            m.validate().unwrap_err().field(),
            "attachments[0].content_type"
        );
        assert!(message().validate().is_ok());
    }

    #[test]
    fn hello_names() {
        assert!(hello_name(None).is_ok());
        assert!(hello_name(Some("mailer.example.com")).is_ok());
        assert!(hello_name(Some("[192.0.2.1]")).is_ok());
        assert!(hello_name(Some("a b")).is_err());
        assert!(hello_name(Some("a\r\nMAIL FROM:<x>")).is_err());
    }
}
