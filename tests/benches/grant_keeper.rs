//! The Management Service's CPU to keep N OAuth grants fresh (default 100,000) for one
//! simulated day, against the real OAuth peer (`tests/peers/oauth-server.mjs`, strict: every
//! refresh token must have been issued by it and is spent on use).
//!
//!   cargo bench -p postwire-tests --bench grant_keeper
//!
//! The grants are seeded directly in the store (a tenant, its OAuth 2.0 settings with an
//! encrypted client secret, and a grant with an encrypted refresh token minted by the peer),
//! last refreshed evenly over the previous 24 hours: the steady state of a running service.
//! Then the keeper's own schedule runs (`keeper_tick` of the default 24 h keep-alive, i.e. a
//! tick every 15 minutes, `keepalive_once(KEEPER_CONCURRENCY)` per tick) with an injected
//! clock advanced one tick at a time for 24 hours. Reported: this process's CPU-seconds
//! (/proc/self/stat utime+stime, before/after the simulated day; the seeding is not counted),
//! provider refresh calls per grant (counted at the peer and by the keeper), grants refreshed
//! per wall-clock second, and, for reference, the CPU of the OAuth peer and of the
//! PostgreSQL backends serving this run.
//!
//! Knobs: POSTWIRE_BENCH_GRANTS (default 100000), POSTWIRE_BENCH_BACKEND (`postgres`, the
//! default: a throwaway `pw_bench_*` database on POSTWIRE_TEST_DATABASE_URL's server, dropped
//! at the end; or `sqlite`: a file in a temp directory).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use mail_core::crypto::Binding;
use mail_core::settings::{EmailSettingsRequest, StoredState};
use management::clock::ManualClock;
use management::oauth::grants::{COL_REFRESH, KEEPER_CONCURRENCY, STATUS_AUTHORIZED, keeper_tick};
use management::store::COL_CLIENT_SECRET;
use management::store::entities::{email_settings, oauth_grant, tenant};
use postwire_tests::peers::OAuthPeer;
use postwire_tests::{Backend, Setup, admin_db_url};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, Database, EntityTrait, PaginatorTrait,
    QueryFilter, TransactionTrait,
};
use serde_json::json;

const CLIENT_ID: &str = "bench-keeper";
const SCOPE: &str = "openid email offline_access";
const BATCH: usize = 500;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// utime + stime of a process, in seconds (Linux /proc).
fn cpu_seconds(pid: &str, ticks_per_s: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_s)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU-seconds of the PostgreSQL backends connected to `db` (by pid).
async fn pg_backends(
    admin: &sea_orm::DatabaseConnection,
    db: &str,
    ticks: f64,
) -> HashMap<i64, f64> {
    let rows = admin
        .query_all_raw(sea_orm::Statement::from_string(
            admin.get_database_backend(),
            format!("SELECT pid::bigint AS pid FROM pg_stat_activity WHERE datname = '{db}'"),
        ))
        .await
        .unwrap_or_default();
    rows.iter()
        .filter_map(|r| r.try_get::<i64>("", "pid").ok())
        .filter_map(|pid| cpu_seconds(&pid.to_string(), ticks).map(|c| (pid, c)))
        .collect()
}

fn main() {
    postwire_tests::run_bench(run());
}

