//! Delivering: consumer groups on a type's stream and replay stream, blocking reads of new
//! entries, due retries, failures (`lua/fail.lua`: retry with backoff or dead-letter), acks,
//! lease extensions, and reclaiming the deliveries of a daemon that stopped answering.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};

use super::{COMMAND_TIMEOUT, GroupKeys, LaneKind, Streams, StreamsError, bad, err, int_of, str_of};
use crate::config::Backoff;

/// One stream entry: its id and the encoded event.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The stream id (`ms-seq`).
    pub id: String,
    /// The encoded event (field `e`).
    pub event: Bytes,
    /// Failed attempts so far (0 for a new entry).
    pub failed: u32,
}

/// What became of a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Scheduled again; `due_in` from now on the Redis clock.
    Retry {
        /// Failed attempts so far.
        attempts: u32,
        /// Until the retry is due.
        due_in: Duration,
    },
    /// Moved to the dead-letter stream.
    Dead {
        /// Failed attempts.
        attempts: u32,
    },
}

/// One delivery to end without success (see `fail` in `lua/lib.lua`).
#[derive(Debug, Clone)]
pub struct Failure {
    /// The stream entry id.
    pub id: String,
    /// The attempt failed (true) or the delivery is only released (false).
    pub count: bool,
    /// Straight to the dead letters.
    pub dead: bool,
    /// Why, kept as the last error.
    pub error: String,
    /// Retry after this delay instead of the backoff.
    pub delay: Option<Duration>,
    /// Dead-letter after this many failed attempts.
    pub max_attempts: u32,
}

impl Failure {
    /// Puts a delivery back in front of its group at once without counting an attempt
    /// (unsubscribe, shutdown, or a worker that could not hand it out).
    pub fn release(id: String) -> Failure {
        Failure { id, count: false, dead: false, error: String::new(), delay: Some(Duration::ZERO), max_attempts: u32::MAX }
    }
}

/// The result of taking due retries.
#[derive(Debug, Default)]
pub struct Due {
    /// The claimed entries.
    pub entries: Vec<Entry>,
    /// Until the next scheduled retry (on the Redis clock), if any.
    pub next_in: Option<Duration>,
}

/// One step of the scan for deliveries to reclaim.
#[derive(Debug, Clone, Copy)]
pub struct ReclaimScan<'a> {
    /// The lease of a holder that recorded none, when no daemon's lease is live either.
    pub default_lease: Duration,
    /// Where to continue the scan of the pending list (`0-0` from the start).
    pub cursor: &'a str,
    /// Most entries to look at.
    pub count: usize,
    /// Dead-letter those that reach this many failed attempts.
    pub max_attempts: u32,
}

/// What one reclaim step did.
#[derive(Debug, Clone)]
pub struct Reclaimed {
    /// Where the next step goes on (`0-0`: the scan went round).
    pub cursor: String,
    /// Deliveries taken over.
    pub reclaimed: u64,
    /// The shortest lease a daemon recorded for the group (how soon to look again).
    pub shortest_lease: Option<Duration>,
}

/// A connection reserved for `XREADGROUP … BLOCK`: its response timeout is longer than the
/// block, and a blocked command would stall every command queued behind it on a shared one.
pub struct BlockingReader {
    conn: MultiplexedConnection,
    /// The connection's Redis client id, for `CLIENT UNBLOCK`.
    pub client_id: i64,
}

impl BlockingReader {
    /// Reads up to `count` new entries of a group for `consumer` from each of its lanes (the
    /// type's stream and the group's replay stream), waiting up to `block` for either.
    pub async fn read_new(
        &mut self,
        live: &GroupKeys,
        replay: &GroupKeys,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(LaneKind, Entry)>, StreamsError> {
        let v: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&*live.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&live.stream)
            .arg(&replay.stream)
            .arg(">")
            .arg(">")
            .query_async(&mut self.conn)
            .await
            .map_err(err("read"))?;
        let streams = match v {
            Value::Nil => return Ok(vec![]),
            Value::Array(s) => s,
            other => return Err(bad("read", other)),
        };
        let mut out = Vec::new();
        for s in streams {
            let Value::Array(parts) = s else {
                return Err(bad("read", s));
            };
            let mut parts = parts.into_iter();
            let (Some(name), Some(Value::Array(entries))) = (parts.next(), parts.next()) else {
                return Err(bad("read", "stream"));
            };
            let lane = if str_of(&name).as_deref() == Some(replay.stream.as_str()) { LaneKind::Replay } else { LaneKind::Live };
            for e in entries {
                let Value::Array(p) = e else {
                    return Err(bad("read", e));
                };
                let mut p = p.into_iter();
                let (Some(id), Some(fields)) = (p.next(), p.next()) else {
                    return Err(bad("read", "entry"));
                };
                out.push((lane, parse_entry(id, fields).ok_or_else(|| bad("read", "entry fields"))?));
            }
        }
        Ok(out)
    }
}

