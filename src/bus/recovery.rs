//! Recovery after Redis loses its data (a restart without persistence, a failover to an empty
//! replica), as often and whenever it happens: notice it, recreate every group the log knows,
//! and give each group again what it may not have acknowledged, so no consumer has to be
//! restarted and nothing acknowledged to a publisher is lost.
//!
//! **The invariant.** For every group *g* of a type, the log records a checkpoint of two
//! bounds (`consumer_groups.resume_seq`, `resume_due`): every event of the type that is not
//! delayed and has a log position below `resume_seq`, and every delayed event due before
//! `resume_due`, was acknowledged by *g* (or was published before *g* existed). When Redis loses
//! its data, the recovery gives *g*, through its replay lane, every event from `resume_seq` up
//! to the log's end at that moment (delayed ones only if due by then), and every delayed event
//! due from `resume_due` on (those due by then to *g*, the later ones back on their type's
//! schedule). Every event that was in the lost Redis was stored before it was added, so it is
//! at or before that end; the events stored later reach the new Redis through their flusher.
//! Hence every event in the log reaches every group that existed when it was published, at
//! least once, after any number of losses: each recovery starts where the last recorded
//! checkpoint says, and a checkpoint never passes what a running recovery has yet to give.
//!
//! **Keeping the checkpoint true** (`checkpoint.rs`, `lua/checkpoint.lua`) despite three things
//! that make a type's stream order differ from log order: publish lanes store and add in
//! parallel (a lane's batch may reach Redis after a later-stored batch of another lane), a
//! lane's daemon may stall or die between storing and adding, and delayed events enter the
//! stream at their due time. What holds:
//! - a lane stores and adds in its own order, so within one lane stream order *is* log order:
//!   per lane, the first entry the group has not acknowledged bounds all of the lane's entries
//!   it has not acknowledged (each stream keeps, per lane, an index of blocks of its entries);
//! - what a lane has stored and not yet added is at or after the lane's **bound** in the log
//!   (`lanes.bound`: after the last event it reported added, or the log's end when it reported
//!   itself idle); a lane registers before it stores, reports every couple of seconds, and
//!   neither stores nor adds while its last report is older than `LANE_REPORT_FRESH`, so a lane
//!   the checkpoints ignore (silent for `LANE_SILENT`: its daemon is gone) puts nothing where
//!   they would miss it;
//! - what is stored after the checkpoint's inputs were read is at or after the log's end then
//!   (read first);
//! - moves of due delayed events are in due order (indexed the same way, by due time), and a
//!   delay zset only takes events due after the Redis clock;
//! - a running recovery holds the checkpoint below what it has not yet added, and its lane's
//!   unacknowledged entries hold it like a publish lane's;
//! - a checkpoint is recorded only in the generation it was computed in: a recovery raises
//!   every group's generation before it sets the new epoch, so nothing computed from the lost
//!   Redis (or from the new one before its recovery replays exist) is ever recorded.
//!
//! **How a loss is noticed and recovered.** The first daemon sets an *epoch* key in Redis, and
//! only a loss of data removes it; nothing is added to a Redis without it (`publish.lua`
//! refuses). Every daemon looks once a second (and at once when a worker meets NOGROUP). The one
//! that finds no epoch records a recovery (the log's end, new generations), sets a new epoch
//! (`SET NX`: one daemon wins), recreates every group at the start of its stream, and makes the
//! recovery ready by creating every group's replay in one transaction (superseding the replays
//! of an earlier recovery that had not finished, and rewinding replays on request to what their
//! group had acknowledged). A daemon that dies between setting the epoch and that transaction
//! leaves it to the others, which finish it after [`FINISH_GRACE`].
//!
//! **Duplicates.** A group receives again what it acknowledged after its last recorded
//! checkpoint (taken every couple of seconds, and at most one index block, 100 ms of a lane's
//! entries, behind), what the flushers had stored and not yet added (they add it again), and
//! the delayed events that came due since its checkpoint. The `recovered` counter counts what
//! recoveries gave again: an upper bound on the duplicates.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::pg::EventLog;
use crate::backend::redis::Streams;
use crate::bus::deliver::Engine;

/// How often every daemon looks at the epoch.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a recovery that set its epoch may take to become ready before another daemon
/// finishes it (its daemon died half way).
const FINISH_GRACE: Duration = Duration::from_secs(10);
/// How long a daemon that finds no epoch waits before it records the recovery: long enough for
/// every flusher retrying its batch (at least every `publish::ADD_PAUSE_MAX`) to meet the
/// Redis without epoch, which proves its batch stored before the epoch is set, so it leaves
/// to the recovery what the recovery gives the groups anyway (fewer duplicates; nothing
/// depends on it for safety).
const NOEPOCH_GRACE: Duration = Duration::from_millis(700);

