//! The real `site-mailer` binary as a child process (for kill -9, memory and benchmark
//! tests): built with cargo on first use (incremental, so normally just a link), started on a
//! free loopback port with the given environment, its log in a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The `site-mailer` binary of this build profile, built on first use.
pub fn binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // target/<profile>/deps/<test binary> → target/<profile>/site-mailer
            let exe = std::env::current_exe().expect("current exe");
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target/<profile>")
                .to_path_buf();
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-q", "-p", "site-mailer", "--bin", "site-mailer"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "cargo build -p site-mailer failed");
            let bin = profile_dir.join("site-mailer");
            assert!(bin.exists(), "{} is missing", bin.display());
            bin
        })
        .clone()
}

/// User + system CPU seconds of process `pid` so far (all its threads), from /proc.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // after the command name in parentheses: state is field 3, utime 14, stime 15
    let fields: Vec<&str> = stat[stat.rfind(')').expect("(comm)") + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // USER_HZ is 100 on Linux
    ticks as f64 / 100.0
}

/// A free loopback port (bound and released: a tiny race, as for any spawned server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A running `site-mailer` process; killed (SIGKILL) when dropped.
pub struct SiteMailerProcess {
    child: Child,
    pub address: String,
}

impl SiteMailerProcess {
    /// Starts the binary with exactly `env` (plus PATH/HOME) on a free port
    /// (`POSTWIRE_LISTEN` is set here), appending its output to `log`, and waits until
    /// `/healthz` answers.
    pub async fn start(env: &BTreeMap<String, String>, log: &Path) -> SiteMailerProcess {
        let bin = binary();
        let port = free_port();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(&bin);
        cmd.env_clear();
        for k in ["PATH", "HOME", "TMPDIR"] {
            if let Ok(v) = std::env::var(k) {
                cmd.env(k, v);
            }
        }
        cmd.envs(env)
            .env("POSTWIRE_LISTEN", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut p = SiteMailerProcess {
            child,
            address: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", p.address)).send().await
                && r.status().is_success()
            {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                panic!("site-mailer exited with {status}:\n{text}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "site-mailer did not answer /healthz; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (kill -9) and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process's `VmRSS` and `VmHWM` (peak) in KiB, from /proc.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/<pid>/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for SiteMailerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
