//! The Redis side: one stream per event type, one Redis consumer group per sidebus group, and
//! per group a retry schedule, attempt counts and a dead-letter stream. The only file that sends
//! Redis commands; the multi-step operations are Lua scripts in `src/lua/` so that each is
//! atomic (two daemons never take the same retry, a dead letter is never half moved).
//!
//! Keys (`{ns}` is the configured namespace; see ARCHITECTURE.md for the table):
//! `{ns}:s:{type}` stream, `{ns}:r:{type}:{group}` retry zset, `{ns}:a:{type}:{group}` attempts
//! hash, `{ns}:d:{type}:{group}` dead letters, `{ns}:g:{type}:{group}` group settings,
//! `{ns}:hw:{lane}` publish lane high-water marks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisError, Script, Value};

use crate::config::Backoff;

/// How long a lane's high-water mark outlives the lane's last add: a batch re-run within this
/// time adds nothing twice.
pub const LANE_MARK_TTL_SECS: u64 = 7 * 24 * 3600;
/// Most events added to the streams by one script call.
pub const ADD_CHUNK: usize = 512;
/// Most stream entries one trim call removes: a few milliseconds of Redis time.
pub const TRIM_STEP: u64 = 10_000;
/// Consumers that hold nothing and have been idle this long are removed by the trimmer.
pub const CONSUMER_IDLE_REMOVE_MS: u64 = 24 * 3600 * 1000;
/// The lanes' index of a stream (see `lua/publish.lua`) starts at most one block per lane per
/// this many ms: a checkpoint is at most one block behind what its group acknowledged.
pub const INDEX_BLOCK_MS: u64 = 100;
/// Response timeout of ordinary (non-blocking) commands.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// A Redis failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    /// A command failed or the connection is down.
    #[error("redis {op}: {source}")]
    Redis {
        /// The operation.
        op: &'static str,
        /// The client error.
        source: RedisError,
    },
    /// A reply had an unexpected shape (a script and this code disagree).
    #[error("redis {op}: unexpected reply {detail}")]
    Reply {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
}

impl StreamsError {
    /// True when the group (or its stream) is missing: Redis lost it or it was deleted.
    pub fn is_nogroup(&self) -> bool {
        matches!(self, StreamsError::Redis { source, .. } if source.code() == Some("NOGROUP"))
    }

    /// True when Redis has no epoch: it lost its data and is not recovered yet (nothing was
    /// added).
    pub fn is_noepoch(&self) -> bool {
        matches!(self, StreamsError::Redis { source, .. } if source.code() == Some("NOEPOCH"))
    }

    /// The epoch Redis has, when it is not the one the caller expected (nothing was added).
    pub fn epoch_changed(&self) -> Option<&str> {
        match self {
            StreamsError::Redis { source, .. } if source.code() == Some("EPOCHCHANGED") => source.detail(),
            _ => None,
        }
    }
}

fn err(op: &'static str) -> impl FnOnce(RedisError) -> StreamsError {
    move |source| StreamsError::Redis { op, source }
}

fn bad(op: &'static str, detail: impl std::fmt::Debug) -> StreamsError {
    StreamsError::Reply { op, detail: format!("{detail:?}") }
}

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

/// Which stream of a group a delivery comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LaneKind {
    /// The type's stream, shared by every group.
    Live,
    /// The group's own replay stream.
    Replay,
}

/// The Redis key names of one lane of one (type, group): the type's stream (live) or the
/// group's replay stream, each with its own retry schedule and attempt counts, and the group's
/// dead letters and settings, which both share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKeys {
    /// The event type.
    pub event_type: Arc<str>,
    /// The group.
    pub group: Arc<str>,
    /// Live or replay.
    pub lane: LaneKind,
    /// Stream key.
    pub stream: String,
    retry: String,
    attempts: String,
    dead: String,
    settings: String,
}

