-- release-svc schema v2 (SQLite): release plans and governance, environment policies, audit.

-- JSON of the plan side of a release: requester, change reference, planned start,
-- approvals, emergency override, waiting reasons. Step state lives in `environments`.
ALTER TABLE releases ADD COLUMN governance TEXT NOT NULL DEFAULT '{}';

-- One policy per environment, versioned by revision (the etag).
CREATE TABLE policies (
    environment TEXT PRIMARY KEY,
    body        TEXT NOT NULL,  -- JSON of the rules
    revision    INTEGER NOT NULL,
    update_ms   INTEGER NOT NULL
) STRICT;

-- Append-only: written in the transaction of the change it records; nothing updates or
-- deletes a row.
CREATE TABLE audit_records (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms    INTEGER NOT NULL,
    principal  TEXT NOT NULL,
    action     TEXT NOT NULL,
    resource   TEXT NOT NULL,
    before     TEXT NOT NULL,
    after      TEXT NOT NULL,
    request_id TEXT NOT NULL,
    reason     TEXT NOT NULL
) STRICT;
CREATE INDEX audit_records_resource ON audit_records (resource, id);
CREATE INDEX audit_records_principal ON audit_records (principal, id);
