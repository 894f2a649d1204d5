//! The OAuth 2.0 grant against a real OAuth/OpenID server (npm oauth2-mock-server behind a
//! strict front: PKCE S256, one-time codes, rotating refresh tokens).

use std::sync::Arc;

use management::clock::ManualClock;
use postwire_tests::peers::{OAuthPeer, OAuthPeerOptions, peer_http_client};
use postwire_tests::{Backend, Resp, Setup, TestApp, dual_test};
use serde_json::{Value, json};

const USER: &str = "sender@acme.example";

pub(crate) async fn peer(expires_in: i64) -> OAuthPeer {
    OAuthPeer::start_with(OAuthPeerOptions {
        username: Some(USER.into()),
        expires_in: Some(expires_in),
        audience: None,
    })
    .await
}

pub(crate) fn oauth_settings(peer: &OAuthPeer) -> Value {
    json!({
        "provider": "custom",
        "server": {"host": "127.0.0.1", "port": 2525, "encryption": "starttls"},
        "auth": {
            "method": "oauth2",
            "client_id": "postwire-client",
            "client_secret": "client-secret-value",
            "authorization_url": peer.authorize_url(),
            "token_url": peer.token_url(),
            "issuer": peer.issuer(),
            "scopes": ["openid", "profile", "email", "offline_access"]
        },
        "senders": [{"address": USER, "default": true}]
    })
}

