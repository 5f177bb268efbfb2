//! The registry of event types and consumer groups (`event_types`, `consumer_groups`).

use super::{EventLog, LogError, query};

impl EventLog {
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

    /// True when the log knows `group` of `event_type`.
    pub async fn group_exists(&self, event_type: &str, group: &str) -> Result<bool, LogError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM consumer_groups WHERE type = $1 AND name = $2)")
            .bind(event_type)
            .bind(group)
            .fetch_one(&self.pool)
            .await
            .map_err(query("find group"))
    }

    /// The known groups (of `event_type`, when given) with their creation time, by type then
    /// name; at most `limit`.
    pub async fn groups_created(
        &self,
        event_type: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(String, String, chrono::DateTime<chrono::Utc>)>, LogError> {
        sqlx::query_as(
            "SELECT type, name, created_at FROM consumer_groups WHERE $1::text IS NULL OR type = $1 ORDER BY type, name LIMIT $2",
        )
        .bind(event_type)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(query("list groups"))
    }

    /// Forgets a group: its record (with its checkpoint), and its running replays, which are
    /// cancelled (their runner stops at its next page). Its dead letters stay, so they can be
    /// read, redriven to a group of the same name created again, or purged. True when the log
    /// knew it.
    pub async fn delete_group(&self, event_type: &str, group: &str) -> Result<bool, LogError> {
        let mut tx = self.pool.begin().await.map_err(query("delete group"))?;
        sqlx::query(
            "UPDATE replays SET status = 'cancelled', lease_until = NULL, updated_at = now() \
             WHERE type = $1 AND group_name = $2 AND status = 'running'",
        )
        .bind(event_type)
        .bind(group)
        .execute(&mut *tx)
        .await
        .map_err(query("cancel the group's replays"))?;
        let deleted = sqlx::query("DELETE FROM consumer_groups WHERE type = $1 AND name = $2")
            .bind(event_type)
            .bind(group)
            .execute(&mut *tx)
            .await
            .map_err(query("delete group"))?
            .rows_affected();
        tx.commit().await.map_err(query("delete group"))?;
        Ok(deleted > 0)
    }
}
