//! Every statement the API runs, by name. Each runs inside a role-scoped
//! transaction whose tenant is set, so row-level security limits it to the
//! caller's rows; the explicit `user_id` conditions are for the indexes.

// Accounts and sessions (keepd_auth).

/// Registers a user; no row back when the email is taken.
pub const INSERT_USER: &str = "INSERT INTO keepd.users (id, email_hmac, password_hash) \
     VALUES ($1, $2, $3) ON CONFLICT (email_hmac) DO NOTHING RETURNING created_at";

/// The account for a login (visible through the email-HMAC policy).
pub const USER_BY_EMAIL: &str =
    "SELECT id, password_hash, created_at FROM keepd.users WHERE email_hmac = $1";

pub const USER_BY_ID: &str = "SELECT password_hash FROM keepd.users WHERE id = $1";

pub const SET_PASSWORD: &str = "UPDATE keepd.users SET password_hash = $2 WHERE id = $1";

pub const DELETE_USER: &str = "DELETE FROM keepd.users WHERE id = $1";

pub const INSERT_SESSION: &str =
    "INSERT INTO keepd.sessions (id, user_id, expires_at) VALUES ($1, $2, $3)";

pub const SESSION_IS_LIVE: &str = "SELECT 1 FROM keepd.sessions \
     WHERE id = $1 AND revoked_at IS NULL AND expires_at > now()";

pub const REVOKE_SESSION: &str =
    "UPDATE keepd.sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL";

pub const REVOKE_ALL_SESSIONS: &str =
    "UPDATE keepd.sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL";

// Vaults, keys and logs (keepd_sync writes, keepd_query reads).

/// Creates the vault row; no row back when the user already has it.
pub const INSERT_VAULT: &str = "INSERT INTO keepd.vaults (id, user_id, vault_id) VALUES ($1, $2, $3) \
     ON CONFLICT (user_id, vault_id) DO NOTHING RETURNING id";

pub const INSERT_VAULT_KEY: &str = "INSERT INTO keepd.vault_keys \
     (id, vault, user_id, encrypted_vault_key, salt, nonce) VALUES ($1, $2, $3, $4, $5, $6) \
     RETURNING created_at";

pub const VAULT_KEY: &str = "SELECT k.encrypted_vault_key, k.salt, k.nonce, k.created_at \
     FROM keepd.vaults v JOIN keepd.vault_keys k ON k.vault = v.id \
     WHERE v.user_id = $1 AND v.vault_id = $2";

pub const VAULT_ID: &str = "SELECT id FROM keepd.vaults WHERE user_id = $1 AND vault_id = $2";

/// Reserves `$3` sequence numbers. The row lock it takes is held to
/// commit, so concurrent pushes to one vault commit in sequence order and
/// a rolled-back push gives its numbers back.
pub const ADVANCE_SEQUENCE: &str = "UPDATE keepd.vaults SET last_sequence = last_sequence + $3 \
     WHERE user_id = $1 AND vault_id = $2 RETURNING id, last_sequence";

/// Stores a whole batch in one statement: entry k (1-based) of the arrays
/// gets sequence `$3 + k`.
pub const INSERT_LOGS: &str = "INSERT INTO keepd.sync_logs \
     (id, vault, user_id, sequence, encrypted_data, nonce, haex_timestamp) \
     SELECT e.id, $1, $2, $3 + e.ord, e.data, e.nonce, e.ts \
     FROM unnest($4::uuid[], $5::text[], $6::text[], $7::text[]) \
          WITH ORDINALITY AS e(id, data, nonce, ts, ord) \
     RETURNING id, sequence, haex_timestamp, created_at";

pub const PULL_LOGS: &str = "SELECT id, encrypted_data, nonce, haex_timestamp, sequence, created_at \
     FROM keepd.sync_logs WHERE vault = $1 AND sequence > $2 ORDER BY sequence LIMIT $3";

pub const STORED_PUSH: &str =
    "SELECT response FROM keepd.push_requests WHERE user_id = $1 AND idempotency_key = $2";

/// Remembers a push's response; no row when a concurrent retry won.
pub const SAVE_PUSH: &str = "INSERT INTO keepd.push_requests (user_id, idempotency_key, response) \
     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

// Devices and backups (keepd_sync writes, keepd_query reads).

pub const INSERT_DEVICE: &str = "INSERT INTO keepd.devices (id, user_id, device_name, public_key) \
     VALUES ($1, $2, $3, $4) RETURNING created_at";

pub const LIST_DEVICES: &str = "SELECT id, device_name, public_key, created_at, revoked_at \
     FROM keepd.devices WHERE user_id = $1 ORDER BY created_at, id";

pub const REVOKE_DEVICE: &str = "UPDATE keepd.devices SET revoked_at = now() \
     WHERE user_id = $1 AND id = $2 AND revoked_at IS NULL";

pub const DEVICE_KEY: &str =
    "SELECT public_key, revoked_at IS NOT NULL FROM keepd.devices WHERE user_id = $1 AND id = $2";

pub const INSERT_BACKUP: &str = "INSERT INTO keepd.backups \
     (id, user_id, device_id, ciphertext, nonce, auth_tag, signature, data_classification, \
      size_bytes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING created_at";

/// Newest first; `$2`, when set, is the last id of the previous page.
pub const LIST_BACKUPS: &str = "SELECT id, device_id, data_classification, size_bytes, created_at \
     FROM keepd.backups b WHERE user_id = $1 AND ($2::uuid IS NULL OR (created_at, id) < \
       (SELECT created_at, id FROM keepd.backups WHERE user_id = $1 AND id = $2)) \
     ORDER BY created_at DESC, id DESC LIMIT $3";

pub const BACKUP: &str = "SELECT device_id, ciphertext, nonce, auth_tag, signature, \
     data_classification, size_bytes, created_at FROM keepd.backups WHERE user_id = $1 AND id = $2";
