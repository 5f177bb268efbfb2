//! The lifecycle of consumer groups: listing them with their state, deleting one everywhere,
//! moving one's read position, and deleting the groups nobody used for `group_idle_ttl`.
//!
//! A group lives in two places: its record in the log (`consumer_groups`, with its checkpoint)
//! and its Redis state (the consumer group on the type's stream, its replay lane, retry
//! schedules, attempt counts, dead-letter stream, settings and leases). Deleting removes the log
//! record first, then the Redis state: a daemon whose worker then meets `NOGROUP` asks the log,
//! finds the group gone, and ends its subscriptions (rather than waiting for a recovery that
//! would never come). The group's dead letters already in the log stay there (see
//! `EventLog::delete_group`); those still in Redis are copied first.
//!
//! Live subscriptions on any daemon are the lease records with a recent heartbeat (see
//! `Streams::record_lease`), so a delete without `force` is refused while any daemon has one.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use sidebus_protocol::groups::{GroupInfo, GroupList, ResetTo};

use super::NoGroup;
use super::counters::{COUNTERS, add};
use super::dead_letters::{self, DeadLetterError};
use super::deliver::Engine;
use crate::backend::pg::{EventLog, LogError};
use crate::backend::redis::{ResetPoint, Streams, StreamsError};

/// Most groups one `groups` lists.
pub const MAX_GROUPS: usize = 1000;

