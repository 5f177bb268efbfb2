//! What operators ask of the log: replays on request and their progress, and the record of dead
//! letters (see migrations/0004_dead_letters.sql).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::{EventLog, LogError, query};

/// A replay as listed by `replays`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReplayRow {
    /// Its id.
    pub id: Uuid,
    /// The type.
    #[sqlx(rename = "type")]
    pub event_type: String,
    /// The group.
    pub group_name: String,
    /// `running`, `done`, `cancelled`, `failed`.
    pub status: String,
    /// `request` or `recovery`.
    pub reason: String,
    /// Events added to the group's lane so far.
    pub added: i64,
    /// Events in its range (requests only).
    pub total: Option<i64>,
    /// When it was asked for.
    pub created_at: DateTime<Utc>,
}

/// A dead letter taken from a group's Redis dead-letter stream, to record.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    /// Its entry id in the dead-letter stream.
    pub entry: String,
    /// The event id.
    pub event_id: String,
    /// The encoded event.
    pub payload: Vec<u8>,
    /// The last error.
    pub error: String,
    /// Failed attempts.
    pub attempts: i32,
    /// The failed attempts: `[{attempt, error, at}]` (at: ms since the epoch).
    pub history: Value,
    /// When it was dead-lettered.
    pub failed_at: DateTime<Utc>,
}

/// A recorded dead letter.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetterRow {
    /// Its number in the record.
    pub id: i64,
    /// The event id.
    pub event_id: String,
    /// The encoded event.
    pub payload: Vec<u8>,
    /// The last error.
    pub error: String,
    /// Failed attempts.
    pub attempts: i32,
    /// The failed attempts.
    pub history: Json<Value>,
    /// When it was dead-lettered.
    pub failed_at: DateTime<Utc>,
}

