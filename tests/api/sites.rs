use postwire_tests::{Backend, TestApp, dual_test, m365_password_settings};
use serde_json::json;

async fn site_secret_shown_once_and_config_served(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    assert_eq!(
        app.put(
            "/api/v1/tenants/acme/email-settings",
            &t,
            &m365_password_settings()
        )
        .await
        .status,
        200
    );

    let created = app
        .post("/api/v1/tenants/acme/sites", &t, &json!({"name": "Brno"}))
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let c = created.json();
    let (site_id, secret) = (
        c["site_id"].as_str().unwrap(),
        c["secret"].as_str().unwrap(),
    );
    assert!(secret.len() >= 40);
    let list = app.get("/api/v1/tenants/acme/sites", &t).await;
    assert!(!list.text.contains(secret), "the secret is shown only once");
    assert_eq!(list.json()[0]["site_id"], site_id);
    let row = app
        .query_one(&format!(
            "SELECT secret_hash FROM sites WHERE id = '{site_id}'"
        ))
        .await
        .unwrap();
    let hash: String = row.try_get("", "secret_hash").unwrap();
    assert_ne!(hash, secret, "stored hashed");

    let bad = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": site_id, "secret": "wrong"})),
        )
        .await;
    assert_eq!(bad.status, 401);
    let unknown = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": "site_nope", "secret": secret})),
        )
        .await;
    assert_eq!(unknown.status, 401);
    let tok = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": site_id, "secret": secret})),
        )
        .await;
    assert_eq!(tok.status, 200, "{}", tok.text);
    let site_token = tok.json()["access_token"].as_str().unwrap().to_owned();

    let cfg = app.get("/api/v1/site/email-config", &site_token).await;
    assert_eq!(cfg.status, 200, "{}", cfg.text);
    let v = cfg.json();
    assert_eq!(v["auth"]["method"], "password");
    assert_eq!(
        v["auth"]["password"], "Sup3r-Secret-PW",
        "sites get the password they send with"
    );
    assert_eq!(v["server"]["host"], "smtp.office365.com");
    assert_eq!(
        v["feature_senders"]["scan_to_email"],
        "scanner@acme.example"
    );
    assert_eq!(v["override_applied"], false);
    assert!(!cfg.text.contains("refresh"), "never a refresh token");

    // a site token cannot call admin routes; an admin token is not a site token
    assert_eq!(
        app.get("/api/v1/tenants/acme/email-settings", &site_token)
            .await
            .status,
        403
    );
    assert_eq!(app.get("/api/v1/site/email-config", &t).await.status, 403);

    // suspended tenant: its sites get 403
    let cl = app.cluster_token();
    app.put(
        "/api/v1/tenants/acme",
        &cl,
        &json!({"name": "Acme", "status": "suspended"}),
    )
    .await;
    assert_eq!(
        app.get("/api/v1/site/email-config", &site_token)
            .await
            .status,
        403
    );
    let r = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": site_id, "secret": secret})),
        )
        .await;
    assert_eq!(r.status, 403);
    app.put(
        "/api/v1/tenants/acme",
        &cl,
        &json!({"name": "Acme", "status": "active"}),
    )
    .await;

    // deleting the site revokes its secret
    assert_eq!(
        app.delete(&format!("/api/v1/tenants/acme/sites/{site_id}"), &t)
            .await
            .status,
        204
    );
    assert_eq!(
        app.delete(&format!("/api/v1/tenants/acme/sites/{site_id}"), &t)
            .await
            .status,
        404
    );
    let r = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": site_id, "secret": secret})),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        app.get("/api/v1/site/email-config", &site_token)
            .await
            .status,
        404
    );
}
dual_test!(site_secret_shown_once_and_config_served);

async fn site_override_is_password_only(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let oauth = json!({"name": "x", "override": {"server": {"host": "relay.lan"}, "auth": {"method": "oauth2"}}});
    assert_eq!(
        app.post("/api/v1/tenants/acme/sites", &t, &oauth)
            .await
            .fields(),
        vec!["override.auth.method"]
    );
    let missing = json!({"name": "x", "override": {"server": {"host": "relay.lan"}, "auth": {"method": "password"}}});
    let mut f = app
        .post("/api/v1/tenants/acme/sites", &t, &missing)
        .await
        .fields();
    f.sort();
    assert_eq!(f, vec!["override.auth.password", "override.auth.username"]);

    let ok = json!({"name": "Plant", "override": {"server": {"host": "relay.lan", "port": 2525, "encryption": "none"}, "auth": {"method": "password", "username": "plant", "password": "relay-pw"}}});
    let created = app.post("/api/v1/tenants/acme/sites", &t, &ok).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let c = created.json();
    assert!(!created.text.contains("relay-pw"));
    assert_eq!(c["override"]["password_set"], true);
    let tok = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": c["site_id"], "secret": c["secret"]})),
        )
        .await
        .json();
    // without tenant settings the override alone is the configuration
    let cfg = app
        .get(
            "/api/v1/site/email-config",
            tok["access_token"].as_str().unwrap(),
        )
        .await;
    assert_eq!(cfg.status, 200, "{}", cfg.text);
    let v = cfg.json();
    assert_eq!(v["override_applied"], true);
    assert_eq!(v["server"]["host"], "relay.lan");
    assert_eq!(v["server"]["port"], 2525);
    assert_eq!(v["auth"]["password"], "relay-pw");
    let row = app
        .query_one("SELECT override_document FROM sites")
        .await
        .unwrap();
    let doc: String = row.try_get("", "override_document").unwrap();
    assert!(!doc.contains("relay-pw"));
}
dual_test!(site_override_is_password_only);
