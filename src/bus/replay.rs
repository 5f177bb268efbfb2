//! Replays: events of a type read back from the Postgres log, in log order, marked
//! `replayed: true`, and added to one group's replay lane, which its consumers read beside the
//! live stream (other groups see nothing).
//!
//! A replay is a row of the log's `replays` table. Any daemon may run it: each looks for a
//! running replay nobody holds (or whose holder's lease expired) and takes it, so a replay
//! resumes after a restart from its cursor (the last log position it added). It reads the log
//! a page at a time and keeps at most [`WINDOW`] entries in the lane not yet given to the
//! group, so memory stays bounded however long the replay. Adding a page is idempotent (the
//! replay's high-water mark), so a page added twice after a crash is delivered once.
//!
//! A recovery's replay (see `bus::recovery`) first walks the delayed events due since its
//! group's checkpoint, in due order: those not due when the recovery began go back on their
//! type's schedule (as the flusher put them there, so once however many groups' replays do
//! it), those due and before the replay's log range go to the group. Then it walks its log
//! range like any replay. Each part is indexed in the replay stream under a lane of its own
//! (`checkpoint::RECOVERY_DUE_LANE`, `checkpoint::RECOVERY_LANE`), so the group's checkpoint
//! holds back what it has not acknowledged of either.

use std::time::Duration;

use bytes::Bytes;
use sidebus_protocol::Event;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::NoGroup;
use crate::backend::pg::{DueWalk, EventLog, LogError, Replay};
use crate::backend::redis::{GroupKeys, Streams, StreamsError};
use crate::bus::checkpoint::{RECOVERY_DUE_LANE, RECOVERY_LANE, REQUEST_LANE};

/// Events read from the log per page.
const PAGE: i64 = 1000;
/// Most replayed entries waiting in a group's lane.
pub const WINDOW: u64 = 4000;
/// How long a full window waits before looking again: short, so a fast consumer is never
/// starved (the window drains in a few milliseconds at live delivery rates).
const WAIT: Duration = Duration::from_millis(10);
/// How often a waiting replay renews its lease and looks for a cancel.
const RENEW_WHILE_WAITING: Duration = Duration::from_secs(1);
/// How long a daemon holds a replay without renewing.
const LEASE: Duration = Duration::from_secs(30);
/// How often idle daemons look for replays to run.
const POLL: Duration = Duration::from_secs(1);
/// Replays one daemon runs at once.
const MAX_RUNNING: usize = 4;

/// Wakes this daemon's replayer at once (a replay was just asked for here) instead of at its
/// next poll.
pub fn wake() -> &'static tokio::sync::Notify {
    static WAKE: std::sync::OnceLock<tokio::sync::Notify> = std::sync::OnceLock::new();
    WAKE.get_or_init(tokio::sync::Notify::new)
}

