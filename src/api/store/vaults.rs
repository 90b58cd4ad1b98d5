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
     (id, vault, user_id, encrypted_vault_key, salt, nonce) VALUES ($1, $2, $3, $4, $5, $6) \
     RETURNING created_at";

const VAULT_KEY: &str = "SELECT k.encrypted_vault_key, k.salt, k.nonce, k.created_at \
     FROM keepd.vaults v JOIN keepd.vault_keys k ON k.vault = v.id \
     WHERE v.user_id = $1 AND v.vault_id = $2";

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
) -> Result<(Uuid, SystemTime), StoreError> {
    let id = Uuid::new_v4();
    let sealed = (
        fields.seal_text(column::VAULT_KEY, key.encrypted_vault_key),
        fields.seal_text(column::VAULT_KEY_SALT, key.salt),
        fields.seal_text(column::VAULT_KEY_NONCE, key.nonce),
    );
    let row = tx
        .query_one(
            INSERT_VAULT_KEY,
            &[&id, &vault, &user, &sealed.0, &sealed.1, &sealed.2],
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
    }))
}
