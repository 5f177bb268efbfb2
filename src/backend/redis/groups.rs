//! The lifecycle of groups in Redis: the subscribing daemons' leases (`lua/lease.lua`), what
//! `groups` shows of each group (live subscriptions, last activity), deleting a group
//! (`lua/group_delete.lua`) and moving its read position (`lua/group_reset.lua`).

use std::time::Duration;

use redis::Value;

use super::{GroupKeys, Streams, StreamsError, bad, err, int_of, str_of};

/// How often a daemon with subscriptions to a group says so again.
pub const LEASE_HEARTBEAT: Duration = Duration::from_secs(5);
/// A lease record whose heartbeat is at most this old stands for live subscriptions.
pub const LEASE_LIVE: Duration = Duration::from_secs(15);
/// A lease record silent this long is forgotten: past the longest ack timeout (24 h) with room.
pub const LEASE_FORGET: Duration = Duration::from_secs(48 * 3600);

/// Where `group_reset` moves a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetPoint {
    /// After the last entry.
    End,
    /// Before the first entry Redis holds.
    Start,
    /// After this entry id (entries added at or after a time: the id just before it).
    After(String),
}

/// A group's activity as Redis knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Live subscriptions on every daemon (lease records with a recent heartbeat).
    pub consumers: u64,
    /// When it last had a subscription, was created or was reset (ms, Redis clock).
    pub last_active_ms: Option<i64>,
}

fn parse_lease(v: &str) -> Option<(u64, u64, i64)> {
    let mut p = v.split(':');
    let ack = p.next()?.parse().ok()?;
    let subs = p.next()?.parse().ok()?;
    let beat = p.next()?.parse().ok()?;
    Some((ack, subs, beat))
}

impl Streams {
    /// Records (or renews) this daemon's lease on a group: the longest ack timeout of its `subs`
    /// subscriptions to it. `token` names the writer, so that only it drops the record.
    pub async fn record_lease(
        &self,
        keys: &GroupKeys,
        consumer: &str,
        ack: Duration,
        subs: usize,
        token: &str,
    ) -> Result<(), StreamsError> {
        self.lease_call(keys, consumer, ack, subs, token, "set").await
    }

    /// Drops this daemon's lease on a group (its last subscription there ended), unless a newer
    /// writer replaced it.
    pub async fn drop_lease(&self, keys: &GroupKeys, consumer: &str, token: &str) -> Result<(), StreamsError> {
        self.lease_call(keys, consumer, Duration::ZERO, 0, token, "drop").await
    }

    async fn lease_call(
        &self,
        keys: &GroupKeys,
        consumer: &str,
        ack: Duration,
        subs: usize,
        token: &str,
        mode: &str,
    ) -> Result<(), StreamsError> {
        let mut inv = self.scripts.lease.prepare_invoke();
        inv.key(&keys.leases).key(&keys.settings);
        inv.arg(consumer).arg(ack.as_millis() as u64).arg(subs).arg(token).arg(mode).arg(LEASE_FORGET.as_millis() as u64);
        inv.invoke_async::<i64>(&mut self.conn.clone()).await.map_err(err("lease"))?;
        Ok(())
    }

    /// The activity of `groups` of a type, in their order, and the Redis clock (ms).
    pub async fn group_activity(&self, event_type: &str, groups: &[String]) -> Result<(Vec<Activity>, i64), StreamsError> {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for g in groups {
            let keys = self.group_keys(event_type, g);
            pipe.cmd("HGETALL").arg(&keys.leases).cmd("HGET").arg(&keys.settings).arg("active");
        }
        let v: Vec<Value> = pipe.query_async(&mut self.conn.clone()).await.map_err(err("group activity"))?;
        let mut it = v.into_iter();
        let now = match it.next() {
            Some(Value::Array(t)) if t.len() == 2 => int_of(&t[0]).unwrap_or(0) * 1000 + int_of(&t[1]).unwrap_or(0) / 1000,
            other => return Err(bad("group activity", other)),
        };
        let mut out = Vec::with_capacity(groups.len());
        while let (Some(leases), Some(active)) = (it.next(), it.next()) {
            let mut a = Activity { consumers: 0, last_active_ms: int_of(&active) };
            let pairs: Vec<(Value, Value)> = match leases {
                Value::Map(m) => m,
                Value::Array(f) => {
                    let mut f = f.into_iter();
                    std::iter::from_fn(|| Some((f.next()?, f.next()?))).collect()
                }
                _ => vec![],
            };
            for (_, v) in pairs {
                let Some((_, subs, beat)) = str_of(&v).as_deref().and_then(parse_lease) else { continue };
                if now - beat <= LEASE_LIVE.as_millis() as i64 {
                    a.consumers += subs;
                    a.last_active_ms = Some(a.last_active_ms.map_or(now, |t| t.max(now)));
                }
            }
            out.push(a);
        }
        Ok((out, now))
    }

    /// True when the group exists on its type's stream.
    pub async fn group_exists(&self, event_type: &str, group: &str) -> Result<bool, StreamsError> {
        let keys = self.group_keys(event_type, group);
        let v: Result<Value, _> = redis::cmd("XINFO").arg("GROUPS").arg(&keys.stream).query_async(&mut self.conn.clone()).await;
        let groups = match v {
            Ok(Value::Array(g)) => g,
            Ok(_) => return Ok(false),
            Err(e) if e.code().is_some() => return Ok(false),
            Err(e) => return Err(StreamsError::Redis { op: "find group", source: e }),
        };
        Ok(groups.iter().any(|g| {
            let fields: Vec<&Value> = match g {
                Value::Array(f) => f.iter().collect(),
                Value::Map(m) => m.iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => vec![],
            };
            fields.chunks(2).any(|p| matches!(p, [k, v] if str_of(k).as_deref() == Some("name") && str_of(v).as_deref() == Some(group)))
        }))
    }

    /// Removes a group from Redis (see `lua/group_delete.lua`); true when it existed there.
    pub async fn delete_group(&self, event_type: &str, group: &str) -> Result<bool, StreamsError> {
        let live = self.group_keys(event_type, group);
        let replay = self.replay_keys(event_type, group);
        let mut inv = self.scripts.group_delete.prepare_invoke();
        inv.key(&live.stream)
            .key(&replay.stream)
            .key(&live.retry)
            .key(&replay.retry)
            .key(&live.attempts)
            .key(&replay.attempts)
            .key(&live.dead)
            .key(&live.settings)
            .key(&live.leases)
            .arg(group);
        let n: i64 = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("delete group"))?;
        Ok(n == 1)
    }

    /// Moves a group's read position on its type's stream; the entry id it now reads after.
    /// An error for which `is_nogroup` holds when the group is not in Redis.
    pub async fn reset_group(&self, event_type: &str, group: &str, to: &ResetPoint) -> Result<String, StreamsError> {
        let keys = self.group_keys(event_type, group);
        let mut inv = self.scripts.group_reset.prepare_invoke();
        let to = match to {
            ResetPoint::End => "end",
            ResetPoint::Start => "start",
            ResetPoint::After(id) => id.as_str(),
        };
        inv.key(&keys.stream).arg(&*keys.group).arg(to);
        let id: String = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("reset group"))?;
        let now = self.redis_now().await?.timestamp_millis();
        redis::cmd("HSET")
            .arg(&keys.settings)
            .arg("active")
            .arg(now)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(err("group settings"))?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_record_reads_back() {
        assert_eq!(parse_lease("2000:3:1795766400000:abc"), Some((2000, 3, 1795766400000)));
        assert_eq!(parse_lease("2000:x:1"), None);
        assert_eq!(parse_lease(""), None);
    }
}
