//! Looking after the streams: what the groups have acknowledged (`lua/checkpoint.lua`, the raw
//! material of their checkpoints), trimming below what they need, the janitor's lock, the
//! groups' state for `stats`, and the dead-letter streams (read, forget once recorded in the
//! log, redrive).

use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use super::{CONSUMER_IDLE_REMOVE_MS, GroupKeys, Streams, StreamsError, TRIM_STEP, bad, err, int_of, str_of};

/// A bound on what a group has not acknowledged of one lane's entries in one stream (see
/// `lua/checkpoint.lua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneBound {
    /// Everything the lane added there was acknowledged; the last entry's event id (for the
    /// `delay` lane, its due time in ms).
    After(String),
    /// Nothing unacknowledged comes before the entry with this event id (due time).
    At(String),
    /// The lane's index is missing: no bound.
    Unknown,
}

/// What the groups of a type have acknowledged, as read in one atomic look at Redis.
#[derive(Debug, Clone, Default)]
pub struct CheckpointState {
    /// The epoch, if Redis has one.
    pub epoch: Option<String>,
    /// The Redis clock, ms since the epoch.
    pub now_ms: i64,
    /// The earliest due time in the type's delay zset.
    pub first_due_ms: Option<i64>,
    /// Per group: its bounds per lane in the type's stream and in its replay stream (`None`
    /// where the group is missing).
    pub groups: Vec<GroupCheckpoint>,
}

/// One group's part of a [`CheckpointState`].
#[derive(Debug, Clone, Default)]
pub struct GroupCheckpoint {
    /// The group.
    pub group: String,
    /// (lane, bound) in the type's stream.
    pub live: Option<Vec<(String, LaneBound)>>,
    /// (lane, bound) in the group's replay stream.
    pub replay: Option<Vec<(String, LaneBound)>>,
}

fn parse_checkpoint(v: Value) -> Option<CheckpointState> {
    let Value::Array(items) = v else { return None };
    let mut it = items.into_iter();
    let epoch = match it.next()? {
        Value::Nil => None,
        other => Some(str_of(&other)?),
    };
    let now_ms = int_of(&it.next()?)?;
    let first_due = int_of(&it.next()?)?;
    let lanes = |v: Value| -> Option<Option<Vec<(String, LaneBound)>>> {
        match v {
            Value::Nil => Some(None),
            Value::Array(rows) => rows
                .into_iter()
                .map(|row| {
                    let Value::Array(parts) = row else { return None };
                    let [lane, kind, value] = <[Value; 3]>::try_from(parts).ok()?;
                    let value = str_of(&value).unwrap_or_default();
                    let bound = match str_of(&kind)?.as_str() {
                        "after" => LaneBound::After(value),
                        "at" => LaneBound::At(value),
                        _ => LaneBound::Unknown,
                    };
                    Some((str_of(&lane)?, bound))
                })
                .collect::<Option<Vec<_>>>()
                .map(Some),
            // An empty Lua table comes back as an empty array; `false` as nil.
            _ => None,
        }
    };
    let mut groups = Vec::new();
    for g in it {
        let Value::Array(parts) = g else { return None };
        let [name, live, replay] = <[Value; 3]>::try_from(parts).ok()?;
        groups.push(GroupCheckpoint { group: str_of(&name)?, live: lanes(live)?, replay: lanes(replay)? });
    }
    Some(CheckpointState { epoch, now_ms, first_due_ms: (first_due >= 0).then_some(first_due), groups })
}

/// A group's state in Redis, for `stats`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupState {
    /// Entries not yet read by the group.
    pub lag: u64,
    /// Delivered, not acknowledged, and held by a consumer (not waiting in the retry schedule).
    pub pending: u64,
    /// How long the oldest of those has been idle.
    pub oldest_pending_ms: u64,
    /// Dead letters not yet copied into the log.
    pub dead_letters: u64,
    /// Entries waiting in the retry schedule.
    pub scheduled: u64,
}

/// One dead letter.
#[derive(Debug, Clone, Default)]
pub struct DeadLetter {
    /// Its entry id in the dead-letter stream.
    pub entry: String,
    /// The failed attempts as JSON: `[{attempt, error, at}]`.
    pub history: String,
    /// The encoded event.
    pub event: Bytes,
    /// The last error.
    pub error: String,
    /// Failed attempts.
    pub attempts: u32,
    /// When it was dead-lettered (ms since the epoch, Redis clock).
    pub failed_at_ms: i64,
}

