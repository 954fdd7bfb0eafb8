-- Audit records stay append-only against TRUNCATE too (row triggers do not see it).
CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION audit_records_append_only();
-- Only the schema owner (the migration role) keeps UPDATE, DELETE and TRUNCATE on the
-- audit table: whatever was granted to other roles (for example through default
-- privileges set before this table existed) is taken back.
DO $$
DECLARE
    grantee_oid OID;
BEGIN
    FOR grantee_oid IN
        SELECT DISTINCT a.grantee
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = 'audit_records'::regclass
          AND a.privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE')
          AND a.grantee <> c.relowner
    LOOP
        IF grantee_oid = 0 THEN
            EXECUTE 'REVOKE UPDATE, DELETE, TRUNCATE ON audit_records FROM PUBLIC';
        ELSE
            EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON audit_records FROM %s',
                           grantee_oid::regrole);
        END IF;
    END LOOP;
END $$;
