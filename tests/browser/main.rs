//! The admin page (`/admin/`) end to end in a real headless Chromium (Debian's
//! `/usr/bin/chromium`, driven by npm `playwright-core` from `tests/browser/node_modules`).
//!
//! This test starts the real peers (the OAuth 2.0 / OpenID server and the SMTP server that
//! verifies XOAUTH2 tokens against the OAuth server's keys) and a live Management Service on
//! port 0, prints a sign-in link with the real `management-service token ... --open-url`, and
//! then runs `node tests/browser/admin-page.test.mjs`, which clicks through the page. The
//! browser reaches the service as `http://postwire.localhost` (Chromium's
//! `--host-resolver-rules` maps that name to the service's port), which is also the public
//! URL, so the OAuth callback comes back to the page's own origin as in production.
//! Afterwards the test checks on the server side what the clicks stored and sent.
//!
//! Screenshots of the main states go to `target/browser-artifacts/` (not committed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use postwire_tests::peers::{OAuthPeer, OAuthPeerOptions, SmtpPeer, SmtpPeerOptions};
use postwire_tests::{Backend, Setup, TestApp};

/// The name the browser uses for the service (a `localhost` name: a secure context).
const PUBLIC_HOST: &str = "postwire.localhost";
/// The user the OAuth server authorizes.
const USER: &str = "sender@acme.example";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// `target/<profile>`, from this test binary's path (`target/<profile>/deps/browser-*`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Builds (when stale) and returns the `management-service` binary, to run its real CLI.
fn management_binary() -> PathBuf {
    let profile = profile_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "-p",
        "management",
        "--bin",
        "management-service",
    ])
    .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .expect("run cargo build for management-service");
    assert!(status.success(), "cargo build -p management failed");
    let bin = profile.join("management-service");
    assert!(bin.is_file(), "{} is missing", bin.display());
    bin
}

/// `management-service token --role tenant_admin --tenant acme --open-url [--ttl T]` with the
/// test server's configuration (same data dir, hence the same JWT key).
fn sign_in_link(setup: &Setup, ttl: &str) -> String {
    let mut cmd = std::process::Command::new(management_binary());
    cmd.args([
        "token",
        "--role",
        "tenant_admin",
        "--tenant",
        "acme",
        "--ttl",
        ttl,
        "--open-url",
        // the README's newcomer path: the tenant is created when missing
        "--create-tenant",
    ]);
    // Only the test's configuration: nothing inherited may configure the CLI.
    for (k, _) in std::env::vars() {
        if k.starts_with("POSTWIRE_") || k == "DATABASE_URL" || k == "REDIS_URL" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(&setup.env);
    let out = cmd.output().expect("run management-service token");
    assert!(
        out.status.success(),
        "management-service token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the link goes to stdout: {stdout:?}");
    lines[0].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_page_in_headless_chromium() {
    let oauth = OAuthPeer::start_with(OAuthPeerOptions {
        username: Some(USER.into()),
        expires_in: Some(3600),
        audience: None,
    })
    .await;
    let smtp = SmtpPeer::start(SmtpPeerOptions::default().trusting(&oauth)).await;
    let mut setup = Setup::new(Backend::Sqlite).await;
    setup.env.insert(
        "POSTWIRE_PUBLIC_URL".into(),
        format!("http://{PUBLIC_HOST}"),
    );
    setup.env.insert(
        "POSTWIRE_EXTRA_CA_FILE".into(),
        smtp.cert_pem_path().to_string_lossy().into_owned(),
    );
    let app: TestApp = setup.spawn().await;
    let port = app.address.rsplit(':').next().unwrap().to_owned();
    let cluster = app.cluster_token();
    assert_eq!(app.get("/api/v1/tenants/acme", &cluster).await.status, 404);

    let link = sign_in_link(&setup, "1h");
    let r = app.get("/api/v1/tenants/acme", &cluster).await;
    assert_eq!(
        r.status, 200,
        "token --create-tenant created acme: {}",
        r.text
    );
    assert_eq!(r.json()["status"], "active");
    assert!(
        link.starts_with(&format!("http://{PUBLIC_HOST}/admin/#token=")),
        "{link}"
    );
    let short_link = sign_in_link(&setup, "20s");

    let artifacts = profile_dir()
        .parent()
        .expect("target")
        .join("browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();

    let dir = browser_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "tests/browser/node_modules is missing: run `npm ci` in tests/browser (scripts/test does it)"
    );
    let mut node = tokio::process::Command::new("node");
    node.arg("--test")
        .arg("--test-reporter=spec")
        .arg(dir.join("admin-page.test.mjs"))
        .current_dir(&dir)
        .env("PW_SIGN_IN_URL", &link)
        .env("PW_SHORT_SIGN_IN_URL", &short_link)
        .env("PW_PUBLIC_HOST", PUBLIC_HOST)
        .env("PW_APP_PORT", &port)
        .env("PW_OAUTH_ISSUER", oauth.issuer())
        .env("PW_OAUTH_USER", USER)
        .env("PW_SMTP_HOST", smtp.host())
        .env("PW_SMTP_PORT", smtp.port().to_string())
        .env("PW_SMTP_CONTROL_URL", smtp.control_url())
        .env("PW_ARTIFACTS", &artifacts)
        .env("PW_CLUSTER_TOKEN", &cluster)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), node.output())
        .await
        .expect("the browser tests finish within 5 minutes")
        .expect("run node (Node.js >= 20.19)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "the browser tests failed ({}); screenshots in {}",
        out.status,
        artifacts.display()
    );

    // What the clicks stored, seen from the API.
    let t = app.admin_token("acme");
    let s = app.get("/api/v1/tenants/acme/email-settings", &t).await;
    assert_eq!(s.status, 200, "{}", s.text);
    let s = s.json();
    assert_eq!(s["provider"], "custom");
    assert_eq!(s["auth"]["method"], "oauth2");
    assert_eq!(s["auth"]["client_secret_set"], true);
    assert_eq!(s["auth"]["authorization_username"], USER);
    assert_eq!(s["auth"]["authorization_url"], oauth.authorize_url());
    assert_eq!(s["oauth"]["status"], "authorized", "{s}");
    assert_eq!(s["senders"][0]["address"], USER);
    assert_eq!(s["senders"][0]["default"], true);
    assert_eq!(s["receivers"][0]["purpose"], "report");
    assert_eq!(s["feature_senders"]["scan_to_email"], USER);

    // What the test email did at the SMTP server: XOAUTH2 as the authorized user.
    let msgs = smtp.messages().await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].auth_method.as_deref(), Some("XOAUTH2"));
    assert_eq!(msgs[0].auth_user.as_deref(), Some(USER));
    assert_eq!(msgs[0].to, vec!["it@acme.example".to_owned()]);

    // The site the page created (the deleted one is gone); its secret was shown once.
    let sites = app.get("/api/v1/tenants/acme/sites", &t).await.json();
    let names: Vec<&str> = sites
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["Brno office"], "{sites}");
}
