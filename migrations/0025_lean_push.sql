-- keepd schema v25: what a push writes besides its entries, made smaller
-- (measured under a push load: an Idempotency-Key cost about a fifth of a
-- push's throughput, the account index up to a tenth).
--
-- sync_logs_user_idx goes: since v24 nothing finds entries by account (an
-- account's entries leave with its vaults, by vault, and every read names
-- a vault), yet each push inserted 50 keys into it.
DROP INDEX keepd.sync_logs_user_idx;

-- An Idempotency-Key's record keeps where its push's entries are (the
-- vault's row id, the first sequence, how many) instead of the whole
-- answer as jsonb, which Postgres parsed and pglz-compressed on every push
-- (about 5 KB for 50 entries). A retry's answer is made again from the
-- entries. Records written before keep their answer in `response` until
-- they expire.
ALTER TABLE keepd.push_requests
    ALTER COLUMN response DROP NOT NULL,
    ADD COLUMN vault uuid,
    ADD COLUMN first_sequence bigint,
    ADD COLUMN entries integer,
    ADD CONSTRAINT push_requests_answer CHECK (
        response IS NOT NULL
        OR (vault IS NOT NULL AND first_sequence > 0 AND entries > 0));
