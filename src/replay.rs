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

use std::time::Duration;

use bytes::Bytes;
use sidebus_protocol::Event;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::log::{EventLog, Replay};
use crate::streams::Streams;

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

/// Looks for replays to run until `stop`.
pub async fn run(log: EventLog, streams: Streams, owner: String, ack_timeout: Duration, stop: CancellationToken) {
    let running = TaskTracker::new();
    loop {
        if running.len() < MAX_RUNNING {
            match log.claim_replay(&owner, LEASE).await {
                Ok(Some(r)) => {
                    running.spawn(run_one(log.clone(), streams.clone(), owner.clone(), r, ack_timeout, stop.clone()));
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

async fn run_one(log: EventLog, streams: Streams, owner: String, r: Replay, ack_timeout: Duration, stop: CancellationToken) {
    let keys = streams.replay_keys(&r.event_type, &r.group_name);
    tracing::info!(replay = %r.id, r#type = %r.event_type, group = %r.group_name, cursor = r.cursor, "replay running");
    let (mut cursor, mut added) = (r.cursor, r.added);
    let mut failures = 0u32;
    let mut renewed = tokio::time::Instant::now();
    // The group and its replay lane exist before anything is added.
    let mut ready = false;
    loop {
        if stop.is_cancelled() {
            // Given up, so it resumes at once where it stopped (after a crash instead, the
            // lease runs out first).
            if let Err(e) = log.release_replay(r.id, &owner).await {
                tracing::debug!(replay = %r.id, error = %e, "could not release a replay; it resumes when its lease runs out");
            }
            return;
        }
        let step = async {
            if !ready {
                streams
                    .ensure_group(&streams.group_keys(&r.event_type, &r.group_name), ack_timeout, true)
                    .await
                    .map_err(|e| e.to_string())?;
                ready = true;
            }
            if streams.replay_lag(&keys).await.map_err(|e| e.to_string())? >= WINDOW {
                // Renew the lease (and notice a cancel) now and then while the group catches up.
                if renewed.elapsed() < RENEW_WHILE_WAITING {
                    return Ok(Step::Wait);
                }
                renewed = tokio::time::Instant::now();
                return log
                    .advance_replay(r.id, &owner, cursor, added, LEASE)
                    .await
                    .map(|held| if held { Step::Wait } else { Step::Stop })
                    .map_err(|e| e.to_string());
            }
            let page = log.replay_page(&r, cursor, PAGE).await.map_err(|e| e.to_string())?;
            let Some(last) = page.last().map(|p| p.0) else { return Ok(Step::Done) };
            // Rows outside the range (time, or not in Redis before a loss) only move the cursor.
            let marked: Vec<(i64, Vec<u8>)> =
                page.into_iter().filter_map(|(seq, payload)| Event::mark_replayed(Bytes::from(payload?)).ok().map(|e| (seq, e))).collect();
            let events: Vec<(i64, &[u8])> = marked.iter().map(|(s, e)| (*s, e.as_slice())).collect();
            if !events.is_empty() {
                streams.add_replayed(&r.id, &keys, &events).await.map_err(|e| e.to_string())?;
            }
            cursor = last;
            added += marked.len() as i64;
            let held = log.advance_replay(r.id, &owner, cursor, added, LEASE).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(if held { Step::More } else { Step::Stop })
        };
        match step.await {
            Ok(Step::More) => failures = 0,
            Ok(Step::Wait) => {
                failures = 0;
                tokio::select! {
                    _ = tokio::time::sleep(WAIT) => {}
                    _ = stop.cancelled() => continue,
                }
            }
            Ok(Step::Stop) => {
                tracing::info!(replay = %r.id, "replay cancelled or taken over");
                return;
            }
            Ok(Step::Done) => {
                if let Err(e) = log.finish_replay(r.id, "done", None).await {
                    tracing::warn!(replay = %r.id, error = %e, "could not record the end of a replay; it will be checked again");
                }
                tracing::info!(replay = %r.id, r#type = %r.event_type, group = %r.group_name, added, "replay done");
                return;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(replay = %r.id, error = %e, "replay stalled; retrying");
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

enum Step {
    More,
    Wait,
    Stop,
    Done,
}
