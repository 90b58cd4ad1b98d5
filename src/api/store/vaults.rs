//! `keepd.vaults` and `keepd.vault_keys` (`keepd_sync` writes,
//! `keepd_query` reads).

use std::time::SystemTime;

use uuid::Uuid;

use super::StoreError;
use crate::field_crypto::{FieldCipher, column};
use crate::postgres::pool::ScopedTransaction;

/// Creates the vault row; no row back when the user already has it.
const INSERT_VAULT: &str = "INSERT INTO keepd.vaults (id, user_id, vault_id) VALUES ($1, $2, $3) \
     ON CONFLICT (user_id, vault_id) DO NOTHING RETURNING id";

const INSERT_VAULT_KEY: &str = "INSERT INTO keepd.vault_keys \
     (id, vault, user_id, encrypted_vault_key, salt, nonce, key_check) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING created_at";

const VAULT_KEY: &str = "SELECT k.encrypted_vault_key, k.salt, k.nonce, k.created_at, \
       k.version, k.key_check, k.updated_at \
     FROM keepd.vaults v JOIN keepd.vault_keys k ON k.vault = v.id \
     WHERE v.user_id = $1 AND v.vault_id = $2";

/// The key check a push is compared with, held until commit so a re-key
/// cannot slip between the check and the append.
const KEY_CHECK: &str = "SELECT k.key_check FROM keepd.vaults v \
     JOIN keepd.vault_keys k ON k.vault = v.id \
     WHERE v.user_id = $1 AND v.vault_id = $2 FOR SHARE OF k";

/// Replaces the wrapped key if its version is still `$3`; the new
/// version and time, or no row (stale, or no such vault). A key check is
/// added where there was none, replaced (or removed) only when `$8` says so.
const REWRAP: &str = "UPDATE keepd.vault_keys k SET encrypted_vault_key = $4, salt = $5, \
       nonce = $6, \
       key_check = CASE WHEN $8 THEN $7 ELSE coalesce(k.key_check, $7) END, \
       version = k.version + 1, \
       updated_at = now() \
     FROM keepd.vaults v \
     WHERE k.vault = v.id AND v.user_id = $1 AND v.vault_id = $2 AND k.user_id = $1 \
       AND k.version = $3 \
     RETURNING k.version, k.updated_at";

const KEY_VERSION: &str = "SELECT k.version FROM keepd.vaults v \
     JOIN keepd.vault_keys k ON k.vault = v.id WHERE v.user_id = $1 AND v.vault_id = $2";

const HEAD: &str =
    "SELECT id, last_sequence FROM keepd.vaults WHERE user_id = $1 AND vault_id = $2";

/// The user's vaults after `$2` (by vaultId), at most `$3`.
const LIST: &str = "SELECT vault_id, created_at, last_sequence, bytes FROM keepd.vaults \
     WHERE user_id = $1 AND ($2::text IS NULL OR vault_id > $2) \
     ORDER BY vault_id LIMIT $3";

/// Erases the vault; its key and entries go with it (ON DELETE CASCADE,
/// counted back out of the account's usage by its triggers).
const DELETE: &str = "DELETE FROM keepd.vaults WHERE user_id = $1 AND vault_id = $2 \
     RETURNING id, last_sequence, bytes";

/// A vault key as the client wrapped it (plaintext to keepd only in the
/// sense that keepd cannot unwrap it).
pub struct WrappedKey {
    pub encrypted_vault_key: String,
    pub salt: String,
    pub nonce: String,
}

pub struct StoredKey {
    pub key: WrappedKey,
    pub created_at: SystemTime,
    pub version: i32,
    pub key_check: Option<String>,
    pub updated_at: Option<SystemTime>,
}

/// One vault as `GET /sync/vaults` lists it.
pub struct VaultSummary {
    pub vault_id: String,
    pub created_at: SystemTime,
    /// Its last sequence, which is its entry count.
    pub entries: i64,
    pub bytes: i64,
}

/// What an erased vault held.
pub struct Erased {
    pub vault: Uuid,
    pub entries: i64,
    pub bytes: i64,
}

/// What a re-wrap came to.
pub enum Rewrapped {
    Done {
        version: i32,
        updated_at: SystemTime,
    },
    /// The record is at another version than the client read.
    Stale {
        current: i32,
    },
    Missing,
}

/// The wrapped key's three columns as they are stored (sealed at rest
/// when the configuration says so).
fn seal(fields: &FieldCipher, key: WrappedKey) -> (String, String, String) {
    (
        fields.seal_text(column::VAULT_KEY, key.encrypted_vault_key),
        fields.seal_text(column::VAULT_KEY_SALT, key.salt),
        fields.seal_text(column::VAULT_KEY_NONCE, key.nonce),
    )
}

