//! The log's side of recovery after Redis loses its data (see `bus::recovery` for the design and
//! its invariant): the publish lanes' reports (`lanes`), the groups' checkpoints
//! (`consumer_groups`), and the recoveries of each Redis data set (`recoveries`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{EventLog, LogError, query};

/// A publish lane that has not reported for this long is taken as gone: its bound no longer
/// holds the checkpoints back. A lane reports at least every [`LANE_HEARTBEAT`] while its
/// daemon runs, and stores nothing once its last report is older than [`LANE_REPORT_FRESH`].
pub const LANE_SILENT: Duration = Duration::from_secs(60);
/// How often a lane reports while idle.
pub const LANE_HEARTBEAT: Duration = Duration::from_secs(10);
/// A lane reports again before it stores a batch when its last report is older than this. With
/// a store step taking at most 30 s, a lane that stores is never silent for [`LANE_SILENT`].
pub const LANE_REPORT_FRESH: Duration = Duration::from_secs(15);

/// What the checkpoints need from the log, read before Redis is looked at (see
/// `bus::checkpoint`).
#[derive(Debug, Clone, Default)]
pub struct CheckpointInputs {
    /// The log position after the last one handed out: every event stored from now on is at
    /// or after it.
    pub cap: i64,
    /// The lowest bound of the publish lanes that report and are busy (none: no such lane).
    pub lanes_floor: Option<i64>,
    /// The Redis data set the last recovery made ready.
    pub epoch: Option<String>,
    /// Per (type, group): its generation.
    pub generations: HashMap<(String, String), i64>,
    /// Per (type, group) with a running recovery: what it has yet to give.
    pub recovering: HashMap<(String, String), Recovering>,
    /// Running replays on request, per (type, group).
    pub requested: HashMap<(String, String), Vec<Uuid>>,
}

/// What a running recovery replay has yet to give its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovering {
    /// The first log position it has not added yet.
    pub next: i64,
    /// The due time from which it has not walked its delayed events yet (none: walked).
    pub due: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct RunningReplay {
    id: Uuid,
    #[sqlx(rename = "type")]
    event_type: String,
    group_name: String,
    reason: String,
    next: i64,
    due_cursor: Option<DateTime<Utc>>,
    due_from: Option<DateTime<Utc>>,
    due_done: bool,
}

/// A group's checkpoint to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupResume {
    /// The type.
    pub event_type: String,
    /// The group.
    pub group: String,
    /// Every event of the type before this log position that is not delayed was acknowledged.
    pub seq: i64,
    /// Every delayed event due before this time was acknowledged.
    pub due: DateTime<Utc>,
    /// The group's generation when the inputs were read.
    pub generation: i64,
}

impl EventLog {
    /// Registers a publish lane before it stores anything: a new lane's bound is the log's end
    /// now (everything it will store comes after it); a known lane keeps its bound (after the
    /// last event it reported added). Refreshes its report.
    pub async fn register_lane(&self, lane: Uuid, node: &str) -> Result<(), LogError> {
        sqlx::query(
            "INSERT INTO lanes (id, node, added_seq, bound, updated_at) \
             VALUES ($1, $2, 0, COALESCE(pg_sequence_last_value(pg_get_serial_sequence('events', 'seq')), 0) + 1, now()) \
             ON CONFLICT (id) DO UPDATE SET node = EXCLUDED.node, updated_at = now(), idle = false, \
                 bound = COALESCE(lanes.bound, EXCLUDED.bound)",
        )
        .bind(lane)
        .bind(node)
        .execute(&self.pool)
        .await
        .map_err(query("register lane"))?;
        Ok(())
    }

