//! Site mailer delivery throughput against Postfix's own tools, in the same run on the same
//! machine: `smtp-source` sends N 5 KB messages over 10 sessions into `smtp-sink` (the
//! reference), then the real `site-mailer` binary (release build) accepts the same N 5 KB
//! messages from 10 concurrent local clients and delivers them into the same sink with 10
//! SMTP connections; then a fresh site mailer takes the same N messages while sending is held
//! (tenant suspended, the product's own hold) and is timed from its first delivery to its
//! last once the tenant is active again: the send rate from a filled outbox, without the
//! durable accept. Printed: messages per second of each and the ratios (goal >= 0.7).
//!
//! The message text is what smtp-source sends: 5 KB in lines of 78 characters. Completion is
//! watched at a low rate (every 50 ms, so the watching does not load the 2 cores); the
//! delivery times come from the site mailer's own outbox afterwards (`sent_ms` of every
//! message: when the SMTP server's 250 arrived), so the figures do not depend on how often
//! the bench looks.
//!
//! Also printed, as it is steadier than a rate on a shared 2-core machine: the CPU time per
//! message of the sender, smtp-source (user + system, from GNU `/usr/bin/time`) against the
//! site mailer while it delivers the filled outbox (`/proc/PID/stat`, all its threads), and
//! the CPU per message smtp-sink spends receiving from each (the receiver shares the cores).
//!
//!   cargo bench -p postwire-tests --bench site_mailer_send
//!
//! smtp-source's rate varied by more than half between runs on the same machine (8,000 to 13,200 msg/s),
//! so the delivery from a filled outbox runs in rounds (POSTWIRE_BENCH_ROUNDS, default 3),
//! each right after a run of smtp-source, and the medians of both are compared; the
//! accepted-and-delivered run is done once, against the same median.
//!
//! POSTWIRE_BENCH_MESSAGES (default 10000: a delivery of 2,000 took 0.4 s, too short for a
//! steady rate) sets N; POSTWIRE_BENCH_SEND_CONCURRENCY (default
//! 10, as the reference's sessions) the site mailer's SMTP connections. Needs /usr/sbin/smtp-source and
//! /usr/sbin/smtp-sink (Debian package postfix; the tools only, no mail system running).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postwire_tests::site_mailer_process::{SiteMailerProcess, cpu_secs, free_port};
use postwire_tests::{Backend, Setup};
use serde_json::json;

const SESSIONS: usize = 10;
const MESSAGE_BYTES: usize = 5 * 1024;
const API_KEY: &str = "bench-local-api-key-0123456789";