impl EventLog {
    /// True when the log knows `group` of `event_type`.
    pub async fn group_exists(&self, event_type: &str, group: &str) -> Result<bool, LogError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM consumer_groups WHERE type = $1 AND name = $2)")
            .bind(event_type)
            .bind(group)
            .fetch_one(&self.pool)
            .await
            .map_err(query("find group"))
    }

    /// Starts a replay of the events of `event_type` published in `[since, until)` to `group`,
    /// up to the log's end now. Returns how many events it covers, and its id (none when the
    /// range is empty: nothing is started).
    pub async fn start_replay(
        &self,
        event_type: &str,
        group: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<(i64, Option<Uuid>), LogError> {
        let q = || query("start replay");
        let mut tx = self.pool.begin().await.map_err(q())?;
        let (count, first, last): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT count(*), min(seq), max(seq) FROM events WHERE type = $1 AND time >= $2 AND time < $3 \
             AND seq <= (SELECT COALESCE(max(seq), 0) FROM events)",
        )
        .bind(event_type)
        .bind(since)
        .bind(until)
        .fetch_one(&mut *tx)
        .await
        .map_err(q())?;
        let (Some(first), Some(last)) = (first, last) else { return Ok((0, None)) };
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO replays (id, type, group_name, since, until, from_seq, to_seq, cursor, reason, total) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $6 - 1, 'request', $8)",
        )
        .bind(id)
        .bind(event_type)
        .bind(group)
        .bind(since)
        .bind(until)
        .bind(first)
        .bind(last)
        .bind(count)
        .execute(&mut *tx)
        .await
        .map_err(q())?;
        tx.commit().await.map_err(q())?;
        Ok((count, Some(id)))
    }

    /// Cancels a running replay; false when it is not running (ended, or unknown).
    pub async fn cancel_replay(&self, id: Uuid) -> Result<bool, LogError> {
        let n = sqlx::query(
            "UPDATE replays SET status = 'cancelled', lease_until = NULL, updated_at = now() WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query("cancel replay"))?
        .rows_affected();
        Ok(n == 1)
    }

    /// Whether a replay exists at all.
    pub async fn replay_exists(&self, id: Uuid) -> Result<bool, LogError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM replays WHERE id = $1)")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .map_err(query("find replay"))
    }

    /// Running replays (with `all`, also those that ended in the last day), oldest first.
    pub async fn list_replays(&self, all: bool) -> Result<Vec<ReplayRow>, LogError> {
        sqlx::query_as(
            "SELECT id, type, group_name, status, reason, added, total, created_at FROM replays \
             WHERE status = 'running' OR ($1 AND updated_at > now() - interval '1 day') ORDER BY created_at LIMIT 1000",
        )
        .bind(all)
        .fetch_all(&self.pool)
        .await
        .map_err(query("list replays"))
    }

    /// Records dead letters taken from a group's stream; one already recorded (same entry) is
    /// skipped, so recording again after a crash is harmless.
    pub async fn record_dead_letters(&self, event_type: &str, group: &str, rows: &[NewDeadLetter]) -> Result<(), LogError> {
        let entries: Vec<&str> = rows.iter().map(|r| r.entry.as_str()).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
        let payloads: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
        let errors: Vec<&str> = rows.iter().map(|r| r.error.as_str()).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.attempts).collect();
        let histories: Vec<Json<&Value>> = rows.iter().map(|r| Json(&r.history)).collect();
        let failed: Vec<DateTime<Utc>> = rows.iter().map(|r| r.failed_at).collect();
        sqlx::query(
            "INSERT INTO dead_letters (type, group_name, entry, event_id, payload, error, attempts, history, failed_at) \
             SELECT $1, $2, * FROM UNNEST($3::text[], $4::text[], $5::bytea[], $6::text[], $7::int4[], $8::jsonb[], $9::timestamptz[]) \
             ON CONFLICT ON CONSTRAINT dead_letters_entry DO NOTHING",
        )
        .bind(event_type)
        .bind(group)
        .bind(&entries)
        .bind(&ids)
        .bind(&payloads)
        .bind(&errors)
        .bind(&attempts)
        .bind(&histories)
        .bind(&failed)
        .execute(&self.pool)
        .await
        .map_err(query("record dead letters"))?;
        Ok(())
    }

    /// A group's dead letters still dead, oldest first: after `after`, at most `limit`, only
    /// `ids` when given.
    pub async fn dead_letters(
        &self,
        event_type: &str,
        group: &str,
        after: i64,
        limit: i64,
        ids: &[String],
    ) -> Result<Vec<DeadLetterRow>, LogError> {
        sqlx::query_as(
            "SELECT id, event_id, payload, error, attempts, history, failed_at FROM dead_letters \
             WHERE type = $1 AND group_name = $2 AND status = 'dead' AND id > $3 AND (cardinality($5::text[]) = 0 OR event_id = ANY($5)) \
             ORDER BY id LIMIT $4",
        )
        .bind(event_type)
        .bind(group)
        .bind(after)
        .bind(limit)
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(query("list dead letters"))
    }

    /// Of `ids`, those that are not dead letters of the group now.
    pub async fn not_dead(&self, event_type: &str, group: &str, ids: &[String]) -> Result<Vec<String>, LogError> {
        sqlx::query_scalar(
            "SELECT i FROM UNNEST($3::text[]) AS i WHERE NOT EXISTS \
             (SELECT 1 FROM dead_letters d WHERE d.type = $1 AND d.group_name = $2 AND d.status = 'dead' AND d.event_id = i)",
        )
        .bind(event_type)
        .bind(group)
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(query("check dead letters"))
    }

    /// Marks dead letters (by record number) `redriven` or `purged`; returns how many were
    /// still dead.
    pub async fn settle_dead_letters(&self, ids: &[i64], status: &str) -> Result<u64, LogError> {
        Ok(sqlx::query("UPDATE dead_letters SET status = $2, settled_at = now() WHERE id = ANY($1) AND status = 'dead'")
            .bind(ids)
            .bind(status)
            .execute(&self.pool)
            .await
            .map_err(query("settle dead letters"))?
            .rows_affected())
    }

    /// Marks a group's dead letters (all, or those with these event ids) `purged`; returns how
    /// many.
    pub async fn purge_dead_letters(&self, event_type: &str, group: &str, ids: &[String]) -> Result<u64, LogError> {
        Ok(sqlx::query(
            "UPDATE dead_letters SET status = 'purged', settled_at = now() \
             WHERE type = $1 AND group_name = $2 AND status = 'dead' AND (cardinality($3::text[]) = 0 OR event_id = ANY($3))",
        )
        .bind(event_type)
        .bind(group)
        .bind(ids)
        .execute(&self.pool)
        .await
        .map_err(query("purge dead letters"))?
        .rows_affected())
    }

    /// Gives up a replay this daemon holds (at shutdown), so another daemon, or this one after
    /// its restart, takes it over at once from its cursor.
    pub async fn release_replay(&self, id: Uuid, owner: &str) -> Result<(), LogError> {
        sqlx::query(
            "UPDATE replays SET owner = NULL, lease_until = NULL, updated_at = now() WHERE id = $1 AND owner = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(query("release replay"))?;
        Ok(())
    }

    /// Dead letters still dead, per (type, group).
    pub async fn dead_letter_counts(&self) -> Result<std::collections::HashMap<(String, String), u64>, LogError> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT type, group_name, count(*) FROM dead_letters WHERE status = 'dead' GROUP BY type, group_name")
                .fetch_all(&self.pool)
                .await
                .map_err(query("count dead letters"))?;
        Ok(rows.into_iter().map(|(t, g, n)| ((t, g), n.max(0) as u64)).collect())
    }
}
