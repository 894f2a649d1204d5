//! SSRF: outbound connections (SMTP hosts, OAuth token URLs) are judged by
//! `POSTWIRE_EGRESS_ALLOW` after DNS resolution, at connect time. A resolver the test controls
//! (installed through `Config::egress_resolver`) makes a name resolve to an allowed address
//! first and to a forbidden one later (DNS rebinding); everything else is the real HTTP API,
//! the real connect path and real peers.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use mail_core::egress::{HostResolver, SystemResolver};
use management::clock::SystemClock;
use postwire_tests::peers::{SmtpPeer, SmtpPeerOptions, SmtpTls};
use postwire_tests::{Backend, Setup, TestApp, dual_test};
use serde_json::{Value, json};

/// A DNS whose answers the test sets; names it does not know go to the system resolver.
#[derive(Debug, Default)]
struct FakeDns {
    answers: Mutex<HashMap<String, Vec<IpAddr>>>,
    lookups: Mutex<Vec<String>>,
}

impl FakeDns {
    fn set(&self, name: &str, ips: &[&str]) {
        let ips = ips.iter().map(|s| s.parse().unwrap()).collect();
        self.answers.lock().unwrap().insert(name.to_owned(), ips);
    }
    fn lookups_of(&self, name: &str) -> usize {
        self.lookups
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == name)
            .count()
    }
}

impl HostResolver for FakeDns {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        self.lookups.lock().unwrap().push(host.to_owned());
        let known = self.answers.lock().unwrap().get(host).cloned();
        Box::pin(async move {
            match known {
                Some(ips) => Ok(ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect()),
                None => SystemResolver.lookup(host, port).await,
            }
        })
    }
}

/// Addresses a name may be rebound to that the Management Service's default policy
/// (`public,loopback`) must refuse: link-local, metadata, unspecified, multicast, the
/// IPv4-mapped IPv6 forms of those, and private ranges (not in the policy).
const FORBIDDEN: &[&str] = &[
    "169.254.169.254",
    "169.254.1.1",
    "::ffff:169.254.169.254",
    "fe80::1",
    "fe80::a9fe:a9fe",
    "fd00:ec2::254",
    "0.0.0.0",
    "::",
    "::ffff:0.0.0.0",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "::ffff:224.0.0.1",
    "255.255.255.255",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.10",
    "100.64.0.1",
    "fd12:3456::1",
    "::ffff:10.0.0.1",
    "::ffff:192.168.1.10",
];

async fn spawn(b: Backend, dns: Arc<FakeDns>) -> TestApp {
    let setup = Setup::new(b).await;
    let mut config = setup.config();
    assert_eq!(config.egress_allow, "public,loopback", "the default policy");
    config.egress_resolver = Some(dns);
    setup
        .spawn_with_config(config, Arc::new(SystemClock))
        .await
        .unwrap()
}

fn refused_by_policy(r: &postwire_tests::Resp, what: &str) {
    assert_eq!(r.status, 502, "{what}: {}", r.text);
    assert_eq!(
        r.headers["content-type"], "application/problem+json",
        "{what}"
    );
    assert!(
        r.text.contains("not allowed by POSTWIRE_EGRESS_ALLOW"),
        "{what}: {}",
        r.text
    );
}

async fn smtp_connections(peer: &SmtpPeer) -> u64 {
    peer.state().await["counters"]["connections"]
        .as_u64()
        .unwrap()
}