/// Provisions `tenant` with OAuth settings pointing at the peer.
async fn configure(app: &TestApp, tenant: &str, peer: &OAuthPeer) -> String {
    app.create_tenant(tenant).await;
    let t = app.admin_token(tenant);
    let r = app
        .put(
            &format!("/api/v1/tenants/{tenant}/email-settings"),
            &t,
            &oauth_settings(peer),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    t
}

/// Asks for the provider URL and follows it like the popup would: the provider redirects to
/// our callback, which we call on the test server (the public URL is https://postwire.test).
pub(crate) async fn start(app: &TestApp, tenant: &str, token: &str) -> String {
    let r = app
        .request(
            "POST",
            &format!("/api/v1/tenants/{tenant}/email-settings/oauth/authorize"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(
        v["redirect_uri"],
        "https://postwire.test/oauth2/client/smtp/authorize-callback"
    );
    let url = v["authorization_url"].as_str().unwrap().to_owned();
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    assert!(url.contains("nonce="), "{url}");
    let resp = peer_http_client().get(&url).send().await.unwrap();
    assert!(
        resp.status().is_redirection(),
        "provider answered {}",
        resp.status()
    );
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with("https://postwire.test/oauth2/client/smtp/authorize-callback?"),
        "{location}"
    );
    location.replacen("https://postwire.test", "", 1)
}

pub(crate) async fn callback(app: &TestApp, path_and_query: &str) -> Resp {
    app.request("GET", path_and_query, None, None).await
}

async fn site_token(app: &TestApp, tenant: &str) -> String {
    let site = app
        .post(
            &format!("/api/v1/tenants/{tenant}/sites"),
            &app.admin_token(tenant),
            &json!({"name": "HQ"}),
        )
        .await
        .json();
    let r = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": site["site_id"], "secret": site["secret"]})),
        )
        .await;
    r.json()["access_token"].as_str().unwrap().to_owned()
}

async fn full_flow(b: Backend) {
    let peer = peer(3600).await;
    let app = TestApp::spawn(b).await;
    let t = configure(&app, "acme", &peer).await;
    let before = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json();
    assert_eq!(before["oauth"]["status"], "not_authorized");
    assert_eq!(
        before["oauth"]["redirect_uri"],
        "https://postwire.test/oauth2/client/smtp/authorize-callback"
    );

    let cb = start(&app, "acme", &t).await;
    let page = callback(&app, &cb).await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert!(
        page.text.contains("Authorized as sender@acme.example"),
        "{}",
        page.text
    );
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(
        page.text
            .contains("<script src=\"/oauth2/client/smtp/callback.js\"></script>")
    );
    assert!(!page.text.contains("<script>"), "no inline script");
    let js = app
        .request("GET", "/oauth2/client/smtp/callback.js", None, None)
        .await;
    assert!(js.text.contains("postMessage") && js.text.contains("window.location.origin"));

    let after = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json();
    assert_eq!(after["oauth"]["status"], "authorized", "{after}");
    assert_eq!(after["oauth"]["username"], USER);
    assert_eq!(
        after["auth"]["authorization_username"], USER,
        "prefilled from the ID token"
    );
    assert!(after["oauth"]["access_token_expires_at"].is_string());

    // replaying the same callback changes nothing
    let replay = callback(&app, &cb).await;
    assert_eq!(replay.status, 400, "{}", replay.text);

    // a site obtains the access token; the refresh token never leaves
    let st = site_token(&app, "acme").await;
    let tok = app.get("/api/v1/site/smtp-access-token", &st).await;
    assert_eq!(tok.status, 200, "{}", tok.text);
    let v = tok.json();
    assert_eq!(v["username"], USER);
    let access = v["access_token"].as_str().unwrap().to_owned();
    assert!(access.starts_with("eyJ"), "a JWT from the provider");
    assert!(!tok.text.contains("refresh"));
    let cfg = app.get("/api/v1/site/email-config", &st).await;
    assert!(!cfg.text.contains("refresh"), "{}", cfg.text);
    assert_eq!(cfg.json()["auth"]["authorization_username"], USER);
    assert_eq!(
        peer.token_calls().await.refresh_token,
        0,
        "served from the cache"
    );

    // the raw row holds ciphertext only
    let row = app
        .query_one("SELECT refresh_token_ct, access_token_ct FROM oauth_grants")
        .await
        .unwrap();
    let rt: Vec<u8> = row.try_get("", "refresh_token_ct").unwrap();
    let at: Vec<u8> = row.try_get("", "access_token_ct").unwrap();
    for ct in [&rt, &at] {
        assert!(!ct.windows(3).any(|w| w == b"eyJ"), "no JWT in the clear");
        assert!(!ct.windows(20).any(|w| w == &access.as_bytes()[..20]));
    }

    // the grant serves a token in-process too (tenant deletion: see tenant_deletion_wipes_grant_and_cache)
    assert!(
        app.state
            .grants
            .access_token(&mail_core::domain::TenantId::parse("acme").unwrap(), None)
            .await
            .is_ok()
    );

    // forget: the grant and its cached token go
    assert_eq!(
        app.delete("/api/v1/tenants/acme/email-settings/oauth", &t)
            .await
            .status,
        204
    );
    assert_eq!(
        app.get("/api/v1/tenants/acme/email-settings", &t)
            .await
            .json()["oauth"]["status"],
        "not_authorized"
    );
    assert_eq!(
        app.get("/api/v1/site/smtp-access-token", &st).await.status,
        409
    );
    let audit = app.get("/api/v1/tenants/acme/audit", &t).await.json();
    assert_eq!(audit[0]["action"], "oauth.forgotten");
}
dual_test!(full_flow);

async fn state_edge_cases(b: Backend) {
    let peer = peer(3600).await;
    let setup = Setup::new(b).await;
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let app = setup.try_spawn(clock.clone()).await.unwrap();
    let t = configure(&app, "acme", &peer).await;

    // unknown state, missing state
    assert_eq!(
        callback(
            &app,
            "/oauth2/client/smtp/authorize-callback?code=x&state=nope"
        )
        .await
        .status,
        400
    );
    assert_eq!(
        callback(&app, "/oauth2/client/smtp/authorize-callback?code=x")
            .await
            .status,
        400
    );

    // expired state (injected clock: 11 minutes later)
    let cb = start(&app, "acme", &t).await;
    clock.advance(chrono::Duration::minutes(11));
    let r = callback(&app, &cb).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("expired"));
    assert!(!has_grant(&app).await);

    // the provider's access_denied, shown HTML-escaped; unknown parameters ignored
    peer.deny_next_authorize().await;
    let cb = start(&app, "acme", &t).await;
    assert!(cb.contains("error=access_denied"), "{cb}");
    let r = callback(
        &app,
        &format!("{cb}&error_description=%3Cscript%3Ealert(1)%3C%2Fscript%3E&unknown=1"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.text.contains("access_denied"));
    assert!(
        r.text.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        r.text
    );
    assert!(!r.text.contains("<script>alert"));
    assert!(!has_grant(&app).await);

    // wrong PKCE verifier: the provider refuses the exchange, nothing is stored
    let cb = start(&app, "acme", &t).await;
    let wrong = app.state.store.keys.encrypt(
        mail_core::crypto::Binding {
            owner: "acme",
            column: "oauth_pending.verifier",
        },
        b"a-completely-different-verifier-that-is-long-enough-0123456789",
    );
    replace_pending(&app, b, "verifier_ct", sea_orm::Value::Bytes(Some(wrong))).await;
    let r = callback(&app, &cb).await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert!(!has_grant(&app).await);

    // nonce mismatch
    let cb = start(&app, "acme", &t).await;
    replace_pending(
        &app,
        b,
        "nonce",
        sea_orm::Value::String(Some("another-nonce".into())),
    )
    .await;
    let r = callback(&app, &cb).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("nonce"), "{}", r.text);
    assert!(!has_grant(&app).await);

    // an ID token not signed by the configured issuer's keys
    let impostor = peer_other().await;
    let mut s = oauth_settings(&peer);
    s["auth"]["issuer"] = json!(impostor.issuer());
    assert_eq!(
        app.put("/api/v1/tenants/acme/email-settings", &t, &s)
            .await
            .status,
        200
    );
    let cb = start(&app, "acme", &t).await;
    let r = callback(&app, &cb).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.text.contains("invalid_id_token") || r.text.contains("invalid_issuer"),
        "{}",
        r.text
    );
    assert!(!has_grant(&app).await);
}
dual_test!(state_edge_cases);

