-- Least-privilege PostgreSQL roles for one service's database (release-svc shown; for
-- deploy-svc replace "release_" with "deploy_"). Run as a superuser connected to the
-- service's database, before or after the service first migrated it:
--
--     psql "postgres://postgres@db/release" -f deploy/postgres/roles.sql
--
-- release_migrator owns the schema and everything in it: start the service with its URL
-- to create or upgrade the schema (migrations run at start), for example as a one-off job
-- before a rollout. release_runtime is what the replicas run as: it reads and writes the
-- service's tables but cannot change the schema, and cannot UPDATE, DELETE or TRUNCATE
-- audit records. Both roles log in with the authentication pg_hba.conf requires (set a
-- password or a certificate for each).

CREATE ROLE release_migrator LOGIN;
CREATE ROLE release_runtime LOGIN;

-- Only the migrator creates objects in the schema.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO release_migrator;
GRANT USAGE ON SCHEMA public TO release_runtime;

-- Tables and sequences the migrator creates later are usable by the runtime role (a
-- migration takes UPDATE, DELETE and TRUNCATE on the audit table back from it).
ALTER DEFAULT PRIVILEGES FOR ROLE release_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO release_runtime;
ALTER DEFAULT PRIVILEGES FOR ROLE release_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO release_runtime;

-- Tables that exist already (the schema was migrated before these roles existed): hand
-- them to the migrator and grant the runtime role the same as above.
DO $$
DECLARE
    t TEXT;
BEGIN
    FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
        EXECUTE format('ALTER TABLE public.%I OWNER TO release_migrator', t);
        IF t = 'audit_records' THEN
            EXECUTE format('GRANT SELECT, INSERT ON public.%I TO release_runtime', t);
            EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON public.%I FROM release_runtime', t);
        ELSE
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON public.%I TO release_runtime', t);
        END IF;
    END LOOP;
END $$;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO release_runtime;
