//! Token endpoint throughput and p99 (cache hit, 64 connections) against an actix-web
//! hello-world that returns a body of the same size, measured in the same run on the same
//! machine with the same load generator.
//!
//!   cargo bench -p postwire-tests --bench token_endpoint
//!
//! POSTWIRE_BENCH_SECS (default 10) sets the measured time per target.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use postwire_tests::peers::{OAuthPeer, OAuthPeerOptions, peer_http_client};
use postwire_tests::{Backend, Setup};
use serde_json::json;

const CONNECTIONS: usize = 64;

struct Figures {
    requests: u64,
    errors: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `CONNECTIONS` tasks, each with its own keep-alive connection, hammer `url` for `secs`.
async fn load(url: &str, bearer: Option<&str>, secs: u64) -> Figures {
    // warm-up
    let warm = reqwest::Client::new();
    for _ in 0..200 {
        let mut rb = warm.get(url);
        if let Some(b) = bearer {
            rb = rb.bearer_auth(b);
        }
        let _ = rb.send().await.unwrap().bytes().await;
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (url, bearer) = (url.to_owned(), bearer.map(str::to_owned));
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let mut rb = client.get(&url);
                if let Some(b) = &bearer {
                    rb = rb.bearer_auth(b);
                }
                match rb.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(t0.elapsed().as_micros() as u32);
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Figures {
        requests: all.len() as u64,
        errors,
        rps: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

fn main() {
    postwire_tests::run_bench(run());
}

async fn run() {
    let secs: u64 = std::env::var("POSTWIRE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let peer = OAuthPeer::start_with(OAuthPeerOptions {
        username: Some("sender@bench.example".into()),
        expires_in: Some(3600),
        audience: None,
    })
    .await;
    let app = Setup::new(Backend::Sqlite).await.spawn().await;
    app.create_tenant("bench").await;
    let t = app.admin_token("bench");
    let settings = json!({
        "provider": "custom",
        "server": {"host": "127.0.0.1", "port": 2525, "encryption": "starttls"},
        "auth": {"method": "oauth2", "client_id": "bench", "client_secret": "s",
                 "authorization_url": peer.authorize_url(), "token_url": peer.token_url(),
                 "issuer": peer.issuer(), "scopes": ["openid", "email", "offline_access"]},
    });
    assert_eq!(
        app.put("/api/v1/tenants/bench/email-settings", &t, &settings)
            .await
            .status,
        200
    );
    let auth = app
        .request(
            "POST",
            "/api/v1/tenants/bench/email-settings/oauth/authorize",
            Some(&t),
            None,
        )
        .await
        .json();
    let redirect = peer_http_client()
        .get(auth["authorization_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let location =
        redirect.headers()["location"]
            .to_str()
            .unwrap()
            .replacen("https://postwire.test", "", 1);
    assert_eq!(app.request("GET", &location, None, None).await.status, 200);
    let site = app
        .post("/api/v1/tenants/bench/sites", &t, &json!({"name": "bench"}))
        .await
        .json();
    let st = app
        .request(
            "POST",
            "/api/v1/site-auth/token",
            None,
            Some(&json!({"site_id": site["site_id"], "secret": site["secret"]})),
        )
        .await
        .json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let token_url = format!("{}/api/v1/site/smtp-access-token", app.address);
    let sample = app.get("/api/v1/site/smtp-access-token", &st).await;
    assert_eq!(sample.status, 200);
    let body_len = sample.text.len();

    // The reference: actix-web answering a body of the same size, same worker count.
    let body: Arc<String> = Arc::new("x".repeat(body_len));
    let server = actix_web::HttpServer::new(move || {
        let body = body.clone();
        actix_web::App::new().route(
            "/",
            actix_web::web::get().to(move || {
                let body = body.clone();
                async move {
                    actix_web::HttpResponse::Ok()
                        .content_type("application/json")
                        .body(body.as_str().to_owned())
                }
            }),
        )
    })
    .bind(("127.0.0.1", 0))
    .unwrap();
    let hello_addr = server.addrs()[0];
    let hello = server.run();
    let handle = hello.handle();
    tokio::spawn(hello);

    let reference = load(&format!("http://{hello_addr}/"), None, secs).await;
    let ours = load(&token_url, Some(&st), secs).await;
    handle.stop(false).await;
    let calls = peer.token_calls().await;

    println!();
    println!(
        "token endpoint benchmark: {CONNECTIONS} connections, {secs} s per target, body {body_len} bytes, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<44} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "target", "requests", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for (name, f) in [
        ("actix-web hello-world (same body size)", &reference),
        ("GET /api/v1/site/smtp-access-token (hit)", &ours),
    ] {
        println!(
            "{:<44} {:>10} {:>9.0} {:>9.2} {:>9.2} {:>7}",
            name, f.requests, f.rps, f.p50_ms, f.p99_ms, f.errors
        );
    }
    println!(
        "ratio (token endpoint / hello-world throughput): {:.2}  (goal >= 0.5)",
        ours.rps / reference.rps
    );
    println!(
        "provider refreshes during the run: {} (cache hits only expected: 0)",
        calls.refresh_token
    );
    // One line for scripts/bench's summary table.
    println!(
        "BENCH-SUMMARY\ttoken endpoint, cache hit ({CONNECTIONS} connections, goal >= 0.5)\t{:.0} req/s, p99 {:.2} ms\tactix-web hello-world {:.0} req/s, p99 {:.2} ms\t{:.2}",
        ours.rps,
        ours.p99_ms,
        reference.rps,
        reference.p99_ms,
        ours.rps / reference.rps
    );
}
