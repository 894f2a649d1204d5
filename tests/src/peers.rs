//! Real third-party protocol peers for the end-to-end tests, started on loopback as child
//! processes (`node tests/peers/<script>`; see `tests/peers/*.mjs` for their protocols):
//!
//! - [`OAuthPeer`]: `oauth2-mock-server` behind a strict front (PKCE S256, single-use codes,
//!   refresh-token rotation, revocation), with a control API to inject failures.
//! - [`SmtpPeer`]: nodemailer's `smtp-server` with STARTTLS/implicit TLS from a throw-away CA,
//!   PLAIN/LOGIN/XOAUTH2 (tokens verified against the OAuth peer's JWKS), a message recorder
//!   and failure injection.
//!
//! The npm packages must be installed (`npm ci` in `tests/peers`; `scripts/test` does it).
//! A peer is killed when its handle is dropped, and exits by itself when the test process
//! goes away (its stdin closes).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How long a peer may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// `tests/peers`, where the scripts and their `node_modules` live.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// An HTTP client for talking to peers: no proxy, no redirects followed.
pub fn peer_http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// A PKCE pair (RFC 7636): a random `code_verifier` and its S256 `code_challenge`.
pub fn pkce_pair() -> (String, String) {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let verifier = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    let challenge = b64.encode(digest.as_ref());
    (verifier, challenge)
}

// -------------------------------------------------------------------------------------------
// The child process

/// A running `node` peer: killed on drop.
struct NodeProcess {
    name: &'static str,
    child: Child,
    // Held open: the peer exits when its stdin reaches EOF (`--exit-on-stdin-eof`).
    _stdin: Option<ChildStdin>,
    _stdout: BufReader<ChildStdout>,
}

impl NodeProcess {
    /// Spawns `node tests/peers/<script> <args> --exit-on-stdin-eof` and waits for the JSON
    /// ready line on its stdout.
    async fn spawn(
        name: &'static str,
        script: &str,
        args: &[String],
    ) -> anyhow::Result<(Self, Value)> {
        let dir = peers_dir();
        let script_path = dir.join(script);
        if !script_path.is_file() {
            bail!("{name} peer: {} is missing", script_path.display());
        }
        if !dir.join("node_modules").is_dir() {
            bail!(
                "{name} peer: {}/node_modules is missing: run `npm ci` in tests/peers \
                 (`cd tests/peers && npm ci`; scripts/test does it)",
                dir.display()
            );
        }
        let mut cmd = Command::new("node");
        cmd.arg(&script_path)
            .args(args)
            .arg("--exit-on-stdin-eof")
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "{name} peer: `node` is not installed (Node.js >= 20.19 with npm; on Debian \
                     `apt-get install -y nodejs npm`), then run `npm ci` in tests/peers"
                )
            } else {
                anyhow!("{name} peer: cannot start node: {e}")
            }
        })?;

        // Stderr: forwarded line by line to the test's stderr (captured by the test harness
        // and shown when a test fails), and the last lines kept for start-up errors.
        let tail = Arc::new(Mutex::new(VecDeque::<String>::new()));
        let stderr = child.stderr.take().context("child stderr")?;
        let stderr_done = {
            let tail = Arc::clone(&tail);
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with('[') {
                        eprintln!("{line}");
                    } else {
                        eprintln!("[{name} peer] {line}");
                    }
                    let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                    if t.len() == 20 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            })
        };

        let stdout = child.stdout.take().context("child stdout")?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let read = tokio::time::timeout(READY_TIMEOUT, stdout.read_line(&mut line)).await;
        let failure = match read {
            Ok(Ok(n)) if n > 0 => None,
            Ok(Ok(_)) => Some("exited before it was ready".to_owned()),
            Ok(Err(e)) => Some(format!("unreadable stdout: {e}")),
            Err(_) => Some(format!("not ready within {READY_TIMEOUT:?}")),
        };
        if let Some(what) = failure {
            let _ = child.start_kill();
            let status = match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                Ok(Ok(s)) => s.to_string(),
                Ok(Err(e)) => format!("unknown ({e})"),
                Err(_) => "still running (killed)".to_owned(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), stderr_done).await;
            let tail: Vec<String> = tail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect();
            let hint = if tail
                .iter()
                .any(|l| l.contains("Cannot find") || l.contains("ERR_MODULE_NOT_FOUND"))
            {
                "\n(an npm package is missing: run `npm ci` in tests/peers)"
            } else {
                ""
            };
            bail!(
                "{name} peer ({script}) {what}; {status}; its stderr:\n{}{hint}",
                tail.join("\n")
            );
        }
        let ready: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("{name} peer: ready line is not JSON: {line:?}"))?;
        let stdin = child.stdin.take();
        Ok((
            NodeProcess {
                name,
                child,
                _stdin: stdin,
                _stdout: stdout,
            },
            ready,
        ))
    }

    /// The OS process id (for diagnostics).
    fn id(&self) -> Option<u32> {
        self.child.id()
    }
}

