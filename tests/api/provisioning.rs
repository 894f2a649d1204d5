//! Cloud Central provisioning: cluster settings (no OAuth), invitations through the durable
//! outbox to a real SMTP server (npm smtp-server with STARTTLS and PLAIN/LOGIN), the
//! one-time accept, and the tenant test email.

use std::sync::Arc;
use std::time::Duration;

use management::clock::ManualClock;
use postwire_tests::peers::{SmtpMessage, SmtpPeer, SmtpPeerOptions, SmtpStage};
use postwire_tests::{Backend, Setup, TestApp, dual_test};
use serde_json::{Value, json};

async fn smtp() -> SmtpPeer {
    SmtpPeer::start(SmtpPeerOptions::default().with_user("cloud@example.com", "cluster-pw")).await
}

/// A setup that trusts the SMTP peer's CA.
async fn setup_for(b: Backend, peer: &SmtpPeer) -> Setup {
    let mut s = Setup::new(b).await;
    s.env.insert(
        "POSTWIRE_EXTRA_CA_FILE".into(),
        peer.cert_pem_path().to_string_lossy().into_owned(),
    );
    s.env.insert(
        "POSTWIRE_INVITATION_URL_TEMPLATE".into(),
        "https://cloud.example/invite?token={token}".into(),
    );
    s
}

fn cluster_settings(port: u16) -> Value {
    json!({
        "server": {"host": "localhost", "port": port, "encryption": "starttls"},
        "auth": {"method": "password", "username": "cloud@example.com", "password": "cluster-pw"},
        "senders": [{"address": "invitations@cloud.example", "name": "Print Cloud", "default": true}]
    })
}

