//! Size limits: every operation of the spec that takes a JSON body refuses one over the limit
//! with 413 problem+json (also when it comes chunked, without a length); oversized fields and
//! too many senders, receivers, scopes, admins and recipients are 422 naming the field.

use postwire_tests::{Backend, Resp, TestApp, dual_test, m365_password_settings};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MGMT_LIMIT: usize = management::extract::MAX_BODY;

/// Every `/api` operation of the spec with a request body: (method, path with parameters
/// filled for tenant acme, needs a token).
fn operations_with_body() -> Vec<(String, String, bool)> {
    let spec: Value = serde_json::from_str(&management::openapi::json()).unwrap();
    let mut ops = Vec::new();
    for (path, items) in spec["paths"].as_object().unwrap() {
        for (method, op) in items.as_object().unwrap() {
            if op.get("requestBody").is_none() || !path.starts_with("/api/") {
                continue;
            }
            let id = uuid::Uuid::new_v4().to_string();
            let concrete = path
                .replace("{tenant_id}", "acme")
                .replace("{site_id}", &id)
                .replace("{invitation_id}", &id);
            assert!(!concrete.contains('{'), "{path}: new path parameter");
            ops.push((
                method.to_uppercase(),
                concrete,
                op.get("security").is_some(),
            ));
        }
    }
    assert!(ops.len() >= 7, "{ops:?}");
    ops
}

fn padded(total: usize) -> Vec<u8> {
    let mut v = br#"{"pad":""#.to_vec();
    v.resize(total - 2, b'x');
    v.extend_from_slice(br#""}"#);
    v
}

async fn raw(app: &TestApp, method: &str, path: &str, token: Option<&str>, body: Vec<u8>) -> Resp {
    let mut rb = app
        .client
        .request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", app.address),
        )
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    Resp {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        text: r.text().await.unwrap(),
    }
}

/// Sends `size` bytes of JSON with `Transfer-Encoding: chunked` (no Content-Length) over a
/// plain socket; returns the status code and the response head.
async fn chunked(
    app: &TestApp,
    method: &str,
    path: &str,
    token: &str,
    size: usize,
) -> (u16, String) {
    let addr = app.address.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let body = padded(size);
    for chunk in body.chunks(64 * 1024) {
        let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        // the server may answer and close before everything is written
        if s.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    (status, text)
}

async fn oversized_bodies_are_413(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.create_tenant("acme").await;
    let cluster = app.cluster_token();
    let mut checked = 0;
    for (m, path, secured) in operations_with_body() {
        let token = secured.then_some(cluster.as_str());
        let r = raw(&app, &m, &path, token, padded(MGMT_LIMIT + 1024)).await;
        assert_eq!(r.status, 413, "{m} {path}: {}", r.text);
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{m} {path}"
        );
        assert!(r.json()["detail"].is_string(), "{m} {path}: {}", r.text);
        // just under the limit the size is fine (whatever else is wrong with the document)
        let r = raw(&app, &m, &path, token, padded(MGMT_LIMIT - 1024)).await;
        assert_ne!(r.status, 413, "{m} {path} under the limit: {}", r.text);
        assert!(
            r.status < 500,
            "{m} {path} under the limit: {} {}",
            r.status,
            r.text
        );
        if secured {
            let (status, text) = chunked(&app, &m, &path, &cluster, MGMT_LIMIT + 1024).await;
            assert_eq!(status, 413, "{m} {path} chunked: {text}");
        }
        checked += 1;
    }
    assert!(checked >= 7);
    eprintln!("body-size operations: {checked} cases");
    // the service is still fine
    assert_eq!(app.get("/api/v1/tenants/acme", &cluster).await.status, 200);
}
dual_test!(oversized_bodies_are_413);

fn names(r: &Resp, field: &str, what: &str) {
    assert_eq!(
        r.status,
        422,
        "{what}: {}",
        &r.text[..r.text.len().min(300)]
    );
    let f = r.fields();
    assert!(f.iter().any(|x| x == field), "{what}: {field} not in {f:?}");
}