/// Why a group operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The group is unknown.
    #[error(transparent)]
    NoGroup(#[from] NoGroup),
    /// `group_delete` without `force` while subscriptions exist.
    #[error("group `{group}` of `{event_type}` has {consumers} live subscription(s); end them first, or delete with force")]
    HasConsumers {
        /// The type.
        event_type: String,
        /// The group.
        group: String,
        /// Live subscriptions on every daemon.
        consumers: u64,
    },
    /// `group_reset` to something that is neither `end`, `start` nor an RFC 3339 time.
    #[error("`{0}` is not `end`, `start` or an RFC 3339 time")]
    BadPosition(String),
    /// Postgres could not be reached.
    #[error("groups are unreachable now: {0}")]
    Log(#[from] LogError),
    /// Redis could not be reached.
    #[error("groups are unreachable now: {0}")]
    Streams(#[from] StreamsError),
}

impl From<DeadLetterError> for GroupError {
    fn from(e: DeadLetterError) -> GroupError {
        match e {
            DeadLetterError::NoGroup(g) => GroupError::NoGroup(g),
            DeadLetterError::Log(e) => GroupError::Log(e),
            DeadLetterError::Streams(e) => GroupError::Streams(e),
            // `sync` names no ids.
            DeadLetterError::NotDead { event_type, group, .. } => GroupError::NoGroup(NoGroup { event_type, group }),
        }
    }
}

/// A group's name and creation time.
type Named = (String, DateTime<Utc>);

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Every known group (of `event_type`, when given) with its state, at most [`MAX_GROUPS`].
pub async fn list(log: &EventLog, streams: &Streams, event_type: Option<&str>) -> Result<GroupList, GroupError> {
    let rows = log.groups_created(event_type, MAX_GROUPS as i64 + 1).await?;
    let truncated = rows.len() > MAX_GROUPS;
    let dead: HashMap<(String, String), u64> = log.dead_letter_counts().await?;
    // Per type, its groups with their creation times.
    let mut by_type: Vec<(String, Vec<Named>)> = Vec::new();
    for (t, g, created) in rows.into_iter().take(MAX_GROUPS) {
        match by_type.last_mut() {
            Some((last, groups)) if *last == t => groups.push((g, created)),
            _ => by_type.push((t, vec![(g, created)])),
        }
    }
    let mut groups = Vec::new();
    for (event_type, named) in by_type {
        let names: Vec<String> = named.iter().map(|(g, _)| g.clone()).collect();
        let state = streams.group_stats(&event_type, &names).await?;
        let (activity, _) = streams.group_activity(&event_type, &names).await?;
        for (((name, created), s), a) in named.into_iter().zip(state).zip(activity) {
            let last = a.last_active_ms.and_then(|ms| Utc.timestamp_millis_opt(ms).single()).map_or(created, |t| t.max(created));
            groups.push(GroupInfo {
                dead_letters: s.dead_letters + dead.get(&(event_type.clone(), name.clone())).copied().unwrap_or(0),
                event_type: event_type.clone(),
                group: name,
                created_at: rfc3339(created),
                lag: s.lag,
                pending: s.pending,
                consumers: a.consumers,
                last_active: rfc3339(last),
            });
        }
    }
    Ok(GroupList { groups, truncated })
}

/// Deletes a group everywhere; refused while it has live subscriptions unless `force`. With
/// `force`, this daemon's subscriptions of the group end at once (others' at their next read).
/// Returns how many subscriptions ended here.
pub async fn delete(
    log: &EventLog,
    streams: &Streams,
    engine: Option<&Engine>,
    event_type: &str,
    group: &str,
    force: bool,
) -> Result<u64, GroupError> {
    let names = [group.to_owned()];
    let (activity, _) = streams.group_activity(event_type, &names).await?;
    let consumers = activity.first().map_or(0, |a| a.consumers);
    let in_log = log.group_exists(event_type, group).await?;
    if !in_log && !streams.group_exists(event_type, group).await? {
        return Err(NoGroup { event_type: event_type.to_owned(), group: group.to_owned() }.into());
    }
    if consumers > 0 && !force {
        return Err(GroupError::HasConsumers { event_type: event_type.to_owned(), group: group.to_owned(), consumers });
    }
    let reason = format!("group {group} of {event_type} was deleted");
    let ended = engine.map_or(0, |e| e.end_group(event_type, group, &reason)) as u64;
    if in_log {
        // Its dead letters still in Redis go to the log first; they stay there.
        dead_letters::sync(log, streams, event_type, group).await?;
    }
    log.delete_group(event_type, group).await?;
    streams.delete_group(event_type, group).await?;
    tracing::info!(r#type = %event_type, group = %group, force, consumers, ended, "group deleted");
    Ok(ended)
}

/// The stream position of a reset: `end`, `start`, or just before the first entry added at
/// or after an RFC 3339 time (stream ids start with their time in ms).
pub fn reset_point(to: &ResetTo) -> Result<ResetPoint, GroupError> {
    Ok(match to {
        ResetTo::End => ResetPoint::End,
        ResetTo::Start => ResetPoint::Start,
        ResetTo::Time(t) => {
            let at = DateTime::parse_from_rfc3339(t).map_err(|_| GroupError::BadPosition(t.clone()))?;
            let ms = at.timestamp_millis();
            if ms <= 0 { ResetPoint::Start } else { ResetPoint::After(format!("{}-{}", ms - 1, u64::MAX)) }
        }
    })
}

/// Moves a group's read position on its type's stream; the entry id it now reads after.
/// Deliveries pending or waiting for a retry, and the replay lane, are not touched.
pub async fn reset(log: &EventLog, streams: &Streams, event_type: &str, group: &str, to: &ResetTo) -> Result<String, GroupError> {
    let point = reset_point(to)?;
    let missing = || NoGroup { event_type: event_type.to_owned(), group: group.to_owned() };
    if !log.group_exists(event_type, group).await? {
        return Err(missing().into());
    }
    match streams.reset_group(event_type, group, &point).await {
        Ok(id) => {
            tracing::info!(r#type = %event_type, group = %group, to = %to.as_str(), entry = %id, "group reset");
            Ok(id)
        }
        Err(e) if e.is_nogroup() => Err(missing().into()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes every group without live subscriptions whose last activity is older than `ttl`
/// (one log line each, counted as `groups_expired`); how many.
pub async fn expire_idle(log: &EventLog, streams: &Streams, ttl: Duration) -> Result<u64, GroupError> {
    let mut expired = 0;
    for (event_type, names) in log.types_and_groups().await? {
        if names.is_empty() {
            continue;
        }
        let (activity, now) = streams.group_activity(&event_type, &names).await?;
        let created: HashMap<String, DateTime<Utc>> =
            log.groups_created(Some(&event_type), i64::MAX).await?.into_iter().map(|(_, g, c)| (g, c)).collect();
        for (name, a) in names.iter().zip(activity) {
            let Some(created) = created.get(name) else { continue };
            let last = a.last_active_ms.unwrap_or(0).max(created.timestamp_millis());
            let idle = Duration::from_millis(now.saturating_sub(last).max(0) as u64);
            if a.consumers > 0 || idle < ttl {
                continue;
            }
            match delete(log, streams, None, &event_type, name, false).await {
                Ok(_) => {
                    expired += 1;
                    add(&COUNTERS.groups_expired, 1);
                    tracing::info!(r#type = %event_type, group = %name, idle_s = idle.as_secs(), "deleted a group idle for longer than group_idle_ttl");
                }
                Err(GroupError::HasConsumers { .. } | GroupError::NoGroup(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(expired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_resets_to_just_before_its_millisecond() {
        let p = reset_point(&ResetTo::Time("2026-11-27T08:00:00Z".into())).unwrap();
        assert_eq!(p, ResetPoint::After(format!("1795766399999-{}", u64::MAX)));
        let p = reset_point(&ResetTo::Time("2026-11-27T09:00:00.250+01:00".into())).unwrap();
        assert_eq!(p, ResetPoint::After(format!("1795766400249-{}", u64::MAX)));
        assert_eq!(reset_point(&ResetTo::Time("1970-01-01T00:00:00Z".into())).unwrap(), ResetPoint::Start);
        assert_eq!(reset_point(&ResetTo::End).unwrap(), ResetPoint::End);
        assert!(matches!(reset_point(&ResetTo::Time("yesterday".into())), Err(GroupError::BadPosition(_))));
    }
}
