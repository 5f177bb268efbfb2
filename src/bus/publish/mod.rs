//! Makes publishes durable: first in the local spool, then in the Postgres log and the Redis
//! streams.
//!
//! Publishes are spread over `publish_writers` lanes by connection, so a connection's publishes
//! always take the same lane and keep their order. Each lane has:
//! - an **appender** thread (every call blocks on disk): it takes every publish queued, appends
//!   them to the lane's spool and commits them with one `fdatasync` (group commit), then
//!   answers the `local` publishes `spooled`;
//! - a **flusher**: two tasks joined by a short queue, so the Postgres write of batch n+1
//!   overlaps the Redis add of batch n. The first reads the next batch back from the spool and
//!   stores it in the log (binary COPY, or the duplicate-checking statement); the second adds
//!   what is new to the streams, records the spool cursor, and answers the `committed`
//!   publishes of the batch.
//!
//! The spool is the record of a publish until both backends have it, so the flusher can wait
//! for the backends as long as it must: publishes go on being accepted (up to
//! `spool_max_bytes`, then `backpressure`), a `committed` publish is answered `unavailable`
//! after the publish timeout, and a restart flushes what is left. Flushing is idempotent: the
//! log recognises rows of the same origin (lane id, sequence number), and the lane's
//! high-water mark in Redis adds nothing twice.

mod append;
mod flush;
mod reports;

pub use flush::{ADD_PAUSE_MAX, record_of};
pub use reports::IDLE_REPORT;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sidebus_protocol::reply::Published;
use sidebus_protocol::request::Durability;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backends;
use crate::backend::spool::{Lane, OpenLane, Spool, SpoolError};

/// Most publishes in one flush batch: a batch is one COPY, and COPY cost per row keeps falling
/// up to a few thousand rows (BENCHMARKS.md).
pub const BATCH_MAX: usize = 2048;
/// Most bytes in one flush batch.
const BATCH_BYTES: u64 = 8 << 20;
/// Most publishes in one group commit.
const GROUP_MAX: usize = 4096;
/// Publishes waiting for the appender, per lane (then submitters wait).
const QUEUE: usize = 8192;
/// Longest single attempt at a backend step before it is retried.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a publish was not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// `committed` durability, and the backends did not confirm in time. The publish is in the
    /// spool and will be stored; a retry with the same event id is stored once.
    #[error("the event log and Redis did not confirm the publish in time")]
    Unavailable,
    /// The spool is at `spool_max_bytes`.
    #[error("the local spool is full")]
    Backpressure,
    /// The spool could not be written (disk full, I/O error).
    #[error("the local spool could not be written")]
    Spool,
    /// The daemon is shutting down and takes no new publishes.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// One publish to make durable.
pub struct Submit {
    /// The event id (for the reply).
    pub event_id: String,
    /// Publish time, microseconds since the epoch.
    pub time_us: i64,
    /// The encoded event.
    pub event: Bytes,
    /// When to answer.
    pub durability: Durability,
}

type Reply = oneshot::Sender<Result<Published, PublishError>>;

struct Job {
    submit: Submit,
    bytes: u64,
    reply: Option<Reply>,
}

/// `committed` publishes awaiting their flush, by sequence number.
struct Waiting {
    event_id: String,
    reply: Reply,
}

/// A lane as the publisher sees it.
struct LaneCtl {
    lane: Arc<Lane>,
    waiting: Mutex<BTreeMap<u64, Waiting>>,
    /// The appender has stopped: nothing more will be committed.
    closed: AtomicBool,
}

/// How the publisher runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Lanes taking new publishes (`publish_writers`).
    pub writers: usize,
    /// This daemon's node name (recorded with its lanes).
    pub node: String,
    /// How long a publish may wait (`publish_timeout_ms`).
    pub timeout: Duration,
}

/// The publish queues, one per lane. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    lanes: Arc<[mpsc::Sender<Job>]>,
    all_lanes: Arc<[Arc<Lane>]>,
    spool: Arc<Spool>,
    timeout: Duration,
}

/// How much the spool holds that the backends do not have yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    /// Publishes.
    pub events: u64,
    /// Their bytes in the spool.
    pub bytes: u64,
    /// How long the oldest has waited.
    pub oldest_age: Option<Duration>,
}