fn main() {
    postwire_tests::run_bench(run());
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// The value of `postwire_site_outbox_messages{state="sent"}`.
async fn sent(client: &reqwest::Client, address: &str) -> u64 {
    let text = client
        .get(format!("{address}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("postwire_site_outbox_messages{state=\"sent\"} "))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// `MESSAGE_BYTES` of text shaped as smtp-source's payload: numbered lines of 78 characters.
fn payload() -> String {
    let mut text = String::with_capacity(MESSAGE_BYTES);
    let mut line = 1;
    while text.len() < MESSAGE_BYTES {
        let head = (line % 10).to_string();
        let left = MESSAGE_BYTES - text.len();
        // 78 characters and the line break, as smtp-source's lines
        let width = left.min(79) - 1;
        text.push_str(&head);
        text.push_str(&"X".repeat(width.saturating_sub(1)));
        text.push('\n');
        line += 1;
    }
    text
}

/// The `sent_ms` of every sent message of the outbox in `data_dir`, oldest first (the site
/// mailer has stopped: read-write only so that SQLite may replay a log it left).
async fn sent_times(data_dir: &std::path::Path) -> Vec<i64> {
    use sea_orm::ConnectionTrait as _;
    let url = format!(
        "sqlite://{}?mode=rw",
        data_dir.join("site-mailer.db").display()
    );
    let db = sea_orm::Database::connect(url).await.unwrap();
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Sqlite,
            "SELECT sent_ms FROM messages WHERE status = 'sent' ORDER BY sent_ms",
        ))
        .await
        .unwrap();
    let times = rows
        .iter()
        .map(|r| r.try_get::<i64>("", "sent_ms").unwrap())
        .collect();
    db.close().await.unwrap();
    times
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Posts `n` copies of `body` to the site mailer at `address` from SESSIONS concurrent
/// clients; every one must be accepted (202).
async fn accept_all(client: &reqwest::Client, address: &str, body: &serde_json::Value, n: usize) {
    let mut tasks = Vec::new();
    for w in 0..SESSIONS {
        let (client, url, body) = (
            client.clone(),
            format!("{address}/v1/messages"),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for _ in (w..n).step_by(SESSIONS) {
                let r = client
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// One message accepted and sent (configuration fetched, an SMTP connection open), not
/// counted.
async fn warm_up(client: &reqwest::Client, address: &str, body: &serde_json::Value) {
    let r = client
        .post(format!("{address}/v1/messages"))
        .bearer_auth(API_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    while sent(client, address).await < 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One measured run: wall seconds, CPU seconds of the sender, CPU seconds of smtp-sink;
/// `accept_secs`: how long the filling took (site mailer rounds only).
struct Measured {
    secs: f64,
    cpu: f64,
    sink_cpu: f64,
    accept_secs: f64,
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One run of the reference, smtp-source into smtp-sink (`sink_pid`), under GNU time.
fn run_source(source_args: &[String], sink_pid: u32) -> Measured {
    let sink_cpu0 = cpu_secs(sink_pid);
    let t0 = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%U %S", "/usr/sbin/smtp-source"])
        .args(source_args)
        .stderr(Stdio::piped())
        .output()
        .expect("run /usr/sbin/smtp-source under /usr/bin/time (Debian packages postfix, time)");
    let secs = t0.elapsed().as_secs_f64();
    let sink_cpu = cpu_secs(sink_pid) - sink_cpu0;
    assert!(out.status.success(), "smtp-source failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cpu: f64 = stderr
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap())
        .sum();
    Measured {
        secs,
        cpu,
        sink_cpu,
        accept_secs: 0.0,
    }
}

/// Delivery alone: a fresh site mailer (own data dir) holds sending while the tenant is
/// suspended (the product's own hold: messages are accepted and stay queued), takes N
/// messages, then the tenant is made active again; timed from the first delivery to the
/// last (the rate at which the site mailer sends from a filled outbox).
#[allow(clippy::too_many_arguments)]
async fn drain_round(
    mgmt: &postwire_tests::TestApp,
    cluster: &str,
    client: &reqwest::Client,
    env: &BTreeMap<String, String>,
    data_dir: &std::path::Path,
    body: &serde_json::Value,
    n: usize,
    sink_pid: u32,
    round: usize,
) -> Measured {
    let data_dir2 = data_dir.with_extension(format!("filled{round}"));
    std::fs::create_dir_all(&data_dir2).unwrap();
    let mut env2 = env.clone();
    env2.insert(
        "POSTWIRE_DATA_DIR".into(),
        data_dir2.to_string_lossy().into_owned(),
    );
    env2.insert("POSTWIRE_CONFIG_REFRESH".into(), "100ms".into());
    let sm = SiteMailerProcess::start(&env2, &data_dir2.join("site-mailer.log")).await;
    warm_up(client, &sm.address, body).await;
    let set_status = |status: &'static str| async move {
        let r = mgmt
            .put(
                "/api/v1/tenants/bench",
                cluster,
                &json!({"name": "Tenant bench", "admin_emails": [], "status": status}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    };
    let held = || async {
        let v: serde_json::Value = client
            .get(format!("{}/readyz", sm.address))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["sending_held"].is_string()
    };
    set_status("suspended").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !held().await {
        assert!(Instant::now() < deadline, "sending not held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t_held = Instant::now();
    accept_all(client, &sm.address, body, n).await;
    let accept_secs = t_held.elapsed().as_secs_f64();
    assert_eq!(
        sent(client, &sm.address).await,
        1,
        "nothing sent while held"
    );
    let cpu_before = cpu_secs(sm.pid());
    let sink_before = cpu_secs(sink_pid);
    set_status("active").await;
    let target = (n + 1) as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while sent(client, &sm.address).await < target {
        assert!(
            Instant::now() < deadline,
            "not all delivered from the filled outbox"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = cpu_secs(sm.pid()) - cpu_before;
    let sink_cpu = cpu_secs(sink_pid) - sink_before;
    drop(sm);
    // times[0] is the warm-up message; from the first of the N to the last
    let times = sent_times(&data_dir2).await;
    assert_eq!(times.len(), n + 1, "every message sent once");
    let _ = std::fs::remove_dir_all(&data_dir2);
    Measured {
        secs: (times[n] - times[1]) as f64 / 1000.0,
        cpu,
        sink_cpu,
        accept_secs,
    }
}

async fn run() {
    let n: usize = std::env::var("POSTWIRE_BENCH_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let rounds: usize = std::env::var("POSTWIRE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let send_concurrency: usize = std::env::var("POSTWIRE_BENCH_SEND_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SESSIONS);

    // the sink: smtp-sink on a free port (as root it must drop to a user)
    let sink_port = free_port();
    let mut sink_cmd = Command::new("/usr/sbin/smtp-sink");
    if is_root() {
        sink_cmd.args(["-u", "nobody"]);
    }
    let mut sink = sink_cmd
        .args([&format!("127.0.0.1:{sink_port}"), "256"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start /usr/sbin/smtp-sink (Debian package postfix)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", sink_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // the reference: smtp-source, 10 sessions, connections reused (-d), 5 KB messages
    let source_args = [
        "-d".to_owned(),
        "-s".to_owned(),
        SESSIONS.to_string(),
        "-l".to_owned(),
        MESSAGE_BYTES.to_string(),
        "-m".to_owned(),
        n.to_string(),
        "-f".to_owned(),
        "sender@bench.example".to_owned(),
        "-t".to_owned(),
        "rcpt@example.com".to_owned(),
        format!("127.0.0.1:{sink_port}"),
    ];
    let reference = |round: usize| {
        let m = run_source(&source_args, sink.id());
        eprintln!(
            "round {round}: smtp-source {:.0} msg/s, {:.1} us CPU per message",
            n as f64 / m.secs,
            m.cpu * 1e6 / n as f64
        );
        m
    };
    let mut references = vec![reference(0)];

    // the Management Service with a tenant whose settings point at the sink
    let mgmt = Setup::new(Backend::Sqlite).await.spawn().await;
    mgmt.create_tenant("bench").await;
    let t = mgmt.admin_token("bench");
    let r = mgmt
        .put(
            "/api/v1/tenants/bench/email-settings",
            &t,
            &json!({
                "provider": "custom",
                "server": {"host": "127.0.0.1", "port": sink_port, "encryption": "none"},
                "auth": {"method": "none"},
                "senders": [{"address": "sender@bench.example", "default": true}]
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let site = mgmt
        .post("/api/v1/tenants/bench/sites", &t, &json!({"name": "bench"}))
        .await
        .json();
    let data_dir = std::env::temp_dir().join(format!("site-mailer-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&data_dir).unwrap();
    let mut env = BTreeMap::new();
    for (k, v) in [
        ("POSTWIRE_MANAGEMENT_URL", mgmt.address.as_str()),
        ("POSTWIRE_SITE_ID", site["site_id"].as_str().unwrap()),
        ("POSTWIRE_SITE_SECRET", site["secret"].as_str().unwrap()),
        ("POSTWIRE_API_KEY", API_KEY),
        ("POSTWIRE_HELLO_NAME", "bench.postwire.test"),
    ] {
        env.insert(k.to_owned(), v.to_owned());
    }
    env.insert(
        "POSTWIRE_SEND_CONCURRENCY".into(),
        send_concurrency.to_string(),
    );
    env.insert(
        "POSTWIRE_DATA_DIR".into(),
        data_dir.to_string_lossy().into_owned(),
    );
    let sm = SiteMailerProcess::start(&env, &data_dir.join("site-mailer.log")).await;
    let client = reqwest::Client::new();
    let body = json!({"kind": "test", "to": ["rcpt@example.com"], "subject": "bench",
        "text": payload()});

    // warm-up (configuration, SMTP pool), not counted
    warm_up(&client, &sm.address, &body).await;

    // N messages from 10 concurrent clients; timed until the last is delivered
    let t0 = Instant::now();
    let t0_ms = unix_ms();
    accept_all(&client, &sm.address, &body, n).await;
    let accept_secs = t0.elapsed().as_secs_f64();
    let target = (n + 1) as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while sent(&client, &sm.address).await < target {
        assert!(Instant::now() < deadline, "not all delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(sm);
    let times = sent_times(&data_dir).await;
    assert_eq!(times.len(), n + 1, "every message sent once");
    let site_secs = (times[n] - t0_ms) as f64 / 1000.0;

    // Delivery alone, in ROUNDS rounds, each right after a run of the reference (the two
    // share the machine's state of the moment); the medians are reported.
    let cluster = mgmt.cluster_token();
    let mut drains = Vec::new();
    for round in 1..=rounds {
        if round > 1 {
            references.push(reference(round));
        }
        let m = drain_round(
            &mgmt,
            &cluster,
            &client,
            &env,
            &data_dir,
            &body,
            n,
            sink.id(),
            round,
        )
        .await;
        eprintln!(
            "round {round}: site mailer from a filled outbox {:.0} msg/s, {:.1} us CPU per message",
            (n - 1) as f64 / m.secs,
            m.cpu * 1e6 / n as f64
        );
        drains.push(m);
    }
    let _ = sink.kill();
    let _ = sink.wait();
    let _ = std::fs::remove_dir_all(&data_dir);
    let source_secs = median(references.iter().map(|m| m.secs));
    let source_cpu = median(references.iter().map(|m| m.cpu));
    let sink_cpu_source = median(references.iter().map(|m| m.sink_cpu));
    let drain_secs = median(drains.iter().map(|m| m.secs));
    let drain_cpu = median(drains.iter().map(|m| m.cpu));
    let sink_cpu_drain = median(drains.iter().map(|m| m.sink_cpu));
    let held_accept_secs = median(drains.iter().map(|m| m.accept_secs));
    let drain_rate = (n - 1) as f64 / drain_secs.max(1e-9);

    let source_rate = n as f64 / source_secs;
    let site_rate = n as f64 / site_secs;
    println!();
    println!(
        "site mailer send benchmark: {n} messages of {MESSAGE_BYTES} bytes, {SESSIONS} sessions \
         (site mailer: {SESSIONS} clients, {send_concurrency} SMTP connections), {} cores",
        std::thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(0)
    );
    println!(
        "reference: /usr/sbin/smtp-source {} (into smtp-sink)",
        source_args.join(" ")
    );
    println!(
        "smtp-source ran {} times and the filled outbox was delivered {rounds} times, \
         alternately; medians:",
        references.len()
    );
    println!("{:<58} {:>8} {:>9}", "target", "seconds", "msg/s");
    println!(
        "{:<58} {:>8.2} {:>9.0}",
        "smtp-source -> smtp-sink", source_secs, source_rate
    );
    println!(
        "{:<58} {:>8.2} {:>9.0}",
        "site mailer: POST /v1/messages (all 202, durable)",
        accept_secs,
        n as f64 / accept_secs
    );
    println!(
        "{:<58} {:>8.2} {:>9.0}",
        "site mailer: accepted and delivered -> smtp-sink", site_secs, site_rate
    );
    println!(
        "{:<58} {:>8.2} {:>9.0}",
        "site mailer: POST /v1/messages while sending is held",
        held_accept_secs,
        n as f64 / held_accept_secs
    );
    println!(
        "{:<58} {:>8.2} {:>9.0}",
        "site mailer: delivery from a filled outbox -> smtp-sink", drain_secs, drain_rate
    );
    println!(
        "CPU per message (user + system): smtp-source {:.1} us, site mailer delivering the filled outbox {:.1} us ({:.1}x)",
        source_cpu * 1e6 / n as f64,
        drain_cpu * 1e6 / n as f64,
        drain_cpu / source_cpu.max(1e-9)
    );
    println!(
        "CPU per message of smtp-sink (the shared receiver): {:.1} us from smtp-source, {:.1} us from the site mailer",
        sink_cpu_source * 1e6 / n as f64,
        sink_cpu_drain * 1e6 / n as f64
    );
    println!(
        "ratio (site mailer / smtp-source): accepted and delivered {:.2}, delivery from a filled outbox {:.2}  (goal >= 0.7)",
        site_rate / source_rate,
        drain_rate / source_rate
    );
    // The line scripts/bench collects into its summary table.
    println!(
        "BENCH-SUMMARY\tsite mailer send, {n} x 5 KB, {SESSIONS} sessions (goal >= 0.7)\t{site_rate:.0} msg/s accepted and delivered ({:.0} msg/s accepting)\tsmtp-source -> smtp-sink {source_rate:.0} msg/s\t{:.2}",
        n as f64 / accept_secs,
        site_rate / source_rate
    );
    println!(
        "BENCH-SUMMARY\tsite mailer send from a filled outbox, {n} x 5 KB, {send_concurrency} SMTP connections (goal >= 0.7)\t{drain_rate:.0} msg/s\tsmtp-source -> smtp-sink {source_rate:.0} msg/s\t{:.2}",
        drain_rate / source_rate
    );
}
