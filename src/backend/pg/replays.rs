//! The `replays` table: replays on request and a recovery's replays, which any daemon claims
//! and runs a page at a time from its cursor (see `bus::replay`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{EventLog, LogError, query};

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
    /// For a recovery: the snapshot it belongs to (see `bus::recovery`).
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

/// Where a recovery replay's walk of delayed events is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DueWalk {
    /// The due time of the last event walked (none: not started).
    pub at: Option<DateTime<Utc>>,
    /// Its log position.
    pub seq: i64,
    /// Events walked so far (they number the replay's additions, so adding a page again after
    /// a crash adds nothing twice).
    pub walked: i64,
    /// The walk is over.
    pub done: bool,
}

/// A delayed event walked by a recovery replay.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueEvent {
    /// When it is due.
    pub deliver_at: DateTime<Utc>,
    /// Its log position.
    pub seq: i64,
    /// Its id.
    pub id: String,
    /// The encoded event.
    pub payload: Vec<u8>,
}

impl EventLog {
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
        let q = sqlx::query(
            "UPDATE replays SET cursor = $3, added = $4, lease_until = now() + make_interval(secs => $5), updated_at = now() \
             WHERE id = $1 AND owner = $2 AND status = 'running'",
        );
        self.one_row(q.bind(id).bind(owner).bind(cursor).bind(added).bind(lease.as_secs_f64()), "advance replay").await
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

    /// Brings the planner's statistics of the log up to date when many rows came since they
    /// were last gathered (more than autovacuum's own threshold, so its analyze is late): a
    /// log never analysed, or just grown by a burst, makes the planner expect a handful of
    /// rows of a type, and it then reads and sorts the whole rest of a replay's range for every
    /// page (measured: 190 ms a page of 1,000 in a 200,000-event log, 1.4 ms once analysed).
    /// Returns the rows changed since the last analyze when it analysed.
    pub async fn analyze_if_stale(&self) -> Result<Option<i64>, LogError> {
        let changed: Option<i64> = sqlx::query_scalar(
            "SELECT s.n_mod_since_analyze FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
             WHERE s.relid = 'events'::regclass AND s.n_mod_since_analyze > 1000 + 0.1 * GREATEST(c.reltuples, 0)",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(query("log statistics"))?;
        let Some(changed) = changed else { return Ok(None) };
        sqlx::query("ANALYZE events").execute(&self.pool).await.map_err(query("analyze the log"))?;
        Ok(Some(changed))
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
        let q = sqlx::query(
            "UPDATE replays SET status = 'cancelled', lease_until = NULL, updated_at = now() WHERE id = $1 AND status = 'running'",
        );
        self.one_row(q.bind(id), "cancel replay").await
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

    /// The next delayed events a recovery replay walks: of its type, due from its `due_from`
    /// on, after its cursor in (due time, log position) order, up to the recorded log end.
    pub async fn due_page(&self, r: &Replay, at: Option<DateTime<Utc>>, seq: i64, limit: i64) -> Result<Vec<DueEvent>, LogError> {
        sqlx::query_as(
            "SELECT deliver_at, seq, id, payload FROM events \
             WHERE type = $1 AND deliver_at IS NOT NULL AND deliver_at >= $2 AND seq <= $3 \
               AND (deliver_at, seq) > ($4, $5) \
             ORDER BY deliver_at, seq LIMIT $6",
        )
        .bind(&r.event_type)
        .bind(r.due_from)
        .bind(r.to_seq)
        .bind(at.or(r.due_from))
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(query("read delayed events"))
    }

    /// Records how far a recovery replay has walked its delayed events (`done` at the end) and
    /// renews its lease; false when it was superseded, cancelled or taken over.
    pub async fn advance_due(&self, id: Uuid, owner: &str, walk: DueWalk, lease: Duration) -> Result<bool, LogError> {
        let q = sqlx::query(
            "UPDATE replays SET due_cursor = $3, due_cursor_seq = $4, due_walked = $5, due_done = $6, \
                 lease_until = now() + make_interval(secs => $7), updated_at = now() \
             WHERE id = $1 AND owner = $2 AND status = 'running'",
        );
        let q = q.bind(id).bind(owner).bind(walk.at).bind(walk.seq).bind(walk.walked).bind(walk.done).bind(lease.as_secs_f64());
        self.one_row(q, "advance a replay's due walk").await
    }
}
