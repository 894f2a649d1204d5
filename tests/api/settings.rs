use postwire_tests::{Backend, TestApp, dual_test, m365_password_settings};
use serde_json::{Value, json};

const PATH: &str = "/api/v1/tenants/acme/email-settings";

async fn app_with_tenant(b: Backend) -> (TestApp, String) {
    let app = TestApp::spawn(b).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    (app, t)
}

async fn password_round_trip_never_shows_the_secret(b: Backend) {
    let (app, t) = app_with_tenant(b).await;
    assert_eq!(app.get(PATH, &t).await.status, 404, "nothing stored yet");
    let put = app.put(PATH, &t, &m365_password_settings()).await;
    assert_eq!(put.status, 200, "{}", put.text);
    let get = app.get(PATH, &t).await;
    assert_eq!(get.status, 200);
    assert!(
        !get.text.contains("Sup3r-Secret-PW"),
        "the password is never returned"
    );
    assert!(!put.text.contains("Sup3r-Secret-PW"));
    let v = get.json();
    assert_eq!(v["auth"]["password_set"], true);
    assert!(v["auth"].get("password").is_none());
    assert_eq!(v["server"]["host"], "smtp.office365.com");
    assert_eq!(v["feature_senders"]["report"], "reports@acme.example");
    assert_eq!(v["receivers"][0]["purpose"], "report");
    assert_eq!(
        v["oauth"]["redirect_uri"],
        "https://postwire.test/oauth2/client/smtp/authorize-callback"
    );
    // PUT answers with the GET shape
    let mut put_v = put.json();
    let mut get_v = v.clone();
    put_v.as_object_mut().unwrap().remove("updated_at");
    get_v.as_object_mut().unwrap().remove("updated_at");
    assert_eq!(put_v, get_v);

    // GET -> edit -> PUT: read-only fields are ignored, the stored password is kept
    let mut edited = v.clone();
    edited["server"]["port"] = json!(25);
    let r = app.put(PATH, &t, &edited).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["auth"]["password_set"], true);
    assert_eq!(r.json()["server"]["port"], 25);

    // the audit log names the changed fields, never values
    let audit = app.get("/api/v1/tenants/acme/audit", &t).await;
    assert!(!audit.text.contains("Sup3r-Secret-PW"));
    let entries = audit.json();
    assert_eq!(entries[0]["fields"], json!(["server.port"]));
    assert_eq!(entries[0]["role"], "tenant_admin");
    assert_eq!(entries[1]["fields"], json!(["*", "auth.password"]));
}
dual_test!(password_round_trip_never_shows_the_secret);

async fn secrets_are_stored_encrypted(b: Backend) {
    let (app, t) = app_with_tenant(b).await;
    assert_eq!(
        app.put(PATH, &t, &m365_password_settings()).await.status,
        200
    );
    let row = app
        .query_one("SELECT document, password_ct FROM email_settings WHERE tenant_id = 'acme'")
        .await
        .unwrap();
    let doc: String = row.try_get("", "document").unwrap();
    let ct: Vec<u8> = row.try_get("", "password_ct").unwrap();
    assert!(!doc.contains("Sup3r-Secret-PW"));
    assert!(ct.len() > 16);
    assert!(
        !ct.windows(b"Sup3r".len()).any(|w| w == b"Sup3r"),
        "the row holds ciphertext"
    );

    // the ciphertext is bound to its tenant: copied to another tenant's row it does not decrypt
    app.create_tenant("other").await;
    let other = app.admin_token("other");
    assert_eq!(
        app.put(
            "/api/v1/tenants/other/email-settings",
            &other,
            &m365_password_settings()
        )
        .await
        .status,
        200
    );
    let acme = mail_core::domain::TenantId::parse("acme").unwrap();
    let other_id = mail_core::domain::TenantId::parse("other").unwrap();
    assert!(
        app.state
            .store
            .settings_password(&acme)
            .await
            .unwrap()
            .is_some()
    );
    let db = &app.state.store.db;
    use sea_orm::{ConnectionTrait, Statement};
    let copy = Statement::from_sql_and_values(
        db.get_database_backend(),
        match b {
            Backend::Postgres => {
                "UPDATE email_settings SET password_ct = $1 WHERE tenant_id = 'other'"
            }
            Backend::Sqlite => {
                "UPDATE email_settings SET password_ct = ? WHERE tenant_id = 'other'"
            }
        },
        [ct.into()],
    );
    db.execute_raw(copy).await.unwrap();
    assert!(
        app.state.store.settings_password(&other_id).await.is_err(),
        "a moved ciphertext must not decrypt"
    );
}
dual_test!(secrets_are_stored_encrypted);

