//! Dead letters: what `fail.lua` puts in a group's Redis dead-letter stream is copied into the
//! log's `dead_letters` table (and then removed from the stream), so it outlives a Redis loss
//! and can be searched; listing, redriving and purging work on that record.
//!
//! The copy is idempotent (the log skips an entry it has recorded), so a crash between
//! recording and removing only records nothing twice. The janitor copies every group's new dead
//! letters every few seconds, and every operation copies its group's first, so what it sees is
//! complete.
//!
//! A redrive adds the events to the group's replay lane (only that group sees them, with a fresh
//! attempt count), then marks them `redriven`; a crash between the two delivers one batch again
//! (at least once) rather than losing it.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use sidebus_protocol::Fields;
use sidebus_protocol::dead_letters::{Attempt, DeadLetterEntry, DlqEntries};

use super::NoGroup;
use crate::backend::pg::{EventLog, LogError, NewDeadLetter};
use crate::backend::redis::{Streams, StreamsError};

/// Why a dead-letter operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The group is unknown.
    #[error(transparent)]
    NoGroup(#[from] NoGroup),
    /// Some of the ids are not dead letters of the group (nothing was changed).
    #[error(
        "{n} of the ids are not dead letters of `{group}` on `{event_type}`: {shown}{more}; nothing was changed",
        n = missing.len(),
        shown = missing.iter().take(10).map(String::as_str).collect::<Vec<_>>().join(", "),
        more = if missing.len() > 10 { ", …" } else { "" }
    )]
    NotDead {
        /// The type.
        event_type: String,
        /// The group.
        group: String,
        /// The ids that are not.
        missing: Vec<String>,
    },
    /// Postgres could not be reached.
    #[error("dead letters are unreachable now: {0}")]
    Log(#[from] LogError),
    /// Redis could not be reached.
    #[error("dead letters are unreachable now: {0}")]
    Streams(#[from] StreamsError),
}

/// Dead letters taken from a stream per round trip.
const BATCH: usize = 500;
/// Default and largest page of `dlq_list`.
const DEFAULT_LIMIT: u64 = 100;

fn ms_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Copies a group's new dead letters from Redis into the log.
pub async fn sync(log: &EventLog, streams: &Streams, event_type: &str, group: &str) -> Result<usize, DeadLetterError> {
    let mut total = 0;
    loop {
        let batch = streams.dead_letters(event_type, group, BATCH).await?;
        if batch.is_empty() {
            return Ok(total);
        }
        let rows: Vec<NewDeadLetter> = batch
            .iter()
            .map(|d| NewDeadLetter {
                entry: d.entry.clone(),
                event_id: Fields::parse(d.event.clone()).ok().and_then(|f| f.str("id").ok().map(str::to_owned)).unwrap_or_default(),
                payload: d.event.to_vec(),
                error: d.error.clone(),
                attempts: d.attempts as i32,
                history: serde_json::from_str(&d.history).unwrap_or(serde_json::Value::Array(vec![])),
                failed_at: ms_time(d.failed_at_ms),
            })
            .collect();
        log.record_dead_letters(event_type, group, &rows).await?;
        let entries: Vec<&str> = batch.iter().map(|d| d.entry.as_str()).collect();
        streams.forget_dead_letters(event_type, group, &entries).await?;
        total += batch.len();
        if batch.len() < BATCH {
            return Ok(total);
        }
    }
}

/// Checks that the group exists and copies its new dead letters.
async fn prepare(log: &EventLog, streams: &Streams, event_type: &str, group: &str) -> Result<(), DeadLetterError> {
    if !log.group_exists(event_type, group).await? {
        return Err(NoGroup { event_type: event_type.to_owned(), group: group.to_owned() }.into());
    }
    sync(log, streams, event_type, group).await?;
    Ok(())
}

/// Refuses `ids` unless every one is a dead letter of the group.
async fn check_ids(log: &EventLog, event_type: &str, group: &str, ids: &[String]) -> Result<(), DeadLetterError> {
    if ids.is_empty() {
        return Ok(());
    }
    let missing = log.not_dead(event_type, group, ids).await?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(DeadLetterError::NotDead { event_type: event_type.to_owned(), group: group.to_owned(), missing })
}

/// `dlq_list`.
#[allow(clippy::too_many_arguments)] // the op's fields, passed as they come
pub async fn list(
    log: &EventLog,
    streams: &Streams,
    event_type: &str,
    group: &str,
    limit: Option<u64>,
    after: Option<u64>,
    ids: &[String],
    max_bytes: usize,
) -> Result<DlqEntries, DeadLetterError> {
    prepare(log, streams, event_type, group).await?;
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    let rows = log.dead_letters(event_type, group, after.unwrap_or(0) as i64, limit as i64, ids).await?;
    let mut next = (rows.len() as u64 == limit).then(|| rows.last().map(|r| r.id as u64)).flatten();
    let mut entries = Vec::with_capacity(rows.len());
    let mut bytes = 0;
    for r in rows {
        let e = DeadLetterEntry {
            id: r.id as u64,
            event: r.payload.into(),
            error: r.error,
            attempts: r.attempts.max(0) as u64,
            failed_at: rfc3339(r.failed_at),
            history: r
                .history
                .0
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|h| Attempt {
                            attempt: h["attempt"].as_u64().unwrap_or(0),
                            error: h["error"].as_str().unwrap_or("").to_owned(),
                            at: rfc3339(ms_time(h["at"].as_i64().unwrap_or(0))),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        // Generous per entry: field names, numbers and times.
        let size = 128 + e.event.len() + e.error.len() + e.history.iter().map(|h| 64 + h.error.len()).sum::<usize>();
        if bytes + size > max_bytes && !entries.is_empty() {
            next = entries.last().map(|e: &DeadLetterEntry| e.id);
            break;
        }
        bytes += size;
        entries.push(e);
    }
    Ok(DlqEntries { entries, next })
}

/// `dlq_redrive`: returns how many went back to the group.
pub async fn redrive(
    log: &EventLog,
    streams: &Streams,
    event_type: &str,
    group: &str,
    ids: &[String],
    rate: Option<u64>,
) -> Result<u64, DeadLetterError> {
    prepare(log, streams, event_type, group).await?;
    check_ids(log, event_type, group, ids).await?;
    let keys = streams.replay_keys(event_type, group);
    // Batches of at most a tenth of the rate, one every 100 ms.
    let batch = rate.map_or(BATCH as i64, |r| (r / 10).clamp(1, BATCH as u64) as i64);
    let pause = rate.map(|r| Duration::from_secs_f64(batch as f64 / r as f64));
    let (mut after, mut count) = (0i64, 0u64);
    loop {
        let rows = log.dead_letters(event_type, group, after, batch, ids).await?;
        let Some(last) = rows.last().map(|r| r.id) else { break };
        let started = tokio::time::Instant::now();
        let events: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
        streams.redrive(&keys, &events).await?;
        let numbers: Vec<i64> = rows.iter().map(|r| r.id).collect();
        count += log.settle_dead_letters(&numbers, "redriven").await?;
        after = last;
        if let Some(p) = pause {
            tokio::time::sleep_until(started + p).await;
        }
    }
    crate::bus::counters::add(&crate::bus::counters::COUNTERS.redriven, count);
    if count > 0 {
        tracing::info!(r#type = %event_type, group = %group, count, "dead letters redriven");
    }
    Ok(count)
}

/// `dlq_purge`: returns how many were purged.
pub async fn purge(log: &EventLog, streams: &Streams, event_type: &str, group: &str, ids: &[String]) -> Result<u64, DeadLetterError> {
    prepare(log, streams, event_type, group).await?;
    check_ids(log, event_type, group, ids).await?;
    let count = log.purge_dead_letters(event_type, group, ids).await?;
    if count > 0 {
        tracing::info!(r#type = %event_type, group = %group, count, "dead letters purged");
    }
    Ok(count)
}
