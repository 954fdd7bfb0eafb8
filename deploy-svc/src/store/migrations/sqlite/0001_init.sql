-- deploy-svc schema v1 (SQLite).
CREATE TABLE environments (
    id          TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    protected   INTEGER NOT NULL,
    upstream    TEXT REFERENCES environments(id),
    revision    INTEGER NOT NULL,
    create_ms   INTEGER NOT NULL,
    update_ms   INTEGER NOT NULL
) STRICT;

CREATE TABLE targets (
    environment  TEXT NOT NULL REFERENCES environments(id),
    id           TEXT NOT NULL,
    labels       TEXT NOT NULL,
    register_ms  INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    PRIMARY KEY (environment, id)
) STRICT;

CREATE TABLE artifacts (
    name      TEXT NOT NULL,
    version   TEXT NOT NULL,
    digest    TEXT NOT NULL,
    metadata  TEXT NOT NULL,
    create_ms INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) STRICT;

CREATE TABLE deployments (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    artifact         TEXT NOT NULL,
    version          TEXT NOT NULL,
    environment      TEXT NOT NULL REFERENCES environments(id),
    change_reference TEXT NOT NULL,
    state            INTEGER NOT NULL,
    cancel_reason    TEXT NOT NULL DEFAULT '',
    -- Placement counts per state, kept in step with placements so a report derives the
    -- deployment state in O(1) instead of counting every target.
    n_pending        INTEGER NOT NULL DEFAULT 0,
    n_placing        INTEGER NOT NULL DEFAULT 0,
    n_placed         INTEGER NOT NULL DEFAULT 0,
    n_failed         INTEGER NOT NULL DEFAULT 0,
    n_removed        INTEGER NOT NULL DEFAULT 0,
    create_ms        INTEGER NOT NULL,
    update_ms        INTEGER NOT NULL,
    FOREIGN KEY (artifact, version) REFERENCES artifacts(name, version)
) STRICT;
CREATE INDEX deployments_by_version ON deployments (artifact, version, environment, state);
CREATE INDEX deployments_by_environment ON deployments (environment, id);

CREATE TABLE placements (
    deployment INTEGER NOT NULL REFERENCES deployments(id),
    target     TEXT NOT NULL,
    state      INTEGER NOT NULL,
    message    TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    update_ms  INTEGER NOT NULL,
    PRIMARY KEY (deployment, target)
) STRICT;
CREATE INDEX placements_current ON placements (state) WHERE state IN (2, 3, 4);

-- The transactional outbox: one row per placement change, written in the same
-- transaction as the change. seq is gap-free and follows commit order because one
-- writer commits at a time.
CREATE TABLE placement_events (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    commit_ms      INTEGER NOT NULL,
    deployment     INTEGER NOT NULL,
    environment    TEXT NOT NULL,
    target         TEXT NOT NULL,
    artifact       TEXT NOT NULL,
    version        TEXT NOT NULL,
    digest         TEXT NOT NULL,
    state          INTEGER NOT NULL,
    previous_state INTEGER NOT NULL,
    message        TEXT NOT NULL
) STRICT;

-- AIP-155 request ids: a retried create returns the resource the first call created.
CREATE TABLE request_ids (
    request_id  TEXT PRIMARY KEY,
    method      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    resource    TEXT NOT NULL,
    create_ms   INTEGER NOT NULL
) STRICT;

CREATE TABLE log_meta (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through INTEGER NOT NULL
) STRICT;
INSERT INTO log_meta (id, pruned_through) VALUES (1, 0);
