#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed expectation is a failed test
//! The fault suite (issue #8 item 1): two Management Service processes on a private
//! PostgreSQL with a private Redis, two site mailer processes of one tenant (an OAuth 2.0
//! grant against the real OAuth peer, delivering over XOAUTH2 to the real SMTP peer), and
//! messages accepted while faults are injected one after another. One row per fault:
//! accepted, delivered, duplicates (a Message-ID delivered more than once), lost (never
//! delivered; must be 0) and the time from the end of the fault until every message of its
//! phase was delivered.
//!
//! Knobs: `POSTWIRE_FAULT_MESSAGES` (total over all phases; default 300, the documented run
//! uses 5000), `POSTWIRE_FAULT_SMTP_DOWN_SECS` (fault 4; default 5, the documented run uses
//! 30), `POSTWIRE_FAULT_RECOVERY_SECS` (how long a phase may take to drain, default 180).
//! Needs `POSTWIRE_PG_BIN_DIR` and `POSTWIRE_REDIS_SERVER_BIN` (source scripts/test-services.sh).

mod procs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use postwire_tests::inspect::{header, metric_value};
use postwire_tests::peers::{
    OAuthPeer, OAuthPeerOptions, SmtpPeer, SmtpPeerOptions, peer_http_client,
};
use postwire_tests::site_mailer_process::SiteMailerProcess;
use procs::{FaultRedis, ManagementProcess, PrivatePg, TcpGate, cargo_binary};
use serde_json::{Value, json};

const API_KEY: &str = "fault-suite-local-api-key-0123456789";
const OAUTH_USER: &str = "sender@acme.example";

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {v}"))
        })
        .unwrap_or(default)
}

/// One site mailer process and what it takes to start it again (same data dir).
struct Mailer {
    env: BTreeMap<String, String>,
    log: PathBuf,
    process: Option<SiteMailerProcess>,
}

impl Mailer {
    async fn start(env: BTreeMap<String, String>, log: PathBuf) -> Mailer {
        let process = Some(SiteMailerProcess::start(&env, &log).await);
        Mailer { env, log, process }
    }
    fn address(&self) -> Option<String> {
        self.process.as_ref().map(|p| p.address.clone())
    }
    fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }
    async fn restart(&mut self) {
        self.kill9();
        self.process = Some(SiteMailerProcess::start(&self.env, &self.log).await);
    }
    /// `GET /v1/messages/{id}`.
    async fn message(&self, id: &str) -> Option<Value> {
        let address = self.address()?;
        let r = reqwest::Client::new()
            .get(format!("{address}/v1/messages/{id}"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }
    /// `postwire_site_outbox_messages{state=...}`.
    async fn outbox(&self, state: &str) -> Option<f64> {
        let address = self.address()?;
        let text = reqwest::get(format!("{address}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metric_value(
            &text,
            &format!("postwire_site_outbox_messages{{state=\"{state}\"}}"),
        )
    }
}

/// Everything the scenario runs; dropped at the end (processes killed, temp dirs removed).
struct Scenario {
    pg: PrivatePg,
    redis: FaultRedis,
    oauth: OAuthPeer,
    smtp: SmtpPeer,
    /// The SMTP peer as the site mailers reach it (fault 4 closes it).
    smtp_gate: TcpGate,
    /// The OAuth peer as the Management Service reaches it for tokens (fault 7 closes it).
    oauth_gate: TcpGate,
    jwt: management::auth::Jwt,
    site_ids: Vec<String>,
    mgmt: Vec<ManagementProcess>,
    mailers: Vec<Mailer>,
    dir: PathBuf,
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for m in &mut self.mailers {
            m.kill9();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("fault suite: logs kept in {}", self.dir.display());
        }
    }
}

async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut rb = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.json(b);
    }
    let r = rb.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The tenant admin authorizes OAuth 2.0 through the replica at `base`, like the popup: start,
/// the provider's redirect, the callback page.
async fn authorize(base: &str, admin: &str) {
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{base}/api/v1/tenants/acme/email-settings/oauth/authorize"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let url = v["authorization_url"].as_str().unwrap().to_owned();
    let resp = peer_http_client().get(&url).send().await.unwrap();
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let cb = location.replacen("https://postwire.test", base, 1);
    let page = reqwest::get(&cb).await.unwrap();
    assert_eq!(
        page.status().as_u16(),
        200,
        "{}",
        page.text().await.unwrap()
    );
}