impl Publisher {
    /// Starts `writers` lanes (reusing the spool's lanes, creating more when there are fewer),
    /// and flushers for every lane; lanes beyond `writers` (left by a larger setting) are only
    /// flushed, then removed. Flushers stop when their lane is drained and closed, or when
    /// `abort` is cancelled (what is left stays in the spool for the next start).
    pub fn start(
        spool: Spool,
        mut lanes: Vec<OpenLane>,
        opts: Options,
        backends: Arc<Backends>,
        tracker: &TaskTracker,
        abort: CancellationToken,
    ) -> Result<Publisher, SpoolError> {
        let Options { writers, node, timeout } = opts;
        while lanes.len() < writers.max(1) {
            lanes.push(spool.create_lane()?);
        }
        let spool = Arc::new(spool);
        let mut senders = Vec::new();
        let all_lanes: Vec<Arc<Lane>> = lanes.iter().map(|l| l.lane.clone()).collect();
        for (i, OpenLane { lane, writer, reader }) in lanes.into_iter().enumerate() {
            let ctl = Arc::new(LaneCtl { lane: lane.clone(), waiting: Mutex::new(BTreeMap::new()), closed: AtomicBool::new(false) });
            if i < writers.max(1) {
                let (tx, rx) = mpsc::channel(QUEUE);
                let (ctl2, spool2) = (ctl.clone(), spool.clone());
                let spawned =
                    std::thread::Builder::new().name(format!("spool-{i}")).spawn(move || append::append(writer, rx, ctl2, spool2));
                if let Err(e) = spawned {
                    return Err(SpoolError::Io { path: "spool appender thread".into(), source: e });
                }
                senders.push(tx);
            } else {
                ctl.closed.store(true, Ordering::Release);
                drop(writer);
                tracing::info!(lane = %lane.id, backlog = lane.backlog(), "draining a spool lane that is no longer used");
            }
            let remove = (i >= writers.max(1)).then(|| spool.clone());
            flush::spawn(reader, ctl, backends.clone(), node.clone(), tracker, abort.clone(), remove);
        }
        Ok(Publisher { lanes: senders.into(), all_lanes: all_lanes.into(), spool, timeout })
    }

    /// The spool's counters, which outlive the publisher (for the last word at shutdown).
    pub fn spool_stats(&self) -> Arc<crate::backend::spool::Stats> {
        self.spool.stats().clone()
    }

    /// What the spool holds that the backends do not have yet.
    pub fn depth(&self) -> Depth {
        let stats = self.spool.stats();
        let now_us = chrono::Utc::now().timestamp_micros();
        let oldest = self.all_lanes.iter().filter_map(|l| l.oldest_unflushed_us()).min();
        Depth {
            events: stats.records.load(Ordering::Acquire),
            bytes: stats.bytes.load(Ordering::Acquire),
            oldest_age: oldest.map(|t| Duration::from_micros(now_us.saturating_sub(t).max(0) as u64)),
        }
    }

    /// Queues a publish on the lane of `connection` (waiting for room, up to the publish
    /// timeout) and returns what to wait on. Publishes queued for one connection are stored in
    /// the order of these calls.
    pub async fn submit(&self, connection: u64, submit: Submit) -> Result<Waiter, PublishError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let bytes = crate::backend::spool::record_len(submit.event.len());
        if !self.spool.try_reserve(bytes) {
            return Err(PublishError::Backpressure);
        }
        let (reply, rx) = oneshot::channel();
        let lane = &self.lanes[(connection % self.lanes.len() as u64) as usize];
        let sent = tokio::time::timeout_at(deadline, lane.send(Job { submit, bytes, reply: Some(reply) })).await;
        match sent {
            Ok(Ok(())) => Ok(Waiter { rx, deadline }),
            Ok(Err(_)) => {
                self.spool.release(bytes);
                Err(PublishError::ShuttingDown)
            }
            Err(_) => {
                self.spool.release(bytes);
                Err(PublishError::Unavailable)
            }
        }
    }
}

/// A queued publish.
pub struct Waiter {
    rx: oneshot::Receiver<Result<Published, PublishError>>,
    deadline: tokio::time::Instant,
}

impl Waiter {
    /// Waits for the answer: `spooled` after the fsync (`local`), `committed` after the flush
    /// (`committed`, up to the publish timeout).
    pub async fn wait(self) -> Result<Published, PublishError> {
        match tokio::time::timeout_at(self.deadline, self.rx).await {
            Ok(Ok(result)) => result,
            // The appender stopped (shutdown) before it took this publish.
            Ok(Err(_)) => Err(PublishError::ShuttingDown),
            Err(_) => Err(PublishError::Unavailable),
        }
    }
}
