-- keepd schema v8: single-use invite codes for api.registration: invite.
-- Only the SHA-256 of a code is kept. Invites belong to no account: the
-- policy shows them all to the roles the matrix lets read them (keepd_auth
-- consumes one at registration; `keepd account invite` creates them as
-- the superuser).
CREATE TABLE keepd.invites (
    code_hash  bytea PRIMARY KEY CHECK (length(code_hash) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    used_by    uuid REFERENCES keepd.users (id) ON DELETE SET NULL
);
ALTER TABLE keepd.invites ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.invites FORCE ROW LEVEL SECURITY;
CREATE POLICY invites_any ON keepd.invites USING (true) WITH CHECK (true);