/// The value of one series in a Prometheus text exposition.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
}

async fn has_grant(app: &TestApp) -> bool {
    app.query_one("SELECT tenant_id FROM oauth_grants")
        .await
        .is_some()
}

async fn peer_other() -> OAuthPeer {
    peer(3600).await
}

/// Overwrites a column of the (single) pending authorization that is not used yet.
async fn replace_pending(app: &TestApp, b: Backend, column: &str, value: sea_orm::Value) {
    use sea_orm::{ConnectionTrait, Statement};
    let db = &app.state.store.db;
    let sql = match b {
        Backend::Postgres => {
            format!("UPDATE oauth_pending SET {column} = $1 WHERE used_at IS NULL")
        }
        Backend::Sqlite => format!("UPDATE oauth_pending SET {column} = ? WHERE used_at IS NULL"),
    };
    let r = db
        .execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            [value],
        ))
        .await
        .unwrap();
    assert!(r.rows_affected() >= 1);
}

async fn rotation_and_invalid_grant(b: Backend) {
    let peer = peer(3600).await;
    let app = TestApp::spawn(b).await;
    let t = configure(&app, "acme", &peer).await;
    let cb = start(&app, "acme", &t).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
    let st = site_token(&app, "acme").await;
    // a site's hourly refresh asks for more validity than the cached token has: refreshed
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let r = app
            .get("/api/v1/site/smtp-access-token?min_validity=7200", &st)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        seen.insert(r.json()["access_token"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 3, "each forced refresh gave a new token");
    // every refresh used the newest (rotated) refresh token: the strict provider refuses used ones
    assert_eq!(peer.token_calls().await.refresh_token, 3);
    let metrics = app.request("GET", "/metrics", None, None).await.text;
    assert_eq!(
        metric(
            &metrics,
            "postwire_token_refreshes_total{result=\"success\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(&metrics, "postwire_oauth_grants{status=\"authorized\"}"),
        1.0
    );
    // a revoked grant is dead
    peer.revoke_all().await;
    let r = app
        .get("/api/v1/site/smtp-access-token?min_validity=7200", &st)
        .await;
    assert_eq!(r.status, 409, "{}", r.text);
    let v = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json();
    assert_eq!(v["oauth"]["status"], "reauthorization_required");
    assert!(
        v["oauth"]["last_error"]
            .as_str()
            .unwrap()
            .contains("invalid_grant"),
        "{v}"
    );
    // the cached token is gone too, and no further provider calls are made
    let calls = peer.token_calls().await.refresh_token;
    assert_eq!(
        app.get("/api/v1/site/smtp-access-token", &st).await.status,
        409
    );
    assert_eq!(peer.token_calls().await.refresh_token, calls);
    // authorizing again recovers
    let cb = start(&app, "acme", &t).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
    assert_eq!(
        app.get("/api/v1/site/smtp-access-token", &st).await.status,
        200
    );
}
dual_test!(rotation_and_invalid_grant);

async fn settings_change_requires_reauthorization(b: Backend) {
    let peer = peer(3600).await;
    let app = TestApp::spawn(b).await;
    let t = configure(&app, "acme", &peer).await;
    let cb = start(&app, "acme", &t).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
    // a round trip that changes nothing keeps the grant
    let v = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json();
    let r = app.put("/api/v1/tenants/acme/email-settings", &t, &v).await;
    assert_eq!(r.json()["oauth"]["status"], "authorized");
    // new scopes: the grant is void
    let mut changed = v.clone();
    changed["auth"]["scopes"] = json!(["openid", "offline_access"]);
    let r = app
        .put("/api/v1/tenants/acme/email-settings", &t, &changed)
        .await
        .json();
    assert_eq!(r["oauth"]["status"], "reauthorization_required");
    assert!(
        r["oauth"]["last_error"]
            .as_str()
            .unwrap()
            .contains("scopes"),
        "{r}"
    );
}
dual_test!(settings_change_requires_reauthorization);

/// 3 Management Service instances on one PostgreSQL and one Redis, 1,000 concurrent token
/// requests while a 4-second access token expires several times: no failure, and one
/// provider refresh per expiry (the strict provider refuses a used refresh token, so a
/// duplicate refresh would also show up as failures).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_flight_across_three_replicas() {
    let peer = peer(4).await;
    let mut setup = Setup::new(Backend::Postgres).await;
    setup.env.insert(
        "REDIS_URL".into(),
        std::env::var("POSTWIRE_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    );
    let apps = [
        setup.spawn().await,
        setup.spawn().await,
        setup.spawn().await,
    ];
    let tenant = format!("sf-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let t = configure(&apps[0], &tenant, &peer).await;
    let cb = start(&apps[0], &tenant, &t).await;
    assert_eq!(callback(&apps[1], &cb).await.status, 200);
    let site = site_token(&apps[0], &tenant).await;

    let started = std::time::Instant::now();
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..1000u64 {
        let (addr, tok, client) = (
            apps[(i % 3) as usize].address.clone(),
            site.clone(),
            client.clone(),
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(i * 10)).await;
            match client
                .get(format!("{addr}/api/v1/site/smtp-access-token"))
                .bearer_auth(tok)
                .send()
                .await
            {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    (
                        status,
                        v["access_token"].as_str().unwrap_or_default().to_owned(),
                    )
                }
                Err(e) => (0, format!("transport error: {e:?}")),
            }
        }));
    }
    let mut failures = Vec::new();
    let mut tokens = std::collections::HashSet::new();
    for task in tasks {
        let (status, tok) = task.await.unwrap();
        if status != 200 {
            failures.push((status, tok));
        } else {
            tokens.insert(tok);
        }
    }
    let failures_n = failures.len();
    if let Some(f) = failures.first() {
        eprintln!("first failure: {f:?}");
    }
    let failures = failures_n;
    let elapsed = started.elapsed().as_secs_f64();
    let refreshes = peer.token_calls().await.refresh_token;
    eprintln!(
        "1000 requests over {elapsed:.1}s: {failures} failures, {refreshes} provider refreshes, {} distinct tokens",
        tokens.len()
    );
    assert_eq!(failures, 0);
    // a 4 s token is refreshed when it has less than 2 s left (default min validity)
    let max = (elapsed / 2.0).ceil() as u64 + 1;
    assert!(
        refreshes >= 3,
        "the token expired several times ({refreshes} refreshes)"
    );
    assert!(
        refreshes <= max,
        "{refreshes} refreshes in {elapsed:.1}s: more than one per expiry (max {max})"
    );
    assert!(
        tokens.len() as u64 <= refreshes + 1,
        "every token served came from the code exchange or a counted refresh"
    );
    let v = apps[2]
        .get(&format!("/api/v1/tenants/{tenant}/email-settings"), &t)
        .await
        .json();
    assert_eq!(v["oauth"]["status"], "authorized");
}

