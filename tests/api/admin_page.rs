//! The admin page's serving: embedded assets at /admin/, strict security headers, no inline
//! script. Its behaviour in a real browser is tested by tests/browser.

use postwire_tests::{Backend, TestApp, dual_test};

async fn admin_page_is_served_with_security_headers(b: Backend) {
    let app = TestApp::spawn(b).await;
    let r = app.request("GET", "/admin/", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = r.headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing in {csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(r.headers["x-frame-options"], "DENY");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["referrer-policy"], "no-referrer");
    assert_eq!(
        r.headers["cross-origin-opener-policy"],
        "same-origin-allow-popups"
    );
    // the page loads its module from this origin and has no inline script
    assert!(
        r.text
            .contains(r#"<script type="module" src="app.js"></script>"#)
    );
    assert_eq!(r.text.matches("<script").count(), 1, "{}", r.text);

    // the assets, with their types and the same headers
    for (path, ty) in [
        ("/admin/app.js", "text/javascript"),
        ("/admin/api.js", "text/javascript"),
        ("/admin/app.css", "text/css"),
        ("/admin/favicon.svg", "image/svg+xml"),
    ] {
        let r = app.request("GET", path, None, None).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.headers["content-type"].to_str().unwrap().starts_with(ty),
            "{path}: {:?}",
            r.headers["content-type"]
        );
        assert!(r.headers.contains_key("content-security-policy"), "{path}");
        assert!(!r.text.is_empty(), "{path}");
    }
    // the page talks only to /api/v1
    let js = app.request("GET", "/admin/api.js", None, None).await.text;
    assert!(js.contains("fetch(`/api/v1${path}`"), "{js}");

    // /admin goes to /admin/; unknown files are 404; other methods 405
    let r = postwire_tests::peers::peer_http_client()
        .get(format!("{}/admin", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "/admin/");
    assert_eq!(
        app.request("GET", "/admin/secret.txt", None, None)
            .await
            .status,
        404
    );
    assert_eq!(
        app.request("GET", "/admin/..%2Fapp.js", None, None)
            .await
            .status,
        404
    );
    let r = app.request("POST", "/admin/", None, None).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET");
}
dual_test!(admin_page_is_served_with_security_headers);
