-- keepd schema v23: a push reserves its bytes before its transaction and
-- claims the reservation inside it, so no lock an account's pushes share
-- is held while a commit waits for the disk.
--
-- Since v21 a push added its bytes to the account's usage row in the
-- round trip that committed: that row stayed locked until the commit
-- record was on disk, so one account's pushes (and nothing else) could
-- not share a WAL flush, and ran one fsync after another.
--
-- Now the bytes are counted and checked against the quota in a short
-- transaction of their own, committed without waiting for the disk
-- (keepd.reserve_pushed_bytes, under synchronous_commit = off): the row is
-- locked for microseconds. The reservation is a row of its own. The push's
-- transaction deletes that row (keepd.claim_pushed_bytes), which nothing
-- else touches: stored entries and a claimed reservation commit together,
-- or neither does. A push that does not commit gives its reservation back
-- (keepd.give_back_pushed_bytes); one whose outcome keepd never learnt
-- (keepd stopped mid-push) stays counted until the janitor gives back
-- reservations older than an hour, after which a claim fails and such a
-- push would store nothing. The count can run ahead of what is stored by
-- pushes in flight, never behind: no push slips past a quota.
--
-- Durability: the reservation's commit record precedes the push's in the
-- WAL, so a push flushed to disk has its reservation flushed with it.
CREATE TABLE keepd.push_reservations (
    id         uuid PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES keepd.users (id) ON DELETE CASCADE,
    bytes      bigint NOT NULL CHECK (bytes >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX push_reservations_created_idx ON keepd.push_reservations (created_at);
-- Only the functions below (as the owner) and the janitor (the superuser)
-- touch it: no group role has a privilege on it.
ALTER TABLE keepd.push_reservations ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.push_reservations FORCE ROW LEVEL SECURITY;
CREATE POLICY push_reservations_owner ON keepd.push_reservations TO keepd_owner
    USING (true) WITH CHECK (true);

-- Counts `bytes` on the transaction's tenant and checks the quota as
-- keepd.add_pushed_bytes (v21) does (the tenant from the transaction, never
-- the caller; past the storage quota, 0 for none, SQLSTATE KQ001 with the
-- bytes the account would reach in DETAIL), then records the reservation
-- and returns its id.
CREATE FUNCTION keepd.reserve_pushed_bytes(bytes bigint, quota bigint) RETURNS uuid
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    reservation uuid := gen_random_uuid();
BEGIN
    PERFORM keepd.add_pushed_bytes(bytes, quota);
    INSERT INTO keepd.push_reservations (id, user_id, bytes)
    VALUES (reservation, nullif(current_setting('keepd.user_id', true), '')::uuid, bytes);
    RETURN reservation;
END
$$;

-- Inside the push's transaction: the tenant's reservation is used. Gone
-- (given back, or not the tenant's): SQLSTATE KQ002, and the transaction
-- aborts, so entries are never stored uncounted.
CREATE FUNCTION keepd.claim_pushed_bytes(reservation uuid) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    claimed bigint;
BEGIN
    DELETE FROM keepd.push_reservations
     WHERE id = reservation AND user_id = nullif(current_setting('keepd.user_id', true), '')::uuid
    RETURNING bytes INTO claimed;
    IF claimed IS NULL THEN
        RAISE EXCEPTION 'the push''s reservation is gone' USING ERRCODE = 'KQ002';
    END IF;
    RETURN claimed;
END
$$;

-- A push that did not commit: its reservation, if still there, no longer
-- counts. A claimed one is gone, so giving back twice, or after the push
-- committed after all, changes nothing.
CREATE FUNCTION keepd.give_back_pushed_bytes(reservation uuid) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tenant uuid := nullif(current_setting('keepd.user_id', true), '')::uuid;
    returned bigint;
BEGIN
    DELETE FROM keepd.push_reservations WHERE id = reservation AND user_id = tenant
    RETURNING bytes INTO returned;
    IF returned IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE keepd.account_usage SET storage_bytes = storage_bytes - returned WHERE user_id = tenant;
    RETURN returned;
END
$$;

-- Who may call them is the permission matrix's (`matrix::FUNCTIONS`).
REVOKE ALL ON FUNCTION keepd.reserve_pushed_bytes(bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION keepd.claim_pushed_bytes(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION keepd.give_back_pushed_bytes(uuid) FROM PUBLIC;