/// An SMTP host name that resolves to the (loopback, allowed) SMTP peer when the settings are
/// saved and the first test email goes out, then to each forbidden address: every later test
/// email is refused with 502 naming the policy, and the peer sees no new connection. A saved
/// IP literal of each forbidden address is refused the same way.
async fn smtp_host_rebinding(b: Backend) {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::None,
        no_auth: true,
        ..SmtpPeerOptions::default()
    })
    .await;
    let dns = Arc::new(FakeDns::default());
    dns.set("mail.rebind.test", &["127.0.0.1"]);
    let app = spawn(b, dns.clone()).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let settings = |host: &str| {
        json!({
            "provider": "custom",
            "server": {"host": host, "port": peer.port(), "encryption": "none"},
            "auth": {"method": "none"},
            "senders": [{"address": "scanner@acme.example", "default": true}]
        })
    };
    let r = app
        .put(
            "/api/v1/tenants/acme/email-settings",
            &t,
            &settings("mail.rebind.test"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let to = json!({"to": "it@acme.example"});
    let test_email = || app.post("/api/v1/tenants/acme/email-settings/test", &t, &to);
    let r = test_email().await;
    assert_eq!(
        r.status, 200,
        "while the name resolves to loopback: {}",
        r.text
    );
    assert_eq!(peer.messages().await.len(), 1);
    let connections = smtp_connections(&peer).await;
    assert!(connections >= 1);

    for ip in FORBIDDEN {
        dns.set("mail.rebind.test", &[ip]);
        let before = dns.lookups_of("mail.rebind.test");
        let r = test_email().await;
        refused_by_policy(&r, &format!("mail.rebind.test -> {ip}"));
        assert!(
            dns.lookups_of("mail.rebind.test") > before,
            "{ip}: the name was resolved again at connect time"
        );
    }
    // an answer with a forbidden and an allowed address: only the allowed one is used
    dns.set("mail.rebind.test", &["169.254.169.254", "127.0.0.1"]);
    let r = test_email().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(peer.messages().await.len(), 2);

    // the forbidden addresses saved as IP literals: refused at connect time as well
    for ip in FORBIDDEN {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            (*ip).to_owned()
        };
        let r = app
            .put("/api/v1/tenants/acme/email-settings", &t, &settings(&host))
            .await;
        if r.status == 422 {
            // refusing at save time is fine too, as long as the field is named
            assert_eq!(r.fields(), vec!["server.host"], "{host}");
            continue;
        }
        assert_eq!(r.status, 200, "{host}: {}", r.text);
        refused_by_policy(&test_email().await, &host);
    }
    assert_eq!(peer.messages().await.len(), 2, "nothing else was delivered");
    // the two deliveries above are the only new connections the peer saw
    assert!(smtp_connections(&peer).await <= connections + 1);
}
dual_test!(smtp_host_rebinding);

/// The OAuth token URL on a name (`localhost`: plain http is allowed only for loopback names,
/// and the test's resolver answers for it) that resolves to the (loopback) provider when the grant is
/// first authorized, and to the metadata address and other forbidden ones later: the code
/// exchange is refused at connect time, the provider's token endpoint sees no new call and no
/// grant changes.
async fn token_url_rebinding(b: Backend) {
    let oauth = crate::oauth::peer(3600).await;
    let dns = Arc::new(FakeDns::default());
    dns.set("localhost", &["127.0.0.1"]);
    let app = spawn(b, dns.clone()).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let mut s: Value = crate::oauth::oauth_settings(&oauth);
    s["auth"]["token_url"] = json!(oauth.token_url().replace("127.0.0.1", "localhost"));
    assert!(
        s["auth"]["token_url"]
            .as_str()
            .unwrap()
            .contains("localhost")
    );
    let r = app.put("/api/v1/tenants/acme/email-settings", &t, &s).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let cb = crate::oauth::start(&app, "acme", &t).await;
    let r = crate::oauth::callback(&app, &cb).await;
    assert_eq!(
        r.status, 200,
        "while the name resolves to loopback: {}",
        r.text
    );
    let calls = oauth.token_calls().await.total;
    assert_eq!(calls, 1);

    for ip in [
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "fe80::1",
        "0.0.0.0",
        "10.0.0.1",
    ] {
        dns.set("localhost", &[ip]);
        let cb = crate::oauth::start(&app, "acme", &t).await;
        let r = crate::oauth::callback(&app, &cb).await;
        assert_eq!(r.status, 502, "{ip}: {}", r.text);
        assert!(
            r.text.contains("not allowed by POSTWIRE_EGRESS_ALLOW"),
            "{ip}: {}",
            r.text
        );
    }
    assert_eq!(
        oauth.token_calls().await.total,
        calls,
        "the provider was not reached again"
    );
}
dual_test!(token_url_rebinding);