async fn run() {
    let n = knob("POSTWIRE_BENCH_GRANTS", 100_000) as usize;
    let backend = match std::env::var("POSTWIRE_BENCH_BACKEND").as_deref() {
        Ok("sqlite") => Backend::Sqlite,
        _ => Backend::Postgres,
    };
    let ticks_per_s = clock_ticks();
    let peer = OAuthPeer::start().await;

    // The service's configuration: a SQLite data dir, or a throwaway PostgreSQL database.
    let mut setup = Setup::new(Backend::Sqlite).await;
    let mut pg: Option<(sea_orm::DatabaseConnection, String)> = None;
    if backend == Backend::Postgres {
        let admin_url = admin_db_url();
        let admin = Database::connect(&admin_url).await.unwrap();
        let name = format!("pw_bench_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&format!("/{name}"));
        setup.env.insert("DATABASE_URL".into(), url.to_string());
        for k in [
            "POSTWIRE_MASTER_KEY",
            "POSTWIRE_CACHE_KEY",
            "POSTWIRE_JWT_SECRET",
        ] {
            setup
                .env
                .insert(k.into(), mail_core::crypto::generate_key_b64());
        }
        pg = Some((admin, name));
    }
    let config = setup.config();
    let tick = keeper_tick(config.grant_keepalive);
    let start: DateTime<Utc> = Utc::now();
    let clock = Arc::new(ManualClock::new(start));
    // Everything but serving: no HTTP server and no background keeper; this bench drives the
    // keeper's schedule itself.
    let state = management::startup::prepare(config, clock.clone())
        .await
        .unwrap();
    let db = state.store.db.clone();

    // ---------------------------------------------------------------- seed
    let seeded_at = Instant::now();
    let settings = serde_json::from_value::<EmailSettingsRequest>(json!({
        "provider": "custom",
        "server": {"host": "127.0.0.1", "port": 2525, "encryption": "starttls"},
        "auth": {"method": "oauth2", "client_id": CLIENT_ID, "client_secret": "s",
                 "authorization_url": peer.authorize_url(), "token_url": peer.token_url(),
                 "issuer": peer.issuer(), "scopes": SCOPE.split(' ').collect::<Vec<_>>()},
    }))
    .unwrap()
    .validate(&StoredState {
        settings: None,
        password_set: false,
        client_secret_set: false,
    })
    .unwrap()
    .settings;
    let document = serde_json::to_string(&settings).unwrap();
    let mut refresh_tokens = Vec::with_capacity(n);
    while refresh_tokens.len() < n {
        let want = (n - refresh_tokens.len()).min(100_000) as u32;
        refresh_tokens.extend(peer.mint_refresh_tokens(CLIENT_ID, SCOPE, want).await);
    }
    assert_eq!(refresh_tokens.len(), n);
    let keys = state.store.keys.clone();
    let day_ms = 86_400_000i64;
    for (b, chunk) in refresh_tokens.chunks(BATCH).enumerate() {
        let (mut tenants, mut settings_rows, mut grants) = (Vec::new(), Vec::new(), Vec::new());
        for (j, rt) in chunk.iter().enumerate() {
            let i = b * BATCH + j;
            let id = format!("bench-{i:06}");
            // Last refreshed evenly over the previous day.
            let refreshed = start - ChronoDuration::milliseconds(day_ms)
                + ChronoDuration::milliseconds(i as i64 * day_ms / n as i64);
            tenants.push(tenant::ActiveModel {
                id: Set(id.clone()),
                name: Set(format!("Bench {i}")),
                admin_emails: Set(format!("[\"admin@{id}.example\"]")),
                status: Set("active".into()),
                created_at: Set(start - ChronoDuration::days(30)),
                updated_at: Set(start - ChronoDuration::days(30)),
            });
            settings_rows.push(email_settings::ActiveModel {
                tenant_id: Set(id.clone()),
                document: Set(document.clone()),
                password_ct: Set(None),
                client_secret_ct: Set(Some(keys.encrypt(
                    Binding {
                        owner: &id,
                        column: COL_CLIENT_SECRET,
                    },
                    b"s",
                ))),
                updated_at: Set(start - ChronoDuration::days(30)),
            });
            grants.push(oauth_grant::ActiveModel {
                tenant_id: Set(id.clone()),
                status: Set(STATUS_AUTHORIZED.into()),
                refresh_token_ct: Set(Some(keys.encrypt(
                    Binding {
                        owner: &id,
                        column: COL_REFRESH,
                    },
                    rt.as_bytes(),
                ))),
                access_token_ct: Set(None),
                access_expires_at: Set(None),
                access_issued_at: Set(None),
                username: Set(Some("sender@tenant.example".into())),
                obtained_at: Set(start - ChronoDuration::days(30)),
                refreshed_at: Set(Some(refreshed)),
                last_error: Set(None),
                failing_since: Set(None),
                lease_owner: Set(None),
                lease_until: Set(None),
                generation: Set(1),
                updated_at: Set(refreshed),
            });
        }
        let txn = db.begin().await.unwrap();
        tenant::Entity::insert_many(tenants)
            .exec(&txn)
            .await
            .unwrap();
        email_settings::Entity::insert_many(settings_rows)
            .exec(&txn)
            .await
            .unwrap();
        oauth_grant::Entity::insert_many(grants)
            .exec(&txn)
            .await
            .unwrap();
        txn.commit().await.unwrap();
    }
    let seed_secs = seeded_at.elapsed().as_secs_f64();
    eprintln!("grant_keeper: seeded {n} grants in {seed_secs:.1} s; simulating one day");

    // ---------------------------------------------------------------- one simulated day
    let me = std::process::id().to_string();
    let peer_pid = peer.pid().map(|p| p.to_string());
    let calls_before = peer.token_calls().await;
    let keeper_calls_before = state.grants.provider_calls();
    let pg_before = match &pg {
        Some((admin, name)) => pg_backends(admin, name, ticks_per_s).await,
        None => HashMap::new(),
    };
    let peer_cpu_before = peer_pid
        .as_deref()
        .and_then(|p| cpu_seconds(p, ticks_per_s));
    let cpu_before = cpu_seconds(&me, ticks_per_s).unwrap();
    let wall = Instant::now();

    let ticks = (86_400 / tick.as_secs()) as usize;
    let mut refreshed = 0usize;
    let mut longest_tick = 0f64;
    let step = ChronoDuration::from_std(tick).unwrap();
    for t in 1..=ticks {
        clock.advance(step);
        let t0 = Instant::now();
        refreshed += state.grants.keepalive_once(KEEPER_CONCURRENCY).await;
        longest_tick = longest_tick.max(t0.elapsed().as_secs_f64());
        if t % 8 == 0 {
            eprintln!(
                "grant_keeper: {:>2} h simulated, {refreshed} refreshed, {:.0} s wall",
                t * tick.as_secs() as usize / 3600,
                wall.elapsed().as_secs_f64()
            );
        }
    }

    let wall_secs = wall.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&me, ticks_per_s).unwrap() - cpu_before;
    let peer_cpu = match (
        peer_pid
            .as_deref()
            .and_then(|p| cpu_seconds(p, ticks_per_s)),
        peer_cpu_before,
    ) {
        (Some(a), Some(b)) => Some(a - b),
        _ => None,
    };
    let pg_cpu = match &pg {
        Some((admin, name)) => Some(
            pg_backends(admin, name, ticks_per_s)
                .await
                .iter()
                .map(|(pid, c)| c - pg_before.get(pid).copied().unwrap_or(0.0))
                .sum::<f64>(),
        ),
        None => None,
    };
    let calls = peer.token_calls().await;
    let peer_refreshes = calls.refresh_token - calls_before.refresh_token;
    let keeper_calls = state.grants.provider_calls() - keeper_calls_before;

    // Every grant was refreshed during the day and is still authorized.
    let fresh = oauth_grant::Entity::find()
        .filter(oauth_grant::Column::Status.eq(STATUS_AUTHORIZED))
        .filter(oauth_grant::Column::RefreshedAt.gt(start))
        .count(&db)
        .await
        .unwrap() as usize;
    assert_eq!(refreshed, n, "grants refreshed by the keeper");
    assert_eq!(
        fresh, n,
        "grants refreshed during the day and still authorized"
    );
    assert_eq!(
        calls.total - calls_before.total,
        peer_refreshes,
        "only refresh calls"
    );

    let per_grant = peer_refreshes as f64 / n as f64;
    let rate = refreshed as f64 / wall_secs;
    println!();
    println!(
        "grant keeper: {n} grants, one simulated day ({ticks} ticks of {} s, concurrency {KEEPER_CONCURRENCY}), {:?} store, {} cores",
        tick.as_secs(),
        backend,
        std::thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(0)
    );
    println!("  seeding (not measured)                         {seed_secs:>10.1} s");
    println!("  grants refreshed                               {refreshed:>10}");
    println!(
        "  provider refresh calls (peer / keeper)         {peer_refreshes:>10} / {keeper_calls}"
    );
    println!("  provider calls per grant per day               {per_grant:>10.3}");
    println!("  wall time of the simulated day                 {wall_secs:>10.1} s");
    println!("  grants refreshed per wall-clock second         {rate:>10.0}");
    println!(
        "  longest tick (budget: {} s)                   {longest_tick:>10.1} s",
        tick.as_secs()
    );
    println!("  Management Service CPU (this process)          {cpu:>10.1} CPU-s");
    println!(
        "  ... per grant per day                          {:>10.3} CPU-ms",
        cpu * 1000.0 / n as f64
    );
    println!(
        "  ... share of one core over the day             {:>10.4} %",
        cpu / 86_400.0 * 100.0
    );
    if let Some(c) = peer_cpu {
        println!("  reference: OAuth peer (node) CPU               {c:>10.1} CPU-s");
    }
    if let Some(c) = pg_cpu {
        println!("  reference: PostgreSQL backends CPU             {c:>10.1} CPU-s");
    }
    println!(
        "BENCH-SUMMARY\tCPU to keep {n} grants fresh for one day ({backend:?})\t{cpu:.1} CPU-s ({:.3} ms/grant), {per_grant:.2} provider calls/grant, {rate:.0} grants/s\t{}\t{:.4} % of one core",
        cpu * 1000.0 / n as f64,
        peer_cpu
            .map(|c| format!("OAuth peer {c:.1} CPU-s"))
            .unwrap_or_default(),
        cpu / 86_400.0 * 100.0
    );

    drop(state);
    if let Some((admin, name)) = pg {
        let _ = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
    let _ = std::fs::remove_dir_all(&setup.data_dir);
}
