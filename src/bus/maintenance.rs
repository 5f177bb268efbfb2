//! Looking after the bus while it runs: the janitor (every group's checkpoint, dead letters
//! copied into the log, streams trimmed below what their groups need, groups idle for longer
//! than `group_idle_ttl` deleted; one daemon at a time, by a lock in Redis) and the spool's reports (what a start-up check found, and its depth while
//! it holds anything).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::Backends;
use crate::backend::redis::{Streams, TRIM_STEP};
use crate::backend::spool::Finding;
use crate::bus::publish::Publisher;

/// How often streams are trimmed below what their groups still need.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(30);
/// How often the groups' checkpoints are recorded: what a group receives again after Redis
/// lost its data is what it acknowledged since (see `bus::recovery`).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the spool's depth is logged while it holds anything.
const SPOOL_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// How often idle groups are looked for, at most (with a short `group_idle_ttl`, a quarter of it).
const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Keeps the groups' checkpoints (every [`CHECKPOINT_INTERVAL`]), trims every known stream
/// (every [`TRIM_INTERVAL`]), and with `idle_ttl` deletes the groups idle that long (see
/// `bus::groups::expire_idle`). One daemon at a time does it (a Redis lock), since the result
/// is the same whoever does.
pub async fn janitor(backends: Arc<Backends>, idle_ttl: Option<Duration>, stop: CancellationToken) {
    let both = async { (backends.log.get().await, backends.streams.get().await) };
    let (log, streams) = tokio::select! {
        b = both => b,
        _ = stop.cancelled() => return,
    };
    let mut next_trim = tokio::time::Instant::now() + TRIM_INTERVAL.mul_f64(0.5 + rand::random::<f64>());
    let sweep_every = idle_ttl.map(|t| (t / 4).clamp(CHECKPOINT_INTERVAL, IDLE_SWEEP_INTERVAL));
    let mut next_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
        match streams.try_lock("janitor", CHECKPOINT_INTERVAL.mul_f64(0.9)).await {
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
        match super::checkpoint::record(&log, &streams).await {
            Ok(n) => tracing::trace!(recorded = n, "checkpoints"),
            Err(e) => tracing::debug!(error = %e, "checkpoints not recorded this round"),
        }
        // Dead letters into the log, so they outlive Redis (see bus::dead_letters).
        for (event_type, groups) in &types {
            for group in groups {
                if let Err(e) = super::dead_letters::sync(&log, &streams, event_type, group).await {
                    tracing::debug!(r#type = %event_type, group = %group, error = %e, "recording dead letters failed");
                }
            }
        }
        if tokio::time::Instant::now() >= next_trim {
            for (event_type, groups) in &types {
                trim_stream(&streams, event_type, groups, &stop).await;
            }
            next_trim = tokio::time::Instant::now() + TRIM_INTERVAL.mul_f64(0.8 + 0.4 * rand::random::<f64>());
        }
        if let (Some(ttl), Some(every)) = (idle_ttl, sweep_every)
            && tokio::time::Instant::now() >= next_sweep
        {
            if let Err(e) = super::groups::expire_idle(&log, &streams, ttl).await {
                tracing::debug!(error = %e, "idle groups not looked for this round");
            }
            next_sweep = tokio::time::Instant::now() + every;
        }
    }
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

/// Says what the spool check found: a torn tail is a warning (a write the crash interrupted,
/// never acknowledged); anything else an error (acknowledged publishes may be lost).
pub fn report_findings(findings: &[Finding]) {
    for f in findings {
        let quarantined = f.quarantined.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        if f.torn_tail {
            tracing::warn!(lane = %f.lane, segment = %f.segment.display(), bytes = f.bytes, quarantined, what = %f.what, "spool had a torn tail (a write cut short by a crash, never acknowledged); set aside");
        } else {
            tracing::error!(lane = %f.lane, segment = %f.segment.display(), bytes = f.bytes, quarantined, what = %f.what, "spool damaged; the damaged part is set aside and acknowledged publishes in it are lost");
        }
    }
}

/// Logs the spool's depth while it holds anything: every 10 s, louder once the oldest
/// publish waits more than 30 s.
pub async fn report_spool(publisher: Publisher, stop: CancellationToken) {
    let mut was_empty = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SPOOL_REPORT_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
        let d = publisher.depth();
        if d.events == 0 {
            if !was_empty {
                tracing::info!("spool drained");
            }
            was_empty = true;
            continue;
        }
        was_empty = false;
        let age_s = d.oldest_age.map_or(0.0, |a| a.as_secs_f64());
        if age_s > 30.0 {
            tracing::warn!(events = d.events, bytes = d.bytes, oldest_age_s = age_s, "spool holds publishes the backends have not taken");
        } else {
            tracing::info!(events = d.events, bytes = d.bytes, oldest_age_s = age_s, "spool depth");
        }
    }
}
