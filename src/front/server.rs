//! The daemon: connect the backends, open the socket, accept connections, and on shutdown drain
//! within the grace period.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sidebus_protocol::ErrorCode;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backends;
use crate::config::Config;
use crate::front::connection::{self, Shared};
use crate::bus::deliver::Engine;
use crate::front::error::WireError;
use crate::backend::pg::LogError;
use crate::bus::publish::{self, Publisher};
use crate::backend::ready::Ready;
use crate::bus::schema::{self, DirSchema, Registry};
use crate::backend::spool::{Finding, Spool, SpoolError};
use crate::backend::redis::{Streams, TRIM_STEP};
use crate::{bus::recovery, bus::replay};

/// How often streams are trimmed below what their groups still need.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(30);
/// How often the groups' checkpoints are recorded: what a group receives again after Redis
/// lost its data is what it acknowledged since (see `recovery.rs`).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the spool's depth is logged while it holds anything.
const SPOOL_REPORT_INTERVAL: Duration = Duration::from_secs(10);
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
}

/// Runs the daemon until `shutdown` resolves, then drains and returns.
///
/// Start-up: lock the data dir and check the spool (a few seconds at most), open the socket,
/// and connect Redis and Postgres in the background. Publishes are taken into the spool at
/// once; flushing and subscriptions wait for the backends.
pub async fn run(config: Config, dir_schemas: Vec<DirSchema>, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
    let mut shutdown = std::pin::pin!(shutdown);
    raise_open_files_limit(config.max_connections);
    let (spool, lanes, findings) = Spool::open(&config.data_dir, config.spool_max_bytes).map_err(ServerError::Spool)?;
    report_findings(&findings);
    let draining = CancellationToken::new();
    let closing = CancellationToken::new();
    let abort = CancellationToken::new();
    let tracker = TaskTracker::new();
    let backends = Arc::new(Backends::default());
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<ServerError>(1);
    tracker.spawn({
        let (backends, config, abort) = (backends.clone(), config.clone(), abort.clone());
        async move {
            tokio::select! {
                r = backends.connect_log(&config) => if let Err(e) = r {
                    let _ = fatal_tx.send(ServerError::Migrate(e)).await;
                },
                _ = abort.cancelled() => {}
            }
        }
    });
    tracker.spawn({
        let (backends, config, abort) = (backends.clone(), config.clone(), abort.clone());
        async move {
            tokio::select! {
                _ = backends.connect_streams(&config) => {}
                _ = abort.cancelled() => {}
            }
        }
    });
    let opts = publish::Options { writers: config.publish_writers, node: config.node.clone(), timeout: config.publish_timeout };
    let publisher = Publisher::start(spool, lanes, opts, backends.clone(), &tracker, abort.clone()).map_err(ServerError::Spool)?;
    let consumer = format!("{}:{}", config.node, &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let engine: Arc<Ready<Engine>> = Arc::new(Ready::default());
    tracker.spawn({
        let (backends, config, engine, tracker2, draining, consumer) =
            (backends.clone(), config.clone(), engine.clone(), tracker.clone(), draining.clone(), consumer.clone());
        async move {
            let both = async { (backends.log.get().await, backends.streams.get().await) };
            let (log, streams) = tokio::select! {
                b = both => b,
                _ = draining.cancelled() => return,
            };
            // The declared groups exist in Redis already (see connect_streams); the log records
            // them for recovery and trimming.
            for g in &config.groups {
                if let Err(e) = log.ensure_group(&g.event_type, &g.name).await {
                    tracing::warn!(r#type = %g.event_type, group = %g.name, error = %e, "could not record a declared group in the log");
                }
            }
            let e = Engine::start(streams.clone(), log.clone(), consumer.clone(), config.backoff, &tracker2, draining.clone());
            tracker2.spawn(recovery::watch(log.clone(), streams.clone(), e.clone(), config.ack_timeout, draining.clone()));
            tracker2.spawn(replay::run(log, streams, consumer, config.ack_timeout, draining));
            engine.set(e);
            tracing::info!("ready: Postgres and Redis reachable, delivering");
        }
    });
    let schemas = Arc::new(Registry::open(&config.data_dir, config.unknown_types));
    tracker.spawn(schema::watch(schemas.clone(), backends.clone(), draining.clone()));
    if !dir_schemas.is_empty() {
        let (schemas, backends, draining) = (schemas.clone(), backends.clone(), draining.clone());
        tracker.spawn(async move { schemas.register_dir(&backends, dir_schemas, draining).await });
    }
    tracker.spawn(janitor(backends.clone(), draining.clone()));
    tracker.spawn(crate::bus::delays::run(backends.clone(), draining.clone()));
    tracker.spawn(report_spool(publisher.clone(), draining.clone()));

    let listener = bind(&config.socket, config.socket_mode)?;
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
        let handle = crate::front::telemetry::install_metrics().map_err(|e| ServerError::Metrics { addr, source: std::io::Error::other(e) })?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tracker.spawn(crate::front::http::serve(listener, shared.clone(), handle, closing.clone()));
    }
    // systemd: ready once the socket accepts (a no-op without NOTIFY_SOCKET).
    let status = format!("listening on {}", config.socket.display());
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
    let conns = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut next_conn: u64 = 0;
    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(e) = fatal_rx.recv() => {
                tracing::error!(error = %e, "stopping");
                result = Err(e);
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared.clone();
                        next_conn += 1;
                        let id = next_conn;
                        conns.spawn(async move {
                            connection::serve(stream, shared, id).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(max_connections = config.max_connections, "connection refused: too many connections");
                        conns.spawn(refuse(stream, config.max_connections));
                    }
                },
                Err(e) => {
                    // Out of file descriptors, usually: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    tracing::info!(grace_ms = config.shutdown_grace.as_millis() as u64, "draining");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status("draining")]);
    drop(listener);
    if let Err(e) = std::fs::remove_file(&config.socket) {
        tracing::warn!(error = %e, "could not remove the socket file");
    }
    draining.cancel();
    if let Some(e) = engine.now() {
        e.stop();
    }
    conns.close();
    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    if tokio::time::timeout_at(deadline, conns.wait()).await.is_err() {
        tracing::warn!("grace period over; releasing what is still leased");
        closing.cancel();
        let _ = tokio::time::timeout(CLOSE_DEADLINE, conns.wait()).await;
    }
    // With the connections gone, the appenders stop after their last commit, and the flushers
    // drain the spool until the grace period ends; what is left stays for the next start.
    drop(shared);
    drop(engine);
    tracker.close();
    if tokio::time::timeout_at(deadline.max(tokio::time::Instant::now() + Duration::from_millis(100)), tracker.wait()).await.is_err() {
        abort.cancel();
        let _ = tokio::time::timeout(CLOSE_DEADLINE, tracker.wait()).await;
    }
    if let Some(log) = backends.log.now() {
        log.close().await;
    }
    tracing::info!("stopped");
    result
}

/// Says what the spool check found: a torn tail is a warning (a write the crash interrupted,
/// never acknowledged); anything else an error (acknowledged publishes may be lost).
fn report_findings(findings: &[Finding]) {
    for f in findings {
        let quarantined = f.quarantined.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        if f.torn_tail {
            tracing::warn!(lane = %f.lane, segment = %f.segment.display(), bytes = f.bytes, quarantined, what = %f.what, "spool had a torn tail (a write cut short by a crash, never acknowledged); set aside");
        } else {
            tracing::error!(lane = %f.lane, segment = %f.segment.display(), bytes = f.bytes, quarantined, what = %f.what, "spool damaged; the damaged part is set aside and acknowledged publishes in it are lost");
        }
    }
}

/// Logs the spool's depth while it holds anything: every 10 s, louder once the oldest
/// publish waits more than 30 s.
async fn report_spool(publisher: Publisher, stop: CancellationToken) {
    let mut was_empty = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SPOOL_REPORT_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
        let d = publisher.depth();
        if d.events == 0 {
            if !was_empty {
                tracing::info!("spool drained");
            }
            was_empty = true;
            continue;
        }
        was_empty = false;
        let age_s = d.oldest_age.map_or(0.0, |a| a.as_secs_f64());
        if age_s > 30.0 {
            tracing::warn!(events = d.events, bytes = d.bytes, oldest_age_s = age_s, "spool holds publishes the backends have not taken");
        } else {
            tracing::info!(events = d.events, bytes = d.bytes, oldest_age_s = age_s, "spool depth");
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
fn bind(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    let sock_err = |source| ServerError::Socket { path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(sock_err)?;
    Ok(listener)
}

/// Tells a client over the connection limit why, then closes.
async fn refuse(mut stream: UnixStream, max: usize) {
    let body =
        WireError::new(ErrorCode::Unavailable, format!("too many connections (max_connections = {max}); try again later")).frame(None);
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&frame)).await;
}

/// Trims one stream in steps of [`TRIM_STEP`] entries, pausing between steps so that other
/// Redis clients are served.
async fn trim_stream(streams: &Streams, event_type: &str, groups: &[String], stop: &CancellationToken) {
    let mut total = 0;
    // Bounded, in case entries arrive as fast as they go.
    for _ in 0..1000 {
        match streams.trim(event_type, groups).await {
            Ok(Some(n)) => {
                total += n;
                if n < TRIM_STEP || stop.is_cancelled() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(None) => {
                tracing::warn!(r#type = %event_type, "a consumer group the log knows is missing in Redis; not trimming");
                break;
            }
            Err(e) => {
                tracing::debug!(r#type = %event_type, error = %e, "trim failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::debug!(r#type = %event_type, trimmed = total, "trimmed stream");
    }
}

/// Keeps the groups' checkpoints (every [`CHECKPOINT_INTERVAL`]) and trims every known stream
/// (every [`TRIM_INTERVAL`]). One daemon at a time does it (a Redis lock), since the result is
/// the same whoever does.
async fn janitor(backends: Arc<Backends>, stop: CancellationToken) {
    let both = async { (backends.log.get().await, backends.streams.get().await) };
    let (log, streams) = tokio::select! {
        b = both => b,
        _ = stop.cancelled() => return,
    };
    let mut next_trim = tokio::time::Instant::now() + TRIM_INTERVAL.mul_f64(0.5 + rand::random::<f64>());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
        match streams.try_lock("janitor", CHECKPOINT_INTERVAL.mul_f64(0.9)).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "janitor skipped");
                continue;
            }
        }
        let types = match log.types_and_groups().await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "janitor skipped");
                continue;
            }
        };
        match crate::bus::checkpoint::record(&log, &streams).await {
            Ok(n) => tracing::trace!(recorded = n, "checkpoints"),
            Err(e) => tracing::debug!(error = %e, "checkpoints not recorded this round"),
        }
        // Dead letters into the log, so they outlive Redis (see dlq.rs).
        for (event_type, groups) in &types {
            for group in groups {
                if let Err(e) = crate::bus::dead_letters::sync(&log, &streams, event_type, group).await {
                    tracing::debug!(r#type = %event_type, group = %group, error = %e, "recording dead letters failed");
                }
            }
        }
        if tokio::time::Instant::now() >= next_trim {
            for (event_type, groups) in &types {
                trim_stream(&streams, event_type, groups, &stop).await;
            }
            next_trim = tokio::time::Instant::now() + TRIM_INTERVAL.mul_f64(0.8 + 0.4 * rand::random::<f64>());
        }
    }
}
