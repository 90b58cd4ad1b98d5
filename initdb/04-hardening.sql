-- Rendered by keepd. Run by keepd as keepd_superuser in database keepd at every start;
-- every statement is idempotent so a restart reconciles drift.
REVOKE ALL ON DATABASE keepd FROM PUBLIC;
REVOKE ALL ON DATABASE postgres FROM PUBLIC;
REVOKE ALL ON DATABASE template1 FROM PUBLIC;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
-- keepd's database metrics read pg_stat_statements (in public) as pg_monitor.
GRANT USAGE ON SCHEMA public TO pg_monitor;
REVOKE ALL ON SCHEMA keepd FROM PUBLIC;
REVOKE ALL ON SCHEMA keepd_audit FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE keepd_owner REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE keepd_owner REVOKE ALL ON TABLES FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE keepd_owner REVOKE ALL ON SEQUENCES FROM PUBLIC;
