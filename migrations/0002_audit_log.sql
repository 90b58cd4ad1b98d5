-- keepd schema v2: the append-only, hash-chained audit trail.
--
-- Transactions append entries to audit_log in the same transaction as the
-- change they record. One sealer (keepd, under an advisory lock) chains
-- committed entries by appending to audit_chain: seq, the entry, the
-- previous hash and the new hash. Neither table accepts UPDATE, DELETE or
-- TRUNCATE, from anyone: the triggers fire for keepd_owner too.

CREATE TABLE keepd_audit.audit_log (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recorded_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    node_id          text NOT NULL,
    operation_id     uuid NOT NULL,
    role_used        text NOT NULL,
    action           text NOT NULL,
    table_name       text NOT NULL,
    rows_affected    bigint NOT NULL,
    duration_us      bigint NOT NULL,
    source_component text NOT NULL,
    -- Identifiers only as keyed HMACs; never an email, address or token.
    metadata         jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE keepd_audit.audit_chain (
    seq       bigint PRIMARY KEY CHECK (seq > 0),
    entry_id  bigint NOT NULL UNIQUE REFERENCES keepd_audit.audit_log (id),
    prev_hash bytea NOT NULL CHECK (length(prev_hash) = 32),
    hash      bytea NOT NULL CHECK (length(hash) = 32),
    sealed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION keepd_audit.refuse_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON keepd_audit.audit_log
    FOR EACH ROW EXECUTE FUNCTION keepd_audit.refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON keepd_audit.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION keepd_audit.refuse_change();
CREATE TRIGGER audit_chain_append_only BEFORE UPDATE OR DELETE ON keepd_audit.audit_chain
    FOR EACH ROW EXECUTE FUNCTION keepd_audit.refuse_change();
CREATE TRIGGER audit_chain_no_truncate BEFORE TRUNCATE ON keepd_audit.audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION keepd_audit.refuse_change();
