//! The suite's private services and the Management Service binary as child processes:
//! a private PostgreSQL (initdb/pg_ctl from `POSTWIRE_PG_BIN_DIR`), a private Redis on a TCP
//! port it can stop and start again on the same port, and `management-service` processes
//! that can be killed with SIGKILL and restarted on the same address. Never the machine's
//! shared PostgreSQL or Redis.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use postwire_tests::site_mailer_process::free_port;

/// Builds `bin` of package `package` (incremental: normally just a link) for this profile.
pub fn cargo_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-q", "-p", package, "--bin", bin])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    let path = profile_dir.join(bin);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A private PostgreSQL cluster in a temp directory (as the `postgres` user when root).
pub struct PrivatePg {
    dir: PathBuf,
    bin_dir: PathBuf,
    pub port: u16,
}

impl PrivatePg {
    fn run(&self, bin: &str, args: &[&str]) -> std::process::ExitStatus {
        let exe = self.bin_dir.join(bin);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
    }

    pub fn start() -> PrivatePg {
        let bin_dir =
            PathBuf::from(std::env::var("POSTWIRE_PG_BIN_DIR").expect(
                "POSTWIRE_PG_BIN_DIR (initdb/pg_ctl): source scripts/test-services.sh first",
            ));
        let dir = PathBuf::from(format!(
            "/tmp/pw-fault-pg-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("pg temp dir");
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown postgres {}", dir.display());
        }
        let pg = PrivatePg {
            dir,
            bin_dir,
            port: free_port(),
        };
        let data = pg.dir.join("data");
        let status = pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "--encoding=UTF8",
            ],
        );
        assert!(status.success(), "initdb failed");
        pg.pg_ctl_start();
        pg
    }

    /// Starts it again after [`Self::stop`] (same port and data).
    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    fn pg_ctl_start(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let status = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-l",
                log.to_str().expect("utf-8 path"),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        );
        assert!(
            status.success(),
            "pg_ctl start failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn stop(&self) {
        let data = self.dir.join("data");
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
            ],
        );
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis on a fixed loopback TCP port: stop and start again on the same port.
pub struct FaultRedis {
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl FaultRedis {
    pub async fn start() -> FaultRedis {
        let dir = std::env::temp_dir().join(format!("pw-fault-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        let mut r = FaultRedis {
            dir,
            port: free_port(),
            child: None,
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the server is gone (no persistence: it comes back empty).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on its port and waits for PING.
    pub async fn restart(&mut self) {
        self.stop();
        let bin =
            std::env::var("POSTWIRE_REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("redis url");
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the private Redis did not start on port {}", self.port);
    }
}

impl Drop for FaultRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `management-service` process on a fixed port; SIGKILL and restart on the same port.
pub struct ManagementProcess {
    bin: PathBuf,
    env: BTreeMap<String, String>,
    log: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl ManagementProcess {
    pub async fn start(bin: &Path, env: &BTreeMap<String, String>, log: &Path) -> Self {
        let mut p = ManagementProcess {
            bin: bin.to_path_buf(),
            env: env.clone(),
            log: log.to_path_buf(),
            port: free_port(),
            child: None,
        };
        p.restart().await;
        p
    }

    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on its port and waits until `/healthz` answers.
    pub async fn restart(&mut self) {
        self.kill9();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear();
        for k in ["PATH", "HOME", "TMPDIR"] {
            if let Ok(v) = std::env::var(k) {
                cmd.env(k, v);
            }
        }
        cmd.envs(&self.env)
            .env("POSTWIRE_LISTEN", format!("127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client
                .get(format!("{}/healthz", self.address()))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "management-service exited with {status}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "management-service did not answer /healthz; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ManagementProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP forwarder on a fixed loopback port in front of a peer: `down()` closes the listener
/// and cuts every open connection (clients get "connection refused", like a stopped server),
/// `up()` listens on the same port again.
pub struct TcpGate {
    pub port: u16,
    target: std::net::SocketAddr,
    /// Milliseconds every chunk from the peer back to the client is held (0: none).
    pub response_delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TcpGate {
    pub async fn start(target: std::net::SocketAddr) -> TcpGate {
        let mut g = TcpGate {
            port: free_port(),
            target,
            response_delay_ms: Default::default(),
            task: None,
        };
        g.up().await;
        g
    }

    pub async fn up(&mut self) {
        self.down();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "cannot listen on {} again: {e}",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let target = self.target;
        let delay = self.response_delay_ms.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            // the connections live in this task's JoinSet: aborting it cuts them all
            while let Ok((inbound, _)) = listener.accept().await {
                let delay = delay.clone();
                conns.spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut in_r, mut in_w) = inbound.into_split();
                    let (mut out_r, mut out_w) = outbound.into_split();
                    let up = async {
                        let _ = tokio::io::copy(&mut in_r, &mut out_w).await;
                        let _ = out_w.shutdown().await;
                    };
                    let down = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = out_r.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            let ms = delay.load(std::sync::atomic::Ordering::SeqCst);
                            if ms > 0 {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            if in_w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = in_w.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    pub fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.down();
    }
}
