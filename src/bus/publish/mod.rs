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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

use uuid::Uuid;

use crate::backend::Backends;
use crate::backend::pg::{EventLog, LANE_HEARTBEAT, LANE_REPORT_FRESH, Record, Stored};
use crate::backend::spool::{Lane, OpenLane, Reader, Spool, SpoolError, SpoolRecord, Writer};
use crate::backend::redis::LaneEvent;

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
            let reports = Arc::new(Reports::new(lane.id, node.clone()));
            tracker.spawn(store(reader, ctl.clone(), backends.clone(), reports.clone(), tx, abort.clone()));
            tracker.spawn(add(ctl, backends.clone(), reports, rx, abort.clone(), extra.then(|| spool.clone())));
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
                crate::bus::counters::add(&crate::bus::counters::COUNTERS.spooled, jobs.len() as u64);
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
    /// Its number in the lane since the daemon started (1, 2, …).
    k: u64,
    records: Vec<SpoolRecord>,
    types: Vec<String>,
    /// Per record: its event id (empty for one that cannot be read).
    ids: Vec<String>,
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
    let deliver_at = match f.opt_str("deliverat").ok()? {
        None => None,
        Some(at) => DateTime::parse_from_rfc3339(at).ok().map(|t| t.with_timezone(&chrono::Utc)),
    };
    let due = deliver_at.map_or(0, |t| t.timestamp_millis());
    let record = Record {
        seq: r.seq as i64,
        id: f.str("id").ok()?.to_owned(),
        event_type: f.str("type").ok()?.to_owned(),
        time: DateTime::from_timestamp_micros(r.time_us)?,
        source: f.opt_str("source").ok()?.unwrap_or_default().to_owned(),
        schema_version: f.opt_u64("schemaversion").ok()?.and_then(|v| i32::try_from(v).ok()),
        correlation_id: f.opt_str("correlationid").ok()?.unwrap_or_default().to_owned(),
        partition_key: f.opt_string("partitionkey").ok()?,
        deliver_at,
        payload: r.event.clone(),
    };
    Some((record, due))
}