/// A private Redis stopped mid-test: tokens are still served (memory and the grant row), and
/// refreshes still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back() {
    let redis = postwire_tests::PrivateRedis::start().await;
    let peer = peer(3600).await;
    let mut setup = Setup::new(Backend::Sqlite).await;
    setup.env.insert("REDIS_URL".into(), redis.url());
    let app = setup.spawn().await;
    let t = configure(&app, "acme", &peer).await;
    let cb = start(&app, "acme", &t).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
    let st = site_token(&app, "acme").await;
    assert_eq!(
        app.get("/api/v1/site/smtp-access-token", &st).await.status,
        200
    );
    assert!(
        redis.get("postwire:v1:token:acme").await.is_some(),
        "the token is in Redis"
    );
    drop(redis); // stops the private Redis
    for q in ["", "?min_validity=7200", ""] {
        let r = app
            .get(&format!("/api/v1/site/smtp-access-token{q}"), &st)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // a second instance (cold memory) serves from the grant row
    let other = setup.spawn().await;
    assert_eq!(
        other
            .get("/api/v1/site/smtp-access-token", &st)
            .await
            .status,
        200
    );
}

/// A site of tenant B receives only B's cache key: it cannot read (or forge) A's entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_keys_are_per_tenant() {
    let redis = postwire_tests::PrivateRedis::start().await;
    let peer = peer(3600).await;
    let mut setup = Setup::new(Backend::Sqlite).await;
    setup.env.insert("REDIS_URL".into(), redis.url());
    let app = setup.spawn().await;
    let ta = configure(&app, "tenant-a", &peer).await;
    let _tb = configure(&app, "tenant-b", &peer).await;
    let cb = start(&app, "tenant-a", &ta).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
    let site_a = site_token(&app, "tenant-a").await;
    let site_b = site_token(&app, "tenant-b").await;
    let tok = app
        .get("/api/v1/site/smtp-access-token", &site_a)
        .await
        .json();
    let key_of = |cfg: Value| {
        use base64::Engine as _;
        let k = base64::engine::general_purpose::STANDARD
            .decode(cfg["token_cache"]["key"].as_str().unwrap())
            .unwrap();
        (
            secrecy::SecretSlice::from(k),
            cfg["token_cache"]["redis_key"].as_str().unwrap().to_owned(),
        )
    };
    let (key_a, rk_a) = key_of(app.get("/api/v1/site/email-config", &site_a).await.json());
    let (key_b, rk_b) = key_of(app.get("/api/v1/site/email-config", &site_b).await.json());
    assert_eq!(rk_a, "postwire:v1:token:tenant-a");
    assert_eq!(rk_b, "postwire:v1:token:tenant-b");
    let raw = redis.get(&rk_a).await.expect("A's token is cached");
    let opened =
        mail_core::token_cache::open(&key_a, &rk_a, &raw).expect("A's site reads A's token");
    assert_eq!(
        opened.access_token.expose(),
        tok["access_token"].as_str().unwrap()
    );
    assert!(
        mail_core::token_cache::open(&key_b, &rk_a, &raw).is_none(),
        "B's key cannot read A's token"
    );
    // nor forge one: a value sealed with B's key is not accepted under A's key
    let forged = mail_core::token_cache::seal(&key_b, &rk_a, &opened).unwrap();
    assert!(mail_core::token_cache::open(&key_a, &rk_a, &forged).is_none());
}