struct Scripts {
    publish: Script,
    move_due: Script,
    restore: Script,
    stats: Script,
    checkpoint: Script,
    fail: Script,
    pop_due: Script,
    reclaim: Script,
    trim: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let lib = include_str!("lua/lib.lua");
        let with_lib = |body: &str| Script::new(&format!("{lib}\n{body}"));
        Scripts {
            publish: Script::new(include_str!("lua/publish.lua")),
            move_due: Script::new(include_str!("lua/move_due.lua")),
            restore: Script::new(include_str!("lua/restore.lua")),
            stats: Script::new(include_str!("lua/stats.lua")),
            checkpoint: Script::new(include_str!("lua/checkpoint.lua")),
            fail: with_lib(include_str!("lua/fail.lua")),
            pop_due: with_lib(include_str!("lua/pop_due.lua")),
            reclaim: with_lib(include_str!("lua/reclaim.lua")),
            trim: Script::new(include_str!("lua/trim.lua")),
        }
    }
}

/// A handle on Redis, cheap to clone. Ordinary commands share one multiplexed connection
/// (which pipelines concurrent commands); blocking reads each get a [`BlockingReader`].
#[derive(Clone)]
pub struct Streams {
    client: Client,
    conn: ConnectionManager,
    ns: Arc<str>,
    scripts: Arc<Scripts>,
    index_block_ms: u64,
}

impl Streams {
    /// Connects; fails when Redis does not answer (the caller retries).
    pub async fn connect(url: &str, namespace: &str) -> Result<Streams, StreamsError> {
        let client = Client::open(url).map_err(err("open"))?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = client.get_connection_manager_with_config(cfg).await.map_err(err("connect"))?;
        let mut s = Streams { client, conn, ns: namespace.into(), scripts: Arc::new(Scripts::new()), index_block_ms: INDEX_BLOCK_MS };
        redis::cmd("PING").query_async::<()>(&mut s.conn).await.map_err(err("ping"))?;
        Ok(s)
    }

    /// The same handle with another block length for the lanes' index (tests use 0: a block
    /// per add, the finest index).
    pub fn with_index_block(mut self, ms: u64) -> Streams {
        self.index_block_ms = ms;
        self
    }

    /// The stream key of a type.
    pub fn stream_key(&self, event_type: &str) -> String {
        format!("{}:s:{event_type}", self.ns)
    }

    /// The keys of the live lane of one (type, group).
    pub fn group_keys(&self, event_type: &str, group: &str) -> GroupKeys {
        let ns = &self.ns;
        GroupKeys {
            event_type: event_type.into(),
            group: group.into(),
            lane: LaneKind::Live,
            stream: self.stream_key(event_type),
            retry: format!("{ns}:r:{event_type}:{group}"),
            attempts: format!("{ns}:a:{event_type}:{group}"),
            dead: format!("{ns}:d:{event_type}:{group}"),
            settings: format!("{ns}:g:{event_type}:{group}"),
        }
    }

    /// The keys of the replay lane of one (type, group).
    pub fn replay_keys(&self, event_type: &str, group: &str) -> GroupKeys {
        let ns = &self.ns;
        GroupKeys {
            lane: LaneKind::Replay,
            stream: format!("{ns}:p:{event_type}:{group}"),
            retry: format!("{ns}:rp:{event_type}:{group}"),
            attempts: format!("{ns}:ap:{event_type}:{group}"),
            ..self.group_keys(event_type, group)
        }
    }

    /// The dead-letter stream of a group.
    pub fn dead_letter_key(&self, event_type: &str, group: &str) -> String {
        self.group_keys(event_type, group).dead
    }