async fn wait_for_messages(peer: &SmtpPeer, n: usize) -> Vec<SmtpMessage> {
    for _ in 0..200 {
        let m = peer.messages().await;
        if m.len() >= n {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the SMTP peer did not receive {n} message(s): {:?}",
        peer.messages().await.len()
    );
}

async fn invitations(app: &TestApp, tenant: &str) -> Vec<Value> {
    app.get(
        &format!("/api/v1/tenants/{tenant}/invitations"),
        &app.cluster_token(),
    )
    .await
    .json()
    .as_array()
    .unwrap()
    .clone()
}

async fn wait_for_status(app: &TestApp, tenant: &str, email: &str, status: &str) -> Value {
    for _ in 0..200 {
        if let Some(i) = invitations(app, tenant)
            .await
            .into_iter()
            .find(|i| i["email"] == email)
            && i["status"] == status
        {
            return i;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{email} never became {status}: {:?}",
        invitations(app, tenant).await
    );
}

fn token_of(m: &SmtpMessage) -> String {
    // quoted-printable: soft line breaks and an encoded '='
    let data = m.data.replace("=\r\n", "").replace("=3D", "=");
    let i = data
        .find("https://cloud.example/invite?token=")
        .expect("link in the message");
    data[i + "https://cloud.example/invite?token=".len()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect()
}

async fn accept(app: &TestApp, token: &str) -> u16 {
    app.request(
        "POST",
        "/api/v1/invitations/accept",
        None,
        Some(&json!({"token": token})),
    )
    .await
    .status
}

async fn invitations_arrive_and_accept_once(b: Backend) {
    let peer = smtp().await;
    let app = setup_for(b, &peer).await.spawn().await;
    let c = app.cluster_token();
    let r = app
        .put(
            "/api/v1/cluster/email-settings",
            &c,
            &cluster_settings(peer.port()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains("cluster-pw"), "write-only password");
    assert_eq!(r.json()["auth"]["password_set"], true);
    let body = json!({"name": "Acme", "admin_emails": ["one@acme.example", "two@acme.example"]});
    assert_eq!(app.put("/api/v1/tenants/acme", &c, &body).await.status, 201);
    let msgs = wait_for_messages(&peer, 2).await;
    let mut to: Vec<String> = msgs.iter().flat_map(|m| m.to.clone()).collect();
    to.sort();
    assert_eq!(to, vec!["one@acme.example", "two@acme.example"]);
    assert_eq!(msgs[0].auth_user.as_deref(), Some("cloud@example.com"));
    assert!(msgs[0].tls, "STARTTLS");
    assert!(msgs[0].data.contains("invitations@cloud.example"));
    assert!(
        msgs[0]
            .data
            .contains("You are invited to manage email for Acme")
    );
    wait_for_status(&app, "acme", "one@acme.example", "sent").await;

    // repeating the PUT sends nothing new
    assert_eq!(app.put("/api/v1/tenants/acme", &c, &body).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(peer.messages().await.len(), 2);
    assert_eq!(invitations(&app, "acme").await.len(), 2);

    // the link works once; the token is stored hashed
    let token = token_of(&msgs[0]);
    assert!(token.len() >= 40, "{token}");
    assert!(
        app.query_one(&format!(
            "SELECT id FROM invitations WHERE token_hash = '{token}'"
        ))
        .await
        .is_none()
    );
    assert_eq!(accept(&app, &token).await, 200);
    assert_eq!(accept(&app, &token).await, 409, "one-time");
    assert_eq!(accept(&app, "not-a-real-token").await, 404);
    let accepted = msgs[0].to[0].clone();
    wait_for_status(&app, "acme", &accepted, "accepted").await;
    // the outbox row holds ciphertext, not the link
    let row = app
        .query_one("SELECT message FROM outbox LIMIT 1")
        .await
        .unwrap();
    let m: String = row.try_get("", "message").unwrap();
    assert!(
        !m.contains("cloud.example"),
        "outbox payloads are encrypted"
    );
}
dual_test!(invitations_arrive_and_accept_once);

async fn queued_without_settings_then_sent(b: Backend) {
    let peer = smtp().await;
    let app = setup_for(b, &peer).await.spawn().await;
    let c = app.cluster_token();
    let body = json!({"name": "Acme", "admin_emails": ["admin@acme.example"]});
    assert_eq!(
        app.put("/api/v1/tenants/acme", &c, &body).await.status,
        201,
        "creating the tenant succeeds"
    );
    let i = wait_for_status(&app, "acme", "admin@acme.example", "queued").await;
    for _ in 0..40 {
        if invitations(&app, "acme").await[0]["reason"] == "cluster email settings missing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        invitations(&app, "acme").await[0]["reason"],
        "cluster email settings missing",
        "{i}"
    );
    assert!(peer.messages().await.is_empty());

    // the SMTP server is down: a closed port refuses the connection (transient: stays queued)
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_eq!(
        app.put(
            "/api/v1/cluster/email-settings",
            &c,
            &cluster_settings(closed)
        )
        .await
        .status,
        200
    );
    for _ in 0..100 {
        let i = invitations(&app, "acme").await[0].clone();
        if i["attempts"].as_i64().unwrap_or(0) >= 1
            && i["status"] == "queued"
            && i["reason"]
                .as_str()
                .is_some_and(|r| r.contains("temporary"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let i = invitations(&app, "acme").await[0].clone();
    assert_eq!(i["status"], "queued", "{i}");
    assert!(
        i["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("temporary"),
        "{i}"
    );

    // the server is back (settings now point at it): the invitation goes out
    assert_eq!(
        app.put(
            "/api/v1/cluster/email-settings",
            &c,
            &cluster_settings(peer.port())
        )
        .await
        .status,
        200
    );
    wait_for_messages(&peer, 1).await;
    let i = wait_for_status(&app, "acme", "admin@acme.example", "sent").await;
    assert!(i["smtp_reply"].as_str().unwrap().starts_with("250"), "{i}");
}
dual_test!(queued_without_settings_then_sent);

async fn permanent_failure_and_resend(b: Backend) {
    let peer = smtp().await;
    let app = setup_for(b, &peer).await.spawn().await;
    let c = app.cluster_token();
    assert_eq!(
        app.put(
            "/api/v1/cluster/email-settings",
            &c,
            &cluster_settings(peer.port())
        )
        .await
        .status,
        200
    );
    peer.fail_next_at(SmtpStage::Rcpt, 550, "5.1.1 No such user here", 1)
        .await;
    let body = json!({"name": "Acme", "admin_emails": ["gone@acme.example"]});
    assert_eq!(app.put("/api/v1/tenants/acme", &c, &body).await.status, 201);
    let i = wait_for_status(&app, "acme", "gone@acme.example", "failed").await;
    assert!(i["last_error"].as_str().unwrap().contains("550"), "{i}");
    assert!(
        i["last_error"].as_str().unwrap().contains("No such user"),
        "{i}"
    );
    assert!(peer.messages().await.is_empty());

    // resend: a new link, delivered
    let id = i["id"].as_str().unwrap();
    let r = app
        .request(
            "POST",
            &format!("/api/v1/tenants/acme/invitations/{id}/resend"),
            Some(&c),
            None,
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let msgs = wait_for_messages(&peer, 1).await;
    wait_for_status(&app, "acme", "gone@acme.example", "sent").await;
    assert_eq!(accept(&app, &token_of(&msgs[0])).await, 200);
    let r = app
        .request(
            "POST",
            &format!("/api/v1/tenants/acme/invitations/{id}/resend"),
            Some(&c),
            None,
        )
        .await;
    assert_eq!(r.status, 409, "accepted invitations are not resent");
}
dual_test!(permanent_failure_and_resend);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_invitation_is_gone() {
    let peer = smtp().await;
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let app = setup_for(Backend::Sqlite, &peer)
        .await
        .try_spawn(clock.clone())
        .await
        .unwrap();
    let c = app.cluster_token();
    assert_eq!(
        app.put(
            "/api/v1/cluster/email-settings",
            &c,
            &cluster_settings(peer.port())
        )
        .await
        .status,
        200
    );
    let body = json!({"name": "Acme", "admin_emails": ["late@acme.example"]});
    assert_eq!(app.put("/api/v1/tenants/acme", &c, &body).await.status, 201);
    let msgs = wait_for_messages(&peer, 1).await;
    clock.advance(chrono::Duration::days(8));
    assert_eq!(accept(&app, &token_of(&msgs[0])).await, 410);
    wait_for_status(&app, "acme", "late@acme.example", "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_settings_refuse_oauth() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let c = app.cluster_token();
    let mut s = cluster_settings(2525);
    s["auth"] = json!({"method": "oauth2"});
    let r = app.put("/api/v1/cluster/email-settings", &c, &s).await;
    assert_eq!(r.fields(), vec!["auth.method"]);
    assert!(
        r.text
            .contains("not supported in the cluster-admin context"),
        "{}",
        r.text
    );
    assert_eq!(
        app.get("/api/v1/cluster/email-settings", &c).await.status,
        404
    );
    assert_eq!(
        app.get("/api/v1/cluster/email-settings", &app.admin_token("acme"))
            .await
            .status,
        403
    );
    let mut s = cluster_settings(2525);
    s["senders"] = json!([]);
    assert_eq!(
        app.put("/api/v1/cluster/email-settings", &c, &s)
            .await
            .fields(),
        vec!["senders"]
    );
}

async fn test_email_with_password(b: Backend) {
    let peer =
        SmtpPeer::start(SmtpPeerOptions::default().with_user("scanner@acme.example", "tenant-pw"))
            .await;
    let app = setup_for(b, &peer).await.spawn().await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let settings = json!({
        "provider": "custom",
        "server": {"host": "localhost", "port": peer.port(), "encryption": "starttls"},
        "auth": {"method": "password", "username": "scanner@acme.example", "password": "tenant-pw"},
        "senders": [{"address": "scanner@acme.example", "default": true}]
    });
    assert_eq!(
        app.put("/api/v1/tenants/acme/email-settings", &t, &settings)
            .await
            .status,
        200
    );
    // Microsoft's well-known refusals come back with the reply and a hint (injected at AUTH,
    // before the first connection is pooled)
    peer.fail_next_at(
        SmtpStage::Auth,
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant",
        1,
    )
    .await;
    let r = app
        .post(
            "/api/v1/tenants/acme/email-settings/test",
            &t,
            &json!({"to": "it@acme.example"}),
        )
        .await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let d = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        d.contains("535") && d.contains("5.7.139") && d.contains("Security Defaults"),
        "{d}"
    );
    peer.fail_next_at(SmtpStage::Auth, 535, "5.7.3 Authentication unsuccessful", 1)
        .await;
    let r = app
        .post(
            "/api/v1/tenants/acme/email-settings/test",
            &t,
            &json!({"to": "it@acme.example"}),
        )
        .await;
    assert!(
        r.json()["detail"].as_str().unwrap().contains("licensed"),
        "{}",
        r.text
    );
    let r = app
        .post(
            "/api/v1/tenants/acme/email-settings/test",
            &t,
            &json!({"to": "it@acme.example"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert!(v["smtp_reply"].as_str().unwrap().starts_with("250"), "{v}");
    let msgs = wait_for_messages(&peer, 1).await;
    assert_eq!(msgs[0].to, vec!["it@acme.example"]);
    assert_eq!(msgs[0].auth_user.as_deref(), Some("scanner@acme.example"));
    assert!(msgs[0].data.contains(v["message_id"].as_str().unwrap()));

    // a wrong password: the server's own refusal
    let mut wrong = settings.clone();
    wrong["auth"]["password"] = json!("nope");
    assert_eq!(
        app.put("/api/v1/tenants/acme/email-settings", &t, &wrong)
            .await
            .status,
        200
    );
    let r = app
        .post(
            "/api/v1/tenants/acme/email-settings/test",
            &t,
            &json!({"to": "it@acme.example"}),
        )
        .await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert!(
        r.json()["detail"].as_str().unwrap().contains("535"),
        "{}",
        r.text
    );
    assert_eq!(
        app.post(
            "/api/v1/tenants/acme/email-settings/test",
            &t,
            &json!({"to": "bad"})
        )
        .await
        .fields(),
        vec!["to"]
    );
}
dual_test!(test_email_with_password);

/// With OAuth 2.0 the test email authenticates with XOAUTH2 and the grant's access token; the
/// SMTP peer verifies the token against the OAuth server's JWKS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_email_with_oauth() {
    let oauth = crate::oauth::peer(3600).await;
    let peer = SmtpPeer::start(SmtpPeerOptions::default().trusting(&oauth)).await;
    let app = setup_for(Backend::Sqlite, &peer).await.spawn().await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let mut s = crate::oauth::oauth_settings(&oauth);
    s["server"] = json!({"host": "localhost", "port": peer.port(), "encryption": "starttls"});
    assert_eq!(
        app.put("/api/v1/tenants/acme/email-settings", &t, &s)
            .await
            .status,
        200
    );
    // not authorized yet: 409
    let r = app
        .post(
            "/api/v1/tenants/acme/email-settings/test",
            &t,
            &json!({"to": "it@acme.example"}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.text);
    let cb = crate::oauth::start(&app, "acme", &t).await;
    assert_eq!(crate::oauth::callback(&app, &cb).await.status, 200);
    let r = app
        .post(
            "/api/v1/tenants/acme/email-settings/test",
            &t,
            &json!({"to": "it@acme.example"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let msgs = wait_for_messages(&peer, 1).await;
    assert_eq!(msgs[0].auth_method.as_deref(), Some("XOAUTH2"));
    assert_eq!(msgs[0].auth_user.as_deref(), Some("sender@acme.example"));
}

/// The OAuth 2.0 token endpoint refuses the refresh the way Microsoft Entra ID does
/// (`invalid_grant` with an AADSTS code): the test email answers 502 problem+json with the
/// provider's error and the plain advice of mail-core `hints`, nothing reaches the SMTP
/// server, and the grant shows `reauthorization_required` with the same advice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_email_reports_aadsts_refusals_with_advice() {
    let oauth = crate::oauth::peer(3600).await;
    let peer = SmtpPeer::start(SmtpPeerOptions::default().trusting(&oauth)).await;
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let app = setup_for(Backend::Sqlite, &peer)
        .await
        .try_spawn(clock.clone())
        .await
        .unwrap();
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let mut s = crate::oauth::oauth_settings(&oauth);
    s["server"] = json!({"host": "localhost", "port": peer.port(), "encryption": "starttls"});
    assert_eq!(
        app.put("/api/v1/tenants/acme/email-settings", &t, &s)
            .await
            .status,
        200
    );
    // (the provider's error_description, the AADSTS code, words the advice must contain)
    let cases = [
        (
            "AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2026-08-01 and was inactive for 90.00:00:00.",
            "AADSTS700082",
            "authorize again",
        ),
        (
            "AADSTS50076: Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access 'https://outlook.office.com'.",
            "AADSTS50076",
            "multi-factor authentication",
        ),
        (
            "AADSTS65001: The user or administrator has not consented to use the application with ID 'postwire-client' named 'Postwire'.",
            "AADSTS65001",
            "consent",
        ),
    ];
    for (description, code, words) in cases {
        let cb = crate::oauth::start(&app, "acme", &t).await;
        assert_eq!(crate::oauth::callback(&app, &cb).await.status, 200);
        // the access token from the authorization has expired: the test email must refresh
        clock.advance(chrono::Duration::hours(2));
        let refreshes = oauth.token_calls().await.refresh_token;
        oauth
            .fail_token_endpoint_with(1, 400, "invalid_grant", description)
            .await;
        let r = app
            .post(
                "/api/v1/tenants/acme/email-settings/test",
                &t,
                &json!({"to": "it@acme.example"}),
            )
            .await;
        assert_eq!(r.status, 502, "{code}: {}", r.text);
        assert_eq!(r.headers["content-type"], "application/problem+json");
        let p = r.json();
        assert_eq!(p["type"], "urn:postwire:problem:smtp-refused", "{p}");
        let detail = p["detail"].as_str().unwrap();
        let advice = mail_core::hints::hint(code).unwrap();
        assert!(advice.contains(words), "{code}: advice {advice:?}");
        assert!(
            detail.contains("invalid_grant") && detail.contains(code),
            "{code}: the provider's error is reported: {detail}"
        );
        assert!(
            detail.ends_with(&format!("Hint: {advice}")),
            "{code}: the advice is the hint for {code}: {detail}"
        );
        assert_eq!(
            oauth.token_calls().await.refresh_token,
            refreshes + 1,
            "{code}: one refresh, not retried"
        );
        // the grant shows it: reauthorization required, the provider's error and the advice
        let v = app
            .get("/api/v1/tenants/acme/email-settings", &t)
            .await
            .json();
        assert_eq!(v["oauth"]["status"], "reauthorization_required", "{v}");
        assert!(
            v["oauth"]["last_error"].as_str().unwrap().contains(code),
            "{v}"
        );
        assert!(
            v["oauth"]["warnings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w == advice),
            "{code}: the advice is among the grant's warnings: {v}"
        );
    }
    // nothing was sent with a dead grant
    assert!(peer.messages().await.is_empty());
    // authorizing again recovers: the test email goes out
    let cb = crate::oauth::start(&app, "acme", &t).await;
    assert_eq!(crate::oauth::callback(&app, &cb).await.status, 200);
    let r = app
        .post(
            "/api/v1/tenants/acme/email-settings/test",
            &t,
            &json!({"to": "it@acme.example"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json();
    assert_eq!(v["oauth"]["status"], "authorized", "{v}");
    assert_eq!(v["oauth"]["warnings"], json!([]), "{v}");
}

/// Two replicas on one PostgreSQL share the outbox: each invitation is claimed by one of them
/// (FOR UPDATE SKIP LOCKED) and delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_deliver_each_invitation_once() {
    let peer = smtp().await;
    let setup = setup_for(Backend::Postgres, &peer).await;
    let (a, b) = (setup.spawn().await, setup.spawn().await);
    let c = a.cluster_token();
    // no settings yet: both replicas' workers find the invitations waiting...
    let emails: Vec<String> = (0..20).map(|i| format!("admin{i}@acme.example")).collect();
    let body = json!({"name": "Acme", "admin_emails": emails});
    assert_eq!(a.put("/api/v1/tenants/acme", &c, &body).await.status, 201);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...and race for them once the settings exist
    assert_eq!(
        b.put(
            "/api/v1/cluster/email-settings",
            &c,
            &cluster_settings(peer.port())
        )
        .await
        .status,
        200
    );
    a.state.outbox_wakeup.notify_one();
    let msgs = wait_for_messages(&peer, 20).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let msgs_after = peer.messages().await;
    assert_eq!(msgs_after.len(), 20, "no duplicates after the race settled");
    let mut to: Vec<String> = msgs.iter().flat_map(|m| m.to.clone()).collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 20, "every admin got exactly one invitation");
    for e in &emails {
        wait_for_status(&a, "acme", e, "sent").await;
    }
}

/// A TCP server that accepts SMTP connections and never answers (no greeting): a replica
/// sending there is stuck mid-send, holding its claim. Returns the port and the number of
/// connections accepted so far.
fn tarpit() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    (port, accepted)
}

/// Replica A as a process of its own: its own runtime (outbox worker, keeper) and HTTP
/// server. `kill` stops the server at once and drops every task of the runtime mid-await,
/// as kill -9 would: no outcome is recorded, the claim is left behind.
struct Replica {
    address: String,
    instance: String,
    cluster_token: String,
    kill: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Replica {
    fn start(setup: &Setup) -> Replica {
        let config = setup.config();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (kill, kill_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            // Whatever is dropped after the runtime (the SMTP pool) still finds one.
            let context = rt.handle().clone();
            let _context = context.enter();
            let app = rt
                .block_on(management::startup::Application::build_with_clock(
                    config,
                    Arc::new(management::clock::SystemClock),
                ))
                .unwrap();
            let state = app.state();
            let handle = app.handle();
            let token = state
                .jwt
                .issue(
                    management::auth::Role::ClusterAdmin,
                    None,
                    None,
                    "test",
                    chrono::Utc::now().timestamp(),
                    3600,
                )
                .unwrap();
            ready_tx
                .send((
                    format!("http://127.0.0.1:{}", app.port()),
                    state.instance.clone(),
                    token,
                ))
                .unwrap();
            rt.spawn(app.run_until_stopped());
            let _ = kill_rx.recv();
            rt.block_on(handle.stop(false));
            rt.shutdown_background();
        });
        let (address, instance, cluster_token) = ready_rx.recv().unwrap();
        Replica {
            address,
            instance,
            cluster_token,
            kill,
            thread,
        }
    }

    async fn put(&self, path: &str, body: &Value) -> u16 {
        reqwest::Client::new()
            .put(format!("{}{path}", self.address))
            .bearer_auth(&self.cluster_token)
            .json(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    fn kill(self) {
        self.kill.send(()).unwrap();
        self.thread.join().unwrap();
    }
}

/// Replica A claims an invitation and dies mid-send (its SMTP server never answers); after
/// the claim expires (POSTWIRE_OUTBOX_CLAIM_TTL, 3 s here) replica B on the same PostgreSQL
/// takes the message over and delivers it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_claim_of_a_dead_replica_is_delivered_once_by_another() {
    let peer = smtp().await;
    let (stuck_port, stuck_connections) = tarpit();
    let mut setup = setup_for(Backend::Postgres, &peer).await;
    setup
        .env
        .insert("POSTWIRE_OUTBOX_CLAIM_TTL".into(), "3s".into());
    let db = sea_orm::Database::connect(setup.env["DATABASE_URL"].as_str())
        .await
        .unwrap();
    let outbox_row = || async {
        use sea_orm::ConnectionTrait as _;
        db.query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT status, claimed_by, attempts, \
                    CAST(EXTRACT(EPOCH FROM claimed_until) * 1000 AS BIGINT) AS claimed_until_ms, \
                    CAST(EXTRACT(EPOCH FROM updated_at) * 1000 AS BIGINT) AS updated_at_ms, \
                    CAST(EXTRACT(EPOCH FROM sent_at) * 1000 AS BIGINT) AS sent_at_ms \
             FROM outbox WHERE kind = 'invitation'",
        ))
        .await
        .unwrap()
        .unwrap()
    };

    // Replica A alone: its cluster settings point at the server that never answers.
    let a = Replica::start(&setup);
    assert_eq!(
        a.put(
            "/api/v1/cluster/email-settings",
            &cluster_settings(stuck_port)
        )
        .await,
        200
    );
    assert_eq!(
        a.put(
            "/api/v1/tenants/acme",
            &json!({"name": "Acme", "admin_emails": ["admin@acme.example"]})
        )
        .await,
        201
    );
    // A's worker claims the invitation and hangs in the SMTP greeting.
    let mut claimed = None;
    for _ in 0..100 {
        let row = outbox_row().await;
        let by: Option<String> = row.try_get("", "claimed_by").unwrap();
        if by.as_deref() == Some(a.instance.as_str())
            && stuck_connections.load(std::sync::atomic::Ordering::SeqCst) > 0
        {
            claimed = Some(row);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let claimed = claimed.expect("replica A claims the invitation and connects");
    assert_eq!(claimed.try_get::<String>("", "status").unwrap(), "sending");
    let claimed_until: i64 = claimed.try_get("", "claimed_until_ms").unwrap();
    let claimed_at: i64 = claimed.try_get("", "updated_at_ms").unwrap();
    assert!(
        (2_900..=3_100).contains(&(claimed_until - claimed_at)),
        "the claim lasts POSTWIRE_OUTBOX_CLAIM_TTL: {} ms",
        claimed_until - claimed_at
    );
    a.kill();

    // Replica B: the cluster settings now point at a server that works (nudging only
    // touches queued messages: the claimed one waits for its claim to expire).
    let b = setup.spawn().await;
    assert_eq!(
        b.put(
            "/api/v1/cluster/email-settings",
            &b.cluster_token(),
            &cluster_settings(peer.port())
        )
        .await
        .status,
        200
    );
    let msgs = wait_for_messages(&peer, 1).await;
    assert_eq!(msgs[0].to, vec!["admin@acme.example"]);
    assert!(msgs[0].data.contains("https://cloud.example/invite?token="));
    // ... and only once, also after a few more claim periods
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(peer.messages().await.len(), 1, "delivered exactly once");
    let row = outbox_row().await;
    assert_eq!(row.try_get::<String>("", "status").unwrap(), "sent");
    assert_eq!(
        row.try_get::<i32>("", "attempts").unwrap(),
        2,
        "A's attempt and B's"
    );
    let sent_at: i64 = row.try_get("", "sent_at_ms").unwrap();
    assert!(
        sent_at >= claimed_until,
        "B waited for A's claim to expire: sent {sent_at}, claim until {claimed_until}"
    );
    assert_eq!(
        invitations(&b, "acme").await[0]["status"],
        "sent",
        "{:?}",
        invitations(&b, "acme").await
    );
}