/// The keeper refreshes a grant no one used, with the injected clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_refreshes_idle_grants() {
    let peer = peer(3600).await;
    let setup = Setup::new(Backend::Sqlite).await;
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let app = setup.try_spawn(clock.clone()).await.unwrap();
    let t = configure(&app, "acme", &peer).await;
    let cb = start(&app, "acme", &t).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
    let before = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json()["oauth"]["refreshed_at"]
        .clone();
    assert_eq!(
        app.state.grants.keepalive_once(4).await,
        0,
        "fresh grants are left alone"
    );
    clock.advance(chrono::Duration::hours(25));
    assert_eq!(app.state.grants.keepalive_once(4).await, 1);
    assert_eq!(peer.token_calls().await.refresh_token, 1);
    let after = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json()["oauth"]["refreshed_at"]
        .clone();
    assert_ne!(before, after);
    assert_eq!(
        app.state.grants.keepalive_once(4).await,
        0,
        "refreshed: not due again"
    );
}

/// Early warnings: a client secret about to expire, and a failing refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_are_shown() {
    let peer = peer(3600).await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let t = configure(&app, "acme", &peer).await;
    let cb = start(&app, "acme", &t).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
    let mut v = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json();
    let soon = (chrono::Utc::now() + chrono::Duration::days(10)).date_naive();
    v["auth"]["client_secret_expires_at"] = json!(soon.to_string());
    let r = app
        .put("/api/v1/tenants/acme/email-settings", &t, &v)
        .await
        .json();
    let w = r["oauth"]["warnings"].to_string();
    assert!(w.contains("client secret expires on"), "{w}");
    peer.fail_token_endpoint_until_reset(503).await;
    let st = site_token(&app, "acme").await;
    let r = app
        .get("/api/v1/site/smtp-access-token?min_validity=7200", &st)
        .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(r.headers.contains_key("retry-after"));
    let v = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json();
    assert_eq!(
        v["oauth"]["status"], "authorized",
        "transient errors keep the grant"
    );
    assert!(
        v["oauth"]["warnings"]
            .to_string()
            .contains("token refresh failing since"),
        "{v}"
    );
    peer.stop_failing_token_endpoint().await;
    assert_eq!(
        app.get("/api/v1/site/smtp-access-token?min_validity=7200", &st)
            .await
            .status,
        200
    );
    let v = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json();
    assert!(
        !v["oauth"]["warnings"].to_string().contains("failing"),
        "{v}"
    );
}