impl Streams {
    /// What the groups of a type have acknowledged (see `lua/checkpoint.lua`): the raw material
    /// of their checkpoints.
    pub async fn checkpoint_state(&self, event_type: &str, groups: &[String]) -> Result<CheckpointState, StreamsError> {
        let mut inv = self.scripts.checkpoint.prepare_invoke();
        inv.key(self.stream_key(event_type)).key(self.delay_key(event_type)).key(self.epoch_key());
        for g in groups {
            inv.key(self.replay_keys(event_type, g).stream).arg(g.as_str());
        }
        let v: Value = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("checkpoint"))?;
        parse_checkpoint(v).ok_or_else(|| bad("checkpoint", "reply shape"))
    }

    /// Trims a type's stream below what its groups still need, at most [`TRIM_STEP`] entries per
    /// call; `known_groups` are the groups the event log records for the type. Returns entries
    /// removed (call again while it is [`TRIM_STEP`]), or `None` when a known group is missing in
    /// Redis (nothing is trimmed then).
    pub async fn trim(&self, event_type: &str, known_groups: &[String]) -> Result<Option<u64>, StreamsError> {
        let mut inv = self.scripts.trim.prepare_invoke();
        inv.key(self.stream_key(event_type)).arg(CONSUMER_IDLE_REMOVE_MS).arg(TRIM_STEP);
        for g in known_groups {
            inv.arg(g);
        }
        let n: i64 = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("trim"))?;
        Ok((n >= 0).then_some(n as u64))
    }

    /// Takes a lock shared by all daemons for `ttl` (no release: it just expires).
    pub async fn try_lock(&self, name: &str, ttl: Duration) -> Result<bool, StreamsError> {
        let v: Value = redis::cmd("SET")
            .arg(format!("{}:lock:{name}", self.ns))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(err("lock"))?;
        Ok(v != Value::Nil)
    }

    /// The state of `groups` of a type's live stream (see `lua/stats.lua`), in their order.
    pub async fn group_stats(&self, event_type: &str, groups: &[String]) -> Result<Vec<GroupState>, StreamsError> {
        let mut inv = self.scripts.stats.prepare_invoke();
        inv.key(self.stream_key(event_type));
        for g in groups {
            let keys = self.group_keys(event_type, g);
            inv.key(keys.dead).key(keys.retry).arg(g.as_str());
        }
        let rows: Vec<(i64, i64, i64, i64, i64)> = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("stats"))?;
        Ok(rows
            .into_iter()
            .map(|(lag, pending, idle, dead, scheduled)| GroupState {
                lag: lag.max(0) as u64,
                pending: pending.max(0) as u64,
                oldest_pending_ms: idle.max(0) as u64,
                dead_letters: dead.max(0) as u64,
                scheduled: scheduled.max(0) as u64,
            })
            .collect())
    }

    /// Entries of a group's dead-letter stream, oldest first (for tests and admin tools).
    pub async fn dead_letters(&self, event_type: &str, group: &str, count: usize) -> Result<Vec<DeadLetter>, StreamsError> {
        let v: Value = redis::cmd("XRANGE")
            .arg(self.dead_letter_key(event_type, group))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(err("dead letters"))?;
        let Value::Array(items) = v else {
            return Err(bad("dead letters", v));
        };
        items
            .into_iter()
            .map(|item| {
                let Value::Array(parts) = item else {
                    return Err(bad("dead letters", item));
                };
                let mut p = parts.into_iter();
                let (Some(id), Some(Value::Array(fields))) = (p.next(), p.next()) else {
                    return Err(bad("dead letters", "entry"));
                };
                let mut d = DeadLetter { entry: str_of(&id).unwrap_or_default(), ..DeadLetter::default() };
                for pair in fields.chunks(2) {
                    let [k, v] = pair else { continue };
                    match (str_of(k).as_deref(), v) {
                        (Some("e"), Value::BulkString(b)) => d.event = Bytes::from(b.clone()),
                        (Some("error"), v) => d.error = str_of(v).unwrap_or_default(),
                        (Some("attempts"), v) => d.attempts = int_of(v).unwrap_or(0) as u32,
                        (Some("failed_at"), v) => d.failed_at_ms = int_of(v).unwrap_or(0),
                        (Some("history"), v) => d.history = str_of(v).unwrap_or_default(),
                        _ => {}
                    }
                }
                Ok(d)
            })
            .collect()
    }

    /// Removes entries of a group's dead-letter stream (once the log has recorded them).
    pub async fn forget_dead_letters(&self, event_type: &str, group: &str, entries: &[&str]) -> Result<(), StreamsError> {
        if entries.is_empty() {
            return Ok(());
        }
        redis::cmd("XDEL")
            .arg(self.dead_letter_key(event_type, group))
            .arg(entries)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(err("forget dead letters"))
    }

    /// Puts events back in front of one group's consumers: added to its replay lane, as new
    /// entries (so with a fresh attempt count).
    pub async fn redrive(&self, keys: &GroupKeys, events: &[&[u8]]) -> Result<(), StreamsError> {
        let mut pipe = redis::pipe();
        for e in events {
            pipe.cmd("XADD").arg(&keys.stream).arg("*").arg("e").arg(*e).ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone()).await.map_err(err("redrive"))
    }
}
