#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failed expectation is a failed test
//! Test harness: the Management Service built by the same `Application` builder as `main`,
//! on port 0, with a fresh database per test: a SQLite file in a temp directory, or a new
//! PostgreSQL database on the server at `POSTWIRE_TEST_DATABASE_URL` (default: the machine's
//! at 127.0.0.1:5432).

pub mod inspect;
pub mod peers;
pub mod site_mailer_process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use management::auth::Role;
use management::clock::{Clock, SystemClock};
use management::config::Config;
use management::startup::{AppState, Application};
use sea_orm::{ConnectionTrait, Database};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an async test body once per backend: `dual_test!(name);` next to
/// `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! dual_test {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::Backend::Postgres).await
            }
        }
    };
}

pub fn admin_db_url() -> String {
    std::env::var("POSTWIRE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Everything a test needs to re-create the same server (same database and keys).
#[derive(Clone, Debug)]
pub struct Setup {
    pub backend: Backend,
    pub env: BTreeMap<String, String>,
    pub data_dir: PathBuf,
}

impl Setup {
    /// A fresh database (and data dir) for one test.
    pub async fn new(backend: Backend) -> Self {
        let data_dir = std::env::temp_dir().join(format!("postwire-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&data_dir).expect("temp dir");
        let mut env = BTreeMap::new();
        env.insert("POSTWIRE_LISTEN".into(), "127.0.0.1:0".into());
        env.insert(
            "POSTWIRE_DATA_DIR".into(),
            data_dir.to_string_lossy().into_owned(),
        );
        env.insert("POSTWIRE_PUBLIC_URL".into(), "https://postwire.test".into());
        if backend == Backend::Postgres {
            let admin = admin_db_url();
            let name = format!("pw_test_{}", uuid::Uuid::new_v4().simple());
            let conn = Database::connect(&admin)
                .await
                .expect("connect to PostgreSQL");
            conn.execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                .await
                .expect("create test database");
            let mut url = url::Url::parse(&admin).expect("POSTWIRE_TEST_DATABASE_URL");
            url.set_path(&format!("/{name}"));
            env.insert("DATABASE_URL".into(), url.to_string());
            env.insert(
                "POSTWIRE_MASTER_KEY".into(),
                mail_core::crypto::generate_key_b64(),
            );
            env.insert(
                "POSTWIRE_CACHE_KEY".into(),
                mail_core::crypto::generate_key_b64(),
            );
            env.insert(
                "POSTWIRE_JWT_SECRET".into(),
                mail_core::crypto::generate_key_b64(),
            );
        }
        Setup {
            backend,
            env,
            data_dir,
        }
    }

    /// The instance JWT secret the app signs with (configured, or generated in the data dir).
    pub fn jwt_secret(&self) -> Vec<u8> {
        use base64::Engine as _;
        let b64 = match self.env.get("POSTWIRE_JWT_SECRET") {
            Some(s) => s.clone(),
            None => std::fs::read_to_string(self.data_dir.join("jwt.secret")).expect("jwt.secret"),
        };
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .expect("base64")
    }

    pub fn config(&self) -> Config {
        Config::from_sources(None, &self.env).expect("test configuration")
    }

    pub async fn spawn(&self) -> TestApp {
        self.try_spawn(Arc::new(SystemClock))
            .await
            .expect("start the app")
    }

    pub async fn try_spawn(&self, clock: Arc<dyn Clock>) -> anyhow::Result<TestApp> {
        self.spawn_with_config(self.config(), clock).await
    }

    /// Starts the app from `config` (this setup's, edited by the test, e.g. with a resolver).
    pub async fn spawn_with_config(
        &self,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<TestApp> {
        let app = Application::build_with_clock(config, clock).await?;
        let port = app.port();
        let state = app.state();
        let handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        Ok(TestApp {
            address: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            state,
            setup: self.clone(),
            server: Some(handle),
        })
    }
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub state: actix_web::web::Data<AppState>,
    pub setup: Setup,
    server: Option<actix_web::dev::ServerHandle>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Stop the workers (they run on their own threads), so a test that restarts the
        // service does not leave the old one serving.
        if let Some(h) = self.server.take() {
            let stop = h.stop(false);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(stop);
            }
        }
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    /// The `field`s of a 422 problem.
    pub fn fields(&self) -> Vec<String> {
        assert_eq!(
            self.status, 422,
            "expected 422, got {}: {}",
            self.status, self.text
        );
        self.json()["errors"]
            .as_array()
            .expect("errors[]")
            .iter()
            .map(|e| e["field"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Setup::new(backend).await.spawn().await
    }

    pub fn token(&self, role: Role, tenant: Option<&str>, site: Option<&str>) -> String {
        let now = chrono::Utc::now().timestamp();
        self.state
            .jwt
            .issue(role, tenant, site, "test", now, 3600)
            .expect("issue token")
    }
    pub fn cluster_token(&self) -> String {
        self.token(Role::ClusterAdmin, None, None)
    }
    pub fn admin_token(&self, tenant: &str) -> String {
        self.token(Role::TenantAdmin, Some(tenant), None)
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self
            .client
            .request(method, format!("{}{}", self.address, path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        Resp {
            status,
            headers,
            text,
        }
    }
    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.request("GET", path, Some(token), None).await
    }
    pub async fn put(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.request("PUT", path, Some(token), Some(body)).await
    }
    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.request("POST", path, Some(token), Some(body)).await
    }
    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.request("DELETE", path, Some(token), None).await
    }

    /// Provisions a tenant as cluster admin.
    pub async fn create_tenant(&self, id: &str) {
        let r = self
            .put(
                &format!("/api/v1/tenants/{id}"),
                &self.cluster_token(),
                &serde_json::json!({"name": format!("Tenant {id}"), "admin_emails": [format!("admin@{id}.example")]}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }

    /// Raw SQL access to the app's database.
    pub async fn query_one(&self, sql: &str) -> Option<sea_orm::QueryResult> {
        let db = &self.state.store.db;
        db.query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            sql,
        ))
        .await
        .expect("query")
    }
}

/// Microsoft 365 with a password: the settings of the README's worked example.
pub fn m365_password_settings() -> Value {
    serde_json::json!({
        "provider": "microsoft365",
        "server": {"host": "smtp.office365.com", "port": 587, "encryption": "starttls"},
        "auth": {"method": "password", "username": "scanner@acme.example", "password": "Sup3r-Secret-PW"},
        "senders": [
            {"address": "scanner@acme.example", "name": "Acme Scanner", "default": true},
            {"address": "reports@acme.example"}
        ],
        "receivers": [{"address": "it@acme.example", "purpose": "report"}, {"address": "boss@acme.example"}],
        "feature_senders": {"scan_to_email": "scanner@acme.example", "report": "reports@acme.example"}
    })
}

/// A private Redis on a unix socket in a temp directory, for tests that stop it. Never the
/// machine's shared one. Dropping it kills the server.
pub struct PrivateRedis {
    dir: PathBuf,
    child: Option<tokio::process::Child>,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let bin =
            std::env::var("POSTWIRE_REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        let dir = std::env::temp_dir().join(format!("pw-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let sock = dir.join("redis.sock");
        let child = tokio::process::Command::new(&bin)
            .args(["--port", "0", "--unixsocket"])
            .arg(&sock)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let r = PrivateRedis {
            dir,
            child: Some(child),
        };
        for _ in 0..200 {
            if r.ping().await {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the private Redis did not start");
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.dir.join("redis.sock").display())
    }

    async fn conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url()).ok()?;
        client.get_multiplexed_async_connection().await.ok()
    }

    pub async fn ping(&self) -> bool {
        match self.conn().await {
            Some(mut c) => redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok(),
            None => false,
        }
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut c = self.conn().await?;
        redis::cmd("GET")
            .arg(key)
            .query_async::<Option<Vec<u8>>>(&mut c)
            .await
            .ok()?
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `main` of a benchmark (`harness = false`): aws-lc-rs as the TLS crypto provider, then
/// `run` on a multi-threaded Tokio runtime.
pub fn run_bench<F: std::future::Future<Output = ()>>(run: F) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the benchmark's Tokio runtime")
        .block_on(run);
}
