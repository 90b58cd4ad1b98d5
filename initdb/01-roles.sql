-- Rendered by keepd. Run by keepd as keepd_superuser in database keepd at every start;
-- every statement is idempotent so a restart reconciles drift.
-- Group roles own nothing and cannot log in; login roles are created by keepd
-- at run time from sealed credentials, so no password is ever in a file.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keepd_owner') THEN
    CREATE ROLE keepd_owner NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keepd_auditor') THEN
    CREATE ROLE keepd_auditor NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keepd_sync') THEN
    CREATE ROLE keepd_sync NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keepd_query') THEN
    CREATE ROLE keepd_query NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keepd_auth') THEN
    CREATE ROLE keepd_auth NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keepd_audit') THEN
    CREATE ROLE keepd_audit NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keepd_readonly') THEN
    CREATE ROLE keepd_readonly NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keepd_operator') THEN
    CREATE ROLE keepd_operator NOLOGIN;
  END IF;
END
$$;
ALTER ROLE keepd_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_auditor NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_sync NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_query NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_auth NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_audit NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_readonly NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_operator NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER DATABASE keepd OWNER TO keepd_owner;
-- keepd's superuser: a stated connection limit (Postgres does not hold superusers
-- to it; pg_hba keeps them to the socket or the provider's private channel), and
-- pgAudit logs every statement of its sessions but keepd's own, which ask for the
-- common classes at connect (a setting only a superuser may pass).
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keepd_superuser') THEN
    ALTER ROLE keepd_superuser CONNECTION LIMIT 10;
    ALTER ROLE keepd_superuser SET pgaudit.log = 'all';
  END IF;
END
$$;