impl Scenario {
    async fn start() -> Scenario {
        let dir = std::env::temp_dir().join(format!("pw-fault-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let pg = PrivatePg::start();
        let redis = FaultRedis::start().await;
        let oauth = OAuthPeer::start_with(OAuthPeerOptions {
            username: Some(OAUTH_USER.into()),
            expires_in: Some(3600),
            audience: None,
        })
        .await;
        let smtp = SmtpPeer::start(SmtpPeerOptions::default().trusting(&oauth)).await;
        let smtp_gate = TcpGate::start(([127, 0, 0, 1], smtp.port()).into()).await;
        let oauth_gate = TcpGate::start(([127, 0, 0, 1], oauth.port()).into()).await;
        let token_url = oauth.token_url().replacen(
            &format!("127.0.0.1:{}", oauth.port()),
            &format!("127.0.0.1:{}", oauth_gate.port),
            1,
        );
        assert_ne!(
            token_url,
            oauth.token_url(),
            "the token URL goes through the gate"
        );

        // the database of both replicas on the private PostgreSQL
        let admin = sea_orm::Database::connect(pg.url("postgres"))
            .await
            .unwrap();
        sea_orm::ConnectionTrait::execute_unprepared(&admin, "CREATE DATABASE postwire")
            .await
            .unwrap();
        drop(admin);

        let jwt_secret = mail_core::crypto::generate_key_b64();
        let mut env = BTreeMap::new();
        env.insert("DATABASE_URL".to_owned(), pg.url("postwire"));
        env.insert("REDIS_URL".to_owned(), redis.url());
        env.insert(
            "POSTWIRE_MASTER_KEY".to_owned(),
            mail_core::crypto::generate_key_b64(),
        );
        env.insert(
            "POSTWIRE_CACHE_KEY".to_owned(),
            mail_core::crypto::generate_key_b64(),
        );
        env.insert("POSTWIRE_JWT_SECRET".to_owned(), jwt_secret.clone());
        env.insert(
            "POSTWIRE_PUBLIC_URL".to_owned(),
            "https://postwire.test".to_owned(),
        );
        let bin = cargo_binary("management", "management-service");
        let mut mgmt = Vec::new();
        for i in 0..2 {
            let mut e = env.clone();
            let data = dir.join(format!("mgmt-{i}"));
            std::fs::create_dir_all(&data).unwrap();
            e.insert(
                "POSTWIRE_DATA_DIR".into(),
                data.to_string_lossy().into_owned(),
            );
            // replica 0 first: it runs the migrations
            mgmt.push(ManagementProcess::start(&bin, &e, &dir.join(format!("mgmt-{i}.log"))).await);
        }

        // tenant, OAuth settings and authorization (like the popup), two sites: through replica 0
        use base64::Engine as _;
        let secret = secrecy::SecretSlice::from(
            base64::engine::general_purpose::STANDARD
                .decode(jwt_secret.trim())
                .unwrap(),
        );
        let jwt = management::auth::Jwt::new(&secret, None).unwrap();
        let now = chrono::Utc::now().timestamp();
        let cluster = jwt
            .issue(
                management::auth::Role::ClusterAdmin,
                None,
                None,
                "fault",
                now,
                7200,
            )
            .unwrap();
        let admin = jwt
            .issue(
                management::auth::Role::TenantAdmin,
                Some("acme"),
                None,
                "fault",
                now,
                7200,
            )
            .unwrap();
        let base = mgmt[0].address();
        let (s, v) = call(
            reqwest::Method::PUT,
            &format!("{base}/api/v1/tenants/acme"),
            Some(&cluster),
            Some(&json!({"name": "Acme", "admin_emails": ["admin@acme.example"]})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        let (s, v) = call(
            reqwest::Method::PUT,
            &format!("{base}/api/v1/tenants/acme/email-settings"),
            Some(&admin),
            Some(&json!({
                "provider": "microsoft365",
                "server": {"host": "localhost", "port": smtp_gate.port, "encryption": "starttls"},
                "auth": {
                    "method": "oauth2",
                    "client_id": "postwire-client",
                    "client_secret": "client-secret-value",
                    "authorization_url": oauth.authorize_url(),
                    "token_url": token_url,
                    "issuer": oauth.issuer(),
                    "scopes": ["openid", "profile", "email", "offline_access"]
                },
                "senders": [{"address": OAUTH_USER, "default": true}],
                "feature_senders": {"report": OAUTH_USER}
            })),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        authorize(&base, &admin).await;

        let mut mailers = Vec::new();
        let mut site_ids = Vec::new();
        for (i, replica) in mgmt.iter().enumerate() {
            let (s, site) = call(
                reqwest::Method::POST,
                &format!("{base}/api/v1/tenants/acme/sites"),
                Some(&admin),
                Some(&json!({"name": format!("Site {i}")})),
            )
            .await;
            assert_eq!(s, 201, "{site}");
            site_ids.push(site["site_id"].as_str().unwrap().to_owned());
            let data = dir.join(format!("site-{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let mut e = BTreeMap::new();
            for (k, v) in [
                // each site mailer talks to its own replica
                ("POSTWIRE_MANAGEMENT_URL", replica.address()),
                (
                    "POSTWIRE_SITE_ID",
                    site["site_id"].as_str().unwrap().to_owned(),
                ),
                (
                    "POSTWIRE_SITE_SECRET",
                    site["secret"].as_str().unwrap().to_owned(),
                ),
                ("POSTWIRE_API_KEY", API_KEY.to_owned()),
                ("POSTWIRE_RETRY_INITIAL", "200ms".to_owned()),
                ("POSTWIRE_RETRY_MAX_DELAY", "1s".to_owned()),
                ("POSTWIRE_CONNECT_TIMEOUT", "2s".to_owned()),
                ("POSTWIRE_SEND_CONCURRENCY", "4".to_owned()),
                ("REDIS_URL", redis.url()),
                ("POSTWIRE_DATA_DIR", data.to_string_lossy().into_owned()),
                (
                    "POSTWIRE_EXTRA_CA_FILE",
                    smtp.cert_pem_path().to_string_lossy().into_owned(),
                ),
            ] {
                e.insert(k.to_owned(), v);
            }
            mailers.push(Mailer::start(e, dir.join(format!("site-{i}.log"))).await);
        }
        Scenario {
            pg,
            redis,
            oauth,
            smtp,
            smtp_gate,
            oauth_gate,
            jwt,
            site_ids,
            mgmt,
            mailers,
            dir,
        }
    }

    /// `GET /api/v1/site/smtp-access-token?min_validity=86400` as site 0 through `replica`:
    /// the cached token is never valid that long, so this makes the replica refresh (rotate)
    /// the grant's tokens at the provider now.
    async fn force_refresh(&self, replica: usize) -> (u16, Value) {
        let now = chrono::Utc::now().timestamp();
        let token = self
            .jwt
            .issue(
                management::auth::Role::Site,
                Some("acme"),
                Some(&self.site_ids[0]),
                "fault",
                now,
                600,
            )
            .unwrap();
        let url = format!(
            "{}/api/v1/site/smtp-access-token?min_validity=86400",
            self.mgmt[replica].address()
        );
        match reqwest::Client::new()
            .get(&url)
            .bearer_auth(token)
            .timeout(Duration::from_secs(30))
            .send()
            .await
        {
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(e) => (0, Value::String(format!("{e:?}"))),
        }
    }

    fn admin_token(&self) -> String {
        let now = chrono::Utc::now().timestamp();
        self.jwt
            .issue(
                management::auth::Role::TenantAdmin,
                Some("acme"),
                None,
                "fault",
                now,
                600,
            )
            .unwrap()
    }

    /// The grant's `oauth` status object (through replica 1).
    async fn grant(&self) -> Value {
        let admin = self.admin_token();
        let (s, v) = call(
            reqwest::Method::GET,
            &format!(
                "{}/api/v1/tenants/acme/email-settings",
                self.mgmt[1].address()
            ),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        v["oauth"].clone()
    }

    /// Posts `subjects` alternately to the running site mailers (8 in parallel); every one must
    /// be accepted (202). Returns (site mailer, message id) of each.
    async fn accept(&self, subjects: Vec<String>) -> Vec<(usize, String)> {
        let targets: Vec<(usize, String)> = self
            .mailers
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i, m.address()?)))
            .collect();
        assert!(!targets.is_empty(), "no site mailer is running");
        let client = reqwest::Client::new();
        let mut set = tokio::task::JoinSet::new();
        let parallel = 8;
        let subjects = std::sync::Arc::new(subjects);
        for w in 0..parallel {
            let (client, targets, subjects) = (client.clone(), targets.clone(), subjects.clone());
            set.spawn(async move {
                let mut ids = Vec::new();
                for i in (w..subjects.len()).step_by(parallel) {
                    let (mailer, address) = &targets[i % targets.len()];
                    let url = format!("{address}/v1/messages");
                    let r = client
                        .post(&url)
                        .bearer_auth(API_KEY)
                        .json(&json!({"kind": "report", "to": ["someone@example.com"],
                                      "subject": subjects[i], "text": "Fault suite.\n"}))
                        .send()
                        .await
                        .expect("post to the site mailer");
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    assert_eq!(status, 202, "{url}: {text}");
                    let v: Value = serde_json::from_str(&text).expect("JSON");
                    ids.push((*mailer, v["id"].as_str().expect("id").to_owned()));
                }
                ids
            });
        }
        set.join_all().await.into_iter().flatten().collect()
    }

    /// Waits until every subject arrived at the SMTP peer and both outboxes are drained (or
    /// the recovery deadline passes); returns the row.
    async fn settle(&self, fault: &str, subjects: &[String], healed: Instant) -> Row {
        let expected: BTreeSet<&str> = subjects.iter().map(String::as_str).collect();
        let deadline = Duration::from_secs(knob("POSTWIRE_FAULT_RECOVERY_SECS", 180));
        let (mut by_message_id, mut seen);
        loop {
            by_message_id = BTreeMap::<String, usize>::new();
            seen = BTreeSet::<String>::new();
            for m in self.smtp.messages().await {
                let subject = header(&m.data, "Subject").unwrap_or_default();
                if expected.contains(subject.as_str()) {
                    *by_message_id
                        .entry(header(&m.data, "Message-ID").unwrap_or_default())
                        .or_default() += 1;
                    seen.insert(subject);
                }
            }
            let mut drained = true;
            for m in &self.mailers {
                let pending = m.outbox("queued").await.unwrap_or(1.0)
                    + m.outbox("sending").await.unwrap_or(1.0);
                drained &= pending == 0.0;
            }
            if (seen.len() == expected.len() && drained) || healed.elapsed() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut failed = 0.0;
        for m in &self.mailers {
            failed += m.outbox("failed").await.unwrap_or(0.0);
        }
        Row {
            fault: fault.to_owned(),
            accepted: expected.len(),
            delivered: seen.len(),
            duplicates: by_message_id.values().filter(|n| **n > 1).count(),
            lost: expected.len() - seen.len(),
            failed,
            recover: healed.elapsed(),
            note: String::new(),
        }
    }
}

struct Row {
    fault: String,
    accepted: usize,
    delivered: usize,
    duplicates: usize,
    lost: usize,
    failed: f64,
    recover: Duration,
    /// What else the fault showed, printed under the table.
    note: String,
}

fn subjects(phase: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("fault {phase} #{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_lose_no_accepted_message() {
    let total = knob("POSTWIRE_FAULT_MESSAGES", 300) as usize;
    let phases = 9;
    let per = (total / phases).max(2);
    let mut s = Scenario::start().await;
    let mut rows = Vec::new();

    // 0. baseline: no fault
    // the remainder goes to the baseline, so the phases add up to the knob exactly
    let subj = subjects("baseline", per + total.saturating_sub(per * phases));
    s.accept(subj.clone()).await;
    rows.push(s.settle("none (baseline)", &subj, Instant::now()).await);

    // 1. the private Redis stopped while messages are accepted, then started again
    s.redis.stop();
    let subj = subjects("redis", per);
    s.accept(subj.clone()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.redis.restart().await;
    rows.push(
        s.settle("1 Redis stopped and restarted", &subj, Instant::now())
            .await,
    );

    // 2. the private PostgreSQL restarted while a refresh token is being rotated: the OAuth
    //    gate holds the provider's answer; the provider has already rotated (the old refresh
    //    token is spent) when PostgreSQL stops, and the answer reaches the replica while
    //    PostgreSQL is down. No grant is lost: afterwards a refresh works (not 409) and the
    //    grant is authorized.
    let rotations_before = s.oauth.token_calls().await.refresh_token;
    let hold = Duration::from_secs(3);
    s.oauth_gate.response_delay_ms.store(
        u64::try_from(hold.as_millis()).unwrap(),
        std::sync::atomic::Ordering::SeqCst,
    );
    let subj = subjects("pg-restart", per);
    let inject = async {
        let rotating = s.force_refresh(0);
        let stop_pg = async {
            let deadline = Instant::now() + Duration::from_secs(10);
            while s.oauth.token_calls().await.refresh_token == rotations_before {
                assert!(Instant::now() < deadline, "the provider saw no refresh");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // rotated at the provider, the answer still held by the gate: it reaches the
            // replica while PostgreSQL is down
            let rotated = Instant::now();
            tokio::task::block_in_place(|| s.pg.stop());
            assert!(
                rotated.elapsed() < hold,
                "PostgreSQL took {:?} to stop: the held answer may have come before",
                rotated.elapsed()
            );
            tokio::time::sleep(hold + Duration::from_secs(1)).await;
            tokio::task::block_in_place(|| s.pg.start_again());
        };
        let (during, ()) = tokio::join!(rotating, stop_pg);
        during
    };
    let (during, _) = tokio::join!(inject, s.accept(subj.clone()));
    let healed = Instant::now();
    s.oauth_gate
        .response_delay_ms
        .store(0, std::sync::atomic::Ordering::SeqCst);
    // the status only: a 200 body holds an access token (never printed)
    let detail = if during.0 == 200 {
        String::new()
    } else {
        during.1.to_string()
    };
    eprintln!(
        "the refresh whose answer came while PostgreSQL was down: {} {detail}",
        during.0
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = s.force_refresh(0).await;
        if status == 200 {
            break;
        }
        assert!(
            status != 409,
            "the grant was lost in the rotation: {status} {v}; grant: {}",
            s.grant().await
        );
        assert!(
            Instant::now() < deadline,
            "no refresh after the PostgreSQL restart: {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        s.grant().await["status"],
        "authorized",
        "the grant survived"
    );
    eprintln!(
        "refresh after the restart works {:.1}s after PostgreSQL is back; {} rotations at the provider",
        healed.elapsed().as_secs_f64(),
        s.oauth.token_calls().await.refresh_token - rotations_before
    );
    rows.push(
        s.settle("2 PostgreSQL restart in rotation", &subj, healed)
            .await,
    );

    // 3. Management replica 0 killed with kill -9 (site mailer 0 talks to it), then restarted
    s.mgmt[0].kill9();
    let subj = subjects("mgmt-kill", per);
    s.accept(subj.clone()).await;
    let (status, _) = call(
        reqwest::Method::GET,
        &format!("{}/healthz", s.mgmt[1].address()),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "the other replica serves on");
    s.mgmt[0].restart().await;
    rows.push(
        s.settle("3 Management replica kill -9", &subj, Instant::now())
            .await,
    );

    // 4. the SMTP peer down (connections refused) for POSTWIRE_FAULT_SMTP_DOWN_SECS
    let down = Duration::from_secs(knob("POSTWIRE_FAULT_SMTP_DOWN_SECS", 5));
    let began = Instant::now();
    s.smtp_gate.down();
    let subj = subjects("smtp-down", per);
    s.accept(subj.clone()).await;
    tokio::time::sleep(down.saturating_sub(began.elapsed())).await;
    s.smtp_gate.up().await;
    rows.push(
        s.settle(
            &format!("4 SMTP peer down {}s", down.as_secs()),
            &subj,
            Instant::now(),
        )
        .await,
    );

    // 5. the SMTP peer answers 421 (and closes) to the next transactions
    let count = u32::try_from(per / 2).unwrap_or(u32::MAX).max(1);
    s.smtp
        .fail_next(421, "4.3.2 Service shutting down (fault suite)", count)
        .await;
    let subj = subjects("smtp-421", per);
    s.accept(subj.clone()).await;
    let start = Instant::now();
    while s.smtp.state().await["fail_rules"]
        .as_array()
        .is_some_and(|r| !r.is_empty())
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the 421 rules were never used up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rows.push(
        s.settle("5 SMTP peer answering 421", &subj, Instant::now())
            .await,
    );

    // 7. the OAuth server down (connections refused) during a refresh: the refresh fails
    //    with 503 (not 409), the grant stays authorized, sending goes on with the cached
    //    token; once it is back a refresh succeeds.
    s.oauth_gate.down();
    let subj = subjects("oauth-down", per);
    let (refresh, _) = tokio::join!(s.force_refresh(0), s.accept(subj.clone()));
    assert_eq!(
        refresh.0,
        503,
        "a refresh with the provider down: {}",
        // a 200 body holds an access token: never shown
        if refresh.0 == 200 {
            Value::Null
        } else {
            refresh.1
        }
    );
    assert_eq!(s.grant().await["status"], "authorized", "not a lost grant");
    s.oauth_gate.up().await;
    let healed = Instant::now();
    let (status, v) = s.force_refresh(1).await;
    assert_eq!(status, 200, "a refresh once the provider is back: {v}");
    rows.push(
        s.settle("7 OAuth server down in refresh", &subj, healed)
            .await,
    );

    // 6. site mailer 0 killed with kill -9 with messages in its outbox, then restarted
    let subj = subjects("site-kill", per);
    let (first, rest) = subj.split_at(per / 2);
    s.accept(first.to_vec()).await;
    s.mailers[0].kill9();
    s.accept(rest.to_vec()).await; // only site mailer 1 is up
    s.mailers[0].restart().await;
    rows.push(
        s.settle("6 site mailer kill -9 + restart", &subj, Instant::now())
            .await,
    );

    // 8. the refresh token revoked at the provider, with the user's sessions: the SMTP peer
    //    refuses every access token issued so far and drops the connections authenticated
    //    with them. The next refresh gets `invalid_grant`
    //    (409) and the grant shows `reauthorization_required`; the messages accepted
    //    meanwhile are refused once by the SMTP peer, then wait with the reason
    //    `reauthorization_required` (queued, not failed, not delivered) until the tenant
    //    admin authorizes again; then they all go out. Recovery counts from the new
    //    authorization.
    let revoked = s.oauth.revoke_all().await;
    assert!(
        revoked >= 1,
        "the provider revoked the grant's refresh token"
    );
    s.smtp
        .revoke_tokens_issued_until(chrono::Utc::now().timestamp())
        .await;
    // ... and drops the sessions authenticated with them (the site mailers' pooled
    // connections): every message from now on must authenticate anew
    s.smtp_gate.up().await;
    let subj = subjects("revoked", per);
    let (refresh, ids) = tokio::join!(s.force_refresh(1), s.accept(subj.clone()));
    assert_eq!(
        refresh.0,
        409,
        "a refresh after the revocation: {}",
        if refresh.0 == 200 {
            Value::Null
        } else {
            refresh.1
        }
    );
    assert_eq!(
        refresh.1["type"], "urn:postwire:problem:reauthorization-required",
        "{}",
        refresh.1
    );
    let grant = s.grant().await;
    assert_eq!(grant["status"], "reauthorization_required", "{grant}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut other = Vec::new();
        for (mailer, id) in &ids {
            let m = s.mailers[*mailer].message(id).await.unwrap_or(Value::Null);
            if m["status"] != "queued" || m["reason"] != "reauthorization_required" {
                other.push(m);
            }
        }
        if other.is_empty() {
            break;
        }
        for m in &other {
            assert!(
                m["status"] == "queued" || m["status"] == "sending",
                "a message of a revoked grant must wait: {m}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} messages not waiting with reason reauthorization_required, e.g. {}",
            other.len(),
            ids.len(),
            other[0]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let waiting = ids.len();
    authorize(&s.mgmt[0].address(), &s.admin_token()).await;
    let healed = Instant::now();
    assert_eq!(s.grant().await["status"], "authorized");
    let mut row = s.settle("8 refresh token revoked", &subj, healed).await;
    row.note = format!("{waiting} waited with reason reauthorization_required until reauthorized");
    rows.push(row);

    println!();
    println!(
        "{:<34} {:>9} {:>9} {:>10} {:>5} {:>7} {:>12}",
        "fault", "accepted", "delivered", "duplicates", "lost", "failed", "recovery"
    );
    for r in &rows {
        println!(
            "{:<34} {:>9} {:>9} {:>10} {:>5} {:>7} {:>11.1}s",
            r.fault,
            r.accepted,
            r.delivered,
            r.duplicates,
            r.lost,
            r.failed,
            r.recover.as_secs_f64()
        );
    }
    for r in rows.iter().filter(|r| !r.note.is_empty()) {
        println!("({}: {})", r.fault, r.note);
    }
    for r in &rows {
        assert_eq!(
            r.lost, 0,
            "{}: {} accepted messages never delivered",
            r.fault, r.lost
        );
        assert_eq!(r.failed, 0.0, "{}: messages failed", r.fault);
    }
    let _ = &s.oauth;
}
