//! OAuth 2.0 flow attacks against the real OAuth peer: a callback with another tenant's
//! state, `state` injection (tampered, replayed, unknown, oversized, garbage) and a caller
//! trying to choose the `redirect_uri`.

use postwire_tests::{Backend, TestApp, dual_test};
use serde_json::json;

use crate::oauth::{callback, oauth_settings, peer, start};

const REDIRECT_URI: &str = "https://postwire.test/oauth2/client/smtp/authorize-callback";

/// The `state` and `code` of a callback path.
fn state_and_code(cb: &str) -> (String, String) {
    let u = url::Url::parse(&format!("https://postwire.test{cb}")).unwrap();
    let get = |k: &str| {
        u.query_pairs()
            .find(|(qk, _)| qk == k)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| panic!("{k} in {cb}"))
    };
    (get("state"), get("code"))
}

fn cb_path(state: &str, code: &str) -> String {
    let q: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("code", code)
        .append_pair("state", state)
        .finish();
    format!("/oauth2/client/smtp/authorize-callback?{q}")
}

async fn grant_tenants(app: &TestApp) -> Vec<String> {
    let r = app
        .get(
            "/api/v1/tenants/acme/email-settings",
            &app.admin_token("acme"),
        )
        .await;
    let acme = r.json()["oauth"]["status"] == "authorized";
    let r = app
        .get(
            "/api/v1/tenants/other/email-settings",
            &app.admin_token("other"),
        )
        .await;
    let other = r.json()["oauth"]["status"] == "authorized";
    [("acme", acme), ("other", other)]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(t, _)| t.to_owned())
        .collect()
}

/// A state belongs to the tenant that started it: another tenant's state with this tenant's
/// code fails (PKCE verifier of the other flow) and grants nobody; a state never completes a
/// grant for any tenant but its own; tampered, unknown, oversized and garbage states are 400
/// without reaching the provider; a replay is 400 and changes nothing.
async fn callback_state_attacks(b: Backend) {
    let oauth = peer(3600).await;
    let app = TestApp::spawn(b).await;
    for tenant in ["acme", "other"] {
        app.create_tenant(tenant).await;
        let r = app
            .put(
                &format!("/api/v1/tenants/{tenant}/email-settings"),
                &app.admin_token(tenant),
                &oauth_settings(&oauth),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let acme = app.admin_token("acme");
    let other = app.admin_token("other");

    // acme's code with other's state: the exchange runs with other's verifier and fails
    // (the provider burns that code)
    let (_, burnt_code) = state_and_code(&start(&app, "acme", &acme).await);
    let (other_state, _other_code) = state_and_code(&start(&app, "other", &other).await);
    let r = callback(&app, &cb_path(&other_state, &burnt_code)).await;
    assert!(
        matches!(r.status, 400 | 502),
        "acme's code with other's state: {} {}",
        r.status,
        r.text
    );
    assert!(grant_tenants(&app).await.is_empty());
    // other's state is spent
    let r = callback(&app, &cb_path(&other_state, &burnt_code)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let (acme_state, acme_code) = state_and_code(&start(&app, "acme", &acme).await);
    let calls = oauth.token_calls().await.total;

    // state injection: nothing of these reaches the provider
    let mut tampered = acme_state.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let long = "A".repeat(10_000);
    let injections: Vec<(&str, String)> = vec![
        ("tampered", cb_path(&tampered, &acme_code)),
        (
            "unknown",
            cb_path("c3RhdGUtdGhhdC1uZXZlci1leGlzdGVk", &acme_code),
        ),
        ("oversized", cb_path(&long, &acme_code)),
        ("SQL", cb_path("' OR '1'='1", &acme_code)),
        ("LIKE wildcard", cb_path("%", &acme_code)),
        ("NUL", cb_path(&format!("{acme_state}\0"), &acme_code)),
        ("prefix", cb_path(&acme_state[..20], &acme_code)),
        (
            "upper-cased",
            cb_path(&acme_state.to_uppercase(), &acme_code),
        ),
        ("markup", cb_path("<script>alert(1)</script>", &acme_code)),
        ("empty", cb_path("", &acme_code)),
        (
            "array form",
            format!("/oauth2/client/smtp/authorize-callback?code={acme_code}&state[]={acme_state}"),
        ),
    ];
    for (what, path) in &injections {
        let r = callback(&app, path).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text);
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{what}"
        );
        assert!(!r.text.contains("<script>alert"), "{what}: {}", r.text);
        assert!(
            !r.text.contains("acme"),
            "{what} names a tenant: {}",
            r.text
        );
    }
    assert_eq!(
        oauth.token_calls().await.total,
        calls,
        "no exchange was tried"
    );
    assert!(grant_tenants(&app).await.is_empty());

    // the genuine state still works after all that, for acme only
    let r = callback(&app, &cb_path(&acme_state, &acme_code)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("data-tenant=\"acme\""), "{}", r.text);
    assert_eq!(grant_tenants(&app).await, vec!["acme"]);
    let calls = oauth.token_calls().await.total;

    // replayed: 400, no second exchange, the grant unchanged
    let r = callback(&app, &cb_path(&acme_state, &acme_code)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("already used"), "{}", r.text);
    assert_eq!(oauth.token_calls().await.total, calls);
    assert_eq!(grant_tenants(&app).await, vec!["acme"]);

    // a complete flow of other's, replayed with acme's spent state: still only other's own
    let cb = start(&app, "other", &other).await;
    let r = callback(&app, &cb).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("data-tenant=\"other\""), "{}", r.text);
    assert_eq!(grant_tenants(&app).await, vec!["acme", "other"]);
}
dual_test!(callback_state_attacks);

