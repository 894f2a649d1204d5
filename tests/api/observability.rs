//! Observability of the Management Service in process, on both backends: the outbox gauges
//! (depth by kind and status, oldest message's age) and the sends counter read the real
//! database, and every response carries its request id. The binaries' JSON logs, OTLP traces
//! and the Prometheus parser are tested in tests/observability (pytest, real processes).

use std::collections::HashSet;
use std::time::Duration;

use postwire_tests::{Backend, TestApp, dual_test};

/// The value of one series of `/metrics` (text format), e.g.
/// `postwire_outbox_messages{kind="invitation",status="queued"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn metrics(app: &TestApp) -> String {
    let r = app.request("GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.text
}

async fn outbox_gauges_follow_the_database(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let queued = r#"postwire_outbox_messages{kind="invitation",status="queued"}"#;
    let sending = r#"postwire_outbox_messages{kind="invitation",status="sending"}"#;
    let age = "postwire_outbox_oldest_message_age_seconds";
    let retries = r#"postwire_mail_sends_total{kind="invitation",result="retry"}"#;
    let m = metrics(&app).await;
    assert_eq!(sample(&m, queued), Some(0.0), "{m}");
    assert_eq!(sample(&m, age), Some(0.0), "{m}");
    assert_eq!(sample(&m, retries), Some(0.0), "{m}");

    // An invitation to the new tenant's admin waits: no cluster email settings exist.
    app.create_tenant("acme").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = metrics(&app).await;
    let depth = sample(&m, queued).unwrap() + sample(&m, sending).unwrap();
    assert_eq!(depth, 1.0, "{m}");
    let oldest = sample(&m, age).unwrap();
    assert!(
        (1.0..60.0).contains(&oldest),
        "oldest message age {oldest}: {m}"
    );
    // The worker tried it and put it back (waiting for settings): counted by result.
    assert!(sample(&m, retries).unwrap() >= 1.0, "{m}");
}
dual_test!(outbox_gauges_follow_the_database);

#[tokio::test]
async fn every_response_carries_its_own_request_id() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut seen = HashSet::new();
    for path in ["/healthz", "/readyz", "/api/v1/tenants", "/no-such-route"] {
        let r = app.request("GET", path, None, None).await;
        let id = r
            .headers
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{path} ({}): no X-Request-Id", r.status))
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(id.len(), 36, "{path}: {id}");
        assert!(seen.insert(id), "{path}: request id reused");
    }
}
