//! Devices (Ed25519 public keys) and the encrypted backups they sign.
//!
//! keepd checks each backup's signature against the device's public key
//! before storing it: it can tell a backup came from a device of the
//! account, yet never holds a key that opens it.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, UserAuth};
use super::sync::check_base64;
use super::{Api, iso8601, queries};
use crate::audit::AuditAction;
use crate::field_crypto::column;
use crate::postgres::pool::GroupRole;

const MAX_DEVICE_NAME_CHARS: usize = 200;
const DEFAULT_PAGE: i64 = 20;
const MAX_PAGE: i64 = 100;

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterDeviceBody {
    device_name: String,
    /// Base64 of the 32-byte Ed25519 public key.
    public_key: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    id: Uuid,
    device_name: String,
    public_key: String,
    created_at: String,
    revoked_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DeviceResponse {
    message: &'static str,
    device: Device,
}

#[derive(Serialize, ToSchema)]
pub struct DevicesResponse {
    devices: Vec<Device>,
}

/// How sensitive a backup is (the seeds' classification).
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy)]
pub enum DataClassification {
    Internal,
    Confidential,
    Restricted,
}

impl DataClassification {
    fn as_str(self) -> &'static str {
        match self {
            DataClassification::Internal => "Internal",
            DataClassification::Confidential => "Confidential",
            DataClassification::Restricted => "Restricted",
        }
    }

    fn parse(stored: &str) -> DataClassification {
        match stored {
            "Internal" => DataClassification::Internal,
            "Confidential" => DataClassification::Confidential,
            // The column's CHECK admits nothing else.
            _ => DataClassification::Restricted,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreBackupBody {
    device_id: Uuid,
    /// Base64 ciphertext.
    ciphertext: String,
    /// Base64.
    nonce: String,
    /// Base64 AEAD tag.
    auth_tag: String,
    /// Base64 Ed25519 signature over the raw ciphertext bytes by the device's key.
    signature: String,
    data_classification: DataClassification,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSummary {
    id: Uuid,
    device_id: Uuid,
    data_classification: DataClassification,
    size_bytes: i64,
    created_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct StoreBackupResponse {
    message: &'static str,
    backup: BackupSummary,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupsResponse {
    backups: Vec<BackupSummary>,
    /// Pass as `before` for the next page; absent on the last page.
    next_cursor: Option<Uuid>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backup {
    id: Uuid,
    device_id: Uuid,
    ciphertext: String,
    nonce: String,
    auth_tag: String,
    signature: String,
    data_classification: DataClassification,
    size_bytes: i64,
    created_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct BackupResponse {
    backup: Backup,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BackupsPage {
    /// 1 to 100 (default 20).
    limit: Option<i64>,
    /// The `nextCursor` of the previous page.
    before: Option<Uuid>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct IdPath {
    id: Uuid,
}

fn device_from_row(api: &Api, row: &tokio_postgres::Row) -> Result<Device, ApiError> {
    let key: Vec<u8> = row.get(2);
    let revoked: Option<SystemTime> = row.get(4);
    Ok(Device {
        id: row.get(0),
        device_name: api.fields.open_text(column::DEVICE_NAME, row.get(1))?,
        public_key: BASE64.encode(key),
        created_at: iso8601(row.get(3)),
        revoked_at: revoked.map(iso8601),
    })
}

/// Registers a device's Ed25519 public key.
#[utoipa::path(post, path = "/devices", tag = "devices",
    request_body = RegisterDeviceBody,
    responses(
        (status = 201, body = DeviceResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn register_device(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiJson(body): ApiJson<RegisterDeviceBody>,
) -> Result<(StatusCode, Json<DeviceResponse>), ApiError> {
    let started = Instant::now();
    let name_chars = body.device_name.chars().count();
    if name_chars == 0 || name_chars > MAX_DEVICE_NAME_CHARS {
        return Err(ApiError::bad_request(
            "invalid_device_name",
            format!("`deviceName` must be 1 to {MAX_DEVICE_NAME_CHARS} characters"),
        ));
    }
    let key = check_base64("publicKey", &body.public_key)?;
    let valid_key = <[u8; 32]>::try_from(key.as_slice())
        .ok()
        .and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok())
        .is_some();
    if !valid_key {
        return Err(ApiError::bad_request(
            "invalid_public_key",
            "`publicKey` must be the base64 of a 32-byte Ed25519 public key",
        ));
    }
    let id = Uuid::new_v4();
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let stored_name = api
        .fields
        .seal_text(column::DEVICE_NAME, body.device_name.clone());
    let row = tx
        .query_one(
            queries::INSERT_DEVICE,
            &[&id, &auth.user, &stored_name, &key],
        )
        .await?;
    let created_at: SystemTime = row.get(0);
    let metadata = json!({"user": api.user_ref(auth.user), "device": id});
    api.audit(&mut tx, AuditAction::DeviceAdd, 1, started, metadata)
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(DeviceResponse {
            message: "Device registered",
            device: Device {
                id,
                device_name: body.device_name,
                public_key: BASE64.encode(key),
                created_at: iso8601(created_at),
                revoked_at: None,
            },
        }),
    ))
}

/// The account's devices, revoked ones included.
#[utoipa::path(get, path = "/devices", tag = "devices",
    responses((status = 200, body = DevicesResponse), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn list_devices(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
) -> Result<Json<DevicesResponse>, ApiError> {
    let tx = auth.begin(&api, GroupRole::Query).await?;
    let rows = tx.query(queries::LIST_DEVICES, &[&auth.user]).await?;
    tx.commit().await?;
    Ok(Json(DevicesResponse {
        devices: rows
            .iter()
            .map(|row| device_from_row(&api, row))
            .collect::<Result<_, _>>()?,
    }))
}

/// Revokes a device: its signatures are no longer accepted.
#[utoipa::path(delete, path = "/devices/{id}", tag = "devices",
    params(IdPath),
    responses(
        (status = 200, body = super::auth::MessageBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn revoke_device(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiPath(IdPath { id }): ApiPath<IdPath>,
) -> Result<Json<super::auth::MessageBody>, ApiError> {
    let started = Instant::now();
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let revoked = tx
        .execute(queries::REVOKE_DEVICE, &[&auth.user, &id])
        .await?;
    if revoked == 0 {
        return Err(ApiError::not_found(
            "device_not_found",
            "no active device with this id on this account",
        ));
    }
    let metadata = json!({"user": api.user_ref(auth.user), "device": id});
    api.audit(&mut tx, AuditAction::DeviceRevoke, 1, started, metadata)
        .await?;
    tx.commit().await?;
    Ok(Json(super::auth::MessageBody::new("Device revoked")))
}

/// Stores an encrypted backup signed by one of the account's devices.
#[utoipa::path(post, path = "/backups", tag = "backups",
    request_body = StoreBackupBody,
    responses(
        (status = 201, body = StoreBackupResponse),
        (status = 400, description = "Malformed input or a signature that does not verify", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not a device of this account, or revoked", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn store_backup(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiJson(body): ApiJson<StoreBackupBody>,
) -> Result<(StatusCode, Json<StoreBackupResponse>), ApiError> {
    let started = Instant::now();
    let ciphertext = check_base64("ciphertext", &body.ciphertext)?;
    let nonce = check_base64("nonce", &body.nonce)?;
    let auth_tag = check_base64("authTag", &body.auth_tag)?;
    let signature_bytes = check_base64("signature", &body.signature)?;
    let signature = Signature::from_slice(&signature_bytes).map_err(|_| {
        ApiError::bad_request(
            "invalid_signature",
            "`signature` must be the base64 of a 64-byte Ed25519 signature",
        )
    })?;
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let device = tx
        .query(queries::DEVICE_KEY, &[&auth.user, &body.device_id])
        .await?;
    let Some(device) = device.first() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "unknown_device",
            "`deviceId` is not a device of this account; register it with POST /devices",
        ));
    };
    let (public_key, revoked): (Vec<u8>, bool) = (device.get(0), device.get(1));
    if revoked {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "device_revoked",
            "this device was revoked; its backups are no longer accepted",
        ));
    }
    let key = <[u8; 32]>::try_from(public_key.as_slice())
        .ok()
        .and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok())
        .ok_or_else(|| ApiError::internal("device key", &"stored key is not Ed25519"))?;
    if key.verify_strict(&ciphertext, &signature).is_err() {
        return Err(ApiError::bad_request(
            "bad_signature",
            "`signature` does not verify over the ciphertext with this device's key",
        ));
    }
    let id = Uuid::new_v4();
    let size = ciphertext.len() as i64;
    let classification = body.data_classification.as_str();
    let f = &api.fields;
    let stored = (
        f.seal_bytes(column::BACKUP_CIPHERTEXT, ciphertext),
        f.seal_bytes(column::BACKUP_NONCE, nonce),
        f.seal_bytes(column::BACKUP_AUTH_TAG, auth_tag),
        f.seal_bytes(column::BACKUP_SIGNATURE, signature_bytes),
    );
    let row = tx
        .query_one(
            queries::INSERT_BACKUP,
            &[
                &id,
                &auth.user,
                &body.device_id,
                &stored.0,
                &stored.1,
                &stored.2,
                &stored.3,
                &classification,
                &size,
            ],
        )
        .await?;
    let created_at: SystemTime = row.get(0);
    let metadata = json!({
        "user": api.user_ref(auth.user),
        "device": body.device_id,
        "backup": id,
        "sizeBytes": size,
        "dataClassification": classification,
    });
    api.audit(&mut tx, AuditAction::BackupCreate, 1, started, metadata)
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(StoreBackupResponse {
            message: "Backup stored",
            backup: BackupSummary {
                id,
                device_id: body.device_id,
                data_classification: body.data_classification,
                size_bytes: size,
                created_at: iso8601(created_at),
            },
        }),
    ))
}

/// The account's backups, newest first, metadata only.
#[utoipa::path(get, path = "/backups", tag = "backups",
    params(BackupsPage),
    responses(
        (status = 200, body = BackupsResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn list_backups(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiQuery(page): ApiQuery<BackupsPage>,
) -> Result<Json<BackupsResponse>, ApiError> {
    let limit = page.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("`limit` must be 1 to {MAX_PAGE}"),
        ));
    }
    let tx = auth.begin(&api, GroupRole::Query).await?;
    let rows = tx
        .query(
            queries::LIST_BACKUPS,
            &[&auth.user, &page.before, &(limit + 1)],
        )
        .await?;
    tx.commit().await?;
    let mut backups: Vec<BackupSummary> = rows
        .iter()
        .map(|row| BackupSummary {
            id: row.get(0),
            device_id: row.get(1),
            data_classification: DataClassification::parse(row.get(2)),
            size_bytes: row.get(3),
            created_at: iso8601(row.get(4)),
        })
        .collect();
    let next_cursor = if backups.len() as i64 > limit {
        backups.truncate(limit as usize);
        backups.last().map(|b| b.id)
    } else {
        None
    };
    Ok(Json(BackupsResponse {
        backups,
        next_cursor,
    }))
}

/// One backup, whole.
#[utoipa::path(get, path = "/backups/{id}", tag = "backups",
    params(IdPath),
    responses(
        (status = 200, body = BackupResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn backup(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiPath(IdPath { id }): ApiPath<IdPath>,
) -> Result<Json<BackupResponse>, ApiError> {
    let tx = auth.begin(&api, GroupRole::Query).await?;
    let rows = tx.query(queries::BACKUP, &[&auth.user, &id]).await?;
    tx.commit().await?;
    let row = rows.first().ok_or_else(|| {
        ApiError::not_found("backup_not_found", "no backup with this id on this account")
    })?;
    let bytes = |i: usize, column| {
        api.fields
            .open_bytes(column, row.get::<_, Vec<u8>>(i))
            .map(|b| BASE64.encode(b))
    };
    Ok(Json(BackupResponse {
        backup: Backup {
            id,
            device_id: row.get(0),
            ciphertext: bytes(1, column::BACKUP_CIPHERTEXT)?,
            nonce: bytes(2, column::BACKUP_NONCE)?,
            auth_tag: bytes(3, column::BACKUP_AUTH_TAG)?,
            signature: bytes(4, column::BACKUP_SIGNATURE)?,
            data_classification: DataClassification::parse(row.get(5)),
            size_bytes: row.get(6),
            created_at: iso8601(row.get(7)),
        },
    }))
}
