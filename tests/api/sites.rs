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

/// A site's name and override change in place (same id and secret, the site's configuration
/// follows at once); an omitted password is kept while the host stays, must be sent again
/// when the host changes; the override can be removed; every change is audited.
async fn site_override_can_be_changed(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.create_tenant("acme").await;
    app.create_tenant("globex").await;
    let t = app.admin_token("acme");
    let ok = json!({"name": "Plant", "override": {"server": {"host": "relay.lan", "port": 2525, "encryption": "none"}, "auth": {"method": "password", "username": "plant", "password": "relay-pw"}}});
    let c = app.post("/api/v1/tenants/acme/sites", &t, &ok).await.json();
    let id = c["site_id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/tenants/acme/sites/{id}");
    let tok = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": id, "secret": c["secret"]})),
        )
        .await
        .json();
    let site_token = tok["access_token"].as_str().unwrap().to_owned();
    let config = || async {
        let r = app.get("/api/v1/site/email-config", &site_token).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()
    };

    // new port and username, password omitted: kept (same host)
    let r = app
        .put(
            &path,
            &t,
            &json!({"name": "Plant 2", "override": {"server": {"host": "relay.lan", "port": 587, "encryption": "starttls"}, "auth": {"method": "password", "username": "plant2"}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["site_id"], id);
    assert_eq!(v["name"], "Plant 2");
    assert_eq!(v["override"]["server"]["port"], 587);
    assert_eq!(v["override"]["username"], "plant2");
    assert_eq!(v["override"]["password_set"], true);
    let cfg = config().await;
    assert_eq!(cfg["server"]["port"], 587);
    assert_eq!(cfg["auth"]["username"], "plant2");
    assert_eq!(cfg["auth"]["password"], "relay-pw", "kept");

    // a new host without the password: refused, nothing changed
    let moved = json!({"name": "Plant 2", "override": {"server": {"host": "evil.example"}, "auth": {"method": "password", "username": "plant2"}}});
    let r = app.put(&path, &t, &moved).await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(r.fields(), vec!["override.auth.password"]);
    assert!(r.text.contains("never sent to a new host"), "{}", r.text);
    assert_eq!(config().await["server"]["host"], "relay.lan");
    // ... with it: accepted
    let mut with_pw = moved.clone();
    with_pw["override"]["auth"]["password"] = json!("new-relay-pw");
    let r = app.put(&path, &t, &with_pw).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains("new-relay-pw"));
    let cfg = config().await;
    assert_eq!(cfg["server"]["host"], "evil.example");
    assert_eq!(cfg["auth"]["password"], "new-relay-pw");

    // the same validation as at creation
    let r = app
        .put(
            &path,
            &t,
            &json!({"name": " ", "override": {"server": {"host": "relay.lan"}, "auth": {"method": "oauth2"}}}),
        )
        .await;
    let mut f = r.fields();
    f.sort();
    assert_eq!(f, vec!["name", "override.auth.method"], "{}", r.text);

    // no auth: the stored password goes; then no override at all
    let r = app
        .put(
            &path,
            &t,
            &json!({"name": "Plant 2", "override": {"server": {"host": "relay.lan", "port": 25, "encryption": "none"}, "auth": {"method": "none"}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["override"]["password_set"], false);
    let row = app
        .query_one("SELECT override_password_ct FROM sites")
        .await
        .unwrap();
    let ct: Option<Vec<u8>> = row.try_get("", "override_password_ct").unwrap();
    assert!(ct.is_none(), "the password is gone from the database");
    let r = app.put(&path, &t, &json!({"name": "Plant 2"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json()["override"].is_null());
    // without tenant settings and without an override, the site has nothing to send with
    assert_eq!(
        app.get("/api/v1/site/email-config", &site_token)
            .await
            .status,
        404
    );

    // another tenant's admin, an unknown site, a malformed id: 404 without data
    let g = app.admin_token("globex");
    let r = app
        .put(
            &format!("/api/v1/tenants/globex/sites/{id}"),
            &g,
            &json!({"name": "x"}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = app.put(&path, &g, &json!({"name": "x"})).await;
    assert_eq!(
        r.status, 404,
        "another tenant's admin learns nothing: {}",
        r.text
    );
    for other in ["site_00000000000000000000000000000000", "not-a-site"] {
        let r = app
            .put(
                &format!("/api/v1/tenants/acme/sites/{other}"),
                &t,
                &json!({"name": "x"}),
            )
            .await;
        assert_eq!(r.status, 404, "{}", r.text);
    }

    // audited, without secrets
    let audit = app.get("/api/v1/tenants/acme/audit", &t).await;
    assert_eq!(audit.status, 200, "{}", audit.text);
    assert!(
        audit.text.contains(&format!("site.updated:{id}")),
        "{}",
        audit.text
    );
    assert!(!audit.text.contains("relay-pw"));
}
dual_test!(site_override_can_be_changed);