    /// A lane's report, also its heartbeat. `last_added` is the id of the last event it added
    /// to Redis (none: nothing new since its last report): its bound becomes the position after
    /// that event. `idle`: the lane has nothing stored and not added, and stores nothing before
    /// it reports itself busy again; its bound becomes the log's end now, and it holds no
    /// checkpoint back while idle.
    pub async fn report_lane(&self, lane: Uuid, node: &str, last_added: Option<&str>, idle: bool) -> Result<(), LogError> {
        let n = sqlx::query(
            "UPDATE lanes SET node = $2, updated_at = now(), last_id = COALESCE($3, last_id), idle = $4, \
                 bound = GREATEST(bound, COALESCE((SELECT seq + 1 FROM events WHERE id = $3), bound), \
                     CASE WHEN $4 THEN COALESCE(pg_sequence_last_value(pg_get_serial_sequence('events', 'seq')), 0) + 1 END) \
             WHERE id = $1",
        )
        .bind(lane)
        .bind(node)
        .bind(last_added)
        .bind(idle)
        .execute(&self.pool)
        .await
        .map_err(query("report lane"))?
        .rows_affected();
        if n == 0 {
            // Removed meanwhile (it cannot be, but a report must never be lost): register it.
            self.register_lane(lane, node).await?;
        }
        Ok(())
    }