impl std::fmt::Debug for NodeProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} peer (pid {:?})", self.name, self.id())
    }
}

async fn control_call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut rb = client.request(method.clone(), &url);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.with_context(|| format!("{method} {url}"))?;
    let status = r.status();
    let text = r
        .text()
        .await
        .with_context(|| format!("{method} {url}: body"))?;
    if !status.is_success() {
        bail!("{method} {url}: {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{method} {url}: not JSON: {text}"))
}

// -------------------------------------------------------------------------------------------
// OAuth 2.0 / OIDC

/// Start-up options of the [`OAuthPeer`]; `Default` is what `OAuthPeer::start` uses.
#[derive(Debug, Clone, Default)]
pub struct OAuthPeerOptions {
    /// `preferred_username` (and `email`) of the tokens; default `sender@tenant.example`.
    pub username: Option<String>,
    /// Access-token lifetime in seconds; default 3600.
    pub expires_in: Option<i64>,
    /// `aud` of the access tokens; default `https://smtp.postwire.test`.
    pub audience: Option<String>,
}

/// Token-endpoint calls seen by the [`OAuthPeer`], whatever their outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenCalls {
    pub authorization_code: u64,
    pub refresh_token: u64,
    /// All token calls, including other or missing grant types.
    pub total: u64,
    /// Calls answered with an injected failure (`fail_token_endpoint`).
    pub failures_injected: u64,
    /// Every grant type seen (`"(none)"` for a request without one).
    pub by_grant: BTreeMap<String, u64>,
}

/// The OAuth 2.0 / OpenID Connect peer (`tests/peers/oauth-server.mjs`).
#[derive(Debug)]
pub struct OAuthPeer {
    process: NodeProcess,
    issuer: String,
    port: u16,
    client: reqwest::Client,
}

impl OAuthPeer {
    /// Starts a peer with the default options; panics (with the reason) if it cannot.
    pub async fn start() -> OAuthPeer {
        Self::start_with(OAuthPeerOptions::default()).await
    }

    pub async fn start_with(opts: OAuthPeerOptions) -> OAuthPeer {
        match Self::try_start(opts).await {
            Ok(p) => p,
            Err(e) => panic!("cannot start the OAuth peer: {e:#}"),
        }
    }