/// A grant forgotten on one replica stops being served by another within seconds (the
/// in-process copy is trusted for 5 s only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_reaches_other_replicas() {
    let peer = peer(3600).await;
    let setup = Setup::new(Backend::Sqlite).await;
    let (a, b) = (setup.spawn().await, setup.spawn().await);
    let t = configure(&a, "acme", &peer).await;
    let cb = start(&a, "acme", &t).await;
    assert_eq!(callback(&a, &cb).await.status, 200);
    let st = site_token(&a, "acme").await;
    assert_eq!(
        b.get("/api/v1/site/smtp-access-token", &st).await.status,
        200
    );
    assert_eq!(
        a.delete("/api/v1/tenants/acme/email-settings/oauth", &t)
            .await
            .status,
        204
    );
    tokio::time::sleep(std::time::Duration::from_millis(5500)).await;
    assert_eq!(
        b.get("/api/v1/site/smtp-access-token", &st).await.status,
        409
    );
}

/// Outbound OAuth calls obey POSTWIRE_EGRESS_ALLOW after DNS resolution: with `public` only,
/// a provider on loopback (by IP literal or by name) is refused at connect time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policy_applies_to_provider_calls() {
    let peer = peer(3600).await;
    let mut setup = Setup::new(Backend::Sqlite).await;
    setup
        .env
        .insert("POSTWIRE_EGRESS_ALLOW".into(), "public".into());
    let app = setup.spawn().await;
    let t = configure(&app, "acme", &peer).await;
    for issuer in [
        peer.issuer().to_owned(),
        peer.issuer().replace("127.0.0.1", "localhost"),
    ] {
        let mut s = oauth_settings(&peer);
        s["auth"]["issuer"] = json!(issuer);
        assert_eq!(
            app.put("/api/v1/tenants/acme/email-settings", &t, &s)
                .await
                .status,
            200
        );
        let cb = start(&app, "acme", &t).await;
        let r = callback(&app, &cb).await;
        assert_eq!(r.status, 502, "{}", r.text);
        assert!(
            r.text.contains("not allowed by POSTWIRE_EGRESS_ALLOW"),
            "{}",
            r.text
        );
    }
    assert_eq!(
        peer.token_calls().await.total,
        0,
        "the provider was never reached"
    );
}

