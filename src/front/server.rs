//! The daemon, in four steps a test or an embedding program can also take one by one (as
//! linkerd2-proxy splits `Config::build` and `App::spawn`): build (lock the data dir, check the
//! spool, open the socket), spawn (every background part), serve (accept connections), drain
//! (within the grace period).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tokio::sync::mpsc;

use crate::backend::Backends;
use crate::backend::pg::LogError;
use crate::backend::ready::Ready;
use crate::backend::spool::{OpenLane, Spool, SpoolError};
use crate::bus::deliver::Engine;
use crate::bus::publish::{self, Publisher};
use crate::bus::schema::{self, DirSchema, Registry};
use crate::bus::{maintenance, recovery, replay};
use crate::config::{Config, DEFAULT_SOCKET};
use crate::front::Shared;
use crate::front::access::{self, PerUid};
use crate::front::connection;
use crate::front::error::{RequestError, WireError};

/// After the grace period, how long closing connections and flushing queues may still take.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path holds something that is not a socket.
    #[error("{0} exists and is not a socket; remove it or choose another socket path")]
    NotASocket(PathBuf),
    /// Another daemon is listening on the socket.
    #[error("another daemon is listening on {0}")]
    SocketInUse(PathBuf),
    /// The socket (or its directory) could not be set up.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The data directory could not be created.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The event log's schema could not be brought up to date.
    #[error("event log migration failed: {0}")]
    Migrate(LogError),
    /// The spool could not be opened (or its data dir is locked by another daemon).
    #[error(transparent)]
    Spool(SpoolError),
    /// The metrics listener could not start.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The metrics recorder could not be installed.
    #[error(transparent)]
    Telemetry(#[from] crate::front::telemetry::TelemetryError),
    /// The socket's directory does not exist (only the default one is created).
    #[error("the socket's directory {0} does not exist")]
    NoSocketDir(PathBuf),
    /// The socket could not be given its group.
    #[error("cannot give socket {path} the group {gid} (socket_group): {source}")]
    SocketGroup {
        /// The socket path.
        path: PathBuf,
        /// The group.
        gid: u32,
        /// Why.
        source: io::Error,
    },
}

impl ServerError {
    /// What to change, for the errors a first run meets.
    pub fn hint(&self) -> Option<&'static str> {
        let denied = |e: &io::Error| e.kind() == io::ErrorKind::PermissionDenied;
        match self {
            ServerError::DataDir { .. } | ServerError::Spool(SpoolError::Io { .. }) => {
                Some("set data_dir (--data-dir or SIDEBUS_DATA_DIR) to a directory this user can write")
            }
            ServerError::Socket { source, .. } if denied(source) => {
                Some("set socket (--socket or SIDEBUS_SOCKET) to a path in a directory this user can write")
            }
            ServerError::NoSocketDir(_) => Some("create it, or set socket (--socket or SIDEBUS_SOCKET) to a path in an existing directory"),
            ServerError::SocketInUse(_) => Some("stop the other daemon, or give this one another socket (--socket or SIDEBUS_SOCKET)"),
            ServerError::Spool(SpoolError::Locked { .. }) => Some("give each daemon its own data_dir (--data-dir or SIDEBUS_DATA_DIR)"),
            ServerError::SocketGroup { source, .. } if denied(source) || source.raw_os_error() == Some(1) => {
                Some("the daemon's user must be a member of socket_group (SupplementaryGroups= in systemd)")
            }
            _ => None,
        }
    }
}

/// Runs the daemon until `shutdown` resolves, then drains and returns: [`App::build`],
/// [`App::spawn`], [`Running::serve`], [`Running::drain`].
pub async fn run(config: Config, dir_schemas: Vec<DirSchema>, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
    let mut running = App::build(config, dir_schemas)?.spawn().await?;
    let result = running.serve(shutdown).await;
    running.drain().await;
    result
}

/// The daemon, built and not yet running: its data dir locked and its spool checked, its socket
/// open (so a second daemon on either refuses to start before anything runs).
pub struct App {
    config: Config,
    dir_schemas: Vec<DirSchema>,
    spool: Spool,
    lanes: Vec<OpenLane>,
    listener: UnixListener,
}

