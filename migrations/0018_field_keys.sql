-- keepd schema v18: the field keys' versions, shared by every node of a
-- cluster. A version's key is derived from the cluster key, never stored;
-- this table says which versions exist, which one seals (the highest),
-- how many values each sealed (counted by every node) and when one no
-- value uses any more was retired. Only the superuser's background task
-- reads and writes it.
CREATE TABLE keepd.field_keys (
    version    integer PRIMARY KEY CHECK (version >= 1),
    created_at timestamptz NOT NULL DEFAULT now(),
    uses       bigint NOT NULL DEFAULT 0 CHECK (uses >= 0),
    -- Why it was made: 'configured' (key_version), 'age', 'uses', or 'root'
    -- (the cluster key rotated: a version of the new root).
    reason     text NOT NULL CHECK (reason IN ('configured', 'age', 'uses', 'root')),
    retired_at timestamptz
);
ALTER TABLE keepd.field_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.field_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY field_keys_owner ON keepd.field_keys TO keepd_owner
    USING (true) WITH CHECK (true);