    /// Reads what the checkpoints need, the log's end first (see [`CheckpointInputs::cap`]).
    pub async fn checkpoint_inputs(&self) -> Result<CheckpointInputs, LogError> {
        let q = || query("read checkpoint inputs");
        // First, in a statement of its own: a lane whose report is read below registered before
        // storing anything, so an event stored before this moment is either below `cap`'s
        // reach or held back by its lane's bound.
        let cap: i64 = sqlx::query_scalar("SELECT COALESCE(pg_sequence_last_value(pg_get_serial_sequence('events', 'seq')), 0) + 1")
            .fetch_one(&self.pool)
            .await
            .map_err(q())?;
        let lanes_floor: Option<i64> = sqlx::query_scalar(
            "SELECT min(bound) FROM lanes WHERE bound IS NOT NULL AND NOT idle AND updated_at > now() - make_interval(secs => $1)",
        )
        .bind(LANE_SILENT.as_secs_f64())
        .fetch_one(&self.pool)
        .await
        .map_err(q())?;
        let epoch: Option<String> = sqlx::query_scalar("SELECT epoch FROM recoveries WHERE ready ORDER BY created_at DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(q())?
            .flatten();
        let generations: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT type, name, generation FROM consumer_groups").fetch_all(&self.pool).await.map_err(q())?;
        let running: Vec<RunningReplay> = sqlx::query_as(
            "SELECT id, type, group_name, reason, cursor + 1 AS next, due_cursor, due_from, due_done FROM replays WHERE status = 'running'",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q())?;
        let mut inputs = CheckpointInputs {
            cap,
            lanes_floor,
            epoch,
            generations: generations.into_iter().map(|(t, g, n)| ((t, g), n)).collect(),
            ..Default::default()
        };
        for r in running {
            let key = (r.event_type, r.group_name);
            if r.reason != "recovery" {
                inputs.requested.entry(key).or_default().push(r.id);
                continue;
            }
            let e = inputs.recovering.entry(key).or_insert(Recovering { next: r.next, due: None });
            e.next = e.next.min(r.next);
            if !r.due_done {
                // Not started: from its due_from.
                let d = r.due_cursor.or(r.due_from);
                e.due = match (e.due, d) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        Ok(inputs)
    }

    /// Records groups' checkpoints, each only if its generation is still the one it was
    /// computed in (a recovery since then raised it: the checkpoint may describe a Redis that is
    /// gone). Returns how many were recorded.
    pub async fn set_checkpoints(&self, rows: &[GroupResume]) -> Result<u64, LogError> {
        let types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
        let groups: Vec<&str> = rows.iter().map(|r| r.group.as_str()).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let dues: Vec<DateTime<Utc>> = rows.iter().map(|r| r.due).collect();
        let generations: Vec<i64> = rows.iter().map(|r| r.generation).collect();
        // The generation is a condition on the row itself, so an UPDATE that waited for a
        // recovery's lock sees the raised generation and skips the row.
        Ok(sqlx::query(
            "UPDATE consumer_groups g SET resume_seq = u.seq, resume_due = u.due, resume_at = now() \
             FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::timestamptz[], $5::int8[]) AS u(type, name, seq, due, generation) \
             WHERE g.type = u.type AND g.name = u.name AND g.generation = u.generation",
        )
        .bind(&types)
        .bind(&groups)
        .bind(&seqs)
        .bind(&dues)
        .bind(&generations)
        .execute(&self.pool)
        .await
        .map_err(query("set checkpoints"))?
        .rows_affected())
    }

    /// Records, for replays on request, the last log position their group acknowledged
    /// everything up to: where a Redis loss rewinds them.
    pub async fn set_replay_safe_cursors(&self, rows: &[(Uuid, i64)]) -> Result<(), LogError> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
        let cursors: Vec<i64> = rows.iter().map(|r| r.1).collect();
        sqlx::query(
            "UPDATE replays r SET safe_cursor = u.cursor FROM UNNEST($1::uuid[], $2::int8[]) AS u(id, cursor) \
             WHERE r.id = u.id AND r.reason = 'request'",
        )
        .bind(&ids)
        .bind(&cursors)
        .execute(&self.pool)
        .await
        .map_err(query("set replay cursors"))?;
        Ok(())
    }

    /// The Redis data set the last recovery made ready, and whether a recovery for `epoch`
    /// exists that is not ready yet (its daemon is making it ready, or died doing so).
    pub async fn epoch_state(&self, epoch: &str) -> Result<(Option<String>, Option<(Uuid, Duration)>), LogError> {
        let ready: Option<String> = sqlx::query_scalar("SELECT epoch FROM recoveries WHERE ready ORDER BY created_at DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(query("read epoch"))?
            .flatten();
        let pending: Option<(Uuid, f64)> =
            sqlx::query_as("SELECT id, extract(epoch FROM now() - created_at)::float8 FROM recoveries WHERE epoch = $1 AND NOT ready")
                .bind(epoch)
                .fetch_optional(&self.pool)
                .await
                .map_err(query("read epoch"))?;
        Ok((ready, pending.map(|(id, age)| (id, Duration::from_secs_f64(age.max(0.0))))))
    }

    /// Whether any Redis data set was made ready before, or the log was used by a daemon of a
    /// version that kept no record of them (its lanes have no bound): then a Redis without an
    /// epoch lost data that had been delivered from.
    pub async fn had_redis_before(&self) -> Result<bool, LogError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM recoveries WHERE ready) OR EXISTS (SELECT 1 FROM lanes WHERE bound IS NULL)")
            .fetch_one(&self.pool)
            .await
            .map_err(query("read epoch"))
    }

    /// Records a Redis data set that needs no recovery (the first one this log sees, or one
    /// made ready by a daemon of an older version) as ready.
    pub async fn adopt_epoch(&self, epoch: &str) -> Result<(), LogError> {
        sqlx::query(
            "INSERT INTO recoveries (id, max_seq, epoch, ready) \
             SELECT $1, 0, $2, true \
             WHERE NOT EXISTS (SELECT 1 FROM recoveries WHERE epoch = $2)",
        )
        .bind(Uuid::new_v4())
        .bind(epoch)
        .execute(&self.pool)
        .await
        .map_err(query("adopt epoch"))?;
        Ok(())
    }

    /// Begins a recovery for the Redis data set `epoch`, before it is set in Redis: records the
    /// log's end (every event that was in the lost Redis is at or before it; 0 when nothing was
    /// lost: `lost` is false for the first data set) and raises every group's generation, so
    /// that no checkpoint computed before is recorded from now on.
    pub async fn begin_recovery(&self, epoch: &str, lost: bool) -> Result<Uuid, LogError> {
        let q = || query("begin recovery");
        let id = Uuid::new_v4();
        let mut tx = self.pool.begin().await.map_err(q())?;
        sqlx::query("UPDATE consumer_groups SET generation = generation + 1").execute(&mut *tx).await.map_err(q())?;
        sqlx::query(
            "INSERT INTO recoveries (id, max_seq, epoch) VALUES ($1, CASE WHEN $3 THEN (SELECT COALESCE(max(seq), 0) FROM events) ELSE 0 END, $2)",
        )
        .bind(id)
        .bind(epoch)
        .bind(lost)
            .execute(&mut *tx)
            .await
            .map_err(q())?;
        tx.commit().await.map_err(q())?;
        Ok(id)
    }

    /// The log end recorded by the recovery that set `epoch` (none: no such recovery).
    pub async fn recovery_end(&self, epoch: &str) -> Result<Option<i64>, LogError> {
        sqlx::query_scalar("SELECT max_seq FROM recoveries WHERE epoch = $1")
            .bind(epoch)
            .fetch_optional(&self.pool)
            .await
            .map_err(query("read recovery"))
    }

    /// Forgets a recovery that was not used (another daemon set the epoch first).
    pub async fn drop_recovery(&self, id: Uuid) -> Result<(), LogError> {
        sqlx::query("DELETE FROM recoveries WHERE id = $1 AND NOT ready")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query("drop recovery"))?;
        Ok(())
    }

