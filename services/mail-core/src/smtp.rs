//! SMTP delivery, shared by both services: a [`Mailer`] that sends over pooled connections of
//! its own (lettre's `AsyncSmtpConnection` on a TCP stream it connects itself), the MIME
//! builder for [`OutgoingMessage`], and the classification of what went wrong ([`SendError`])
//! into retryable and final outcomes.
//!
//! - Egress: the host is resolved and checked against `POSTWIRE_EGRESS_ALLOW` before every
//!   send; the connection goes to the allowed IP address while TLS still verifies the host
//!   name.
//! - TLS: `starttls` requires the upgrade (never silently plaintext), `tls` is implicit TLS,
//!   `none` is plaintext. Certificates are checked by the platform verifier plus the roots of
//!   `POSTWIRE_EXTRA_CA_FILE` (lettre's `TlsParameters`).
//! - Sockets have `TCP_NODELAY`: lettre writes a message and its final `.` in two writes, and
//!   with Nagle's algorithm the `.` waited for the server's delayed ACK (~40 ms per message,
//!   which capped a connection near 20 messages/s). lettre's own pooled transport offers no
//!   way to set it, hence the pool here.
//! - Pool: per transport, connections are opened on demand, kept after a successful
//!   transaction (at most `pool_max_size` idle, each for at most `pool_idle_timeout`) and
//!   reused without a NOOP probe. A reused connection the server closed while idle fails at
//!   MAIL, before any of the message was sent, and the message then goes once over a new
//!   connection; a failure during or after the message data is never resent here (the server
//!   may have accepted it), the caller's outbox decides. A connection that failed otherwise
//!   is closed (QUIT), never reused.
//! - Credentials are fixed per transport, so transports are cached per target (without
//!   secrets) and replaced when the resolved address or a hash of the credential changes: a new
//!   access token or password gets a new transport, and the old pool is dropped.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures_util::io::{AsyncRead as _, AsyncWrite as _};
use lettre::Message;
use lettre::address::Envelope;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Attachment as MimeAttachment, Body, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
#[allow(deprecated)] // lettre's TLS stream setup, used for implicit TLS
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::io::ReadBuf;
use tokio::net::TcpSocket;

use crate::domain::{EmailAddress, Port, SmtpHost, has_line_break_or_control, header_text};
use crate::egress::{EgressPolicy, ResolveError};
use crate::settings::{Encryption, Server};

