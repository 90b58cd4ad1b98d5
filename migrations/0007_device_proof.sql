-- keepd schema v7: a device key belongs to one account and proves itself.
--
-- A device registered from v7 on signed a registration message naming the
-- account and the key (proven_at is set); one public key can be proven on
-- one device row only, across all accounts, so nobody can register
-- another's key and pass that device's backups off as their own. Devices
-- from before v7 keep working, unproven (the index leaves them out: two
-- accounts may already share a key, and erasing either is not keepd's to
-- decide).
ALTER TABLE keepd.devices ADD COLUMN proven_at timestamptz;
CREATE UNIQUE INDEX devices_proven_key_idx ON keepd.devices (public_key)
    WHERE proven_at IS NOT NULL;

-- How a backup's signature was made: 1 = over the ciphertext alone (the
-- legacy scheme of clients before v7), 2 = over keepd's domain-separated
-- message binding device, classification, nonce, tag and ciphertext hash.
ALTER TABLE keepd.backups ADD COLUMN signature_version smallint NOT NULL DEFAULT 1
    CHECK (signature_version IN (1, 2));
-- SHA-256 of the backup as sent (ciphertext, nonce, tag): the same backup
-- twice in one account is refused. Rows from before v7 have none (their
-- content may be sealed at rest; nothing to compare).
ALTER TABLE keepd.backups ADD COLUMN content_hash bytea;
CREATE UNIQUE INDEX backups_content_idx ON keepd.backups (user_id, content_hash)
    WHERE content_hash IS NOT NULL;
