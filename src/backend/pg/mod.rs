//! The Postgres event log (the source of truth, kept for replay) and the registry of event types
//! and consumer groups. The only file with SQL; the schema is in `migrations/`, embedded in the
//! binary and applied at start-up (sqlx takes an advisory lock, so daemons starting together
//! migrate once).

mod admin;
mod copy;
mod recovery;
mod schemas;

pub use admin::{DeadLetterRow, NewDeadLetter, ReplayRow};
pub use recovery::{CheckpointInputs, DueEvent, DueWalk, GroupResume, LANE_HEARTBEAT, LANE_REPORT_FRESH, LANE_SILENT, Recovering};
pub use schemas::{SchemaHistory, SchemaRow};

use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolCopyExt, PgPoolOptions};
use uuid::Uuid;

/// Longest any statement may run before Postgres cancels it.
const STATEMENT_TIMEOUT: &str = "30s";

/// A Postgres failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The URL could not be used.
    #[error("postgres url: {0}")]
    Url(sqlx::Error),
    /// Connecting failed (down, refused, authentication).
    #[error("postgres connect: {0}")]
    Connect(sqlx::Error),
    /// Creating the missing database failed.
    #[error("postgres create database {name}: {source}")]
    CreateDatabase {
        /// The database.
        name: String,
        /// Why.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("postgres migrate: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A statement failed.
    #[error("postgres {op}: {source}")]
    Query {
        /// The operation.
        op: &'static str,
        /// Why.
        source: sqlx::Error,
    },
    /// A statement did not answer in time (the caller's own limit).
    #[error("postgres {0}: timed out")]
    Timeout(&'static str),
}

fn query(op: &'static str) -> impl FnOnce(sqlx::Error) -> LogError {
    move |source| LogError::Query { op, source }
}

/// One event to store.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its sequence number in its publish lane.
    pub seq: i64,
    /// The event id.
    pub id: String,
    /// The event type.
    pub event_type: String,
    /// The publish time.
    pub time: DateTime<Utc>,
    /// `source`.
    pub source: String,
    /// The schema version `data` was validated against.
    pub schema_version: Option<i32>,
    /// `correlationid`.
    pub correlation_id: String,
    /// `partitionkey`.
    pub partition_key: Option<String>,
    /// `deliverat`: when a delayed event is due.
    pub deliver_at: Option<DateTime<Utc>>,
    /// The encoded event.
    pub payload: Bytes,
}

/// A running replay, as claimed by a daemon.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Replay {
    /// Its id.
    pub id: Uuid,
    /// The type.
    #[sqlx(rename = "type")]
    pub event_type: String,
    /// The group.
    pub group_name: String,
    /// Time range start.
    pub since: Option<DateTime<Utc>>,
    /// Time range end.
    pub until: Option<DateTime<Utc>>,
    /// First log position.
    pub from_seq: i64,
    /// Last log position covered (the log's end when the replay was asked for).
    pub to_seq: i64,
    /// Last log position added so far.
    pub cursor: i64,
    /// For a recovery: the snapshot it belongs to (see `recovery.rs`).
    pub recovery: Option<Uuid>,
    /// Events added so far.
    pub added: i64,
    /// A recovery's delayed events: from this due time on (see [`EventLog::due_page`]).
    pub due_from: Option<DateTime<Utc>>,
    /// A recovery's Redis clock when it began: delayed events due later go back on their
    /// schedule instead of to the group.
    pub due_until: Option<DateTime<Utc>>,
    /// Where the walk of the delayed events is: (due time, log position).
    pub due_cursor: Option<DateTime<Utc>>,
    /// See `due_cursor`.
    pub due_cursor_seq: i64,
    /// Delayed events walked so far.
    pub due_walked: i64,
    /// The walk of the delayed events is over (or there is none).
    pub due_done: bool,
}

/// What storing one event found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored now.
    New,
    /// Stored before by this same record of this lane (its batch is being run again).
    Retried,
    /// Stored before by another publish: a duplicate id.
    Duplicate,
}

/// Batches up to this size are stored with one INSERT rather than a COPY.
const SMALL_BATCH: usize = 64;

/// The columns of a batch as arrays, for the UNNEST statements.
struct Columns<'a> {
    ids: Vec<&'a str>,
    types: Vec<&'a str>,
    times: Vec<DateTime<Utc>>,
    sources: Vec<&'a str>,
    versions: Vec<Option<i32>>,
    correlations: Vec<&'a str>,
    partitions: Vec<Option<&'a str>>,
    payloads: Vec<&'a [u8]>,
    seqs: Vec<i64>,
    due: Vec<Option<DateTime<Utc>>>,
}