/// The first stage of a lane's flusher: reads batches from the spool and stores them in the log.
async fn store(
    mut reader: Reader,
    ctl: Arc<LaneCtl>,
    backends: Arc<Backends>,
    reports: Arc<Reports>,
    out: mpsc::Sender<Batch>,
    abort: CancellationToken,
) {
    let lane = ctl.lane.clone();
    let mut k = 0;
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
        let mut ids: Vec<String> = Vec::with_capacity(records.len());
        let mut due: Vec<i64> = Vec::with_capacity(records.len());
        let mut seen: HashSet<String> = HashSet::with_capacity(records.len());
        for r in &records {
            match record_of(r) {
                Some((row, at)) => {
                    types.push(row.event_type.clone());
                    ids.push(row.id.clone());
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
                    ids.push(String::new());
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
        // Counted in the pipeline (and the lane's report fresh) before any log position is
        // handed to this batch: see `Reports`.
        if !reports.begin_store(&log, &abort).await {
            return;
        }
        let Some(stored_rows) = retry("store in the log", &lane, &abort, || log.insert_batch(lane.id, &rows)).await else { return };
        let stored = row_of.iter().map(|r| r.map_or(Stored::Duplicate, |i| stored_rows[i])).collect();
        k += 1;
        reports.committed.store(k, Ordering::Release);
        if out.send(Batch { k, records, types, ids, due, stored }).await.is_err() {
            return;
        }
    }
}

/// A lane's reports to the log (see `recovery.rs`): the bound below which nothing the lane has
/// not added to Redis can be. The lane registers before it stores anything, reports the last
/// event it added every [`REPORT_INTERVAL`] while it flushes, reports itself idle (bound: the
/// log's end) soon after its pipeline empties, and beats every `LANE_HEARTBEAT` meanwhile. It
/// neither stores nor adds while its last report is older than `LANE_REPORT_FRESH`: a lane the
/// checkpoints ignore (silent) must not put anything where they would miss it.
///
/// The pipeline count and the idle report share one lock: a store takes a log position only
/// after counting itself in, so an idle report (taken under the lock with nothing counted) is
/// never overtaken by a position it did not bound.
struct Reports {
    lane: Uuid,
    node: String,
    state: tokio::sync::Mutex<ReportState>,
    /// The number of the last batch stored (see `Batch::k`).
    committed: AtomicU64,
}

struct ReportState {
    /// Batches stored or being stored and not yet added.
    in_pipeline: usize,
    /// The last event added, not yet reported.
    last_added: Option<String>,
    /// When the last report was recorded (none: not registered yet).
    reported_at: Option<tokio::time::Instant>,
    /// The last report said idle, and nothing happened since.
    idle_reported: bool,
}

/// How often a flushing lane reports the last event it added: how far its bound may lag.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How soon a lane whose pipeline emptied reports itself idle (a lane busy again reports before
/// it stores, one more round trip, so not at once).
pub const IDLE_REPORT: Duration = Duration::from_millis(500);

impl Reports {
    fn new(lane: Uuid, node: String) -> Reports {
        Reports {
            lane,
            node,
            state: tokio::sync::Mutex::new(ReportState { in_pipeline: 0, last_added: None, reported_at: None, idle_reported: false }),
            committed: AtomicU64::new(0),
        }
    }

    fn fresh(st: &ReportState) -> bool {
        st.reported_at.is_some_and(|t| t.elapsed() < LANE_REPORT_FRESH)
    }

    /// Registers the lane or reports it, retrying until the log answers (`false`: aborted).
    async fn report_now(&self, st: &mut ReportState, log: &EventLog, abort: &CancellationToken) -> bool {
        let mut pause = Duration::from_millis(100);
        loop {
            let idle = st.in_pipeline == 0;
            let r = if st.reported_at.is_none() {
                log.register_lane(self.lane, &self.node).await
            } else {
                log.report_lane(self.lane, &self.node, st.last_added.as_deref(), idle).await
            };
            match r {
                Ok(()) => {
                    // A registration says busy: an idle lane reports idle afterwards.
                    st.idle_reported = idle && st.reported_at.is_some();
                    st.reported_at = Some(tokio::time::Instant::now());
                    st.last_added = None;
                    return true;
                }
                Err(e) => tracing::debug!(lane = %self.lane, error = %e, "could not report the lane; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = abort.cancelled() => return false,
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Before a batch is stored: counts it in the pipeline, after reporting (busy) when the
    /// last report is not fresh or said idle. `false`: aborted.
    async fn begin_store(&self, log: &EventLog, abort: &CancellationToken) -> bool {
        let mut st = self.state.lock().await;
        st.in_pipeline += 1;
        if (!Self::fresh(&st) || st.idle_reported) && !self.report_now(&mut st, log, abort).await {
            return false;
        }
        true
    }

    /// Before a batch is added to Redis: reports when the last report is not fresh. `false`:
    /// aborted.
    async fn before_add(&self, backends: &Backends, abort: &CancellationToken) -> bool {
        let mut st = self.state.lock().await;
        if Self::fresh(&st) {
            return true;
        }
        let log = tokio::select! {
            log = backends.log.get() => log,
            _ = abort.cancelled() => return false,
        };
        self.report_now(&mut st, &log, abort).await
    }

    /// After a batch was added: `last` is its last event added (if any). Reports when the
    /// interval has passed.
    async fn added(&self, backends: &Backends, last: Option<String>) {
        let mut st = self.state.lock().await;
        st.in_pipeline = st.in_pipeline.saturating_sub(1);
        if last.is_some() {
            st.last_added = last;
        }
        if st.reported_at.is_none_or(|t| t.elapsed() >= REPORT_INTERVAL) {
            self.report_once(&mut st, backends).await;
        }
    }

    /// A report now if the log answers within a few seconds (a heartbeat, or the idle report).
    async fn tick(&self, backends: &Backends) {
        let mut st = self.state.lock().await;
        let idle_due = st.in_pipeline == 0 && !st.idle_reported;
        if idle_due || st.reported_at.is_none_or(|t| t.elapsed() >= LANE_HEARTBEAT) {
            self.report_once(&mut st, backends).await;
        }
    }

    async fn report_once(&self, st: &mut ReportState, backends: &Backends) {
        let Some(log) = backends.log.now() else { return };
        let idle = st.in_pipeline == 0;
        let r = if st.reported_at.is_none() {
            log.register_lane(self.lane, &self.node).await
        } else {
            tokio::time::timeout(Duration::from_secs(5), log.report_lane(self.lane, &self.node, st.last_added.as_deref(), idle))
                .await
                .unwrap_or_else(|_| Err(crate::backend::pg::LogError::Timeout("report lane")))
        };
        match r {
            Ok(()) => {
                st.idle_reported = idle && st.reported_at.is_some();
                st.reported_at = Some(tokio::time::Instant::now());
                st.last_added = None;
            }
            Err(e) => tracing::debug!(lane = %self.lane, error = %e, "could not report the lane"),
        }
    }
}

/// Adds a lane's batches to the streams, following the Redis data set (epoch) they go to.
///
/// When Redis lost its data, the recovery gives every group again what the log holds up to its
/// end at the recovery's start (see `recovery.rs`), so what a batch holds of that need not be
/// added again by its flusher (it would reach the groups twice). That is only safe for a batch
/// the recovery's replays can see: one committed to the log before the recovery set its epoch.
/// A batch is known to be one when it was stored before an add of this lane met a Redis
/// without epoch (`proof`): any epoch seen after that was set after it.
struct Adder {
    lane: Arc<Lane>,
    /// The epoch of the last add (none before the first).
    epoch: Option<String>,
    /// Batches numbered up to this one were stored before an add met a Redis without epoch.
    proof: u64,
    /// Batches numbered up to `.0` leave what is at or before log position `.1` to the
    /// recovery of the epoch they go to.
    covered: Option<(u64, i64)>,
}

/// Longest pause between tries at adding a batch: short, so that a lane tries while a
/// recovering daemon waits for flushers to meet a Redis without epoch (see `recovery.rs`).
pub const ADD_PAUSE_MAX: Duration = Duration::from_millis(300);

impl Adder {
    fn new(lane: Arc<Lane>) -> Adder {
        Adder { lane, epoch: None, proof: 0, covered: None }
    }

    /// Adds one batch (number `k`), retrying until it is added; `false` when aborted.
    async fn add(
        &mut self,
        streams: &crate::backend::redis::Streams,
        backends: &Backends,
        reports: &Reports,
        k: u64,
        mut events: Vec<LaneEvent<'_>>,
        abort: &CancellationToken,
    ) -> bool {
        let mut pause = Duration::from_millis(50);
        let mut failures = 0u32;
        let mut filtered_by = None;
        loop {
            if abort.is_cancelled() || !reports.before_add(backends, abort).await {
                return false;
            }
            if self.epoch.is_none() && self.proof > 0 {
                // No add yet to compare with: look at the epoch first.
                if let Ok(Some(epoch)) = streams.epoch().await {
                    self.follow(backends, &epoch).await;
                }
            }
            if let Some((upto, end)) = self.covered
                && k <= upto
                && filtered_by != Some(end)
            {
                events = self.not_recovered(backends, end, events).await;
                filtered_by = Some(end);
            }
            let stored = reports.committed.load(Ordering::Acquire);
            let result = tokio::select! {
                r = tokio::time::timeout(STEP_TIMEOUT, streams.add_batch(&self.lane.id, &events, self.epoch.as_deref())) => r,
                _ = abort.cancelled() => return false,
            };
            let e = match result {
                Ok(Ok((_, epoch))) => {
                    if failures > 0 {
                        tracing::info!(lane = %self.lane.id, failures, "flushing resumed");
                    }
                    self.epoch = Some(epoch);
                    return true;
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    tracing::warn!(lane = %self.lane.id, timeout_s = STEP_TIMEOUT.as_secs(), "adding to the streams timed out; retrying");
                    failures += 1;
                    continue;
                }
            };
            if let Some(epoch) = e.epoch_changed() {
                let epoch = epoch.to_owned();
                tracing::debug!(lane = %self.lane.id, "Redis is another data set than the lane last added to");
                self.follow(backends, &epoch).await;
                continue;
            }
            if e.is_noepoch() {
                self.proof = self.proof.max(stored);
            }
            if failures == 0 {
                tracing::warn!(lane = %self.lane.id, error = %e, backlog = self.lane.backlog(), "flushing the spool stalled; publishes are kept in the spool");
            } else {
                tracing::debug!(lane = %self.lane.id, error = %e, failures, "adding to the streams failed again");
            }
            failures += 1;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = abort.cancelled() => return false,
            }
            pause = (pause * 2).min(ADD_PAUSE_MAX);
        }
    }

    /// Redis is now the data set `epoch`: from here on, add to it, and if batches were proven
    /// stored before it was set, leave to its recovery what it gives the groups.
    async fn follow(&mut self, backends: &Backends, epoch: &str) {
        self.epoch = Some(epoch.to_owned());
        if self.proof == 0 {
            return;
        }
        let end = match backends.log.now() {
            Some(log) => log.recovery_end(epoch).await.ok().flatten(),
            None => None,
        };
        // Without the log's answer, nothing is left to the recovery (adding twice is safe).
        self.covered = end.filter(|e| *e > 0).map(|e| (self.proof, e));
    }

    /// Of `events`, those after log position `end` (what the recovery does not give the
    /// groups). All of them when the log cannot say.
    async fn not_recovered<'a>(&self, backends: &Backends, end: i64, events: Vec<LaneEvent<'a>>) -> Vec<LaneEvent<'a>> {
        let Some(log) = backends.log.now() else { return events };
        let ids: Vec<String> = events.iter().map(|e| e.id.to_owned()).collect();
        let Ok(positions) = log.positions_of(&ids).await else { return events };
        let before = events.len();
        let kept: Vec<LaneEvent<'a>> = events.into_iter().filter(|e| positions.get(e.id).is_none_or(|(seq, _)| *seq > end)).collect();
        if kept.len() < before {
            tracing::info!(lane = %self.lane.id, given_by_recovery = before - kept.len(), "events stored before Redis lost its data are given to the groups by the recovery; not adding them again");
        }
        kept
    }
}

/// The second stage of a lane's flusher: adds a stored batch to the streams, records the
/// cursor, and answers the batch's `committed` publishes. `remove` is set for a lane no longer
/// used: it is deleted once drained.
async fn add(
    ctl: Arc<LaneCtl>,
    backends: Arc<Backends>,
    reports: Arc<Reports>,
    mut rx: mpsc::Receiver<Batch>,
    abort: CancellationToken,
    remove: Option<Arc<Spool>>,
) {
    let lane = ctl.lane.clone();
    let mut adder = Adder::new(lane.clone());
    loop {
        let batch = tokio::select! {
            b = rx.recv() => b,
            _ = tokio::time::sleep(IDLE_REPORT) => {
                reports.tick(&backends).await;
                continue;
            }
        };
        let Some(batch) = batch else { break };
        let events: Vec<LaneEvent<'_>> = batch
            .records
            .iter()
            .zip(&batch.types)
            .zip(&batch.ids)
            .zip(&batch.due)
            .zip(&batch.stored)
            .filter(|(_, s)| **s != Stored::Duplicate)
            .map(|((((r, t), id), due), _)| LaneEvent { seq: r.seq as i64, event_type: t, due_ms: *due, id, event: r.event.as_ref() })
            .collect();
        let last_added = events.last().map(|e| e.id.to_owned());
        let streams = tokio::select! {
            s = backends.streams.get() => s,
            _ = abort.cancelled() => return,
        };
        if !adder.add(&streams, &backends, &reports, batch.k, events, &abort).await {
            return;
        }
        reports.added(&backends, last_added).await;
        let Some(last) = batch.records.last().map(|r| r.seq) else { continue };
        let bytes: u64 = batch.records.iter().map(SpoolRecord::disk_len).sum();
        let n = batch.records.len() as u64;
        crate::bus::counters::add(&crate::bus::counters::COUNTERS.flushed, n);
        let l = lane.clone();
        match tokio::task::spawn_blocking(move || l.mark_flushed(last, bytes, n, None)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(lane = %lane.id, error = %e, "could not record the spool cursor; a restart will flush these events again (harmlessly)")
            }
            Err(e) => tracing::warn!(lane = %lane.id, error = %e, "could not record the spool cursor"),
        }
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