/// The daemon running: what [`Running::serve`] needs, and what [`Running::drain`] stops.
pub struct Running {
    config: Config,
    listener: Option<UnixListener>,
    shared: Option<Arc<Shared>>,
    backends: Arc<Backends>,
    engine: Option<Arc<Ready<Engine>>>,
    tracker: TaskTracker,
    conns: TaskTracker,
    fatal: mpsc::Receiver<ServerError>,
    draining: CancellationToken,
    closing: CancellationToken,
    abort: CancellationToken,
}

impl App {
    /// Locks the data dir, checks the spool (a few seconds at most) and opens the socket.
    pub fn build(config: Config, dir_schemas: Vec<DirSchema>) -> Result<App, ServerError> {
        raise_open_files_limit(config.max_connections);
        let (spool, lanes, findings) = Spool::open(&config.data_dir, config.spool_max_bytes).map_err(ServerError::Spool)?;
        maintenance::report_findings(&findings);
        let listener = bind(&config.socket, config.socket_mode, config.socket_group)?;
        Ok(App { config, dir_schemas, spool, lanes, listener })
    }

    /// Starts everything in the background: the backends' connections (retried until they
    /// answer), the publish lanes (taking publishes into the spool at once), delivery, recovery
    /// and replays once both backends answer, the schema registry, the janitor, delayed
    /// delivery, the metrics listener; then tells systemd the daemon is ready.
    pub async fn spawn(self) -> Result<Running, ServerError> {
        let App { config, dir_schemas, spool, lanes, listener } = self;
        let (draining, closing, abort) = (CancellationToken::new(), CancellationToken::new(), CancellationToken::new());
        let tracker = TaskTracker::new();
        let backends = Arc::new(Backends::new(&config));
        let (fatal_tx, fatal) = mpsc::channel::<ServerError>(1);
        spawn_backends(&backends, &config, &tracker, [&abort, &draining], fatal_tx);
        let opts = publish::Options { writers: config.publish_writers, node: config.node.clone(), timeout: config.publish_timeout };
        let publisher = Publisher::start(spool, lanes, opts, backends.clone(), &tracker, abort.clone()).map_err(ServerError::Spool)?;
        let consumer = format!("{}:{}", config.node, &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let engine: Arc<Ready<Engine>> = Arc::new(Ready::default());
        tracker.spawn(start_delivery(
            backends.clone(),
            config.clone(),
            engine.clone(),
            tracker.clone(),
            draining.clone(),
            consumer.clone(),
        ));
        let schemas = Arc::new(Registry::open(&config.data_dir, config.unknown_types));
        tracker.spawn(schema::watch(schemas.clone(), backends.clone(), draining.clone()));
        if !dir_schemas.is_empty() {
            let (schemas, backends, draining) = (schemas.clone(), backends.clone(), draining.clone());
            tracker.spawn(async move { schemas.register_dir(&backends, dir_schemas, draining).await });
        }
        tracker.spawn(maintenance::janitor(backends.clone(), config.group_idle_ttl, draining.clone()));
        tracker.spawn(crate::bus::delays::run(backends.clone(), draining.clone()));
        tracker.spawn(maintenance::report_spool(publisher.clone(), draining.clone()));
        tracing::info!(socket = %config.socket.display(), node = %config.node, consumer = %consumer, "listening");
        crate::front::stats::mark_start();
        let shared = Arc::new(Shared {
            config: config.clone(),
            publisher,
            backends: backends.clone(),
            schemas,
            engine: engine.clone(),
            draining: draining.clone(),
            closing: closing.clone(),
        });
        if let Some(addr) = config.metrics_addr {
            let listener = crate::front::http::bind(addr).await.map_err(|source| ServerError::Metrics { addr, source })?;
            let handle = crate::front::telemetry::install_metrics()?;
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            tracker.spawn(crate::front::http::serve(listener, shared.clone(), handle, closing.clone()));
        }
        // systemd: ready once the socket accepts (a no-op without NOTIFY_SOCKET).
        let status = format!("listening on {}", config.socket.display());
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]) {
            tracing::warn!(error = %e, "could not notify systemd");
        }
        Ok(Running {
            config,
            listener: Some(listener),
            shared: Some(shared),
            backends,
            engine: Some(engine),
            tracker,
            conns: TaskTracker::new(),
            fatal,
            draining,
            closing,
            abort,
        })
    }
}