    pub async fn try_start(opts: OAuthPeerOptions) -> anyhow::Result<OAuthPeer> {
        let mut args = Vec::new();
        if let Some(u) = opts.username {
            args.extend(["--username".to_owned(), u]);
        }
        if let Some(e) = opts.expires_in {
            args.extend(["--expires-in".to_owned(), e.to_string()]);
        }
        if let Some(a) = opts.audience {
            args.extend(["--audience".to_owned(), a]);
        }
        let (process, ready) = NodeProcess::spawn("oauth", "oauth-server.mjs", &args).await?;
        let issuer = ready["issuer"]
            .as_str()
            .context("ready line without issuer")?
            .to_owned();
        let port = ready["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .context("ready line without port")?;
        Ok(OAuthPeer {
            process,
            issuer,
            port,
            client: peer_http_client(),
        })
    }

    /// `http://127.0.0.1:PORT`: the `iss` of its tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The node process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }
    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.issuer)
    }
    pub fn token_url(&self) -> String {
        format!("{}/token", self.issuer)
    }
    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.issuer)
    }
    pub fn revoke_url(&self) -> String {
        format!("{}/revoke", self.issuer)
    }
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer)
    }
    fn control_url(&self, path: &str) -> String {
        format!("{}/__control/{path}", self.issuer)
    }

    async fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        match control_call(&self.client, method, self.control_url(path), body).await {
            Ok(v) => v,
            Err(e) => panic!("OAuth peer control: {e:#}"),
        }
    }

    /// Partial update of the peer's configuration: `expires_in` (int or null: left out),
    /// `expires_in_as_string`, `username`, `email`, `audience`, `token_delay_ms`.
    pub async fn configure(&self, config: Value) -> Value {
        self.control(reqwest::Method::POST, "config", Some(config))
            .await
    }

    /// Lifetime of the access tokens issued from now on (JWT `exp` and `expires_in`), sent as
    /// a JSON string (as Microsoft sometimes does) when `as_string`.
    pub async fn set_expires_in(&self, seconds: i64, as_string: bool) {
        self.configure(json!({"expires_in": seconds, "expires_in_as_string": as_string}))
            .await;
    }

    /// Token responses without `expires_in` (the JWT still expires after an hour).
    pub async fn omit_expires_in(&self) {
        self.configure(json!({"expires_in": null})).await;
    }

    /// The user of the tokens issued for codes from now on (`preferred_username` and `email`).
    pub async fn set_username(&self, username: &str) {
        self.configure(json!({"username": username, "email": null}))
            .await;
    }

    /// Revokes every refresh token issued so far (the next refresh gets `invalid_grant`);
    /// returns how many were live.
    pub async fn revoke_all(&self) -> u64 {
        self.control(reqwest::Method::POST, "revoke-all", None)
            .await["revoked"]
            .as_u64()
            .unwrap_or_default()
    }

    /// The next `n` token-endpoint calls answer 503 `temporarily_unavailable`.
    pub async fn fail_token_endpoint(&self, n: u32) {
        self.control(
            reqwest::Method::POST,
            "token-failures",
            Some(json!({"count": n, "status": 503})),
        )
        .await;
    }

    /// Every token-endpoint call answers `status` until [`Self::stop_failing_token_endpoint`]
    /// or [`Self::reset`].
    pub async fn fail_token_endpoint_until_reset(&self, status: u16) {
        self.control(
            reqwest::Method::POST,
            "token-failures",
            Some(json!({"count": null, "status": status})),
        )
        .await;
    }

    /// The next `n` token-endpoint calls answer `status` with the OAuth `error` and
    /// `error_description`, as a real provider refuses (e.g. Microsoft Entra ID's
    /// `invalid_grant` + `AADSTS700082: The refresh token has expired...`).
    pub async fn fail_token_endpoint_with(
        &self,
        n: u32,
        status: u16,
        error: &str,
        error_description: &str,
    ) {
        self.control(
            reqwest::Method::POST,
            "token-failures",
            Some(json!({
                "count": n,
                "status": status,
                "error": error,
                "error_description": error_description,
            })),
        )
        .await;
    }

    pub async fn stop_failing_token_endpoint(&self) {
        self.control(reqwest::Method::DELETE, "token-failures", None)
            .await;
    }

    /// The next authorize request redirects with `error=access_denied`.
    pub async fn deny_next_authorize(&self) {
        self.control(
            reqwest::Method::POST,
            "deny-authorize",
            Some(json!({"error": "access_denied", "count": 1})),
        )
        .await;
    }

    /// Token-endpoint calls so far.
    pub async fn token_calls(&self) -> TokenCalls {
        let c = self.control(reqwest::Method::GET, "counters", None).await;
        let by_grant: BTreeMap<String, u64> = c["token"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        TokenCalls {
            authorization_code: by_grant.get("authorization_code").copied().unwrap_or(0),
            refresh_token: by_grant.get("refresh_token").copied().unwrap_or(0),
            total: c["token_total"].as_u64().unwrap_or_default(),
            failures_injected: c["token_failures_injected"].as_u64().unwrap_or_default(),
            by_grant,
        }
    }

    /// `count` active refresh tokens for `client_id` and `scope` (space-separated), as if that
    /// many users had authorized; no token call is counted. For benchmarks that seed grants.
    pub async fn mint_refresh_tokens(
        &self,
        client_id: &str,
        scope: &str,
        count: u32,
    ) -> Vec<String> {
        let v = self
            .control(
                reqwest::Method::POST,
                "mint-refresh-tokens",
                Some(serde_json::json!({"client_id": client_id, "scope": scope, "count": count})),
            )
            .await;
        v["refresh_tokens"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Authorize requests so far.
    pub async fn authorize_calls(&self) -> u64 {
        self.control(reqwest::Method::GET, "counters", None).await["authorize"]
            .as_u64()
            .unwrap_or_default()
    }

    /// Configuration, counters, injected failures and live refresh tokens, as JSON.
    pub async fn state(&self) -> Value {
        self.control(reqwest::Method::GET, "state", None).await
    }

    /// Configuration back to the start-up options, counters to zero, injected failures
    /// cleared; issued tokens stay valid.
    pub async fn reset(&self) {
        self.control(reqwest::Method::POST, "reset", None).await;
    }

    /// The whole authorization-code flow with PKCE, as a client would run it: returns the
    /// token response (`access_token`, `refresh_token`, `id_token`, `expires_in`, ...).
    pub async fn issue_tokens(&self, client_id: &str, scope: &str) -> Value {
        let redirect_uri = "http://127.0.0.1:9/oauth/callback";
        let (verifier, challenge) = pkce_pair();
        let r = self
            .client
            .get(self.authorize_url())
            .query(&[
                ("response_type", "code"),
                ("client_id", client_id),
                ("redirect_uri", redirect_uri),
                ("scope", scope),
                ("state", "peer-state"),
                ("code_challenge", challenge.as_str()),
                ("code_challenge_method", "S256"),
            ])
            .send()
            .await
            .expect("authorize");
        let location = r
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("authorize: no redirect ({})", r.status()))
            .to_owned();
        let url = url::Url::parse(&location).expect("Location");
        let code = url
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| panic!("authorize: no code in {location}"));
        let r = self
            .client
            .post(self.token_url())
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("client_id", client_id),
                ("redirect_uri", redirect_uri),
                ("code_verifier", verifier.as_str()),
            ])
            .send()
            .await
            .expect("token");
        let status = r.status();
        let body: Value = r.json().await.expect("token response JSON");
        assert!(status.is_success(), "token: {status}: {body}");
        body
    }
}