fn parse_entry(id: Value, fields: Value) -> Option<Entry> {
    let id = str_of(&id)?;
    let Value::Array(fields) = fields else {
        return None;
    };
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let (Some("e"), Value::BulkString(b)) = (str_of(&k).as_deref(), v) {
            return Some(Entry { id, event: Bytes::from(b), failed: 0 });
        }
    }
    None
}

impl Streams {
    /// Creates the group on its type's stream, unless it exists: at the end of the stream for
    /// a new group (it receives what is published from now on), at the start for a group the
    /// log already knows (it existed before, so it must not skip what the stream holds: after
    /// Redis lost its data, the spool's flushers add again what it had not received). Also
    /// creates the group's replay lane, and marks the group active when nothing did before. It
    /// never touches a lease: only subscriptions record those (see `record_lease`). Returns true
    /// when the group was missing in Redis.
    pub async fn ensure_group(&self, keys: &GroupKeys, known: bool) -> Result<bool, StreamsError> {
        let mut conn = self.conn.clone();
        let replay = self.replay_keys(&keys.event_type, &keys.group);
        let mut created = false;
        for (stream, start) in [(&keys.stream, if known { "0" } else { "$" }), (&replay.stream, "0")] {
            let r: Result<(), RedisError> =
                redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(&*keys.group).arg(start).arg("MKSTREAM").query_async(&mut conn).await;
            match r {
                Ok(()) => created |= stream == &keys.stream,
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(StreamsError::Redis { op: "create group", source: e }),
            }
        }
        let now = self.redis_now().await?.timestamp_millis();
        redis::cmd("HSETNX")
            .arg(&keys.settings)
            .arg("active")
            .arg(now)
            .query_async::<()>(&mut conn)
            .await
            .map_err(err("group settings"))?;
        Ok(created)
    }

