-- Rendered by keepd. Run by keepd as keepd_superuser in database keepd at every start;
-- every statement is idempotent so a restart reconciles drift.
-- The audit trail has a schema of its own so its privileges are granted apart
-- from the data's: only keepd_audit writes there, and nobody updates or deletes.
CREATE SCHEMA IF NOT EXISTS keepd_audit AUTHORIZATION keepd_owner;
ALTER SCHEMA keepd_audit OWNER TO keepd_owner;