/// How long establishing the TCP connection may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one whole send (connect, TLS, AUTH, the transaction) may take.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(300);
/// Idle connections kept open per transport.
pub const DEFAULT_POOL_SIZE: u32 = 4;
/// How long a pooled connection may stay idle (the default of lettre's pool, used before).
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
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
    /// Idle connections kept per transport (more may be open while sends run concurrently;
    /// the surplus is closed when they finish).
    pub pool_max_size: u32,
    /// How long a connection may stay idle in its pool before it is closed.
    pub pool_idle_timeout: Duration,
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
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
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
    /// Whether the task that closes expired idle connections runs.
    reaper_started: AtomicBool,
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
    pool: Arc<Pool>,
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
                reaper_started: AtomicBool::new(false),
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
    pub async fn send_raw(
        &self,
        target: &SmtpTarget,
        envelope: &Envelope,
        raw: &[u8],
    ) -> Result<SmtpReply, SendError> {
        self.send_payload(target, envelope, Payload::Raw(raw)).await
    }

    /// Sends a message whose attachments are encoded while it is written (see
    /// [`OutgoingMessage::into_streamed`]); as [`Mailer::send_raw`] otherwise. The message
    /// stays with the caller (for another attempt).
    pub async fn send_streamed(
        &self,
        target: &SmtpTarget,
        message: &StreamedMessage,
    ) -> Result<SmtpReply, SendError> {
        self.send_payload(target, &message.envelope, Payload::Streamed(message))
            .await
    }

    #[tracing::instrument(
        name = "smtp.send",
        skip_all,
        fields(otel.kind = "client", host = %target.host.as_str(), port = target.port.get())
    )]
    async fn send_payload(
        &self,
        target: &SmtpTarget,
        envelope: &Envelope,
        payload: Payload<'_>,
    ) -> Result<SmtpReply, SendError> {
        let hello = hello_name(target.hello_name.as_deref())?;
        let mut candidates = self.resolve(target).await?;
        self.start_reaper();
        let key = TransportKey::of(target);
        let credential = target.auth.fingerprint();
        let timeout = self.inner.config.send_timeout;
        let auth = target.auth.kind();
        loop {
            let (id, addr, pool) = self.pool(target, &key, credential, &hello, &candidates)?;
            match tokio::time::timeout(timeout, pool.send(envelope, payload)).await {
                Ok(Ok(response)) => return Ok(SmtpReply::from_response(&response)),
                Ok(Err(Failure::Connect(e))) if candidates.len() > 1 => {
                    tracing::info!(%addr, error = %e, "cannot connect; trying the next address");
                    self.evict(&key, id);
                    candidates.retain(|a| *a != addr);
                }
                Ok(Err(failure)) => {
                    let err = failure.into_send_error(auth);
                    tracing::warn!(%addr, error = %err, "SMTP delivery failed");
                    return Err(err);
                }
                Err(_) => {
                    // The connection in use was owned by the abandoned future and is closed
                    // with it (never parked again); the pool's idle connections stay.
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

    /// Number of idle pooled connections over all cached transports (for tests and metrics).
    pub fn idle_connections(&self) -> usize {
        let pools: Vec<Arc<Pool>> = self.lock_cache().values().map(|e| e.pool.clone()).collect();
        pools.iter().map(|p| p.lock_idle().len()).sum()
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
    fn pool(
        &self,
        target: &SmtpTarget,
        key: &TransportKey,
        credential: Option<[u8; 32]>,
        hello: &ClientId,
        candidates: &[SocketAddr],
    ) -> Result<(u64, SocketAddr, Arc<Pool>), SendError> {
        let cached = |cache: &mut HashMap<TransportKey, CachedTransport>| {
            cache
                .get_mut(key)
                .filter(|e| e.credential == credential && candidates.contains(&e.addr))
                .map(|e| {
                    e.last_used = Instant::now();
                    (e.id, e.addr, e.pool.clone())
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
        let pool = Arc::new(self.build_pool(target, addr, hello.clone())?);
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
                    pool: pool.clone(),
                    last_used: Instant::now(),
                },
            );
            tracing::debug!(%addr, "new SMTP transport");
            (id, addr, pool)
        };
        // The replaced pools close their idle connections (QUIT) once no send uses them.
        drop(dropped);
        Ok(result)
    }

    fn build_pool(
        &self,
        target: &SmtpTarget,
        addr: SocketAddr,
        hello: ClientId,
    ) -> Result<Pool, SendError> {
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
            Encryption::None => PoolTls::None,
            Encryption::Starttls => PoolTls::StartTls(tls_parameters()?),
            Encryption::Tls => PoolTls::Implicit(tls_parameters()?),
        };
        let auth = match &target.auth {
            SmtpAuth::None => None,
            SmtpAuth::Password { username, password } => Some((
                vec![Mechanism::Plain, Mechanism::Login],
                Credentials::new(username.clone(), password.expose_secret().to_owned()),
            )),
            SmtpAuth::Xoauth2 {
                username,
                access_token,
            } => Some((
                vec![Mechanism::Xoauth2],
                Credentials::new(username.clone(), access_token.expose_secret().to_owned()),
            )),
        };
        let config = &self.inner.config;
        Ok(Pool {
            addr,
            tls,
            hello,
            auth,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            max_idle: usize::try_from(config.pool_max_size.max(1)).unwrap_or(usize::MAX),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Starts (once) the task that closes pooled connections idle for longer than
    /// `pool_idle_timeout`; it ends when the mailer is dropped.
    fn start_reaper(&self) {
        if self.inner.reaper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let mailer = Arc::downgrade(&self.inner);
        let every = (self.inner.config.pool_idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let pools: Vec<Arc<Pool>> = {
                    let Some(inner) = mailer.upgrade() else {
                        return;
                    };
                    Mailer { inner }
                        .lock_cache()
                        .values()
                        .map(|e| e.pool.clone())
                        .collect()
                };
                for pool in pools {
                    pool.close_expired();
                }
            }
        });
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

// ------------------------------------------------------------------------------------------
// Connection pool

/// How long closing a connection (QUIT and its reply) may take before the socket is dropped.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The connections of one transport: one address, TLS mode, EHLO name and credential.
/// Connections are opened on demand (any number while sends run concurrently); at most
/// `max_idle` are kept between sends, each for at most `idle_timeout`.
struct Pool {
    addr: SocketAddr,
    tls: PoolTls,
    hello: ClientId,
    auth: Option<(Vec<Mechanism>, Credentials)>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// Most recently parked last (reused first).
    idle: Mutex<Vec<IdleConnection>>,
}

enum PoolTls {
    None,
    StartTls(TlsParameters),
    Implicit(TlsParameters),
}

struct IdleConnection {
    conn: Connection,
    since: Instant,
}

/// An open SMTP session and what its server announced that lettre does not keep.
struct Connection {
    /// Boxed: lettre's connection (its buffered, possibly TLS, stream) is a few KB, and a
    /// send holds it in its future, so it was copied with that future for every message.
    smtp: Box<AsyncSmtpConnection>,
    /// The server announced PIPELINING (RFC 2920): MAIL, RCPT and DATA go in one write.
    pipelining: bool,
}

/// Whether an EHLO reply announces PIPELINING (an extension keyword on one of its lines).
fn announces_pipelining(ehlo: &Response) -> bool {
    ehlo.message().any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case("PIPELINING"))
    })
}

/// Why [`Pool::send`] failed.
enum Failure {
    /// The TCP connection could not be established: nothing was sent, so another address of
    /// the host may be tried.
    Connect(std::io::Error),
    /// What lettre reported (TLS, EHLO, AUTH, the transaction), sorted by [`classify`].
    Smtp(lettre::transport::smtp::Error),
    /// Refused here, before anything was sent.
    Refused(SendError),
}

impl Failure {
    fn into_send_error(self, auth: AuthKind) -> SendError {
        match self {
            Failure::Connect(e) => SendError::Transient {
                code: None,
                message: format!("Connection error: {e}"),
            },
            Failure::Smtp(e) => classify(&e, auth),
            Failure::Refused(e) => e,
        }
    }
}

impl From<lettre::transport::smtp::Error> for Failure {
    fn from(e: lettre::transport::smtp::Error) -> Self {
        Failure::Smtp(e)
    }
}

/// How a transaction failed.
enum TransactionError {
    /// At MAIL, RCPT or DATA, before any of the message was sent: the server cannot have
    /// accepted it.
    BeforeData(lettre::transport::smtp::Error),
    /// While sending the message or waiting for the reply to it: the server may have it.
    Data(lettre::transport::smtp::Error),
    /// The server lacks an extension the message needs; nothing was sent.
    Unsupported(&'static str),
}

impl Pool {
    /// Sends one message over an idle connection, or a new one when none is idle.
    ///
    /// A reused connection is not probed first (no NOOP round trip per message): if the
    /// server closed it while it was idle, MAIL fails at once (end of stream, reset, or the
    /// server's 421 goodbye read as the reply), before any of the message was sent, and the
    /// message goes once over a new connection. A failure during or after the message data
    /// is never resent here (the server may have accepted it): the caller decides.
    async fn send(&self, envelope: &Envelope, payload: Payload<'_>) -> Result<Response, Failure> {
        let mut idle = self.take_idle();
        loop {
            let reused = idle.is_some();
            let mut conn = match idle.take() {
                Some(conn) => conn,
                // Boxed: opening a connection (TLS handshake, EHLO, AUTH) is rare but its
                // state is large; inline, it made every send's future (and each move of it,
                // once per message) several KB bigger.
                None => Box::pin(self.connect()).await?,
            };
            match transaction(&mut conn, envelope, payload).await {
                Ok(response) => {
                    self.park(conn);
                    return Ok(response);
                }
                Err(TransactionError::BeforeData(e)) if reused && connection_is_gone(&e) => {
                    tracing::debug!(addr = %self.addr, error = %e,
                        "the pooled connection was closed by the server; sending over a new one");
                    drop(conn);
                }
                Err(TransactionError::Unsupported(what)) => {
                    self.park(conn);
                    return Err(Failure::Refused(SendError::Config {
                        description: format!("internal client error: {what}"),
                    }));
                }
                Err(TransactionError::BeforeData(e) | TransactionError::Data(e)) => {
                    // As lettre does after a failed command: QUIT, never reuse.
                    close_later(conn);
                    return Err(Failure::Smtp(e));
                }
            }
        }
    }

    /// A new connection: TCP to the egress-checked address (with `TCP_NODELAY`), TLS as
    /// configured (the certificate verified for the host name), EHLO, AUTH.
    async fn connect(&self) -> Result<Connection, Failure> {
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(Failure::Connect)?;
        let tcp = match tokio::time::timeout(self.connect_timeout, socket.connect(self.addr)).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(Failure::Connect(e)),
            Err(_) => {
                return Err(Failure::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection timed out",
                )));
            }
        };
        // lettre writes the message and its final "\r\n.\r\n" in two writes: with Nagle's
        // algorithm the second waits for the server's ACK of the first, which the server
        // delays (about 40 ms per message on Linux).
        tcp.set_nodelay(true).map_err(Failure::Connect)?;
        let stream: Box<dyn AsyncTokioStream> = match &self.tls {
            PoolTls::Implicit(params) => {
                #[allow(deprecated)]
                let mut tls = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
                tls.upgrade_tls(params.clone()).await?;
                Box::new(ImplicitTls(tls))
            }
            PoolTls::None | PoolTls::StartTls(_) => Box::new(tcp),
        };
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello).await?;
        if let PoolTls::StartTls(params) = &self.tls {
            // Required: a server without STARTTLS is an error, never plain text.
            conn.starttls(params.clone(), &self.hello).await?;
        }
        // lettre keeps only the extensions it uses from its EHLO: ask once more (one round
        // trip per connection, not per message) for PIPELINING. After STARTTLS, as the
        // extensions may differ; before AUTH.
        let ehlo = conn.command(Ehlo::new(self.hello.clone())).await?;
        let pipelining = announces_pipelining(&ehlo);
        if let Some((mechanisms, credentials)) = &self.auth {
            conn.auth(mechanisms, credentials).await?;
        }
        tracing::debug!(addr = %self.addr, pipelining, "new SMTP connection");
        Ok(Connection {
            smtp: Box::new(conn),
            pipelining,
        })
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<IdleConnection>> {
        // A panic cannot leave the list inconsistent: keep using it.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently parked connection that has not expired (expired ones are closed).
    fn take_idle(&self) -> Option<Connection> {
        let (conn, expired) = {
            let mut idle = self.lock_idle();
            let expired = self.split_expired(&mut idle);
            (idle.pop().map(|i| i.conn), expired)
        };
        expired.into_iter().for_each(close_later);
        conn
    }

    fn close_expired(&self) {
        let expired = self.split_expired(&mut self.lock_idle());
        if !expired.is_empty() {
            tracing::debug!(addr = %self.addr, count = expired.len(), "closing idle SMTP connections");
        }
        expired.into_iter().for_each(close_later);
    }

    fn split_expired(&self, idle: &mut Vec<IdleConnection>) -> Vec<Connection> {
        let mut expired = Vec::new();
        for i in std::mem::take(idle) {
            if i.since.elapsed() >= self.idle_timeout {
                expired.push(i.conn);
            } else {
                idle.push(i);
            }
        }
        expired
    }

    /// Keeps a connection after a successful transaction, unless enough are idle already.
    fn park(&self, conn: Connection) {
        if conn.smtp.has_broken() {
            return;
        }
        let mut idle = self.lock_idle();
        if idle.len() < self.max_idle {
            idle.push(IdleConnection {
                conn,
                since: Instant::now(),
            });
        } else {
            drop(idle);
            close_later(conn);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let idle = std::mem::take(
            self.idle
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        idle.into_iter().map(|i| i.conn).for_each(close_later);
    }
}

/// Says QUIT and closes the connection, in a task of its own (nobody waits for it). Outside
/// a runtime the socket is just closed.
fn close_later(mut conn: Connection) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = tokio::time::timeout(QUIT_TIMEOUT, conn.smtp.abort()).await;
        });
    }
}