/// Each validation rule, with the field the 422 must name.
async fn every_validation_rule_names_its_field(b: Backend) {
    let (app, t) = app_with_tenant(b).await;
    type Edit = fn(&mut Value);
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "bad host",
            |v| v["server"]["host"] = json!("smtp.example.com:587"),
            &["server.host"],
        ),
        (
            "empty host",
            |v| v["server"]["host"] = json!(""),
            &["server.host"],
        ),
        (
            "port 0",
            |v| v["server"]["port"] = json!(0),
            &["server.port"],
        ),
        (
            "port 65536",
            |v| v["server"]["port"] = json!(65536),
            &["server.port"],
        ),
        (
            "port as text",
            |v| v["server"]["port"] = json!("587"),
            &["server.port"],
        ),
        (
            "bad encryption",
            |v| v["server"]["encryption"] = json!("ssl"),
            &["server.encryption"],
        ),
        (
            "unknown provider",
            |v| v["provider"] = json!("yahoo"),
            &["provider"],
        ),
        (
            "unknown auth method",
            |v| v["auth"]["method"] = json!("kerberos"),
            &["auth.method"],
        ),
        (
            "password without username",
            |v| {
                v["auth"].as_object_mut().unwrap().remove("username");
            },
            &["auth.username"],
        ),
        (
            "password null",
            |v| v["auth"]["password"] = Value::Null,
            &["auth.password"],
        ),
        (
            "oauth2 without client",
            |v| v["auth"] = json!({"method": "oauth2", "token_url": "https://t.example/token"}),
            &["auth.client_id", "auth.client_secret"],
        ),
        (
            "oauth2 plain http",
            |v| v["auth"] = json!({"method": "oauth2", "client_id": "c", "client_secret": "s", "authorization_url": "http://login.example.com/a", "token_url": "http://login.example.com/t"}),
            &["auth.authorization_url", "auth.token_url"],
        ),
        (
            "custom oauth2 without urls",
            |v| {
                v["provider"] = json!("custom");
                v["auth"] = json!({"method": "oauth2", "client_id": "c", "client_secret": "s", "scopes": ["x"]});
            },
            &["auth.authorization_url", "auth.token_url"],
        ),
        // the report sender is senders[1]: when it goes, feature_senders.report no longer names a sender
        (
            "bad sender",
            |v| v["senders"][1]["address"] = json!("not-an-address"),
            &["senders[1].address", "feature_senders.report"],
        ),
        (
            "header injection in a sender name",
            |v| v["senders"][0]["name"] = json!("A\r\nBcc: evil@example.com"),
            &["senders[0].name"],
        ),
        (
            "two defaults",
            |v| v["senders"][1]["default"] = json!(true),
            &["senders"],
        ),
        (
            "no default",
            |v| v["senders"][0]["default"] = json!(false),
            &["senders"],
        ),
        (
            "duplicate sender",
            |v| v["senders"][1]["address"] = json!("SCANNER@acme.example"),
            &["senders[1].address", "feature_senders.report"],
        ),
        (
            "bad receiver",
            |v| v["receivers"][0]["address"] = json!("it@"),
            &["receivers[0].address"],
        ),
        (
            "bad receiver purpose",
            |v| v["receivers"][0]["purpose"] = json!("fax"),
            &["receivers[0].purpose"],
        ),
        (
            "feature sender not a sender",
            |v| v["feature_senders"]["scan_to_email"] = json!("someone@acme.example"),
            &["feature_senders.scan_to_email"],
        ),
        (
            "unknown feature",
            |v| v["feature_senders"]["fax"] = json!("scanner@acme.example"),
            &["feature_senders.fax"],
        ),
        (
            "unknown field",
            |v| v["auth"]["pasword"] = json!("typo"),
            &["auth.pasword"],
        ),
        (
            "unknown top-level field",
            |v| v["colour"] = json!("red"),
            &["colour"],
        ),
        (
            "missing server",
            |v| {
                v.as_object_mut().unwrap().remove("server");
            },
            &["server"],
        ),
    ];
    for (what, edit, want) in cases {
        let mut v = m365_password_settings();
        edit(&mut v);
        let r = app.put(PATH, &t, &v).await;
        assert_eq!(r.status, 422, "{what}: {}", r.text);
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{what}"
        );
        let mut got = r.fields();
        got.sort();
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "{what}: {}", r.text);
    }
    // none of the refused requests stored anything
    assert_eq!(app.get(PATH, &t).await.status, 404);
    // loopback http is allowed for OAuth endpoints (local peers)
    let mut v = m365_password_settings();
    v["provider"] = json!("custom");
    v["auth"] = json!({"method": "oauth2", "client_id": "c", "client_secret": "s", "authorization_url": "http://127.0.0.1:9/a", "token_url": "http://localhost:9/t", "scopes": ["openid"]});
    assert_eq!(app.put(PATH, &t, &v).await.status, 200);
}
dual_test!(every_validation_rule_names_its_field);

