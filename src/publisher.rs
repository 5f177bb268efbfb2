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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chrono::DateTime;
use sidebus_protocol::Fields;
use sidebus_protocol::reply::{PublishStatus, Published};
use sidebus_protocol::request::Durability;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::Backends;
use crate::log::{Record, Stored};
use crate::spool::{Lane, OpenLane, Reader, Spool, SpoolError, SpoolRecord, Writer};

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing that holds these locks can panic half way; a poisoned one still holds valid data.
    m.lock().unwrap_or_else(|p| p.into_inner())
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
                let spawned = std::thread::Builder::new().name(format!("spool-{i}")).spawn(move || append(writer, rx, ctl2, spool2));
                if let Err(e) = spawned {
                    return Err(SpoolError::Io { path: "spool appender thread".into(), source: e });
                }
                senders.push(tx);
            } else {
                ctl.closed.store(true, Ordering::Release);
                drop(writer);
                tracing::info!(lane = %lane.id, backlog = lane.backlog(), "draining a spool lane that is no longer used");
            }
            let (tx, rx) = mpsc::channel(2);
            let extra = i >= writers.max(1);
            tracker.spawn(store(reader, ctl.clone(), backends.clone(), tx, abort.clone()));
            tracker.spawn(add(ctl, backends.clone(), node.clone(), rx, abort.clone(), extra.then(|| spool.clone())));
        }
        Ok(Publisher { lanes: senders.into(), all_lanes: all_lanes.into(), spool, timeout })
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
        let bytes = crate::spool::record_len(submit.event.len());
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

/// The appender of one lane: group commits until every submitter is gone.
fn append(mut writer: Writer, mut rx: mpsc::Receiver<Job>, ctl: Arc<LaneCtl>, spool: Arc<Spool>) {
    let mut jobs: Vec<Job> = Vec::with_capacity(GROUP_MAX);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut reserved = 0;
        let mut seqs = Vec::with_capacity(jobs.len());
        for j in &jobs {
            seqs.push(writer.append(j.submit.time_us, &j.submit.event));
            reserved += j.bytes;
        }
        // Committed publishes are answered by the flusher; they are registered before the
        // commit, so that no flush can pass them unanswered.
        {
            let mut waiting = lock(&ctl.waiting);
            for (j, seq) in jobs.iter_mut().zip(&seqs) {
                if j.submit.durability == Durability::Committed
                    && let Some(reply) = j.reply.take()
                {
                    waiting.insert(*seq, Waiting { event_id: j.submit.event_id.clone(), reply });
                }
            }
        }
        let committed = writer.commit();
        spool.release(reserved);
        match committed {
            Ok(_) => {
                crate::stats::add(&crate::stats::COUNTERS.spooled, jobs.len() as u64);
                for j in jobs.drain(..) {
                    if let Some(reply) = j.reply {
                        let _ = reply.send(Ok(Published { event_id: j.submit.event_id, status: PublishStatus::Spooled, duplicate: false }));
                    }
                }
            }
            Err(e) => {
                tracing::error!(lane = %ctl.lane.id, error = %e, publishes = jobs.len(), "could not write the spool; those publishes were refused");
                let mut waiting = lock(&ctl.waiting);
                for (j, seq) in jobs.drain(..).zip(&seqs) {
                    let reply = j.reply.or_else(|| waiting.remove(seq).map(|w| w.reply));
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(PublishError::Spool));
                    }
                }
            }
        }
    }
    ctl.closed.store(true, Ordering::Release);
    ctl.lane.notify.notify_one();
}

/// A flush batch on its way from the log to Redis.
struct Batch {
    records: Vec<SpoolRecord>,
    types: Vec<String>,
    /// Per record: when it is due (ms since the epoch), 0 for now.
    due: Vec<i64>,
    stored: Vec<Stored>,
}

/// Runs `step` until it succeeds; `None` when `abort` is cancelled first.
async fn retry<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &'static str,
    lane: &Lane,
    abort: &CancellationToken,
    mut step: impl FnMut() -> F,
) -> Option<T> {
    let mut delay = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            r = tokio::time::timeout(STEP_TIMEOUT, step()) => r,
            _ = abort.cancelled() => return None,
        };
        match attempt {
            Ok(Ok(v)) => {
                if failures > 0 {
                    tracing::info!(lane = %lane.id, step = what, failures, "flushing resumed");
                }
                return Some(v);
            }
            Ok(Err(e)) if failures == 0 => {
                tracing::warn!(lane = %lane.id, step = what, error = %e, backlog = lane.backlog(), "flushing the spool stalled; publishes are kept in the spool")
            }
            Ok(Err(e)) => tracing::debug!(lane = %lane.id, step = what, error = %e, failures, "flush step failed again"),
            Err(_) => tracing::warn!(lane = %lane.id, step = what, timeout_s = STEP_TIMEOUT.as_secs(), "flush step timed out; retrying"),
        }
        failures += 1;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = abort.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The log columns of a spooled event (they all derive from the event itself), and when it is