// -------------------------------------------------------------------------------------------
// SMTP

/// How the [`SmtpPeer`] does TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text first, STARTTLS advertised (port 587 style); AUTH only after STARTTLS.
    #[default]
    StartTls,
    /// TLS from the first byte (port 465 style).
    Implicit,
    /// No TLS at all; AUTH allowed in plain text.
    None,
}

/// How the [`SmtpPeer`] answers a rejected XOAUTH2 token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Xoauth2Failure {
    /// `535 5.7.8 ...` at once (Microsoft 365 style).
    #[default]
    Reply535,
    /// `334 <base64 JSON error>`, then `535` after the client's empty line (Gmail style).
    Gmail,
}

impl Xoauth2Failure {
    fn as_arg(self) -> &'static str {
        match self {
            Xoauth2Failure::Reply535 => "535",
            Xoauth2Failure::Gmail => "gmail",
        }
    }
}

/// Where an injected SMTP failure strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpStage {
    /// The greeting.
    Connect,
    Auth,
    Mail,
    /// Every RCPT of the transaction.
    Rcpt,
    /// The reply after the message data.
    Data,
}

impl SmtpStage {
    fn as_str(self) -> &'static str {
        match self {
            SmtpStage::Connect => "connect",
            SmtpStage::Auth => "auth",
            SmtpStage::Mail => "mail",
            SmtpStage::Rcpt => "rcpt",
            SmtpStage::Data => "data",
        }
    }
}

/// Start-up options of the [`SmtpPeer`].
#[derive(Debug, Clone, Default)]
pub struct SmtpPeerOptions {
    pub tls: SmtpTls,
    /// PLAIN/LOGIN accounts (user, password).
    pub users: Vec<(String, String)>,
    /// Verify XOAUTH2 tokens against this JWKS (e.g. [`OAuthPeer::jwks_url`]); without it
    /// every XOAUTH2 attempt fails.
    pub jwks_url: Option<String>,
    /// XOAUTH2: also require this `iss`.
    pub issuer: Option<String>,
    /// XOAUTH2: also require this `aud`.
    pub audience: Option<String>,
    pub xoauth2_failure: Xoauth2Failure,
    /// AUTH optional: unauthenticated sending is accepted.
    pub no_auth: bool,
    /// Server name (greeting, certificate); default `smtp.postwire.test`.
    pub name: Option<String>,
    /// SIZE limit in bytes; larger messages get 552.
    pub size: Option<u64>,
    /// Close connections idle this long with "421 Timeout" (smtp-server's default: 60 s).
    pub idle_timeout: Option<std::time::Duration>,
    /// Do not announce PIPELINING: the client must send one command at a time.
    pub no_pipelining: bool,
}