    /// Acknowledges entries of one group; `clear` are those with attempt state to remove.
    pub async fn ack(&self, keys: &GroupKeys, ids: &[&str], clear: &[&str]) -> Result<(), StreamsError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(&keys.stream).arg(&*keys.group).arg(ids).ignore();
        if !clear.is_empty() {
            pipe.cmd("HDEL").arg(&keys.attempts);
            for id in clear {
                pipe.arg(*id).arg(format!("{id}:e")).arg(format!("{id}:h"));
            }
            pipe.ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone()).await.map_err(err("ack"))
    }

    /// Ends deliveries of one group without success: each is scheduled again or dead-lettered.
    pub async fn fail(&self, keys: &GroupKeys, backoff: &Backoff, failures: &[Failure]) -> Result<Vec<FailOutcome>, StreamsError> {
        let mut inv = self.scripts.fail.prepare_invoke();
        inv.key(&keys.stream).key(&keys.retry).key(&keys.attempts).key(&keys.dead);
        inv.arg(&*keys.group).arg(backoff.initial.as_millis() as u64).arg(backoff.factor).arg(backoff.max.as_millis() as u64);
        for f in failures {
            let delay = f.delay.map_or(-1, |d| d.as_millis() as i64);
            inv.arg(&f.id)
                .arg(u8::from(f.count))
                .arg(u8::from(f.dead))
                .arg(&f.error)
                .arg(delay)
                .arg(rand::random::<f64>())
                .arg(f.max_attempts);
        }
        let v: Value = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("fail"))?;
        let Value::Array(mut items) = v else {
            return Err(bad("fail", v));
        };
        let now = match items.pop() {
            Some(Value::Int(n)) => n,
            other => return Err(bad("fail", other)),
        };
        items
            .into_iter()
            .map(|item| match item {
                Value::Array(r) => match r.as_slice() {
                    [Value::Int(1), Value::Int(n), ..] => Ok(FailOutcome::Dead { attempts: *n as u32 }),
                    [Value::Int(0), Value::Int(n), Value::Int(due)] => {
                        Ok(FailOutcome::Retry { attempts: *n as u32, due_in: Duration::from_millis(due.saturating_sub(now).max(0) as u64) })
                    }
                    other => Err(bad("fail", other)),
                },
                other => Err(bad("fail", other)),
            })
            .collect()
    }

    /// Takes up to `count` due retries of the group and claims them for `consumer`.
    pub async fn pop_due(&self, keys: &GroupKeys, consumer: &str, count: usize) -> Result<Due, StreamsError> {
        let mut inv = self.scripts.pop_due.prepare_invoke();
        inv.key(&keys.retry).key(&keys.stream).key(&keys.attempts).arg(&*keys.group).arg(consumer).arg(count);
        let v: Value = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("pop due"))?;
        let Value::Array(items) = v else {
            return Err(bad("pop due", v));
        };
        let mut it = items.into_iter();
        let (Some(Value::Int(now)), Some(Value::Int(next))) = (it.next(), it.next()) else {
            return Err(bad("pop due", "header"));
        };
        let mut due =
            Due { entries: Vec::new(), next_in: (next >= 0).then(|| Duration::from_millis(next.saturating_sub(now).max(0) as u64)) };
        for item in it {
            let Value::Array(parts) = item else {
                return Err(bad("pop due", item));
            };
            let mut p = parts.into_iter();
            let (Some(id), Some(fields), Some(att)) = (p.next(), p.next(), p.next()) else {
                return Err(bad("pop due", "entry"));
            };
            let mut entry = parse_entry(id, fields).ok_or_else(|| bad("pop due", "entry fields"))?;
            entry.failed = int_of(&att).unwrap_or(0) as u32;
            due.entries.push(entry);
        }
        Ok(due)
    }

    /// Reclaims deliveries whose holder stopped answering: held longer than its lease plus a
    /// margin (see `lua/reclaim.lua` and [`ReclaimScan`]).
    pub async fn reclaim(
        &self,
        keys: &GroupKeys,
        consumer: &str,
        scan: ReclaimScan<'_>,
        backoff: &Backoff,
    ) -> Result<Reclaimed, StreamsError> {
        let ReclaimScan { default_lease, cursor, count, max_attempts } = scan;
        let mut inv = self.scripts.reclaim.prepare_invoke();
        inv.key(&keys.stream).key(&keys.retry).key(&keys.attempts).key(&keys.dead).key(&keys.leases).key(&keys.settings);
        inv.arg(&*keys.group)
            .arg(consumer)
            .arg(default_lease.as_millis() as u64)
            .arg(cursor)
            .arg(count)
            .arg(backoff.initial.as_millis() as u64)
            .arg(backoff.factor)
            .arg(backoff.max.as_millis() as u64)
            .arg(max_attempts)
            .arg(rand::random::<f64>())
            .arg(super::LEASE_LIVE.as_millis() as u64);
        let v: Value = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("reclaim"))?;
        match v {
            Value::Array(r) if r.len() == 4 => {
                let cursor = str_of(&r[0]).ok_or_else(|| bad("reclaim", &r[0]))?;
                let shortest = int_of(&r[3]).unwrap_or(-1);
                Ok(Reclaimed {
                    cursor,
                    reclaimed: int_of(&r[1]).unwrap_or(0) as u64,
                    shortest_lease: (shortest >= 0).then(|| Duration::from_millis(shortest as u64)),
                })
            }
            other => Err(bad("reclaim", other)),
        }
    }

    /// Restarts the Redis idle time of entries this consumer holds (a lease was extended), so
    /// no other daemon reclaims them.
    pub async fn touch(&self, keys: &GroupKeys, consumer: &str, ids: &[&str]) -> Result<(), StreamsError> {
        redis::cmd("XCLAIM")
            .arg(&keys.stream)
            .arg(&*keys.group)
            .arg(consumer)
            .arg(0)
            .arg(ids)
            .arg("JUSTID")
            .query_async::<Value>(&mut self.conn.clone())
            .await
            .map_err(err("touch"))?;
        Ok(())
    }

    /// Unblocks a blocked reader (by its client id) so that it re-plans at once.
    pub async fn unblock(&self, client_id: i64) -> Result<(), StreamsError> {
        redis::cmd("CLIENT").arg("UNBLOCK").arg(client_id).query_async::<Value>(&mut self.conn.clone()).await.map_err(err("unblock"))?;
        Ok(())
    }

    /// A connection of its own for blocking reads.
    pub async fn blocking_reader(&self, block: Duration) -> Result<BlockingReader, StreamsError> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(block + COMMAND_TIMEOUT));
        let mut conn = self.conn.client().get_multiplexed_async_connection_with_config(&cfg).await.map_err(err("connect reader"))?;
        let client_id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut conn).await.map_err(err("client id"))?;
        Ok(BlockingReader { conn, client_id })
    }

    /// Entries of a group's replay lane not yet given to it (the replayer keeps this small).
    pub async fn replay_lag(&self, keys: &GroupKeys) -> Result<u64, StreamsError> {
        let v: Value =
            redis::cmd("XINFO").arg("GROUPS").arg(&keys.stream).query_async(&mut self.conn.clone()).await.map_err(err("replay lag"))?;
        let Value::Array(groups) = v else { return Ok(0) };
        for g in groups {
            let fields = match g {
                Value::Array(f) => f,
                Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => continue,
            };
            let mut name = None;
            let (mut lag, mut pending) = (0, 0);
            for pair in fields.chunks(2) {
                if let [k, v] = pair {
                    match str_of(k).as_deref() {
                        Some("name") => name = str_of(v),
                        Some("lag") => lag = int_of(v).unwrap_or(0),
                        Some("pending") => pending = int_of(v).unwrap_or(0),
                        _ => {}
                    }
                }
            }
            if name.as_deref() == Some(&*keys.group) {
                return Ok((lag + pending).max(0) as u64);
            }
        }
        Ok(0)
    }
}
