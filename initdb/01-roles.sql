-- Rendered by keepd. Run by keepd as keepd_superuser in database keepd at every start;
-- every statement is idempotent so a restart reconciles drift.
-- Group roles own nothing and cannot log in; login roles are created by keepd
-- at run time from sealed credentials, so no password is ever in a file.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keepd_owner') THEN
    CREATE ROLE keepd_owner NOLOGIN;
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
END
$$;
ALTER ROLE keepd_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_sync NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_query NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_auth NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_audit NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER ROLE keepd_readonly NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 0;
ALTER DATABASE keepd OWNER TO keepd_owner;