    /// The Redis clock.
    pub async fn redis_now(&self) -> Result<chrono::DateTime<chrono::Utc>, StreamsError> {
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut self.conn.clone()).await.map_err(err("time"))?;
        chrono::DateTime::from_timestamp(secs, (micros * 1000) as u32).ok_or_else(|| bad("time", secs))
    }

    /// Round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StreamsError> {
        redis::cmd("PING").query_async::<()>(&mut self.conn.clone()).await.map_err(err("ping"))
    }

    /// Adds events of one publish lane to their streams, each at most once: `events` are
    /// (lane sequence number, type, due time in ms or 0, event id, encoded event) in sequence
    /// order, and what is at or below the lane's high-water mark was added before (a batch run
    /// again after a failure or a crash). They go in chunks of [`ADD_CHUNK`], so no single
    /// script holds Redis (single-threaded) for long.
    /// `expected` is the epoch the lane last added to (none: any): when Redis has another, it
    /// fails with [`StreamsError::epoch_changed`] before adding anything. Returns the number
    /// added and the epoch they went to.
    pub async fn add_batch(
        &self,
        lane: &uuid::Uuid,
        events: &[LaneEvent<'_>],
        expected: Option<&str>,
    ) -> Result<(u64, String), StreamsError> {
        let mut added = 0;
        let mut epoch = expected.unwrap_or_default().to_owned();
        let name = lane.simple().to_string();
        // A batch is mostly one type or a few: build each type's keys once.
        let mut keys: std::collections::HashMap<&str, (String, String)> = std::collections::HashMap::new();
        for chunk in events.chunks(ADD_CHUNK) {
            let mut inv = self.scripts.publish.prepare_invoke();
            inv.key(self.epoch_key()).key(format!("{}:hw:{name}", self.ns)).key(self.delayed_key());
            for ev in chunk {
                let (stream, delay) =
                    keys.entry(ev.event_type).or_insert_with(|| (self.stream_key(ev.event_type), self.delay_key(ev.event_type)));
                inv.key(stream.as_str()).key(delay.as_str());
            }
            inv.arg(LANE_MARK_TTL_SECS).arg(&name).arg(self.index_block_ms).arg(&epoch);
            for ev in chunk {
                inv.arg(ev.seq).arg(ev.due_ms).arg(ev.id).arg(ev.event);
            }
            let (n, e): (u64, String) = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("publish batch"))?;
            added += n;
            // Later chunks must go to the same data set.
            epoch = e;
        }
        Ok((added, epoch))
    }

    /// The zset of a type's delayed events (event → due time, ms).
    pub fn delay_key(&self, event_type: &str) -> String {
        format!("{}:z:{event_type}", self.ns)
    }

    /// The set of delay zsets that hold events.
    fn delayed_key(&self) -> String {
        format!("{}:delayed", self.ns)
    }

    /// Moves due delayed events into their streams, up to `max` per type; returns how many
    /// moved and how many types were looked at.
    pub async fn move_due(&self, max: usize) -> Result<(u64, usize), StreamsError> {
        let zsets: Vec<String> =
            redis::cmd("SMEMBERS").arg(self.delayed_key()).query_async(&mut self.conn.clone()).await.map_err(err("delayed"))?;
        let prefix = format!("{}:z:", self.ns);
        let mut moved = 0;
        for z in &zsets {
            let Some(t) = z.strip_prefix(&prefix) else { continue };
            let n: u64 = self
                .scripts
                .move_due
                .key(z)
                .key(self.stream_key(t))
                .key(self.delayed_key())
                .arg(max)
                .arg(self.index_block_ms)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(err("move due"))?;
            moved += n;
        }
        Ok((moved, zsets.len()))
    }

    /// Creates the group on its type's stream, unless it exists: at the end of the stream for
    /// a new group (it receives what is published from now on), at the start for a group the
    /// log already knows (it existed before, so it must not skip what the stream holds: after
    /// Redis lost its data, the spool's flushers add again what it had not received). Also
    /// creates the group's replay lane, and raises the group's ack timeout to at least
    /// `ack_timeout`. Returns true when the group was missing in Redis.
    pub async fn ensure_group(&self, keys: &GroupKeys, ack_timeout: Duration, known: bool) -> Result<bool, StreamsError> {
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
        // The reclaimer of every daemon waits for the longest ack timeout any subscriber of the
        // group asked for, so it never takes a delivery that is still within its lease.
        let ms = ack_timeout.as_millis() as u64;
        let current: Option<u64> =
            redis::cmd("HGET").arg(&keys.settings).arg("ack_timeout_ms").query_async(&mut conn).await.map_err(err("group settings"))?;
        if current.is_none_or(|c| c < ms) {
            redis::cmd("HSET")
                .arg(&keys.settings)
                .arg("ack_timeout_ms")
                .arg(ms)
                .query_async::<()>(&mut conn)
                .await
                .map_err(err("group settings"))?;
        }
        Ok(created)
    }

    fn epoch_key(&self) -> String {
        format!("{}:epoch", self.ns)
    }

    /// The epoch: a value the first daemon sets in a Redis and that only a loss of Redis's
    /// data removes.
    pub async fn epoch(&self) -> Result<Option<String>, StreamsError> {
        redis::cmd("GET").arg(self.epoch_key()).query_async(&mut self.conn.clone()).await.map_err(err("epoch"))
    }

    /// Sets the epoch unless it is set; true when this call set it.
    pub async fn claim_epoch(&self, value: &str) -> Result<bool, StreamsError> {
        let v: Value =
            redis::cmd("SET").arg(self.epoch_key()).arg(value).arg("NX").query_async(&mut self.conn.clone()).await.map_err(err("epoch"))?;
        Ok(v != Value::Nil)
    }

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

    /// Puts delayed events back on their type's schedule (a recovery: Redis lost them): each
    /// (due time in ms, encoded event) exactly as the flusher added it, so one already there
    /// is not added twice. Refused like a publish while Redis has no epoch.
    pub async fn restore_delayed(&self, event_type: &str, events: &[(i64, &[u8])]) -> Result<(), StreamsError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut inv = self.scripts.restore.prepare_invoke();
        inv.key(self.epoch_key()).key(self.delay_key(event_type)).key(self.delayed_key());
        for (due, e) in events {
            inv.arg(*due).arg(*e);
        }
        inv.invoke_async::<()>(&mut self.conn.clone()).await.map_err(err("restore delayed"))
    }

    /// Adds replayed events (number, event id, encoded event) to a group's replay stream, each
    /// at most once: `mark` names the replay's high-water mark, the last number added (numbers
    /// rise with each call). `lane` names the replay in the stream's index (see
    /// `lua/publish.lua`).
    pub async fn add_replayed(&self, mark: &str, lane: &str, keys: &GroupKeys, events: &[(i64, &str, &[u8])]) -> Result<u64, StreamsError> {
        let mut inv = self.scripts.publish.prepare_invoke();
        inv.key(self.epoch_key()).key(format!("{}:hw:{mark}", self.ns)).key(self.delayed_key());
        let delay = self.delay_key(&keys.event_type);
        for _ in events {
            inv.key(&keys.stream).key(&delay);
        }
        // A block per call (a page of the replay): a replay adds thousands of entries within
        // milliseconds, and its group's checkpoint should move on page by page as they are
        // acknowledged, not only once the whole replay is.
        inv.arg(LANE_MARK_TTL_SECS).arg(lane).arg(0).arg("");
        for (seq, id, e) in events {
            // Replayed events are due now.
            inv.arg(*seq).arg(0).arg(*id).arg(*e);
        }
        let (n, _): (u64, String) = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("add replayed"))?;
        Ok(n)
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

    /// The longest ack timeout a subscriber of the group asked for.
    pub async fn group_ack_timeout(&self, keys: &GroupKeys) -> Result<Option<Duration>, StreamsError> {
        let ms: Option<u64> = redis::cmd("HGET")
            .arg(&keys.settings)
            .arg("ack_timeout_ms")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(err("group settings"))?;
        Ok(ms.map(Duration::from_millis))
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

    /// Reclaims deliveries held longer than `scan.min_idle` by consumers that stopped
    /// answering (see [`ReclaimScan`]). Returns the next cursor and how many were reclaimed.
    pub async fn reclaim(
        &self,
        keys: &GroupKeys,
        consumer: &str,
        scan: ReclaimScan<'_>,
        backoff: &Backoff,
    ) -> Result<(String, u64), StreamsError> {
        let ReclaimScan { min_idle, cursor, count, max_attempts } = scan;
        let mut inv = self.scripts.reclaim.prepare_invoke();
        inv.key(&keys.stream).key(&keys.retry).key(&keys.attempts).key(&keys.dead);
        inv.arg(&*keys.group)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor)
            .arg(count)
            .arg(backoff.initial.as_millis() as u64)
            .arg(backoff.factor)
            .arg(backoff.max.as_millis() as u64)
            .arg(max_attempts)
            .arg(rand::random::<f64>());
        let v: Value = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("reclaim"))?;
        match v {
            Value::Array(r) if r.len() == 3 => {
                let cursor = str_of(&r[0]).ok_or_else(|| bad("reclaim", &r[0]))?;
                Ok((cursor, int_of(&r[1]).unwrap_or(0) as u64))
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

    /// Unblocks a blocked reader (by its client id) so that it re-plans at once.
    pub async fn unblock(&self, client_id: i64) -> Result<(), StreamsError> {
        redis::cmd("CLIENT").arg("UNBLOCK").arg(client_id).query_async::<Value>(&mut self.conn.clone()).await.map_err(err("unblock"))?;
        Ok(())
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

    /// The state of `groups` of a type's live stream (see `lua/stats.lua`), in their order.
    pub async fn group_stats(&self, event_type: &str, groups: &[String]) -> Result<Vec<GroupState>, StreamsError> {
        let mut inv = self.scripts.stats.prepare_invoke();
        inv.key(self.stream_key(event_type));
        for g in groups {
            inv.key(self.dead_letter_key(event_type, g)).arg(g.as_str());
        }
        let rows: Vec<(i64, i64, i64, i64)> = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("stats"))?;
        Ok(rows
            .into_iter()
            .map(|(lag, pending, idle, dead)| GroupState {
                lag: lag.max(0) as u64,
                pending: pending.max(0) as u64,
                oldest_pending_ms: idle.max(0) as u64,
                dead_letters: dead.max(0) as u64,
            })
            .collect())
    }

    /// A connection of its own for blocking reads.
    pub async fn blocking_reader(&self, block: Duration) -> Result<BlockingReader, StreamsError> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(block + COMMAND_TIMEOUT));
        let mut conn = self.client.get_multiplexed_async_connection_with_config(&cfg).await.map_err(err("connect reader"))?;
        let client_id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut conn).await.map_err(err("client id"))?;
        Ok(BlockingReader { conn, client_id })
    }
}