async fn body_limits_and_media_type(b: Backend) {
    let (app, t) = app_with_tenant(b).await;
    let big = json!({"provider": "custom", "pad": "x".repeat(1024 * 1024 + 10)});
    let r = app.put(PATH, &t, &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let r = app
        .client
        .put(format!("{}{PATH}", app.address))
        .bearer_auth(&t)
        .header("content-type", "text/plain")
        .body("provider=custom")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let r = app
        .client
        .put(format!("{}{PATH}", app.address))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body("{\"provider\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
}
dual_test!(body_limits_and_media_type);

async fn stored_secret_never_goes_to_a_new_host(b: Backend) {
    let (app, t) = app_with_tenant(b).await;
    assert_eq!(
        app.put(PATH, &t, &m365_password_settings()).await.status,
        200
    );
    let mut v = app.get(PATH, &t).await.json();
    v["server"]["host"] = json!("mail.attacker.example");
    assert_eq!(app.put(PATH, &t, &v).await.fields(), vec!["auth.password"]);
    v["auth"]["password"] = json!("new-password");
    assert_eq!(app.put(PATH, &t, &v).await.status, 200);

    // OAuth: a token_url change needs the client secret again
    let oauth = json!({
        "provider": "microsoft365",
        "server": {"host": "smtp.office365.com"},
        "auth": {"method": "oauth2", "client_id": "app", "client_secret": "cs", "microsoft_directory": "contoso.example"}
    });
    let r = app.put(PATH, &t, &oauth).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(
        v["auth"]["password_set"], false,
        "switching to OAuth drops the password"
    );
    assert_eq!(v["auth"]["client_secret_set"], true);
    assert_eq!(
        v["auth"]["token_url"],
        "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token"
    );
    assert_eq!(
        v["auth"]["scopes"],
        json!([
            "https://outlook.office.com/SMTP.Send",
            "openid",
            "profile",
            "offline_access"
        ])
    );
    let mut moved = v.clone();
    moved["auth"]["token_url"] = json!("https://evil.example/token");
    assert_eq!(
        app.put(PATH, &t, &moved).await.fields(),
        vec!["auth.client_secret"]
    );
    // unchanged token_url keeps the secret
    assert_eq!(
        app.put(PATH, &t, &v).await.json()["auth"]["client_secret_set"],
        true
    );
}
dual_test!(stored_secret_never_goes_to_a_new_host);

async fn providers_list_presets(b: Backend) {
    let app = TestApp::spawn(b).await;
    let r = app
        .get("/api/v1/email/providers", &app.admin_token("acme"))
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["microsoft365", "google", "custom"]);
    assert_eq!(v[0]["server"]["host"], "smtp.office365.com");
    assert!(
        v[0]["auth"]["token_url"]
            .as_str()
            .unwrap()
            .contains("{directory}")
    );
    assert!(
        v[1]["auth"]["scopes"]
            .as_array()
            .unwrap()
            .contains(&json!("https://mail.google.com/"))
    );
    assert_eq!(
        v[1]["auth"]["authorization_params"]["access_type"],
        "offline"
    );
    assert_eq!(
        app.request("GET", "/api/v1/email/providers", None, None)
            .await
            .status,
        401
    );
}
dual_test!(providers_list_presets);

/// Trailing data after the JSON document is refused, and type errors never name internal
/// types (both reported by schemathesis runs).
async fn strict_json_documents(b: Backend) {
    let (app, _) = app_with_tenant(b).await;
    let c = app.cluster_token();
    let send = |body: &'static str| {
        app.client
            .put(format!("{}/api/v1/tenants/globex", app.address))
            .bearer_auth(&c)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = send(r#"{"name": "Globex"} trailing"#).await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["field"], "body", "{v}");
    let r = send(r#"["not", "an", "object"]"#).await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let text = r.text().await.unwrap();
    assert!(text.contains("must be a JSON object"), "{text}");
    assert!(!text.contains("TenantRequest"), "{text}");
    assert_eq!(
        app.get("/api/v1/tenants/globex", &c).await.status,
        404,
        "nothing was created"
    );
}
dual_test!(strict_json_documents);
