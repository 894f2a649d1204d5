//! The cross-tenant and bad-token matrix, generated from the OpenAPI document: every `/api`
//! operation × every hostile identity gets the right status and leaks nothing of tenant acme.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use management::auth::Role;
use postwire_tests::{Backend, TestApp, dual_test, m365_password_settings};
use serde_json::{Value, json};

fn sign(app: &TestApp, claims: &Value, alg: jsonwebtoken::Algorithm) -> String {
    let secret = app.setup.jwt_secret();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.alg = jsonwebtoken::Algorithm::HS256;
    let token = jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret).unwrap(),
    )
    .unwrap();
    if alg == jsonwebtoken::Algorithm::HS256 {
        return token;
    }
    // HS/RS confusion: claim RS256 but sign with the HMAC secret
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[0] = B64URL.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let mac = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret),
        format!("{}.{}", parts[0], parts[1]).as_bytes(),
    );
    parts[2] = B64URL.encode(mac.as_ref());
    parts.join(".")
}

fn claims(role: &str, tenant: Option<&str>, iss: &str, aud: &str, exp_offset: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut c = json!({"sub": "attacker", "role": role, "iss": iss, "aud": aud, "iat": now, "exp": now + exp_offset});
    if let Some(t) = tenant {
        c["tenant"] = json!(t);
    }
    c
}

struct Identity {
    name: &'static str,
    token: Option<String>,
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
            &m365_password_settings()
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
    let other_site = app
        .post(
            "/api/v1/tenants/other/sites",
            &app.admin_token("other"),
            &json!({"name": "Other HQ"}),
        )
        .await
        .json();
    let other_site_token = app.token(Role::Site, Some("other"), other_site["site_id"].as_str());

    let tampered = {
        // a valid token of tenant "other" whose payload is edited to say "acme"
        let t = app.admin_token("other");
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let mut payload: Value =
            serde_json::from_slice(&B64URL.decode(&parts[1]).unwrap()).unwrap();
        payload["tenant"] = json!("acme");
        parts[1] = B64URL.encode(serde_json::to_vec(&payload).unwrap());
        parts.join(".")
    };
    let alg_none = format!(
        "{}.{}.",
        B64URL.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64URL.encode(claims("cluster_admin", None, "postwire", "postwire", 3600).to_string())
    );
    let unauthenticated = vec![
        Identity {
            name: "no token",
            token: None,
        },
        Identity {
            name: "expired",
            token: Some(sign(
                &app,
                &claims("cluster_admin", None, "postwire", "postwire", -600),
                jsonwebtoken::Algorithm::HS256,
            )),
        },
        Identity {
            name: "wrong aud",
            token: Some(sign(
                &app,
                &claims("cluster_admin", None, "postwire", "someone-else", 3600),
                jsonwebtoken::Algorithm::HS256,
            )),
        },
        Identity {
            name: "wrong iss",
            token: Some(sign(
                &app,
                &claims("cluster_admin", None, "evil", "postwire", 3600),
                jsonwebtoken::Algorithm::HS256,
            )),
        },
        Identity {
            name: "alg none",
            token: Some(alg_none),
        },
        Identity {
            name: "HS/RS confusion",
            token: Some(sign(
                &app,
                &claims("cluster_admin", None, "postwire", "postwire", 3600),
                jsonwebtoken::Algorithm::RS256,
            )),
        },
        Identity {
            name: "tampered payload",
            token: Some(tampered),
        },
        Identity {
            name: "garbage",
            token: Some("not.a.jwt".into()),
        },
    ];
    let other_admin = app.admin_token("other");

    let spec: Value = serde_json::from_str(&management::openapi::json()).unwrap();
    let mut checked = 0;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let Some(security) = op.get("security") else {
                continue;
            };
            let roles: Vec<&str> = security[0]["bearer"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect();
            let concrete = path
                .replace("{tenant_id}", "acme")
                .replace("{site_id}", &site_id);
            let body = matches!(method.as_str(), "put" | "post").then(|| json!({}));
            let m = method.to_uppercase();
            let leaks = |text: &str| {
                ["acme.example", "Tenant acme", "Acme HQ", site_id.as_str()]
                    .iter()
                    .any(|s| text.contains(s))
            };

            for id in &unauthenticated {
                let r = app
                    .request(&m, &concrete, id.token.as_deref(), body.as_ref())
                    .await;
                assert_eq!(r.status, 401, "{m} {path} with {}: {}", id.name, r.text);
                assert!(
                    r.headers["www-authenticate"]
                        .to_str()
                        .unwrap()
                        .starts_with("Bearer"),
                    "{m} {path}"
                );
                assert!(
                    !leaks(&r.text),
                    "{m} {path} with {} leaked: {}",
                    id.name,
                    r.text
                );
                checked += 1;
            }

            // another tenant's admin
            let r = app
                .request(&m, &concrete, Some(&other_admin), body.as_ref())
                .await;
            let want = if !roles.contains(&"tenant_admin") {
                403
            } else if path.contains("{tenant_id}") {
                404
            } else {
                r.status // tenant-independent (providers): whatever it answers, it must not leak
            };
            assert_eq!(
                r.status, want,
                "{m} {path} as other tenant's admin: {}",
                r.text
            );
            assert!(
                !leaks(&r.text),
                "{m} {path} as other admin leaked: {}",
                r.text
            );

            // another tenant's site (and any site on an admin route)
            if !roles.contains(&"site") {
                let r = app
                    .request(&m, &concrete, Some(&other_site_token), body.as_ref())
                    .await;
                assert_eq!(
                    r.status, 403,
                    "{m} {path} as other tenant's site: {}",
                    r.text
                );
                assert!(!leaks(&r.text));
            }
            checked += 2;
        }
    }
    assert!(checked > 100, "the matrix covered {checked} cases");
    // a site's own routes never show another tenant's data
    let cfg = app
        .get("/api/v1/site/email-config", &other_site_token)
        .await;
    assert_eq!(
        cfg.status, 404,
        "tenant other has no settings: {}",
        cfg.text
    );
    assert!(!cfg.text.contains("acme"));
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
}
dual_test!(cross_tenant_and_bad_tokens);
