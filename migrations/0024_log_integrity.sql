-- keepd schema v24: a log entry's vault is checked once per statement,
-- not twice per row.
--
-- keepd.sync_logs had two foreign keys (vault, user_id). Postgres checks a
-- foreign key per inserted row, with a query and a row lock on the
-- referenced row; a push of 50 entries made 100 of them, the vault's row
-- being one the push itself had just updated. Measured with pgbench on
-- keepd's own cluster (8 clients, the append of 50 entries): 272 pushes/s
-- with both keys, 381 without the user's, 594 with the statement-level
-- check below, against 505 to 546 for the job's minimal SQL there.
--
-- The check below holds what the two keys held, and a little more: every
-- entry a statement writes names a vault of the account it names (a
-- composite rule the two keys did not state). As a foreign key does, it
-- locks each named vault FOR KEY SHARE (once per vault), so a vault's
-- erasure waits for a transaction writing to it. Erasing a vault removes
-- its entries (a statement-level trigger on keepd.vaults, in place of ON
-- DELETE CASCADE); erasing an account erases its vaults, and so their
-- entries, through keepd.vaults's own foreign key. Under READ COMMITTED,
-- as keepd's sessions run, an erasure that waited for a writer sees the
-- writer's entries and removes them.
ALTER TABLE keepd.sync_logs DROP CONSTRAINT sync_logs_vault_fkey;
ALTER TABLE keepd.sync_logs DROP CONSTRAINT sync_logs_user_id_fkey;

-- The functions run as the owner and must see every row they check or
-- remove, whatever tenant the statement has (an operator's erasure as the
-- superuser has none). No group role is the owner: tenants stay isolated.
CREATE POLICY vaults_integrity ON keepd.vaults TO keepd_owner USING (true);
-- (A DELETE with a condition needs the SELECT policy as well.)
CREATE POLICY sync_logs_integrity_read ON keepd.sync_logs FOR SELECT TO keepd_owner USING (true);
CREATE POLICY sync_logs_integrity ON keepd.sync_logs FOR DELETE TO keepd_owner USING (true);

CREATE FUNCTION keepd.check_log_vaults() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM 1 FROM keepd.vaults v WHERE v.id IN (SELECT vault FROM written) FOR KEY SHARE;
    IF EXISTS (SELECT 1 FROM written w WHERE NOT EXISTS (
                 SELECT 1 FROM keepd.vaults v WHERE v.id = w.vault AND v.user_id = w.user_id)) THEN
        RAISE EXCEPTION 'a log entry names a vault its account does not have'
            USING ERRCODE = 'foreign_key_violation', TABLE = 'sync_logs';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER sync_logs_vault_insert AFTER INSERT ON keepd.sync_logs
    REFERENCING NEW TABLE AS written FOR EACH STATEMENT EXECUTE FUNCTION keepd.check_log_vaults();
CREATE TRIGGER sync_logs_vault_update AFTER UPDATE ON keepd.sync_logs
    REFERENCING NEW TABLE AS written FOR EACH STATEMENT EXECUTE FUNCTION keepd.check_log_vaults();

CREATE FUNCTION keepd.remove_vault_logs() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM keepd.sync_logs l USING removed r WHERE l.vault = r.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER vaults_remove_logs AFTER DELETE ON keepd.vaults
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION keepd.remove_vault_logs();

REVOKE ALL ON FUNCTION keepd.check_log_vaults(), keepd.remove_vault_logs() FROM PUBLIC;
