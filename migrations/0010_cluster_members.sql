-- keepd schema v10: the nodes of a cluster and the cluster key sealed to
-- each (x25519 envelope to the node's identity). A row without a sealed
-- key is a node waiting for an operator's `keepd cluster admit`. Only the
-- owner (the superuser's bootstrap sessions) reads or writes it: no group
-- role has any privilege, so no request can reach it.
CREATE TABLE keepd.cluster_members (
    node_id      text PRIMARY KEY CHECK (node_id ~ '^[0-9a-f]{16}$'),
    public_key   bytea NOT NULL UNIQUE CHECK (length(public_key) = 32),
    sealed_key   bytea,
    requested_at timestamptz NOT NULL DEFAULT now(),
    admitted_at  timestamptz,
    admitted_by  text,
    CHECK ((sealed_key IS NULL) = (admitted_at IS NULL))
);
ALTER TABLE keepd.cluster_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.cluster_members FORCE ROW LEVEL SECURITY;
CREATE POLICY cluster_members_owner ON keepd.cluster_members TO keepd_owner
    USING (true) WITH CHECK (true);
