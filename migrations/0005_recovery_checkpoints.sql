-- Recovery after any number of Redis data losses (see src/recovery.rs for the invariant).

-- A delayed event's due time, so that a recovery can put the events not yet due back on their
-- schedule and give a group the ones that came due since its checkpoint.
ALTER TABLE events ADD COLUMN deliver_at timestamptz;
CREATE INDEX events_delayed ON events (type, deliver_at, seq) WHERE deliver_at IS NOT NULL;

-- A group's checkpoint is now two bounds: `resume_seq`, below which every event of its type
-- that is not delayed was acknowledged by the group, and `resume_due`, below which every
-- delayed event (by due time) was. `generation` is raised by every recovery: a checkpoint is
-- written only if the generation it was computed in is still the group's.
ALTER TABLE consumer_groups ADD COLUMN resume_due timestamptz;
ALTER TABLE consumer_groups ADD COLUMN generation bigint NOT NULL DEFAULT 0;
UPDATE consumer_groups SET resume_due = COALESCE(resume_at, created_at);

-- A publish lane's report: `bound` is a log position no event the lane has not yet added to
-- Redis can be below (the position after the last event it added, or, for a new lane, after
-- the log's end when it registered). A lane reports at least every few seconds while its daemon
-- runs; one silent for a minute is taken as gone. A lane registers (sets its bound) before it
-- stores anything. An `idle` lane has nothing stored that it has not added, and says it is
-- busy again before it stores: it holds nothing back meanwhile.
ALTER TABLE lanes ADD COLUMN bound bigint;
ALTER TABLE lanes ADD COLUMN last_id text;
ALTER TABLE lanes ADD COLUMN idle boolean NOT NULL DEFAULT false;

-- The lanes' positions are no longer snapshotted: a recovery gives each group everything from
-- its checkpoint (see src/recovery.rs).
DROP TABLE recovery_lanes;

-- Each Redis data set (epoch) that was made ready: a recovery's snapshot of the log's end and
-- the Redis clock when it began. `ready` once every group's replay exists.
ALTER TABLE recoveries ADD COLUMN epoch text;
ALTER TABLE recoveries ADD COLUMN ready boolean NOT NULL DEFAULT false;
ALTER TABLE recoveries ADD COLUMN redis_now timestamptz;
CREATE INDEX recoveries_ready ON recoveries (created_at) WHERE ready;

-- A recovery replay has two parts: log positions `from_seq`..`to_seq` (not delayed, or due by
-- `due_until`), and the delayed events due from `due_from` on, walked by (`due_cursor`,
-- `due_cursor_seq`, `due_walked` of them so far): those due by `due_until` go to the group,
-- later ones back on their schedule. `safe_cursor` is, for a replay on request, the last position its group acknowledged
-- everything up to: a Redis loss rewinds the replay there.
ALTER TABLE replays ADD COLUMN due_from timestamptz;
ALTER TABLE replays ADD COLUMN due_until timestamptz;
ALTER TABLE replays ADD COLUMN due_cursor timestamptz;
ALTER TABLE replays ADD COLUMN due_cursor_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE replays ADD COLUMN due_done boolean NOT NULL DEFAULT true;
ALTER TABLE replays ADD COLUMN due_walked bigint NOT NULL DEFAULT 0;
ALTER TABLE replays ADD COLUMN safe_cursor bigint;