/// One step of the scan for deliveries to reclaim.
#[derive(Debug, Clone, Copy)]
pub struct ReclaimScan<'a> {
    /// Only entries idle at least this long.
    pub min_idle: Duration,
    /// Where to continue the scan of the pending list (`0-0` from the start).
    pub cursor: &'a str,
    /// Most entries to look at.
    pub count: usize,
    /// Dead-letter those that reach this many failed attempts.
    pub max_attempts: u32,
}

/// A group's state in Redis, for `stats`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupState {
    /// Entries not yet read by the group.
    pub lag: u64,
    /// Delivered, not acknowledged.
    pub pending: u64,
    /// How long the oldest pending entry has been idle.
    pub oldest_pending_ms: u64,
    /// Dead letters not yet copied into the log.
    pub dead_letters: u64,
}

/// One event a publish lane adds (see [`Streams::add_batch`]).
#[derive(Debug, Clone, Copy)]
pub struct LaneEvent<'a> {
    /// Its sequence number in the lane.
    pub seq: i64,
    /// Its type.
    pub event_type: &'a str,
    /// When it is due (ms since the epoch), 0 for now.
    pub due_ms: i64,
    /// Its event id.
    pub id: &'a str,
    /// The encoded event.
    pub event: &'a [u8],
}

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

fn str_of(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
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