/// Google preset with every URL edited to point at the local provider: the preset's extras
/// (access_type=offline, prompt=consent) go into the authorization URL, and a grant older than
/// 6 days warns about Google's 7-day limit for apps in testing mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_extras_and_testing_mode_warning() {
    let peer = peer(3600).await;
    let setup = Setup::new(Backend::Sqlite).await;
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let app = setup.try_spawn(clock.clone()).await.unwrap();
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let mut s = oauth_settings(&peer);
    s["provider"] = json!("google");
    assert_eq!(
        app.put("/api/v1/tenants/acme/email-settings", &t, &s)
            .await
            .status,
        200
    );
    let r = app
        .request(
            "POST",
            "/api/v1/tenants/acme/email-settings/oauth/authorize",
            Some(&t),
            None,
        )
        .await
        .json();
    let url = r["authorization_url"].as_str().unwrap();
    assert!(
        url.contains("access_type=offline") && url.contains("prompt=consent"),
        "{url}"
    );
    let cb = start(&app, "acme", &t).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
    let v = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json();
    assert_eq!(v["oauth"]["warnings"], json!([]));
    clock.advance(chrono::Duration::days(6));
    let v = app
        .get("/api/v1/tenants/acme/email-settings", &t)
        .await
        .json();
    assert!(v["oauth"]["warnings"].to_string().contains("7 days"), "{v}");
}

/// Microsoft sometimes sends `expires_in` as a string: the token's expiry still follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_in_as_a_string() {
    let peer = peer(3600).await;
    peer.set_expires_in(1800, true).await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let t = configure(&app, "acme", &peer).await;
    let cb = start(&app, "acme", &t).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
    let st = site_token(&app, "acme").await;
    let v = app.get("/api/v1/site/smtp-access-token", &st).await.json();
    let exp = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    let left = (exp.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
    assert!((1700..=1800).contains(&left), "expires in {left} s");
}

/// Deleting a tenant wipes its grant and its cached access token (Redis included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_deletion_wipes_grant_and_cache() {
    let redis = postwire_tests::PrivateRedis::start().await;
    let peer = peer(3600).await;
    let mut setup = Setup::new(Backend::Sqlite).await;
    setup.env.insert("REDIS_URL".into(), redis.url());
    let app = setup.spawn().await;
    let t = configure(&app, "acme", &peer).await;
    let cb = start(&app, "acme", &t).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
    assert!(redis.get("postwire:v1:token:acme").await.is_some());
    assert_eq!(
        app.delete("/api/v1/tenants/acme", &app.cluster_token())
            .await
            .status,
        204
    );
    assert!(
        redis.get("postwire:v1:token:acme").await.is_none(),
        "cached token wiped"
    );
    assert!(!has_grant(&app).await, "grant row wiped");
    assert!(
        app.query_one("SELECT state FROM oauth_pending")
            .await
            .is_none()
    );
}
