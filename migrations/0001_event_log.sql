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

CREATE INDEX events_type_time ON events (type, time, seq);

-- Every type ever published or subscribed to, so the trimmer can find every stream.
CREATE TABLE event_types (
    type       text        PRIMARY KEY,
    first_seen timestamptz NOT NULL DEFAULT now()
);

-- Every consumer group, so a Redis that lost its state can be told which groups to recreate.
CREATE TABLE consumer_groups (
    type       text        NOT NULL,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (type, name)
);
