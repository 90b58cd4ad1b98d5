-- keepd schema v26: a page of entries is read without adding up their
-- sizes when it cannot pass the pull's byte budget anyway.
--
-- keepd.vaults.largest_entry is at least the stored size of every entry
-- of the vault (its three text columns, as octet_length counts them,
-- sealed or not), kept by the statement-level check every insert or update
-- of keepd.sync_logs runs, however the entries were written. So `limit`
-- times it bounds any page of the vault: when that is within the budget,
-- the page query skips the running sum, which cost a pull about a third of
-- its time in Postgres (pgbench on keepd's cluster, pages of 100: 4 100
-- tps with the sum, 5 700 without).
ALTER TABLE keepd.vaults
    ADD COLUMN largest_entry bigint NOT NULL DEFAULT 0 CHECK (largest_entry >= 0);

ALTER TABLE keepd.vaults NO FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.sync_logs NO FORCE ROW LEVEL SECURITY;
UPDATE keepd.vaults v
   SET largest_entry = m.largest
  FROM (SELECT vault,
               max(octet_length(encrypted_data) + octet_length(nonce)
                   + octet_length(haex_timestamp)) AS largest
          FROM keepd.sync_logs GROUP BY vault) m
 WHERE m.vault = v.id;
ALTER TABLE keepd.vaults FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.sync_logs FORCE ROW LEVEL SECURITY;

-- The entry check of v24, now with one probe per distinct (vault,
-- account) of the statement, a push's one, instead of one per entry (v24
-- probed the vaults' key 50 times for a push of 50); and the written
-- vaults' largest entry raised where a statement wrote a larger one (a
-- push of entries no larger than before updates nothing; never lowered,
-- so the bound stays one).
CREATE OR REPLACE FUNCTION keepd.check_log_vaults() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM (SELECT DISTINCT vault, user_id FROM written) w
                 LEFT JOIN LATERAL (SELECT v.user_id FROM keepd.vaults v
                                     WHERE v.id = w.vault FOR KEY SHARE) v ON true
                WHERE v.user_id IS DISTINCT FROM w.user_id) THEN
        RAISE EXCEPTION 'a log entry names a vault its account does not have'
            USING ERRCODE = 'foreign_key_violation', TABLE = 'sync_logs';
    END IF;
    UPDATE keepd.vaults v
       SET largest_entry = w.largest
      FROM (SELECT vault,
                   max(octet_length(encrypted_data) + octet_length(nonce)
                       + octet_length(haex_timestamp)) AS largest
              FROM written GROUP BY vault) w
     WHERE v.id = w.vault AND v.largest_entry < w.largest;
    RETURN NULL;
END
$$;
