//! The site mailer end to end: the real Management Service (tenant, settings and site made
//! through its API), the site mailer built by its `Application` builder on port 0 with its
//! own data dir, and the real SMTP peer (STARTTLS with its own CA, PLAIN auth).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use postwire_tests::inspect::{attachment_bytes, header, metric_value};
use postwire_tests::peers::{
    OAuthPeer, OAuthPeerOptions, SmtpMessage, SmtpPeer, SmtpPeerOptions, peer_http_client,
};
use postwire_tests::site_mailer_process::SiteMailerProcess;
use postwire_tests::{Backend, Resp, TestApp};
use serde_json::{Value, json};
use site_mailer::config::Config;
use site_mailer::startup::{AppState, Application, Stopper};

const USER: &str = "scanner@acme.example";
const PASSWORD: &str = "Sup3r-Secret-PW";
const API_KEY: &str = "test-local-api-key-0123456789";

// ------------------------------------------------------------------------------------------
// Harness

fn settings(peer: &SmtpPeer) -> Value {
    json!({
        "provider": "custom",
        "server": {"host": "localhost", "port": peer.port(), "encryption": "starttls"},
        "auth": {"method": "password", "username": USER, "password": PASSWORD},
        "senders": [
            {"address": USER, "name": "Acme Scanner", "default": true},
            {"address": "reports@acme.example"}
        ],
        "receivers": [
            {"address": "it@acme.example", "purpose": "report"},
            {"address": "boss@acme.example"},
            {"address": "ops@acme.example", "purpose": "notification"}
        ],
        "feature_senders": {"report": "reports@acme.example"}
    })
}

/// The Management Service with tenant `acme`, its settings and one site; the SMTP peer.
struct World {
    mgmt: TestApp,
    smtp: SmtpPeer,
    site_id: String,
    secret: String,
    data_dir: PathBuf,
    _cleanup: RemoveOnDrop,
}

/// Removes a temp directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl World {
    async fn new() -> World {
        Self::with_settings(true).await
    }

    async fn with_settings(configure: bool) -> World {
        let smtp = SmtpPeer::start(SmtpPeerOptions::default().with_user(USER, PASSWORD)).await;
        let mgmt = TestApp::spawn(Backend::Sqlite).await;
        mgmt.create_tenant("acme").await;
        let t = mgmt.admin_token("acme");
        if configure {
            let r = mgmt
                .put("/api/v1/tenants/acme/email-settings", &t, &settings(&smtp))
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
        let site = mgmt
            .post("/api/v1/tenants/acme/sites", &t, &json!({"name": "Brno"}))
            .await;
        assert_eq!(site.status, 201, "{}", site.text);
        let site = site.json();
        let data_dir =
            std::env::temp_dir().join(format!("site-mailer-test-{}", uuid::Uuid::new_v4()));
        World {
            site_id: site["site_id"].as_str().unwrap().to_owned(),
            secret: site["secret"].as_str().unwrap().to_owned(),
            mgmt,
            smtp,
            _cleanup: RemoveOnDrop(data_dir.clone()),
            data_dir,
        }
    }

    fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("POSTWIRE_LISTEN", "127.0.0.1:0"),
            ("POSTWIRE_MANAGEMENT_URL", self.mgmt.address.as_str()),
            ("POSTWIRE_SITE_ID", self.site_id.as_str()),
            ("POSTWIRE_SITE_SECRET", self.secret.as_str()),
            ("POSTWIRE_API_KEY", API_KEY),
            ("POSTWIRE_RETRY_INITIAL", "100ms"),
            ("POSTWIRE_RETRY_MAX_DELAY", "300ms"),
            ("POSTWIRE_HELLO_NAME", "site.postwire.test"),
            ("POSTWIRE_CONNECT_TIMEOUT", "2s"),
        ] {
            env.insert(k.to_owned(), v.to_owned());
        }
        env.insert(
            "POSTWIRE_DATA_DIR".into(),
            self.data_dir.to_string_lossy().into_owned(),
        );
        env.insert(
            "POSTWIRE_EXTRA_CA_FILE".into(),
            self.smtp.cert_pem_path().to_string_lossy().into_owned(),
        );
        env
    }

    async fn mailer(&self) -> SiteMailer {
        SiteMailer::start(self.env()).await
    }

    fn env_with(&self, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut env = self.env();
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        env
    }

    async fn mailer_with(&self, extra: &[(&str, &str)]) -> SiteMailer {
        SiteMailer::start(self.env_with(extra)).await
    }

    /// The real binary with `extra` on top of [`World::env`], its log appended to
    /// `site-mailer.log` in the data directory (a restart keeps the earlier output).
    async fn process_with(&self, extra: &[(&str, &str)]) -> SiteMailer {
        std::fs::create_dir_all(&self.data_dir).unwrap();
        let log = self.data_dir.join("site-mailer.log");
        SiteMailer::spawn_process(&self.env_with(extra), &log).await
    }

    async fn put_settings(&self, v: &Value) {
        let r = self
            .mgmt
            .put(
                "/api/v1/tenants/acme/email-settings",
                &self.mgmt.admin_token("acme"),
                v,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
}

/// A running site mailer: in this process (built by its `Application` builder), or the
/// real binary as a child process.
struct SiteMailer {
    address: String,
    client: reqwest::Client,
    stopper: Option<Stopper>,
    state: Option<actix_web::web::Data<AppState>>,
    process: Option<SiteMailerProcess>,
}

impl SiteMailer {
    async fn start(env: BTreeMap<String, String>) -> SiteMailer {
        let config = Config::from_sources(None, &env).expect("site mailer configuration");
        let app = Application::build(config)
            .await
            .expect("start the site mailer");
        let address = format!("http://127.0.0.1:{}", app.port());
        let stopper = app.stopper();
        let state = app.state();
        tokio::spawn(app.run_until_stopped());
        SiteMailer {
            address,
            client: reqwest::Client::new(),
            stopper: Some(stopper),
            state: Some(state),
            process: None,
        }
    }

    /// The real `site-mailer` binary with `env` (its log in `log`).
    async fn spawn_process(env: &BTreeMap<String, String>, log: &Path) -> SiteMailer {
        let process = SiteMailerProcess::start(env, log).await;
        SiteMailer {
            address: process.address.clone(),
            client: reqwest::Client::new(),
            stopper: None,
            state: None,
            process: Some(process),
        }
    }

    fn process(&mut self) -> &mut SiteMailerProcess {
        self.process.as_mut().expect("a site-mailer process")
    }

    /// Stops the server and the worker and waits for them.
    async fn stop(mut self) {
        if let Some(s) = self.stopper.take() {
            s.stop().await;
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        idempotency_key: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let mut rb = self
            .client
            .request(method, format!("{}{path}", self.address));
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        if let Some(k) = idempotency_key {
            rb = rb.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let r = rb.send().await.expect("request to the site mailer");
        Resp {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            text: r.text().await.expect("body"),
        }
    }

    async fn post(&self, body: &Value) -> Resp {
        self.request(
            reqwest::Method::POST,
            "/v1/messages",
            Some(API_KEY),
            None,
            Some(body),
        )
        .await
    }

    /// Posts and expects 202; returns the id.
    async fn accept(&self, body: &Value) -> String {
        let r = self.post(body).await;
        assert_eq!(r.status, 202, "{}", r.text);
        let v = r.json();
        assert_eq!(v["status"], "queued");
        v["id"].as_str().unwrap().to_owned()
    }

    async fn message(&self, id: &str) -> Value {
        let r = self.get_message(id).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()
    }

    /// `GET /v1/messages/{id}` with the API key, whatever it answers.
    async fn get_message(&self, id: &str) -> Resp {
        self.request(
            reqwest::Method::GET,
            &format!("/v1/messages/{id}"),
            Some(API_KEY),
            None,
            None,
        )
        .await
    }

    /// `GET /metrics` (no key needed): the Prometheus text.
    async fn metrics(&self) -> String {
        let r = self
            .request(reqwest::Method::GET, "/metrics", None, None, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4"),
        );
        r.text
    }

    /// The value of the series `name{label="value"}` (or `name` without labels).
    async fn metric(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        let text = self.metrics().await;
        let series = match label {
            Some((k, v)) => format!("{name}{{{k}=\"{v}\"}}"),
            None => name.to_owned(),
        };
        metric_value(&text, &series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    async fn sends(&self, result: &str) -> f64 {
        self.metric("postwire_site_sends_total", Some(("result", result)))
            .await
    }

    async fn outbox(&self, state: &str) -> f64 {
        self.metric("postwire_site_outbox_messages", Some(("state", state)))
            .await
    }

    async fn token_source(&self, source: &str) -> f64 {
        self.metric("postwire_site_token_source_total", Some(("source", source)))
            .await
    }

    /// Waits until the message reaches `status` (`sent` or `failed`).
    async fn wait_for(&self, id: &str, status: &str) -> Value {
        self.wait_until(id, status, |m| m["status"] == status).await
    }

    /// Waits until the message (as `GET /v1/messages/{id}` shows it) is as `what` says.
    async fn wait_until(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = self.message(id).await;
            if done(&m) {
                return m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "message {id} never became {what}: {m}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SiteMailer {
    fn drop(&mut self) {
        if let Some(s) = self.stopper.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move { s.stop().await });
        }
    }
}

/// Waits until the peer has `n` messages; returns them.
async fn delivered(peer: &SmtpPeer, n: usize) -> Vec<SmtpMessage> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = peer.messages().await;
        if m.len() >= n {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the SMTP peer got {} of {n} messages",
            m.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn simple(kind: &str, subject: &str) -> Value {
    json!({"kind": kind, "to": ["someone@example.com"], "subject": subject, "text": "Hello.\n"})
}

fn outbox_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("outbox").join(id)
}

/// Attachment files are removed right after the outcome is recorded.
async fn wait_removed(dir: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while dir.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} is still there",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------------------------------
// Delivery

/// Accept → delivered over STARTTLS + PLAIN: headers, text and HTML, binary attachment bytes
/// intact, Bcc only in the envelope, the Message-ID chosen at accept time, the server's reply
/// recorded; the attachment files are written at accept time and removed after delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_message_is_delivered() {
    let w = World::new().await;
    let sm = w.mailer().await;

    let mut scan: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    scan.extend_from_slice(b"\r\n.\r\n\0\xff");
    let csv = b"id,value\n1,\xe2\x82\xac\n".to_vec();
    let id = sm
        .accept(&json!({
            "kind": "scan_to_email",
            "to": ["alice@example.com"],
            "cc": ["bob@example.com"],
            "bcc": ["audit@example.com"],
            "subject": "Scan 42 – Brno",
            "text": "Your scan is attached.\n",
            "html": "<p>Your <b>scan</b> is attached.</p>",
            "attachments": [
                {"filename": "scan.pdf", "content_type": "application/pdf", "content_base64": b64(&scan)},
                {"filename": "report.csv", "content_type": "text/csv", "content_base64": b64(&csv)}
            ]
        }))
        .await;

    let m = sm.wait_for(&id, "sent").await;
    assert_eq!(m["attempts"], 1, "{m}");
    assert_eq!(m["kind"], "scan_to_email");
    assert!(m["smtp_reply"].as_str().unwrap().starts_with("250"), "{m}");
    assert!(m["sent_at"].is_string());
    let message_id = m["message_id"].as_str().unwrap().to_owned();
    assert!(
        message_id.starts_with('<') && message_id.ends_with("@acme.example>"),
        "{message_id}"
    );

    let got = delivered(&w.smtp, 1).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert!(d.tls, "delivered over STARTTLS");
    assert_eq!(d.auth_method.as_deref(), Some("PLAIN"));
    assert_eq!(d.auth_user.as_deref(), Some(USER));
    assert_eq!(d.helo.as_deref(), Some("site.postwire.test"));
    assert_eq!(d.from.as_deref(), Some(USER), "the default sender");
    let mut rcpt = d.to.clone();
    rcpt.sort();
    assert_eq!(
        rcpt,
        ["alice@example.com", "audit@example.com", "bob@example.com"]
    );
    assert_eq!(
        header(&d.data, "From").as_deref(),
        Some("\"Acme Scanner\" <scanner@acme.example>")
    );
    assert_eq!(header(&d.data, "To").as_deref(), Some("alice@example.com"));
    assert_eq!(header(&d.data, "Cc").as_deref(), Some("bob@example.com"));
    assert_eq!(header(&d.data, "Bcc"), None, "Bcc is envelope only");
    assert_eq!(
        header(&d.data, "Message-ID").as_deref(),
        Some(message_id.as_str())
    );
    assert!(header(&d.data, "Subject").unwrap().contains("=?utf-8?"));
    assert!(d.data.contains("multipart/alternative"));
    assert!(d.data.contains("Your scan is attached."));
    assert_eq!(attachment_bytes(&d.data, "scan.pdf"), scan);
    assert_eq!(attachment_bytes(&d.data, "report.csv"), csv);
    wait_removed(&outbox_dir(&w.data_dir, &id)).await;
    sm.stop().await;
}

/// Temporary failures (421 closing the connection, then 451) are retried with backoff: the
/// message is delivered once, after three attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried() {
    let w = World::new().await;
    w.smtp
        .fail_next(421, "Service not available, closing channel", 1)
        .await;
    w.smtp
        .fail_next(451, "Requested action aborted: local error", 1)
        .await;
    let sm = w.mailer().await;
    let id = sm.accept(&simple("test", "Retry me")).await;
    let m = sm.wait_for(&id, "sent").await;
    assert_eq!(m["attempts"], 3, "{m}");
    assert!(
        m["last_error"].as_str().unwrap().contains("451"),
        "the last failure is kept: {m}"
    );
    let got = delivered(&w.smtp, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.smtp.messages().await.len(), 1, "delivered exactly once");
    assert_eq!(
        header(&got[0].data, "Message-ID").as_deref(),
        m["message_id"].as_str()
    );
    sm.stop().await;
}

/// A permanent refusal fails the message with the server's reply; nothing is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_fails_with_the_reply() {
    let w = World::new().await;
    w.smtp
        .fail_next(550, "Requested action not taken: mailbox unavailable", 1)
        .await;
    let sm = w.mailer().await;
    let id = sm.accept(&simple("test", "Doomed")).await;
    let m = sm.wait_for(&id, "failed").await;
    assert_eq!(m["attempts"], 1, "{m}");
    let reply = m["smtp_reply"].as_str().unwrap();
    assert!(
        reply.starts_with("550") && reply.contains("mailbox unavailable"),
        "{m}"
    );
    assert!(m["last_error"].as_str().unwrap().contains("550"), "{m}");
    assert!(m.get("reason").is_none(), "{m}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.smtp.messages().await.is_empty());
    assert_eq!(sm.message(&id).await["attempts"], 1, "not retried");
    sm.stop().await;
}

/// `/metrics` follows the outbox: the queue depth by state and the sends by result change as
/// a message is retried, sent and refused; a password configuration uses no access tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_outbox() {
    let w = World::new().await;
    w.smtp.fail_next(451, "Try again later", 1).await;
    let sm = w
        .mailer_with(&[
            ("POSTWIRE_RETRY_INITIAL", "2s"),
            ("POSTWIRE_RETRY_MAX_DELAY", "2s"),
        ])
        .await;
    for state in ["queued", "sending", "sent", "failed"] {
        assert_eq!(sm.outbox(state).await, 0.0, "{state}");
    }
    for result in ["sent", "retry", "postponed", "failed"] {
        assert_eq!(sm.sends(result).await, 0.0, "{result}");
    }
    assert_eq!(
        sm.metric("postwire_site_token_refresh_age_seconds", None)
            .await,
        -1.0,
        "no token fetched yet"
    );

    let id = sm.accept(&simple("test", "Counted")).await;
    // the 451: counted as a retry, and the message waits queued (1-2 s) for the next attempt
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sm.sends("retry").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "no retry counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sm.outbox("queued").await, 1.0);
    assert_eq!(sm.sends("sent").await, 0.0);
    sm.wait_for(&id, "sent").await;
    assert_eq!(sm.sends("sent").await, 1.0);
    assert_eq!(sm.sends("retry").await, 1.0);
    assert_eq!(sm.outbox("queued").await, 0.0);
    assert_eq!(sm.outbox("sent").await, 1.0);

    w.smtp.fail_next(550, "No such user", 1).await;
    let id = sm.accept(&simple("test", "Refused")).await;
    sm.wait_for(&id, "failed").await;
    assert_eq!(sm.sends("failed").await, 1.0);
    assert_eq!(sm.outbox("failed").await, 1.0);
    assert_eq!(sm.outbox("sent").await, 1.0);
    for source in ["memory", "redis", "local", "management"] {
        assert_eq!(
            sm.token_source(source).await,
            0.0,
            "password auth: {source}"
        );
    }
    sm.stop().await;
}

/// Sent and failed messages are removed `POSTWIRE_OUTBOX_RETENTION` after their outcome
/// (404 from then on, counted in `postwire_site_outbox_purged_total`); a message still
/// waiting to be sent stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_messages_are_removed_after_the_retention() {
    let w = World::new().await;
    w.smtp.fail_next(451, "Try again later", 1).await;
    let sm = w
        .mailer_with(&[
            ("POSTWIRE_OUTBOX_RETENTION", "2s"),
            ("POSTWIRE_RETRY_INITIAL", "60s"),
            ("POSTWIRE_RETRY_MAX_DELAY", "60s"),
        ])
        .await;
    // the first message meets the 451 and waits for its retry (30 to 60 s away)
    let waiting = sm.accept(&simple("test", "Waits")).await;
    sm.wait_until(&waiting, "queued after one attempt", |m| {
        m["attempts"] == 1 && m["status"] == "queued"
    })
    .await;
    let id = sm.accept(&simple("test", "Short-lived")).await;
    sm.wait_for(&id, "sent").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = sm.get_message(&id).await;
        if r.status == 404 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sent message was never removed: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        sm.metric("postwire_site_outbox_purged_total", None).await,
        1.0
    );
    assert_eq!(sm.outbox("sent").await, 0.0);
    let m = sm.message(&waiting).await;
    assert_eq!(m["status"], "queued", "a waiting message stays: {m}");
    sm.stop().await;
}