/// Creates the vault; its row id, or None when the user already has it.
pub async fn create(
    tx: &ScopedTransaction,
    user: Uuid,
    vault_id: &str,
) -> Result<Option<Uuid>, StoreError> {
    let rows = tx
        .query(INSERT_VAULT, &[&Uuid::new_v4(), &user, &vault_id])
        .await?;
    Ok(rows.first().map(|row| row.get(0)))
}

/// Stores the vault's wrapped key; its id and creation time.
pub async fn store_key(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    vault: Uuid,
    user: Uuid,
    key: WrappedKey,
    key_check: Option<&str>,
) -> Result<(Uuid, SystemTime), StoreError> {
    let id = Uuid::new_v4();
    let sealed = seal(fields, key);
    let row = tx
        .query_one(
            INSERT_VAULT_KEY,
            &[
                &id, &vault, &user, &sealed.0, &sealed.1, &sealed.2, &key_check,
            ],
        )
        .await?;
    Ok((id, row.get(0)))
}

pub async fn key(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    vault_id: &str,
) -> Result<Option<StoredKey>, StoreError> {
    let rows = tx.query(VAULT_KEY, &[&user, &vault_id]).await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    Ok(Some(StoredKey {
        key: WrappedKey {
            encrypted_vault_key: fields.open_text(column::VAULT_KEY, row.get(0))?,
            salt: fields.open_text(column::VAULT_KEY_SALT, row.get(1))?,
            nonce: fields.open_text(column::VAULT_KEY_NONCE, row.get(2))?,
        },
        created_at: row.get(3),
        version: row.get(4),
        key_check: row.get(5),
        updated_at: row.get(6),
    }))
}

/// The vault's key check: None when there is no such vault, Some(None)
/// when its key record has none.
pub async fn key_check(
    tx: &ScopedTransaction,
    user: Uuid,
    vault_id: &str,
) -> Result<Option<Option<String>>, StoreError> {
    let rows = tx.query(KEY_CHECK, &[&user, &vault_id]).await?;
    Ok(rows.first().map(|row| row.get(0)))
}

/// What a re-wrap does to the record's key check.
#[derive(Debug, Clone, Copy)]
pub enum KeyCheckChange<'a> {
    Keep,
    /// Sets it on a record that has none; an existing one stays.
    AddIfNone(&'a str),
    /// Replaces it, or removes it with None (the client says the key
    /// itself changed).
    Replace(Option<&'a str>),
}

/// Replaces the wrapped key (the same key under a new password) if the
/// record is still at `version`.
pub async fn rewrap(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    vault_id: &str,
    version: i32,
    key: WrappedKey,
    key_check: KeyCheckChange<'_>,
) -> Result<Rewrapped, StoreError> {
    let sealed = seal(fields, key);
    let (check, replace) = match key_check {
        KeyCheckChange::Keep => (None, false),
        KeyCheckChange::AddIfNone(check) => (Some(check), false),
        KeyCheckChange::Replace(check) => (check, true),
    };
    let rows = tx
        .query(
            REWRAP,
            &[
                &user, &vault_id, &version, &sealed.0, &sealed.1, &sealed.2, &check, &replace,
            ],
        )
        .await?;
    if let Some(row) = rows.first() {
        return Ok(Rewrapped::Done {
            version: row.get(0),
            updated_at: row.get(1),
        });
    }
    let current = tx.query(KEY_VERSION, &[&user, &vault_id]).await?;
    Ok(match current.first() {
        Some(row) => Rewrapped::Stale {
            current: row.get(0),
        },
        None => Rewrapped::Missing,
    })
}

/// The vault's row id and last sequence; None when there is no such vault.
pub async fn head(
    tx: &ScopedTransaction,
    user: Uuid,
    vault_id: &str,
) -> Result<Option<(Uuid, i64)>, StoreError> {
    let rows = tx.query(HEAD, &[&user, &vault_id]).await?;
    Ok(rows.first().map(|row| (row.get(0), row.get(1))))
}

/// The user's vaults in vaultId order after `after`, at most `limit`.
pub async fn list(
    tx: &ScopedTransaction,
    user: Uuid,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<VaultSummary>, StoreError> {
    let rows = tx.query(LIST, &[&user, &after, &limit]).await?;
    Ok(rows
        .iter()
        .map(|row| VaultSummary {
            vault_id: row.get(0),
            created_at: row.get(1),
            entries: row.get(2),
            bytes: row.get(3),
        })
        .collect())
}

/// Erases the vault with its key and entries; None when there is none.
pub async fn delete(
    tx: &ScopedTransaction,
    user: Uuid,
    vault_id: &str,
) -> Result<Option<Erased>, StoreError> {
    let rows = tx.query(DELETE, &[&user, &vault_id]).await?;
    Ok(rows.first().map(|row| Erased {
        vault: row.get(0),
        entries: row.get(1),
        bytes: row.get(2),
    }))
}
