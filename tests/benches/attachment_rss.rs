//! Peak memory of the real `site-mailer` binary (release build) for one 25 MB attachment,
//! end to end: the Management Service (in this process) with a tenant whose settings point at
//! the real SMTP peer (nodemailer `smtp-server`, STARTTLS, PLAIN), and a site mailer process
//! per case. Each case: a small warm-up message (pools, TLS, code paths), the idle RSS, then
//! one 25,000,000-byte pseudo-random scan posted to `POST /v1/messages`, waited for until the
//! message is `sent`, its attachment found at the SMTP peer and checked byte for byte
//! (SHA-256), and its outbox files removed. Peak = the process's `VmHWM` (/proc/PID/status);
//! `VmRSS` is also sampled every 5 ms by a thread during the upload and delivery.
//!
//! Cases: (1) multipart/form-data with the scan as a file part (as
//! `multipart_25_mb_scan_arrives_intact_within_memory_bound` in tests/api/site_mailer.rs),
//! (2) a JSON body with the scan base64-encoded in `attachments[0].content_base64`
//! (33.3 MB of body; the local API takes up to 35 MiB).
//!
//! References, same run, same files: the peak RSS (`ru_maxrss` of the child, through GNU
//! `/usr/bin/time -f %M`) of this bench binary re-executed to do nothing, and to hold the scan
//! (or the JSON body) once in memory (`std::fs::read`): the difference is what holding one
//! copy costs, so "peak - idle" divided by it is the number of copies the site mailer holds at
//! its peak. Also `cat scan >/dev/null` and `cp scan copy` (streaming: what a copy needs
//! without holding the file).
//!
//!   cargo bench -p postwire-tests --bench attachment_rss
//!
//! Needs node with `npm ci` in tests/peers (the SMTP peer) and /usr/bin/time (Debian package
//! `time`). No PostgreSQL or Redis (the Management Service runs on embedded SQLite).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use postwire_tests::peers::{SmtpPeer, SmtpPeerOptions};
use postwire_tests::site_mailer_process::SiteMailerProcess;
use postwire_tests::{Backend, Setup, TestApp};
use serde_json::{Value, json};

/// The scan: 25 MB, as the issue counts it.
const SIZE: usize = 25 * 1000 * 1000;
const API_KEY: &str = "bench-local-api-key-0123456789";
const USER: &str = "scanner@acme.example";
const PASSWORD: &str = "Sup3r-Secret-PW";
const BOUNDARY: &str = "postwire-bench-boundary-7MA4YWxkTrZu0gW";
const FILENAME: &str = "big-scan.pdf";
/// Set when this binary is re-executed as the "hold a file once" reference: the path of the
/// file to read into memory, or empty to do nothing (the idle reference).
const HOLD_ENV: &str = "POSTWIRE_BENCH_RSS_HOLD";

fn main() {
    if let Some(path) = std::env::var_os(HOLD_ENV) {
        if !path.is_empty() {
            let bytes = std::fs::read(&path).expect("read the file to hold");
            // every page was written by read(2); keep the buffer observable until exit
            std::hint::black_box(&bytes);
            assert!(bytes.len() >= SIZE);
        }
        return;
    }
    postwire_tests::run_bench(run());
}

const MB: f64 = 1e6;

fn kib_to_mb(kib: u64) -> f64 {
    (kib * 1024) as f64 / MB
}

