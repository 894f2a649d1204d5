//! The cross-tenant and bad-token matrix, generated from the OpenAPI document: every `/api`
//! operation × every hostile identity gets the right status and leaks nothing of tenant acme.
//! A new route is covered as soon as it is in the spec; a new path parameter must be given a
//! value in [`concrete`] (the test fails naming it until then).

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use management::auth::Role;
use postwire_tests::{Backend, Resp, Setup, TestApp, dual_test, m365_password_settings};
use serde_json::{Value, json};

/// Acme's settings, on a host name that appears nowhere but in acme's data.
fn acme_settings() -> Value {
    let mut s = m365_password_settings();
    s["server"]["host"] = json!("mail.acme-internal.example");
    s
}

/// One operation of the spec that needs a bearer token.
struct Op {
    method: String,
    path: String,
    roles: Vec<String>,
}

impl Op {
    fn allows(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
    fn body(&self) -> Option<Value> {
        matches!(self.method.as_str(), "PUT" | "POST").then(|| json!({}))
    }
}

/// Every secured `/api` operation of the generated spec; the unsecured ones are exactly the
/// two the architecture names.
fn operations() -> Vec<Op> {
    let spec: Value = serde_json::from_str(&management::openapi::json()).unwrap();
    let mut ops = Vec::new();
    let mut open = Vec::new();
    for (path, items) in spec["paths"].as_object().unwrap() {
        for (method, op) in items.as_object().unwrap() {
            let Some(security) = op.get("security") else {
                open.push(format!("{} {path}", method.to_uppercase()));
                continue;
            };
            ops.push(Op {
                method: method.to_uppercase(),
                path: path.clone(),
                roles: security[0]["bearer"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_owned())
                    .collect(),
            });
        }
    }
    open.retain(|o| o.contains("/api/"));
    open.sort();
    assert_eq!(
        open,
        [
            "POST /api/v1/invitations/accept",
            "POST /api/v1/site-auth/token"
        ],
        "only these /api operations may go without a bearer token"
    );
    assert!(ops.len() >= 20, "{} operations", ops.len());
    ops
}

/// The path with every parameter filled in for tenant `tenant`.
fn concrete(path: &str, tenant: &str, site_id: &str, invitation_id: &str) -> String {
    let p = path
        .replace("{tenant_id}", tenant)
        .replace("{site_id}", site_id)
        .replace("{invitation_id}", invitation_id);
    assert!(
        !p.contains('{'),
        "{path}: give the new path parameter a value in matrix.rs `concrete`"
    );
    p
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

/// A token whose header claims `alg` but whose signature is an HMAC-SHA256 keyed with `key`
/// (the HS/RS confusion: a verifier that takes the algorithm from the token would check it
/// with the public key as an HMAC secret).
fn hmac_claiming(alg: &str, key: &[u8], claims: &Value) -> String {
    let head = B64URL.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
    let body = B64URL.encode(claims.to_string());
    let mac = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key),
        format!("{head}.{body}").as_bytes(),
    );
    format!("{head}.{body}.{}", B64URL.encode(mac.as_ref()))
}

fn alg_none(claims: &Value) -> String {
    format!(
        "{}.{}.",
        B64URL.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64URL.encode(claims.to_string())
    )
}

fn claims(role: &str, tenant: Option<&str>, iss: &str, aud: &str, exp_offset: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut c = json!({"sub": "attacker", "role": role, "iss": iss, "aud": aud, "iat": now, "exp": now + exp_offset});
    if let Some(t) = tenant {
        c["tenant"] = json!(t);
    }
    c
}

fn instance_claims(role: &str, tenant: Option<&str>) -> Value {
    claims(role, tenant, "postwire", "postwire", 3600)
}

/// A token of tenant "other" whose payload is edited to say "acme" (signature unchanged).
fn tampered(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut payload: Value = serde_json::from_slice(&B64URL.decode(&parts[1]).unwrap()).unwrap();
    payload["tenant"] = json!("acme");
    parts[1] = B64URL.encode(serde_json::to_vec(&payload).unwrap());
    parts.join(".")
}

