-- keepd schema v13: live-update streams end with their session, on every
-- node. A session that ends (revoked by logout, a password change or a
-- disable; deleted with its account, or by the janitor once dead) notifies
-- channel keepd_sessions with `id:reason`; every node LISTENs and ends the
-- streams that session holds. The reason is what the ending statement set
-- in `keepd.session_end` for its transaction.
CREATE FUNCTION keepd.session_ended() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    PERFORM pg_notify('keepd_sessions', OLD.id::text || ':' ||
        coalesce(nullif(current_setting('keepd.session_end', true), ''), 'session_ended'));
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION keepd.session_ended() FROM PUBLIC;
CREATE TRIGGER sessions_deleted_end_streams AFTER DELETE ON keepd.sessions
    FOR EACH ROW EXECUTE FUNCTION keepd.session_ended();
CREATE TRIGGER sessions_revoked_end_streams AFTER UPDATE OF revoked_at ON keepd.sessions
    FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
    EXECUTE FUNCTION keepd.session_ended();

-- Each admitted node says it is alive every few seconds, so the nodes can
-- share per-account rate budgets by the number of live ones. A table of
-- its own, apart from the sealed keys in keepd.cluster_members (whose every
-- access pgAudit logs), and only the superuser's heartbeat touches it.
CREATE TABLE keepd.cluster_liveness (
    node_id text PRIMARY KEY CHECK (node_id ~ '^[0-9a-f]{16}$'),
    seen_at timestamptz NOT NULL
);
ALTER TABLE keepd.cluster_liveness ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.cluster_liveness FORCE ROW LEVEL SECURITY;
CREATE POLICY cluster_liveness_owner ON keepd.cluster_liveness TO keepd_owner
    USING (true) WITH CHECK (true);
