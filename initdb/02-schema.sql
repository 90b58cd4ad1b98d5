-- Rendered by keepd. Run by keepd as keepd_superuser in database keepd at every start;
-- every statement is idempotent so a restart reconciles drift.
-- keepd's objects live in one schema owned by keepd_owner; the tables themselves
-- come from versioned migrations applied as keepd_owner.
CREATE SCHEMA IF NOT EXISTS keepd AUTHORIZATION keepd_owner;
ALTER SCHEMA keepd OWNER TO keepd_owner;
ALTER DATABASE keepd SET search_path = keepd;
