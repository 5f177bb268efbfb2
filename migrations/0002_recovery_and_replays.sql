-- Recovery after Redis loses its data, and replays from the log.

-- Replay reads a type in log order from a position; a time range is turned into a position
-- with the BRIN index (rows are appended in about time order, so it stays tiny).
DROP INDEX events_type_time;
CREATE INDEX events_type_seq ON events (type, seq);
CREATE INDEX events_time ON events USING brin (time);

-- `resume_seq` is a group's checkpoint: the log position of the oldest event the group may
-- still need (kept by the janitor every couple of seconds); after Redis loses its data, the
-- group is given again what it had not acknowledged from there.
ALTER TABLE consumer_groups ADD COLUMN resume_seq bigint, ADD COLUMN resume_at timestamptz;

-- How far each publish lane has added its events to Redis (its last sequence number there).
-- Written after batches, when the lane goes idle, and at once when Redis stops answering.
CREATE TABLE lanes (
    id         uuid        PRIMARY KEY,
    node       text        NOT NULL,
    added_seq  bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per recovery of a Redis that lost its data: the lanes' positions and the log's end
-- as they were before any flusher could add to the new Redis. What a lane had added by then
-- was lost with Redis and is replayed; what it had not is its flusher's job.
CREATE TABLE recoveries (
    id         uuid        PRIMARY KEY,
    max_seq    bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE recovery_lanes (
    recovery  uuid   NOT NULL REFERENCES recoveries (id) ON DELETE CASCADE,
    lane      uuid   NOT NULL,
    added_seq bigint NOT NULL,
    PRIMARY KEY (recovery, lane)
);

-- Replays: events of a type from the log, delivered again to one group through a lane of its
-- own. A replay covers log positions `from_seq` to `to_seq` (the log's end when it was asked
-- for), so it ends; `cursor` is the last position added to the group's replay stream, so a
-- replay resumes after a restart; `owner` and `lease_until` say which daemon runs it.
CREATE TABLE replays (
    id          uuid        PRIMARY KEY,
    type        text        NOT NULL,
    group_name  text        NOT NULL,
    since       timestamptz,
    until       timestamptz,
    from_seq    bigint      NOT NULL DEFAULT 1,
    to_seq      bigint      NOT NULL,
    cursor      bigint      NOT NULL DEFAULT 0,
    reason      text        NOT NULL,
    recovery    uuid        REFERENCES recoveries (id),
    status      text        NOT NULL DEFAULT 'running',
    added       bigint      NOT NULL DEFAULT 0,
    owner       text,
    lease_until timestamptz,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX replays_running ON replays (status) WHERE status = 'running';
