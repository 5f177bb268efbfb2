//! The `events` table: storing a publish lane's batches (binary COPY, or one INSERT for a small
//! batch, or the duplicate-checking statement), and finding events by id.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPoolCopyExt;
use uuid::Uuid;

use super::{EventLog, LogError, copy, query};

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

impl EventLog {
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

    /// The log positions (and due times) of events by id, those found.
    pub async fn positions_of(&self, ids: &[String]) -> Result<std::collections::HashMap<String, (i64, Option<DateTime<Utc>>)>, LogError> {
        let rows: Vec<(String, i64, Option<DateTime<Utc>>)> = sqlx::query_as("SELECT id, seq, deliver_at FROM events WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(query("find events"))?;
        Ok(rows.into_iter().map(|(id, seq, due)| (id, (seq, due))).collect())
    }

    /// How many times an event id is stored (0 or 1), for tests and checks.
    pub async fn count_id(&self, id: &str) -> Result<i64, LogError> {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE id = $1").bind(id).fetch_one(&self.pool).await.map_err(query("count"))
    }
}