impl SmtpPeerOptions {
    pub fn with_user(mut self, user: &str, password: &str) -> Self {
        self.users.push((user.to_owned(), password.to_owned()));
        self
    }
    /// XOAUTH2 tokens verified against the OAuth peer's keys and issuer.
    pub fn trusting(mut self, oauth: &OAuthPeer) -> Self {
        self.jwks_url = Some(oauth.jwks_url());
        self.issuer = Some(oauth.issuer().to_owned());
        self
    }
}

/// A message the [`SmtpPeer`] accepted.
#[derive(Debug, Clone, Deserialize)]
pub struct SmtpMessage {
    pub id: u64,
    /// Envelope sender (MAIL FROM); `None` for the null sender.
    pub from: Option<String>,
    /// Envelope recipients (RCPT TO).
    pub to: Vec<String>,
    pub auth_user: Option<String>,
    /// `PLAIN`, `LOGIN` or `XOAUTH2`.
    pub auth_method: Option<String>,
    /// Whether the session was under TLS.
    pub tls: bool,
    pub helo: Option<String>,
    pub size: u64,
    /// The RFC 5322 message, as UTF-8 (lossy).
    pub data: String,
    pub data_base64: String,
    pub received_at: String,
}

impl SmtpMessage {
    /// The exact bytes received.
    pub fn raw(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.data_base64)
            .expect("data_base64")
    }
}

/// An AUTH attempt seen by the [`SmtpPeer`].
#[derive(Debug, Clone, Deserialize)]
pub struct SmtpAuthAttempt {
    pub method: String,
    pub username: Option<String>,
    pub ok: bool,
    pub reason: Option<String>,
    pub at: String,
}

/// The SMTP peer (`tests/peers/smtp-server.mjs`).
#[derive(Debug)]
pub struct SmtpPeer {
    process: NodeProcess,
    port: u16,
    control_port: u16,
    tls: SmtpTls,
    cert_dir: PathBuf,
    cert_pem_path: Option<PathBuf>,
    client: reqwest::Client,
}

impl SmtpPeer {
    /// Starts a peer; panics (with the reason) if it cannot.
    pub async fn start(opts: SmtpPeerOptions) -> SmtpPeer {
        match Self::try_start(opts).await {
            Ok(p) => p,
            Err(e) => panic!("cannot start the SMTP peer: {e:#}"),
        }
    }

