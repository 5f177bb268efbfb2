-- Dead letters recorded in the log, so they outlive a Redis loss and can be searched; and the
-- size of a replay, for its progress.

-- Every dead letter of every group, copied from the group's Redis dead-letter stream (`entry`
-- is its id there). `status`: `dead` until it is redriven or purged.
CREATE TABLE dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type        text        NOT NULL,
    group_name  text        NOT NULL,
    entry       text        NOT NULL,
    event_id    text        NOT NULL,
    payload     bytea       NOT NULL,
    error       text        NOT NULL,
    attempts    integer     NOT NULL,
    history     jsonb       NOT NULL DEFAULT '[]',
    failed_at   timestamptz NOT NULL,
    status      text        NOT NULL DEFAULT 'dead',
    settled_at  timestamptz,
    CONSTRAINT dead_letters_entry UNIQUE (type, group_name, entry)
);
CREATE INDEX dead_letters_open ON dead_letters (type, group_name, id) WHERE status = 'dead';
CREATE INDEX dead_letters_event ON dead_letters (event_id);

ALTER TABLE replays ADD COLUMN total bigint;
