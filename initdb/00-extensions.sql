-- Rendered by keepd. Run by keepd as keepd_superuser in database keepd at every start;
-- every statement is idempotent so a restart reconciles drift.
-- Query statistics for operators; utility statements are not tracked.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
