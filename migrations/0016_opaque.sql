-- keepd schema v16: OPAQUE (RFC 9807) logins. An account holds either an
-- Argon2id password hash (the password routes) or an OPAQUE record
-- (sealed under the field key: `field_crypto::ALWAYS_SEALED`), never both.
ALTER TABLE keepd.users ALTER COLUMN password_hash DROP NOT NULL;
ALTER TABLE keepd.users ADD COLUMN opaque_record bytea;
ALTER TABLE keepd.users ADD CONSTRAINT users_one_credential
    CHECK ((password_hash IS NULL) <> (opaque_record IS NULL));

-- A login between its two messages: the server's state (sealed), for the
-- account key (the email's HMAC, whether or not an account has it) and
-- the account if there is one. Any node finishes what any node started;
-- a state is used once (deleted as it is read) and dies at expires_at.
CREATE TABLE keepd.opaque_logins (
    id         uuid PRIMARY KEY,
    account    bytea NOT NULL CHECK (length(account) = 32),
    user_id    uuid REFERENCES keepd.users (id) ON DELETE CASCADE,
    state      bytea NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX opaque_logins_expiry_idx ON keepd.opaque_logins (expires_at);
ALTER TABLE keepd.opaque_logins ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.opaque_logins FORCE ROW LEVEL SECURITY;
-- Visible only to a transaction that knows the email's HMAC.
CREATE POLICY opaque_logins_account ON keepd.opaque_logins
    USING (account = (SELECT decode(coalesce(current_setting('keepd.email_hmac', true), ''), 'hex')))
    WITH CHECK (account = (SELECT decode(coalesce(current_setting('keepd.email_hmac', true), ''), 'hex')));
