-- keepd schema v22: join tokens (`keepd cluster token create`), so a new
-- node is admitted by the members without an operator at it. A token is
-- stored as its id and the public half of a key derived from its secret
-- (a one-way value: it checks a claim and makes none), with its lifetime,
-- its uses left and its revocation. A node waiting with a token records
-- the token's id and its claim (a signature naming the node and its key)
-- on its row of cluster_members. Only the owner (the superuser's
-- sessions) reads or writes them.
CREATE TABLE keepd.cluster_join_tokens (
    id         text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{16}$'),
    verifier   bytea NOT NULL CHECK (length(verifier) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL CHECK (created_by ~ '^[0-9a-f]{16}$'),
    expires_at timestamptz NOT NULL,
    uses_left  integer NOT NULL CHECK (uses_left >= 0),
    revoked_at timestamptz
);
ALTER TABLE keepd.cluster_join_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.cluster_join_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY cluster_join_tokens_owner ON keepd.cluster_join_tokens TO keepd_owner
    USING (true) WITH CHECK (true);
ALTER TABLE keepd.cluster_members
    ADD COLUMN join_token text,
    ADD COLUMN join_claim bytea;
