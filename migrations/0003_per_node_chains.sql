-- keepd schema v3: one audit chain per node. Several keepd nodes may share
-- an external cluster; each chains (with an HMAC keyed by its own
-- identity) and checkpoints the entries it wrote, so each node can verify
-- its own chain and none can forge another's.

ALTER TABLE keepd_audit.audit_chain ADD COLUMN node_id text;

-- Existing links belong to the node that wrote their entries. The
-- append-only trigger is lifted for this one statement, inside the
-- migration's transaction, and restored before it commits.
ALTER TABLE keepd_audit.audit_chain DISABLE TRIGGER audit_chain_append_only;
UPDATE keepd_audit.audit_chain c
   SET node_id = coalesce(
       (SELECT e.node_id FROM keepd_audit.audit_log e WHERE e.id = c.entry_id),
       (SELECT min(e.node_id) FROM keepd_audit.audit_log e));
ALTER TABLE keepd_audit.audit_chain ENABLE TRIGGER audit_chain_append_only;

ALTER TABLE keepd_audit.audit_chain ALTER COLUMN node_id SET NOT NULL;
ALTER TABLE keepd_audit.audit_chain DROP CONSTRAINT audit_chain_pkey;
ALTER TABLE keepd_audit.audit_chain ADD PRIMARY KEY (node_id, seq);
CREATE INDEX audit_log_node_idx ON keepd_audit.audit_log (node_id, id);