/// Why an operator's replay request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReplayRequestError {
    /// The group is unknown.
    #[error(transparent)]
    NoGroup(#[from] NoGroup),
    /// `replay_cancel` of a replay that has ended.
    #[error("replay {0} has ended")]
    Ended(Uuid),
    /// `replay_cancel` of a replay that never existed.
    #[error("replay {0} does not exist")]
    Unknown(Uuid),
    /// The log could not be reached.
    #[error("the log is unreachable now: {0}")]
    Log(#[from] LogError),
}

/// `replay`: starts a replay of the events of `event_type` published in `[since, until)` to
/// `group`, up to the log's end now; how many events it covers and its id (none when the range
/// is empty: nothing is started).
pub async fn start(
    log: &EventLog,
    event_type: &str,
    group: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<(u64, Option<Uuid>), ReplayRequestError> {
    if !log.group_exists(event_type, group).await? {
        return Err(NoGroup { event_type: event_type.to_owned(), group: group.to_owned() }.into());
    }
    let (count, replay) = log.start_replay(event_type, group, since, until).await?;
    if let Some(replay) = replay {
        tracing::info!(r#type = %event_type, group = %group, count, %replay, "replay requested");
        wake().notify_one();
    }
    Ok((count.max(0) as u64, replay))
}

/// `replay_cancel`: stops a running replay.
pub async fn cancel(log: &EventLog, id: Uuid) -> Result<(), ReplayRequestError> {
    if log.cancel_replay(id).await? {
        tracing::info!(replay = %id, "replay cancelled");
        return Ok(());
    }
    Err(if log.replay_exists(id).await? { ReplayRequestError::Ended(id) } else { ReplayRequestError::Unknown(id) })
}

/// Why a replay step failed (it is tried again).
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Streams(#[from] StreamsError),
}

/// Looks for replays to run until `stop`.
pub async fn run(log: EventLog, streams: Streams, owner: String, stop: CancellationToken) {
    let running = TaskTracker::new();
    loop {
        if running.len() < MAX_RUNNING {
            match log.claim_replay(&owner, LEASE).await {
                Ok(Some(r)) => {
                    let runner = Runner::new(log.clone(), streams.clone(), owner.clone(), r);
                    running.spawn(runner.run(stop.clone()));
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "could not look for replays"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = wake().notified() => {}
            _ = stop.cancelled() => break,
        }
    }
    running.close();
    running.wait().await;
}

enum Step {
    More,
    Wait,
    Stop,
    Done,
}

/// One replay being run by this daemon.
struct Runner {
    log: EventLog,
    streams: Streams,
    owner: String,
    r: Replay,
    keys: GroupKeys,
    cursor: i64,
    added: i64,
    walk: DueWalk,
    renewed: tokio::time::Instant,
    ready: bool,
    /// The page after the cursor, read while the previous page was added: (the cursor it was
    /// read from, its rows).
    ahead: Option<(i64, Page)>,
}

/// A page of the log: each row's `seq`, and its id and payload when it is in the range.
type Page = Vec<(i64, Option<(String, Vec<u8>)>)>;

impl Runner {
    fn new(log: EventLog, streams: Streams, owner: String, r: Replay) -> Runner {
        let keys = streams.replay_keys(&r.event_type, &r.group_name);
        let walk = DueWalk { at: r.due_cursor, seq: r.due_cursor_seq, walked: r.due_walked, done: r.due_done };
        Runner {
            cursor: r.cursor,
            added: r.added,
            walk,
            log,
            streams,
            owner,
            keys,
            renewed: tokio::time::Instant::now(),
            ready: false,
            ahead: None,
            r,
        }
    }

    fn lane(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.r.id.simple())
    }

    async fn run(mut self, stop: CancellationToken) {
        let r = &self.r;
        tracing::info!(replay = %r.id, r#type = %r.event_type, group = %r.group_name, cursor = r.cursor, reason = if r.recovery.is_some() { "recovery" } else { "request" }, "replay running");
        let mut failures = 0u32;
        loop {
            if stop.is_cancelled() {
                // Given up, so it resumes at once where it stopped (after a crash instead, the
                // lease runs out first).
                if let Err(e) = self.log.release_replay(self.r.id, &self.owner).await {
                    tracing::debug!(replay = %self.r.id, error = %e, "could not release a replay; it resumes when its lease runs out");
                }
                return;
            }
            match self.step().await {
                Ok(Step::More) => failures = 0,
                Ok(Step::Wait) => {
                    failures = 0;
                    tokio::select! {
                        _ = tokio::time::sleep(WAIT) => {}
                        _ = stop.cancelled() => continue,
                    }
                }
                Ok(Step::Stop) => {
                    // A group deleted while a page was being added: the page brought its
                    // replay lane back, so the lane goes again (the delete is idempotent).
                    if let Ok(false) = self.log.group_exists(&self.r.event_type, &self.r.group_name).await
                        && let Err(e) = self.streams.delete_group(&self.r.event_type, &self.r.group_name).await
                    {
                        tracing::warn!(replay = %self.r.id, error = %e, "could not remove the replay lane of a deleted group");
                    }
                    tracing::info!(replay = %self.r.id, "replay cancelled, superseded or taken over");
                    return;
                }
                Ok(Step::Done) => {
                    if let Err(e) = self.log.finish_replay(self.r.id, "done", None).await {
                        tracing::warn!(replay = %self.r.id, error = %e, "could not record the end of a replay; it will be checked again");
                    }
                    tracing::info!(replay = %self.r.id, r#type = %self.r.event_type, group = %self.r.group_name, added = self.added, "replay done");
                    return;
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::warn!(replay = %self.r.id, error = %e, "replay stalled; retrying");
                    }
                    failures += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200) * failures.min(10)) => {}
                        _ = stop.cancelled() => continue,
                    }
                }
            }
        }
    }

    /// One page of the replay, or a wait while the group's lane is full.
    async fn step(&mut self) -> Result<Step, ReplayError> {
        if !self.ready {
            // The group and its replay lane exist before anything is added.
            let group = self.streams.group_keys(&self.r.event_type, &self.r.group_name);
            self.streams.ensure_group(&group, true).await?;
            match self.log.analyze_if_stale().await {
                Ok(Some(changed)) => {
                    tracing::info!(replay = %self.r.id, changed, "analysed the event log before a replay (its statistics were stale)")
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(replay = %self.r.id, error = %e, "could not analyse the event log; pages may be slow"),
            }
            self.ready = true;
        }
        if self.streams.replay_lag(&self.keys).await? >= WINDOW {
            // Renew the lease (and notice a cancel) now and then while the group catches up.
            if self.renewed.elapsed() < RENEW_WHILE_WAITING {
                return Ok(Step::Wait);
            }
            self.renewed = tokio::time::Instant::now();
            let held = self.log.advance_replay(self.r.id, &self.owner, self.cursor, self.added, LEASE).await?;
            return Ok(if held { Step::Wait } else { Step::Stop });
        }
        if !self.walk.done {
            return self.due_step().await;
        }
        let page = match self.ahead.take() {
            Some((from, page)) if from == self.cursor => page,
            _ => self.log.replay_page(&self.r, self.cursor, PAGE).await?,
        };
        let Some(last) = page.last().map(|p| p.0) else { return Ok(Step::Done) };
        // Rows outside the range (time, or delayed and not due when a recovery began) only move
        // the cursor.
        let marked: Vec<(i64, String, Vec<u8>)> = page
            .into_iter()
            .filter_map(|(seq, row)| {
                let (id, payload) = row?;
                Event::mark_replayed(Bytes::from(payload)).ok().map(|e| (seq, id, e))
            })
            .collect();
        let events: Vec<(i64, &str, &[u8])> = marked.iter().map(|(s, id, e)| (*s, id.as_str(), e.as_slice())).collect();
        let added = self.added + marked.len() as i64;
        // The page is added and the cursor recorded while the next page is read (from this
        // page's last row, known now): the read costs a Postgres round trip the add and the
        // cursor no longer wait for. A next page whose read fails is read again next time.
        let lane = self.lane(if self.r.recovery.is_some() { RECOVERY_LANE } else { REQUEST_LANE });
        let (log, streams, r, owner, keys) = (&self.log, &self.streams, &self.r, &self.owner, &self.keys);
        let store = async {
            if !events.is_empty() {
                let n = streams.add_replayed(&r.id.simple().to_string(), &lane, keys, &events).await?;
                if r.recovery.is_some() {
                    crate::bus::counters::add(&crate::bus::counters::COUNTERS.recovered, n);
                }
            }
            Ok::<bool, ReplayError>(log.advance_replay(r.id, owner, last, added, LEASE).await?)
        };
        let (held, next) = tokio::join!(store, log.replay_page(r, last, PAGE));
        let held = held?;
        self.cursor = last;
        self.added = added;
        self.ahead = next.ok().map(|page| (last, page));
        Ok(if held { Step::More } else { Step::Stop })
    }

    /// One page of a recovery's delayed events (see the module's note).
    async fn due_step(&mut self) -> Result<Step, ReplayError> {
        let page = self.log.due_page(&self.r, self.walk.at, self.walk.seq, PAGE).await?;
        let Some(last) = page.last() else {
            self.walk.done = true;
            let held = self.log.advance_due(self.r.id, &self.owner, self.walk, LEASE).await?;
            return Ok(if held { Step::More } else { Step::Stop });
        };
        let (last_at, last_seq) = (last.deliver_at, last.seq);
        let until = self.r.due_until.unwrap_or_else(chrono::Utc::now);
        let mut schedule: Vec<(i64, &[u8])> = Vec::new();
        let mut give: Vec<(i64, String, Vec<u8>)> = Vec::new();
        for (i, e) in page.iter().enumerate() {
            if e.deliver_at > until {
                schedule.push((e.deliver_at.timestamp_millis(), e.payload.as_slice()));
            } else if e.seq < self.r.from_seq
                && let Ok(marked) = Event::mark_replayed(Bytes::from(e.payload.clone()))
            {
                // Numbered by their place in the walk, so a page added again adds nothing twice.
                give.push((self.walk.walked + i as i64 + 1, e.id.clone(), marked));
            }
            // Due, and in the log range: the range's walk gives it.
        }
        self.streams.restore_delayed(&self.r.event_type, &schedule).await?;
        if !give.is_empty() {
            let events: Vec<(i64, &str, &[u8])> = give.iter().map(|(n, id, e)| (*n, id.as_str(), e.as_slice())).collect();
            let mark = format!("{}d", self.r.id.simple());
            let n = self.streams.add_replayed(&mark, &self.lane(RECOVERY_DUE_LANE), &self.keys, &events).await?;
            crate::bus::counters::add(&crate::bus::counters::COUNTERS.recovered, n);
            self.added += give.len() as i64;
        }
        self.walk = DueWalk { at: Some(last_at), seq: last_seq, walked: self.walk.walked + page.len() as i64, done: false };
        let held = self.log.advance_due(self.r.id, &self.owner, self.walk, LEASE).await?;
        Ok(if held { Step::More } else { Step::Stop })
    }
}