async fn oversized_fields_and_lists_are_422(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    let cluster = app.cluster_token();
    let settings_path = "/api/v1/tenants/acme/email-settings";
    let base = m365_password_settings();
    let long = |n: usize| "x".repeat(n);
    let many_addresses = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"address": format!("u{i}@acme.example")}))
            .collect()
    };

    let mut cases: Vec<(&str, Value, &str)> = Vec::new();
    let mut s = base.clone();
    s["senders"] = json!(many_addresses(101));
    s["senders"][0]["default"] = json!(true);
    s["feature_senders"] = json!({});
    cases.push(("101 senders", s, "senders"));
    let mut s = base.clone();
    s["receivers"] = json!(many_addresses(101));
    cases.push(("101 receivers", s, "receivers"));
    let mut s = base.clone();
    s["senders"][0]["name"] = json!(long(257));
    cases.push(("long sender name", s, "senders[0].name"));
    let mut s = base.clone();
    s["server"]["host"] = json!(format!("{}.example", long(250)));
    cases.push(("long host", s, "server.host"));
    let mut s = base.clone();
    s["auth"]["username"] = json!(long(257));
    cases.push(("long username", s, "auth.username"));
    let mut s = base.clone();
    s["auth"]["password"] = json!(long(100_000));
    cases.push(("100 kB password", s, "auth.password"));
    let mut s = base.clone();
    s["senders"][1]["address"] = json!(format!("{}@acme.example", long(300)));
    cases.push(("long address", s, "senders[1].address"));
    let oauth = json!({
        "provider": "custom",
        "server": {"host": "smtp.acme.example", "port": 587, "encryption": "starttls"},
        "auth": {"method": "oauth2", "client_id": "c", "client_secret": "s",
                 "authorization_url": "https://login.acme.example/authorize",
                 "token_url": "https://login.acme.example/token",
                 "scopes": (0..101).map(|i| format!("s{i}")).collect::<Vec<_>>()},
        "senders": [{"address": "scanner@acme.example", "default": true}]
    });
    cases.push(("101 scopes", oauth.clone(), "auth.scopes"));
    let mut s = oauth.clone();
    s["auth"]["scopes"] = json!(["openid"]);
    s["auth"]["client_id"] = json!(long(257));
    cases.push(("long client id", s.clone(), "auth.client_id"));
    s["auth"]["client_id"] = json!("c");
    s["auth"]["client_secret"] = json!(long(100_000));
    cases.push(("100 kB client secret", s.clone(), "auth.client_secret"));
    s["auth"]["client_secret"] = json!("s");
    s["auth"]["token_url"] = json!(format!("https://login.acme.example/{}", long(5000)));
    cases.push(("long token URL", s, "auth.token_url"));
    for (what, doc, field) in &cases {
        let r = app.put(settings_path, &t, doc).await;
        names(&r, field, what);
    }

    // tenants (invitation fields), sites, the test email
    let tenant = |name: Value, admins: Value| json!({"name": name, "admin_emails": admins});
    let r = app
        .put(
            "/api/v1/tenants/big",
            &cluster,
            &tenant(json!(long(201)), json!([])),
        )
        .await;
    names(&r, "name", "long tenant name");
    let admins: Vec<String> = (0..51).map(|i| format!("a{i}@big.example")).collect();
    let r = app
        .put(
            "/api/v1/tenants/big",
            &cluster,
            &tenant(json!("Big"), json!(admins)),
        )
        .await;
    names(&r, "admin_emails", "51 admins");
    let r = app
        .put(
            &format!("/api/v1/tenants/{}", long(200)),
            &cluster,
            &tenant(json!("Big"), json!([])),
        )
        .await;
    assert!(
        matches!(r.status, 404 | 422),
        "a 200-character tenant id: {} {}",
        r.status,
        r.text
    );
    let r = app
        .post(
            "/api/v1/tenants/acme/sites",
            &t,
            &json!({"name": long(1000)}),
        )
        .await;
    names(&r, "name", "long site name");
    let r = app
        .post(
            "/api/v1/tenants/acme/email-settings/test",
            &t,
            &json!({"to": format!("{}@acme.example", long(1000))}),
        )
        .await;
    names(&r, "to", "long test recipient");
    // nothing of that was stored
    assert_eq!(app.get(settings_path, &t).await.status, 404);
    assert_eq!(
        app.get("/api/v1/tenants/acme/sites", &t).await.json(),
        json!([])
    );
    assert_eq!(app.get("/api/v1/tenants/big", &cluster).await.status, 404);
}
dual_test!(oversized_fields_and_lists_are_422);

/// The site mailer's local API: a body over its limit is 413 problem+json; too many
/// recipients or attachments and an over-long subject are 422 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_mailer_limits() {
    let sm = crate::security_headers::LocalMailer::start().await;
    let r = sm
        .post_raw(padded(site_mailer::extract::MAX_BODY + 1024))
        .await;
    assert_eq!(r.status, 413, "{}", &r.text[..r.text.len().min(300)]);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let base = json!({"kind": "scan_to_email", "to": ["it@acme.example"], "subject": "Scan"});
    assert_eq!(sm.post(&base).await.status, 202);
    let addresses =
        |n: usize| -> Vec<String> { (0..n).map(|i| format!("u{i}@example.com")).collect() };
    let mut cases: Vec<(&str, Value, &str)> = Vec::new();
    let mut m = base.clone();
    m["to"] = json!(addresses(site_mailer::domain::MAX_RECIPIENTS + 1));
    cases.push(("too many to", m, "to"));
    let mut m = base.clone();
    m["cc"] = json!(addresses(site_mailer::domain::MAX_RECIPIENTS));
    cases.push(("to + cc over the limit", m, "to"));
    let mut m = base.clone();
    m["subject"] = json!("s".repeat(mail_core::smtp::MAX_SUBJECT_CHARS + 1));
    cases.push(("long subject", m, "subject"));
    let mut m = base.clone();
    m["attachments"] = json!(
        (0..site_mailer::domain::MAX_ATTACHMENTS + 1)
            .map(|i| json!({"filename": format!("a{i}.txt"), "content_type": "text/plain", "content_base64": "eA=="}))
            .collect::<Vec<_>>()
    );
    cases.push(("too many attachments", m, "attachments"));
    let mut m = base.clone();
    m["attachments"] = json!([{"filename": format!("{}.pdf", "a".repeat(1000)), "content_type": "application/pdf", "content_base64": "eA=="}]);
    cases.push(("long file name", m, "attachments[0].filename"));
    let mut m = base.clone();
    m["to"] = json!([format!("{}@example.com", "a".repeat(1000))]);
    cases.push(("long address", m, "to[0]"));
    for (what, body, field) in &cases {
        let r = sm.post(body).await;
        assert_eq!(
            r.status,
            422,
            "{what}: {}",
            &r.text[..r.text.len().min(300)]
        );
        let f = r.fields();
        assert!(f.iter().any(|x| x == field), "{what}: {field} not in {f:?}");
    }
    sm.stop().await;
}