    pub async fn try_start(opts: SmtpPeerOptions) -> anyhow::Result<SmtpPeer> {
        let cert_dir = std::env::temp_dir().join(format!(
            "postwire-smtp-peer-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&cert_dir).context("temp dir for the SMTP peer's CA")?;
        let cert_out = cert_dir.join("ca.pem");
        let mut args: Vec<String> = Vec::new();
        match opts.tls {
            SmtpTls::StartTls => {}
            SmtpTls::Implicit => args.push("--secure".into()),
            SmtpTls::None => args.push("--no-tls".into()),
        }
        if opts.tls != SmtpTls::None {
            args.extend(["--cert-out".into(), cert_out.to_string_lossy().into_owned()]);
        }
        if !opts.users.is_empty() {
            let users: Vec<String> = opts
                .users
                .iter()
                .map(|(u, p)| {
                    assert!(
                        !u.contains([':', ',']) && !p.contains(','),
                        "SMTP peer users: no ':' or ',' in a user, no ',' in a password"
                    );
                    format!("{u}:{p}")
                })
                .collect();
            args.extend(["--users".into(), users.join(",")]);
        }
        if let Some(u) = opts.jwks_url {
            args.extend(["--jwks-url".into(), u]);
        }
        if let Some(i) = opts.issuer {
            args.extend(["--issuer".into(), i]);
        }
        if let Some(a) = opts.audience {
            args.extend(["--audience".into(), a]);
        }
        args.extend([
            "--xoauth2-failure".into(),
            opts.xoauth2_failure.as_arg().into(),
        ]);
        if opts.no_auth {
            args.push("--no-auth".into());
        }
        if let Some(n) = opts.name {
            args.extend(["--name".into(), n]);
        }
        if let Some(s) = opts.size {
            args.extend(["--size".into(), s.to_string()]);
        }
        if let Some(t) = opts.idle_timeout {
            args.extend(["--idle-timeout".into(), t.as_millis().to_string()]);
        }
        if opts.no_pipelining {
            args.push("--no-pipelining".into());
        }
        let started = NodeProcess::spawn("smtp", "smtp-server.mjs", &args).await;
        let (process, ready) = match started {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&cert_dir);
                return Err(e);
            }
        };
        let port_of = |k: &str| {
            ready[k]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .with_context(|| format!("ready line without {k}: {ready}"))
        };
        Ok(SmtpPeer {
            port: port_of("port")?,
            control_port: port_of("control_port")?,
            tls: opts.tls,
            cert_pem_path: ready["cert_pem"].as_str().map(PathBuf::from),
            cert_dir,
            process,
            client: peer_http_client(),
        })
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn tls(&self) -> SmtpTls {
        self.tls
    }
    /// The node process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }
    /// The CA certificate (PEM file) that signed the server's certificate: trust it to connect
    /// with TLS. The server certificate names `localhost`, `127.0.0.1` and `::1`.
    /// Panics for [`SmtpTls::None`].
    pub fn cert_pem_path(&self) -> &Path {
        self.cert_pem_path
            .as_deref()
            .expect("the SMTP peer runs without TLS: no certificate")
    }
    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(self.cert_pem_path()).expect("read the SMTP peer's CA")
    }
    pub fn control_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.control_port)
    }

    async fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/{path}", self.control_url());
        match control_call(&self.client, method, url, body).await {
            Ok(v) => v,
            Err(e) => panic!("SMTP peer control: {e:#}"),
        }
    }

    /// The accepted messages, oldest first.
    pub async fn messages(&self) -> Vec<SmtpMessage> {
        let v = self.control(reqwest::Method::GET, "messages", None).await;
        serde_json::from_value(v).expect("SMTP peer messages")
    }

    /// Forgets the accepted messages.
    pub async fn clear(&self) {
        self.control(reqwest::Method::DELETE, "messages", None)
            .await;
    }

    /// The next `count` transactions get `code message` after their DATA (421/451: transient,
    /// 421 also closes the connection; 550: permanent).
    pub async fn fail_next(&self, code: u16, message: &str, count: u32) {
        self.fail_next_at(SmtpStage::Data, code, message, count)
            .await;
    }

    /// Like [`Self::fail_next`], at another stage of the transaction.
    pub async fn fail_next_at(&self, stage: SmtpStage, code: u16, message: &str, count: u32) {
        self.control(
            reqwest::Method::POST,
            "fail",
            Some(
                json!({"code": code, "message": message, "count": count, "stage": stage.as_str()}),
            ),
        )
        .await;
    }

    /// Every AUTH attempt so far, oldest first.
    pub async fn auth_attempts(&self) -> Vec<SmtpAuthAttempt> {
        let v = self.control(reqwest::Method::GET, "auth", None).await;
        serde_json::from_value(v).expect("SMTP peer auth attempts")
    }

    /// XOAUTH2 tokens issued (JWT `iat`) at or before `unix_secs` are refused from now on, as
    /// after the provider revoked the user's sessions.
    pub async fn revoke_tokens_issued_until(&self, unix_secs: i64) {
        self.control(
            reqwest::Method::POST,
            "config",
            Some(json!({"revoked_until": unix_secs})),
        )
        .await;
    }

    pub async fn set_xoauth2_failure(&self, mode: Xoauth2Failure) {
        self.control(
            reqwest::Method::POST,
            "config",
            Some(json!({"xoauth2_failure": mode.as_arg()})),
        )
        .await;
    }

    /// Counters (connections, transactions, accepted, rejected), config, pending failures.
    pub async fn state(&self) -> Value {
        self.control(reqwest::Method::GET, "state", None).await
    }

    /// Messages, auth attempts, failure rules and counters cleared.
    pub async fn reset(&self) {
        self.control(reqwest::Method::POST, "reset", None).await;
    }
}

impl Drop for SmtpPeer {
    fn drop(&mut self) {
        let _ = self.process.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.cert_dir);
    }
}
