//! A site's token lookup through Redis (what a site does when its memory misses: `GET` of the
//! tenant's entry, then AES-256-GCM open with the tenant's derived cache key and JSON decode:
//! `mail_core::token_cache::RedisTokenCache::get`) against `redis-benchmark -t get`, on the
//! same private redis-server (unix socket), with the same number of concurrent clients, the
//! same value size and the same number of requests, in the same run. A site shares one
//! multiplexed connection between its tasks (redis-rs ConnectionManager); redis-benchmark
//! opens one connection per client, so the lookup also runs that way. A last row (raw GET
//! through redis-rs on the shared connection, no decrypt) shows what decryption costs.
//!
//!   cargo bench -p postwire-tests --bench redis_token_lookup
//!
//! Knobs: POSTWIRE_BENCH_REDIS_REQUESTS (default 200000 per round),
//! POSTWIRE_BENCH_REDIS_CLIENTS (default 50, redis-benchmark's default),
//! POSTWIRE_BENCH_ROUNDS (default 3: reference and ours alternate; the median round counts),
//! POSTWIRE_REDIS_BENCHMARK_BIN (default `redis-benchmark`), POSTWIRE_REDIS_SERVER_BIN.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use chrono::Utc;
use mail_core::secret::WireSecret;
use mail_core::token_cache::{CachedToken, RedisTokenCache, derive_tenant_key, redis_key};
use postwire_tests::PrivateRedis;
use secrecy::SecretSlice;