/// How a connection the server closed while it was idle fails at its next command: end of
/// stream, a reset or broken pipe (no reply code), or the 421 the server sent before closing.
fn connection_is_gone(e: &lettre::transport::smtp::Error) -> bool {
    e.status().is_none_or(|code| u16::from(code) == 421)
}

/// One SMTP transaction, as lettre's `AsyncSmtpConnection::send` runs it (SMTPUTF8 and
/// 8BITMIME when needed), but telling a failure before the message data apart from one
/// during or after it. With PIPELINING, MAIL, every RCPT and DATA go in one write and their
/// replies are read in order (RFC 2920): one round trip instead of two plus one per
/// recipient; every reply is still checked, and any refusal ends the transaction before the
/// message data.
async fn transaction(
    conn: &mut Connection,
    envelope: &Envelope,
    payload: Payload<'_>,
) -> Result<Response, TransactionError> {
    let smtp = &mut conn.smtp;
    let mut parameters = Vec::new();
    let non_ascii_address = envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
    if non_ascii_address {
        if !smtp.server_info().supports_feature(Extension::SmtpUtfEight) {
            return Err(TransactionError::Unsupported(
                "Envelope contains non-ascii chars but server does not support SMTPUTF8",
            ));
        }
        parameters.push(MailParameter::SmtpUtfEight);
    }
    if !payload.is_ascii() {
        if !smtp.server_info().supports_feature(Extension::EightBitMime) {
            return Err(TransactionError::Unsupported(
                "Message contains non-ascii chars but server does not support 8BITMIME",
            ));
        }
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let before = TransactionError::BeforeData;
    let mail = Mail::new(envelope.from().cloned(), parameters);
    if conn.pipelining {
        use std::fmt::Write as _;
        let mut batch = mail.to_string();
        for to in envelope.to() {
            let _ = write!(batch, "{}", Rcpt::new(to.clone(), vec![]));
        }
        let _ = write!(batch, "{Data}");
        // `command` writes the whole batch and reads the first reply (MAIL's).
        let mut first_error = match smtp.command(batch).await {
            Ok(_) => None,
            // The connection is gone: no further reply will come.
            Err(e) if e.status().is_none() => return Err(before(e)),
            Err(e) => Some(e),
        };
        // The RCPT replies, then DATA's: all of them, so a refusal is reported as the first
        // one the server gave.
        for _ in 0..=envelope.to().len() {
            match smtp.read_response().await {
                Ok(_) => {}
                Err(e) => {
                    let gone = e.status().is_none();
                    first_error.get_or_insert(e);
                    if gone {
                        break;
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(before(e));
        }
    } else {
        smtp.command(mail).await.map_err(before)?;
        for to in envelope.to() {
            smtp.command(Rcpt::new(to.clone(), vec![]))
                .await
                .map_err(before)?;
        }
        smtp.command(Data).await.map_err(before)?;
    }
    // A small message held as text goes in one write with its end (".") and its reply is
    // read: as lettre's `message` would send it, in one system call and TCP segment instead
    // of two, escaped in one pass.
    if let Some(text) = payload.single_text(ONE_WRITE_MAX) {
        return smtp
            .command(data_in_one_write(text).as_str())
            .await
            .map_err(TransactionError::Data);
    }
    // In pieces: lettre escapes the message into a buffer per piece, so a 25 MB scan is
    // not held a second time (escaped) while it is written.
    smtp.message_iter(payload.chunks())
        .await
        .map_err(TransactionError::Data)
}

/// Messages up to this size (formatted, in memory, UTF-8) are written at once.
const ONE_WRITE_MAX: usize = 256 * 1024;

/// A message's data as written after DATA: dot-stuffed (a line starting with "." gets one
/// more, RFC 5321 4.5.2) and ended by CRLF "." CRLF, as lettre's `message_iter` writes it.
fn data_in_one_write(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 64 + 8);
    let mut from = 0;
    if text.starts_with('.') {
        out.push('.');
    }
    for at in memchr::memmem::find_iter(text.as_bytes(), b"\r\n.") {
        // up to and including the line break, then the extra "."
        out.push_str(&text[from..at + 2]);
        out.push('.');
        from = at + 2;
    }
    out.push_str(&text[from..]);
    out.push_str("\r\n.\r\n");
    out
}

/// Longest line (without its CRLF) sent as is in a 7bit text part: RFC 5322's limit for
/// lines a sender SHOULD keep to.
const SEVEN_BIT_LINE_MAX: usize = 78;

/// A text part. ASCII text whose lines fit [`SEVEN_BIT_LINE_MAX`] (no NUL, a CR only before
/// an LF) goes as `7bit` with CRLF line ends, converted in one pass. lettre encodes any line
/// of 76 characters or more as quoted-printable and inserts each CR by moving the rest of
/// the text; other text still takes lettre's choice of encoding.
fn text_part(content_type: ContentType, text: String) -> SinglePart {
    let builder = SinglePart::builder().header(content_type);
    match seven_bit(&text) {
        Some(crlf) => builder.body(Body::dangerous_pre_encoded(
            crlf,
            ContentTransferEncoding::SevenBit,
        )),
        None => builder.body(text),
    }
}

/// `text` with CRLF line ends, when it can go as `7bit` (see [`text_part`]).
fn seven_bit(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.is_ascii() || memchr::memchr(0, bytes).is_some() {
        return None;
    }
    // Most text has no CR at all: then no line is searched for one.
    let has_cr = memchr::memchr(b'\r', bytes).is_some();
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32 + 2);
    let mut from = 0;
    for at in memchr::memchr_iter(b'\n', bytes) {
        let line = &bytes[from..at];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > SEVEN_BIT_LINE_MAX || (has_cr && memchr::memchr(b'\r', line).is_some()) {
            return None;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
        from = at + 1;
    }
    let last = &bytes[from..];
    if last.len() > SEVEN_BIT_LINE_MAX || memchr::memchr(b'\r', last).is_some() {
        return None;
    }
    out.extend_from_slice(last);
    Some(out)
}

/// The size of the pieces a message is written in.
const MESSAGE_PIECE: usize = 64 * 1024;

/// Attachment bytes encoded per piece: 1,024 base64 lines of 76 characters.
const BASE64_PIECE: usize = 57 * 1024;

/// A formatted message whose attachments are base64-encoded while it is written (see
/// [`OutgoingMessage::into_streamed`]).
pub struct StreamedMessage {
    envelope: Envelope,
    pieces: Vec<Piece>,
}

enum Piece {
    /// Sent as is: headers, text parts, MIME boundaries.
    Formatted(Vec<u8>),
    /// An attachment's bytes, sent base64-encoded in CRLF-separated lines of 76 characters.
    Base64(Vec<u8>),
}

impl fmt::Debug for StreamedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamedMessage")
            .field("pieces", &self.pieces.len())
            .finish_non_exhaustive()
    }
}

impl StreamedMessage {
    /// The message as written to the server, in pieces.
    fn chunks(&self) -> impl Iterator<Item = std::borrow::Cow<'_, [u8]>> + Send + '_ {
        use std::borrow::Cow;
        self.pieces
            .iter()
            .flat_map(|p| -> Box<dyn Iterator<Item = Cow<'_, [u8]>> + Send + '_> {
                match p {
                    Piece::Formatted(v) => Box::new(v.chunks(MESSAGE_PIECE).map(Cow::Borrowed)),
                    Piece::Base64(b) => Box::new(
                        b.chunks(BASE64_PIECE)
                            .enumerate()
                            .map(|(i, block)| Cow::Owned(base64_lines(block, i > 0))),
                    ),
                }
            })
    }

    /// The whole message, as written to the server.
    pub fn to_vec(&self) -> Vec<u8> {
        self.chunks().flat_map(|c| c.into_owned()).collect()
    }

    fn is_ascii(&self) -> bool {
        self.pieces.iter().all(|p| match p {
            Piece::Formatted(v) => v.is_ascii(),
            Piece::Base64(_) => true,
        })
    }
}

/// `block` base64-encoded in CRLF-separated lines of 76 characters (57 bytes each), after a
/// CRLF when it continues an earlier block.
fn base64_lines(block: &[u8], continued: bool) -> Vec<u8> {
    use base64::Engine as _;
    let engine = &base64::engine::general_purpose::STANDARD;
    let mut out = Vec::with_capacity(block.len() / 57 * 78 + 80);
    for (j, line) in block.chunks(57).enumerate() {
        if continued || j > 0 {
            out.extend_from_slice(b"\r\n");
        }
        let at = out.len();
        out.resize(at + line.len().div_ceil(3) * 4, 0);
        // The buffer is exactly the encoded length: cannot fail.
        let _ = engine.encode_slice(line, &mut out[at..]);
    }
    out
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What a transaction sends as the message data.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Raw(&'a [u8]),
    Streamed(&'a StreamedMessage),
}

impl<'a> Payload<'a> {
    fn is_ascii(self) -> bool {
        match self {
            Payload::Raw(raw) => raw.is_ascii(),
            Payload::Streamed(m) => m.is_ascii(),
        }
    }

    /// The whole message as one text, when it is held as one (no attachment encoded while
    /// written), has at most `max` bytes (checked before the UTF-8 scan) and is UTF-8.
    fn single_text(self, max: usize) -> Option<&'a str> {
        let bytes = match self {
            Payload::Raw(raw) => raw,
            Payload::Streamed(StreamedMessage { pieces, .. }) => match pieces.as_slice() {
                [Piece::Formatted(f)] => f.as_slice(),
                _ => return None,
            },
        };
        if bytes.len() > max {
            return None;
        }
        std::str::from_utf8(bytes).ok()
    }

    fn chunks(self) -> Box<dyn Iterator<Item = std::borrow::Cow<'a, [u8]>> + Send + 'a> {
        match self {
            Payload::Raw(raw) => {
                Box::new(raw.chunks(MESSAGE_PIECE).map(std::borrow::Cow::Borrowed))
            }
            Payload::Streamed(m) => Box::new(m.chunks()),
        }
    }
}

/// lettre's TLS stream for implicit TLS, handed to lettre as the connection's stream: lettre
/// wraps an existing stream only as plain TCP (`connect_with_transport`), while its TLS setup
/// (the same [`TlsParameters`] as for STARTTLS) runs on `AsyncNetworkStream`.
#[allow(deprecated)]
#[derive(Debug)]
struct ImplicitTls(AsyncNetworkStream);

impl tokio::io::AsyncRead for ImplicitTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = ready!(Pin::new(&mut self.0).poll_read(cx, buf.initialize_unfilled()))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for ImplicitTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.peer_addr()
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
        self.build(false).await.map(|(message, _)| message)
    }

    /// The message to send with [`Mailer::send_streamed`]: each attachment is held once, as
    /// its bytes, and base64-encoded piece by piece while it is written to the server, never
    /// as a whole nor copied into one formatted buffer (a 25 MB scan costs about 25 MB, not
    /// the 2.6 copies of building, encoding and formatting it with lettre).
    ///
    /// lettre builds and formats the message with a short random placeholder as each
    /// attachment's body; the formatted message is split at the placeholders.
    pub async fn into_streamed(self) -> Result<StreamedMessage, BuildError> {
        let (message, attachments) = self.build(true).await?;
        let envelope = message.envelope().clone();
        let mut formatted = message.formatted();
        drop(message);
        // Where each placeholder is, in order.
        let mut spans = Vec::with_capacity(attachments.len());
        let mut from = 0;
        for (placeholder, _) in &attachments {
            let at = from
                + find(&formatted[from..], placeholder.as_bytes()).ok_or_else(|| {
                    BuildError::invalid("message", "an attachment placeholder went missing")
                })?;
            from = at + placeholder.len();
            spans.push((at, from));
        }
        // Cut from the end: the head stays in `formatted` (a message without attachments is
        // not copied at all), only what follows a placeholder is.
        let mut pieces = Vec::with_capacity(2 * attachments.len() + 1);
        for ((at, end), (_, bytes)) in spans.into_iter().zip(attachments).rev() {
            pieces.push(Piece::Formatted(formatted.split_off(end)));
            formatted.truncate(at);
            pieces.push(Piece::Base64(bytes));
        }
        pieces.push(Piece::Formatted(formatted));
        pieces.reverse();
        Ok(StreamedMessage { envelope, pieces })
    }

    /// The lettre message; with `placeholders`, each attachment's body is a placeholder and
    /// its (base64 placeholder, bytes) are returned in order.
    async fn build(
        self,
        placeholders: bool,
    ) -> Result<(Message, Vec<(String, Vec<u8>)>), BuildError> {
        let mut streamed = Vec::new();
        let checked = self.checked_headers()?;
        // The envelope as lettre would derive it (From; To, Cc, then Bcc), given here: lettre
        // otherwise parses every address header back from its encoded text, which was a
        // quarter of the cost of building a small message. Bcc goes into the envelope only,
        // so it never becomes a header at all.
        let recipients = self
            .to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(|a| a.address().clone())
            .collect();
        let envelope = Envelope::new(Some(self.from.address().clone()), recipients)
            .map_err(|e| BuildError::invalid("to", e.to_string()))?;
        let mut builder = Message::builder()
            .envelope(envelope)
            .message_id(Some(self.message_id))
            .from(Mailbox::new(checked.from_name, self.from.address().clone()))
            .subject(checked.subject);
        for a in self.to {
            builder = builder.to(Mailbox::new(None, a.address().clone()));
        }
        for a in self.cc {
            builder = builder.cc(Mailbox::new(None, a.address().clone()));
        }
        if let Some(r) = self.reply_to {
            builder = builder.reply_to(Mailbox::new(None, r.address().clone()));
        }

        let plain = |text| text_part(ContentType::TEXT_PLAIN, text);
        let html = |text| text_part(ContentType::TEXT_HTML, text);
        let body = match (self.text, self.html) {
            (Some(text), Some(h)) => Part::Multi(
                MultiPart::alternative()
                    .singlepart(plain(text))
                    .singlepart(html(h)),
            ),
            (None, Some(h)) => Part::Single(html(h)),
            (Some(text), None) => Part::Single(plain(text)),
            (None, None) => Part::Single(plain(String::new())),
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
                let bytes = if placeholders {
                    // 48 random bytes: 64 base64 characters, one line, no padding.
                    let marker = crate::crypto::random_bytes::<48>().to_vec();
                    streamed.push((
                        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &marker),
                        bytes,
                    ));
                    marker
                } else {
                    bytes
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
        built
            .map(|m| (m, streamed))
            .map_err(|e| BuildError::invalid("message", e.to_string()))
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

    /// A scripted SMTP server on loopback for one session: `ehlo_extra` is appended to its
    /// EHLO reply; it answers MAIL, RCPT and DATA only once it has read all three (so a
    /// client that waits for MAIL's reply before sending RCPT never gets one), with
    /// `replies`; then reads the message and answers 250. Returns the port and what it read:
    /// the commands, and the message data (as sent, with its final dot).
    async fn scripted_server(
        ehlo_extra: &'static str,
        replies: &'static str,
    ) -> (u16, tokio::task::JoinHandle<(String, String)>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut seen = String::new();
            let mut buf = vec![0u8; 65536];
            let mut read_until =
                async |sock: &mut tokio::net::TcpStream, seen: &mut String, end: &str| {
                    while !seen.ends_with(end) {
                        let n = sock.read(&mut buf).await.unwrap();
                        assert!(n > 0, "client closed; read so far: {seen:?}");
                        seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
                    }
                };
            sock.write_all(b"220 scripted ready\r\n").await.unwrap();
            for _ in 0..2 {
                // lettre's EHLO, then the pool's own (for the extensions lettre drops)
                read_until(&mut sock, &mut seen, "\r\n").await;
                assert!(seen.starts_with("EHLO "), "{seen:?}");
                seen.clear();
                let reply = format!("250-scripted\r\n{ehlo_extra}250 8BITMIME\r\n");
                sock.write_all(reply.as_bytes()).await.unwrap();
            }
            read_until(&mut sock, &mut seen, "DATA\r\n").await;
            let commands = std::mem::take(&mut seen);
            sock.write_all(replies.as_bytes()).await.unwrap();
            if replies.ends_with("354 go ahead\r\n") {
                read_until(&mut sock, &mut seen, "\r\n.\r\n").await;
                sock.write_all(b"250 queued\r\n").await.unwrap();
            }
            // QUIT or the close
            let _ = sock.read(&mut buf).await;
            (commands, seen)
        });
        (port, task)
    }

    fn scripted_target(port: u16) -> SmtpTarget {
        SmtpTarget {
            host: SmtpHost::parse("127.0.0.1").unwrap(),
            port: Port::parse(port.into()).unwrap(),
            encryption: Encryption::None,
            auth: SmtpAuth::None,
            hello_name: Some("client.postwire.test".into()),
        }
    }

    /// `send` within 10 s: against [`scripted_server`], a client that waits for each reply
    /// before the next command never gets one.
    async fn within_10s<T>(send: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), send)
            .await
            .expect("a client that waits for each reply gets none from this server")
    }

    fn loopback_mailer() -> Mailer {
        let policy = Arc::new(EgressPolicy::parse("loopback").unwrap());
        Mailer::new(MailerConfig::new(policy)).unwrap()
    }

    async fn two_recipients() -> Message {
        let mut m = message();
        m.to.push(addr("second@example.com"));
        m.into_message().await.unwrap()
    }

    #[tokio::test]
    async fn pipelining_when_announced() {
        let (port, server) = scripted_server(
            "250-PIPELINING\r\n",
            "250 sender ok\r\n250 rcpt ok\r\n250 rcpt ok\r\n354 go ahead\r\n",
        )
        .await;
        let reply =
            within_10s(loopback_mailer().send(&scripted_target(port), two_recipients().await))
                .await
                .unwrap();
        assert_eq!(reply.code, 250);
        let (commands, _) = server.await.unwrap();
        let lines: Vec<&str> = commands.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 4, "{commands:?}");
        assert!(lines[0].starts_with("MAIL FROM:<"), "{commands:?}");
        assert!(lines[1].starts_with("RCPT TO:<"), "{commands:?}");
        assert!(
            lines[2].starts_with("RCPT TO:<second@example.com>"),
            "{commands:?}"
        );
        assert_eq!(lines[3], "DATA");
    }

    /// `raw` with its MIME boundaries numbered in order of appearance and its Date header
    /// blanked: what differs between two builds of the same message.
    fn normalized(raw: &[u8]) -> String {
        let mut text = String::from_utf8(raw.to_vec()).unwrap();
        let mut n = 0;
        while let Some(at) = text.find("boundary=\"") {
            let start = at + "boundary=\"".len();
            let end = start + text[start..].find('"').unwrap();
            let boundary = text[start..end].to_owned();
            text = text.replace(&boundary, &format!("B{n}-"));
            text = text.replacen("boundary=\"", "boundary=#", 1);
            n += 1;
        }
        text.lines()
            .map(|l| {
                if l.starts_with("Date: ") {
                    "Date: -"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The streamed message is what lettre formats, byte for byte (but for the random MIME
    /// boundaries and the Date), for attachments of every length around the line and piece
    /// sizes, from memory and from files.
    #[tokio::test]
    async fn streamed_equals_formatted() {
        let dir = std::env::temp_dir().join(format!("mc-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sizes = [
            0,
            1,
            56,
            57,
            58,
            BASE64_PIECE - 1,
            BASE64_PIECE,
            BASE64_PIECE + 1,
            300_001,
        ];
        let mut m = message();
        m.html = Some("<p>Hi</p>".into());
        m.attachments.clear();
        for (i, len) in sizes.iter().enumerate() {
            let bytes: Vec<u8> = (0..*len).map(|k| (k * 7 + i) as u8).collect();
            let source = if i % 2 == 0 {
                AttachmentSource::Bytes(bytes)
            } else {
                let path = dir.join(i.to_string());
                std::fs::write(&path, &bytes).unwrap();
                AttachmentSource::File(path)
            };
            m.attachments.push(Attachment {
                filename: format!("part{i}.bin"),
                content_type: "application/octet-stream".into(),
                source,
            });
        }
        let streamed = m.clone().into_streamed().await.unwrap();
        let formatted = m.into_message().await.unwrap().formatted();
        let (a, b) = (normalized(&streamed.to_vec()), normalized(&formatted));
        assert!(a.len() > 400_000);
        assert!(a == b, "streamed and formatted differ");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A message is written in pieces: the escaping of lines that start with a dot carries
    /// over from one piece to the next (a piece may start in the middle of a line).
    #[tokio::test]
    async fn dot_stuffing_across_pieces() {
        let (port, server) =
            scripted_server("250-PIPELINING\r\n", "250 ok\r\n250 ok\r\n354 go ahead\r\n").await;
        let mut raw = b"Subject: dots\r\n\r\n".to_vec();
        // too big for one write
        let pieces_before = ONE_WRITE_MAX / MESSAGE_PIECE;
        raw.resize(pieces_before * MESSAGE_PIECE, b'x');
        // the next piece starts in the middle of a line, with a dot
        raw.extend_from_slice(b".mid line\r\n.start\r\n..two\r\n.\r\nend\r\n");
        assert!(raw.len() > ONE_WRITE_MAX);
        let envelope = Envelope::new(
            Some("a@example.com".parse().unwrap()),
            vec!["b@example.com".parse().unwrap()],
        )
        .unwrap();
        let reply = within_10s(loopback_mailer().send_raw(&scripted_target(port), &envelope, &raw))
            .await
            .unwrap();
        assert_eq!(reply.code, 250);
        let (_, data) = server.await.unwrap();
        assert!(data.starts_with("Subject: dots\r\n\r\nxxx"));
        assert_eq!(
            &data[pieces_before * MESSAGE_PIECE..],
            ".mid line\r\n..start\r\n...two\r\n..\r\nend\r\n\r\n.\r\n"
        );
    }

    /// A small message goes in one write, escaped as lettre escapes the pieces: a dot at
    /// the start of the message or after CRLF is doubled (not after a bare LF).
    #[tokio::test]
    async fn dot_stuffing_in_one_write() {
        let (port, server) =
            scripted_server("250-PIPELINING\r\n", "250 ok\r\n250 ok\r\n354 go ahead\r\n").await;
        let raw = b".first\r\nSubject: dots\r\n\r\n.start\r\n..two\r\n.\r\nbare\n.lf\r\nend.";
        let envelope = Envelope::new(
            Some("a@example.com".parse().unwrap()),
            vec!["b@example.com".parse().unwrap()],
        )
        .unwrap();
        let reply = within_10s(loopback_mailer().send_raw(&scripted_target(port), &envelope, raw))
            .await
            .unwrap();
        assert_eq!(reply.code, 250);
        let (_, data) = server.await.unwrap();
        assert_eq!(
            data,
            "..first\r\nSubject: dots\r\n\r\n..start\r\n...two\r\n..\r\nbare\n.lf\r\nend.\r\n.\r\n"
        );
    }

    /// lettre's escaping (its `ClientCodec`, which the pieces go through), byte by byte.
    fn lettre_escaping(frame: &[u8]) -> Vec<u8> {
        #[derive(Clone, Copy)]
        enum S {
            Middle,
            Cr,
            Start,
        }
        let mut st = S::Start;
        let mut out = Vec::new();
        for &b in frame {
            out.push(b);
            st = match (b, st) {
                (b'\r', _) => S::Cr,
                (b'\n', S::Cr) => S::Start,
                (b'.', S::Start) => {
                    out.push(b'.');
                    S::Middle
                }
                (_, S::Cr | S::Start) => S::Middle,
                (_, s) => s,
            };
        }
        out.extend_from_slice(b"\r\n.\r\n");
        out
    }

    /// The one-write escaping equals lettre's for every text of up to 8 characters made of
    /// CR, LF, "." and a letter.
    #[test]
    fn one_write_escaping_equals_lettre() {
        let alphabet = ['\r', '\n', '.', 'a'];
        for len in 0..=8u32 {
            for n in 0..4usize.pow(len) {
                let text: String = (0..len)
                    .map(|i| alphabet[(n / 4usize.pow(i)) % 4])
                    .collect();
                assert_eq!(
                    data_in_one_write(&text).as_bytes(),
                    lettre_escaping(text.as_bytes()),
                    "{text:?}"
                );
            }
        }
    }

    /// Short-lined ASCII text goes as 7bit with CRLF line ends; anything else takes lettre's
    /// choice (quoted-printable or base64).
    #[test]
    fn text_parts_are_7bit_when_they_can_be() {
        let line78 = "y".repeat(78);
        assert_eq!(
            seven_bit(&format!("a\nb\r\n\n{line78}\n{line78}")).unwrap(),
            format!("a\r\nb\r\n\r\n{line78}\r\n{line78}").into_bytes()
        );
        assert_eq!(seven_bit("").unwrap(), b"");
        assert_eq!(seven_bit("a\n").unwrap(), b"a\r\n");
        for refused in [
            format!("{line78}y"),
            format!("a\n{line78}y\nb"),
            "caf\u{e9}".to_owned(),
            "bare\rcr".to_owned(),
            "nul\0".to_owned(),
            "cr at end\r".to_owned(),
        ] {
            assert!(seven_bit(&refused).is_none(), "{refused:?}");
        }
        let head = |part: SinglePart| {
            let f = String::from_utf8(part.formatted()).unwrap();
            f.split("\r\n\r\n").next().unwrap().to_owned()
        };
        let text = format!("{line78}\n.dot");
        let seven = text_part(ContentType::TEXT_PLAIN, text.clone());
        assert!(head(seven.clone()).contains("Content-Transfer-Encoding: 7bit"));
        assert!(
            String::from_utf8(seven.formatted())
                .unwrap()
                .ends_with(&format!("{line78}\r\n.dot\r\n"))
        );
        // lettre's own choice for what 7bit cannot carry
        let long = text_part(ContentType::TEXT_PLAIN, format!("{line78}y"));
        assert!(head(long).contains("Content-Transfer-Encoding: quoted-printable"));
        let html = text_part(ContentType::TEXT_HTML, "<p>caf\u{e9}</p>".into());
        assert!(head(html.clone()).contains("Content-Type: text/html"));
        assert!(!head(html).contains("7bit"));
    }

    /// Every reply of the pipelined batch is read: the first refusal is the error, and the
    /// message data is never sent.
    #[tokio::test]
    async fn pipelined_refusal_is_the_first_refusal() {
        let (port, server) = scripted_server(
            "250-PIPELINING\r\n",
            "250 sender ok\r\n550 5.1.1 no such user\r\n250 rcpt ok\r\n554 no valid recipients\r\n",
        )
        .await;
        let err =
            within_10s(loopback_mailer().send(&scripted_target(port), two_recipients().await))
                .await
                .unwrap_err();
        assert!(
            matches!(&err, SendError::Permanent { code: 550, message } if message.contains("no such user")),
            "{err:?}"
        );
        let (commands, data) = server.await.unwrap();
        assert!(commands.ends_with("DATA\r\n"), "{commands:?}");
        assert!(data.is_empty(), "no message data after a refusal: {data:?}");
    }

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

    #[tokio::test]
    async fn envelope_has_to_cc_and_bcc_but_no_bcc_header() {
        let mut m = message();
        m.to = vec![addr("b@example.com"), addr("c@example.com")];
        m.cc = vec![addr("d@example.com")];
        m.bcc = vec![addr("e@example.com")];
        let streamed = m.into_streamed().await.unwrap();
        let rcpt: Vec<String> = streamed
            .envelope
            .to()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            rcpt,
            [
                "b@example.com",
                "c@example.com",
                "d@example.com",
                "e@example.com"
            ]
        );
        assert_eq!(
            streamed.envelope.from().map(ToString::to_string).as_deref(),
            Some("a@example.com")
        );
        let text = String::from_utf8(streamed.to_vec()).unwrap();
        let head = &text[..text.find("\r\n\r\n").unwrap()];
        assert!(
            head.contains("To: b@example.com, c@example.com\r\n"),
            "{head}"
        );
        assert!(head.contains("Cc: d@example.com\r\n"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("bcc"), "{head}");
        assert!(!text.contains("e@example.com"), "{text}");
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
