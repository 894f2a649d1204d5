//! Provider calls (OAuth discovery, token endpoint) never go through a proxy named by
//! `HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY`: the proxy would resolve and connect to the
//! host itself, so the egress check (which runs on the addresses *we* connect to) would never
//! see them. Its own test binary: it sets the proxy variables for the whole process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mail_core::egress::{EgressClient, EgressPolicy};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// A server on loopback that answers every connection with `body` and counts them.
async fn counting_server(body: &'static str) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (port, count)
}

const CHILD: &str = "POSTWIRE_EGRESS_PROXY_TEST_CHILD";

/// Runs in a child process of this test binary with the proxy variables set (the environment
/// cannot be changed safely in a running multi-threaded test).
#[tokio::test]
async fn proxy_variables_are_ignored_by_provider_calls() {
    if std::env::var_os(CHILD).is_some() {
        return child().await;
    }
    let (proxy_port, proxied) = counting_server(r#"{"via":"proxy"}"#).await;
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "proxy_variables_are_ignored_by_provider_calls",
        "--nocapture",
    ])
    .env(CHILD, "1")
    .env_remove("NO_PROXY")
    .env_remove("no_proxy");
    for k in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env(k, &proxy);
    }
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the child ran the test"
    );
    assert_eq!(proxied.load(Ordering::SeqCst), 0, "went through the proxy");
}

async fn child() {
    assert!(std::env::var("HTTP_PROXY").is_ok_and(|p| p.starts_with("http://127.0.0.1:")));
    let (target_port, direct) = counting_server(r#"{"via":"direct"}"#).await;
    let policy = Arc::new(EgressPolicy::parse("loopback").unwrap());
    let client = EgressClient::new(policy, Duration::from_secs(5), None).unwrap();
    let got: serde_json::Value = client
        .get_json(&format!(
            "http://localhost:{target_port}/.well-known/openid-configuration"
        ))
        .await
        .unwrap();
    assert_eq!(got["via"], "direct");
    assert_eq!(direct.load(Ordering::SeqCst), 1);

    // and the egress check applies to the address connected to: a policy without loopback
    // refuses the same URL (through the proxy it could not tell)
    let strict = Arc::new(EgressPolicy::parse("public").unwrap());
    let client = EgressClient::new(strict, Duration::from_secs(5), None).unwrap();
    let err = client
        .get_json::<serde_json::Value>(&format!("http://localhost:{target_port}/x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not allowed"), "{err}");
}