impl Running {
    /// Accepts connections, at most `max_connections` at once, until `shutdown` resolves or a
    /// part of the daemon fails for good.
    pub async fn serve(&mut self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let (Some(listener), Some(shared)) = (self.listener.as_ref(), self.shared.clone()) else { return Ok(()) };
        let max = self.config.max_connections;
        let slots = Arc::new(Semaphore::new(max));
        let per_uid = PerUid::new(self.config.max_connections_per_uid);
        let mut next_conn: u64 = 0;
        let mut watchdog = Watchdog::from_env();
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                Some(e) = self.fatal.recv() => {
                    tracing::error!(error = %e, "stopping");
                    return Err(e);
                }
                // systemd's watchdog hears from this loop only while it turns.
                _ = watchdog.tick() => watchdog.notify(),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let peer = match access::peer_of(&stream) {
                            Ok(peer) => peer,
                            Err(e) => {
                                tracing::warn!(error = %e, "connection refused: cannot read the peer's credentials");
                                continue;
                            }
                        };
                        let Some(uid_slot) = per_uid.take(peer.uid) else {
                            tracing::warn!(uid = peer.uid, max_connections_per_uid = per_uid.max(), "connection refused: too many connections of uid {}", peer.uid);
                            self.conns.spawn(refuse(stream, RequestError::TooManyOfUid { uid: peer.uid, max: per_uid.max() }));
                            continue;
                        };
                        match slots.clone().try_acquire_owned() {
                            Ok(permit) => {
                                let shared = shared.clone();
                                next_conn += 1;
                                let id = next_conn;
                                self.conns.spawn(async move {
                                    connection::serve(stream, shared, id, peer).await;
                                    drop((permit, uid_slot));
                                });
                            }
                            Err(_) => {
                                tracing::warn!(max_connections = max, "connection refused: too many connections");
                                self.conns.spawn(refuse(stream, RequestError::TooManyConnections(max)));
                            }
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors, usually: wait rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    /// Stops within the grace period: stop accepting and remove the socket, refuse new
    /// publishes and subscriptions, stop dispatching, wait for pending publishes and open leases
    /// (flushing the spool meanwhile), release what is still leased, and let the flushers drain
    /// what they can; what is left stays in the spool for the next start.
    pub async fn drain(mut self) {
        tracing::info!(grace_ms = self.config.shutdown_grace.as_millis() as u64, "draining");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status("draining")]);
        drop(self.listener.take());
        if let Err(e) = std::fs::remove_file(&self.config.socket) {
            tracing::warn!(error = %e, "could not remove the socket file");
        }
        self.draining.cancel();
        if let Some(e) = self.engine.as_ref().and_then(|e| e.now()) {
            e.stop();
        }
        self.conns.close();
        let deadline = tokio::time::Instant::now() + self.config.shutdown_grace;
        if tokio::time::timeout_at(deadline, self.conns.wait()).await.is_err() {
            tracing::warn!("grace period over; releasing what is still leased");
            self.closing.cancel();
            let _ = tokio::time::timeout(CLOSE_DEADLINE, self.conns.wait()).await;
        }
        // With the connections gone, the appenders stop after their last commit, and the
        // flushers drain the spool until the grace period ends.
        let spool = self.shared.as_ref().map(|s| s.publisher.spool_stats());
        drop(self.shared.take());
        drop(self.engine.take());
        self.tracker.close();
        let flush_until = deadline.max(tokio::time::Instant::now() + Duration::from_millis(100));
        if tokio::time::timeout_at(flush_until, self.tracker.wait()).await.is_err() {
            self.abort.cancel();
            let _ = tokio::time::timeout(CLOSE_DEADLINE, self.tracker.wait()).await;
        }
        if let Some(log) = self.backends.log.now() {
            log.close().await;
        }
        let left = spool.map_or(0, |s| s.records.load(std::sync::atomic::Ordering::Acquire));
        if left > 0 {
            tracing::warn!(
                events = left,
                data_dir = %self.config.data_dir.display(),
                "{left} events are still in the spool (not yet in Postgres and Redis); they are flushed at the next start on this data_dir"
            );
        }
        tracing::info!("stopped");
    }
}

