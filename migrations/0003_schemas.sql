-- The schema registry: versioned JSON Schemas per event type.

-- A type's settings: its compatibility mode and whether open content models are read strictly
-- (see docs/SCHEMAS.md).
CREATE TABLE schema_types (
    type          text        PRIMARY KEY,
    compatibility text        NOT NULL DEFAULT 'backward',
    strict        boolean     NOT NULL DEFAULT false,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Every version of every type's schema, 1, 2, 3… per type. A version never changes.
CREATE TABLE schemas (
    type       text        NOT NULL REFERENCES schema_types (type),
    version    integer     NOT NULL CHECK (version > 0),
    schema     json        NOT NULL,  -- as registered (json keeps its key order)
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (type, version)
);

-- Every daemon listens on `sidebus_schemas`; the payload is the type that changed.
CREATE FUNCTION sidebus_schemas_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sidebus_schemas', NEW.type);
    RETURN NULL;
END $$;
CREATE TRIGGER schemas_notify AFTER INSERT ON schemas FOR EACH ROW EXECUTE FUNCTION sidebus_schemas_notify();
CREATE TRIGGER schema_types_notify AFTER INSERT OR UPDATE ON schema_types FOR EACH ROW EXECUTE FUNCTION sidebus_schemas_notify();
