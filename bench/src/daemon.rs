//! The sidebus daemon under test: a release build started as a child process, with its resident
//! memory and CPU time read from /proc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running daemon.
pub struct Daemon {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Its log file.
    pub log: PathBuf,
}

/// Builds the daemon in release mode (unless a binary is given) and returns its path.
pub fn build(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    eprintln!("building the daemon (cargo build --release --bin sidebus)…");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet", "--bin", "sidebus"])
        .current_dir(root)
        .status()
        .context("run cargo")?;
    if !status.success() {
        bail!("cargo build failed");
    }
    Ok(root.join("target/release/sidebus"))
}

impl Daemon {
    /// Starts the daemon (socket and data dir in `dir`) and waits for its socket.
    pub async fn start(bin: &Path, dir: &Path, redis_url: &str, database_url: &str, namespace: &str, extra: &[&str]) -> Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("bench.sock");
        let log = dir.join("daemon.log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = Command::new(bin)
            .arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--redis-url", redis_url, "--database-url", database_url, "--namespace", namespace])
            .args(["--log-level", "warn", "--max-connections", "2000", "--max-in-flight-per-connection", "8192"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut d = Daemon { child, socket, log };
        let start = Instant::now();
        while tokio::net::UnixStream::connect(&d.socket).await.is_err() {
            if let Some(status) = d.child.try_wait()? {
                bail!("the daemon exited ({status}): {}", std::fs::read_to_string(&d.log).unwrap_or_default());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the daemon did not open its socket in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(d)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        rss(self.pid())
    }

    /// CPU time used so far (user + system), in seconds.
    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(self.pid())
    }

    /// Stops it with SIGTERM and waits.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, in bytes (VmRSS).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU seconds of a process (utime + stime at 100 ticks per second).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}