/// Token URLs whose host is a forbidden IP literal, in every spelling the URL parser accepts
/// (dotted, decimal, hex, octal, IPv6, IPv4-mapped IPv6): saved or not, the code exchange
/// never connects there (502 naming the policy) and no grant is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_url_ip_literals() {
    let oauth = crate::oauth::peer(3600).await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let mut checked = 0;
    for host in [
        "169.254.169.254",
        "2852039166",
        "0xa9fea9fe",
        "0251.0376.0251.0376",
        "169.254.43518",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
        "[fe80::1]",
        "[fd00:ec2::254]",
        "0.0.0.0",
        "[::]",
        "224.0.0.1",
        "10.0.0.1",
        "192.168.0.1",
    ] {
        let mut s: Value = crate::oauth::oauth_settings(&oauth);
        s["auth"]["token_url"] = json!(format!("https://{host}/token"));
        let r = app.put("/api/v1/tenants/acme/email-settings", &t, &s).await;
        if r.status == 422 {
            assert_eq!(r.fields(), vec!["auth.token_url"], "{host}");
            continue;
        }
        assert_eq!(r.status, 200, "{host}: {}", r.text);
        let cb = crate::oauth::start(&app, "acme", &t).await;
        let r = crate::oauth::callback(&app, &cb).await;
        assert_eq!(r.status, 502, "{host}: {}", r.text);
        assert!(
            r.text.contains("not allowed by POSTWIRE_EGRESS_ALLOW"),
            "{host}: {}",
            r.text
        );
        checked += 1;
    }
    assert!(checked >= 10, "{checked}");
    eprintln!("token URL literals: {checked} cases");
    let g = app.get("/api/v1/tenants/acme/email-settings", &t).await;
    assert_eq!(g.json()["oauth"]["status"], "not_authorized");
}

/// The issuer's discovery document (and so its JWKS) is fetched through the same policy: an
/// issuer on a name rebound to the metadata address fails the callback before any token
/// exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_url_rebinding() {
    let oauth = crate::oauth::peer(3600).await;
    let dns = Arc::new(FakeDns::default());
    let app = spawn(Backend::Sqlite, dns.clone()).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let mut s: Value = crate::oauth::oauth_settings(&oauth);
    s["auth"]["issuer"] = json!(oauth.issuer().replace("127.0.0.1", "localhost"));
    assert!(s["auth"]["issuer"].as_str().unwrap().contains("localhost"));
    let r = app.put("/api/v1/tenants/acme/email-settings", &t, &s).await;
    assert_eq!(r.status, 200, "{}", r.text);
    for ip in ["169.254.169.254", "::ffff:169.254.169.254", "fe80::1"] {
        dns.set("localhost", &[ip]);
        let cb = crate::oauth::start(&app, "acme", &t).await;
        let r = crate::oauth::callback(&app, &cb).await;
        assert_eq!(r.status, 502, "{ip}: {}", r.text);
        assert!(
            r.text.contains("not allowed by POSTWIRE_EGRESS_ALLOW"),
            "{ip}: {}",
            r.text
        );
        assert!(dns.lookups_of("localhost") > 0);
    }
    assert_eq!(oauth.token_calls().await.total, 0, "no exchange was tried");
}