/// The `redirect_uri` is `POSTWIRE_PUBLIC_URL` + the callback path, whatever the caller sends:
/// a `redirect_uri` in the authorize request (query or body) is ignored, a settings field is
/// refused (422) or, as the read-only `oauth.redirect_uri`, ignored, and an authorization URL
/// whose query would set `redirect_uri` (or another parameter of the flow) is refused with 422
/// naming `auth.authorization_url`.
async fn redirect_uri_cannot_be_chosen(b: Backend) {
    let oauth = peer(3600).await;
    let app = TestApp::spawn(b).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let settings = oauth_settings(&oauth);
    assert_eq!(
        app.put("/api/v1/tenants/acme/email-settings", &t, &settings)
            .await
            .status,
        200
    );
    const EVIL: &str = "https://evil.example/cb";

    let r = app
        .request(
            "POST",
            "/api/v1/tenants/acme/email-settings/oauth/authorize?redirect_uri=https%3A%2F%2Fevil.example%2Fcb",
            Some(&t),
            Some(&json!({"redirect_uri": EVIL})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["redirect_uri"], REDIRECT_URI);
    let url = url::Url::parse(v["authorization_url"].as_str().unwrap()).unwrap();
    let redirects: Vec<String> = url
        .query_pairs()
        .filter(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned())
        .collect();
    assert_eq!(redirects, vec![REDIRECT_URI], "{url}");
    assert!(!url.as_str().contains("evil"), "{url}");

    // settings: a redirect_uri field is unknown (422), the read-only one is ignored
    let mut s = settings.clone();
    s["auth"]["redirect_uri"] = json!(EVIL);
    assert_eq!(
        app.put("/api/v1/tenants/acme/email-settings", &t, &s)
            .await
            .fields(),
        vec!["auth.redirect_uri"]
    );
    let mut s = settings.clone();
    s["oauth"] = json!({"redirect_uri": EVIL});
    let r = app.put("/api/v1/tenants/acme/email-settings", &t, &s).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["oauth"]["redirect_uri"], REDIRECT_URI);
    let g = app.get("/api/v1/tenants/acme/email-settings", &t).await;
    assert_eq!(g.json()["oauth"]["redirect_uri"], REDIRECT_URI);

    // an authorization URL that smuggles the flow's own parameters
    for q in [
        "redirect_uri=https%3A%2F%2Fevil.example%2Fcb",
        "redirect%5Furi=https%3A%2F%2Fevil.example%2Fcb",
        "REDIRECT_URI=https%3A%2F%2Fevil.example%2Fcb",
        "response_type=token",
        "state=attacker",
        "client_id=someone-else",
        "code_challenge_method=plain",
        "nonce=fixed",
        "scope=everything",
    ] {
        let mut s = settings.clone();
        s["auth"]["authorization_url"] = json!(format!("{}?{q}", oauth.authorize_url()));
        let r = app.put("/api/v1/tenants/acme/email-settings", &t, &s).await;
        assert_eq!(r.fields(), vec!["auth.authorization_url"], "{q}");
    }
    // an unrelated extra parameter is fine (e.g. a provider's own hint)
    let mut s = settings.clone();
    s["auth"]["authorization_url"] = json!(format!("{}?login_hint=it", oauth.authorize_url()));
    assert_eq!(
        app.put("/api/v1/tenants/acme/email-settings", &t, &s)
            .await
            .status,
        200
    );
    let cb = start(&app, "acme", &t).await;
    assert_eq!(callback(&app, &cb).await.status, 200);
}
dual_test!(redirect_uri_cannot_be_chosen);