/// due (ms since the epoch; 0: now).
fn record_of(r: &SpoolRecord) -> Option<(Record, i64)> {
    let f = Fields::parse(r.event.clone()).ok()?;
    let due = match f.opt_str("deliverat").ok()? {
        None => 0,
        Some(at) => DateTime::parse_from_rfc3339(at).map(|t| t.timestamp_millis()).unwrap_or(0),
    };
    let record = Record {
        seq: r.seq as i64,
        id: f.str("id").ok()?.to_owned(),
        event_type: f.str("type").ok()?.to_owned(),
        time: DateTime::from_timestamp_micros(r.time_us)?,
        source: f.opt_str("source").ok()?.unwrap_or_default().to_owned(),
        schema_version: f.opt_u64("schemaversion").ok()?.and_then(|v| i32::try_from(v).ok()),
        correlation_id: f.opt_str("correlationid").ok()?.unwrap_or_default().to_owned(),
        partition_key: f.opt_string("partitionkey").ok()?,
        payload: r.event.clone(),
    };
    Some((record, due))
}

/// The first stage of a lane's flusher: reads batches from the spool and stores them in the log.
async fn store(mut reader: Reader, ctl: Arc<LaneCtl>, backends: Arc<Backends>, out: mpsc::Sender<Batch>, abort: CancellationToken) {
    let lane = ctl.lane.clone();
    // Types already recorded in the log by this lane.
    let mut known_types: HashSet<String> = HashSet::new();
    loop {
        // Read before the read: once the appender has stopped, an empty read means done.
        let closed = ctl.closed.load(Ordering::Acquire);
        let read = tokio::task::spawn_blocking(move || {
            let batch = reader.read(BATCH_MAX, BATCH_BYTES);
            (reader, batch)
        })
        .await;
        let (r, batch) = match read {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(lane = %lane.id, error = %e, "spool reader failed; this lane stops flushing until restart");
                return;
            }
        };
        reader = r;
        let records = match batch {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(lane = %lane.id, error = %e, "could not read the spool; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = abort.cancelled() => return,
                }
                continue;
            }
        };
        if records.is_empty() {
            if closed {
                return;
            }
            tokio::select! {
                _ = lane.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = abort.cancelled() => return,
            }
            continue;
        }
        // Ids repeated within the batch: the first is stored, the rest are duplicates of it.
        let mut rows: Vec<Record> = Vec::with_capacity(records.len());
        let mut row_of: Vec<Option<usize>> = Vec::with_capacity(records.len());
        let mut types: Vec<String> = Vec::with_capacity(records.len());
        let mut due: Vec<i64> = Vec::with_capacity(records.len());
        let mut seen: HashSet<String> = HashSet::with_capacity(records.len());
        for r in &records {
            match record_of(r) {
                Some((row, at)) => {
                    types.push(row.event_type.clone());
                    due.push(at);
                    if seen.insert(row.id.clone()) {
                        row_of.push(Some(rows.len()));
                        rows.push(row);
                    } else {
                        row_of.push(None);
                    }
                }
                None => {
                    // Only the daemon writes the spool, so this is a bug or a disk fault that
                    // kept its checksum; it cannot be stored, and must not block the lane.
                    tracing::error!(lane = %lane.id, seq = r.seq, "a spooled event cannot be read; it is skipped");
                    types.push(String::new());
                    due.push(0);
                    row_of.push(None);
                }
            }
        }
        let log = tokio::select! {
            log = backends.log.get() => log,
            _ = abort.cancelled() => return,
        };
        let new_types: Vec<&str> =
            rows.iter().map(|r| r.event_type.as_str()).filter(|t| !known_types.contains(*t)).collect::<HashSet<_>>().into_iter().collect();
        if !new_types.is_empty() {
            if retry("record types", &lane, &abort, || log.ensure_types(&new_types)).await.is_none() {
                return;
            }
            known_types.extend(new_types.iter().map(|t| (*t).to_owned()));
        }
        let Some(stored_rows) = retry("store in the log", &lane, &abort, || log.insert_batch(lane.id, &rows)).await else { return };
        let stored = row_of.iter().map(|r| r.map_or(Stored::Duplicate, |i| stored_rows[i])).collect();
        if out.send(Batch { records, types, due, stored }).await.is_err() {
            return;
        }
    }
}

/// Records in the log how far a lane has added its events to Redis: every couple of seconds
/// while it flushes, soon after it goes idle, and at once when Redis stops answering (see
/// `recovery.rs`).
struct LaneReporter {
    node: String,
    reported: i64,
    at: Option<tokio::time::Instant>,
}

/// How often a lane's position is recorded while it flushes.
const LANE_REPORT_INTERVAL: Duration = Duration::from_secs(2);
/// How soon a lane that went idle records its position.
pub const IDLE_REPORT: Duration = Duration::from_millis(200);

