//! The `dead_letters` table: every group's dead letters, copied from Redis, with their attempt
//! history; listed, redriven and purged by the operators' requests (see
//! migrations/0004_dead_letters.sql).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;

use super::{EventLog, LogError, query};

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
