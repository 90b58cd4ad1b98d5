-- Rendered by keepd. Run by keepd as keepd_superuser in database keepd at every start;
-- every statement is idempotent so a restart reconciles drift.
-- Query statistics for operators; utility statements are not tracked.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
-- pgAudit's event triggers, where the server preloads it.
DO $$
BEGIN
  IF current_setting('shared_preload_libraries') ~ '(^|,)\s*pgaudit\s*(,|$)' THEN
    CREATE EXTENSION IF NOT EXISTS pgaudit;
  END IF;
END
$$;