/// A temporary failure that lasts past `POSTWIRE_RETRY_MAX_AGE` fails the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_max_age() {
    let w = World::new().await;
    w.smtp.fail_next(451, "Try again later", 1000).await;
    // 4 s, not 1 s: on a loaded machine the first attempt alone can take a second.
    let sm = w.mailer_with(&[("POSTWIRE_RETRY_MAX_AGE", "4s")]).await;
    let id = sm.accept(&simple("test", "Too late")).await;
    let m = sm.wait_for(&id, "failed").await;
    let attempts = m["attempts"].as_i64().unwrap();
    assert!(attempts >= 2, "{m}");
    assert!(m["last_error"].as_str().unwrap().contains("gave up"), "{m}");
    sm.stop().await;
}

// ------------------------------------------------------------------------------------------
// The local API

/// Without the local API key nothing is accepted or shown (no open relay); a generated key
/// is stored in the data dir (owner-only) and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_api_requires_the_api_key() {
    let w = World::new().await;
    let sm = w.mailer().await;
    let body = simple("test", "Unauthorized");
    for key in [None, Some("wrong-key-wrong-key-wrong")] {
        let r = sm
            .request(
                reqwest::Method::POST,
                "/v1/messages",
                key,
                None,
                Some(&body),
            )
            .await;
        assert_eq!(r.status, 401, "{}", r.text);
        assert!(
            r.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer"),
        );
        assert_eq!(
            r.headers["content-type"].to_str().unwrap(),
            "application/problem+json"
        );
    }
    let id = sm.accept(&body).await;
    let r = sm
        .request(
            reqwest::Method::GET,
            &format!("/v1/messages/{id}"),
            None,
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    // health needs no key
    let r = sm
        .request(reqwest::Method::GET, "/healthz", None, None, None)
        .await;
    assert_eq!(r.status, 200);
    let r = sm
        .request(reqwest::Method::GET, "/readyz", None, None, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["status"], "ready");
    // other errors are problem+json too
    let r = sm
        .request(
            reqwest::Method::GET,
            "/v1/messages/00000000-0000-0000-0000-000000000000",
            Some(API_KEY),
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    let r = sm
        .request(
            reqwest::Method::DELETE,
            "/v1/messages",
            Some(API_KEY),
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 405);
    let r = sm
        .client
        .post(format!("{}/v1/messages", sm.address))
        .bearer_auth(API_KEY)
        .body("kind=test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // the body limit (35 MiB: attachments travel in base64)
    let big = json!({"kind": "test", "to": ["x@example.com"], "subject": "big",
        "text": "x".repeat(36 * 1024 * 1024)});
    let r = sm.post(&big).await;
    assert_eq!(r.status, 413, "{}", r.text);
    sm.wait_for(&id, "sent").await;
    sm.stop().await;

    // no POSTWIRE_API_KEY: generated once, stored owner-only, and required
    let mut env = w.env();
    env.remove("POSTWIRE_API_KEY");
    let sm = SiteMailer::start(env).await;
    let file = w.data_dir.join("api.key");
    let key = std::fs::read_to_string(&file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let r = sm
        .request(
            reqwest::Method::POST,
            "/v1/messages",
            Some(API_KEY),
            None,
            Some(&body),
        )
        .await;
    assert_eq!(r.status, 401, "the old key is not accepted");
    let r = sm
        .request(
            reqwest::Method::POST,
            "/v1/messages",
            Some(key.trim()),
            None,
            Some(&body),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    sm.stop().await;
}

/// The same `Idempotency-Key` with the same request returns the same message (also when
/// sent concurrently) and sends it once; with a different request it is a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_message() {
    let w = World::new().await;
    let sm = w.mailer().await;
    let mut body = simple("test", "Once");
    body["attachments"] = json!([{"filename": "a.txt", "content_type": "text/plain", "content_base64": b64(b"once")}]);
    let post = |key: &'static str, body: Value| {
        let sm = &sm;
        async move {
            sm.request(
                reqwest::Method::POST,
                "/v1/messages",
                Some(API_KEY),
                Some(key),
                Some(&body),
            )
            .await
        }
    };
    let (a, b) = tokio::join!(post("job-1", body.clone()), post("job-1", body.clone()));
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(b.status, 202, "{}", b.text);
    let id = a.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(b.json()["id"], id.as_str(), "concurrent retries");
    sm.wait_for(&id, "sent").await;
    let again = post("job-1", body.clone()).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["id"], id.as_str());
    assert_eq!(again.json()["status"], "sent");

    let other = post("job-1", simple("test", "Something else")).await;
    assert_eq!(other.status, 409, "{}", other.text);
    let r = sm
        .request(
            reqwest::Method::POST,
            "/v1/messages",
            Some(API_KEY),
            Some(" "),
            Some(&body),
        )
        .await;
    assert_eq!(r.fields(), ["Idempotency-Key"]);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.smtp.messages().await.len(), 1, "sent once");
    // the duplicates' attachment dirs are not left behind
    let leftovers = std::fs::read_dir(w.data_dir.join("outbox"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0);
    sm.stop().await;
}

/// Concurrent accepts all get 202 only after their commit (group commit batches them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_accepts_are_all_stored() {
    let w = World::new().await;
    let sm = w.mailer().await;
    let n = 40;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = sm.client.clone();
        let url = format!("{}/v1/messages", sm.address);
        set.spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(API_KEY)
                .json(&simple("notification", &format!("Batch {i}")))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        });
    }
    let results = set.join_all().await;
    let mut ids = Vec::new();
    for (status, text) in results {
        assert_eq!(status, 202, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n);
    let stats = sm.state.as_ref().unwrap().writer.stats();
    let txns = stats
        .transactions
        .load(std::sync::atomic::Ordering::Relaxed);
    let msgs = stats.messages.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(msgs, n as u64);
    assert!(txns <= msgs, "{txns} transactions for {msgs} messages");
    eprintln!("group commit: {msgs} messages in {txns} transactions");
    for id in &ids {
        sm.wait_for(id, "sent").await;
    }
    assert_eq!(delivered(&w.smtp, n).await.len(), n);
    sm.stop().await;
}

