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

use crate::config::Config;
use crate::connection::{self, Shared};
use crate::engine::Engine;
use crate::error::WireError;
use crate::log::{EventLog, LogError};
use crate::publisher::Publisher;
use crate::streams::{Streams, StreamsError, TRIM_STEP};

/// How often streams are trimmed below what their groups still need.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(30);
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
}

/// Runs the daemon until `shutdown` resolves, then drains and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
    let mut shutdown = std::pin::pin!(shutdown);
    raise_open_files_limit(config.max_connections);
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir { path: config.data_dir.clone(), source })?;
    let backends = async {
        let log = connect_log(&config).await?;
        let streams = connect_streams(&config).await;
        Ok::<_, ServerError>((log, streams))
    };
    let (log, streams) = tokio::select! {
        r = backends => r?,
        _ = &mut shutdown => {
            tracing::info!("shut down before the backends answered");
            return Ok(());
        }
    };
    for g in &config.groups {
        declare_group(&log, &streams, &config, &g.event_type, &g.name).await;
    }

    let draining = CancellationToken::new();
    let closing = CancellationToken::new();
    let abort = CancellationToken::new();
    let tracker = TaskTracker::new();
    let consumer = format!("{}:{}", config.node, &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let publisher = Publisher::start(log.clone(), streams.clone(), config.publish_writers, config.publish_timeout, &tracker, abort.clone());
    let engine = Engine::start(streams.clone(), log.clone(), consumer.clone(), config.backoff, &tracker, draining.clone());
    tracker.spawn(janitor(log.clone(), streams.clone(), draining.clone()));

    let listener = bind(&config.socket, config.socket_mode)?;
    tracing::info!(socket = %config.socket.display(), node = %config.node, consumer = %consumer, "listening");
    let shared = Arc::new(Shared {
        config: config.clone(),
        publisher,
        engine: engine.clone(),
        draining: draining.clone(),
        closing: closing.clone(),
    });
    let conns = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut next_conn: u64 = 0;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
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
    drop(listener);
    if let Err(e) = std::fs::remove_file(&config.socket) {
        tracing::warn!(error = %e, "could not remove the socket file");
    }
    draining.cancel();
    engine.stop();
    conns.close();
    if tokio::time::timeout(config.shutdown_grace, conns.wait()).await.is_err() {
        tracing::warn!("grace period over; releasing what is still leased");
        closing.cancel();
        let _ = tokio::time::timeout(CLOSE_DEADLINE, conns.wait()).await;
    }
    drop(shared);
    drop(engine);
    tracker.close();
    if tokio::time::timeout(CLOSE_DEADLINE, tracker.wait()).await.is_err() {
        tracing::warn!("publishes or settlements still unfinished at exit; clients were not acknowledged for them");
        abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    }
    log.close().await;
    tracing::info!("stopped");
    Ok(())
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

/// Retries until Postgres answers, then migrates.
async fn connect_log(config: &Config) -> Result<EventLog, ServerError> {
    let mut failures = 0u32;
    let log = loop {
        // One connection per publish lane, and a few for subscriptions and the janitor.
        match EventLog::connect_with(&config.database_url, config.publish_writers as u32 + 4).await {
            Ok(log) => break log,
            Err(e) => {
                // A line now and then, not one per try.
                if failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, "Postgres unreachable; retrying");
                }
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    log.migrate().await.map_err(ServerError::Migrate)?;
    if failures > 0 {
        tracing::info!("Postgres reachable");
    }
    Ok(log)
}

/// Retries until Redis answers.
async fn connect_streams(config: &Config) -> Streams {
    let mut failures = 0u32;
    loop {
        match Streams::connect(&config.redis_url, &config.namespace).await {
            Ok(s) => {
                if failures > 0 {
                    tracing::info!("Redis reachable");
                }
                return s;
            }
            Err(e) => {
                if failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, "Redis unreachable; retrying");
                }
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Creates a group declared in the config, so events wait for consumers that are not up yet.
async fn declare_group(log: &EventLog, streams: &Streams, config: &Config, event_type: &str, group: &str) {
    let keys = streams.group_keys(event_type, group);
    let result = async {
        log.ensure_group(event_type, group).await.map_err(|e| e.to_string())?;
        streams.ensure_group(&keys, config.ack_timeout).await.map_err(|e: StreamsError| e.to_string())
    };
    match result.await {
        Ok(()) => tracing::info!(r#type = %event_type, group = %group, "declared group ready"),
        Err(e) => {
            tracing::warn!(r#type = %event_type, group = %group, error = %e, "could not create a declared group; it is created on its first subscribe")
        }
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

/// Trims every known stream now and then. One daemon at a time does it (a Redis lock), since
/// the result is the same whoever does.
async fn janitor(log: EventLog, streams: Streams, stop: CancellationToken) {
    loop {
        let pause = TRIM_INTERVAL.mul_f64(0.8 + 0.4 * rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
        match streams.try_lock("janitor", TRIM_INTERVAL / 2).await {
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
        for (event_type, groups) in types {
            trim_stream(&streams, &event_type, &groups, &stop).await;
        }
    }
}