/// Length of the cached access token: Microsoft 365 access tokens are 1.5 to 2.5 KB.
const ACCESS_TOKEN_LEN: usize = 1_600;
const TENANT: &str = "bench";

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy)]
struct Figures {
    ops: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn main() {
    postwire_tests::run_bench(run());
}

/// `clients` tasks share `requests` lookups; every one must return the token that was stored.
async fn ours(
    caches: &[RedisTokenCache],
    raw: &redis::aio::MultiplexedConnection,
    key: &Arc<SecretSlice<u8>>,
    expected: &str,
    requests: u64,
    clients: u64,
    decrypt: bool,
) -> Figures {
    let left = Arc::new(AtomicI64::new(requests as i64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let cache = &caches[i as usize % caches.len()];
        let (cache, mut conn, key, left, expected) = (
            cache.clone(),
            raw.clone(),
            key.clone(),
            left.clone(),
            expected.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity((requests / clients + 1) as usize);
            while left.fetch_sub(1, Ordering::Relaxed) > 0 {
                let t0 = Instant::now();
                if decrypt {
                    let got = cache.get(&key, TENANT).await.unwrap().unwrap();
                    assert_eq!(got.access_token.expose(), expected);
                } else {
                    // The GET alone: same client library, one shared multiplexed connection
                    // like RedisTokenCache's, no decrypt.
                    let v: Vec<u8> = redis::cmd("GET")
                        .arg(redis_key(TENANT))
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    assert!(!v.is_empty());
                }
                lat.push(t0.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(requests as usize);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(all.len() as u64, requests);
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    Figures {
        ops: requests as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

/// `redis-benchmark -t set,get` (SET fills the key, so every GET returns a value of `size`
/// bytes); its GET line.
async fn reference(socket: &str, requests: u64, clients: u64, size: usize) -> Figures {
    let bin =
        std::env::var("POSTWIRE_REDIS_BENCHMARK_BIN").unwrap_or_else(|_| "redis-benchmark".into());
    let out = tokio::process::Command::new(&bin)
        .args(["-s", socket, "-t", "set,get", "--csv"])
        .args(["-n", &requests.to_string(), "-c", &clients.to_string()])
        .args(["-d", &size.to_string()])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    assert!(out.status.success(), "{bin}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("\"GET\""))
        .unwrap_or_else(|| panic!("no GET line in: {text}"));
    let f: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|v| v.trim_matches('"').parse().unwrap())
        .collect();
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",...
    Figures {
        ops: f[0],
        p50_ms: f[3],
        p99_ms: f[5],
    }
}

fn median(mut v: Vec<Figures>) -> Figures {
    v.sort_by(|a, b| a.ops.total_cmp(&b.ops));
    v[v.len() / 2]
}

async fn run() {
    let requests = knob("POSTWIRE_BENCH_REDIS_REQUESTS", 200_000);
    let clients = knob("POSTWIRE_BENCH_REDIS_CLIENTS", 50);
    let rounds = knob("POSTWIRE_BENCH_ROUNDS", 3).max(1);
    let redis = PrivateRedis::start().await;
    let url = redis.url();
    let socket = url.trim_start_matches("redis+unix://").to_owned();

    // The tenant's entry, written as the Management Service writes it.
    let root = SecretSlice::from(mail_core::crypto::random_bytes::<32>().to_vec());
    let key = Arc::new(derive_tenant_key(&root, TENANT));
    let access_token: String = "x".repeat(ACCESS_TOKEN_LEN);
    let now = Utc::now();
    let token = CachedToken {
        access_token: WireSecret::new(&access_token),
        expires_at: now + chrono::Duration::hours(1),
        issued_at: now,
        username: Some("sender@bench.example".into()),
    };
    let cache = RedisTokenCache::connect(&url).await.unwrap();
    // Like redis-benchmark: one connection per client.
    let mut per_client = Vec::new();
    for _ in 0..clients {
        per_client.push(RedisTokenCache::connect(&url).await.unwrap());
    }
    cache.put(&key, TENANT, &token, now).await.unwrap();
    let size = redis.get(&redis_key(TENANT)).await.unwrap().len();
    let raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // Warm-up (connection, allocator).
    ours(
        std::slice::from_ref(&cache),
        &raw,
        &key,
        &access_token,
        2_000,
        clients,
        true,
    )
    .await;

    let (mut refs, mut ourss, mut conns, mut raws) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        refs.push(reference(&socket, requests, clients, size).await);
        ourss.push(
            ours(
                std::slice::from_ref(&cache),
                &raw,
                &key,
                &access_token,
                requests,
                clients,
                true,
            )
            .await,
        );
        conns.push(
            ours(
                &per_client,
                &raw,
                &key,
                &access_token,
                requests,
                clients,
                true,
            )
            .await,
        );
        raws.push(
            ours(
                std::slice::from_ref(&cache),
                &raw,
                &key,
                &access_token,
                requests,
                clients,
                false,
            )
            .await,
        );
        // The entry stays for the whole run (1 h TTL); redis-benchmark uses its own key.
        assert!(cache.get(&key, TENANT).await.unwrap().is_some());
    }
    let (r, o, c, w) = (median(refs), median(ourss), median(conns), median(raws));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!();
    println!(
        "site token lookup through Redis: {clients} concurrent clients, {requests} requests per round, value {size} bytes, unix socket, median of {rounds} rounds, {cores} cores"
    );
    println!(
        "{:<58} {:>10} {:>8} {:>8}",
        "target", "ops/s", "p50 ms", "p99 ms"
    );
    for (name, f) in [
        ("redis-benchmark -t get (one connection per client)", r),
        ("site lookup: GET + decrypt (RedisTokenCache::get)", o),
        (
            "site lookup, one connection per client (as redis-benchmark)",
            c,
        ),
        ("raw redis-rs GET, no decrypt (one shared connection)", w),
    ] {
        println!(
            "{:<58} {:>10.0} {:>8.3} {:>8.3}",
            name, f.ops, f.p50_ms, f.p99_ms
        );
    }
    let ratio = o.ops / r.ops;
    let ratio_conns = c.ops / r.ops;
    println!(
        "ratio (site lookup / redis-benchmark GET): {ratio:.2} as a site runs it (one shared connection), {ratio_conns:.2} with one connection per client"
    );
    println!(
        "BENCH-SUMMARY\tsite token lookup through Redis ({clients} clients, {size} B value)\t{:.0} lookups/s shared conn; {:.0} one conn/client\tredis-benchmark GET {:.0} ops/s\t{ratio:.2} / {ratio_conns:.2}",
        o.ops, c.ops, r.ops
    );
}
