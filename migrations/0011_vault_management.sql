-- keepd schema v11: vaults a client can list, delete and re-key.
--
-- Each vault row keeps the bytes its entries hold (the push that stores
-- them adds them), so listing vaults reads one row per vault; its entry
-- count is its last sequence (entries are only ever removed with their
-- vault). A vault key record has a version: a re-wrapped key (the same key
-- under a new password) replaces the version the client read and no other.
-- key_check is an optional value the client derives from the vault key
-- (it reveals nothing of the key); a push that carries another one is
-- refused, so a device holding the wrong key cannot store entries no
-- other device can read.
ALTER TABLE keepd.vaults ADD COLUMN bytes bigint NOT NULL DEFAULT 0;
ALTER TABLE keepd.vault_keys
    ADD COLUMN version integer NOT NULL DEFAULT 1 CHECK (version > 0),
    ADD COLUMN updated_at timestamptz,
    ADD COLUMN key_check text CHECK (length(key_check) BETWEEN 1 AND 200);

-- Existing vaults' bytes, counted once: the owner applying this sees
-- every row only under these two policies, dropped again at once.
CREATE POLICY vaults_backfill ON keepd.vaults TO keepd_owner USING (true) WITH CHECK (true);
CREATE POLICY sync_logs_backfill ON keepd.sync_logs TO keepd_owner USING (true);
UPDATE keepd.vaults v SET bytes = s.bytes
  FROM (SELECT vault, sum(size_bytes) AS bytes FROM keepd.sync_logs GROUP BY vault) s
 WHERE s.vault = v.id;
DROP POLICY vaults_backfill ON keepd.vaults;
DROP POLICY sync_logs_backfill ON keepd.sync_logs;
