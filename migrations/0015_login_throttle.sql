-- keepd schema v15: the failed-login throttle lives in Postgres, so every
-- node sees every attempt and a guess is counted before its password is
-- checked. One row per account key (the email's HMAC, whether or not an
-- account has it: the throttle must not tell). `known` holds keyed
-- identifiers (never the addresses) of the last addresses the account
-- logged in from, which the throttle never delays.
CREATE TABLE keepd.login_throttle (
    account      bytea PRIMARY KEY CHECK (length(account) = 32),
    failures     integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    last_failure timestamptz,
    known        text[] NOT NULL DEFAULT '{}' CHECK (cardinality(known) <= 8)
);
ALTER TABLE keepd.login_throttle ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.login_throttle FORCE ROW LEVEL SECURITY;
-- Visible to a login that knows the email's HMAC, or to the account's own
-- session (re-authentication of a password change or an erasure).
CREATE POLICY login_throttle_account ON keepd.login_throttle
    USING (account = (SELECT decode(coalesce(current_setting('keepd.email_hmac', true), ''), 'hex'))
           OR account = (SELECT u.email_hmac FROM keepd.users u
                          WHERE u.id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid)))
    WITH CHECK (account = (SELECT decode(coalesce(current_setting('keepd.email_hmac', true), ''), 'hex'))
           OR account = (SELECT u.email_hmac FROM keepd.users u
                          WHERE u.id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid)));
