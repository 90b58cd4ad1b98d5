//! `keepd.devices` (`keepd_sync` writes, `keepd_query` reads).

use std::time::SystemTime;

use uuid::Uuid;

use super::StoreError;
use crate::field_crypto::{FieldCipher, column};
use crate::postgres::pool::ScopedTransaction;

/// A proven device; no row back when its key is proven on a device
/// already (this account's or another's: the unique index sees them all).
const INSERT_DEVICE: &str = "INSERT INTO keepd.devices \
     (id, user_id, device_name, public_key, proven_at) VALUES ($1, $2, $3, $4, now()) \
     ON CONFLICT (public_key) WHERE proven_at IS NOT NULL DO NOTHING RETURNING created_at";

/// The user's devices, oldest first, after device `$2`, at most `$3`.
const LIST_DEVICES: &str = "SELECT id, device_name, public_key, created_at, revoked_at \
     FROM keepd.devices WHERE user_id = $1 AND ($2::uuid IS NULL OR (created_at, id) > \
       (SELECT created_at, id FROM keepd.devices WHERE user_id = $1 AND id = $2)) \
     ORDER BY created_at, id LIMIT $3";

const REVOKE_DEVICE: &str = "UPDATE keepd.devices SET revoked_at = now() \
     WHERE user_id = $1 AND id = $2 AND revoked_at IS NULL";

/// The user's revoked devices (they count against `api.quotas.devices`
/// until the janitor purges them).
const REVOKED_DEVICES: &str =
    "SELECT count(*) FROM keepd.devices WHERE user_id = $1 AND revoked_at IS NOT NULL";

const DEVICE_KEY: &str =
    "SELECT public_key, revoked_at IS NOT NULL FROM keepd.devices WHERE user_id = $1 AND id = $2";

pub struct Device {
    pub id: Uuid,
    pub name: String,
    pub public_key: Vec<u8>,
    pub created_at: SystemTime,
    pub revoked_at: Option<SystemTime>,
}

/// A device's public key, and whether it was revoked.
pub struct DeviceKey {
    pub public_key: Vec<u8>,
    pub revoked: bool,
}

/// Registers a device whose key proved itself; its id and creation time,
/// or None when that key is registered already.
pub async fn add(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    name: &str,
    public_key: &[u8],
) -> Result<Option<(Uuid, SystemTime)>, StoreError> {
    let id = Uuid::new_v4();
    let stored_name = fields.seal_text(column::DEVICE_NAME, name.to_string());
    let rows = tx
        .query(INSERT_DEVICE, &[&id, &user, &stored_name, &public_key])
        .await?;
    Ok(rows.first().map(|row| (id, row.get(0))))
}

pub async fn list(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Device>, StoreError> {
    let rows = tx.query(LIST_DEVICES, &[&user, &after, &limit]).await?;
    rows.iter()
        .map(|row| {
            Ok(Device {
                id: row.get(0),
                name: fields.open_text(column::DEVICE_NAME, row.get(1))?,
                public_key: row.get(2),
                created_at: row.get(3),
                revoked_at: row.get(4),
            })
        })
        .collect()
}

/// Revokes an active device; false when there is none with this id.
pub async fn revoke(tx: &ScopedTransaction, user: Uuid, device: Uuid) -> Result<bool, StoreError> {
    Ok(tx.execute(REVOKE_DEVICE, &[&user, &device]).await? > 0)
}

/// How many of the user's devices are revoked (and not yet purged).
pub async fn revoked(tx: &ScopedTransaction, user: Uuid) -> Result<u64, StoreError> {
    let row = tx.query_one(REVOKED_DEVICES, &[&user]).await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

pub async fn key(
    tx: &ScopedTransaction,
    user: Uuid,
    device: Uuid,
) -> Result<Option<DeviceKey>, StoreError> {
    let rows = tx.query(DEVICE_KEY, &[&user, &device]).await?;
    Ok(rows.first().map(|row| DeviceKey {
        public_key: row.get(0),
        revoked: row.get(1),
    }))
}
