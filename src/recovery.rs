//! Recovery after Redis loses its data (a restart without persistence, a failover to an empty
//! replica): notice it, recreate every group the log knows, and give each group again what it
//! had not acknowledged, so no consumer has to be restarted and nothing acknowledged to a
//! publisher is lost.
//!
//! How it is noticed: the first daemon sets an *epoch* key in Redis, and only a loss of data
//! removes it. Every daemon looks once a second (and at once when a worker meets NOGROUP); the
//! daemon that sets the epoch again does the recovery, the others see the new epoch.
//!
//! What a recovered group receives:
//! - what the spool's flushers add again: events stored in the log but not yet added to Redis
//!   (a lane's high-water mark went with Redis, so its flusher adds its stalled batch again);
//!   the group is recreated at the start of the stream, so it sees them;
//! - a replay, into its own lane, of the events it may not have acknowledged: from its
//!   checkpoint (the log position of the oldest event it needed, kept by the janitor every
//!   couple of seconds), and only events their lane had added to Redis before the loss (the
//!   rest are the flushers' job, see `lanes` in the log).
//!
//! The two must not overlap, so the order matters: a Redis without the epoch takes no event
//! (publish.lua refuses), the recovering daemon waits [`REPORT_GRACE`] for the flushers to
//! record their positions, records them and the log's end (`begin_recovery`), and only then
//! sets the epoch. What a lane added after that went into the new Redis; what it had added
//! before is replayed.
//!
//! Limits: events a group acknowledged after its last checkpoint are delivered again (at least
//! once). An event whose lane added it to Redis after the checkpoint was taken but with a log
//! position below the checkpoint (two lanes racing within milliseconds) and that was not yet
//! given to the group could be missed. A lane that added events and could not record its
//! position before the snapshot (Postgres away at that moment too) has them neither replayed
//! nor added again.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::log::{EventLog, NewReplay};
use crate::streams::Streams;

/// How often every daemon looks at the epoch.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a recovery waits for the flushers to record their positions (a flusher records it
/// at once when Redis fails under it, and within `publisher::IDLE_REPORT` of going idle).
const REPORT_GRACE: Duration = Duration::from_millis(500);

/// Watches the epoch until `stop`.
pub async fn watch(log: EventLog, streams: Streams, engine: Engine, ack_timeout: Duration, stop: CancellationToken) {
    let mut known: Option<String> = None;
    let mut poked = false;
    loop {
        match streams.epoch().await {
            Ok(Some(epoch)) => {
                if known.as_ref().is_some_and(|k| *k != epoch) {
                    tracing::info!("another daemon recovered Redis");
                }
                known = Some(epoch);
                if poked {
                    // A worker met NOGROUP while Redis kept its data: a group was deleted by
                    // hand. Recreate what is missing; its entries are still in the stream.
                    match repair(&log, &streams, ack_timeout, None).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::warn!(groups = n, "consumer groups were missing in Redis; recreated at the start of their streams")
                        }
                        Err(e) => tracing::warn!(error = %e, "recreating missing consumer groups failed"),
                    }
                }
            }
            Ok(None) => {
                // Nothing is added to this Redis until the epoch is set (see publish.lua). Give
                // the flushers time to record how far they got before the loss, then record it
                // for the replays, and only then set the epoch.
                tokio::select! {
                    _ = tokio::time::sleep(REPORT_GRACE) => {}
                    _ = stop.cancelled() => return,
                }
                let snapshot = match log.begin_recovery().await {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis has no epoch and the log cannot record a recovery; flushing waits");
                        match wait(&engine, &stop).await {
                            Some(p) => poked = p,
                            None => return,
                        }
                        continue;
                    }
                };
                let epoch = uuid::Uuid::new_v4().to_string();
                match streams.claim_epoch(&epoch).await {
                    Ok(true) => {
                        if known.is_some() {
                            tracing::warn!(
                                "Redis lost its data; recreating the consumer groups and replaying what they had not acknowledged"
                            );
                        }
                        match repair(&log, &streams, ack_timeout, Some(snapshot)).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(groups = n, "consumer groups recreated"),
                            Err(e) => {
                                tracing::error!(error = %e, "recovering the consumer groups failed; they are created again on their next subscribe")
                            }
                        }
                        known = Some(epoch);
                    }
                    Ok(false) => forget(&log, snapshot).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "could not set the epoch");
                        forget(&log, snapshot).await;
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not read the epoch"),
        }
        match wait(&engine, &stop).await {
            Some(p) => poked = p,
            None => return,
        }
    }
}

/// Waits for the next look: true when a worker asked for it, None on `stop`.
async fn wait(engine: &Engine, stop: &CancellationToken) -> Option<bool> {
    tokio::select! {
        _ = tokio::time::sleep(CHECK_INTERVAL) => Some(false),
        _ = engine.redis_check_wanted().notified() => Some(true),
        _ = stop.cancelled() => None,
    }
}

async fn forget(log: &EventLog, snapshot: uuid::Uuid) {
    if let Err(e) = log.drop_recovery(snapshot).await {
        tracing::debug!(error = %e, "could not forget an unused recovery snapshot");
    }
}

/// Recreates every group the log knows that Redis lacks (at the start of its stream) and, when
/// Redis lost its data (`recovery`, the snapshot taken before), starts its replay from its
/// checkpoint. Returns how many
/// groups were recreated. Workers never create groups themselves on NOGROUP, so a missing group
/// is always seen here.
async fn repair(log: &EventLog, streams: &Streams, ack_timeout: Duration, recovery: Option<uuid::Uuid>) -> Result<usize, String> {
    let groups = log.groups().await.map_err(|e| e.to_string())?;
    let mut recreated = 0;
    for (event_type, group, resume_seq) in groups {
        let keys = streams.group_keys(&event_type, &group);
        let created = streams.ensure_group(&keys, ack_timeout, true).await.map_err(|e| e.to_string())?;
        if !created {
            continue;
        }
        recreated += 1;
        let (Some(from_seq), Some(recovery)) = (resume_seq, recovery) else { continue };
        let replay = NewReplay {
            event_type: &event_type,
            group: &group,
            since: None,
            until: None,
            from_seq,
            reason: "recovery",
            recovery: Some(recovery),
        };
        let id = log.create_replay(&replay).await.map_err(|e| e.to_string())?;
        tracing::info!(r#type = %event_type, group = %group, from_seq, replay = %id, "group recreated; replaying from its checkpoint");
    }
    Ok(recreated)
}