impl LaneReporter {
    async fn maybe_report(&mut self, backends: &Backends, lane: &Lane, added: i64) {
        if self.at.is_none_or(|t| t.elapsed() >= LANE_REPORT_INTERVAL) {
            self.report(backends, lane, added).await;
        }
    }

    async fn report(&mut self, backends: &Backends, lane: &Lane, added: i64) {
        let Some(log) = backends.log.now() else { return };
        if added <= self.reported && self.at.is_some() {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(5), log.set_lane_added(lane.id, &self.node, added)).await {
            Ok(Ok(())) => {
                self.reported = added;
                self.at = Some(tokio::time::Instant::now());
            }
            Ok(Err(e)) => tracing::debug!(lane = %lane.id, error = %e, "could not record the lane's position"),
            Err(_) => tracing::debug!(lane = %lane.id, "recording the lane's position timed out"),
        }
    }
}

/// The second stage of a lane's flusher: adds a stored batch to the streams, records the
/// cursor, and answers the batch's `committed` publishes. `remove` is set for a lane no longer
/// used: it is deleted once drained.
async fn add(
    ctl: Arc<LaneCtl>,
    backends: Arc<Backends>,
    node: String,
    mut rx: mpsc::Receiver<Batch>,
    abort: CancellationToken,
    remove: Option<Arc<Spool>>,
) {
    let lane = ctl.lane.clone();
    let mut reporter = LaneReporter { node, reported: 0, at: None };
    reporter.report(&backends, &lane, lane.flushed_seq() as i64).await;
    loop {
        // A lane that went idle records its position soon, so that a recovery after Redis
        // lost its data knows what it had added (see recovery.rs).
        let batch = if reporter.reported < lane.flushed_seq() as i64 {
            tokio::select! {
                b = rx.recv() => b,
                _ = tokio::time::sleep(IDLE_REPORT) => {
                    reporter.report(&backends, &lane, lane.flushed_seq() as i64).await;
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(batch) = batch else { break };
        let events: Vec<(i64, &str, i64, &[u8])> = batch
            .records
            .iter()
            .zip(&batch.types)
            .zip(&batch.due)
            .zip(&batch.stored)
            .filter(|(_, s)| **s != Stored::Duplicate)
            .map(|(((r, t), due), _)| (r.seq as i64, t.as_str(), *due, r.event.as_ref()))
            .collect();
        let streams = tokio::select! {
            s = backends.streams.get() => s,
            _ = abort.cancelled() => return,
        };
        if let Err(e) = streams.add_batch(&lane.id, &events).await {
            // Before waiting for Redis: record how far this lane got, so that a recovery after
            // Redis lost its data leaves what is not added yet to this flusher.
            tracing::debug!(lane = %lane.id, error = %e, "adding to the streams failed");
            reporter.report(&backends, &lane, lane.flushed_seq() as i64).await;
            if retry("add to the streams", &lane, &abort, || streams.add_batch(&lane.id, &events)).await.is_none() {
                return;
            }
        }
        drop(events);
        let Some(last) = batch.records.last().map(|r| r.seq) else { continue };
        let bytes: u64 = batch.records.iter().map(SpoolRecord::disk_len).sum();
        let n = batch.records.len() as u64;
        crate::stats::add(&crate::stats::COUNTERS.flushed, n);
        let l = lane.clone();
        match tokio::task::spawn_blocking(move || l.mark_flushed(last, bytes, n, None)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(lane = %lane.id, error = %e, "could not record the spool cursor; a restart will flush these events again (harmlessly)")
            }
            Err(e) => tracing::warn!(lane = %lane.id, error = %e, "could not record the spool cursor"),
        }
        reporter.maybe_report(&backends, &lane, last as i64).await;
        let answered: BTreeMap<u64, Waiting> = {
            let mut waiting = lock(&ctl.waiting);
            let rest = waiting.split_off(&(last + 1));
            std::mem::replace(&mut *waiting, rest)
        };
        if !answered.is_empty() {
            let dup: HashMap<u64, bool> = batch.records.iter().zip(&batch.stored).map(|(r, s)| (r.seq, *s == Stored::Duplicate)).collect();
            for (seq, w) in answered {
                let duplicate = dup.get(&seq).copied().unwrap_or(false);
                let _ = w.reply.send(Ok(Published { event_id: w.event_id, status: PublishStatus::Committed, duplicate }));
            }
        }
    }
    if let Some(spool) = remove
        && lane.backlog() == 0
    {
        match spool.remove_lane(&lane) {
            Ok(()) => tracing::info!(lane = %lane.id, "drained and removed a spool lane that is no longer used"),
            Err(e) => tracing::warn!(lane = %lane.id, error = %e, "could not remove a drained spool lane"),
        }
    }
}
