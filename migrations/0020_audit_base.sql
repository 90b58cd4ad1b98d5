-- keepd schema v20: where each node's audit chain starts once its oldest
-- entries were exported and pruned (`audit.retention`). The base names
-- the last pruned link; the node signs it with its identity key, so an
-- attacker who deletes more of the chain cannot move it along. Only the
-- superuser's sessions (the retention task, `keepd audit verify`) read or
-- write it.
CREATE TABLE keepd_audit.audit_base (
    node_id   text PRIMARY KEY,
    seq       bigint NOT NULL CHECK (seq > 0),
    hash      bytea NOT NULL CHECK (length(hash) = 32),
    signed_at bigint NOT NULL,
    signature text NOT NULL
);