impl<'a> Columns<'a> {
    fn of(records: &'a [Record]) -> Columns<'a> {
        Columns {
            ids: records.iter().map(|r| r.id.as_str()).collect(),
            types: records.iter().map(|r| r.event_type.as_str()).collect(),
            times: records.iter().map(|r| r.time).collect(),
            sources: records.iter().map(|r| r.source.as_str()).collect(),
            versions: records.iter().map(|r| r.schema_version).collect(),
            correlations: records.iter().map(|r| r.correlation_id.as_str()).collect(),
            partitions: records.iter().map(|r| r.partition_key.as_deref()).collect(),
            payloads: records.iter().map(|r| r.payload.as_ref()).collect(),
            seqs: records.iter().map(|r| r.seq).collect(),
            due: records.iter().map(|r| r.deliver_at).collect(),
        }
    }
}

/// Binds a batch's columns as `$1`…`$10` of the UNNEST statements, in [`Columns`] order.
trait BindColumns<'q>: Sized {
    fn bind_columns(self, c: &'q Columns<'q>) -> Self;
}

macro_rules! bind_columns {
    ($q:expr, $c:expr) => {
        $q.bind(&$c.ids)
            .bind(&$c.types)
            .bind(&$c.times)
            .bind(&$c.sources)
            .bind(&$c.versions)
            .bind(&$c.correlations)
            .bind(&$c.partitions)
            .bind(&$c.payloads)
            .bind(&$c.seqs)
            .bind(&$c.due)
    };
}

impl<'q> BindColumns<'q> for sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn bind_columns(self, c: &'q Columns<'q>) -> Self {
        bind_columns!(self, c)
    }
}

impl<'q, O> BindColumns<'q> for sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    fn bind_columns(self, c: &'q Columns<'q>) -> Self {
        bind_columns!(self, c)
    }
}

/// A pool of connections to the event log's database.
#[derive(Clone)]
pub struct EventLog {
    pool: PgPool,
}

impl EventLog {
    /// Connects, creating the database when it does not exist yet.
    pub async fn connect(url: &str) -> Result<EventLog, LogError> {
        Self::connect_with(url, 8).await
    }

