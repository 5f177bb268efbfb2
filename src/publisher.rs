//! Makes publishes durable in batches: every publish queued while the previous batch was being
//! written joins the next one. A batch is one statement into the Postgres log, then one script
//! into the Redis streams, then every publish in it is answered.
//!
//! Publishes are spread over `publish_writers` lanes by connection: each lane is two stages, two
//! tasks joined by a short queue, so the Postgres write of batch n+1 overlaps the Redis add of
//! batch n; each stage handles its batches in order, so all publishes of one connection are
//! stored in the log, and added to their stream, in the order they were sent. Lanes run in
//! parallel (one Postgres connection each); publishes of different connections have no order
//! between them, as SPEC.md allows.
//! Each lane numbers its publishes (a lane id and a sequence number, the record's origin). A
//! stage that fails retries the same batch until it succeeds: the log recognises rows of the
//! same origin, and the lane's high-water mark in Redis adds nothing twice. Callers stop waiting
//! after the publish timeout and answer `unavailable`; the batch goes on in the background.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sidebus_protocol::reply::{PublishStatus, Published};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::log::{EventLog, Record, Stored};
use crate::streams::Streams;

/// Most publishes in one batch: a batch is one COPY, and COPY cost per row keeps falling up to
/// a few thousand rows (BENCHMARKS.md).
pub const BATCH_MAX: usize = 2048;
/// Publishes waiting for a batch, at most (then submitters wait).
const QUEUE: usize = 8192;
/// Longest single attempt at a backend step before it is retried.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a publish was not acknowledged. It may still be stored later; a retry with the same
/// event id is stored once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The backends did not make it durable within the publish timeout.
    #[error("the event log and Redis did not confirm the publish in time")]
    Unavailable,
    /// The daemon is shutting down and takes no new publishes.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// One publish waiting for its batch.
pub struct Job {
    /// The event, encoded, with the columns of its log row.
    pub record: Record,
    reply: oneshot::Sender<Published>,
}

struct Written {
    lane: Uuid,
    jobs: Vec<Job>,
    stored: Vec<Stored>,
}

/// The publish queues, one per lane. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    lanes: Arc<[mpsc::Sender<Job>]>,
    timeout: Duration,
}

impl Publisher {
    /// Starts `lanes` lanes of two stages each on `tracker`. They stop when every handle is
    /// dropped and their queues are empty, or when `stop` is cancelled.
    pub fn start(
        log: EventLog,
        streams: Streams,
        lanes: usize,
        timeout: Duration,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Publisher {
        let lanes: Vec<mpsc::Sender<Job>> = (0..lanes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE);
                let (written_tx, written_rx) = mpsc::channel(2);
                tracker.spawn(write_log(log.clone(), Uuid::new_v4(), rx, written_tx, stop.clone()));
                tracker.spawn(add_streams(streams.clone(), written_rx, stop.clone()));
                tx
            })
            .collect();
        Publisher { lanes: lanes.into(), timeout }
    }

    /// Queues a publish on the lane of `connection` (waiting for room, up to the publish
    /// timeout) and returns what to wait on for its durability. Publishes queued for one
    /// connection are stored in the order of these calls.
    pub async fn submit(&self, connection: u64, record: Record) -> Result<Waiter, PublishError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (reply, rx) = oneshot::channel();
        let lane = &self.lanes[(connection % self.lanes.len() as u64) as usize];
        match tokio::time::timeout_at(deadline, lane.send(Job { record, reply })).await {
            Ok(Ok(())) => Ok(Waiter { rx, deadline }),
            Ok(Err(_)) => Err(PublishError::ShuttingDown),
            Err(_) => Err(PublishError::Unavailable),
        }
    }
}

/// A queued publish.
pub struct Waiter {
    rx: oneshot::Receiver<Published>,
    deadline: tokio::time::Instant,
}

impl Waiter {
    /// Waits until the publish is durable, or until the publish timeout.
    pub async fn wait(self) -> Result<Published, PublishError> {
        match tokio::time::timeout_at(self.deadline, self.rx).await {
            Ok(Ok(published)) => Ok(published),
            // The stages ended (shutdown deadline) before this publish was written.
            Ok(Err(_)) => Err(PublishError::ShuttingDown),
            Err(_) => Err(PublishError::Unavailable),
        }
    }
}

