//! The test harness: real servers, one isolated environment per test, daemons run as child
//! processes of the real binary, and polling helpers (no fixed sleeps).

pub mod servers;
pub mod tls;
pub mod users;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use sidebus::backend::pg::EventLog;
use sidebus::backend::redis::Streams;
use sidebus_client::{Client, Delivery, Subscription};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next delivery of `sub`, or a panic after `timeout`.
pub async fn next(sub: &mut Subscription, timeout: Duration) -> Delivery {
    match tokio::time::timeout(timeout, sub.next()).await {
        Ok(Some(d)) => d,
        Ok(None) => panic!("the connection closed while waiting for a delivery"),
        Err(_) => panic!("no delivery within {timeout:?}"),
    }
}

/// A group's dead letters (the first 1,000), through the daemon.
pub async fn dead_letters(c: &Client, event_type: &str, group: &str) -> Vec<sidebus_client::DeadLetterEntry> {
    let l = sidebus_client::DlqList { event_type: event_type.into(), group: group.into(), limit: Some(1000), after: None, ids: vec![] };
    c.dlq_list(l).await.expect("dlq_list").entries
}

/// Asserts that no delivery arrives on `sub` within `window`: used only where nothing is the
/// expected outcome and the window covers the time in which it would have come.
pub async fn assert_quiet(sub: &mut Subscription, window: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(window, sub.next()).await {
        panic!("unexpected delivery of {} (attempt {})", d.event.id, d.attempt);
    }
}

static NEXT_NODE: AtomicU32 = AtomicU32::new(1);

/// One test's world: its own database, Redis namespace and directory.
pub struct TestEnv {
    /// Socket and data directories live here.
    pub dir: tempfile::TempDir,
    /// The Redis namespace.
    pub namespace: String,
    /// The Postgres URL (the daemon creates the database).
    pub database_url: String,
    /// The Redis URL.
    pub redis_url: String,
}

impl TestEnv {
    /// A new environment on the shared servers.
    pub fn new() -> TestEnv {
        let shared = servers::shared();
        Self::on(shared.redis.url())
    }

    /// A new environment on the shared Postgres and the given Redis.
    pub fn on(redis_url: String) -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let shared = servers::shared();
        TestEnv {
            dir: tempfile::Builder::new().prefix("sb").tempdir_in(servers::run_dir()).expect("test dir"),
            namespace: format!("t{}", &id[..12]),
            database_url: shared.pg.url(&format!("t_{}", &id[..16])),
            redis_url,
        }
    }

    /// A daemon of this environment with the test defaults.
    pub fn daemon(&self) -> DaemonBuilder<'_> {
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let mut flags = BTreeMap::new();
        for (k, v) in [
            ("socket", self.dir.path().join(format!("d{n}.sock")).display().to_string()),
            ("data-dir", self.dir.path().join(format!("data{n}")).display().to_string()),
            ("redis-url", self.redis_url.clone()),
            ("database-url", self.database_url.clone()),
            ("namespace", self.namespace.clone()),
            ("node", format!("node{n}")),
            ("backoff-initial-ms", "100".into()),
            ("backoff-max-ms", "2000".into()),
            ("ack-timeout-ms", "5000".into()),
            ("shutdown-grace-ms", "3000".into()),
            ("publish-timeout-ms", "15000".into()),
            ("log-level", "sidebus=debug,info".into()),
        ] {
            flags.insert(k.to_owned(), v);
        }
        DaemonBuilder { env: self, n, flags, config: None, vars: vec![] }
    }

    /// A new daemon on the data dir of the first daemon this environment started (which has
    /// stopped): a restart of that daemon.
    pub async fn restart_first(&self) -> Daemon {
        let dir = std::fs::read_dir(self.dir.path())
            .expect("the test dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("data")))
            .min()
            .expect("a data dir");
        self.daemon().flag("data-dir", dir.display()).start().await
    }

    /// The Redis side of this environment, through the daemon's own code.
    pub async fn streams(&self) -> Streams {
        Streams::connect(&self.redis_url, &self.namespace).await.expect("connect to the test redis")
    }

    /// The event log of this environment, through the daemon's own code.
    pub async fn log(&self) -> EventLog {
        EventLog::connect(&self.database_url).await.expect("connect to the test database")
    }

    /// How many entries of a type's stream a group holds unacknowledged (XPENDING).
    pub async fn pending(&self, event_type: &str, group: &str) -> u64 {
        let summary: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(format!("{}:s:{event_type}", self.namespace))
            .arg(group)
            .query_async(&mut self.redis().await)
            .await
            .expect("XPENDING");
        summary.0
    }

    /// A raw Redis connection, to look at what the daemon stored.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str()).expect("redis url").get_multiplexed_async_connection().await.expect("connect to redis")
    }
}

