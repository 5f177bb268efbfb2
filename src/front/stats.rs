//! The state of what the daemon knows, for people: `collect` builds the `stats` reply (and feeds
//! `/metrics`) from the counters (`bus::counters`), the spool, the log's types and groups, and
//! Redis.
//!
//! Reading is cheap and bounded: the types and groups come from the log (at most
//! [`MAX_GROUPS`]), and each type costs one Redis script call (`lua/stats.lua`: XINFO GROUPS,
//! XPENDING of the oldest entry, XLEN of the dead-letter stream); no KEYS or SCAN.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sidebus_protocol::stats::{BackendStats, GroupStats, Stats};

use crate::backend::Backends;
use crate::backend::pg::LogError;
use crate::backend::redis::StreamsError;
use crate::bus::counters::COUNTERS;
use crate::bus::deliver::Engine;
use crate::bus::publish::Publisher;

/// Why the groups' part of `stats` is missing (it is logged, and the reply goes without it).
#[derive(Debug, thiserror::Error)]
enum GroupsError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Streams(#[from] StreamsError),
}

/// Most (type, group) pairs one `stats` reports.
pub const MAX_GROUPS: usize = 1000;

fn started() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Marks the daemon's start (for `uptime_s`).
pub fn mark_start() {
    started();
}

/// What `collect` needs; the backends are absent until they answer.
pub struct Sources<'a> {
    /// This daemon's node name.
    pub node: &'a str,
    /// The publisher (spool depth).
    pub publisher: &'a Publisher,
    /// The backends.
    pub backends: &'a Backends,
    /// Delivery, once running.
    pub engine: Option<Engine>,
}

/// Builds the `stats` reply. Parts that need a backend that does not answer within `wait` are
/// left out (the counters and the spool are always there).
pub async fn collect(s: Sources<'_>, wait: Duration) -> Stats {
    let depth = s.publisher.depth();
    let mut stats = Stats {
        node: s.node.to_owned(),
        uptime_s: started().elapsed().as_secs(),
        counters: COUNTERS.snapshot(),
        spool_events: depth.events,
        spool_bytes: depth.bytes,
        spool_oldest_age_ms: depth.oldest_age.map_or(0, |a| a.as_millis() as u64),
        groups: vec![],
        truncated: false,
        backends: [s.backends.redis.snapshot(), s.backends.postgres.snapshot()]
            .into_iter()
            .map(|b| BackendStats {
                name: b.name.to_owned(),
                address: b.address,
                up: b.up,
                since: b.since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                error: b.error,
            })
            .collect(),
    };
    let (Some(log), Some(streams)) = (s.backends.log.now(), s.backends.streams.now()) else { return stats };
    let consumers = s.engine.map(|e| e.local_consumers()).unwrap_or_default();
    let groups = async {
        let types = log.types_and_groups().await?;
        let dead: HashMap<(String, String), u64> = log.dead_letter_counts().await?;
        let mut out = Vec::new();
        let mut truncated = false;
        for (event_type, names) in types {
            if names.is_empty() {
                continue;
            }
            if out.len() + names.len() > MAX_GROUPS {
                truncated = true;
                break;
            }
            let redis = streams.group_stats(&event_type, &names).await?;
            for (name, g) in names.into_iter().zip(redis) {
                let key = (event_type.clone(), name.clone());
                out.push(GroupStats {
                    lag: g.lag,
                    pending: g.pending,
                    oldest_pending_ms: g.oldest_pending_ms,
                    dead_letters: g.dead_letters + dead.get(&key).copied().unwrap_or(0),
                    consumers: consumers.get(&key).copied().unwrap_or(0),
                    scheduled: g.scheduled,
                    event_type: event_type.clone(),
                    group: name,
                });
            }
        }
        Ok::<_, GroupsError>((out, truncated))
    };
    match tokio::time::timeout(wait, groups).await {
        Ok(Ok((groups, truncated))) => {
            stats.groups = groups;
            stats.truncated = truncated;
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "stats without groups"),
        Err(_) => tracing::debug!("stats without groups: the backends are slow"),
    }
    stats
}
