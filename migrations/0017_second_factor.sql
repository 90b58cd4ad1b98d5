-- keepd schema v17: TOTP (RFC 6238) as a second factor. The secret is
-- sealed under the field key (`field_crypto::ALWAYS_SEALED`); it counts
-- once confirmed with a code. totp_last_step is the last time step a code
-- was accepted for: a code is accepted once, never replayed within its
-- window. Recovery codes are kept as SHA-256 hashes (each is 80 random
-- bits), single use.
ALTER TABLE keepd.users ADD COLUMN totp_secret bytea;
ALTER TABLE keepd.users ADD COLUMN totp_confirmed_at timestamptz;
ALTER TABLE keepd.users ADD COLUMN totp_last_step bigint;
ALTER TABLE keepd.users ADD CONSTRAINT users_totp_confirmed_has_secret
    CHECK (totp_confirmed_at IS NULL OR totp_secret IS NOT NULL);

CREATE TABLE keepd.recovery_codes (
    user_id   uuid NOT NULL REFERENCES keepd.users (id) ON DELETE CASCADE,
    code_hash bytea NOT NULL CHECK (length(code_hash) = 32),
    used_at   timestamptz,
    PRIMARY KEY (user_id, code_hash)
);
ALTER TABLE keepd.recovery_codes ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.recovery_codes FORCE ROW LEVEL SECURITY;
CREATE POLICY recovery_codes_tenant ON keepd.recovery_codes
    USING (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid))
    WITH CHECK (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid));
-- The operator's reset (`keepd account reset-second-factor`) removes an
-- account's codes; its role sees every account, as for the users table.
CREATE POLICY recovery_codes_operator ON keepd.recovery_codes TO keepd_operator
    USING (true);

-- Whether a session proved the second factor at its login (for
-- api.auth.require_second_factor).
ALTER TABLE keepd.sessions ADD COLUMN second_factor boolean NOT NULL DEFAULT false;
