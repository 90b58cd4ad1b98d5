-- keepd schema v19: the cluster key's generations and the nodes removed,
-- so tokens of a replaced root are accepted only until they expire and
-- the report can say while a removed node's root is still the current
-- one. Only the owner (the superuser's sessions) reads or writes them.
CREATE TABLE keepd.cluster_key_log (
    generation  integer PRIMARY KEY CHECK (generation >= 2),
    fingerprint text NOT NULL CHECK (fingerprint ~ '^[0-9a-f]{32}$'),
    rotated_at  timestamptz NOT NULL DEFAULT now(),
    rotated_by  text NOT NULL CHECK (rotated_by ~ '^[0-9a-f]{16}$'),
    members     integer NOT NULL CHECK (members >= 1)
);
CREATE TABLE keepd.cluster_removals (
    node_id    text NOT NULL CHECK (node_id ~ '^[0-9a-f]{16}$'),
    removed_at timestamptz NOT NULL DEFAULT now(),
    removed_by text NOT NULL CHECK (removed_by ~ '^[0-9a-f]{16}$'),
    PRIMARY KEY (node_id, removed_at)
);
ALTER TABLE keepd.cluster_key_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.cluster_key_log FORCE ROW LEVEL SECURITY;
CREATE POLICY cluster_key_log_owner ON keepd.cluster_key_log TO keepd_owner
    USING (true) WITH CHECK (true);
ALTER TABLE keepd.cluster_removals ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.cluster_removals FORCE ROW LEVEL SECURITY;
CREATE POLICY cluster_removals_owner ON keepd.cluster_removals TO keepd_owner
    USING (true) WITH CHECK (true);
-- Each node's heartbeat says which generation of the root it holds: a new
-- root issues tokens and seals fields only once every live node holds it.
ALTER TABLE keepd.cluster_liveness ADD COLUMN key_generation integer NOT NULL DEFAULT 1;
-- Field key versions belong to a root generation: a node seals under a
-- version only once it holds that root.
ALTER TABLE keepd.field_keys ADD COLUMN generation integer NOT NULL DEFAULT 1;