/// Connects Postgres (migrating it; a failed migration stops the daemon) and Redis in the
/// background, each retried until it answers, then probes them.
fn spawn_backends(
    backends: &Arc<Backends>,
    config: &Config,
    tracker: &TaskTracker,
    [abort, draining]: [&CancellationToken; 2],
    fatal: mpsc::Sender<ServerError>,
) {
    let (b, c, a) = (backends.clone(), config.clone(), abort.clone());
    tracker.spawn(async move {
        tokio::select! {
            r = b.connect_log(&c) => if let Err(e) = r {
                let _ = fatal.send(ServerError::Migrate(e)).await;
            },
            _ = a.cancelled() => {}
        }
    });
    let (b, c, a) = (backends.clone(), config.clone(), abort.clone());
    tracker.spawn(async move {
        tokio::select! {
            _ = b.connect_streams(&c) => {}
            _ = a.cancelled() => {}
        }
    });
    // The probe ends when the drain starts: nobody asks for `stats` any more.
    let (b, d) = (backends.clone(), draining.clone());
    tracker.spawn(async move {
        tokio::select! {
            _ = b.probe() => {}
            _ = d.cancelled() => {}
        }
    });
}

/// Once both backends answer: records the declared groups in the log, starts delivery, the
/// watch for a Redis that lost its data, and the replays.
async fn start_delivery(
    backends: Arc<Backends>,
    config: Config,
    engine: Arc<Ready<Engine>>,
    tracker: TaskTracker,
    draining: CancellationToken,
    consumer: String,
) {
    let both = async { (backends.log.get().await, backends.streams.get().await) };
    let (log, streams) = tokio::select! {
        b = both => b,
        _ = draining.cancelled() => return,
    };
    // The declared groups exist in Redis already (see connect_streams); the log records them for
    // recovery and trimming.
    for g in &config.groups {
        if let Err(e) = log.ensure_group(&g.event_type, &g.name).await {
            tracing::warn!(r#type = %g.event_type, group = %g.name, error = %e, "could not record a declared group in the log");
        }
    }
    let e = Engine::start(streams.clone(), log.clone(), consumer.clone(), config.backoff, &tracker, draining.clone());
    tracker.spawn(recovery::watch(log.clone(), streams.clone(), e.clone(), draining.clone()));
    tracker.spawn(replay::run(log, streams, consumer, draining));
    engine.set(e);
    tracing::info!("ready: Postgres and Redis reachable, delivering");
}

/// systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` at half the interval systemd gives in
/// `WATCHDOG_USEC`, sent from the accept loop, so that a daemon whose loop stops turning (a
/// blocked runtime, a deadlock) is restarted. Off without `WATCHDOG_USEC`.
struct Watchdog {
    every: Option<tokio::time::Interval>,
}

impl Watchdog {
    fn from_env() -> Watchdog {
        let every = sd_notify::watchdog_enabled().map(|timeout| {
            let half = (timeout / 2).max(Duration::from_millis(10));
            tracing::info!(timeout_ms = timeout.as_millis() as u64, "systemd watchdog on: notifying every {} ms", half.as_millis());
            let mut i = tokio::time::interval(half);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        Watchdog { every }
    }

    /// The next time to notify (never, when off).
    async fn tick(&mut self) {
        match &mut self.every {
            Some(i) => {
                i.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    fn notify(&self) {
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
            tracing::warn!(error = %e, "could not notify the systemd watchdog");
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every connection holds one, and the
/// usual soft default (1024) is below the default `max_connections` plus what the daemon needs.
fn raise_open_files_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < max_connections as u64 + 64 => {
            tracing::warn!(limit, max_connections, "the open-files limit is below max_connections; raise it (LimitNOFILE= in systemd)")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
}

/// Opens the socket. A socket file nobody listens on (left by a crash) is replaced; a live one
/// means another daemon and refuses the start.
fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener, ServerError> {
    let sock_err = |source| ServerError::Socket { path: path.to_owned(), source };
    // Only the default runtime directory is created: any other missing directory is more
    // likely a typo than a wish.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        if Some(dir) != Path::new(DEFAULT_SOCKET).parent() {
            return Err(ServerError::NoSocketDir(dir.to_owned()));
        }
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::SocketInUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(sock_err)?;
                tracing::info!(socket = %path.display(), "removed a stale socket file");
            }
            Err(e) => return Err(sock_err(e)),
        },
        Ok(_) => return Err(ServerError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(sock_err)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| ServerError::SocketGroup {
            path: path.to_owned(),
            gid,
            source,
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(sock_err)?;
    Ok(listener)
}

/// Tells a client over a connection limit why, then closes.
async fn refuse(mut stream: UnixStream, why: RequestError) {
    let body = WireError::from(why).frame(None);
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    // Then read what the client sent until it closes: closing with its hello unread would reset
    // the connection, and the client might lose the frame that says why.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&frame).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}