    /// Connects with a pool of at most `max_connections`.
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<EventLog, LogError> {
        let opts = PgConnectOptions::from_str(url)
            .map_err(LogError::Url)?
            .application_name("sidebus")
            .options([("statement_timeout", STATEMENT_TIMEOUT)]);
        let pool = || PgPoolOptions::new().max_connections(max_connections).min_connections(0).acquire_timeout(Duration::from_secs(5));
        match pool().connect_with(opts.clone()).await {
            Ok(pool) => Ok(EventLog { pool }),
            // 3D000: invalid_catalog_name, the database does not exist.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
                let name = opts.get_database().unwrap_or("sidebus").to_owned();
                let admin = pool().max_connections(1).connect_with(opts.clone().database("postgres")).await.map_err(LogError::Connect)?;
                let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
                match sqlx::query(&create).execute(&admin).await {
                    Ok(_) => tracing::info!(database = %name, "created the database"),
                    // 42P04: duplicate_database, another daemon created it first.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                    Err(source) => return Err(LogError::CreateDatabase { name, source }),
                }
                admin.close().await;
                Ok(EventLog { pool: pool().connect_with(opts).await.map_err(LogError::Connect)? })
            }
            Err(e) => Err(LogError::Connect(e)),
        }
    }

    /// Applies the embedded migrations.
    pub async fn migrate(&self) -> Result<(), LogError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// Round trip, for health checks.
    pub async fn ping(&self) -> Result<(), LogError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(query("ping"))?;
        Ok(())
    }

    /// Stores one batch of events of publish lane `lane` and says, per event in order, whether
    /// it was stored now, by an earlier run of the same record, or by another publish. Ids must
    /// be distinct within the batch.
    ///
    /// The usual batch is all new: one binary COPY stores it (the cheapest way into Postgres,
    /// and the only one that scales with parallel writers; see BENCHMARKS.md). A COPY that
    /// meets an id already stored fails as a whole with a unique violation, and the batch is
    /// stored again by [`EventLog::insert_batch_checked`], which skips and reports duplicates.
    pub async fn insert_batch(&self, lane: Uuid, records: &[Record]) -> Result<Vec<Stored>, LogError> {
        // A small batch (light load, where latency matters) goes in one round trip; COPY takes
        // two but costs less per row.
        let stored =
            if records.len() <= SMALL_BATCH { self.insert_small(lane, records).await } else { self.copy_batch(lane, records).await };
        match stored {
            Ok(()) => Ok(vec![Stored::New; records.len()]),
            // 23505: unique_violation.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => self.insert_batch_checked(lane, records).await,
            Err(source) => Err(LogError::Query { op: "store events", source }),
        }
    }

    /// The fast path for a small batch: one plain INSERT (it fails as a whole on a stored id).
    async fn insert_small(&self, lane: Uuid, records: &[Record]) -> Result<(), sqlx::Error> {
        let c = Columns::of(records);
        sqlx::query(
            "INSERT INTO events (id, type, time, source, schema_version, correlation_id, partition_key, origin_lane, origin_seq, payload, deliver_at) \
             SELECT id, type, time, source, schema_version, correlation_id, partition_key, $11, seq, payload, due \
             FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::int4[], $6::text[], $7::text[], $8::bytea[], $9::int8[], $10::timestamptz[]) \
             WITH ORDINALITY AS t(id, type, time, source, schema_version, correlation_id, partition_key, payload, seq, due, ord) ORDER BY ord",
        )
        .bind_columns(&c)
        .bind(lane)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    async fn copy_batch(&self, lane: Uuid, records: &[Record]) -> Result<(), sqlx::Error> {
        let mut copy = self.pool.copy_in_raw(copy::STATEMENT).await?;
        if let Err(e) = copy.send(copy::encode(lane, records)).await {
            let _ = copy.abort("send failed").await;
            return Err(e);
        }
        copy.finish().await.map(|_| ())
    }

    /// Stores a batch in one statement that skips ids already stored and tells who stored
    /// them: the slow path of [`EventLog::insert_batch`], for batches with duplicates.
    pub async fn insert_batch_checked(&self, lane: Uuid, records: &[Record]) -> Result<Vec<Stored>, LogError> {
        let c = Columns::of(records);
        // All sub-statements of one WITH see the same snapshot, so `e` shows only rows stored
        // before this statement: exactly the duplicates, with the publish that stored them.
        let rows: Vec<(bool, bool)> = sqlx::query_as(
            "WITH input AS ( \
                SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::int4[], $6::text[], $7::text[], $8::bytea[], $9::int8[], $10::timestamptz[]) \
                WITH ORDINALITY AS t(id, type, time, source, schema_version, correlation_id, partition_key, payload, seq, due, ord) \
             ), ins AS ( \
                INSERT INTO events (id, type, time, source, schema_version, correlation_id, partition_key, origin_lane, origin_seq, payload, deliver_at) \
                SELECT id, type, time, source, schema_version, correlation_id, partition_key, $11, seq, payload, due FROM input ORDER BY ord \
                ON CONFLICT (id) DO NOTHING \
                RETURNING id \
             ) \
             SELECT ins.id IS NOT NULL, COALESCE(e.origin_lane = $11 AND e.origin_seq = input.seq, false) \
             FROM input LEFT JOIN ins ON ins.id = input.id LEFT JOIN events e ON e.id = input.id \
             ORDER BY input.ord",
        )
        .bind_columns(&c)
        .bind(lane)
        .fetch_all(&self.pool)
        .await
        .map_err(query("insert events"))?;
        Ok(rows
            .into_iter()
            .map(|(inserted, same_record)| match (inserted, same_record) {
                (true, _) => Stored::New,
                (false, true) => Stored::Retried,
                (false, false) => Stored::Duplicate,
            })
            .collect())
    }

    /// Records event types (idempotent).
    pub async fn ensure_types(&self, types: &[&str]) -> Result<(), LogError> {
        sqlx::query("INSERT INTO event_types (type) SELECT * FROM UNNEST($1::text[]) ON CONFLICT DO NOTHING")
            .bind(types)
            .execute(&self.pool)
            .await
            .map_err(query("record types"))?;
        Ok(())
    }

    /// Records a consumer group; true when the log knew it already. A new group's checkpoint
    /// starts after the type's last event: it receives what is published from now on.
    pub async fn ensure_group(&self, event_type: &str, group: &str) -> Result<bool, LogError> {
        self.ensure_types(&[event_type]).await?;
        let inserted = sqlx::query(
            "INSERT INTO consumer_groups (type, name, resume_seq, resume_at, resume_due) \
             VALUES ($1, $2, (SELECT COALESCE(max(seq), 0) + 1 FROM events WHERE type = $1), now(), now()) \
             ON CONFLICT DO NOTHING",
        )
        .bind(event_type)
        .bind(group)
        .execute(&self.pool)
        .await
        .map_err(query("record group"))?
        .rows_affected();
        Ok(inserted == 0)
    }

    /// The log positions (and due times) of events by id, those found.
    pub async fn positions_of(&self, ids: &[String]) -> Result<std::collections::HashMap<String, (i64, Option<DateTime<Utc>>)>, LogError> {
        let rows: Vec<(String, i64, Option<DateTime<Utc>>)> = sqlx::query_as("SELECT id, seq, deliver_at FROM events WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(query("find events"))?;
        Ok(rows.into_iter().map(|(id, seq, due)| (id, (seq, due))).collect())
    }

    /// Takes a running replay nobody runs (no owner, or an expired lease) for `owner`.
    pub async fn claim_replay(&self, owner: &str, lease: std::time::Duration) -> Result<Option<Replay>, LogError> {
        sqlx::query_as(
            "UPDATE replays SET owner = $1, lease_until = now() + make_interval(secs => $2), updated_at = now() \
             WHERE id = (SELECT id FROM replays WHERE status = 'running' AND (lease_until IS NULL OR lease_until < now()) \
                         ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, type, group_name, since, until, from_seq, to_seq, cursor, recovery, added, \
                       due_from, due_until, due_cursor, due_cursor_seq, due_walked, due_done",
        )
        .bind(owner)
        .bind(lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
        .map_err(query("claim replay"))
    }

    /// Records a replay's progress and renews its lease; false when the replay was cancelled
    /// or taken by another owner.
    pub async fn advance_replay(
        &self,
        id: Uuid,
        owner: &str,
        cursor: i64,
        added: i64,
        lease: std::time::Duration,
    ) -> Result<bool, LogError> {
        let n = sqlx::query(
            "UPDATE replays SET cursor = $3, added = $4, lease_until = now() + make_interval(secs => $5), updated_at = now() \
             WHERE id = $1 AND owner = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(owner)
        .bind(cursor)
        .bind(added)
        .bind(lease.as_secs_f64())
        .execute(&self.pool)
        .await
        .map_err(query("advance replay"))?
        .rows_affected();
        Ok(n == 1)
    }

    /// Ends a replay with `status` (`done`, `cancelled`, `failed`).
    pub async fn finish_replay(&self, id: Uuid, status: &str, error: Option<&str>) -> Result<(), LogError> {
        sqlx::query(
            "UPDATE replays SET status = $2, error = $3, lease_until = NULL, updated_at = now() WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .bind(status)
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(query("finish replay"))?;
        Ok(())
    }

    /// The next page of a replay: per event of the type after `cursor` in log order, its log
    /// position and, when it is in the replay's range, its id and encoded event. A replay on
    /// request takes what was published in its time range; a recovery's takes every event but
    /// the delayed ones not due when it began (those go back on their schedule, see
    /// [`EventLog::due_page`]).
    ///
    /// The inner statement has only conditions the (type, seq) index answers, so it walks the
    /// index from the cursor and stops after `limit` rows; the range is applied to those rows
    /// only. (With them in one statement the planner read the whole rest of the range for
    /// every page: replays ran at a tenth of their speed.)
    pub async fn replay_page(&self, r: &Replay, cursor: i64, limit: i64) -> Result<Vec<(i64, Option<(String, Vec<u8>)>)>, LogError> {
        let rows: Vec<(i64, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT p.seq, p.id, CASE WHEN ($4::timestamptz IS NULL OR p.time >= $4) AND ($5::timestamptz IS NULL OR p.time < $5) \
                 AND ($7::timestamptz IS NULL OR p.deliver_at IS NULL OR p.deliver_at <= $7) THEN p.payload END \
             FROM (SELECT seq, id, time, deliver_at, payload FROM events \
                   WHERE type = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $6) p \
             ORDER BY p.seq",
        )
        .bind(&r.event_type)
        .bind(cursor.max(r.from_seq - 1))
        .bind(r.to_seq)
        .bind(r.since)
        .bind(r.until)
        .bind(limit)
        .bind(r.due_until)
        .fetch_all(&self.pool)
        .await
        .map_err(query("read replay"))?;
        Ok(rows.into_iter().map(|(seq, id, payload)| (seq, id.zip(payload))).collect())
    }

    /// Every known type with its known groups.
    pub async fn types_and_groups(&self) -> Result<Vec<(String, Vec<String>)>, LogError> {
        sqlx::query_as(
            "SELECT t.type, COALESCE(array_agg(g.name ORDER BY g.name) FILTER (WHERE g.name IS NOT NULL), '{}') \
             FROM event_types t LEFT JOIN consumer_groups g ON g.type = t.type GROUP BY t.type ORDER BY t.type",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query("list groups"))
    }

    /// How many times an event id is stored (0 or 1), for tests and checks.
    pub async fn count_id(&self, id: &str) -> Result<i64, LogError> {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE id = $1").bind(id).fetch_one(&self.pool).await.map_err(query("count"))
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
