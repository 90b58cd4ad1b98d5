-- keepd schema v14: what account_usage counts, one rule per figure.
--
-- Devices: every device row counts, revoked ones too, until the janitor
-- deletes them (api.quotas.revoked_device_retention after revocation;
-- never while a stored backup names the device). Counting only live
-- devices let a client register and revoke without end, each revoked row
-- kept forever outside any quota.
CREATE OR REPLACE FUNCTION keepd.count_devices() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE keepd.account_usage u SET devices = u.devices + d.n
          FROM (SELECT user_id, count(*) AS n FROM added GROUP BY user_id) d
         WHERE u.user_id = d.user_id;
    ELSE
        UPDATE keepd.account_usage u SET devices = u.devices - d.n
          FROM (SELECT user_id, count(*) AS n FROM removed GROUP BY user_id) d
         WHERE u.user_id = d.user_id;
    END IF;
    RETURN NULL;
END
$$;
-- A revocation no longer changes the count.
DROP TRIGGER devices_usage_update ON keepd.devices;

-- What existing accounts already hold, counted again under the rule above.
-- Row-level security is lifted for the owner for these statements only
-- (the migration runs alone, in one transaction, under the migration lock)
-- and forced again at once; the owner sees every usage row already.
ALTER TABLE keepd.devices NO FORCE ROW LEVEL SECURITY;
UPDATE keepd.account_usage u
   SET devices = (SELECT count(*) FROM keepd.devices d WHERE d.user_id = u.user_id);
ALTER TABLE keepd.devices FORCE ROW LEVEL SECURITY;

-- Storage: one rule for log entries and backups, the bytes the client sent,
-- decoded. An entry counts its encryptedData and nonce as their base64
-- decodes (it counted the base64 text before) and its haexTimestamp's
-- UTF-8 bytes; a backup its ciphertext, nonce and tag (it counted the
-- ciphertext alone, so a large nonce or tag was stored outside the quota).
-- The triggers of v6 add and subtract size_bytes as before; the rows
-- stored so far are measured again here, from their stored form: a value
-- sealed at rest (text `kf1:<version>:<base64>`, bytea `KF1` + a 4-byte
-- version) holds a 12-byte nonce and a 16-byte tag around what the client
-- sent. Where that was base64 text sealed at rest its padding cannot be
-- seen, so such a field counts up to 2 bytes high. These helpers live
-- for this migration only.
CREATE FUNCTION keepd.v14_text_length(stored text) RETURNS bigint
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog AS $$
    SELECT greatest(0, CASE WHEN stored LIKE 'kf1:%' THEN
        octet_length(split_part(stored, ':', 3)) / 4 * 3
          - least(2, octet_length(split_part(stored, ':', 3))
                     - octet_length(rtrim(split_part(stored, ':', 3), '=')))
          - 28
      ELSE octet_length(stored) END)
$$;
CREATE FUNCTION keepd.v14_base64_length(stored text) RETURNS bigint
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog AS $$
    SELECT greatest(0, CASE WHEN stored LIKE 'kf1:%' THEN keepd.v14_text_length(stored) / 4 * 3
      ELSE octet_length(stored) / 4 * 3
             - least(2, octet_length(stored) - octet_length(rtrim(stored, '='))) END)
$$;
CREATE FUNCTION keepd.v14_bytes_length(stored bytea) RETURNS bigint
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog AS $$
    SELECT CASE WHEN substring(stored FROM 1 FOR 3) = '\x4b4631'::bytea
                     AND octet_length(stored) >= 35
      THEN octet_length(stored) - 35 ELSE octet_length(stored) END
$$;

ALTER TABLE keepd.sync_logs NO FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.backups NO FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.vaults NO FORCE ROW LEVEL SECURITY;
UPDATE keepd.sync_logs
   SET size_bytes = keepd.v14_base64_length(encrypted_data) + keepd.v14_base64_length(nonce)
                    + keepd.v14_text_length(haex_timestamp);
UPDATE keepd.backups
   SET size_bytes = keepd.v14_bytes_length(ciphertext) + keepd.v14_bytes_length(nonce)
                    + keepd.v14_bytes_length(auth_tag);
UPDATE keepd.vaults v
   SET bytes = coalesce((SELECT sum(l.size_bytes) FROM keepd.sync_logs l WHERE l.vault = v.id), 0);
UPDATE keepd.account_usage u
   SET storage_bytes =
         coalesce((SELECT sum(l.size_bytes) FROM keepd.sync_logs l WHERE l.user_id = u.user_id), 0)
       + coalesce((SELECT sum(b.size_bytes) FROM keepd.backups b WHERE b.user_id = u.user_id), 0);
ALTER TABLE keepd.sync_logs FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.backups FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.vaults FORCE ROW LEVEL SECURITY;
DROP FUNCTION keepd.v14_base64_length(text);
DROP FUNCTION keepd.v14_text_length(text);
DROP FUNCTION keepd.v14_bytes_length(bytea);