// ------------------------------------------------------------------------------------------
// Addressing

/// Default sender, feature sender, receivers by purpose; a foreign From, header injection,
/// bad addresses and unknown fields are refused with 422 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addressing_rules() {
    let w = World::new().await;
    let sm = w.mailer().await;

    // kind test: the default sender
    let a = sm.accept(&simple("test", "Default sender")).await;
    // report: its feature sender, and without `to` the report receivers + those without purpose
    let b = sm
        .accept(&json!({"kind": "report", "subject": "Monthly report", "text": "..."}))
        .await;
    // notification without to: notification receivers + those without purpose
    let c = sm
        .accept(&json!({"kind": "notification", "subject": "Toner low"}))
        .await;
    // explicit from: one of the senders (case-insensitive)
    let d = sm
        .accept(&json!({"kind": "scan_to_email", "from": "Reports@ACME.example", "to": ["x@example.com"], "subject": "Explicit"}))
        .await;
    for id in [&a, &b, &c, &d] {
        sm.wait_for(id, "sent").await;
    }
    let got = delivered(&w.smtp, 4).await;
    let by_subject = |s: &str| {
        got.iter()
            .find(|m| header(&m.data, "Subject").as_deref() == Some(s))
            .unwrap_or_else(|| panic!("no message {s}"))
            .clone()
    };
    let m = by_subject("Default sender");
    assert_eq!(m.from.as_deref(), Some(USER));
    let m = by_subject("Monthly report");
    assert_eq!(m.from.as_deref(), Some("reports@acme.example"));
    assert_eq!(m.to, ["it@acme.example", "boss@acme.example"]);
    let m = by_subject("Toner low");
    assert_eq!(m.from.as_deref(), Some(USER));
    assert_eq!(m.to, ["boss@acme.example", "ops@acme.example"]);
    let m = by_subject("Explicit");
    assert_eq!(m.from.as_deref(), Some("reports@acme.example"));

    // refusals
    let cases = [
        (
            json!({"kind": "test", "from": "ceo@evil.example", "to": ["x@example.com"], "subject": "s"}),
            vec!["from"],
        ),
        (
            json!({"kind": "test", "to": ["x@example.com"], "subject": "Hi\r\nBcc: victim@example.com"}),
            vec!["subject"],
        ),
        (
            json!({"kind": "test", "to": ["x@example.com\r\nBcc: victim@example.com", "nope"], "cc": ["ok@example.com"], "subject": "s"}),
            vec!["to[0]", "to[1]"],
        ),
        (
            json!({"kind": "test", "from": "scanner@acme.example\nBcc: v@example.com", "to": ["x@example.com"], "subject": "s"}),
            vec!["from"],
        ),
        (
            json!({"kind": "scan_to_email", "subject": "no recipient"}),
            vec!["to"],
        ),
        (
            json!({"kind": "test", "to": ["x@example.com"], "subject": "s",
                   "attachments": [{"filename": "a.pdf\r\nX-Evil: 1", "content_type": "application/pdf", "content_base64": "AA=="}]}),
            vec!["attachments[0].filename"],
        ),
        (
            json!({"kind": "test", "to": ["x@example.com"], "subject": "s",
                   "attachments": [{"filename": "a.pdf", "content_type": "application/pdf\r\nX-Evil: 1", "content_base64": "AA=="}]}),
            vec!["attachments[0].content_type"],
        ),
        (
            json!({"kind": "test", "to": ["x@example.com"], "subject": "s",
                   "attachments": [{"filename": "a.pdf", "content_type": "application/pdf", "content_base64": "%%%"}]}),
            vec!["attachments[0].content_base64"],
        ),
        (
            json!({"kind": "fax", "to": ["x@example.com"], "subject": "s"}),
            vec!["kind"],
        ),
        (
            json!({"kind": "test", "to": ["x@example.com"], "subject": "s", "reply_to": "x@example.com"}),
            vec!["reply_to"],
        ),
    ];
    for (body, fields) in cases {
        let r = sm.post(&body).await;
        assert_eq!(r.fields(), fields, "{body}: {}", r.text);
        assert_eq!(
            r.headers["content-type"].to_str().unwrap(),
            "application/problem+json"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(w.smtp.messages().await.len(), 4, "nothing refused was sent");
    sm.stop().await;
}

// ------------------------------------------------------------------------------------------
// Durability and the Management Service

/// Messages queued while the SMTP server fails survive a stop of the site mailer; one that
/// was `sending` when the process died goes back to the queue; a new site mailer on the same
/// data dir delivers them all, with the Message-IDs chosen at accept time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_a_restart() {
    let w = World::new().await;
    w.smtp.fail_next(451, "Try again later", 1000).await;
    let sm = w.mailer().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            sm.accept(&json!({"kind": "test", "to": ["x@example.com"], "subject": format!("Survivor {i}"),
                "attachments": [{"filename": "f.bin", "content_type": "application/octet-stream", "content_base64": b64(&[i, 0, 255])}]}))
                .await,
        );
    }
    let mut message_ids = Vec::new();
    for id in &ids {
        // tried and failed at least once
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = sm.message(id).await;
            if m["attempts"].as_i64().unwrap() >= 1 {
                assert!(m["status"] == "queued" || m["status"] == "sending", "{m}");
                message_ids.push(m["message_id"].as_str().unwrap().to_owned());
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{m}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // one site mailer per data dir
    let Err(e) = Application::build(Config::from_sources(None, &w.env()).unwrap()).await else {
        panic!("a second site mailer started on the same data dir");
    };
    assert!(format!("{e:#}").contains("in use"), "{e:#}");
    sm.stop().await;

    // as if the process had died in the middle of sending the first one
    let db = sea_orm::Database::connect(format!(
        "sqlite://{}?mode=rw",
        w.data_dir.join("site-mailer.db").display()
    ))
    .await
    .unwrap();
    use sea_orm::ConnectionTrait as _;
    db.execute_unprepared(&format!(
        "UPDATE messages SET status = 'sending' WHERE id = '{}'",
        ids[0]
    ))
    .await
    .unwrap();
    db.close().await.unwrap();

    w.smtp.reset().await;
    let sm = w.mailer().await;
    for id in &ids {
        sm.wait_for(id, "sent").await;
    }
    let got = delivered(&w.smtp, 3).await;
    let mut seen: Vec<String> = got
        .iter()
        .map(|m| header(&m.data, "Message-ID").unwrap())
        .collect();
    seen.sort();
    message_ids.sort();
    assert_eq!(seen, message_ids, "the Message-IDs of accept time");
    for (i, id) in ids.iter().enumerate() {
        let m = got
            .iter()
            .find(|m| header(&m.data, "Subject").unwrap() == format!("Survivor {i}"))
            .unwrap();
        assert_eq!(attachment_bytes(&m.data, "f.bin"), [i as u8, 0, 255]);
        wait_removed(&outbox_dir(&w.data_dir, id)).await;
    }
    sm.stop().await;
}

/// With the Management Service gone after the first configuration fetch, the site mailer
/// keeps delivering with the stored configuration, also after its own restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_down_uses_the_stored_configuration() {
    let w = World::new().await;
    let sm = w.mailer_with(&[("POSTWIRE_CONFIG_REFRESH", "200ms")]).await;
    let first = sm.accept(&simple("test", "Before")).await;
    sm.wait_for(&first, "sent").await;

    // the Management Service goes away
    let World {
        mgmt,
        smtp,
        site_id,
        secret,
        data_dir,
        _cleanup,
    } = w;
    let mgmt_address = mgmt.address.clone();
    drop(mgmt);
    let http = peer_http_client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while http
        .get(format!("{mgmt_address}/healthz"))
        .send()
        .await
        .is_ok()
    {
        assert!(tokio::time::Instant::now() < deadline, "still answering");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // a few failed refreshes
    let during = sm.accept(&simple("test", "During")).await;
    sm.wait_for(&during, "sent").await;
    let ready = sm
        .request(reqwest::Method::GET, "/readyz", None, None, None)
        .await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert!(
        ready.json()["management_error"].is_string(),
        "{}",
        ready.text
    );
    sm.stop().await;

    // restart without the Management Service: the stored configuration serves
    let mut env = BTreeMap::new();
    for (k, v) in [
        ("POSTWIRE_LISTEN", "127.0.0.1:0"),
        ("POSTWIRE_MANAGEMENT_URL", mgmt_address.as_str()),
        ("POSTWIRE_SITE_ID", site_id.as_str()),
        ("POSTWIRE_SITE_SECRET", secret.as_str()),
        ("POSTWIRE_API_KEY", API_KEY),
        ("POSTWIRE_CONNECT_TIMEOUT", "1s"),
    ] {
        env.insert(k.to_owned(), v.to_owned());
    }
    env.insert(
        "POSTWIRE_DATA_DIR".into(),
        data_dir.to_string_lossy().into_owned(),
    );
    env.insert(
        "POSTWIRE_EXTRA_CA_FILE".into(),
        smtp.cert_pem_path().to_string_lossy().into_owned(),
    );
    let sm = SiteMailer::start(env).await;
    let after = sm.accept(&simple("test", "After restart")).await;
    sm.wait_for(&after, "sent").await;
    assert_eq!(delivered(&smtp, 3).await.len(), 3);
    sm.stop().await;
}

/// A settings change at the Management Service (another SMTP server) is picked up by the
/// periodic fetch without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_change_is_picked_up() {
    let w = World::new().await;
    let sm = w.mailer_with(&[("POSTWIRE_CONFIG_REFRESH", "200ms")]).await;
    let first = sm.accept(&simple("test", "To the first server")).await;
    sm.wait_for(&first, "sent").await;

    // another server (plain text, on the LAN as it were) and another scan sender
    let plain = SmtpPeer::start(SmtpPeerOptions {
        tls: postwire_tests::peers::SmtpTls::None,
        ..SmtpPeerOptions::default().with_user(USER, PASSWORD)
    })
    .await;
    let mut s = settings(&w.smtp);
    s["server"] = json!({"host": "127.0.0.1", "port": plain.port(), "encryption": "none"});
    s["feature_senders"]["scan_to_email"] = json!("reports@acme.example");
    w.put_settings(&s).await;

    // A liveness wait (the fetch runs every 200 ms): generous, as the whole suite shares two
    // cores.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let id = sm
            .accept(&simple("scan_to_email", "After the change"))
            .await;
        sm.wait_for(&id, "sent").await;
        let got = plain.messages().await;
        assert!(got.iter().all(|d| !d.tls));
        // A message accepted just before the change keeps the sender chosen then
        // (scanner@), and may still go to the new server.
        if got
            .iter()
            .any(|d| d.from.as_deref() == Some("reports@acme.example"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new configuration was never used"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sm.stop().await;
}

/// Before any configuration is known the site mailer is not ready and refuses with 503 (it
/// cannot apply the addressing rules); once the tenant configures email it accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_configuration_yet_is_503() {
    let w = World::with_settings(false).await;
    let sm = w.mailer_with(&[("POSTWIRE_CONFIG_REFRESH", "200ms")]).await;
    let r = sm.post(&simple("test", "Too early")).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(r.headers.contains_key("retry-after"));
    let ready = sm
        .request(reqwest::Method::GET, "/readyz", None, None, None)
        .await;
    assert_eq!(ready.status, 503, "{}", ready.text);

    w.put_settings(&settings(&w.smtp)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let id = loop {
        let r = sm.post(&simple("test", "Now")).await;
        if r.status == 202 {
            break r.json()["id"].as_str().unwrap().to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", r.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    sm.wait_for(&id, "sent").await;
    sm.stop().await;
}

// ------------------------------------------------------------------------------------------
// OAuth 2.0

const OAUTH_USER: &str = "sender@acme.example";

/// Microsoft 365 with OAuth 2.0, its URLs pointed at the OAuth peer, authorized like the
/// popup would; an SMTP peer that verifies XOAUTH2 tokens against the OAuth peer's keys; a
/// site and the site mailer's environment for it.
struct OAuthWorld {
    oauth: OAuthPeer,
    smtp: SmtpPeer,
    mgmt: TestApp,
    env: BTreeMap<String, String>,
    data_dir: PathBuf,
    _cleanup: RemoveOnDrop,
}

impl OAuthWorld {
    async fn new() -> OAuthWorld {
        Self::with_token_lifetime(3600).await
    }

    /// The provider issues access tokens valid for `expires_in` seconds.
    async fn with_token_lifetime(expires_in: i64) -> OAuthWorld {
        let oauth = OAuthPeer::start_with(OAuthPeerOptions {
            username: Some(OAUTH_USER.into()),
            expires_in: Some(expires_in),
            audience: None,
        })
        .await;
        let smtp = SmtpPeer::start(SmtpPeerOptions::default().trusting(&oauth)).await;
        let mgmt = TestApp::spawn(Backend::Sqlite).await;
        mgmt.create_tenant("acme").await;
        let t = mgmt.admin_token("acme");
        let r = mgmt
            .put(
                "/api/v1/tenants/acme/email-settings",
                &t,
                &json!({
                    "provider": "microsoft365",
                    "server": {"host": "localhost", "port": smtp.port(), "encryption": "starttls"},
                    "auth": {
                        "method": "oauth2",
                        "client_id": "postwire-client",
                        "client_secret": "client-secret-value",
                        "authorization_url": oauth.authorize_url(),
                        "token_url": oauth.token_url(),
                        "issuer": oauth.issuer(),
                        "scopes": ["openid", "profile", "email", "offline_access"]
                    },
                    "senders": [
                        {"address": "scanner@acme.example", "default": true},
                        {"address": OAUTH_USER}
                    ],
                    "feature_senders": {"report": OAUTH_USER}
                }),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        authorize(&mgmt).await;
        let site = mgmt
            .post("/api/v1/tenants/acme/sites", &t, &json!({"name": "HQ"}))
            .await
            .json();

        let data_dir =
            std::env::temp_dir().join(format!("site-mailer-test-{}", uuid::Uuid::new_v4()));
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("POSTWIRE_LISTEN", "127.0.0.1:0"),
            ("POSTWIRE_MANAGEMENT_URL", mgmt.address.as_str()),
            ("POSTWIRE_SITE_ID", site["site_id"].as_str().unwrap()),
            ("POSTWIRE_SITE_SECRET", site["secret"].as_str().unwrap()),
            ("POSTWIRE_API_KEY", API_KEY),
            ("POSTWIRE_RETRY_INITIAL", "100ms"),
            ("POSTWIRE_CONNECT_TIMEOUT", "1s"),
        ] {
            env.insert(k.to_owned(), v.to_owned());
        }
        env.insert(
            "POSTWIRE_DATA_DIR".into(),
            data_dir.to_string_lossy().into_owned(),
        );
        env.insert(
            "POSTWIRE_EXTRA_CA_FILE".into(),
            smtp.cert_pem_path().to_string_lossy().into_owned(),
        );
        OAuthWorld {
            oauth,
            smtp,
            mgmt,
            env,
            _cleanup: RemoveOnDrop(data_dir.clone()),
            data_dir,
        }
    }

    /// The tenant admin authorizes (again), like the popup would.
    async fn authorize(&self) {
        authorize(&self.mgmt).await;
    }

    /// The environment of a site mailer for another site of the same tenant (its own site
    /// credentials and data dir, removed when the guard drops).
    async fn another_site(&self) -> (BTreeMap<String, String>, RemoveOnDrop) {
        let site = self
            .mgmt
            .post(
                "/api/v1/tenants/acme/sites",
                &self.mgmt.admin_token("acme"),
                &json!({"name": "Branch"}),
            )
            .await;
        assert_eq!(site.status, 201, "{}", site.text);
        let site = site.json();
        let data_dir =
            std::env::temp_dir().join(format!("site-mailer-test-{}", uuid::Uuid::new_v4()));
        let mut env = self.env.clone();
        env.insert(
            "POSTWIRE_SITE_ID".into(),
            site["site_id"].as_str().unwrap().to_owned(),
        );
        env.insert(
            "POSTWIRE_SITE_SECRET".into(),
            site["secret"].as_str().unwrap().to_owned(),
        );
        env.insert(
            "POSTWIRE_DATA_DIR".into(),
            data_dir.to_string_lossy().into_owned(),
        );
        (env, RemoveOnDrop(data_dir))
    }
}

/// The tenant admin's authorization of tenant `acme` through the OAuth peer, like the popup:
/// start, the provider's redirect, the callback page.
async fn authorize(mgmt: &TestApp) {
    let t = mgmt.admin_token("acme");
    let r = mgmt
        .request(
            "POST",
            "/api/v1/tenants/acme/email-settings/oauth/authorize",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let url = r.json()["authorization_url"].as_str().unwrap().to_owned();
    let resp = peer_http_client().get(&url).send().await.unwrap();
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let cb = location.replacen("https://postwire.test", "", 1);
    let page = mgmt.request("GET", &cb, None, None).await;
    assert_eq!(page.status, 200, "{}", page.text);
}

/// Only the authorized user may send (Microsoft 365); the message goes out with XOAUTH2 and
/// a token from the Management Service; the token is refreshed preemptively; with the
/// Management Service gone the token kept in the local state still sends after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_delivery_and_sender_rule() {
    let OAuthWorld {
        oauth,
        smtp,
        mgmt,
        mut env,
        data_dir: _,
        _cleanup,
    } = OAuthWorld::new().await;
    env.insert("POSTWIRE_TOKEN_REFRESH".into(), "1s".into());
    let sm = SiteMailer::start(env.clone()).await;

    // the default sender is not the authorized user: refused at accept time
    let r = sm.post(&simple("test", "From the default")).await;
    assert_eq!(r.fields(), ["from"], "{}", r.text);
    let r = sm
        .post(&json!({"kind": "test", "from": "scanner@acme.example", "to": ["x@example.com"], "subject": "s"}))
        .await;
    assert_eq!(r.fields(), ["from"]);
    // the report's sender is the authorized user
    let id = sm.accept(&simple("report", "OAuth report")).await;
    sm.wait_for(&id, "sent").await;
    let got = delivered(&smtp, 1).await;
    assert_eq!(got[0].auth_method.as_deref(), Some("XOAUTH2"));
    assert_eq!(got[0].auth_user.as_deref(), Some(OAUTH_USER));
    assert_eq!(got[0].from.as_deref(), Some(OAUTH_USER));
    // the first token came from the Management Service, just now
    assert_eq!(sm.token_source("management").await, 1.0);
    assert_eq!(sm.token_source("memory").await, 0.0);
    let age = sm
        .metric("postwire_site_token_refresh_age_seconds", None)
        .await;
    assert!((0.0..10.0).contains(&age), "{age}");
    let id = sm
        .accept(&json!({"kind": "test", "from": OAUTH_USER, "to": ["x@example.com"], "subject": "explicit"}))
        .await;
    sm.wait_for(&id, "sent").await;
    assert_eq!(
        sm.token_source("memory").await,
        1.0,
        "the second from memory"
    );
    assert_eq!(sm.token_source("management").await, 1.0);
    let token_calls = oauth.token_calls().await.refresh_token;

    // the preemptive refresh (POSTWIRE_TOKEN_REFRESH=1s here) gets new tokens
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while oauth.token_calls().await.refresh_token <= token_calls {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no preemptive refresh"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sm.stop().await;

    // the Management Service goes away: the token kept in the local state still sends,
    // also after a restart of the site mailer
    let address = mgmt.address.clone();
    drop(mgmt);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while peer_http_client()
        .get(format!("{address}/healthz"))
        .send()
        .await
        .is_ok()
    {
        assert!(tokio::time::Instant::now() < deadline, "still answering");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sm = SiteMailer::start(env).await;
    let id = sm.accept(&simple("report", "Offline report")).await;
    sm.wait_for(&id, "sent").await;
    let got = delivered(&smtp, 3).await;
    assert_eq!(got[2].auth_method.as_deref(), Some("XOAUTH2"));
    assert_eq!(sm.token_source("local").await, 1.0, "from the local state");
    assert_eq!(sm.token_source("management").await, 0.0);
    sm.stop().await;
}

/// A token the SMTP server rejects (here: a stored token the provider no longer honours) is
/// dropped and a fresh one is fetched and tried once, in the same attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_rejected_token_is_replaced_once() {
    let w = OAuthWorld::new().await;
    let sm = SiteMailer::start(w.env.clone()).await;
    let id = sm.accept(&simple("report", "First")).await;
    sm.wait_for(&id, "sent").await;
    sm.stop().await;

    // the locally stored token turns bad (revoked, say) while it has time left
    let key = "smtp_access_token:acme";
    let mut token: Value =
        serde_json::from_str(&read_state(&w.data_dir, &w.env, key).await).unwrap();
    token["access_token"] = json!("not-a-valid-token");
    write_state(&w.data_dir, &w.env, key, &token.to_string()).await;

    let before = w.oauth.token_calls().await.refresh_token;
    let sm = SiteMailer::start(w.env.clone()).await;
    let id = sm.accept(&simple("report", "Second")).await;
    let m = sm.wait_for(&id, "sent").await;
    assert_eq!(m["attempts"], 1, "{m}");
    let auths = w.smtp.auth_attempts().await;
    let last: Vec<bool> = auths.iter().rev().take(2).map(|a| a.ok).collect();
    assert_eq!(
        last,
        [true, false],
        "one rejection, then the fresh token: {auths:?}"
    );
    assert!(
        w.oauth.token_calls().await.refresh_token > before,
        "the Management Service refreshed the token at the provider"
    );
    assert_eq!(delivered(&w.smtp, 2).await.len(), 2);
    sm.stop().await;
    drop(w.mgmt);
}

/// The refresh token revoked at the provider: the site keeps sending with its access token
/// while it lasts; then the Management Service's refresh gets `invalid_grant`, the grant
/// shows `reauthorization_required` and new messages wait with that reason (queued, no
/// attempt counted, not failed; each looks again after 10 s and the Management Service is
/// asked about once per 10 s rather than once per message); once the tenant admin authorizes
/// again they go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_grant_holds_messages_until_reauthorized() {
    // 8 s tokens: the site uses one while it has more than 2 s left
    let w = OAuthWorld::with_token_lifetime(8).await;
    let sm = SiteMailer::start(w.env.clone()).await;
    let id = sm.accept(&simple("report", "Before")).await;
    sm.wait_for(&id, "sent").await;

    assert!(w.oauth.revoke_all().await >= 1);
    // the token the site holds still works (the provider does not revoke access tokens)
    let id = sm.accept(&simple("report", "Still valid")).await;
    let m = sm.wait_for(&id, "sent").await;
    assert_eq!(m["attempts"], 1, "{m}");

    // once it runs out, the refresh is refused
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(sm.accept(&simple("report", &format!("Held {i}"))).await);
    }
    let auth_before = w.smtp.auth_attempts().await.len();
    for id in &ids {
        let m = wait_reason(&sm, id, "reauthorization_required").await;
        assert_eq!(m["reason"], "reauthorization_required", "{m}");
        assert_eq!(m["attempts"], 0, "not offered to the server: {m}");
        let err = m["last_error"].as_str().unwrap_or_default();
        assert!(
            err.contains("invalid_grant") && err.contains("authorize OAuth 2.0 again"),
            "{m}"
        );
    }
    let t = w.mgmt.admin_token("acme");
    let settings = w.mgmt.get("/api/v1/tenants/acme/email-settings", &t).await;
    assert_eq!(
        settings.json()["oauth"]["status"],
        "reauthorization_required",
        "{}",
        settings.text
    );
    // the problem type the site mailer tells the refusals apart by
    let site_token = w.mgmt.token(
        management::auth::Role::Site,
        Some("acme"),
        Some(w.env["POSTWIRE_SITE_ID"].as_str()),
    );
    let r = w
        .mgmt
        .get("/api/v1/site/smtp-access-token", &site_token)
        .await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(
        r.json()["type"],
        "urn:postwire:problem:reauthorization-required"
    );
    // held for a while (with the 100 ms retry here the 20 messages would look again every
    // 50-100 ms, but a wait for the tenant admin lasts 10 s): still queued, never
    // offered to the SMTP server, not failed, and the Management Service is asked at most
    // once more (the refusal is remembered for 10 s)
    let refusals = || async {
        let r = w.mgmt.request("GET", "/metrics", None, None).await;
        r.text
            .lines()
            .filter(|l| {
                l.starts_with("postwire_http_requests_total{")
                    && l.contains("route=\"/api/v1/site/smtp-access-token\"")
                    && l.contains("status=\"409\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>()
    };
    let refused_before = refusals().await;
    assert!(refused_before >= 2.0, "{refused_before}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in &ids {
        let m = sm.message(id).await;
        assert_eq!(m["status"], "queued", "{m}");
        assert_eq!(m["reason"], "reauthorization_required", "{m}");
    }
    assert!(refusals().await <= refused_before + 1.0);
    assert_eq!(w.smtp.auth_attempts().await.len(), auth_before);
    let text = sm.metrics().await;
    let failed = metric_value(&text, "postwire_site_sends_total{result=\"failed\"}");
    assert!(failed.is_none_or(|v| v == 0.0), "{text}");
    let postponed = metric_value(&text, "postwire_site_sends_total{result=\"postponed\"}");
    assert!(postponed.is_some_and(|v| v >= 20.0), "{text}");

    // the tenant admin authorizes again: every held message goes out
    w.authorize().await;
    for id in &ids {
        let m = sm.wait_for(id, "sent").await;
        assert_eq!(m["attempts"], 1, "{m}");
    }
    assert_eq!(delivered(&w.smtp, 22).await.len(), 22);
    sm.stop().await;
}

/// With `REDIS_URL` the site shares the tenant's token in Redis, encrypted with the tenant's
/// key from its configuration (never in plain text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_is_shared_in_redis() {
    let w = OAuthWorld::new().await;
    let redis = postwire_tests::PrivateRedis::start().await;
    let mut env = w.env.clone();
    env.insert("REDIS_URL".into(), redis.url());
    let sm = SiteMailer::start(env).await;
    let id = sm.accept(&simple("report", "Shared")).await;
    sm.wait_for(&id, "sent").await;
    let value = redis
        .get(&mail_core::token_cache::redis_key("acme"))
        .await
        .expect("the token is in Redis");
    let stored: Value =
        serde_json::from_str(&read_state(&w.data_dir, &w.env, "smtp_access_token:acme").await)
            .unwrap();
    let token = stored["access_token"].as_str().unwrap();
    assert!(
        !String::from_utf8_lossy(&value).contains(token),
        "encrypted in Redis"
    );
    let files = state_files_text(&w.data_dir);
    assert!(!files.contains(token), "encrypted in the local state too");
    sm.stop().await;
    drop(w.mgmt);
}

/// Two site mailers of one tenant (two sites) share one Redis: the second finds the token
/// the first fetched in Redis and never asks the Management Service (counted by its
/// `/metrics`); the provider is not asked again either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_site_mailer_takes_the_token_from_redis() {
    let w = OAuthWorld::new().await;
    let redis = postwire_tests::PrivateRedis::start().await;
    let mut env = w.env.clone();
    env.insert("REDIS_URL".into(), redis.url());
    let first = SiteMailer::start(env).await;
    let id = first.accept(&simple("report", "From the first")).await;
    first.wait_for(&id, "sent").await;
    assert_eq!(first.token_source("management").await, 1.0);
    assert_eq!(first.token_source("redis").await, 0.0);
    assert!(
        redis
            .get(&mail_core::token_cache::redis_key("acme"))
            .await
            .is_some(),
        "shared in Redis"
    );
    let provider_calls = w.oauth.token_calls().await.total;

    let (mut env, _dir) = w.another_site().await;
    env.insert("REDIS_URL".into(), redis.url());
    let second = SiteMailer::start(env).await;
    for n in 0..2 {
        let id = second
            .accept(&simple("report", &format!("From the second {n}")))
            .await;
        second.wait_for(&id, "sent").await;
    }
    assert_eq!(second.token_source("redis").await, 1.0, "found in Redis");
    assert_eq!(
        second.token_source("memory").await,
        1.0,
        "then kept in memory"
    );
    assert_eq!(
        second.token_source("management").await,
        0.0,
        "the Management Service was not asked"
    );
    assert_eq!(
        second
            .metric("postwire_site_token_refresh_age_seconds", None)
            .await,
        -1.0,
        "the second never fetched a token"
    );
    assert_eq!(w.oauth.token_calls().await.total, provider_calls);
    let got = delivered(&w.smtp, 3).await;
    assert!(
        got.iter()
            .all(|m| m.auth_method.as_deref() == Some("XOAUTH2"))
    );
    first.stop().await;
    second.stop().await;
}

/// Redis stops (the test's private one): a running site mailer goes on with its token, a
/// restarted one with the token of its local state, and a new one (no local state) with a
/// token from the Management Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_sending_goes_on() {
    let w = OAuthWorld::new().await;
    let redis = postwire_tests::PrivateRedis::start().await;
    let redis_url = redis.url();
    let mut env = w.env.clone();
    env.insert("REDIS_URL".into(), redis_url.clone());
    let sm = SiteMailer::start(env.clone()).await;
    let id = sm.accept(&simple("report", "With Redis")).await;
    sm.wait_for(&id, "sent").await;
    drop(redis);

    let id = sm.accept(&simple("report", "Redis gone")).await;
    sm.wait_for(&id, "sent").await;
    assert_eq!(sm.token_source("memory").await, 1.0);
    sm.stop().await;

    // restarted: memory is empty, Redis does not answer, the local state has the token
    let sm = SiteMailer::start(env).await;
    let id = sm.accept(&simple("report", "Restarted")).await;
    sm.wait_for(&id, "sent").await;
    assert_eq!(sm.token_source("local").await, 1.0);
    assert_eq!(sm.token_source("redis").await, 0.0);
    sm.stop().await;

    // a new site mailer (another site, no local state): from the Management Service
    let (mut env, _dir) = w.another_site().await;
    env.insert("REDIS_URL".into(), redis_url);
    let sm = SiteMailer::start(env).await;
    let id = sm.accept(&simple("report", "New site")).await;
    sm.wait_for(&id, "sent").await;
    assert_eq!(sm.token_source("management").await, 1.0);
    assert_eq!(sm.token_source("redis").await, 0.0);
    assert_eq!(delivered(&w.smtp, 4).await.len(), 4);
    sm.stop().await;
}

/// Stops a Management Service and waits until its port no longer answers; returns what it
/// takes to start it again on the same address with the same data.
async fn stop_management(mgmt: TestApp) -> (postwire_tests::Setup, String) {
    let address = mgmt.address.clone();
    let mut setup = mgmt.setup.clone();
    setup.env.insert(
        "POSTWIRE_LISTEN".into(),
        address.trim_start_matches("http://").to_owned(),
    );
    drop(mgmt);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while peer_http_client()
        .get(format!("{address}/healthz"))
        .send()
        .await
        .is_ok()
    {
        assert!(tokio::time::Instant::now() < deadline, "still answering");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (setup, address)
}

/// Starts the Management Service again on its old address (the port may take a moment).
async fn restart_management(setup: &postwire_tests::Setup) -> TestApp {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match setup
            .try_spawn(std::sync::Arc::new(management::clock::SystemClock))
            .await
        {
            Ok(app) => return app,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot restart the Management Service: {e:#}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Until the message is sent, or queued waiting for an access token; returns it.
async fn sent_or_held(sm: &SiteMailer, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = sm.message(id).await;
        if m["status"] == "sent" || m["reason"] == "waiting for access token" {
            return m;
        }
        assert_ne!(m["status"], "failed", "{m}");
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The seed's promise with short lifetimes: tokens live 60 s, the site refreshes every 20 s.
/// The Management Service stops right after a refresh; the site goes on sending with the
/// token it has until the token is nearly expired (a quarter of its lifetime left), then
/// holds messages queued with `reason: "waiting for access token"` (not failed, not
/// attempted), and delivers them once the Management Service is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_outage_holds_messages_until_it_returns() {
    let OAuthWorld {
        oauth,
        smtp,
        mgmt,
        mut env,
        data_dir: _,
        _cleanup,
    } = OAuthWorld::with_token_lifetime(60).await;
    for (k, v) in [
        ("POSTWIRE_TOKEN_REFRESH", "20s"),
        ("POSTWIRE_RETRY_INITIAL", "1s"),
        ("POSTWIRE_RETRY_MAX_DELAY", "1s"),
    ] {
        env.insert(k.into(), v.into());
    }
    let sm = SiteMailer::start(env).await;
    let id = sm.accept(&simple("report", "Before")).await;
    sm.wait_for(&id, "sent").await;

    // a preemptive refresh (~20 s after start) gets a fresh 60 s token; then the outage
    let calls = oauth.token_calls().await.refresh_token;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while oauth.token_calls().await.refresh_token <= calls {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no preemptive refresh"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The provider has answered the Management Service; wait until the site has the fresh
    // token too (its refresh age drops to ~0), or the outage could cut the answer off and
    // leave the site with the previous, 20 s older token.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while sm
        .metric("postwire_site_token_refresh_age_seconds", None)
        .await
        > 2.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the site never received the refreshed token"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refreshed = tokio::time::Instant::now();
    let (setup, _) = stop_management(mgmt).await;

    // sending goes on with the cached token, one message a second, until it is held
    let mut ids = vec![id];
    let held = loop {
        let id = sm
            .accept(&simple("report", &format!("During {}", ids.len())))
            .await;
        ids.push(id.clone());
        let m = sent_or_held(&sm, &id).await;
        if m["status"] == "queued" {
            break m;
        }
        assert!(
            refreshed.elapsed() < Duration::from_secs(70),
            "still sending long after the token expired"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let held_after = refreshed.elapsed();
    assert!(
        held_after >= Duration::from_secs(35),
        "held {held_after:?} after the refresh: sending must go on until the token nearly expires"
    );
    assert_eq!(
        held["attempts"], 0,
        "not offered to the SMTP server: {held}"
    );
    assert!(
        held["last_error"]
            .as_str()
            .unwrap()
            .contains("Management Service"),
        "{held}"
    );
    let sent_during = ids.len() - 2; // minus "Before" and the held one
    assert!(
        sent_during >= 30,
        "only {sent_during} sent during the outage"
    );
    assert_eq!(delivered(&smtp, ids.len() - 1).await.len(), ids.len() - 1);
    // more messages are accepted meanwhile, and wait too
    let waiting = sm.accept(&simple("report", "Also waiting")).await;
    ids.push(waiting.clone());
    assert_eq!(
        sent_or_held(&sm, &waiting).await["reason"],
        "waiting for access token"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held_id = held["id"].as_str().unwrap();
    let m = sm.message(held_id).await;
    assert_eq!(
        (m["status"].as_str(), m["attempts"].as_i64()),
        (Some("queued"), Some(0)),
        "still waiting, not failed: {m}"
    );
    assert!(sm.sends("postponed").await >= 2.0);
    assert_eq!(
        smtp.messages().await.len(),
        ids.len() - 2,
        "nothing held was sent"
    );

    // the Management Service returns: everything held is delivered
    let _mgmt = restart_management(&setup).await;
    for id in &ids {
        let m = sm.wait_for(id, "sent").await;
        assert!(m.get("reason").is_none(), "{m}");
    }
    assert_eq!(delivered(&smtp, ids.len()).await.len(), ids.len());
    let age = sm
        .metric("postwire_site_token_refresh_age_seconds", None)
        .await;
    assert!(age < 10.0, "a fresh token after the outage: {age}");
    sm.stop().await;
}

/// Posts `n` messages with `parallel` concurrent clients; returns the ids (all 202).
async fn accept_many(sm: &SiteMailer, prefix: &str, n: usize, parallel: usize) -> Vec<String> {
    let mut set = tokio::task::JoinSet::new();
    for worker in 0..parallel {
        let client = sm.client.clone();
        let url = format!("{}/v1/messages", sm.address);
        let prefix = prefix.to_owned();
        set.spawn(async move {
            let mut ids = Vec::new();
            for i in (worker..n).step_by(parallel) {
                let r = client
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .json(&simple("test", &format!("{prefix} {i}")))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let text = r.text().await.unwrap();
                assert_eq!(status, 202, "{text}");
                let v: Value = serde_json::from_str(&text).unwrap();
                ids.push(v["id"].as_str().unwrap().to_owned());
            }
            ids
        });
    }
    set.join_all().await.into_iter().flatten().collect()
}

/// Sends a signal to a process (`kill -STOP`, `kill -CONT`).
fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// While a message is being delivered (the SMTP peer frozen mid-session) and nothing else is
/// due, the site mailer sits idle: its worker once claimed and looked for the next due
/// message over and over, because the message in flight is `queued` in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_while_a_delivery_waits() {
    let w = World::new().await;
    let mut sm = w.process_with(LONG_TIMEOUTS).await;
    let smtp_pid = w.smtp.pid().unwrap();
    signal(smtp_pid, "-STOP");
    let id = sm
        .accept(&json!({"kind": "test", "to": ["idle@example.com"], "subject": "Waits"}))
        .await;
    sm.wait_for(&id, "sending").await;
    let pid = sm.process().pid();
    let before = postwire_tests::site_mailer_process::cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = postwire_tests::site_mailer_process::cpu_secs(pid) - before;
    signal(smtp_pid, "-CONT");
    assert!(
        used < 0.5,
        "the site mailer used {used:.2} s of CPU in 2 s while one delivery waited"
    );
    assert_eq!(sm.message(&id).await["status"], "sending");
    sm.wait_for(&id, "sent").await;
}

/// Send and connect timeouts that outlast a frozen SMTP peer in the tests below.
const LONG_TIMEOUTS: &[(&str, &str)] = &[
    ("POSTWIRE_SEND_TIMEOUT", "30s"),
    ("POSTWIRE_CONNECT_TIMEOUT", "30s"),
];

/// kill -9 of the real `site-mailer` process with 500 accepted messages in flight: some
/// delivered, some in the middle of an SMTP transaction (the SMTP peer is frozen with
/// SIGSTOP so deliveries hang), the rest queued. After a restart every one of the 500 is
/// delivered, each Message-ID at least once, none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_500_messages_in_flight_loses_none() {
    let w = World::new().await;
    let extra = [LONG_TIMEOUTS, &[("POSTWIRE_SEND_CONCURRENCY", "8")]].concat();
    let mut sm = w.process_with(&extra).await;

    let mut ids = accept_many(&sm, "Before the freeze", 250, 10).await;
    let delivered_before = delivered(&w.smtp, 20).await.len();
    let smtp_pid = w.smtp.pid().unwrap();
    signal(smtp_pid, "-STOP");
    ids.extend(accept_many(&sm, "While frozen", 250, 10).await);
    assert_eq!(ids.len(), 500);
    // deliveries hang in the frozen SMTP session
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sm.outbox("sending").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing is being sent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sending = sm.outbox("sending").await;
    let queued = sm.outbox("queued").await;
    let sent = sm.outbox("sent").await;
    assert!(
        sent < 500.0 && queued > 0.0,
        "in flight: sent {sent}, queued {queued}"
    );
    let pid = sm.process().pid();
    sm.process().kill9();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the process is gone"
    );
    signal(smtp_pid, "-CONT");
    eprintln!(
        "killed with {sent} sent, {sending} sending, {queued} queued \
         ({delivered_before}+ delivered before the freeze)"
    );

    let sm = w.process_with(&extra).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while sm.outbox("sent").await < 500.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 500 sent after the restart",
            sm.outbox("sent").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(sm.outbox("queued").await + sm.outbox("sending").await, 0.0);
    assert_eq!(sm.outbox("failed").await, 0.0);
    let mut expected = std::collections::BTreeSet::new();
    for id in &ids {
        let m = sm.message(id).await;
        assert_eq!(m["status"], "sent", "{m}");
        expected.insert(m["message_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(expected.len(), 500, "500 distinct Message-IDs");
    let got = w.smtp.messages().await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in &got {
        *seen
            .entry(header(&m.data, "Message-ID").unwrap_or_default())
            .or_default() += 1;
    }
    let missing: Vec<&String> = expected
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    let duplicates = seen.values().filter(|n| **n > 1).count();
    eprintln!(
        "{} deliveries for 500 messages ({duplicates} delivered twice: at-least-once)",
        got.len()
    );
    assert!(
        seen.keys().all(|k| expected.contains(k)),
        "nothing else arrived"
    );
}

// ------------------------------------------------------------------------------------------
// Multipart

/// One part of a hand-built `multipart/form-data` body.
struct Part<'a> {
    name: &'a str,
    filename: Option<&'a str>,
    content_type: Option<&'a str>,
    body: &'a [u8],
}

const BOUNDARY: &str = "postwire-test-boundary-7MA4YWxkTrZu0gW";

fn multipart_body(parts: &[Part<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{}\"", p.name);
        if let Some(f) = p.filename {
            disposition.push_str(&format!("; filename=\"{f}\""));
        }
        out.extend_from_slice(disposition.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(ct) = p.content_type {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(p.body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

impl SiteMailer {
    async fn post_multipart(&self, body: Vec<u8>, idempotency_key: Option<&str>) -> Resp {
        let mut rb = self
            .client
            .post(format!("{}/v1/messages", self.address))
            .bearer_auth(API_KEY)
            .header(
                "Content-Type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body);
        if let Some(k) = idempotency_key {
            rb = rb.header("Idempotency-Key", k);
        }
        let r = rb.send().await.expect("request to the site mailer");
        Resp {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            text: r.text().await.expect("body"),
        }
    }
}

/// Multipart `POST /v1/messages`: a `message` JSON part and file parts (after the inline
/// attachments, in order) arrive byte for byte with their names and types; the files are on
/// disk at once and removed after delivery; the same `Idempotency-Key` and body give the same
/// message; malformed requests are refused with the part named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_message_with_file_parts() {
    let w = World::new().await;
    let sm = w.mailer().await;
    let mut scan: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    scan.extend_from_slice(b"\r\n.\r\n--postwire-test-boundary\r\n\0\xff");
    let csv = b"id,value\n1,2\n".to_vec();
    let message = json!({"kind": "scan_to_email", "to": ["alice@example.com"],
        "subject": "Multipart scan", "text": "Attached.\n",
        "attachments": [{"filename": "inline.txt", "content_type": "text/plain", "content_base64": b64(b"inline")}]})
    .to_string();
    let body = multipart_body(&[
        Part {
            name: "message",
            filename: None,
            content_type: Some("application/json"),
            body: message.as_bytes(),
        },
        Part {
            name: "file",
            filename: Some("scan.pdf"),
            content_type: Some("application/pdf"),
            body: &scan,
        },
        Part {
            name: "file",
            filename: Some("data.csv"),
            content_type: None,
            body: &csv,
        },
    ]);
    let r = sm.post_multipart(body.clone(), Some("scan-1")).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let again = sm.post_multipart(body, Some("scan-1")).await;
    assert_eq!(again.status, 202, "{}", again.text);
    assert_eq!(
        again.json()["id"],
        id.as_str(),
        "the same key, the same message"
    );

    sm.wait_for(&id, "sent").await;
    let got = delivered(&w.smtp, 1).await;
    assert_eq!(got.len(), 1, "sent once");
    let d = &got[0];
    assert_eq!(attachment_bytes(&d.data, "inline.txt"), b"inline");
    assert_eq!(attachment_bytes(&d.data, "scan.pdf"), scan);
    assert_eq!(attachment_bytes(&d.data, "data.csv"), csv);
    let order: Vec<usize> = ["inline.txt", "scan.pdf", "data.csv"]
        .iter()
        .map(|f| d.data.find(&format!("filename=\"{f}\"")).unwrap())
        .collect();
    assert!(
        order.windows(2).all(|p| p[0] < p[1]),
        "inline first, then the parts in order"
    );
    assert!(d.data.contains("application/pdf"));
    assert!(
        d.data.contains("application/octet-stream"),
        "the default type"
    );
    wait_removed(&outbox_dir(&w.data_dir, &id)).await;

    // refusals name the part; nothing is left on disk
    let json_part = |m: &str| Part {
        name: "message",
        filename: None,
        content_type: Some("application/json"),
        body: m.as_bytes().to_vec().leak(),
    };
    let file_part = Part {
        name: "file",
        filename: Some("a.bin"),
        content_type: None,
        body: b"abc",
    };
    let r = sm
        .post_multipart(multipart_body(&[Part { ..file_part }]), None)
        .await;
    assert_eq!(r.fields(), ["message"], "the message part is missing");
    let simple_json = simple("test", "x").to_string();
    let r = sm
        .post_multipart(
            multipart_body(&[Part { ..file_part }, json_part(&simple_json)]),
            None,
        )
        .await;
    assert_eq!(r.fields(), ["message"], "the message part comes first");
    let r = sm
        .post_multipart(
            multipart_body(&[
                json_part(&simple_json),
                Part {
                    filename: None,
                    ..file_part
                },
            ]),
            None,
        )
        .await;
    assert_eq!(r.fields(), ["attachments[0].filename"]);
    let r = sm
        .post_multipart(
            multipart_body(&[
                json_part(r#"{"kind":"test","subject":"s","to":["bad address"]}"#),
                Part { ..file_part },
            ]),
            None,
        )
        .await;
    assert_eq!(r.fields(), ["to[0]"]);
    let r = sm
        .post_multipart(
            multipart_body(&[
                json_part(&simple_json),
                Part {
                    filename: Some("evil\r\nBcc: x@example.com"),
                    ..file_part
                },
            ]),
            None,
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    let r = sm
        .client
        .post(format!("{}/v1/messages", sm.address))
        .header(
            "Content-Type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(multipart_body(&[json_part(&simple_json)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the key is checked first");
    let left: Vec<_> = std::fs::read_dir(w.data_dir.join("outbox"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "refused requests leave no files: {left:?}");
    sm.stop().await;
}

/// A 25 MB scan posted as multipart to the real binary arrives intact (SHA-256 at the SMTP
/// peer), and the process's peak RSS rises less than 2 × 25 MB over its idle baseline
/// (streamed to disk on accept; on delivery the scan is held once and base64-encoded piece
/// by piece while written: about 1.04× in the release build; building it with lettre as a
/// whole took 2.76×).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_25_mb_scan_arrives_intact_within_memory_bound() {
    const SIZE: usize = 25 * 1000 * 1000;
    let w = World::new().await;
    std::fs::create_dir_all(&w.data_dir).unwrap();
    let log = w.data_dir.join("site-mailer.log");
    let mut sm = SiteMailer::spawn_process(&w.env(), &log).await;

    // warm up (pools, TLS, code paths) with a small message, then the idle baseline
    let id = sm.accept(&simple("test", "Warm-up")).await;
    sm.wait_for(&id, "sent").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (baseline, hwm_before) = sm.process().memory_kib();

    // pseudo-random bytes (incompressible, every byte value)
    let mut scan = vec![0u8; SIZE];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in scan.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    let want = sha256_hex(&scan);
    let message = json!({"kind": "scan_to_email", "to": ["alice@example.com"],
        "subject": "25 MB scan", "text": "Big scan attached.\n"})
    .to_string();
    let body = multipart_body(&[
        Part {
            name: "message",
            filename: None,
            content_type: Some("application/json"),
            body: message.as_bytes(),
        },
        Part {
            name: "file",
            filename: Some("big-scan.pdf"),
            content_type: Some("application/pdf"),
            body: &scan,
        },
    ]);
    drop(scan);
    let r = sm.post_multipart(body, None).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let stored = std::fs::metadata(outbox_dir(&w.data_dir, &id).join("0")).map(|m| m.len());
    assert!(
        stored.as_ref().ok() == Some(&(SIZE as u64)) || sm.message(&id).await["status"] == "sent",
        "streamed to the state directory at accept time: {stored:?}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let m = sm.message(&id).await;
        if m["status"] == "sent" {
            break;
        }
        assert_ne!(m["status"], "failed", "{m}");
        assert!(tokio::time::Instant::now() < deadline, "not sent: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, peak) = sm.process().memory_kib();
    let got = delivered(&w.smtp, 2).await;
    let d = got
        .iter()
        .find(|m| header(&m.data, "Subject").as_deref() == Some("25 MB scan"))
        .expect("the scan at the SMTP peer");
    let bytes = attachment_bytes(&d.data, "big-scan.pdf");
    assert_eq!(bytes.len(), SIZE);
    assert_eq!(sha256_hex(&bytes), want, "intact");

    let increase = peak.saturating_sub(baseline) * 1024;
    let bound = 2 * SIZE as u64;
    eprintln!(
        "RSS idle {} KiB (peak before {} KiB), peak {} KiB: +{:.1} MB for a {} MB scan ({:.2}x); bound {} MB",
        baseline,
        hwm_before,
        peak,
        increase as f64 / 1e6,
        SIZE / 1_000_000,
        increase as f64 / SIZE as f64,
        bound / 1_000_000
    );
    assert!(
        increase < bound,
        "peak RSS rose by {increase} bytes, over 4 x {SIZE}"
    );
    wait_removed(&outbox_dir(&w.data_dir, &id)).await;
}

fn sha256_hex(bytes: &[u8]) -> String {
    mail_core::crypto::sha256(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ------------------------------------------------------------------------------------------
// Local state at rest

fn state_cipher(env: &BTreeMap<String, String>) -> site_mailer::state_crypto::StateCipher {
    site_mailer::state_crypto::StateCipher::from_site_secret(
        &env["POSTWIRE_SITE_ID"],
        &secrecy::SecretString::from(env["POSTWIRE_SITE_SECRET"].clone()),
    )
    .unwrap()
}

async fn state_db(data_dir: &Path) -> sea_orm::DatabaseConnection {
    sea_orm::Database::connect(format!(
        "sqlite://{}?mode=rw",
        data_dir.join("site-mailer.db").display()
    ))
    .await
    .unwrap()
}

/// The raw stored value of local state `key` (the site mailer stopped).
async fn raw_state(data_dir: &Path, key: &str) -> String {
    use sea_orm::ConnectionTrait as _;
    let db = state_db(data_dir).await;
    let row = db
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Sqlite,
            "SELECT value FROM local_state WHERE key = ?",
            [key.into()],
        ))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no local state {key}"));
    let v = row.try_get("", "value").unwrap();
    db.close().await.unwrap();
    v
}

/// The decrypted value of local state `key`.
async fn read_state(data_dir: &Path, env: &BTreeMap<String, String>, key: &str) -> String {
    let raw = raw_state(data_dir, key).await;
    state_cipher(env).open(key, &raw).unwrap()
}

/// Stores `plain` (sealed) as local state `key` (the site mailer stopped).
async fn write_state(data_dir: &Path, env: &BTreeMap<String, String>, key: &str, plain: &str) {
    write_raw_state(data_dir, key, &state_cipher(env).seal(key, plain)).await;
}

async fn write_raw_state(data_dir: &Path, key: &str, raw: &str) {
    use sea_orm::ConnectionTrait as _;
    let db = state_db(data_dir).await;
    let changed = db
        .execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Sqlite,
            "UPDATE local_state SET value = ? WHERE key = ?",
            [raw.into(), key.into()],
        ))
        .await
        .unwrap();
    assert_eq!(changed.rows_affected(), 1, "local state {key} exists");
    db.close().await.unwrap();
}

/// Every byte of the site mailer's SQLite files (database, WAL, shared memory), as text.
fn state_files_text(data_dir: &Path) -> String {
    let mut all = Vec::new();
    for name in ["site-mailer.db", "site-mailer.db-wal", "site-mailer.db-shm"] {
        if let Ok(b) = std::fs::read(data_dir.join(name)) {
            all.extend_from_slice(&b);
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// The SMTP password (in the effective configuration) is not in the state files in plain
/// text: sealed with AES-256-GCM under a key derived from the site secret (opening it with
/// that key gives the configuration back). A plain value an older version stored is sealed
/// at the next start, and no plain copy stays in the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_state_is_encrypted_at_rest() {
    let w = World::new().await;
    let env = w.env();
    let sm = w.mailer().await;
    let id = sm.accept(&simple("test", "Sealed")).await;
    sm.wait_for(&id, "sent").await;
    sm.stop().await;

    let files = state_files_text(&w.data_dir);
    assert!(files.contains("local_state"), "the right files were read");
    assert!(
        !files.contains(PASSWORD),
        "the SMTP password is not in plain text"
    );
    let raw = raw_state(&w.data_dir, "effective_config").await;
    assert!(raw.starts_with("enc:v1:"), "{raw}");
    let plain = read_state(&w.data_dir, &env, "effective_config").await;
    assert!(
        plain.contains(PASSWORD),
        "the sealed value is the configuration"
    );

    // a plain value (as stored before encryption existed) is sealed at the next start
    write_raw_state(&w.data_dir, "effective_config", &plain).await;
    assert!(state_files_text(&w.data_dir).contains(PASSWORD));
    let sm = w.mailer().await;
    let id = sm.accept(&simple("test", "After sealing")).await;
    sm.wait_for(&id, "sent").await;
    sm.stop().await;
    assert!(
        raw_state(&w.data_dir, "effective_config")
            .await
            .starts_with("enc:v1:")
    );
    assert!(
        !state_files_text(&w.data_dir).contains(PASSWORD),
        "no plain copy left in free pages or the WAL"
    );

    // another site secret cannot open it: the configuration is fetched again instead
    let mut other = env.clone();
    other.insert(
        "POSTWIRE_SITE_SECRET".into(),
        "not-the-site-secret-at-all".into(),
    );
    assert!(
        state_cipher(&other)
            .open(
                "effective_config",
                &raw_state(&w.data_dir, "effective_config").await
            )
            .is_err()
    );
}

// ------------------------------------------------------------------------------------------
// Refused by the Management Service

/// Until `/readyz` says sending is held (the Management Service takes up to 5 s to notice a
/// suspension or deletion, the site mailer up to its refresh interval); returns the reason.
async fn wait_held(sm: &SiteMailer) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = sm
            .request(reqwest::Method::GET, "/readyz", None, None, None)
            .await;
        if let Some(r) = ready.json()["sending_held"].as_str() {
            return r.to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", ready.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Until the queued message `id` shows a reason containing `needle`; returns it.
async fn wait_reason(sm: &SiteMailer, id: &str, needle: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = sm.message(id).await;
        if m["status"] == "queued" && m["reason"].as_str().is_some_and(|r| r.contains(needle)) {
            return m;
        }
        assert_ne!(m["status"], "sent", "sent while it should be held: {m}");
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A suspended tenant (403) holds sending: messages are still accepted and stay queued with a
/// visible reason (not attempted, not failed), `/readyz` and `/metrics` say so, and they go
/// out once the tenant is active again. A deleted site (404) holds them the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_tenant_or_deleted_site_holds_messages() {
    let w = World::new().await;
    let sm = w.mailer_with(&[("POSTWIRE_CONFIG_REFRESH", "200ms")]).await;
    let id = sm.accept(&simple("test", "Before")).await;
    sm.wait_for(&id, "sent").await;
    assert_eq!(sm.metric("postwire_site_sending_held", None).await, 0.0);

    let cluster = w.mgmt.cluster_token();
    let set_status = |status: &'static str| {
        let w = &w;
        let cluster = cluster.clone();
        async move {
            let r = w
                .mgmt
                .put(
                    "/api/v1/tenants/acme",
                    &cluster,
                    &json!({"name": "Tenant acme", "admin_emails": ["admin@acme.example"], "status": status}),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
    };
    set_status("suspended").await;
    assert!(wait_held(&sm).await.contains("403"));
    let held = sm.accept(&simple("test", "While suspended")).await;
    let m = wait_reason(&sm, &held, "403").await;
    assert!(m["reason"].as_str().unwrap().contains("suspended"), "{m}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = sm.message(&held).await;
    assert_eq!(
        (m["status"].as_str(), m["attempts"].as_i64()),
        (Some("queued"), Some(0)),
        "{m}"
    );
    assert_eq!(w.smtp.messages().await.len(), 1, "nothing more was sent");
    assert_eq!(sm.metric("postwire_site_sending_held", None).await, 1.0);
    set_status("active").await;
    let m = sm.wait_for(&held, "sent").await;
    assert_eq!(m["attempts"], 1, "{m}");
    assert!(m.get("reason").is_none(), "{m}");
    assert_eq!(sm.metric("postwire_site_sending_held", None).await, 0.0);

    // the site is deleted: held again (404, or 401 once the site token must be renewed)
    let r = w
        .mgmt
        .delete(
            &format!("/api/v1/tenants/acme/sites/{}", w.site_id),
            &w.mgmt.admin_token("acme"),
        )
        .await;
    assert!(r.status == 204 || r.status == 200, "{}", r.text);
    wait_held(&sm).await;
    let orphan = sm.accept(&simple("test", "After deletion")).await;
    let m = wait_reason(&sm, &orphan, "sending held").await;
    assert!(
        m["reason"].as_str().unwrap().contains("deleted")
            || m["reason"].as_str().unwrap().contains("credentials"),
        "{m}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sm.message(&orphan).await["status"],
        "queued",
        "kept, not lost"
    );
    assert_eq!(w.smtp.messages().await.len(), 2);
    sm.stop().await;
}