/// Watches the epoch until `stop`.
pub async fn watch(log: EventLog, streams: Streams, engine: Engine, stop: CancellationToken) {
    let mut known: Option<String> = None;
    let mut poked = false;
    loop {
        match streams.epoch().await {
            Ok(Some(epoch)) => {
                if known.as_ref().is_some_and(|k| *k != epoch) {
                    tracing::info!("another daemon recovered Redis");
                }
                known = Some(epoch.clone());
                if let Err(e) = settle(&log, &streams, &epoch).await {
                    tracing::debug!(error = %e, "could not check the epoch against the log");
                }
                if poked {
                    // A worker met NOGROUP while Redis kept its data: a group was deleted by
                    // hand. Recreate what is missing; its entries are still in the stream.
                    match recreate_groups(&log, &streams).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::warn!(groups = n, "consumer groups were missing in Redis; recreated at the start of their streams")
                        }
                        Err(e) => tracing::warn!(error = %e, "recreating missing consumer groups failed"),
                    }
                }
            }
            Ok(None) => match recover(&log, &streams).await {
                Ok(Some(n)) => {
                    if n > 0 {
                        tracing::warn!(
                            groups = n,
                            "Redis lost its data; recreated the consumer groups and replaying what they had not acknowledged"
                        );
                    } else {
                        tracing::info!("set up a Redis without sidebus data");
                    }
                    known = None;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "Redis has no epoch and the recovery could not run yet; flushing waits"),
            },
            Err(e) => tracing::debug!(error = %e, "could not read the epoch"),
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => poked = false,
            _ = engine.redis_check_wanted().notified() => poked = true,
            _ = stop.cancelled() => return,
        }
    }
}

/// Why a recovery step could not run (it is tried again at the next look).
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Postgres failed.
    #[error(transparent)]
    Log(#[from] crate::backend::pg::LogError),
    /// Redis failed.
    #[error(transparent)]
    Streams(#[from] crate::backend::redis::StreamsError),
}

/// Redis has no epoch: records a recovery, sets a new epoch and, if this daemon set it, makes
/// the recovery ready. Returns the number of groups given a recovery replay, or `None` when
/// another daemon set the epoch first.
async fn recover(log: &EventLog, streams: &Streams) -> Result<Option<u64>, RecoveryError> {
    tokio::time::sleep(NOEPOCH_GRACE).await;
    let epoch = uuid::Uuid::new_v4().to_string();
    let lost = log.had_redis_before().await?;
    let id = log.begin_recovery(&epoch, lost).await?;
    match streams.claim_epoch(&epoch).await {
        Ok(true) => {}
        Ok(false) => {
            log.drop_recovery(id).await?;
            return Ok(None);
        }
        Err(e) => {
            log.drop_recovery(id).await?;
            return Err(e.into());
        }
    }
    let n = finish(log, streams, id).await?;
    if lost {
        crate::bus::counters::add(&crate::bus::counters::COUNTERS.redis_losses, 1);
    }
    Ok(Some(n))
}

/// Recreates the groups and makes a recovery ready (see [`EventLog::start_recovery`]).
async fn finish(log: &EventLog, streams: &Streams, id: uuid::Uuid) -> Result<u64, RecoveryError> {
    recreate_groups(log, streams).await?;
    let now = streams.redis_now().await?;
    let n = log.start_recovery(id, now).await?.unwrap_or(0);
    crate::bus::replay::wake().notify_one();
    Ok(n)
}

/// Redis has `epoch`: if the log does not have it as ready, finishes a recovery whose daemon
/// died half way, or adopts an epoch set by a daemon that keeps no recovery record (an older
/// version).
async fn settle(log: &EventLog, streams: &Streams, epoch: &str) -> Result<(), RecoveryError> {
    let (ready, pending) = log.epoch_state(epoch).await?;
    if ready.as_deref() == Some(epoch) {
        return Ok(());
    }
    match pending {
        Some((id, age)) if age >= FINISH_GRACE => {
            let n = finish(log, streams, id).await?;
            tracing::warn!(groups = n, "finished a recovery that its daemon left half way");
        }
        Some(_) => {}
        None => {
            log.adopt_epoch(epoch).await?;
            tracing::info!("recorded the Redis data set in the log");
        }
    }
    Ok(())
}

/// Recreates every group the log knows that Redis lacks, at the start of its stream (it
/// existed before, so it must not skip what the stream holds). Returns how many. Workers never
/// create groups themselves on NOGROUP, so a missing group is always seen here.
async fn recreate_groups(log: &EventLog, streams: &Streams) -> Result<usize, RecoveryError> {
    let mut recreated = 0;
    for (event_type, groups) in log.types_and_groups().await? {
        for group in groups {
            let keys = streams.group_keys(&event_type, &group);
            if streams.ensure_group(&keys, true).await? {
                recreated += 1;
            }
        }
    }
    Ok(recreated)
}
