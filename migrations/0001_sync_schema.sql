-- keepd schema v1: the zero-knowledge sync tables. Applied by keepd as
-- keepd_owner inside one transaction with the other pending migrations.
-- Privileges are not granted here: keepd grants exactly its permission
-- matrix (src/postgres/matrix.rs) after migrating, at every start.
--
-- Tenant tables carry the owning user_id and have row-level security
-- enabled and forced: a transaction sees and writes only the rows of the
-- user named by current_setting('keepd.user_id', true).

CREATE TABLE keepd.users (
    id            uuid PRIMARY KEY,
    -- Keyed HMAC of the normalised email: lookups work, no address is stored.
    email_hmac    bytea NOT NULL UNIQUE,
    password_hash text NOT NULL,
    -- Bumped on password change: tokens of older generations stop working.
    token_generation integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE keepd.sessions (
    id         uuid PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES keepd.users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX sessions_user_idx ON keepd.sessions (user_id);

CREATE TABLE keepd.vaults (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES keepd.users (id) ON DELETE CASCADE,
    vault_id      text NOT NULL CHECK (length(vault_id) BETWEEN 1 AND 200),
    -- The last sequence number handed out; advanced inside the push
    -- transaction (UPDATE ... RETURNING), so sequences are gap-free.
    last_sequence bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, vault_id)
);

CREATE TABLE keepd.vault_keys (
    id                  uuid PRIMARY KEY,
    vault               uuid NOT NULL UNIQUE REFERENCES keepd.vaults (id) ON DELETE CASCADE,
    user_id             uuid NOT NULL REFERENCES keepd.users (id) ON DELETE CASCADE,
    encrypted_vault_key text NOT NULL,
    salt                text NOT NULL,
    nonce               text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vault_keys_user_idx ON keepd.vault_keys (user_id);

CREATE TABLE keepd.sync_logs (
    id             uuid PRIMARY KEY,
    vault          uuid NOT NULL REFERENCES keepd.vaults (id) ON DELETE CASCADE,
    user_id        uuid NOT NULL REFERENCES keepd.users (id) ON DELETE CASCADE,
    sequence       bigint NOT NULL CHECK (sequence > 0),
    encrypted_data text NOT NULL,
    nonce          text NOT NULL,
    haex_timestamp text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (vault, sequence)
);
CREATE INDEX sync_logs_user_idx ON keepd.sync_logs (user_id);

-- The first result of a push, replayed for a retry with the same key.
CREATE TABLE keepd.push_requests (
    user_id         uuid NOT NULL REFERENCES keepd.users (id) ON DELETE CASCADE,
    idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    response        jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key)
);

CREATE TABLE keepd.devices (
    id          uuid PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES keepd.users (id) ON DELETE CASCADE,
    device_name text NOT NULL CHECK (length(device_name) BETWEEN 1 AND 200),
    public_key  bytea NOT NULL CHECK (length(public_key) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX devices_user_idx ON keepd.devices (user_id);

CREATE TABLE keepd.backups (
    id                  uuid PRIMARY KEY,
    user_id             uuid NOT NULL REFERENCES keepd.users (id) ON DELETE CASCADE,
    device_id           uuid NOT NULL REFERENCES keepd.devices (id) ON DELETE CASCADE,
    ciphertext          bytea NOT NULL,
    nonce               bytea NOT NULL,
    auth_tag            bytea NOT NULL,
    signature           bytea NOT NULL,
    data_classification text NOT NULL
        CHECK (data_classification IN ('Internal', 'Confidential', 'Restricted')),
    size_bytes          bigint NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX backups_user_created_idx ON keepd.backups (user_id, created_at DESC, id);

-- Row-level security, enabled and forced (the owner is held to it too).
ALTER TABLE keepd.users ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.users FORCE ROW LEVEL SECURITY;
-- A user row is visible to its own user, or to a login lookup that already
-- knows the email's HMAC (keepd.email_hmac, hex).
CREATE POLICY users_tenant ON keepd.users
    USING (id = nullif(current_setting('keepd.user_id', true), '')::uuid
           OR email_hmac = decode(coalesce(current_setting('keepd.email_hmac', true), ''), 'hex'))
    WITH CHECK (id = nullif(current_setting('keepd.user_id', true), '')::uuid);

ALTER TABLE keepd.sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.sessions FORCE ROW LEVEL SECURITY;
CREATE POLICY sessions_tenant ON keepd.sessions
    USING (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid);

ALTER TABLE keepd.vaults ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.vaults FORCE ROW LEVEL SECURITY;
CREATE POLICY vaults_tenant ON keepd.vaults
    USING (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid);

ALTER TABLE keepd.vault_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.vault_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY vault_keys_tenant ON keepd.vault_keys
    USING (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid);

ALTER TABLE keepd.sync_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.sync_logs FORCE ROW LEVEL SECURITY;
CREATE POLICY sync_logs_tenant ON keepd.sync_logs
    USING (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid);

ALTER TABLE keepd.push_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.push_requests FORCE ROW LEVEL SECURITY;
CREATE POLICY push_requests_tenant ON keepd.push_requests
    USING (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid);

ALTER TABLE keepd.devices ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.devices FORCE ROW LEVEL SECURITY;
CREATE POLICY devices_tenant ON keepd.devices
    USING (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid);

ALTER TABLE keepd.backups ENABLE ROW LEVEL SECURITY;
ALTER TABLE keepd.backups FORCE ROW LEVEL SECURITY;
CREATE POLICY backups_tenant ON keepd.backups
    USING (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid)
    WITH CHECK (user_id = nullif(current_setting('keepd.user_id', true), '')::uuid);
