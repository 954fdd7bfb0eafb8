-- deploy-svc schema v1 (PostgreSQL): the same tables and stored forms as SQLite's
-- migrations 0001-0003 (integers are BIGINT, booleans and enums are integers, JSON is
-- text, every text column compares bytewise like SQLite), so one implementation of the logic (store/logic.rs) runs on both.
CREATE TABLE environments (
    id             TEXT COLLATE "C" PRIMARY KEY,
    description    TEXT COLLATE "C" NOT NULL,
    protected      BIGINT NOT NULL,
    upstream       TEXT COLLATE "C" REFERENCES environments(id),
    revision       BIGINT NOT NULL,
    create_ms      BIGINT NOT NULL,
    update_ms      BIGINT NOT NULL,
    freeze_windows TEXT COLLATE "C" NOT NULL DEFAULT '[]'
);

CREATE TABLE targets (
    environment  TEXT COLLATE "C" NOT NULL REFERENCES environments(id),
    id           TEXT COLLATE "C" NOT NULL,
    labels       TEXT COLLATE "C" NOT NULL,
    register_ms  BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL,
    PRIMARY KEY (environment, id)
);

CREATE TABLE artifacts (
    name       TEXT COLLATE "C" NOT NULL,
    version    TEXT COLLATE "C" NOT NULL,
    digest     TEXT COLLATE "C" NOT NULL,
    metadata   TEXT COLLATE "C" NOT NULL,
    create_ms  BIGINT NOT NULL,
    source_uri TEXT COLLATE "C" NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);

CREATE TABLE deployments (
    id                 BIGSERIAL PRIMARY KEY,
    artifact           TEXT COLLATE "C" NOT NULL,
    version            TEXT COLLATE "C" NOT NULL,
    environment        TEXT COLLATE "C" NOT NULL REFERENCES environments(id),
    change_reference   TEXT COLLATE "C" NOT NULL,
    state              BIGINT NOT NULL,
    cancel_reason      TEXT COLLATE "C" NOT NULL DEFAULT '',
    n_pending          BIGINT NOT NULL DEFAULT 0,
    n_placing          BIGINT NOT NULL DEFAULT 0,
    n_placed           BIGINT NOT NULL DEFAULT 0,
    n_failed           BIGINT NOT NULL DEFAULT 0,
    n_removed          BIGINT NOT NULL DEFAULT 0,
    create_ms          BIGINT NOT NULL,
    update_ms          BIGINT NOT NULL,
    emergency_reason   TEXT COLLATE "C" NOT NULL DEFAULT '',
    emergency_approver TEXT COLLATE "C" NOT NULL DEFAULT '',
    strategy           TEXT COLLATE "C" NOT NULL DEFAULT '{}',
    continued          BIGINT NOT NULL DEFAULT 0,
    rollback_of        BIGINT,
    FOREIGN KEY (artifact, version) REFERENCES artifacts(name, version)
);
CREATE INDEX deployments_by_version ON deployments (artifact, version, environment, state);
CREATE INDEX deployments_by_environment ON deployments (environment, id);
CREATE INDEX deployments_by_rollback ON deployments (rollback_of) WHERE rollback_of IS NOT NULL;

CREATE TABLE placements (
    deployment BIGINT NOT NULL REFERENCES deployments(id),
    target     TEXT COLLATE "C" NOT NULL,
    state      BIGINT NOT NULL,
    message    TEXT COLLATE "C" NOT NULL,
    seq        BIGINT NOT NULL,
    update_ms  BIGINT NOT NULL,
    ordered    BIGINT NOT NULL DEFAULT 1,
    ordinal    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (deployment, target)
);
CREATE INDEX placements_current ON placements (state) WHERE state IN (2, 3, 4);
CREATE INDEX placements_orders ON placements (target, state) WHERE ordered = 1 AND state IN (1, 2);

-- The transactional outbox. seq comes from a sequence inside the writing transaction, so
-- with concurrent writers a lower seq can commit after a higher one (the late commit):
-- readers deliver in seq order and wait at a hole until every transaction that could
-- still fill it has ended (see store/postgres.rs); a rolled-back transaction leaves a hole
-- that is skipped once resolved.
-- CACHE 1 (the default, pinned): values are handed out in order across sessions, which
-- the hole rule relies on.
CREATE SEQUENCE placement_events_seq CACHE 1;
CREATE TABLE placement_events (
    seq            BIGINT PRIMARY KEY,
    commit_ms      BIGINT NOT NULL,
    deployment     BIGINT NOT NULL,
    environment    TEXT COLLATE "C" NOT NULL,
    target         TEXT COLLATE "C" NOT NULL,
    artifact       TEXT COLLATE "C" NOT NULL,
    version        TEXT COLLATE "C" NOT NULL,
    digest         TEXT COLLATE "C" NOT NULL,
    state          BIGINT NOT NULL,
    previous_state BIGINT NOT NULL,
    message        TEXT COLLATE "C" NOT NULL
);
-- The sequence is drawn by this trigger, after the transaction id is assigned (the hole
-- rule needs every transaction that holds a sequence to have its id first). A column
-- default would be evaluated before the trigger could force the id.
CREATE FUNCTION placement_events_sequence() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    NEW.seq := nextval('placement_events_seq');
    RETURN NEW;
END $$;
CREATE TRIGGER placement_events_sequence BEFORE INSERT ON placement_events
    FOR EACH ROW EXECUTE FUNCTION placement_events_sequence();
-- A snapshot rolls a placement back to its last event at or before its sequence.
CREATE INDEX placement_events_by_placement ON placement_events (deployment, target, seq);

CREATE TABLE request_ids (
    request_id  TEXT COLLATE "C" PRIMARY KEY,
    method      TEXT COLLATE "C" NOT NULL,
    fingerprint TEXT COLLATE "C" NOT NULL,
    resource    TEXT COLLATE "C" NOT NULL,
    create_ms   BIGINT NOT NULL
);

CREATE TABLE log_meta (
    id             BIGINT PRIMARY KEY CHECK (id = 1),
    pruned_through BIGINT NOT NULL
);
INSERT INTO log_meta (id, pruned_through) VALUES (1, 0);

-- The audit trail, append-only (the trigger refuses UPDATE and DELETE).
CREATE TABLE audit_records (
    id             BIGSERIAL PRIMARY KEY,
    time_ms        BIGINT NOT NULL,
    principal      TEXT COLLATE "C" NOT NULL,
    action         TEXT COLLATE "C" NOT NULL,
    resource       TEXT COLLATE "C" NOT NULL,
    before_summary TEXT COLLATE "C" NOT NULL,
    after_summary  TEXT COLLATE "C" NOT NULL,
    request_id     TEXT COLLATE "C" NOT NULL,
    reason         TEXT COLLATE "C" NOT NULL
);
CREATE INDEX audit_records_by_resource ON audit_records (resource, id);
CREATE INDEX audit_records_by_principal ON audit_records (principal, id);
CREATE INDEX audit_records_by_time ON audit_records (time_ms, id);

CREATE FUNCTION audit_records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only';
END $$;
CREATE TRIGGER audit_records_no_change BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION audit_records_append_only();