/// Retries `step` with capped exponential backoff until it succeeds or `stop` is cancelled
/// (`None` then).
async fn retry<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &'static str,
    stop: &CancellationToken,
    mut step: impl FnMut() -> F,
) -> Option<T> {
    let mut delay = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        match tokio::time::timeout(STEP_TIMEOUT, step()).await {
            Ok(Ok(v)) => {
                if failures > 0 {
                    tracing::info!(step = what, failures, "publish step recovered");
                }
                return Some(v);
            }
            Ok(Err(e)) if failures == 0 => {
                tracing::warn!(step = what, error = %e, "publish step failed; retrying the batch")
            }
            Ok(Err(e)) => {
                tracing::debug!(step = what, error = %e, failures, "publish step failed again")
            }
            Err(_) => tracing::warn!(step = what, timeout_s = STEP_TIMEOUT.as_secs(), "publish step timed out; retrying the batch"),
        }
        failures += 1;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

async fn write_log(log: EventLog, lane: Uuid, mut rx: mpsc::Receiver<Job>, out: mpsc::Sender<Written>, stop: CancellationToken) {
    let mut known_types: HashSet<String> = HashSet::new();
    let mut next_seq: i64 = 1;
    let mut jobs: Vec<Job> = Vec::with_capacity(BATCH_MAX);
    loop {
        jobs.clear();
        if rx.recv_many(&mut jobs, BATCH_MAX).await == 0 {
            return;
        }
        let mut jobs = std::mem::replace(&mut jobs, Vec::with_capacity(BATCH_MAX));
        for j in &mut jobs {
            j.record.seq = next_seq;
            next_seq += 1;
        }
        // Ids repeated within the batch: the first is stored, the rest are duplicates of it.
        let mut first: HashMap<&str, usize> = HashMap::new();
        let mut unique: Vec<usize> = Vec::with_capacity(jobs.len());
        for (i, j) in jobs.iter().enumerate() {
            if first.insert(&j.record.id, i).is_none() {
                unique.push(i);
            }
        }
        let records: Vec<Record> = unique.iter().map(|&i| jobs[i].record.clone()).collect();
        let new_types: Vec<&str> = records
            .iter()
            .map(|r| r.event_type.as_str())
            .filter(|t| !known_types.contains(*t))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !new_types.is_empty() {
            if retry("record types", &stop, || log.ensure_types(&new_types)).await.is_none() {
                return;
            }
            known_types.extend(new_types.iter().map(|t| (*t).to_owned()));
        }
        let Some(stored_unique) = retry("insert events", &stop, || log.insert_batch(lane, &records)).await else {
            return;
        };
        let mut stored = vec![Stored::Duplicate; jobs.len()];
        for (k, &i) in unique.iter().enumerate() {
            stored[i] = stored_unique[k];
        }
        if out.send(Written { lane, jobs, stored }).await.is_err() {
            return;
        }
    }
}

async fn add_streams(streams: Streams, mut rx: mpsc::Receiver<Written>, stop: CancellationToken) {
    while let Some(w) = rx.recv().await {
        let events: Vec<(i64, &str, &[u8])> = w
            .jobs
            .iter()
            .zip(&w.stored)
            .filter(|(_, s)| **s != Stored::Duplicate)
            .map(|(j, _)| (j.record.seq, j.record.event_type.as_str(), j.record.payload.as_ref()))
            .collect();
        if retry("add to streams", &stop, || streams.add_batch(&w.lane, &events)).await.is_none() {
            return;
        }
        drop(events);
        for (job, stored) in w.jobs.into_iter().zip(w.stored) {
            let published = Published { event_id: job.record.id, status: PublishStatus::Committed, duplicate: stored == Stored::Duplicate };
            // The publisher may have stopped waiting (timeout); the event is stored regardless.
            let _ = job.reply.send(published);
        }
    }
}
