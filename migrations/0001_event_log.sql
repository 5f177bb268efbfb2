-- The event log: every published event, once, keyed by its id. `seq` is the log order; replay
-- reads by (type, time) in `seq` order. (`origin_lane`, `origin_seq`) say which publish stored
-- the row: a publish lane and its own sequence number. A batch that runs again after a failure
-- recognises its own rows by them and adds them to Redis (at most once, see
-- src/lua/publish.lua), while a publish that repeats an id stored by another publish is a
-- duplicate and adds nothing. `payload` is the event exactly as delivered (a MessagePack map).
CREATE TABLE events (
    seq            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             text        NOT NULL,
    type           text        NOT NULL,
    time           timestamptz NOT NULL,
    source         text        NOT NULL,
    schema_version integer,
    correlation_id text        NOT NULL,
    partition_key  text,
    origin_lane    uuid        NOT NULL,
    origin_seq     bigint      NOT NULL,
    payload        bytea       NOT NULL,
    CONSTRAINT events_id_unique UNIQUE (id)
);

-- Replay reads a type in log order from a position; a time range is turned into a position
-- with the BRIN index (rows are appended in about time order, so it stays tiny).
CREATE INDEX events_type_seq ON events (type, seq);
CREATE INDEX events_time ON events USING brin (time);

-- Every type ever published or subscribed to, so the trimmer can find every stream.
CREATE TABLE event_types (
    type       text        PRIMARY KEY,
    first_seen timestamptz NOT NULL DEFAULT now()
);

-- Every consumer group, so a Redis that lost its state can be told which groups to recreate.
-- `resume_seq` is the checkpoint: the log position of the oldest event the group may still
-- need (kept by the janitor every couple of seconds); after Redis loses its data, the group is
-- given again what it had not acknowledged from there.
CREATE TABLE consumer_groups (
    type       text        NOT NULL,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    resume_seq bigint,
    resume_at  timestamptz,
    PRIMARY KEY (type, name)
);

-- How far each publish lane has added its events to Redis (its last sequence number there).
-- Written now and then, and at once when Redis stops answering: after Redis loses its data,
-- events a lane had not added yet are left to that lane's flusher, not replayed.
CREATE TABLE lanes (
    id         uuid        PRIMARY KEY,
    node       text        NOT NULL,
    added_seq  bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Replays: events of a type from the log, delivered again to one group through a lane of its
-- own. `cursor` is the last log position added to the group's replay stream, so a replay
-- resumes after a restart; `owner` and `lease_until` say which daemon runs it.
CREATE TABLE replays (
    id          uuid        PRIMARY KEY,
    type        text        NOT NULL,
    group_name  text        NOT NULL,
    since       timestamptz,
    until       timestamptz,
    from_seq    bigint      NOT NULL DEFAULT 0,
    cursor      bigint      NOT NULL DEFAULT 0,
    reason      text        NOT NULL,
    only_added  boolean     NOT NULL DEFAULT false,
    status      text        NOT NULL DEFAULT 'running',
    added       bigint      NOT NULL DEFAULT 0,
    owner       text,
    lease_until timestamptz,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX replays_running ON replays (status) WHERE status = 'running';
