//! Private Redis and PostgreSQL servers for the tests, started from their binaries.
//!
//! One pair is shared by the whole test binary (each test gets its own database and Redis
//! namespace); tests that stop or restart a server start their own with [`RedisServer::start`].
//! Every server is also registered with a watchdog: a shell that waits for EOF on a pipe this
//! process holds open, then kills what is listed. However the test process ends (even SIGKILL),
//! the pipe closes and nothing is left running.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What to install when a server binary is missing.
const INSTALL_HINT: &str = "install them with: apt-get install -y redis-server postgresql";

struct Watchdog {
    stdin: Mutex<ChildStdin>,
    dir: PathBuf,
}

static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();

/// A directory for this test process's servers, removed by the watchdog at exit.
pub fn run_dir() -> &'static Path {
    &watchdog().dir
}

fn watchdog() -> &'static Watchdog {
    WATCHDOG.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sidebus-it-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the test run dir");
        std::fs::write(dir.join("pids"), "").expect("create the pid list");
        let script = format!(
            "cat >/dev/null; for p in $(cat '{d}/pids'); do kill -INT $p 2>/dev/null; done; sleep 1; \
             for p in $(cat '{d}/pids'); do kill -KILL $p 2>/dev/null; done; rm -rf '{d}'",
            d = dir.display()
        );
        let mut child = Command::new("sh").arg("-c").arg(script).stdin(Stdio::piped()).spawn().expect("start the watchdog shell");
        let stdin = child.stdin.take().expect("the watchdog's stdin");
        // The child is never waited for: it outlives this process on purpose.
        std::mem::forget(child);
        Watchdog { stdin: Mutex::new(stdin), dir }
    })
}

/// Registers a process to be killed when the test process ends.
pub fn watch(pid: u32) {
    let w = watchdog();
    let _guard = w.stdin.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = std::fs::OpenOptions::new().append(true).open(w.dir.join("pids")).expect("open the pid list");
    writeln!(f, "{pid}").expect("write the pid list");
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn find_binary(name: &str) -> PathBuf {
    if let Ok(out) = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin").join(name)).filter(|p| p.exists()).collect();
        versions.sort();
        if let Some(p) = versions.pop() {
            return p;
        }
    }
    panic!("`{name}` is not installed: the tests start their own Redis and PostgreSQL; {INSTALL_HINT}");
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// A command run as the `postgres` user when this process is root (PostgreSQL refuses root).
fn as_postgres(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "postgres", "--regid", "postgres", "--init-groups"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn wait_for(what: &str, deadline: Duration, mut ready: impl FnMut() -> bool, child: &mut Child, log: &Path) {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if ready() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} while starting; its log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{what} did not become ready in {deadline:?}; its log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
}

/// A private redis-server.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    child: Child,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> RedisServer {
        Self::start_on(free_port())
    }

    /// Starts one on `port` (to bring a stopped one back at the same address).
    pub fn start_on(port: u16) -> RedisServer {
        let bin = find_binary("redis-server");
        let dir = run_dir().join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let log = dir.join("redis.log");
        let mut child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}; {INSTALL_HINT}"));
        watch(child.id());
        wait_for("redis-server", Duration::from_secs(10), || redis_ping(port), &mut child, &log);
        RedisServer { port, child }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A private PostgreSQL cluster.
pub struct PgServer {
    /// Its port.
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl PgServer {
    /// Creates a cluster in a fresh directory and starts it.
    pub fn start() -> PgServer {
        let initdb = find_binary("initdb");
        let port = free_port();
        let dir = run_dir().join(format!("pg-{port}"));
        std::fs::create_dir_all(&dir).expect("pg dir");
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().map(|s| s.success()).unwrap_or(false);
            assert!(ok, "cannot chown {} to the postgres user (is there a postgres user? {INSTALL_HINT})", dir.display());
        }
        let out = as_postgres(&initdb)
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}; {INSTALL_HINT}"));
        assert!(out.status.success(), "initdb failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let child = Self::spawn(&dir, port);
        PgServer { port, child, dir }
    }

    fn spawn(dir: &Path, port: u16) -> Child {
        let postgres = find_binary("postgres");
        let log = dir.join("postgres.log");
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("pg log");
        if is_root() {
            let _ = Command::new("chown").args(["postgres:postgres"]).arg(&log).status();
        }
        let started = std::fs::read_to_string(&log).map(|l| l.matches("ready to accept connections").count()).unwrap_or(0);
        let mut child = as_postgres(&postgres)
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-k")
            .arg(dir)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=400"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "shared_buffers=64MB"])
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start postgres: {e}; {INSTALL_HINT}"));
        watch(child.id());
        let ready = || std::fs::read_to_string(&log).map(|l| l.matches("ready to accept connections").count() > started).unwrap_or(false);
        wait_for("postgres", Duration::from_secs(30), ready, &mut child, &log);
        child
    }

    /// Stops it (fast shutdown: connections are cut) and waits.
    pub fn stop(&mut self) {
        let _ = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and data.
    pub fn start_again(&mut self) {
        self.child = Self::spawn(&self.dir, self.port);
    }

    /// The URL of one database.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

/// The servers shared by this test binary.
pub struct Shared {
    /// Redis.
    pub redis: RedisServer,
    /// PostgreSQL.
    pub pg: PgServer,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// The shared servers, started on first use.
pub fn shared() -> &'static Shared {
    SHARED.get_or_init(|| {
        let redis = std::thread::spawn(RedisServer::start);
        let pg = PgServer::start();
        Shared { redis: redis.join().expect("start redis"), pg }
    })
}
