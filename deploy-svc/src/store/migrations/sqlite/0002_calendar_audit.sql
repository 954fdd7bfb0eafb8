-- deploy-svc schema v2 (SQLite): the change calendar, emergency overrides, the audit trail.

-- The freeze windows of an environment, as a JSON array (see sqlite.rs `StoredWindow`).
ALTER TABLE environments ADD COLUMN freeze_windows TEXT NOT NULL DEFAULT '[]';

-- The emergency override a deployment was created with (both empty when none).
ALTER TABLE deployments ADD COLUMN emergency_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE deployments ADD COLUMN emergency_approver TEXT NOT NULL DEFAULT '';

-- The audit trail: one row per committed change, written in the change's transaction.
-- Append-only: the triggers refuse every UPDATE and DELETE, and event retention never
-- touches this table.
CREATE TABLE audit_records (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms        INTEGER NOT NULL,
    principal      TEXT NOT NULL,
    action         TEXT NOT NULL,
    resource       TEXT NOT NULL,
    before_summary TEXT NOT NULL,
    after_summary  TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    reason         TEXT NOT NULL
) STRICT;
CREATE INDEX audit_records_by_resource ON audit_records (resource, id);
CREATE INDEX audit_records_by_principal ON audit_records (principal, id);
CREATE INDEX audit_records_by_time ON audit_records (time_ms, id);

CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;
CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;
