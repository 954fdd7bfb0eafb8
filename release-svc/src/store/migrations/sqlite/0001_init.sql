-- release-svc schema v1 (SQLite).
CREATE TABLE features (
    key       TEXT PRIMARY KEY,
    body      TEXT NOT NULL,    -- JSON of the mutable fields
    revision  INTEGER NOT NULL,
    create_ms INTEGER NOT NULL,
    update_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE releases (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    description  TEXT NOT NULL,
    features     TEXT NOT NULL, -- JSON array of keys
    environments TEXT NOT NULL, -- JSON array of {environment, rollout_percent}
    state        INTEGER NOT NULL,
    revision     INTEGER NOT NULL,
    create_ms    INTEGER NOT NULL,
    update_ms    INTEGER NOT NULL
) STRICT;

CREATE TABLE request_ids (
    request_id  TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    resource    TEXT NOT NULL
) STRICT;

-- The mirror of deploy-svc's placements, one row per deployment and target.
CREATE TABLE placements (
    deployment  INTEGER NOT NULL,
    target      TEXT NOT NULL,
    environment TEXT NOT NULL,
    artifact    TEXT NOT NULL,
    version     TEXT NOT NULL,
    state       INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (deployment, target)
) STRICT;

-- The consumer's cursor, advanced in the same transaction as the events it applied.
-- events_applied counts every applied event: a double apply would show as a mismatch.
CREATE TABLE consumer (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    cursor         INTEGER NOT NULL,
    events_applied INTEGER NOT NULL
) STRICT;
INSERT INTO consumer (id, cursor, events_applied) VALUES (1, 0, 0);

-- Automatic withdrawals, written in the transaction of the events that caused them.
CREATE TABLE withdrawals (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    feature     TEXT NOT NULL,
    environment TEXT NOT NULL,
    reason      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    time_ms     INTEGER NOT NULL
) STRICT;
