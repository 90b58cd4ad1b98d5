-- keepd schema v21: a push counts its bytes last, in the round trip that
-- commits it. The usage row's lock serialises one account's writes until
-- commit; taken by the insert trigger, it was held across the rest of the
-- push (idempotency record, audit entry, round trips to keepd and back),
-- so one account's pushes ran one after another. A push now marks its
-- insert as counted later (the transaction-local setting keepd.usage =
-- 'deferred') and calls keepd.add_pushed_bytes just before COMMIT, in the
-- same round trip: the row is locked from there to the end of the
-- commit, and the quota is still checked against a count that includes
-- every committed write of the account. Any other insert is counted by
-- the trigger as before.
CREATE OR REPLACE FUNCTION keepd.count_log_bytes() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF current_setting('keepd.usage', true) = 'deferred' THEN
            RETURN NULL;
        END IF;
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

-- Adds a push's bytes to the transaction's tenant (never another
-- account's: the tenant comes from the transaction, not the caller) and
-- refuses, aborting the transaction, past the storage quota (0: none):
-- SQLSTATE KQ001, the bytes the account would reach in DETAIL.
CREATE FUNCTION keepd.add_pushed_bytes(bytes bigint, quota bigint) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    reached bigint;
BEGIN
    IF bytes < 0 THEN
        RAISE EXCEPTION 'a push adds bytes, never removes them' USING ERRCODE = 'check_violation';
    END IF;
    UPDATE keepd.account_usage SET storage_bytes = storage_bytes + bytes
     WHERE user_id = nullif(current_setting('keepd.user_id', true), '')::uuid
    RETURNING storage_bytes INTO reached;
    IF reached IS NULL THEN
        RAISE EXCEPTION 'no account is the tenant of this transaction' USING ERRCODE = 'no_data_found';
    END IF;
    IF quota > 0 AND reached > quota THEN
        RAISE EXCEPTION 'storage quota exceeded' USING ERRCODE = 'KQ001', DETAIL = reached::text;
    END IF;
    RETURN reached;
END
$$;
-- Who may call it is the permission matrix's (`matrix::FUNCTIONS`).
REVOKE ALL ON FUNCTION keepd.add_pushed_bytes(bigint, bigint) FROM PUBLIC;