/// Options of a daemon before it starts.
pub struct DaemonBuilder<'a> {
    env: &'a TestEnv,
    n: u32,
    flags: BTreeMap<String, String>,
    config: Option<String>,
    vars: Vec<(String, String)>,
}

impl DaemonBuilder<'_> {
    /// Sets a flag (`--key value`, key with dashes).
    pub fn flag(mut self, key: &str, value: impl ToString) -> Self {
        self.flags.insert(key.to_owned(), value.to_string());
        self
    }

    /// Sets an environment variable of the daemon's process.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.vars.push((key.to_owned(), value.to_string()));
        self
    }

    /// Uses this text as the config file.
    pub fn config_file(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    /// Starts the daemon without waiting for it.
    pub fn spawn(self) -> Daemon {
        let socket = PathBuf::from(&self.flags["socket"]);
        let log = self.env.dir.path().join(format!("daemon{}.log", self.n));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sidebus"));
        cmd.arg("run");
        if let Some(toml) = &self.config {
            let path = self.env.dir.path().join(format!("config{}.toml", self.n));
            std::fs::write(&path, toml).expect("write the config file");
            cmd.arg("--config").arg(path);
        }
        for (k, v) in &self.flags {
            cmd.arg(format!("--{k}")).arg(v);
        }
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SIDEBUS_")) {
            cmd.env_remove(k);
        }
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        let out = std::fs::File::create(&log).expect("daemon log");
        let child = cmd.stdout(Stdio::null()).stderr(out).spawn().expect("start the sidebus binary");
        servers::watch(child.id());
        Daemon { child, socket, log }
    }

    /// Starts the daemon and waits until its socket accepts connections.
    pub async fn start(self) -> Daemon {
        let mut d = self.spawn();
        d.wait_ready(Duration::from_secs(30)).await;
        d
    }
}

/// A daemon running as a child process. Killed when dropped; its log is printed when the test
/// panicked.
pub struct Daemon {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Waits until the socket accepts a connection.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if UnixStream::connect(&self.socket).await.is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the daemon exited with {status} while starting; its log:\n{}", self.log());
            }
            assert!(start.elapsed() < timeout, "the daemon was not ready within {timeout:?}; its log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client connected as `test`.
    pub async fn client(&self) -> Client {
        Client::connect_as(&self.socket, "test").await.expect("connect to the daemon")
    }

    /// A raw framed connection, for sending arbitrary bytes.
    pub async fn raw(&self) -> Framed<UnixStream, tokio_util::codec::LengthDelimitedCodec> {
        let s = UnixStream::connect(&self.socket).await.expect("connect to the daemon");
        Framed::new(s, sidebus_protocol::codec::codec(64 << 20))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "could not send SIG{sig}");
    }

    /// SIGTERM, then waits for the exit (a graceful stop).
    pub async fn terminate(mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for it to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the daemon") {
                return status;
            }
            assert!(start.elapsed() < timeout, "the daemon did not exit within {timeout:?}; its log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its exit status if it has exited.
    pub fn wait_exit_now(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for the daemon")
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The path of its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- daemon log ({}) ----\n{}", self.log.display(), self.log());
        }
    }
}

/// Writes one frame body on a raw connection.
pub async fn send_raw(conn: &mut Framed<UnixStream, tokio_util::codec::LengthDelimitedCodec>, body: &[u8]) {
    conn.send(Bytes::copy_from_slice(body)).await.expect("write a frame");
}

/// Reads one frame from a raw connection as a JSON-like MessagePack value; `None` at EOF.
pub async fn recv_raw(conn: &mut Framed<UnixStream, tokio_util::codec::LengthDelimitedCodec>) -> Option<rmpv::Value> {
    let frame = tokio::time::timeout(Duration::from_secs(10), conn.next()).await.expect("a frame within 10 s")?;
    let frame = frame.ok()?;
    Some(rmpv::decode::read_value(&mut frame.as_ref()).expect("the daemon sends MessagePack"))
}

/// Encodes a MessagePack value.
pub fn msgpack(v: &rmpv::Value) -> Vec<u8> {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, v).expect("encode");
    buf
}

/// A map value from pairs.
pub fn map(pairs: &[(&str, rmpv::Value)]) -> rmpv::Value {
    rmpv::Value::Map(pairs.iter().map(|(k, v)| (rmpv::Value::from(*k), v.clone())).collect())
}

/// A field of a map value.
pub fn get<'a>(v: &'a rmpv::Value, key: &str) -> Option<&'a rmpv::Value> {
    v.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

/// A length header with no body, for frames larger than allowed.
pub fn oversized_header(len: u32) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32(len);
    b.freeze()
}
