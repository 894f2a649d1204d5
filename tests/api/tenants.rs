use postwire_tests::{Backend, TestApp, dual_test};
use serde_json::json;

async fn provisioning_is_idempotent(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.cluster_token();
    let body = json!({"name": "Acme", "admin_emails": ["a@acme.example", "b@acme.example"]});
    let first = app.put("/api/v1/tenants/acme", &t, &body).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let again = app.put("/api/v1/tenants/acme", &t, &body).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        first.json()["updated_at"],
        again.json()["updated_at"],
        "a repeated PUT changes nothing"
    );
    let audit = app.get("/api/v1/tenants/acme/audit", &t).await.json();
    assert_eq!(
        audit.as_array().unwrap().len(),
        1,
        "only the creation is audited: {audit}"
    );

    let changed = app
        .put("/api/v1/tenants/acme", &t, &json!({"name": "Acme Corp", "admin_emails": ["a@acme.example"], "status": "suspended"}))
        .await;
    assert_eq!(changed.status, 200);
    let v = app.get("/api/v1/tenants/acme", &t).await.json();
    assert_eq!(v["name"], "Acme Corp");
    assert_eq!(v["status"], "suspended");
    assert_eq!(v["admin_emails"], json!(["a@acme.example"]));
    let audit = app.get("/api/v1/tenants/acme/audit", &t).await.json();
    assert_eq!(
        audit[0]["fields"],
        json!(["name", "admin_emails", "status"])
    );
}
dual_test!(provisioning_is_idempotent);

async fn tenant_validation(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.cluster_token();
    let r = app
        .put("/api/v1/tenants/Not_Valid", &t, &json!({"name": "x"}))
        .await;
    assert_eq!(r.fields(), vec!["tenant_id"]);
    let r = app
        .put(
            "/api/v1/tenants/acme",
            &t,
            &json!({"name": " ", "admin_emails": ["ok@acme.example", "nope"]}),
        )
        .await;
    assert_eq!(r.fields(), vec!["name", "admin_emails[1]"]);
    let r = app
        .put(
            "/api/v1/tenants/acme",
            &t,
            &json!({"name": "x", "colour": "red"}),
        )
        .await;
    assert_eq!(r.fields(), vec!["colour"]);
    let r = app
        .put(
            "/api/v1/tenants/acme",
            &t,
            &json!({"name": "x", "status": "deleted"}),
        )
        .await;
    assert_eq!(r.fields(), vec!["status"]);
    // nothing was created by the refused requests
    assert_eq!(app.get("/api/v1/tenants/acme", &t).await.status, 404);
}
dual_test!(tenant_validation);

async fn list_pages_and_delete(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.cluster_token();
    for id in ["t1", "t2", "t3"] {
        app.create_tenant(id).await;
    }
    let p1 = app.get("/api/v1/tenants?limit=2", &t).await.json();
    assert_eq!(p1["tenants"].as_array().unwrap().len(), 2);
    assert_eq!(p1["next_after"], "t2");
    let p2 = app.get("/api/v1/tenants?limit=2&after=t2", &t).await.json();
    assert_eq!(p2["tenants"][0]["tenant_id"], "t3");
    assert!(p2["next_after"].is_null());
    assert_eq!(
        app.get("/api/v1/tenants?limit=0", &t).await.fields(),
        vec!["limit"]
    );

    let settings = postwire_tests::m365_password_settings();
    assert_eq!(
        app.put("/api/v1/tenants/t2/email-settings", &t, &settings)
            .await
            .status,
        200
    );
    let site = app
        .post("/api/v1/tenants/t2/sites", &t, &json!({"name": "HQ"}))
        .await
        .json();
    assert_eq!(app.delete("/api/v1/tenants/t2", &t).await.status, 204);
    assert_eq!(app.get("/api/v1/tenants/t2", &t).await.status, 404);
    assert_eq!(app.delete("/api/v1/tenants/t2", &t).await.status, 404);
    // the settings (with their secrets) and the sites are gone too
    assert!(
        app.query_one("SELECT tenant_id FROM email_settings WHERE tenant_id = 't2'")
            .await
            .is_none()
    );
    assert!(
        app.query_one("SELECT id FROM sites WHERE tenant_id = 't2'")
            .await
            .is_none()
    );
    let r = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": site["site_id"], "secret": site["secret"]})),
        )
        .await;
    assert_eq!(r.status, 401);
}
dual_test!(list_pages_and_delete);

async fn unsupported_methods_are_405(b: Backend) {
    let app = TestApp::spawn(b).await;
    let r = app
        .request(
            "POST",
            "/api/v1/tenants/acme",
            Some(&app.cluster_token()),
            None,
        )
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET, PUT, DELETE");
    let r = app.request("GET", "/api/v1/nothing-here", None, None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(app.request("GET", "/healthz", None, None).await.status, 200);
    assert_eq!(
        app.request("GET", "/readyz", None, None).await.json()["status"],
        "ready"
    );
}
dual_test!(unsupported_methods_are_405);

/// Identifiers with a NUL byte (PostgreSQL refuses them) or any other foreign shape never reach
/// the database: found by schemathesis as 500s.
async fn foreign_identifiers_are_refused_early(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let c = app.cluster_token();
    assert_eq!(
        app.get("/api/v1/tenants?after=a%00b", &c).await.fields(),
        vec!["after"]
    );
    let r = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": "a\u{0}b", "secret": "x"})),
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(
        app.delete("/api/v1/tenants/acme/sites/a%00b", &t)
            .await
            .status,
        404
    );
    let r = app
        .request(
            "POST",
            "/api/v1/tenants/acme/invitations/a%00b/resend",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    for method in ["POST", "DELETE", "PUT"] {
        assert_eq!(
            app.request(method, "/healthz", None, None).await.status,
            405
        );
    }
}
dual_test!(foreign_identifiers_are_refused_early);
