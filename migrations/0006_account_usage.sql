-- keepd schema v6: what each account stores, counted by the database as
-- rows are written and removed, so the count is exact whatever writes
-- (the API, a cascade from an erased vault or account). The API compares
-- it with api.quotas in the writing transaction: the trigger's UPDATE
-- locks the account's usage row until commit, so concurrent writes of one
-- account are counted one after the other and none slips past a quota.
CREATE TABLE keepd.account_usage (
    user_id       uuid PRIMARY KEY REFERENCES keepd.users (id) ON DELETE CASCADE,
    -- Bytes of log entries and backups as the client sent them. No CHECK: an
    -- erasure must never fail on a count.
    storage_bytes bigint NOT NULL DEFAULT 0,
    vaults        integer NOT NULL DEFAULT 0,
    -- Devices not revoked.
    devices       integer NOT NULL DEFAULT 0,
    backups       integer NOT NULL DEFAULT 0
);
ALTER TABLE keepd.account_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.account_usage FORCE ROW LEVEL SECURITY;
CREATE POLICY account_usage_tenant ON keepd.account_usage
    USING (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid);
-- The counting triggers run as the owner (below) and must count any
-- account a statement touched, also when no tenant is set (an operator
-- erasing a vault as the superuser): the owner sees every usage row. No
-- group role is the owner, so tenants stay isolated.
CREATE POLICY account_usage_counting ON keepd.account_usage TO keepd_owner
    USING (true) WITH CHECK (true);

-- A log entry's size as the client sent it (encryptedData, nonce and
-- timestamp), before any sealing at rest.
ALTER TABLE keepd.sync_logs ADD COLUMN size_bytes bigint NOT NULL DEFAULT 0;

-- The triggers count per statement (transition tables): a batch of 1000
-- entries is one UPDATE of the usage row, not 1000. Postgres allows a
-- transition table on one event per trigger, hence a trigger per event.
-- Cascaded deletes (an erased vault or account) fire them too, as the
-- role that erased, so the functions run as their owner (SECURITY
-- DEFINER, a fixed search_path, names qualified): only they write usage,
-- no group role needs to, and row-level security still holds them to the
-- tenant of the transaction.

CREATE FUNCTION keepd.count_new_account() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO keepd.account_usage (user_id) SELECT id FROM added;
    RETURN NULL;
END
$$;
CREATE TRIGGER users_usage AFTER INSERT ON keepd.users
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION keepd.count_new_account();

CREATE FUNCTION keepd.count_log_bytes() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE keepd.account_usage u SET storage_bytes = u.storage_bytes + d.bytes
          FROM (SELECT user_id, sum(size_bytes) AS bytes FROM added GROUP BY user_id) d
         WHERE u.user_id = d.user_id;
    ELSE
        UPDATE keepd.account_usage u SET storage_bytes = u.storage_bytes - d.bytes
          FROM (SELECT user_id, sum(size_bytes) AS bytes FROM removed GROUP BY user_id) d
         WHERE u.user_id = d.user_id;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER sync_logs_usage_insert AFTER INSERT ON keepd.sync_logs
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION keepd.count_log_bytes();
CREATE TRIGGER sync_logs_usage_delete AFTER DELETE ON keepd.sync_logs
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION keepd.count_log_bytes();

CREATE FUNCTION keepd.count_vaults() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE keepd.account_usage u SET vaults = u.vaults + d.n
          FROM (SELECT user_id, count(*) AS n FROM added GROUP BY user_id) d
         WHERE u.user_id = d.user_id;
    ELSE
        UPDATE keepd.account_usage u SET vaults = u.vaults - d.n
          FROM (SELECT user_id, count(*) AS n FROM removed GROUP BY user_id) d
         WHERE u.user_id = d.user_id;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER vaults_usage_insert AFTER INSERT ON keepd.vaults
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION keepd.count_vaults();
CREATE TRIGGER vaults_usage_delete AFTER DELETE ON keepd.vaults
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION keepd.count_vaults();