/// Each of these must be refused with 401 and a `WWW-Authenticate: Bearer` challenge.
fn assert_unauthenticated(
    app_r: &Resp,
    what: &str,
    op: &Op,
    leaks: &dyn Fn(&str) -> Option<String>,
) {
    assert_eq!(
        app_r.status, 401,
        "{} {} with {what}: {}",
        op.method, op.path, app_r.text
    );
    assert!(
        app_r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"),
        "{} {}",
        op.method,
        op.path
    );
    assert_eq!(
        app_r.headers["content-type"], "application/problem+json",
        "{} {}",
        op.method, op.path
    );
    if let Some(s) = leaks(&app_r.text) {
        panic!(
            "{} {} with {what} leaked {s}: {}",
            op.method, op.path, app_r.text
        );
    }
}

async fn cross_tenant_and_bad_tokens(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.create_tenant("acme").await;
    app.create_tenant("other").await;
    let acme = app.admin_token("acme");
    assert_eq!(
        app.put(
            "/api/v1/tenants/acme/email-settings",
            &acme,
            &acme_settings()
        )
        .await
        .status,
        200
    );
    let site = app
        .post(
            "/api/v1/tenants/acme/sites",
            &acme,
            &json!({"name": "Acme HQ"}),
        )
        .await
        .json();
    let site_id = site["site_id"].as_str().unwrap().to_owned();
    let site_secret = site["secret"].as_str().unwrap().to_owned();
    let invitations = app.get("/api/v1/tenants/acme/invitations", &acme).await;
    assert_eq!(invitations.status, 200, "{}", invitations.text);
    let invitation_id = invitations.json()[0]["id"].as_str().unwrap().to_owned();
    let other_site = app
        .post(
            "/api/v1/tenants/other/sites",
            &app.admin_token("other"),
            &json!({"name": "Other HQ"}),
        )
        .await
        .json();
    let other_site_token = app.token(Role::Site, Some("other"), other_site["site_id"].as_str());
    let acme_site_token = app.token(Role::Site, Some("acme"), Some(&site_id));
    let other_admin = app.admin_token("other");
    let secret = app.setup.jwt_secret();

    // what must never appear in a refused body (or in anything tenant other sees)
    let acme_data = [
        "acme.example",
        "Tenant acme",
        "Acme HQ",
        "Acme Scanner",
        "Sup3r-Secret-PW",
        "mail.acme-internal.example",
        site_id.as_str(),
        site_secret.as_str(),
        invitation_id.as_str(),
    ];
    let leaks = |text: &str| {
        acme_data
            .iter()
            .find(|s| text.contains(*s))
            .map(|s| (*s).to_owned())
    };

    let siteless_site = instance_claims("site", Some("acme"));
    let base: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        (
            "expired",
            Some(hs256(
                &secret,
                &claims("cluster_admin", None, "postwire", "postwire", -600),
            )),
        ),
        (
            "wrong aud",
            Some(hs256(
                &secret,
                &claims("cluster_admin", None, "postwire", "someone-else", 3600),
            )),
        ),
        (
            "wrong iss",
            Some(hs256(
                &secret,
                &claims("cluster_admin", None, "evil", "postwire", 3600),
            )),
        ),
        (
            "alg none",
            Some(alg_none(&instance_claims("cluster_admin", None))),
        ),
        (
            "alg none (upper case)",
            Some(format!(
                "{}.{}.",
                B64URL.encode(br#"{"alg":"NONE","typ":"JWT"}"#),
                B64URL.encode(instance_claims("cluster_admin", None).to_string())
            )),
        ),
        (
            "HS/RS confusion",
            Some(hmac_claiming(
                "RS256",
                &secret,
                &instance_claims("cluster_admin", None),
            )),
        ),
        (
            "HS384 with the instance key",
            Some(
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS384),
                    &instance_claims("cluster_admin", None),
                    &EncodingKey::from_secret(&secret).unwrap(),
                )
                .unwrap(),
            ),
        ),
        (
            "another key",
            Some(hs256(
                b"guessed-secret-guessed-secret-guessed",
                &instance_claims("cluster_admin", None),
            )),
        ),
        ("tampered payload", Some(tampered(&other_admin))),
        (
            "tenant_admin without tenant",
            Some(hs256(&secret, &instance_claims("tenant_admin", None))),
        ),
        ("site without site id", Some(hs256(&secret, &siteless_site))),
        (
            "unknown role",
            Some(hs256(&secret, &instance_claims("superuser", None))),
        ),
        ("garbage", Some("not.a.jwt".into())),
        ("empty segments", Some("..".into())),
    ];
    // the same bad signatures and claims on the roles that hold acme's data: acme's own admin
    // and acme's site
    let mut unauthenticated: Vec<(String, Option<String>)> =
        base.into_iter().map(|(n, t)| (n.to_owned(), t)).collect();
    for (role, site) in [("tenant_admin", None), ("site", Some(site_id.as_str()))] {
        let mk = |iss: &str, aud: &str, exp: i64| {
            let mut c = claims(role, Some("acme"), iss, aud, exp);
            if let Some(s) = site {
                c["site"] = json!(s);
            }
            c
        };
        let good = mk("postwire", "postwire", 3600);
        for (what, token) in [
            ("expired", hs256(&secret, &mk("postwire", "postwire", -600))),
            ("wrong aud", hs256(&secret, &mk("postwire", "other", 3600))),
            ("wrong iss", hs256(&secret, &mk("evil", "postwire", 3600))),
            ("alg none", alg_none(&good)),
            ("HS/RS confusion", hmac_claiming("RS256", &secret, &good)),
            (
                "another key",
                hs256(b"guessed-secret-guessed-secret-guessed", &good),
            ),
        ] {
            unauthenticated.push((format!("{role} {what}"), Some(token)));
        }
    }

    let ops = operations();
    let mut checked = 0;
    for op in &ops {
        let m = op.method.as_str();
        let path = op.path.as_str();
        let body = op.body();
        let url = concrete(path, "acme", &site_id, &invitation_id);
        for (name, token) in &unauthenticated {
            let r = app.request(m, &url, token.as_deref(), body.as_ref()).await;
            assert_unauthenticated(&r, name, op, &leaks);
            checked += 1;
        }
        // the scheme must be Bearer
        let r = app
            .client
            .request(
                reqwest::Method::from_bytes(m.as_bytes()).unwrap(),
                format!("{}{url}", app.address),
            )
            .header("authorization", format!("Basic {}", app.cluster_token()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{m} {path} with a Basic scheme");

        // another tenant's admin: 404 on acme's routes, exactly as for a tenant that does not
        // exist (same body: no oracle for tenant ids); 403 on cluster routes
        let r = app
            .request(m, &url, Some(&other_admin), body.as_ref())
            .await;
        if !op.allows("tenant_admin") {
            assert_eq!(
                r.status, 403,
                "{m} {path} as other tenant's admin: {}",
                r.text
            );
        } else if path.contains("{tenant_id}") {
            assert_eq!(
                r.status, 404,
                "{m} {path} as other tenant's admin: {}",
                r.text
            );
            let ghost = concrete(path, "ghost", &site_id, &invitation_id);
            let g = app
                .request(m, &ghost, Some(&other_admin), body.as_ref())
                .await;
            assert_eq!(
                (g.status, g.json()),
                (r.status, r.json()),
                "{m} {path}: acme and a missing tenant look the same to other's admin"
            );
        }
        if let Some(s) = leaks(&r.text) {
            panic!("{m} {path} as other admin leaked {s}: {}", r.text);
        }

        // acme's own admin on cluster routes
        if !op.allows("tenant_admin") {
            let r = app.request(m, &url, Some(&acme), body.as_ref()).await;
            assert_eq!(
                r.status, 403,
                "{m} {path} as acme's tenant admin: {}",
                r.text
            );
        }

        // sites (acme's own and another tenant's) on admin routes; admins on site routes
        if op.allows("site") {
            for (who, t) in [
                ("acme admin", &acme),
                ("cluster admin", &app.cluster_token()),
            ] {
                let r = app.request(m, &url, Some(t), body.as_ref()).await;
                assert_eq!(r.status, 403, "{m} {path} as {who}: {}", r.text);
            }
            // another tenant's site sees only its own tenant (which has no settings)
            let r = app
                .request(m, &url, Some(&other_site_token), body.as_ref())
                .await;
            assert!(
                matches!(r.status, 404 | 409),
                "{m} {path} as other tenant's site: {} {}",
                r.status,
                r.text
            );
            if let Some(s) = leaks(&r.text) {
                panic!("{m} {path} as other site leaked {s}: {}", r.text);
            }
        } else {
            for (who, t) in [
                ("acme's site", &acme_site_token),
                ("other's site", &other_site_token),
            ] {
                let r = app.request(m, &url, Some(t), body.as_ref()).await;
                assert_eq!(r.status, 403, "{m} {path} as {who}: {}", r.text);
                if let Some(s) = leaks(&r.text) {
                    panic!("{m} {path} as {who} leaked {s}: {}", r.text);
                }
            }
        }
        checked += 4;
    }
    assert!(checked > 500, "the matrix covered {checked} cases");
    eprintln!("cross-tenant matrix: {checked} cases");

    // acme's own site does see acme's configuration (the matrix above is not vacuous)
    let cfg = app.get("/api/v1/site/email-config", &acme_site_token).await;
    assert_eq!(cfg.status, 200, "{}", cfg.text);
    assert!(cfg.text.contains("mail.acme-internal.example"));
    // nothing was changed or destroyed by the hostile calls
    assert_eq!(
        app.get("/api/v1/tenants/acme/email-settings", &acme)
            .await
            .status,
        200
    );
    assert_eq!(
        app.get("/api/v1/tenants/acme/sites", &acme)
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        app.get("/api/v1/tenants/acme", &app.cluster_token())
            .await
            .status,
        200
    );
    assert_eq!(
        app.get("/api/v1/cluster/email-settings", &app.cluster_token())
            .await
            .status,
        404,
        "the cluster settings were never written"
    );

    // the routes outside /api that need no token show nothing of acme
    // (the spec's examples name acme.example: it is the static document the code generates)
    let served = app.request("GET", "/openapi.json", None, None).await;
    assert_eq!(
        served.json(),
        serde_json::from_str::<Value>(&management::openapi::json()).unwrap()
    );
    for path in ["/healthz", "/readyz", "/metrics", "/admin"] {
        let r = app.request("GET", path, None, None).await;
        assert!(r.status < 500, "{path}: {}", r.status);
        if let Some(s) = leaks(&r.text) {
            panic!("{path} leaked {s}");
        }
    }

    // the two unauthenticated operations: a site secret only works for its own site
    for (what, body) in [
        (
            "acme's secret for other's site",
            json!({"site_id": other_site["site_id"], "secret": site_secret}),
        ),
        (
            "other's secret for acme's site",
            json!({"site_id": site_id, "secret": other_site["secret"]}),
        ),
        (
            "a missing site",
            json!({"site_id": uuid::Uuid::new_v4().to_string(), "secret": site_secret}),
        ),
    ] {
        let r = app
            .request("POST", "/api/v1/site-auth/token", None, Some(&body))
            .await;
        assert_eq!(r.status, 401, "{what}: {}", r.text);
        assert!(leaks(&r.text).is_none(), "{what}: {}", r.text);
    }
    let r = app
        .request(
            "POST",
            "/api/v1/invitations/accept",
            None,
            Some(&json!({"token": "not-an-invitation-token"})),
        )
        .await;
    assert!(
        matches!(r.status, 400 | 404 | 410 | 422),
        "unknown invitation token: {} {}",
        r.status,
        r.text
    );
    assert!(leaks(&r.text).is_none(), "{}", r.text);
}
dual_test!(cross_tenant_and_bad_tokens);

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn rsa_key() -> (EncodingKey, String) {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
    let spki = pair.public_key().as_der().unwrap();
    let key = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap();
    (key, pem("PUBLIC KEY", spki.as_ref()))
}

/// The external-issuer mode (RS256, public key pinned): every secured operation × the
/// algorithm-confusion forgeries an attacker who knows the public key can make, tokens of
/// the right key with the wrong `iss`/`aud`/`exp`, and a token of another RSA key, is 401;
/// a genuine token of the issuer for another tenant gets 404/403, never acme's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_rs256_issuer_confusion() {
    const ISS: &str = "https://idp.example";
    const AUD: &str = "postwire-api";
    let (key, public_pem) = rsa_key();
    let (stranger_key, _) = rsa_key();
    let mut setup = Setup::new(Backend::Sqlite).await;
    let key_file = setup.data_dir.join("idp.pem");
    std::fs::write(&key_file, &public_pem).unwrap();
    for (k, v) in [
        ("POSTWIRE_JWT_ISSUER", ISS),
        ("POSTWIRE_JWT_AUDIENCE", AUD),
        ("POSTWIRE_JWT_ALGORITHMS", "RS256"),
    ] {
        setup.env.insert(k.into(), v.into());
    }
    setup.env.insert(
        "POSTWIRE_JWT_PUBLIC_KEY_FILE".into(),
        key_file.to_string_lossy().into_owned(),
    );
    let app = setup.spawn().await;
    app.create_tenant("acme").await;
    app.create_tenant("other").await;
    let rs = |k: &EncodingKey, alg: Algorithm, c: &Value| {
        jsonwebtoken::encode(&Header::new(alg), c, k).unwrap()
    };
    let ext = |role: &str, tenant: Option<&str>| claims(role, tenant, ISS, AUD, 3600);

    // positive controls: the issuer's genuine tokens work
    let acme = rs(&key, Algorithm::RS256, &ext("tenant_admin", Some("acme")));
    assert_eq!(
        app.get("/api/v1/tenants/acme/sites", &acme).await.status,
        200
    );
    let cluster = rs(&key, Algorithm::RS256, &ext("cluster_admin", None));
    assert_eq!(app.get("/api/v1/tenants", &cluster).await.status, 200);
    let r = app
        .put(
            "/api/v1/tenants/acme/email-settings",
            &acme,
            &acme_settings(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    let pem_bytes = public_pem.as_bytes();
    let der = base64::engine::general_purpose::STANDARD
        .decode(
            public_pem
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    let c = ext("cluster_admin", None);
    let forged: Vec<(&str, String)> = vec![
        ("HS256 keyed with the public key PEM", hs256(pem_bytes, &c)),
        ("HS256 keyed with the public key DER", hs256(&der, &c)),
        (
            "HS256 keyed with the PEM, instance iss/aud",
            hs256(pem_bytes, &instance_claims("cluster_admin", None)),
        ),
        (
            "RS256 header, HMAC(public key PEM) signature",
            hmac_claiming("RS256", pem_bytes, &c),
        ),
        (
            "RS256 header, HMAC(public key DER) signature",
            hmac_claiming("RS256", &der, &c),
        ),
        ("alg none with the issuer's claims", alg_none(&c)),
        ("another RSA key", rs(&stranger_key, Algorithm::RS256, &c)),
        (
            "RS512 with the right key (not pinned)",
            rs(&key, Algorithm::RS512, &c),
        ),
        (
            "PS256 with the right key (not pinned)",
            rs(&key, Algorithm::PS256, &c),
        ),
        (
            "wrong iss",
            rs(
                &key,
                Algorithm::RS256,
                &claims("cluster_admin", None, "https://evil.example", AUD, 3600),
            ),
        ),
        (
            "wrong aud",
            rs(
                &key,
                Algorithm::RS256,
                &claims("cluster_admin", None, ISS, "postwire", 3600),
            ),
        ),
        (
            "expired",
            rs(
                &key,
                Algorithm::RS256,
                &claims("cluster_admin", None, ISS, AUD, -600),
            ),
        ),
        (
            "tampered payload",
            tampered(&rs(
                &key,
                Algorithm::RS256,
                &ext("tenant_admin", Some("other")),
            )),
        ),
    ];
    let leaks = |text: &str| {
        [
            "acme.example",
            "Tenant acme",
            "Sup3r-Secret-PW",
            "mail.acme-internal.example",
        ]
        .iter()
        .find(|s| text.contains(*s))
        .map(|s| (*s).to_owned())
    };
    let other = rs(&key, Algorithm::RS256, &ext("tenant_admin", Some("other")));
    let site = uuid::Uuid::new_v4().to_string();
    let mut checked = 0;
    for op in &operations() {
        let url = concrete(&op.path, "acme", &site, &site);
        let body = op.body();
        for (name, token) in &forged {
            let r = app
                .request(&op.method, &url, Some(token), body.as_ref())
                .await;
            assert_unauthenticated(&r, name, op, &leaks);
            checked += 1;
        }
        let r = app
            .request(&op.method, &url, Some(&other), body.as_ref())
            .await;
        let want = if !op.allows("tenant_admin") {
            403
        } else if op.path.contains("{tenant_id}") {
            404
        } else {
            r.status
        };
        assert_eq!(
            r.status, want,
            "{} {} as other's admin: {}",
            op.method, op.path, r.text
        );
        assert!(leaks(&r.text).is_none(), "{}", r.text);
    }
    assert!(checked > 200, "{checked}");
    eprintln!("external PEM matrix: {checked} cases");
    // nothing was changed by the forgeries
    assert_eq!(
        app.get("/api/v1/tenants/acme/email-settings", &acme)
            .await
            .status,
        200
    );
    assert_eq!(
        app.get("/api/v1/tenants/other", &cluster).await.status,
        200,
        "no tenant was deleted"
    );
}

/// The site mailer's local API (it has no OpenAPI document: its routes are listed here):
/// every route × every wrong credential, including the Management Service's own tokens, is
/// 401 with a Bearer challenge and shows nothing of the queued message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_mailer_local_api_credentials() {
    use crate::security_headers::{LOCAL_KEY, LocalMailer};
    let sm = LocalMailer::start().await;
    let secret_subject = "Quarterly numbers for acme";
    let r = sm
        .post(
            &json!({"kind": "scan_to_email", "to": ["it@acme.example"], "subject": secret_subject}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let mgmt = sm.management();
    let site_jwt = mgmt.token(Role::Site, Some("acme"), Some(&id));
    let wrong: Vec<(&str, Option<String>)> = vec![
        ("no key", None),
        (
            "wrong key",
            Some("Bearer wrong-key-wrong-key-wrong-key".into()),
        ),
        (
            "key in upper case",
            Some(format!("Bearer {}", LOCAL_KEY.to_uppercase())),
        ),
        (
            "key prefix",
            Some(format!("Bearer {}", &LOCAL_KEY[..LOCAL_KEY.len() - 1])),
        ),
        ("key with a suffix", Some(format!("Bearer {LOCAL_KEY}x"))),
        ("Basic scheme", Some(format!("Basic {LOCAL_KEY}"))),
        ("empty bearer", Some("Bearer ".into())),
        (
            "cluster admin JWT",
            Some(format!("Bearer {}", mgmt.cluster_token())),
        ),
        (
            "tenant admin JWT",
            Some(format!("Bearer {}", mgmt.admin_token("acme"))),
        ),
        ("site JWT", Some(format!("Bearer {site_jwt}"))),
    ];
    let body = json!({"kind": "test", "to": ["x@example.com"], "subject": "s"});
    let routes = [
        ("POST", "/v1/messages".to_owned(), Some(&body)),
        ("GET", format!("/v1/messages/{id}"), None),
        (
            "GET",
            format!("/v1/messages/{}", uuid::Uuid::new_v4()),
            None,
        ),
    ];
    let mut checked = 0;
    for (m, path, b) in &routes {
        for (what, auth) in &wrong {
            let r = sm.request(m, path, auth.as_deref(), *b).await;
            assert_eq!(r.status, 401, "{m} {path} with {what}: {}", r.text);
            assert!(
                r.headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer"),
                "{m} {path} with {what}"
            );
            assert!(!r.text.contains(secret_subject) && !r.text.contains("acme.example"));
            checked += 1;
        }
    }
    assert_eq!(checked, 30);
    // the right key still works (the refusals above are about the credential)
    let r = sm
        .request(
            "GET",
            &format!("/v1/messages/{id}"),
            Some(&format!("Bearer {LOCAL_KEY}")),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    sm.stop().await;
}

/// `n` and `e` of a PKCS#1 RSAPublicKey DER (`SEQUENCE { INTEGER n, INTEGER e }`).
fn rsa_n_e(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn item(b: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = b[0];
        let (len, hdr) = if b[1] & 0x80 == 0 {
            (b[1] as usize, 2)
        } else {
            let n = (b[1] & 0x7f) as usize;
            (
                b[2..2 + n]
                    .iter()
                    .fold(0usize, |a, x| (a << 8) | *x as usize),
                2 + n,
            )
        };
        (tag, &b[hdr..hdr + len], &b[hdr + len..])
    }
    let (tag, seq, _) = item(der);
    assert_eq!(tag, 0x30);
    let (_, n, rest) = item(seq);
    let (_, e, _) = item(rest);
    let strip = |x: &[u8]| {
        x.iter()
            .skip_while(|b| **b == 0)
            .copied()
            .collect::<Vec<u8>>()
    };
    (strip(n), strip(e))
}

fn rsa_jwk(pair: &aws_lc_rs::rsa::KeyPair, kid: &str) -> Value {
    let (n, e) = rsa_n_e(pair.public_key().as_ref());
    json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
           "n": B64URL.encode(n), "e": B64URL.encode(e)})
}

fn rsa_pair() -> (aws_lc_rs::rsa::KeyPair, EncodingKey) {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
    let key = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap();
    (pair, key)
}

/// The external issuer in JWKS mode with an RS256 key: every secured operation × forgeries
/// built from the published JWK (HS256 keyed with its modulus or its JSON, an RS256 header
/// over an HMAC), the attacker's own key under the published `kid`, an embedded `jwk` header,
/// a `jku` header pointing at the attacker's key set (never fetched), `alg: none` with the
/// `kid`: all 401. The genuine key works (positive control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_rs256_jwks_confusion() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const ISS: &str = "https://idp.example";
    let (pair, key) = rsa_pair();
    let (evil_pair, evil_key) = rsa_pair();
    let published = json!({"keys": [rsa_jwk(&pair, "k1")]});
    let evil_set = json!({"keys": [rsa_jwk(&evil_pair, "evil")]});
    let evil_hits = Arc::new(AtomicUsize::new(0));
    let (p, e, hits) = (published.clone(), evil_set.clone(), evil_hits.clone());
    let server = actix_web::HttpServer::new(move || {
        let (p, e, hits) = (p.clone(), e.clone(), hits.clone());
        actix_web::App::new()
            .route(
                "/jwks",
                actix_web::web::get().to(move || {
                    let p = p.clone();
                    async move { actix_web::HttpResponse::Ok().json(p) }
                }),
            )
            .route(
                "/evil-jwks",
                actix_web::web::get().to(move || {
                    let e = e.clone();
                    hits.fetch_add(1, Ordering::SeqCst);
                    async move { actix_web::HttpResponse::Ok().json(e) }
                }),
            )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = server.addrs()[0];
    tokio::spawn(server.run());

    let mut setup = Setup::new(Backend::Sqlite).await;
    for (k, v) in [
        ("POSTWIRE_JWT_ISSUER", ISS.to_owned()),
        ("POSTWIRE_JWT_JWKS_URL", format!("http://{addr}/jwks")),
        ("POSTWIRE_JWT_ALGORITHMS", "RS256".to_owned()),
    ] {
        setup.env.insert(k.into(), v);
    }
    let app = setup.spawn().await;
    app.create_tenant("acme").await;
    let c = claims("cluster_admin", None, ISS, "postwire", 3600);
    let signed = |k: &EncodingKey, h: Header| jsonwebtoken::encode(&h, &c, k).unwrap();
    let with_kid = |alg: Algorithm, kid: &str| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        h
    };
    // positive control: the published key signs a working token
    let genuine = signed(&key, with_kid(Algorithm::RS256, "k1"));
    assert_eq!(app.get("/api/v1/tenants", &genuine).await.status, 200);

    let jwk_json = published["keys"][0].to_string();
    let (n, _) = rsa_n_e(pair.public_key().as_ref());
    let hmac_with_kid = |secret: &[u8], alg: &str| {
        let head = B64URL.encode(format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"k1"}}"#));
        let body = B64URL.encode(c.to_string());
        let mac = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret),
            format!("{head}.{body}").as_bytes(),
        );
        format!("{head}.{body}.{}", B64URL.encode(mac.as_ref()))
    };
    let mut embedded = with_kid(Algorithm::RS256, "k1");
    embedded.jwk = Some(serde_json::from_value(rsa_jwk(&evil_pair, "k1")).unwrap());
    let mut jku = with_kid(Algorithm::RS256, "evil");
    jku.jku = Some(format!("http://{addr}/evil-jwks"));
    let forged: Vec<(&str, String)> = vec![
        ("HS256 keyed with the modulus", hmac_with_kid(&n, "HS256")),
        (
            "HS256 keyed with the JWK JSON",
            hmac_with_kid(jwk_json.as_bytes(), "HS256"),
        ),
        (
            "RS256 header over HMAC(modulus)",
            hmac_with_kid(&n, "RS256"),
        ),
        (
            "RS256 header over HMAC(JWK JSON)",
            hmac_with_kid(jwk_json.as_bytes(), "RS256"),
        ),
        (
            "attacker's key under the published kid",
            signed(&evil_key, with_kid(Algorithm::RS256, "k1")),
        ),
        (
            "attacker's key without a kid",
            signed(&evil_key, Header::new(Algorithm::RS256)),
        ),
        ("embedded jwk header", signed(&evil_key, embedded)),
        ("jku header", signed(&evil_key, jku)),
        ("alg none with the kid", {
            let head = B64URL.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
            format!("{head}.{}.", B64URL.encode(c.to_string()))
        }),
        (
            "RS512 with the published key",
            signed(&key, with_kid(Algorithm::RS512, "k1")),
        ),
        (
            "odd kid",
            signed(&key, with_kid(Algorithm::RS256, "../../k1")),
        ),
    ];
    let mut checked = 0;
    for op in &operations() {
        let id = uuid::Uuid::new_v4().to_string();
        let url = concrete(&op.path, "acme", &id, &id);
        for (name, token) in &forged {
            let r = app
                .request(&op.method, &url, Some(token), op.body().as_ref())
                .await;
            assert_unauthenticated(&r, name, op, &|t: &str| {
                t.contains("Tenant acme").then(|| "Tenant acme".to_owned())
            });
            checked += 1;
        }
    }
    assert!(checked > 200, "{checked}");
    eprintln!("external JWKS matrix: {checked} cases");
    assert_eq!(
        evil_hits.load(Ordering::SeqCst),
        0,
        "the jku URL was never fetched"
    );
    assert_eq!(app.get("/api/v1/tenants", &genuine).await.status, 200);
}
