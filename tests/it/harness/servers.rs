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
             for p in $(cat '{d}/pids'); do kill -KILL $p 2>/dev/null; done; \
             [ -f '{d}/cleanup' ] && tac '{d}/cleanup' | sh >/dev/null 2>&1; rm -rf '{d}'",
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

/// Adds a shell command for the watchdog to run when the test process ends (after the
/// servers are killed), however it ends: removing the users a test created, say.
pub fn at_exit(command: &str) {
    let w = watchdog();
    let _guard = w.stdin.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(w.dir.join("cleanup")).expect("open the cleanup list");
    writeln!(f, "{command}").expect("write the cleanup list");
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

pub fn is_root() -> bool {
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
        Self::start_with(port, &[], false)
    }

    /// Starts a replica of the server on `master`.
    pub fn start_replica_of(master: u16) -> RedisServer {
        Self::start_with(free_port(), &["--replicaof", "127.0.0.1", &master.to_string()], false)
    }

    /// Starts one that takes only TLS (on the returned `port`), with `pki`'s server certificate,
    /// the `requirepass` given, and client certificates required when `client_certs`.
    pub fn start_tls(pki: &super::tls::Pki, password: &str, client_certs: bool) -> RedisServer {
        let port = free_port();
        let files = [&pki.server_cert, &pki.server_key, &pki.ca].map(|p| p.display().to_string());
        let auth = if client_certs { "yes" } else { "no" };
        let args = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &files[0],
            "--tls-key-file",
            &files[1],
            "--tls-ca-cert-file",
            &files[2],
            "--tls-auth-clients",
            auth,
            "--requirepass",
            password,
        ];
        let mut server = Self::start_with(port, &args, true);
        server.port = port;
        server
    }

    /// Starts redis-server with `args` after the test defaults; ready when it answers PING on
    /// `port`, or (`by_log`: TLS-only or password-protected servers) when its log says so.
    fn start_with(port: u16, args: &[&str], by_log: bool) -> RedisServer {
        let bin = find_binary("redis-server");
        let dir = run_dir().join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let log = dir.join("redis.log");
        let mut child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}; {INSTALL_HINT}"));
        watch(child.id());
        let logged = || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Ready to accept connections"));
        wait_for("redis-server", Duration::from_secs(10), || if by_log { logged() } else { redis_ping(port) }, &mut child, &log);
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

/// A Redis Sentinel watching one master as `service` (quorum 1, a master down for a second
/// counts as down).
pub struct Sentinel {
    /// Its port.
    pub port: u16,
    child: Child,
}

impl Sentinel {
    /// Starts one for the master on `master`.
    pub fn start(master: u16, service: &str) -> Sentinel {
        let port = free_port();
        let dir = run_dir().join(format!("sentinel-{port}"));
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        let (conf, log) = (dir.join("sentinel.conf"), dir.join("sentinel.log"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {d}\nlogfile {l}\nsentinel monitor {service} 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds {service} 1000\nsentinel failover-timeout {service} 10000\n",
                d = dir.display(),
                l = log.display()
            ),
        )
        .expect("write sentinel.conf");
        let mut child = Command::new(find_binary("redis-server"))
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server --sentinel: {e}; {INSTALL_HINT}"));
        watch(child.id());
        wait_for("redis sentinel", Duration::from_secs(10), || redis_ping(port), &mut child, &log);
        Sentinel { port, child }
    }
}

impl Drop for Sentinel {
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
        Self::start_with(|_| {})
    }

    /// A cluster that takes only TLS connections from the network (`hostssl`, SCRAM with
    /// `password` for the `postgres` user; a plain TCP connection is rejected), with `pki`'s
    /// server certificate.
    pub fn start_tls(pki: &super::tls::Pki, password: &str) -> PgServer {
        Self::start_with(|data| {
            for (from, to) in [(&pki.server_cert, "server.crt"), (&pki.server_key, "server.key")] {
                std::fs::copy(from, data.join(to)).expect("copy a certificate into the data dir");
            }
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 0.0.0.0/0 reject\n",
            )
            .expect("pg_hba.conf");
            let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).expect("postgresql.conf");
            writeln!(conf, "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\npassword_encryption = 'scram-sha-256'")
                .expect("write postgresql.conf");
            std::fs::write(data.join("password"), password).expect("the password file");
        })
    }

    /// Creates a cluster, lets `setup` change its data dir (then owned by the server's user, the
    /// key files private), and starts it. A `password` file left in the data dir becomes the
    /// `postgres` user's password.
    fn start_with(setup: impl FnOnce(&Path)) -> PgServer {
        let initdb = find_binary("initdb");
        let port = free_port();
        let dir = run_dir().join(format!("pg-{port}"));
        std::fs::create_dir_all(&dir).expect("pg dir");
        let chown = |path: &Path| {
            if is_root() {
                let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().map(|s| s.success()).unwrap_or(false);
                assert!(ok, "cannot chown {} to the postgres user (is there a postgres user? {INSTALL_HINT})", path.display());
            }
        };
        chown(&dir);
        let out = as_postgres(&initdb)
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}; {INSTALL_HINT}"));
        assert!(out.status.success(), "initdb failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let data = dir.join("data");
        setup(&data);
        for key in ["server.key"] {
            if data.join(key).exists() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(data.join(key), std::fs::Permissions::from_mode(0o600)).expect("chmod the key");
            }
        }
        chown(&data);
        let password = std::fs::read_to_string(data.join("password")).ok();
        let child = Self::spawn(&dir, port);
        if let Some(password) = password {
            // Over the Unix socket, which trusts local users.
            let sql = format!("ALTER USER postgres PASSWORD '{}'", password.replace('\'', "''"));
            let out = as_postgres(&find_binary("psql"))
                .args(["-h"])
                .arg(&dir)
                .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", &sql])
                .output()
                .unwrap_or_else(|e| panic!("cannot run psql: {e}; {INSTALL_HINT}"));
            assert!(out.status.success(), "setting the password failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
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