-- Devices count while not revoked.
CREATE FUNCTION keepd.count_devices() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE keepd.account_usage u SET devices = u.devices + d.n
          FROM (SELECT user_id, count(*) AS n FROM added WHERE revoked_at IS NULL
                GROUP BY user_id) d
         WHERE u.user_id = d.user_id;
    ELSIF TG_OP = 'UPDATE' THEN
        UPDATE keepd.account_usage u SET devices = u.devices - d.n
          FROM (SELECT a.user_id, count(*) AS n FROM old_rows b JOIN new_rows a ON a.id = b.id
                WHERE b.revoked_at IS NULL AND a.revoked_at IS NOT NULL GROUP BY a.user_id) d
         WHERE u.user_id = d.user_id;
    ELSE
        UPDATE keepd.account_usage u SET devices = u.devices - d.n
          FROM (SELECT user_id, count(*) AS n FROM removed WHERE revoked_at IS NULL
                GROUP BY user_id) d
         WHERE u.user_id = d.user_id;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER devices_usage_insert AFTER INSERT ON keepd.devices
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION keepd.count_devices();
CREATE TRIGGER devices_usage_update AFTER UPDATE ON keepd.devices
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION keepd.count_devices();
CREATE TRIGGER devices_usage_delete AFTER DELETE ON keepd.devices
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION keepd.count_devices();

CREATE FUNCTION keepd.count_backups() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE keepd.account_usage u
           SET backups = u.backups + d.n, storage_bytes = u.storage_bytes + d.bytes
          FROM (SELECT user_id, count(*) AS n, sum(size_bytes) AS bytes FROM added
                GROUP BY user_id) d
         WHERE u.user_id = d.user_id;
    ELSE
        UPDATE keepd.account_usage u
           SET backups = u.backups - d.n, storage_bytes = u.storage_bytes - d.bytes
          FROM (SELECT user_id, count(*) AS n, sum(size_bytes) AS bytes FROM removed
                GROUP BY user_id) d
         WHERE u.user_id = d.user_id;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER backups_usage_insert AFTER INSERT ON keepd.backups
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION keepd.count_backups();
CREATE TRIGGER backups_usage_delete AFTER DELETE ON keepd.backups
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION keepd.count_backups();

-- What existing accounts already hold. Row-level security is lifted for
-- the owner for these statements only (the migration runs alone, in one
-- transaction, under the migration lock) and forced again at once.
ALTER TABLE keepd.users NO FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.sync_logs NO FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.vaults NO FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.devices NO FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.backups NO FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.account_usage NO FORCE ROW LEVEL SECURITY;
-- Rows from before v6: their stored size (the sealed form, when sealed at
-- rest, is slightly longer than what the client sent).
UPDATE keepd.sync_logs
   SET size_bytes = octet_length(encrypted_data) + octet_length(nonce) + octet_length(haex_timestamp);
INSERT INTO keepd.account_usage (user_id, storage_bytes, vaults, devices, backups)
SELECT u.id,
       coalesce((SELECT sum(size_bytes) FROM keepd.sync_logs l WHERE l.user_id = u.id), 0)
         + coalesce((SELECT sum(size_bytes) FROM keepd.backups b WHERE b.user_id = u.id), 0),
       (SELECT count(*) FROM keepd.vaults v WHERE v.user_id = u.id),
       (SELECT count(*) FROM keepd.devices d WHERE d.user_id = u.id AND d.revoked_at IS NULL),
       (SELECT count(*) FROM keepd.backups b WHERE b.user_id = u.id)
FROM keepd.users u;
ALTER TABLE keepd.users FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.sync_logs FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.vaults FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.devices FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.backups FORCE ROW LEVEL SECURITY;
ALTER TABLE keepd.account_usage FORCE ROW LEVEL SECURITY;

-- Trigger functions only: nobody calls them.
REVOKE ALL ON FUNCTION keepd.count_new_account(), keepd.count_log_bytes(), keepd.count_vaults(),
    keepd.count_devices(), keepd.count_backups() FROM PUBLIC;
