//! `keepd.backups` (`keepd_sync` writes, `keepd_query` reads).

use std::time::SystemTime;

use uuid::Uuid;

use super::StoreError;
use crate::field_crypto::{FieldCipher, column};
use crate::postgres::pool::ScopedTransaction;

/// No row back when the account holds this same backup already.
const INSERT_BACKUP: &str = "INSERT INTO keepd.backups \
     (id, user_id, device_id, ciphertext, nonce, auth_tag, signature, data_classification, \
      size_bytes, signature_version, content_hash) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
     ON CONFLICT (user_id, content_hash) WHERE content_hash IS NOT NULL DO NOTHING \
     RETURNING created_at";

/// Newest first; `$2`, when set, is the last id of the previous page.
const LIST_BACKUPS: &str = "SELECT id, device_id, data_classification, size_bytes, created_at, \
       signature_version \
     FROM keepd.backups b WHERE user_id = $1 AND ($2::uuid IS NULL OR (created_at, id) < \
       (SELECT created_at, id FROM keepd.backups WHERE user_id = $1 AND id = $2)) \
     ORDER BY created_at DESC, id DESC LIMIT $3";

/// The size it counted against the quota, when there was one.
const DELETE_BACKUP: &str =
    "DELETE FROM keepd.backups WHERE user_id = $1 AND id = $2 RETURNING size_bytes";

const BACKUP: &str = "SELECT device_id, ciphertext, nonce, auth_tag, signature, \
     data_classification, size_bytes, created_at, signature_version \
     FROM keepd.backups WHERE user_id = $1 AND id = $2";

/// A signed backup as the client sent it (raw bytes).
pub struct NewBackup {
    pub device: Uuid,
    pub ciphertext: Vec<u8>,
    pub nonce: Vec<u8>,
    pub auth_tag: Vec<u8>,
    pub signature: Vec<u8>,
    pub signature_version: i16,
    pub classification: &'static str,
}

impl NewBackup {
    /// SHA-256 over ciphertext, nonce and tag, each length-prefixed: equal
    /// only for the same backup.
    fn content_hash(&self) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for field in [&self.ciphertext, &self.nonce, &self.auth_tag] {
            hash.update((field.len() as u64).to_be_bytes());
            hash.update(field);
        }
        hash.finalize().to_vec()
    }
}

pub struct Summary {
    pub id: Uuid,
    pub device: Uuid,
    pub classification: String,
    pub size_bytes: i64,
    pub created_at: SystemTime,
    pub signature_version: i16,
}

pub struct Backup {
    pub device: Uuid,
    pub ciphertext: Vec<u8>,
    pub nonce: Vec<u8>,
    pub auth_tag: Vec<u8>,
    pub signature: Vec<u8>,
    pub classification: String,
    pub size_bytes: i64,
    pub created_at: SystemTime,
    pub signature_version: i16,
}

/// Stores a backup; its id, size in bytes and creation time, or None when
/// the account holds this same backup already.
pub async fn store(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    backup: NewBackup,
) -> Result<Option<(Uuid, i64, SystemTime)>, StoreError> {
    let id = Uuid::new_v4();
    // The rule log entries follow too: the decoded bytes the client sent.
    let size = (backup.ciphertext.len() + backup.nonce.len() + backup.auth_tag.len()) as i64;
    let content_hash = backup.content_hash();
    let version = backup.signature_version;
    let sealed = (
        fields.seal_bytes(column::BACKUP_CIPHERTEXT, backup.ciphertext),
        fields.seal_bytes(column::BACKUP_NONCE, backup.nonce),
        fields.seal_bytes(column::BACKUP_AUTH_TAG, backup.auth_tag),
        fields.seal_bytes(column::BACKUP_SIGNATURE, backup.signature),
    );
    let rows = tx
        .query(
            INSERT_BACKUP,
            &[
                &id,
                &user,
                &backup.device,
                &sealed.0,
                &sealed.1,
                &sealed.2,
                &sealed.3,
                &backup.classification,
                &size,
                &version,
                &content_hash,
            ],
        )
        .await?;
    Ok(rows.first().map(|row| (id, size, row.get(0))))
}

/// Up to `limit` backups, newest first, after the one with id `before`.
pub async fn page(
    tx: &ScopedTransaction,
    user: Uuid,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Summary>, StoreError> {
    let rows = tx.query(LIST_BACKUPS, &[&user, &before, &limit]).await?;
    Ok(rows
        .iter()
        .map(|row| Summary {
            id: row.get(0),
            device: row.get(1),
            classification: row.get(2),
            size_bytes: row.get(3),
            created_at: row.get(4),
            signature_version: row.get(5),
        })
        .collect())
}

pub async fn get(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    id: Uuid,
) -> Result<Option<Backup>, StoreError> {
    let rows = tx.query(BACKUP, &[&user, &id]).await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    Ok(Some(Backup {
        device: row.get(0),
        ciphertext: fields.open_bytes(column::BACKUP_CIPHERTEXT, row.get(1))?,
        nonce: fields.open_bytes(column::BACKUP_NONCE, row.get(2))?,
        auth_tag: fields.open_bytes(column::BACKUP_AUTH_TAG, row.get(3))?,
        signature: fields.open_bytes(column::BACKUP_SIGNATURE, row.get(4))?,
        classification: row.get(5),
        size_bytes: row.get(6),
        created_at: row.get(7),
        signature_version: row.get(8),
    }))
}

/// Deletes a backup of `user`; the bytes it counted (the usage trigger
/// frees them and its place in `api.quotas.backups`), or None when the
/// account has no backup with this id.
pub async fn delete(
    tx: &ScopedTransaction,
    user: Uuid,
    id: Uuid,
) -> Result<Option<i64>, StoreError> {
    let rows = tx.query(DELETE_BACKUP, &[&user, &id]).await?;
    Ok(rows.first().map(|row| row.get(0)))
}
