//! Header injection: every string that reaches a mail header or an SMTP command, on every API
//! that takes one (tenant and cluster settings, site overrides, invitations, the test email,
//! the site mailer's `POST /v1/messages`), × CR, LF, CRLF, NUL, other control characters and
//! Unicode line separators (in the middle and at the end) is a 422 naming the field, and
//! nothing is stored.

use std::collections::BTreeMap;

use postwire_tests::{Backend, Resp, TestApp, dual_test, m365_password_settings};
use serde_json::{Value, json};

/// What an attacker appends to a value to start a new header line.
const VARIANTS: &[(&str, &str)] = &[
    ("CRLF", "\r\nBcc: victim@example.com"),
    ("LF", "\nBcc: victim@example.com"),
    ("CR", "\rBcc: victim@example.com"),
    ("NUL", "\0"),
    ("trailing CRLF", "\r\n"),
    ("CRLF CRLF (body)", "\r\n\r\nInjected body"),
    ("vertical tab", "\u{b}x"),
    ("form feed", "\u{c}x"),
    ("ESC", "\u{1b}[31m"),
    ("DEL", "\u{7f}"),
    ("NEL", "\u{85}Bcc: victim@example.com"),
    ("line separator", "\u{2028}Bcc: victim@example.com"),
    ("paragraph separator", "\u{2029}Bcc: victim@example.com"),
];

/// `value` with `suffix` injected: an address keeps its shape up to the injected part.
fn inject(value: &str, suffix: &str) -> String {
    format!("{value}{suffix}")
}

/// Sets the JSON value at a dotted path with indices (`senders[0].name`).
fn set(doc: &mut Value, path: &str, v: Value) {
    let mut cur = doc;
    for part in path.split('.') {
        let (key, idx) = match part.split_once('[') {
            Some((k, i)) => (k, Some(i.trim_end_matches(']').parse::<usize>().unwrap())),
            None => (part, None),
        };
        cur = &mut cur[key];
        if let Some(i) = idx {
            cur = &mut cur[i];
        }
    }
    *cur = v;
}

fn get<'a>(doc: &'a Value, path: &str) -> &'a Value {
    let mut cur = doc;
    for part in path.split('.') {
        let (key, idx) = match part.split_once('[') {
            Some((k, i)) => (k, Some(i.trim_end_matches(']').parse::<usize>().unwrap())),
            None => (part, None),
        };
        cur = &cur[key];
        if let Some(i) = idx {
            cur = &cur[i];
        }
    }
    cur
}

fn assert_names(r: &Resp, field: &str, what: &str) {
    assert_eq!(r.status, 422, "{what}: {}", r.text);
    assert_eq!(
        r.headers["content-type"], "application/problem+json",
        "{what}"
    );
    let fields = r.fields();
    assert!(
        fields.iter().any(|f| f == field),
        "{what}: {field} not named in {fields:?}"
    );
    // besides the field itself, only what follows from it being void: no default sender
    // left, a feature sender that is no longer a sender
    assert!(
        fields
            .iter()
            .all(|f| f == field || f == "senders" || f.starts_with("feature_senders")),
        "{what}: only {field} is wrong, got {fields:?}"
    );
    assert!(
        !r.text.contains("victim@example.com"),
        "{what}: the problem echoes the injected value: {}",
        r.text
    );
}

fn oauth_settings() -> Value {
    json!({
        "provider": "custom",
        "server": {"host": "smtp.acme.example", "port": 587, "encryption": "starttls"},
        "auth": {
            "method": "oauth2",
            "client_id": "postwire-client",
            "client_secret": "client-secret-value",
            "authorization_url": "https://login.acme.example/authorize",
            "token_url": "https://login.acme.example/token",
            "scopes": ["openid", "offline_access"],
            "authorization_username": "scanner@acme.example"
        },
        "senders": [{"address": "scanner@acme.example", "name": "Acme Scanner", "default": true}]
    })
}

