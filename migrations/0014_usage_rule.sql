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
