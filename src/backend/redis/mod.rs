//! The Redis backend: one stream per event type, one Redis consumer group per sidebus group, and
//! per group a retry schedule, attempt counts and a dead-letter stream. The only code that sends
//! Redis commands (the `tidy` test keeps it so): `publish` (adding events), `deliver` (reading,
//! settling, reclaiming), `upkeep` (checkpoints' raw material, trims, stats, dead-letter
//! streams); the multi-step operations are Lua scripts in `lua/` so that each is atomic (two
//! daemons never take the same retry, a dead letter is never half moved). This file: the
//! handle, the key names and the errors.
//!
//! Keys (`{ns}` is the configured namespace; see ARCHITECTURE.md for the table):
//! `{ns}:s:{type}` stream, `{ns}:r:{type}:{group}` retry zset, `{ns}:a:{type}:{group}` attempts
//! hash, `{ns}:d:{type}:{group}` dead letters, `{ns}:g:{type}:{group}` group settings,
//! `{ns}:l:{type}:{group}` the subscribing daemons' leases, `{ns}:hw:{lane}` publish lane
//! high-water marks.

mod deliver;
mod groups;
mod publish;
mod target;
mod upkeep;

pub use deliver::{BlockingReader, Due, Entry, FailOutcome, Failure, ReclaimScan, Reclaimed};
pub use groups::{Activity, LEASE_FORGET, LEASE_HEARTBEAT, LEASE_LIVE, ResetPoint};
pub use publish::LaneEvent;
pub use target::{Problem, Target};
pub use upkeep::{CheckpointState, DeadLetter, GroupCheckpoint, GroupState, LaneBound};

use std::sync::Arc;
use std::time::Duration;

use redis::{RedisError, Script, Value};

use self::target::Conn;

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
    leases: String,
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
    lease: Script,
    group_delete: Script,
    group_reset: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let lib = include_str!("lua/lib.lua");
        let with_lib = |body: &str| Script::new(&format!("{lib}\n{body}"));
        Scripts {
            publish: Script::new(include_str!("lua/publish.lua")),
            move_due: Script::new(include_str!("lua/move_due.lua")),
            restore: Script::new(include_str!("lua/restore.lua")),
            stats: with_lib(include_str!("lua/stats.lua")),
            checkpoint: with_lib(include_str!("lua/checkpoint.lua")),
            fail: with_lib(include_str!("lua/fail.lua")),
            pop_due: with_lib(include_str!("lua/pop_due.lua")),
            reclaim: with_lib(include_str!("lua/reclaim.lua")),
            trim: Script::new(include_str!("lua/trim.lua")),
            lease: with_lib(include_str!("lua/lease.lua")),
            group_delete: Script::new(include_str!("lua/group_delete.lua")),
            group_reset: Script::new(include_str!("lua/group_reset.lua")),
        }
    }
}

/// Checks that the config's Redis settings are ones this daemon can connect with (at startup,
/// before any connection is tried): the URL, and the TLS files, read.
pub fn check(config: &crate::config::Config) -> Result<(), Problem> {
    Target::from_config(config).map(drop)
}

/// A handle on Redis, cheap to clone. Ordinary commands share one multiplexed connection
/// (which pipelines concurrent commands); blocking reads each get a [`BlockingReader`].
#[derive(Clone)]
pub struct Streams {
    target: Option<Arc<Target>>,
    conn: Conn,
    ns: Arc<str>,
    scripts: Arc<Scripts>,
    index_block_ms: u64,
}

impl Streams {
    /// Connects to a bare URL (tests and tools); fails when Redis does not answer.
    pub async fn connect(url: &str, namespace: &str) -> Result<Streams, StreamsError> {
        let target = Target::from_url(url).map_err(|(_, why)| StreamsError::Reply { op: "open", detail: why })?;
        Self::connect_to(Arc::new(target), namespace).await
    }

    /// Connects to the server `target` names now; fails when it does not answer (the caller
    /// retries). With Sentinel, [`Streams::follow_master`] moves to a new master later.
    pub async fn connect_to(target: Arc<Target>, namespace: &str) -> Result<Streams, StreamsError> {
        let client = target.client().await.map_err(err("find the server"))?;
        let conn = Conn::open(client).await.map_err(err("connect"))?;
        let mut s =
            Streams { target: Some(target), conn, ns: namespace.into(), scripts: Arc::new(Scripts::new()), index_block_ms: INDEX_BLOCK_MS };
        redis::cmd("PING").query_async::<()>(&mut s.conn).await.map_err(err("ping"))?;
        Ok(s)
    }

    /// With Sentinel: asks the Sentinels for the master and, when it is another server than
    /// the one in use, moves every command there (the new address is returned). Without
    /// Sentinel, nothing.
    pub async fn follow_master(&self) -> Result<Option<String>, StreamsError> {
        let Some(target) = self.target.as_ref().filter(|t| t.sentinel_service().is_some()) else { return Ok(None) };
        let client = target.client().await.map_err(err("ask the Sentinels"))?;
        let address = target::address(&client);
        if address == self.conn.address() {
            return Ok(None);
        }
        self.conn.switch(client).await.map_err(err("connect to the new master"))?;
        Ok(Some(address))
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
            leases: format!("{ns}:l:{event_type}:{group}"),
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

    /// The zset of a type's delayed events (event → due time, ms).
    pub fn delay_key(&self, event_type: &str) -> String {
        format!("{}:z:{event_type}", self.ns)
    }

    /// The set of delay zsets that hold events.
    fn delayed_key(&self) -> String {
        format!("{}:delayed", self.ns)
    }

    fn epoch_key(&self) -> String {
        format!("{}:epoch", self.ns)
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
