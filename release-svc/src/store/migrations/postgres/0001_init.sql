-- release-svc schema v1 (PostgreSQL): the SQLite schema's 0001 + 0002, in one step.
CREATE TABLE features (
    key       TEXT PRIMARY KEY,
    body      TEXT NOT NULL,
    revision  BIGINT NOT NULL,
    create_ms BIGINT NOT NULL,
    update_ms BIGINT NOT NULL
);

CREATE TABLE releases (
    id           BIGSERIAL PRIMARY KEY,
    description  TEXT NOT NULL,
    features     TEXT NOT NULL,
    environments TEXT NOT NULL,
    state        BIGINT NOT NULL,
    revision     BIGINT NOT NULL,
    create_ms    BIGINT NOT NULL,
    update_ms    BIGINT NOT NULL,
    governance   TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE request_ids (
    request_id  TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    resource    TEXT NOT NULL
);

CREATE TABLE placements (
    deployment  BIGINT NOT NULL,
    target      TEXT NOT NULL,
    environment TEXT NOT NULL,
    artifact    TEXT NOT NULL,
    version     TEXT NOT NULL,
    state       BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    PRIMARY KEY (deployment, target)
);

CREATE TABLE consumer (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    cursor         BIGINT NOT NULL,
    events_applied BIGINT NOT NULL
);
INSERT INTO consumer (id, cursor, events_applied) VALUES (1, 0, 0);

CREATE TABLE withdrawals (
    id          BIGSERIAL PRIMARY KEY,
    feature     TEXT NOT NULL,
    environment TEXT NOT NULL,
    reason      TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    time_ms     BIGINT NOT NULL
);

CREATE TABLE policies (
    environment TEXT PRIMARY KEY,
    body        TEXT NOT NULL,
    revision    BIGINT NOT NULL,
    update_ms   BIGINT NOT NULL
);

CREATE TABLE audit_records (
    id         BIGSERIAL PRIMARY KEY,
    time_ms    BIGINT NOT NULL,
    principal  TEXT NOT NULL,
    action     TEXT NOT NULL,
    resource   TEXT NOT NULL,
    before     TEXT NOT NULL,
    after      TEXT NOT NULL,
    request_id TEXT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX audit_records_resource ON audit_records (resource, id);
CREATE INDEX audit_records_principal ON audit_records (principal, id);
-- Append-only: nothing updates or deletes a record.
CREATE FUNCTION audit_records_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only';
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION audit_records_append_only();