fn sha256_hex(bytes: &[u8]) -> String {
    mail_core::crypto::sha256(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `VmRSS` of `pid` in KiB, `None` once the process is gone.
fn vm_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Samples `VmRSS` of `pid` every 5 ms until stopped, in two phases (until the 202 arrived,
/// then until the end): (max KiB of each phase, samples).
struct RssSampler {
    stop: Arc<AtomicBool>,
    second_phase: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<([u64; 2], u64)>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let second_phase = Arc::new(AtomicBool::new(false));
        let (flag, phase) = (Arc::clone(&stop), Arc::clone(&second_phase));
        let thread = std::thread::spawn(move || {
            let (mut max, mut n) = ([0, 0], 0);
            while !flag.load(Ordering::Relaxed) {
                let i = usize::from(phase.load(Ordering::Relaxed));
                if let Some(kib) = vm_rss_kib(pid) {
                    max[i] = max[i].max(kib);
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (max, n)
        });
        RssSampler {
            stop,
            second_phase,
            thread,
        }
    }

    fn next_phase(&self) {
        self.second_phase.store(true, Ordering::Relaxed);
    }

    fn finish(self) -> ([u64; 2], u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Peak RSS (KiB) of `cmd` as GNU time reports it (`%M`: `ru_maxrss` from wait4).
fn max_rss_kib(program: &Path, args: &[&Path], env: Option<(&str, &Path)>, dir: &Path) -> u64 {
    let out = dir.join("time.out");
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-f").arg("%M").arg("-o").arg(&out).arg(program);
    cmd.args(args);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .expect("run /usr/bin/time (Debian package `time`)");
    assert!(status.success(), "{} {args:?} failed", program.display());
    let text = std::fs::read_to_string(&out).unwrap();
    text.trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("/usr/bin/time printed {text:?}"))
}

/// The median of three runs of [`max_rss_kib`].
fn median_rss_kib(program: &Path, args: &[&Path], env: Option<(&str, &Path)>, dir: &Path) -> u64 {
    let mut v: Vec<u64> = (0..3)
        .map(|_| max_rss_kib(program, args, env, dir))
        .collect();
    v.sort_unstable();
    v[1]
}

/// The decoded bytes of the base64 part whose Content-Disposition names `filename`.
fn attachment_bytes(raw: &str, filename: &str) -> Vec<u8> {
    let at = raw
        .find(&format!("filename=\"{filename}\""))
        .unwrap_or_else(|| panic!("no attachment {filename} in the delivered message"));
    let part = &raw[at..];
    let body_start = part.find("\r\n\r\n").unwrap() + 4;
    let body = &part[body_start..];
    let body = &body[..body.find("\r\n--").unwrap()];
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// The top-level `Subject` header.
fn subject(raw: &str) -> Option<String> {
    let head = raw.split("\r\n\r\n").next().unwrap();
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case("subject")
            .then(|| v.trim().to_owned())
    })
}

fn multipart_body(message: &Value, scan: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(scan.len() + 1024);
    out.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"message\"\r\n\
             Content-Type: application/json\r\n\r\n{message}\r\n\
             --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; \
             filename=\"{FILENAME}\"\r\nContent-Type: application/pdf\r\n\r\n"
        )
        .as_bytes(),
    );
    out.extend_from_slice(scan);
    out.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    out
}

struct World {
    mgmt: TestApp,
    smtp: SmtpPeer,
    site_id: String,
    secret: String,
}

struct CaseResult {
    name: &'static str,
    body_bytes: usize,
    idle_rss: u64,
    idle_hwm: u64,
    peak_hwm: u64,
    /// Max sampled `VmRSS` until the 202 arrived, and after.
    sampled_max: [u64; 2],
    samples: u64,
    end_rss: u64,
    accept_secs: f64,
    sent_secs: f64,
}

impl CaseResult {
    fn increase_kib(&self) -> u64 {
        self.peak_hwm.saturating_sub(self.idle_rss)
    }
}

async fn status_of(client: &reqwest::Client, address: &str, id: &str) -> Value {
    let r = client
        .get(format!("{address}/v1/messages/{id}"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn wait_sent(client: &reqwest::Client, address: &str, id: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let m = status_of(client, address, id).await;
        if m["status"] == "sent" {
            return;
        }
        assert_ne!(m["status"], "failed", "{m}");
        assert!(Instant::now() < deadline, "not sent in {timeout:?}: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One site mailer process: warm-up, idle RSS, the upload `body` (`content_type`), delivery
/// checked at the SMTP peer, peak RSS.
async fn case(
    world: &World,
    name: &'static str,
    subject_line: &str,
    content_type: &str,
    body: Vec<u8>,
    want_sha256: &str,
) -> CaseResult {
    let data_dir = std::env::temp_dir().join(format!("site-mailer-rss-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&data_dir).unwrap();
    let mut env = BTreeMap::new();
    for (k, v) in [
        ("POSTWIRE_MANAGEMENT_URL", world.mgmt.address.as_str()),
        ("POSTWIRE_SITE_ID", world.site_id.as_str()),
        ("POSTWIRE_SITE_SECRET", world.secret.as_str()),
        ("POSTWIRE_API_KEY", API_KEY),
        ("POSTWIRE_HELLO_NAME", "bench.postwire.test"),
    ] {
        env.insert(k.to_owned(), v.to_owned());
    }
    env.insert(
        "POSTWIRE_DATA_DIR".into(),
        data_dir.to_string_lossy().into_owned(),
    );
    env.insert(
        "POSTWIRE_EXTRA_CA_FILE".into(),
        world.smtp.cert_pem_path().to_string_lossy().into_owned(),
    );
    let sm = SiteMailerProcess::start(&env, &data_dir.join("site-mailer.log")).await;
    let client = reqwest::Client::new();
    world.smtp.clear().await;

    // warm-up, then the idle baseline
    let r = client
        .post(format!("{}/v1/messages", sm.address))
        .bearer_auth(API_KEY)
        .json(
            &json!({"kind": "test", "to": ["alice@example.com"], "subject": "warm-up",
            "text": "Hello.\n"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    wait_sent(
        &client,
        &sm.address,
        v["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle_rss, idle_hwm) = sm.memory_kib();

    let sampler = RssSampler::start(sm.pid());
    let body_bytes = body.len();
    let t0 = Instant::now();
    let r = client
        .post(format!("{}/v1/messages", sm.address))
        .bearer_auth(API_KEY)
        .header("Content-Type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    sampler.next_phase();
    assert_eq!(status, 202, "{text}");
    let accept_secs = t0.elapsed().as_secs_f64();
    let id = serde_json::from_str::<Value>(&text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_sent(&client, &sm.address, &id, Duration::from_secs(300)).await;
    let sent_secs = t0.elapsed().as_secs_f64();

    // delivered intact
    let got = world.smtp.messages().await;
    let m = got
        .iter()
        .find(|m| subject(&m.data).as_deref() == Some(subject_line))
        .unwrap_or_else(|| panic!("{subject_line:?} not at the SMTP peer"));
    let bytes = attachment_bytes(&m.data, FILENAME);
    assert_eq!(bytes.len(), SIZE, "attachment length at the SMTP peer");
    assert_eq!(sha256_hex(&bytes), want_sha256, "attachment intact");
    drop(got);

    // the outbox files are removed after the outcome is recorded: the whole job is done
    let outbox = data_dir.join("outbox").join(&id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox.exists() {
        assert!(
            Instant::now() < deadline,
            "{} still there",
            outbox.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (end_rss, peak_hwm) = sm.memory_kib();
    let (sampled_max, samples) = sampler.finish();
    drop(sm);
    let _ = std::fs::remove_dir_all(&data_dir);
    CaseResult {
        name,
        body_bytes,
        idle_rss,
        idle_hwm,
        peak_hwm,
        sampled_max,
        samples,
        end_rss,
        accept_secs,
        sent_secs,
    }
}

async fn run() {
    let work = std::env::temp_dir().join(format!("postwire-rss-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&work).unwrap();

    // the scan: pseudo-random bytes (incompressible, every byte value), as the API test
    let mut scan = vec![0u8; SIZE];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in scan.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    let want = sha256_hex(&scan);
    let scan_path = work.join(FILENAME);
    std::fs::write(&scan_path, &scan).unwrap();

    let multipart_subject = "25 MB scan, multipart";
    let json_subject = "25 MB scan, base64 JSON";
    let multipart = multipart_body(
        &json!({"kind": "scan_to_email", "to": ["alice@example.com"],
            "subject": multipart_subject, "text": "Big scan attached.\n"}),
        &scan,
    );
    let json_body = serde_json::to_vec(&json!({"kind": "scan_to_email",
        "to": ["alice@example.com"], "subject": json_subject, "text": "Big scan attached.\n",
        "attachments": [{"filename": FILENAME, "content_type": "application/pdf",
            "content_base64": base64::engine::general_purpose::STANDARD.encode(&scan)}]}))
    .unwrap();
    drop(scan);
    let json_path = work.join("message.json");
    std::fs::write(&json_path, &json_body).unwrap();

    // references: this binary idle / holding a file once; cat; cp
    let me = std::env::current_exe().unwrap();
    let idle_ref = median_rss_kib(&me, &[], Some((HOLD_ENV, Path::new(""))), &work);
    let hold_scan = median_rss_kib(&me, &[], Some((HOLD_ENV, &scan_path)), &work);
    let hold_json = median_rss_kib(&me, &[], Some((HOLD_ENV, &json_path)), &work);
    let cat = median_rss_kib(Path::new("cat"), &[&scan_path], None, &work);
    let copy: PathBuf = work.join("copy.pdf");
    let cp = median_rss_kib(Path::new("cp"), &[&scan_path, &copy], None, &work);

    // the Management Service, the SMTP peer, a tenant and a site
    let smtp = SmtpPeer::start(SmtpPeerOptions::default().with_user(USER, PASSWORD)).await;
    let setup = Setup::new(Backend::Sqlite).await;
    let mgmt = setup.spawn().await;
    mgmt.create_tenant("acme").await;
    let t = mgmt.admin_token("acme");
    let r = mgmt
        .put(
            "/api/v1/tenants/acme/email-settings",
            &t,
            &json!({
                "provider": "custom",
                "server": {"host": "localhost", "port": smtp.port(), "encryption": "starttls"},
                "auth": {"method": "password", "username": USER, "password": PASSWORD},
                "senders": [{"address": USER, "default": true}]
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let site = mgmt
        .post("/api/v1/tenants/acme/sites", &t, &json!({"name": "bench"}))
        .await;
    assert_eq!(site.status, 201, "{}", site.text);
    let site = site.json();
    let world = World {
        site_id: site["site_id"].as_str().unwrap().to_owned(),
        secret: site["secret"].as_str().unwrap().to_owned(),
        mgmt,
        smtp,
    };

    let cases = [
        case(
            &world,
            "multipart/form-data, scan as a file part",
            multipart_subject,
            &format!("multipart/form-data; boundary={BOUNDARY}"),
            multipart,
            &want,
        )
        .await,
        case(
            &world,
            "JSON, scan as base64 in attachments[0]",
            json_subject,
            "application/json",
            json_body,
            &want,
        )
        .await,
    ];
    drop(world);
    let _ = std::fs::remove_dir_all(&setup.data_dir);
    let _ = std::fs::remove_dir_all(&work);

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!();
    println!(
        "attachment RSS benchmark: one {SIZE}-byte pseudo-random scan (SHA-256 {}...), release \
         site-mailer process, SMTP peer with STARTTLS + PLAIN; {} cores, load average {}",
        &want[..16],
        std::thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(0),
        load.join(" ")
    );
    println!("MB = 10^6 bytes; RSS from /proc/PID/status (KiB x 1024)");
    println!();
    println!(
        "{:<42} {:>9} {:>9} {:>10} {:>9} {:>8} {:>12} {:>9} {:>7} {:>7}",
        "site mailer case",
        "body MB",
        "idle RSS",
        "peak HWM",
        "peak-idle",
        "x scan",
        "max sampled",
        "end RSS",
        "202 s",
        "sent s"
    );
    for c in &cases {
        println!(
            "{:<42} {:>9.1} {:>9.1} {:>10.1} {:>9.1} {:>8.2} {:>12.1} {:>9.1} {:>7.2} {:>7.2}",
            c.name,
            c.body_bytes as f64 / MB,
            kib_to_mb(c.idle_rss),
            kib_to_mb(c.peak_hwm),
            kib_to_mb(c.increase_kib()),
            (c.increase_kib() * 1024) as f64 / SIZE as f64,
            kib_to_mb(c.sampled_max[0].max(c.sampled_max[1])),
            kib_to_mb(c.end_rss),
            c.accept_secs,
            c.sent_secs
        );
    }
    for c in &cases {
        println!(
            "  {}: VmHWM before the upload {:.1} MB (start-up and warm-up); {} VmRSS samples, \
             max {:.1} MB until the 202 arrived, {:.1} MB after it (delivery)",
            c.name,
            kib_to_mb(c.idle_hwm),
            c.samples,
            kib_to_mb(c.sampled_max[0]),
            kib_to_mb(c.sampled_max[1])
        );
    }
    println!(
        "  (VmHWM and VmRSS come from the kernel's per-CPU batched RSS counters, VmHWM updated \
         when memory is unmapped: a 5 ms sample may exceed VmHWM by a few hundred KB)"
    );
    println!();
    println!("references (peak RSS = ru_maxrss via /usr/bin/time -f %M, median of 3):");
    let hold_scan_inc = hold_scan.saturating_sub(idle_ref);
    let hold_json_inc = hold_json.saturating_sub(idle_ref);
    println!(
        "  {:<58} {:>7.1} MB",
        "this bench binary, re-executed to do nothing",
        kib_to_mb(idle_ref)
    );
    println!(
        "  {:<58} {:>7.1} MB (+{:.1} MB)",
        "same, holding the 25 MB scan once (std::fs::read)",
        kib_to_mb(hold_scan),
        kib_to_mb(hold_scan_inc)
    );
    println!(
        "  {:<58} {:>7.1} MB (+{:.1} MB)",
        format!(
            "same, holding the {:.1} MB JSON body once",
            cases[1].body_bytes as f64 / MB
        ),
        kib_to_mb(hold_json),
        kib_to_mb(hold_json_inc)
    );
    println!(
        "  {:<58} {:>7.1} MB",
        "cat scan > /dev/null",
        kib_to_mb(cat)
    );
    println!("  {:<58} {:>7.1} MB", "cp scan copy", kib_to_mb(cp));
    println!();
    for (c, reference, what) in [
        (&cases[0], hold_scan_inc, "the scan"),
        (&cases[1], hold_json_inc, "the JSON body"),
    ] {
        println!(
            "{}: +{:.1} MB at the peak = {:.2} x holding {what} once",
            c.name,
            kib_to_mb(c.increase_kib()),
            c.increase_kib() as f64 / reference as f64
        );
    }

    // The lines scripts/bench collects into its summary table.
    let json_what = format!("the {:.1} MB JSON body", cases[1].body_bytes as f64 / MB);
    for (c, label, reference, what) in [
        (
            &cases[0],
            "multipart upload",
            hold_scan_inc,
            "the 25 MB scan",
        ),
        (
            &cases[1],
            "base64 JSON upload",
            hold_json_inc,
            json_what.as_str(),
        ),
    ] {
        println!(
            "BENCH-SUMMARY\t25 MB attachment peak RSS, {label} (site-mailer process, delivered \
             and checked at the SMTP peer)\tpeak {:.1} MB, +{:.1} MB over idle {:.1} MB \
             ({:.2}x the scan)\tholding {what} once: +{:.1} MB; `cat` of the scan: {:.1} MB \
             peak\t{:.2}",
            kib_to_mb(c.peak_hwm),
            kib_to_mb(c.increase_kib()),
            kib_to_mb(c.idle_rss),
            (c.increase_kib() * 1024) as f64 / SIZE as f64,
            kib_to_mb(reference),
            kib_to_mb(cat),
            c.increase_kib() as f64 / reference as f64
        );
    }
}