fn cluster_settings() -> Value {
    json!({
        "server": {"host": "smtp.cloud.example", "port": 587, "encryption": "starttls"},
        "auth": {"method": "password", "username": "cloud@cloud.example", "password": "cluster-pw"},
        "senders": [{"address": "invitations@cloud.example", "name": "Print Cloud", "default": true}]
    })
}

/// The Management Service: every header-bound field of every write API.
async fn management_refuses_injection(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let cluster = app.cluster_token();

    // (what, method, path, token, base document, field)
    let m365 = m365_password_settings();
    let site = json!({"name": "Plant", "override": {"server": {"host": "relay.lan", "port": 2525, "encryption": "none"}, "auth": {"method": "password", "username": "plant", "password": "relay-pw"}}});
    let tenant = json!({"name": "Tenant acme", "admin_emails": ["admin@acme.example"]});
    let tenant_settings = "/api/v1/tenants/acme/email-settings";
    let (t, c) = (t.as_str(), cluster.as_str());
    let (oauth, cs, to) = (
        oauth_settings(),
        cluster_settings(),
        json!({"to": "it@acme.example"}),
    );
    let cases: Vec<(&str, &str, &str, &Value, &str)> = vec![
        ("PUT", tenant_settings, t, &m365, "senders[0].name"),
        ("PUT", tenant_settings, t, &m365, "senders[0].address"),
        ("PUT", tenant_settings, t, &m365, "senders[1].address"),
        ("PUT", tenant_settings, t, &m365, "receivers[0].address"),
        ("PUT", tenant_settings, t, &m365, "auth.username"),
        ("PUT", tenant_settings, t, &m365, "server.host"),
        ("PUT", tenant_settings, t, &m365, "feature_senders.report"),
        (
            "PUT",
            tenant_settings,
            t,
            &m365,
            "feature_senders.scan_to_email",
        ),
        (
            "PUT",
            tenant_settings,
            t,
            &oauth,
            "auth.authorization_username",
        ),
        ("PUT", tenant_settings, t, &oauth, "auth.client_id"),
        (
            "PUT",
            "/api/v1/cluster/email-settings",
            c,
            &cs,
            "senders[0].name",
        ),
        (
            "PUT",
            "/api/v1/cluster/email-settings",
            c,
            &cs,
            "senders[0].address",
        ),
        (
            "PUT",
            "/api/v1/cluster/email-settings",
            c,
            &cs,
            "auth.username",
        ),
        (
            "PUT",
            "/api/v1/cluster/email-settings",
            c,
            &cs,
            "server.host",
        ),
        ("POST", "/api/v1/tenants/acme/sites", t, &site, "name"),
        (
            "POST",
            "/api/v1/tenants/acme/sites",
            t,
            &site,
            "override.server.host",
        ),
        (
            "POST",
            "/api/v1/tenants/acme/sites",
            t,
            &site,
            "override.auth.username",
        ),
        // invitation fields: the tenant name is in the invitation's subject, the admin
        // emails are its recipients
        ("PUT", "/api/v1/tenants/acme", c, &tenant, "name"),
        ("PUT", "/api/v1/tenants/acme", c, &tenant, "admin_emails[0]"),
        (
            "POST",
            "/api/v1/tenants/acme/email-settings/test",
            t,
            &to,
            "to",
        ),
    ];

    // the bases are valid as they are
    for (m, p, tok, base, _) in &cases {
        if p.ends_with("/test") {
            continue; // needs settings; checked below after they are stored
        }
        let r = app.request(m, p, Some(tok), Some(base)).await;
        assert!(r.status < 300, "{m} {p} base: {} {}", r.status, r.text);
    }
    assert_eq!(
        app.put(tenant_settings, t, &m365).await.status,
        200,
        "the password settings stay stored"
    );
    let stored = app.get(tenant_settings, t).await.text;
    let sites_before = app.get("/api/v1/tenants/acme/sites", t).await.text;

    let mut checked = 0;
    for (m, p, tok, base, field) in &cases {
        let original = get(base, field)
            .as_str()
            .unwrap_or_else(|| panic!("{field} in {base}"))
            .to_owned();
        for (vname, suffix) in VARIANTS {
            for (pos, value) in [
                ("end", inject(&original, suffix)),
                ("middle", {
                    let mid = original.len() / 2;
                    let mid = (0..=mid)
                        .rev()
                        .find(|i| original.is_char_boundary(*i))
                        .unwrap();
                    format!("{}{suffix}{}", &original[..mid], &original[mid..])
                }),
            ] {
                let mut doc = (*base).clone();
                set(&mut doc, field, json!(value));
                let r = app.request(m, p, Some(tok), Some(&doc)).await;
                assert_names(
                    &r,
                    field,
                    &format!("{m} {p} {field} with {vname} at the {pos}"),
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 400, "{checked}");
    eprintln!("management injection: {checked} cases");
    // nothing was stored by the refused writes
    assert_eq!(app.get(tenant_settings, t).await.text, stored);
    assert_eq!(
        app.get("/api/v1/tenants/acme/sites", t).await.text,
        sites_before
    );
}
dual_test!(management_refuses_injection);

/// A site mailer of tenant acme (m365 password settings, one site) on port 0, for requests to
/// its local API; nothing is delivered.
pub(crate) struct LocalMailer {
    _mgmt: TestApp,
    address: String,
    client: reqwest::Client,
    stopper: Option<site_mailer::startup::Stopper>,
    data_dir: std::path::PathBuf,
}

pub(crate) const LOCAL_KEY: &str = "security-test-local-api-key-0123456789";

impl LocalMailer {
    pub(crate) async fn start() -> LocalMailer {
        let mgmt = TestApp::spawn(Backend::Sqlite).await;
        mgmt.create_tenant("acme").await;
        let t = mgmt.admin_token("acme");
        let r = mgmt
            .put(
                "/api/v1/tenants/acme/email-settings",
                &t,
                &m365_password_settings(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let site = mgmt
            .post("/api/v1/tenants/acme/sites", &t, &json!({"name": "Brno"}))
            .await
            .json();
        let data_dir =
            std::env::temp_dir().join(format!("site-mailer-sec-{}", uuid::Uuid::new_v4()));
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("POSTWIRE_LISTEN", "127.0.0.1:0"),
            ("POSTWIRE_MANAGEMENT_URL", mgmt.address.as_str()),
            ("POSTWIRE_SITE_ID", site["site_id"].as_str().unwrap()),
            ("POSTWIRE_SITE_SECRET", site["secret"].as_str().unwrap()),
            ("POSTWIRE_API_KEY", LOCAL_KEY),
            ("POSTWIRE_DATA_DIR", data_dir.to_str().unwrap()),
        ] {
            env.insert(k.to_owned(), v.to_owned());
        }
        let config = site_mailer::config::Config::from_sources(None, &env).unwrap();
        let app = site_mailer::startup::Application::build(config)
            .await
            .unwrap();
        let address = format!("http://127.0.0.1:{}", app.port());
        let stopper = app.stopper();
        tokio::spawn(app.run_until_stopped());
        LocalMailer {
            _mgmt: mgmt,
            address,
            client: reqwest::Client::new(),
            stopper: Some(stopper),
            data_dir,
        }
    }

    /// `POST /v1/messages` with the local API key and raw bytes as JSON.
    pub(crate) async fn post_raw(&self, body: Vec<u8>) -> Resp {
        let r = self
            .client
            .post(format!("{}/v1/messages", self.address))
            .bearer_auth(LOCAL_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        Resp {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            text: r.text().await.unwrap(),
        }
    }

    /// Any request, with `authorization` as the raw Authorization header.
    pub(crate) async fn request(
        &self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let mut rb = self.client.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", self.address),
        );
        if let Some(a) = authorization {
            rb = rb.header("authorization", a);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let r = rb.send().await.unwrap();
        Resp {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            text: r.text().await.unwrap(),
        }
    }

    /// The Management Service this mailer's site belongs to.
    pub(crate) fn management(&self) -> &TestApp {
        &self._mgmt
    }

    pub(crate) async fn post(&self, body: &Value) -> Resp {
        self.post_raw(serde_json::to_vec(body).unwrap()).await
    }

    pub(crate) async fn stop(mut self) {
        if let Some(s) = self.stopper.take() {
            s.stop().await;
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// The site mailer's `POST /v1/messages`: every header field × every variant is a 422 naming
/// the field, and no message is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_mailer_messages_refuse_injection() {
    let sm = LocalMailer::start().await;
    let post = |body: Value| {
        let sm = &sm;
        async move { sm.post(&body).await }
    };
    let base = json!({
        "kind": "scan_to_email",
        "from": "scanner@acme.example",
        "to": ["it@acme.example"],
        "cc": ["boss@acme.example"],
        "bcc": ["audit@acme.example"],
        "subject": "Scan from Brno",
        "text": "Attached.",
        "attachments": [{"filename": "scan.pdf", "content_type": "application/pdf", "content_base64": "JVBERi0="}]
    });
    let r = post(base.clone()).await;
    assert_eq!(r.status, 202, "the base message is accepted: {}", r.text);
    let mut checked = 0;
    for field in [
        "from",
        "to[0]",
        "cc[0]",
        "bcc[0]",
        "subject",
        "attachments[0].filename",
        "attachments[0].content_type",
    ] {
        let original = get(&base, field).as_str().unwrap().to_owned();
        for (vname, suffix) in VARIANTS {
            let mut doc = base.clone();
            set(&mut doc, field, json!(inject(&original, suffix)));
            let r = post(doc).await;
            assert_names(&r, field, &format!("{field} with {vname}"));
            checked += 1;
        }
    }
    assert!(checked >= 80, "{checked}");
    eprintln!("site mailer injection: {checked} cases");
    sm.stop().await;
}

/// Encoded variants that pass validation (percent-encoded CR/LF, an RFC 2047 encoded word
/// that decodes to CR/LF, non-ASCII look-alikes) are only text: delivered through the real
/// SMTP path, the message has no injected header line, the envelope only the intended
/// recipient, and the display name and subject stay inside their own headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_variants_stay_text() {
    use postwire_tests::peers::{SmtpPeer, SmtpPeerOptions, SmtpTls};
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::None,
        no_auth: true,
        ..SmtpPeerOptions::default()
    })
    .await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let names = [
        "Acme%0D%0ABcc: victim@example.com",
        "=?utf-8?q?Acme=0D=0ABcc:_victim@example.com?=",
        "=?utf-8?b?QWNtZQ0KQmNjOiB2aWN0aW1AZXhhbXBsZS5jb20=?=",
        "Acme\u{ff0d}\u{ff0a}Bcc: victim@example.com",
        "Acme \\r\\nBcc: victim@example.com",
    ];
    for (i, name) in names.iter().enumerate() {
        let r = app
            .put(
                "/api/v1/tenants/acme/email-settings",
                &t,
                &json!({
                    "provider": "custom",
                    "server": {"host": "127.0.0.1", "port": peer.port(), "encryption": "none"},
                    "auth": {"method": "none"},
                    "senders": [{"address": "scanner@acme.example", "name": name, "default": true}]
                }),
            )
            .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text);
        let r = app
            .post(
                "/api/v1/tenants/acme/email-settings/test",
                &t,
                &json!({"to": "it@acme.example"}),
            )
            .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text);
        let msgs = peer.messages().await;
        assert_eq!(msgs.len(), i + 1);
        let m = &msgs[i];
        assert_eq!(m.to, vec!["it@acme.example"], "{name}: the envelope");
        let head = m.data.split("\r\n\r\n").next().unwrap();
        for line in head.split("\r\n") {
            assert!(
                !line.to_ascii_lowercase().starts_with("bcc:"),
                "{name}: injected header line {line:?} in\n{head}"
            );
        }
        assert!(!m.data.contains('\0'));
        let from: Vec<&str> = head
            .split("\r\n")
            .filter(|l| l.to_ascii_lowercase().starts_with("from:"))
            .collect();
        assert_eq!(from.len(), 1, "{name}: one From header in\n{head}");
    }
}