/// The site mailer (default policy `public,private,loopback`) delivering to an SMTP host name
/// that resolves to the (loopback) SMTP peer, then to the metadata address and other special
/// addresses: those messages wait with the policy as their last error and the peer sees no
/// connection; rebound back, they are delivered. The check runs at every connect, on the
/// current answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_mailer_smtp_rebinding() {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::None,
        no_auth: true,
        ..SmtpPeerOptions::default()
    })
    .await;
    let mgmt = TestApp::spawn(Backend::Sqlite).await;
    mgmt.create_tenant("acme").await;
    let t = mgmt.admin_token("acme");
    let r = mgmt
        .put(
            "/api/v1/tenants/acme/email-settings",
            &t,
            &json!({
                "provider": "custom",
                "server": {"host": "mail.rebind.test", "port": peer.port(), "encryption": "none"},
                "auth": {"method": "none"},
                "senders": [{"address": "scanner@acme.example", "default": true}]
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let site = mgmt
        .post("/api/v1/tenants/acme/sites", &t, &json!({"name": "Brno"}))
        .await
        .json();
    let dns = Arc::new(FakeDns::default());
    dns.set("mail.rebind.test", &["127.0.0.1"]);
    let data_dir = std::env::temp_dir().join(format!("site-mailer-ssrf-{}", uuid::Uuid::new_v4()));
    const KEY: &str = "ssrf-test-local-api-key-0123456789";
    let mut env = std::collections::BTreeMap::new();
    for (k, v) in [
        ("POSTWIRE_LISTEN", "127.0.0.1:0"),
        ("POSTWIRE_MANAGEMENT_URL", mgmt.address.as_str()),
        ("POSTWIRE_SITE_ID", site["site_id"].as_str().unwrap()),
        ("POSTWIRE_SITE_SECRET", site["secret"].as_str().unwrap()),
        ("POSTWIRE_API_KEY", KEY),
        ("POSTWIRE_DATA_DIR", data_dir.to_str().unwrap()),
        ("POSTWIRE_RETRY_INITIAL", "100ms"),
        ("POSTWIRE_RETRY_MAX_DELAY", "300ms"),
    ] {
        env.insert(k.to_owned(), v.to_owned());
    }
    let mut config = site_mailer::config::Config::from_sources(None, &env).unwrap();
    assert_eq!(config.egress_allow, "public,private,loopback");
    config.egress_resolver = Some(dns.clone());
    let app = site_mailer::startup::Application::build(config)
        .await
        .unwrap();
    let address = format!("http://127.0.0.1:{}", app.port());
    let stopper = app.stopper();
    tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    let send = |subject: &str| {
        let req = client
            .post(format!("{address}/v1/messages"))
            .bearer_auth(KEY)
            .json(&json!({"kind": "test", "to": ["it@acme.example"], "subject": subject}));
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 202);
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let wait = |id: String, done: fn(&Value) -> bool| {
        let req = client
            .get(format!("{address}/v1/messages/{id}"))
            .bearer_auth(KEY);
        async move {
            for _ in 0..400 {
                let m: Value = req
                    .try_clone()
                    .unwrap()
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if done(&m) {
                    return m;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("message {id} never reached the expected state");
        }
    };
    let first = send("while loopback").await;
    wait(first, |m| m["status"] == "sent").await;
    assert_eq!(peer.messages().await.len(), 1);
    let connections = smtp_connections(&peer).await;

    let mut waiting = Vec::new();
    for ip in [
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "fe80::1",
        "0.0.0.0",
        "224.0.0.1",
    ] {
        dns.set("mail.rebind.test", &[ip]);
        let id = send(&format!("rebound to {ip}")).await;
        let m = wait(id.clone(), |m| {
            m["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("not allowed by POSTWIRE_EGRESS_ALLOW"))
        })
        .await;
        // waiting for its next attempt, or in it already (the retry delay is short here):
        // neither sent nor failed
        assert!(
            m["status"] == "queued" || m["status"] == "sending",
            "{ip}: {m}"
        );
        assert!(
            m["last_error"]
                .as_str()
                .unwrap()
                .contains(ip.trim_start_matches("::ffff:")),
            "{ip}: {m}"
        );
        waiting.push(id);
    }
    assert_eq!(peer.messages().await.len(), 1, "nothing reached the peer");
    assert_eq!(
        smtp_connections(&peer).await,
        connections,
        "no connection was made"
    );

    // back to the allowed address: every waiting message goes out
    dns.set("mail.rebind.test", &["127.0.0.1"]);
    for id in waiting {
        wait(id, |m| m["status"] == "sent").await;
    }
    assert_eq!(peer.messages().await.len(), 6);
    stopper.stop().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A token endpoint that answers with a redirect (to an address the policy would refuse if
/// it were checked, or to anywhere): the redirect is not followed, the exchange fails with
/// 502 and the redirect target sees no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_redirects_are_not_followed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let oauth = crate::oauth::peer(3600).await;
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let target = actix_web::HttpServer::new(move || {
        let counted = counted.clone();
        actix_web::App::new().default_service(actix_web::web::to(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { actix_web::HttpResponse::Ok().body("{}") }
        }))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let target_addr = target.addrs()[0];
    tokio::spawn(target.run());
    let redirector = actix_web::HttpServer::new(move || {
        actix_web::App::new().default_service(actix_web::web::to(move || async move {
            actix_web::HttpResponse::TemporaryRedirect()
                .insert_header(("location", format!("http://{target_addr}/steal")))
                .finish()
        }))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let redirector_addr = redirector.addrs()[0];
    tokio::spawn(redirector.run());

    let app = TestApp::spawn(Backend::Sqlite).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let mut s: Value = crate::oauth::oauth_settings(&oauth);
    s["auth"]["token_url"] = json!(format!("http://{redirector_addr}/token"));
    let r = app.put("/api/v1/tenants/acme/email-settings", &t, &s).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let cb = crate::oauth::start(&app, "acme", &t).await;
    let r = crate::oauth::callback(&app, &cb).await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
    let g = app.get("/api/v1/tenants/acme/email-settings", &t).await;
    assert_eq!(g.json()["oauth"]["status"], "not_authorized");
}