    /// Makes a begun recovery ready, once its epoch is set in Redis (`redis_now`: the Redis
    /// clock then). In one transaction: every running recovery replay is superseded; replays on
    /// request whose group had not acknowledged all they added are rewound to where it had;
    /// every group gets a recovery replay from its checkpoint (or from the lowest bound of a
    /// lane that reports, when lower) to the recorded log end, and of the delayed events due
    /// from its checkpoint's due time on. When nothing was lost (a log end of 0: the first Redis
    /// data set this log knows) no replay is created. Returns how many groups got a replay, or
    /// `None` when the recovery was made ready before (by another daemon).
    pub async fn start_recovery(&self, id: Uuid, redis_now: DateTime<Utc>) -> Result<Option<u64>, LogError> {
        let q = || query("start recovery");
        let mut tx = self.pool.begin().await.map_err(q())?;
        let end: Option<i64> =
            sqlx::query_scalar("UPDATE recoveries SET ready = true, redis_now = $2 WHERE id = $1 AND NOT ready RETURNING max_seq")
                .bind(id)
                .bind(redis_now)
                .fetch_optional(&mut *tx)
                .await
                .map_err(q())?;
        let Some(end) = end else { return Ok(None) };
        if end == 0 {
            tx.commit().await.map_err(q())?;
            return Ok(Some(0));
        }
        // The groups' rows stay locked until the end: no checkpoint is recorded meanwhile.
        sqlx::query("SELECT 1 FROM consumer_groups FOR UPDATE").execute(&mut *tx).await.map_err(q())?;
        sqlx::query(
            "UPDATE replays SET status = 'superseded', lease_until = NULL, updated_at = now() \
             WHERE reason = 'recovery' AND status = 'running'",
        )
        .execute(&mut *tx)
        .await
        .map_err(q())?;
        sqlx::query(
            "UPDATE replays SET cursor = safe_cursor, status = 'running', owner = NULL, lease_until = NULL, updated_at = now() \
             WHERE reason = 'request' AND safe_cursor IS NOT NULL AND safe_cursor < cursor \
               AND (status = 'running' OR (status = 'done' AND updated_at > now() - interval '1 day'))",
        )
        .execute(&mut *tx)
        .await
        .map_err(q())?;
        let n = sqlx::query(
            "INSERT INTO replays (id, type, group_name, from_seq, to_seq, cursor, reason, recovery, \
                                  due_from, due_until, due_cursor, due_cursor_seq, due_done) \
             SELECT gen_random_uuid(), g.type, g.name, f.from_seq, r.max_seq, f.from_seq - 1, 'recovery', r.id, \
                    f.due_from, $2, f.due_from, 0, false \
             FROM consumer_groups g CROSS JOIN recoveries r \
             CROSS JOIN LATERAL (SELECT GREATEST(1, LEAST(COALESCE(g.resume_seq, 1), \
                     (SELECT min(bound) FROM lanes WHERE bound IS NOT NULL AND NOT idle AND updated_at > now() - make_interval(secs => $3)))) AS from_seq, \
                     COALESCE(g.resume_due, g.created_at) AS due_from) f \
             WHERE r.id = $1",
        )
        .bind(id)
        .bind(redis_now)
        .bind(LANE_SILENT.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(q())?
        .rows_affected();
        tx.commit().await.map_err(q())?;
        Ok(Some(n))
    }
}
