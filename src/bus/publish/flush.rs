//! A lane's flusher: two tasks joined by a short queue, so that the Postgres write of batch n+1
//! overlaps the Redis add of batch n. `store` reads the next batch back from the spool and stores
//! it in the log (binary COPY, or the duplicate-checking statement); `add` adds what is new to
//! the streams (following the Redis data set it goes to: `Adder`), records the spool cursor, and
//! answers the batch's `committed` publishes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::DateTime;
use sidebus_protocol::Fields;
use sidebus_protocol::reply::{PublishStatus, Published};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::reports::{IDLE_REPORT, Reports};
use super::{BATCH_BYTES, BATCH_MAX, LaneCtl, STEP_TIMEOUT, Waiting};
use crate::backend::Backends;
use crate::backend::pg::{Record, Stored};
use crate::backend::redis::LaneEvent;
use crate::backend::spool::{Lane, Reader, Spool, SpoolRecord};
use crate::lock::lock;

/// Starts a lane's flusher: its `store` and `add` tasks, joined by a queue of two batches.
/// `remove` is set for a lane no longer used: it is deleted once drained.
pub(super) fn spawn(
    reader: Reader,
    ctl: Arc<LaneCtl>,
    backends: Arc<Backends>,
    node: String,
    tracker: &TaskTracker,
    abort: CancellationToken,
    remove: Option<Arc<Spool>>,
) {
    let (tx, rx) = mpsc::channel(2);
    let reports = Arc::new(Reports::new(ctl.lane.id, node));
    tracker.spawn(store(reader, ctl.clone(), backends.clone(), reports.clone(), tx, abort.clone()));
    tracker.spawn(add(ctl, backends, reports, rx, abort, remove));
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
pub fn record_of(r: &SpoolRecord) -> Option<(Record, i64)> {
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

/// A batch read from the spool, as the log takes it, with per record its type, id and due
/// time (empty for a record that cannot be read).
struct Prepared {
    /// The rows to store: ids repeated within the batch are stored once, the first time.
    rows: Vec<Record>,
    /// Per record, its row (`None`: a repeat, or unreadable).
    row_of: Vec<Option<usize>>,
    types: Vec<String>,
    ids: Vec<String>,
    due: Vec<i64>,
}

fn prepare(lane: uuid::Uuid, records: &[SpoolRecord]) -> Prepared {
    let n = records.len();
    let mut p = Prepared {
        rows: Vec::with_capacity(n),
        row_of: Vec::with_capacity(n),
        types: Vec::with_capacity(n),
        ids: Vec::with_capacity(n),
        due: Vec::with_capacity(n),
    };
    let mut seen: HashSet<String> = HashSet::with_capacity(n);
    for r in records {
        match record_of(r) {
            Some((row, at)) => {
                p.types.push(row.event_type.clone());
                p.ids.push(row.id.clone());
                p.due.push(at);
                if seen.insert(row.id.clone()) {
                    p.row_of.push(Some(p.rows.len()));
                    p.rows.push(row);
                } else {
                    p.row_of.push(None);
                }
            }
            None => {
                // Only the daemon writes the spool, so this is a bug or a disk fault that
                // kept its checksum; it cannot be stored, and must not block the lane.
                tracing::error!(%lane, seq = r.seq, "a spooled event cannot be read; it is skipped");
                p.types.push(String::new());
                p.ids.push(String::new());
                p.due.push(0);
                p.row_of.push(None);
            }
        }
    }
    p
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
        let Prepared { rows, row_of, types, ids, due } = prepare(lane.id, &records);
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

/// Adds a lane's batches to the streams, following the Redis data set (epoch) they go to.
///
/// When Redis lost its data, the recovery gives every group again what the log holds up to its
/// end at the recovery's start (see `bus::recovery`), so what a batch holds of that need not be
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
/// recovering daemon waits for flushers to meet a Redis without epoch (see `bus::recovery`).
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
